"""MLServer behind the gateway: a real ``mlserver`` (with ``mlserver-sklearn``) serving a
tiny scikit-learn model trained here, and ``infergate serve`` in front of it, driven by
the stock ``tritonclient.grpc`` client.

What it shows:
- unary ``ModelInfer`` through the gateway answers what the model predicts, and exactly
  what MLServer answers directly;
- ``ModelReady``, ``ModelMetadata``, ``ServerLive``/``ServerReady`` pass through;
- health: MLServer has no ``grpc.health.v1``; the gateway checks it with ``ServerReady``
  and ``ModelReady`` instead, and its own ``grpc.health.v1`` says SERVING for "" on both
  ports (by the model's name: an expected failure, see ``test_health_by_model_name``);
- ``ModelStreamInfer``: MLServer answers with plain ``ModelInferResponse`` messages, not
  Triton's ``ModelStreamInferResponse``. The gateway forwards them byte for byte, as it
  forwards every message, so a client gets what MLServer sent (the test pins this), and
  ``tritonclient``'s stream cannot decode them (its reader fails on the message and the
  stream never delivers; the same happens without the gateway). The test of a working
  tritonclient stream through the gateway is an expected failure until the gateway
  translates these answers;
- killing MLServer turns the gateway's health for it NOT_SERVING and calls fail fast with
  UNAVAILABLE.

Needs ``requirements-mlserver.txt``; ``tests/python/run_mlserver.sh`` installs it into
``.venv-mlserver/`` and runs ``pytest -m mlserver``. Elsewhere this module is skipped.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

# Looked up, not imported: MLServer's protos and tritonclient's define the same
# `inference.*` messages, which one process's protobuf pool cannot hold twice.
if importlib.util.find_spec("mlserver") is None or importlib.util.find_spec("mlserver_sklearn") is None:
    pytest.skip(
        "MLServer is not installed: run tests/python/run_mlserver.sh", allow_module_level=True
    )

import grpc  # noqa: E402  (installed with tritonclient[grpc])
import joblib  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.mlserver

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "infergate"
MODEL = "tiny"
START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
SERVING, NOT_SERVING = 1, 2


def _free_ports(n):
    ports, socks = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Process:
    """A child process with its output in a temporary file, stopped by PID."""

    def __init__(self, name, cmd, cwd):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
            start_new_session=True,
        )

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, sig)  # MLServer starts helper processes
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)


def _wait(what, proc, ready, timeout=START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not proc.alive():
            pytest.fail(f"{what} exited with {proc.proc.returncode}\n{proc.output()}", pytrace=False)
        try:
            if ready():
                return
        except Exception as e:  # noqa: BLE001  (not listening yet)
            last = e
        time.sleep(0.1)
    pytest.fail(f"{what} not ready within {timeout:.0f}s ({last})\n{proc.output()}", pytrace=False)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return LogisticRegression().fit(x, y)


@pytest.fixture(scope="module")
def mlserver(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlserver")
    (root / MODEL).mkdir()
    joblib.dump(model, root / MODEL / "model.joblib")
    (root / MODEL / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"},
                "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
            }
        )
    )
    http_port, grpc_port, metrics_port = _free_ports(3)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
            }
        )
    )
    started = time.monotonic()
    proc = Process("mlserver", [Path(sys.executable).parent / "mlserver", "start", root], cwd=root)
    proc.addr = f"127.0.0.1:{grpc_port}"
    probe = grpcclient.InferenceServerClient(proc.addr)
    try:
        _wait("mlserver", proc, lambda: probe.is_model_ready(MODEL, client_timeout=1.0))
    finally:
        probe.close()
    print(f"mlserver ready in {time.monotonic() - started:.1f}s")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(mlserver, tmp_path_factory):
    binary = Path(os.environ.get("INFERGATE_BIN", DEFAULT_BIN))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.is_file():
        pytest.fail(f"infergate binary not found at {binary} (cargo build, or set INFERGATE_BIN)", pytrace=False)
    front, metrics, admin = _free_ports(3)
    config = tmp_path_factory.mktemp("gateway") / "infergate.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen = "127.0.0.1:{front}"
            metrics_listen = "127.0.0.1:{metrics}"
            admin_listen = "127.0.0.1:{admin}"
            shutdown_drain_ms = 0

            [health]
            interval_ms = 200
            unhealthy_interval_ms = 200
            timeout_ms = 500

            [[backends]]
            address = "{mlserver.addr}"
            """
        )
    )
    proc = Process("infergate", [binary, "serve", "--config", config], cwd=REPO_ROOT)
    proc.addr = f"127.0.0.1:{front}"
    proc.admin = f"127.0.0.1:{admin}"
    probe = grpcclient.InferenceServerClient(proc.addr)
    try:
        _wait("infergate", proc, lambda: probe.is_model_ready(MODEL, client_timeout=1.0))
    finally:
        probe.close()
    yield proc
    proc.stop()
    if not proc.alive():
        print(f"--- infergate output ---\n{proc.output()}")


