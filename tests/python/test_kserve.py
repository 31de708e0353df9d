"""KServe behind the gateway: KServe's own Python model server (PyPI ``kserve``) serving
``kserve_model.py``'s model, which doubles an FP32 tensor, as a separate process, and
``infergate serve`` in front of it, driven by the stock ``tritonclient.grpc`` client.

What it shows:
- unary ``ModelInfer`` through the gateway answers twice the input, with the model's
  name and the request's id, exactly as KServe answers directly;
- ``ModelReady``, ``ModelMetadata``, ``ServerLive``/``ServerReady`` pass through;
- KServe has no ``RepositoryIndex`` and no ``grpc.health.v1``: the gateway finds the
  model by ``ModelReady`` and checks the server with ``ServerReady``, and its own health
  says SERVING;
- a model nobody serves is NOT_FOUND, by name;
- KServe has no ``ModelStreamInfer``: directly a stream ends UNIMPLEMENTED; through the
  gateway that comes back as an in-stream error with KServe's message, and the backend
  stays in;
- killing KServe turns the gateway's health NOT_SERVING and calls fail fast with
  UNAVAILABLE.

Needs ``requirements-kserve.txt``; ``tests/python/run_backend.sh kserve`` installs it
into ``.venv-kserve/`` and runs ``pytest -m kserve``. Elsewhere this module is skipped.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

# Looked up, not imported: KServe's protos and tritonclient's define the same
# `inference.*` messages, which one process's protobuf pool cannot hold twice. The
# model server runs in its own process anyway.
if importlib.util.find_spec("kserve") is None:
    pytest.skip("KServe is not installed: run tests/python/run_backend.sh kserve", allow_module_level=True)

import grpc  # noqa: E402  (installed with tritonclient[grpc])
import numpy as np  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import backends  # noqa: E402
from backends import CALL_TIMEOUT_S, SERVING, fp32_inputs, health  # noqa: E402

pytestmark = pytest.mark.kserve

MODEL = "doubler"
MODEL_SCRIPT = Path(__file__).with_name("kserve_model.py")


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    grpc_port, http_port = backends.free_ports(2)
    cmd = [sys.executable, MODEL_SCRIPT, "--grpc-port", grpc_port, "--http-port", http_port, "--model-name", MODEL]
    with backends.serving("kserve", cmd, tmp_path_factory.mktemp("kserve"), grpc_port, MODEL) as proc:
        yield proc


@pytest.fixture(scope="module")
def backend(kserve):
    """What conftest.py's gateway fixtures stand in front of."""
    return kserve


def test_unary_infer_doubles_the_input(via_gateway, direct):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    through = backends.infer_both_ways(via_gateway, direct, MODEL, fp32_inputs(x), "k1")
    out = through.as_numpy("output-0")
    assert out.dtype == np.float32 and out.shape == (3, 4)
    assert out.tolist() == (x * 2).tolist()


def test_model_ready_metadata_and_server_pass_through(via_gateway, direct):
    backends.metadata_both_ways(via_gateway, direct, MODEL)


def test_health_without_repository_index_or_grpc_health(gateway, kserve, direct):
    with pytest.raises(InferenceServerException) as e:
        direct.get_model_repository_index()
    assert e.value.status() == "StatusCode.UNIMPLEMENTED", e.value
    # The gateway found the model by ModelReady, and checks KServe with ServerReady.
    backends.gateway_serving_without_backend_health(gateway, kserve)


def test_unknown_model_is_not_found_by_name(via_gateway):
    x = np.ones((1, 2), dtype=np.float32)
    with pytest.raises(InferenceServerException) as e:
        via_gateway.infer("no-such-model", fp32_inputs(x), client_timeout=CALL_TIMEOUT_S)
    assert e.value.status() == "StatusCode.NOT_FOUND", e.value
    assert "no-such-model" in e.value.message(), e.value
    assert via_gateway.is_model_ready(MODEL), "an unknown model's call took the backend out"


def test_stream_unimplemented_in_kserve_is_an_in_stream_error(gateway, kserve, via_gateway):
    """KServe ends a ModelStreamInfer call at once with UNIMPLEMENTED. The gateway, which
    answers a stream's failed requests in the stream (as Triton does), passes that on as
    one ModelStreamInferResponse carrying KServe's message and the request's model and
    id, then ends the stream OK; the backend stays in."""
    request = backends.stream_request(MODEL, np.array([[1, 2]], dtype=np.float32), "s1")
    with pytest.raises(grpc.RpcError) as e:
        backends.stream_raw(kserve.addr, request)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    through = backends.stream_raw(gateway.addr, request)
    assert len(through) == 1, through
    answer = service_pb2.ModelStreamInferResponse.FromString(through[0])
    assert answer.error_message == e.value.details(), answer
    assert answer.infer_response.model_name == MODEL and answer.infer_response.id == "s1"
    assert via_gateway.is_model_ready(MODEL), "an UNIMPLEMENTED stream took the backend out"
    assert health(gateway.addr, "") == SERVING


def test_killed_kserve_is_taken_out(gateway, kserve, via_gateway):
    """Last: KServe dies; the gateway's health turns NOT_SERVING and calls fail fast."""
    x = np.ones((1, 2), dtype=np.float32)
    error = backends.kill_and_expect_unavailable(kserve, gateway, via_gateway, MODEL, fp32_inputs(x))
    # The cause, by name: "model doubler: no backend can take the call (1 backend,
    # 1 unreachable (last check of ...: connection refused))".
    assert MODEL in error.message() and (
        "unreachable" in error.message() or "not ready" in error.message()), error
