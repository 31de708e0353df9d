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

Needs ``requirements-mlserver.txt``; ``tests/python/run_backend.sh mlserver`` installs it
into ``.venv-mlserver/`` and runs ``pytest -m mlserver``. Elsewhere this module is skipped.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Looked up, not imported: MLServer's protos and tritonclient's define the same
# `inference.*` messages, which one process's protobuf pool cannot hold twice.
if importlib.util.find_spec("mlserver") is None or importlib.util.find_spec("mlserver_sklearn") is None:
    pytest.skip(
        "MLServer is not installed: run tests/python/run_backend.sh mlserver", allow_module_level=True
    )

import joblib  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

from backends import (  # noqa: E402
    SERVING,
    fp32_inputs,
    free_ports,
    gateway_serving_without_backend_health,
    health,
    infer_both_ways,
    kill_and_expect_unavailable,
    metadata_both_ways,
    serving,
    stream_raw,
    stream_request,
)

pytestmark = pytest.mark.mlserver

MODEL = "tiny"


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
    http_port, grpc_port, metrics_port = free_ports(3)
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
    cmd = [Path(sys.executable).parent / "mlserver", "start", root]
    with serving("mlserver", cmd, root, grpc_port, MODEL) as proc:
        yield proc


@pytest.fixture(scope="module")
def backend(mlserver):
    """What conftest.py's gateway fixtures stand in front of."""
    return mlserver


def test_unary_infer_answers_what_the_model_predicts(via_gateway, direct, model):
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    # Also exactly what MLServer says itself.
    through = infer_both_ways(via_gateway, direct, MODEL, fp32_inputs(x), "u1")
    assert through.as_numpy("predict").ravel().tolist() == model.predict(x).tolist()


def test_model_ready_and_metadata_pass_through(via_gateway, direct):
    meta = metadata_both_ways(via_gateway, direct, MODEL)
    assert via_gateway.is_model_ready(MODEL, "v1")
    assert [i["name"] for i in meta["inputs"]] == ["input-0"]
    assert [o["name"] for o in meta["outputs"]] == ["predict"]
    index = via_gateway.get_model_repository_index(as_json=True)
    assert MODEL in [m["name"] for m in index.get("models", [])]


def test_health_on_both_ports_although_mlserver_has_no_grpc_health(gateway, mlserver):
    gateway_serving_without_backend_health(gateway, mlserver)


# MLServer's RepositoryIndex says state 'State.READY'; discovery reads it as READY, so
# the model is known at start and its health entry published with the others.
def test_health_by_model_name(gateway):
    assert health(gateway.addr, MODEL) == SERVING


def _stream_request():
    return stream_request(MODEL, np.array([[1, 1, 0, 0]], dtype=np.float32), "s1")


def test_stream_answers_are_wrapped_as_stream_responses(gateway, mlserver):
    """MLServer answers ModelStreamInfer with plain ModelInferResponse messages, which
    stock clients cannot decode; the gateway wraps each one as
    ModelStreamInferResponse.infer_response and changes nothing else."""
    through = stream_raw(gateway.addr, _stream_request())
    alone = stream_raw(mlserver.addr, _stream_request())
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
    x = np.zeros((1, 4), dtype=np.float32)
    kill_and_expect_unavailable(mlserver, gateway, via_gateway, MODEL, fp32_inputs(x))