@pytest.fixture(scope="module")
def via_gateway(gateway):
    c = grpcclient.InferenceServerClient(gateway.addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(mlserver):
    c = grpcclient.InferenceServerClient(mlserver.addr)
    yield c
    c.close()


def _inputs(x):
    i = grpcclient.InferInput("input-0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def _health(addr, service):
    """grpc.health.v1.Health/Check by hand (two tiny messages): the status number."""
    request = b"" if not service else b"\n" + bytes([len(service)]) + service.encode()
    with grpc.insecure_channel(addr) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        answer = check(request, timeout=CALL_TIMEOUT_S)
    # HealthCheckResponse { status = 1 (varint) }; SERVING = 1, absent = UNKNOWN.
    return answer[1] if answer[:1] == b"\x08" else 0


def _stream_raw(addr, request):
    """ModelStreamInfer with one request; the answers as raw bytes, undecoded."""
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        return list(call(iter([request]), timeout=CALL_TIMEOUT_S))


def test_unary_infer_answers_what_the_model_predicts(via_gateway, direct, model):
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    through = via_gateway.infer(MODEL, _inputs(x), request_id="u1", client_timeout=CALL_TIMEOUT_S)
    assert through.as_numpy("predict").ravel().tolist() == model.predict(x).tolist()
    answer = through.get_response(as_json=True)
    assert answer["model_name"] == MODEL and answer["id"] == "u1"
    # Byte for byte what MLServer says itself.
    alone = direct.infer(MODEL, _inputs(x), request_id="u1", client_timeout=CALL_TIMEOUT_S)
    assert answer == alone.get_response(as_json=True)


def test_model_ready_and_metadata_pass_through(via_gateway, direct):
    assert via_gateway.is_server_live() and via_gateway.is_server_ready()
    assert via_gateway.is_model_ready(MODEL)
    assert via_gateway.is_model_ready(MODEL, "v1")
    meta = via_gateway.get_model_metadata(MODEL, as_json=True)
    assert meta == direct.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL
    assert [i["name"] for i in meta["inputs"]] == ["input-0"]
    assert [o["name"] for o in meta["outputs"]] == ["predict"]
    index = via_gateway.get_model_repository_index(as_json=True)
    assert MODEL in [m["name"] for m in index.get("models", [])]


def test_health_on_both_ports_although_mlserver_has_no_grpc_health(gateway, mlserver):
    with pytest.raises(grpc.RpcError) as e:
        _health(mlserver.addr, "")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The gateway checks MLServer with ServerReady and ModelReady instead.
    assert _health(gateway.addr, "") == SERVING
    assert _health(gateway.admin, "") == SERVING


# MLServer's RepositoryIndex says state 'State.READY'; discovery reads it as READY, so
# the model is known at start and its health entry published with the others.
def test_health_by_model_name(gateway):
    assert _health(gateway.addr, MODEL) == SERVING


def _stream_request():
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="s1")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input-0", "FP32"
    tensor.shape.extend([1, 4])
    request.raw_input_contents.append(np.array([[1, 1, 0, 0]], dtype=np.float32).tobytes())
    return request


def test_stream_answers_are_wrapped_as_stream_responses(gateway, mlserver):
    """MLServer answers ModelStreamInfer with plain ModelInferResponse messages, which
    stock clients cannot decode; the gateway wraps each one as
    ModelStreamInferResponse.infer_response and changes nothing else."""
    through = _stream_raw(gateway.addr, _stream_request())
    alone = _stream_raw(mlserver.addr, _stream_request())
    assert len(through) == 1 and len(alone) == 1
    # MLServer on its own: a bare ModelInferResponse, no ModelStreamInferResponse.
    with pytest.raises(Exception):
        service_pb2.ModelStreamInferResponse.FromString(alone[0])
    wrapped = service_pb2.ModelStreamInferResponse.FromString(through[0])
    assert wrapped.error_message == ""
    assert wrapped.infer_response == service_pb2.ModelInferResponse.FromString(alone[0])
    assert wrapped.infer_response.model_name == MODEL and wrapped.infer_response.id == "s1"
    assert [o.name for o in wrapped.infer_response.outputs] == ["predict"]


STREAM_CLIENT = """
import numpy as np, os, queue, sys, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
x = np.array([[1, 1, 0, 0]], dtype=np.float32)
i = g.InferInput("input-0", [1, 4], "FP32"); i.set_data_from_numpy(x)
q = queue.Queue()
c.start_stream(callback=lambda result, error: q.put((result, error)), stream_timeout=5)
c.async_stream_infer(sys.argv[2], [i], request_id="s1")
try:
    result, error = q.get(timeout=8)
except queue.Empty:
    print("no answer within 8 s"); sys.stdout.flush(); os._exit(3)
if error is not None:
    print("error:", error); sys.stdout.flush(); os._exit(2)
print("predict:", result.as_numpy("predict").ravel().tolist()); sys.stdout.flush(); os._exit(0)
"""


def test_tritonclient_stream_through_the_gateway(gateway):
    # In a child process: tritonclient's reader thread dies on the undecodable message
    # and its stop_stream() then never returns.
    try:
        done = subprocess.run(
            [sys.executable, "-c", STREAM_CLIENT, gateway.addr, MODEL],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("tritonclient's stream did not finish within 20 s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "predict: [1]"


def test_killed_mlserver_is_taken_out(gateway, mlserver, via_gateway):
    """Last: MLServer dies; the gateway's health turns NOT_SERVING and calls fail fast."""
    mlserver.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _health(gateway.addr, "") != NOT_SERVING:
        assert time.monotonic() < deadline, "still SERVING 10 s after MLServer died"
        time.sleep(0.1)
    assert not via_gateway.is_model_ready(MODEL)
    x = np.zeros((1, 4), dtype=np.float32)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        via_gateway.infer(MODEL, _inputs(x), client_timeout=CALL_TIMEOUT_S)
    took = time.monotonic() - started
    assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
    # At once, not after the client's 20 s timeout (5 s: room for a loaded machine).
    assert took < 5.0, f"took {took:.1f}s: {e.value}"
    assert gateway.alive()
