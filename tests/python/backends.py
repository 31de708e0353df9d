"""Helpers for the suites that put a real model server behind the gateway
(test_mlserver.py, test_kserve.py): free ports, child processes stopped by process
group, polling with a deadline, the gateway started in front of one backend, a
hand-made ``grpc.health.v1`` check, and the checks both suites make.

Imports tritonclient, grpc and numpy only, never a server's package (its protos clash
with tritonclient's): the servers run in their own processes.
"""

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "infergate"
START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
SERVING, NOT_SERVING = 1, 2


def free_ports(n):
    """``n`` distinct ports free on 127.0.0.1 just now."""
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
    """A child process in its own session, its output in a temporary file."""

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
        """Signals the whole process group (servers start helper processes) and waits;
        SIGKILL when ``sig`` is not enough within STOP_TIMEOUT_S."""
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)


def wait_until(what, proc, ready, timeout=START_TIMEOUT_S):
    """Polls ``ready()`` until it is true; fails with ``proc``'s output when ``proc``
    exits first or ``timeout`` passes."""
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


def wait_model_ready(what, proc, addr, model):
    """Polls ``ModelReady(model)`` at ``addr`` until it says yes."""
    probe = grpcclient.InferenceServerClient(addr)
    try:
        wait_until(what, proc, lambda: probe.is_model_ready(model, client_timeout=1.0))
    finally:
        probe.close()


@contextlib.contextmanager
def serving(name, cmd, cwd, grpc_port, model):
    """Runs a model server (``cmd``) until ``ModelReady(model)`` on ``grpc_port`` says
    yes; yields its Process (with ``addr`` and ``model``) and stops it on the way out."""
    started = time.monotonic()
    proc = Process(name, cmd, cwd)
    proc.addr = f"127.0.0.1:{grpc_port}"
    proc.model = model
    try:
        wait_model_ready(name, proc, proc.addr, model)
        print(f"{name} ready in {time.monotonic() - started:.1f}s")
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def gateway_in_front_of(backend, workdir):
    """``infergate serve`` with ``backend`` (from ``serving``) as its only backend and fast
    health checks, once it says the backend's model is ready. Yields its Process, with
    ``addr`` (the front port) and ``admin``."""
    binary = Path(os.environ.get("INFERGATE_BIN", DEFAULT_BIN))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.is_file():
        pytest.fail(f"infergate binary not found at {binary} (cargo build, or set INFERGATE_BIN)", pytrace=False)
    front, metrics, admin = free_ports(3)
    config = Path(workdir) / "infergate.toml"
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
            address = "{backend.addr}"
            """
        )
    )
    proc = Process("infergate", [binary, "serve", "--config", config], cwd=REPO_ROOT)
    proc.addr = f"127.0.0.1:{front}"
    proc.admin = f"127.0.0.1:{admin}"
    try:
        wait_model_ready("infergate", proc, proc.addr, backend.model)
        yield proc
    finally:
        proc.stop()
        print(f"--- infergate output ---\n{proc.output()}")


def health(addr, service):
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


def gateway_serving_without_backend_health(gateway, backend):
    """The backend has no grpc.health.v1 (UNIMPLEMENTED), yet the gateway's own says
    SERVING for "" on the front and the admin port: it checks the backend with
    ServerReady and ModelReady instead."""
    with pytest.raises(grpc.RpcError) as e:
        health(backend.addr, "")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value
    assert health(gateway.addr, "") == SERVING
    assert health(gateway.admin, "") == SERVING


def infer_both_ways(via_gateway, direct, model, inputs, request_id):
    """ModelInfer through the gateway and straight to the backend: checks the gateway's
    answer names the model and the request and is exactly the backend's own; returns it
    (an InferResult)."""
    through = via_gateway.infer(model, inputs, request_id=request_id, client_timeout=CALL_TIMEOUT_S)
    answer = through.get_response(as_json=True)
    assert answer["model_name"] == model and answer["id"] == request_id, answer
    alone = direct.infer(model, inputs, request_id=request_id, client_timeout=CALL_TIMEOUT_S)
    assert answer == alone.get_response(as_json=True)
    return through


def metadata_both_ways(via_gateway, direct, model):
    """ServerLive, ServerReady and ModelReady through the gateway say yes, and its
    ModelMetadata is the backend's own; returns that metadata (as JSON)."""
    assert via_gateway.is_server_live() and via_gateway.is_server_ready()
    assert via_gateway.is_model_ready(model)
    meta = via_gateway.get_model_metadata(model, as_json=True)
    assert meta["name"] == model, meta
    assert meta == direct.get_model_metadata(model, as_json=True)
    return meta


def kill_and_expect_unavailable(backend, gateway, client, model, inputs):
    """SIGKILLs ``backend``; then the gateway's health for "" must turn NOT_SERVING
    within 10 s, ``ModelReady(model)`` through it say no, and an infer call fail with
    UNAVAILABLE at once (under 5 s, not the client's 20 s timeout). Returns that
    call's InferenceServerException."""
    backend.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while health(gateway.addr, "") != NOT_SERVING:
        assert time.monotonic() < deadline, f"still SERVING 10 s after {backend.name} died"
        time.sleep(0.1)
    assert not client.is_model_ready(model)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, client_timeout=CALL_TIMEOUT_S)
    took = time.monotonic() - started
    assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
    # 5 s: room for a loaded machine.
    assert took < 5.0, f"took {took:.1f}s: {e.value}"
    assert gateway.alive(), f"the gateway exited\n{gateway.output()}"
    return e.value


def fp32_inputs(x, name="input-0"):
    """The one-tensor input list for ``tritonclient.grpc`` infer calls."""
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def stream_request(model, x, request_id):
    """A ModelInferRequest for ModelStreamInfer: ``x`` as FP32 tensor ``input-0``."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input-0", "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


def stream_raw(addr, request):
    """ModelStreamInfer with one request; the answers as raw bytes, undecoded."""
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        return list(call(iter([request]), timeout=CALL_TIMEOUT_S))
