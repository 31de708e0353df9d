"""A stock Python reflection client, ``grpc-requests`` (``Client.get_by_endpoint``), on
both ports of a real ``infergate demo``: it lists the services, resolves every one of
them (reflection's own included) to its descriptor, and calls through what it learned.
This is the client that used to fail with ``symbol 'grpc.reflection.v1.ServerReflection'
not found``.
"""

import os
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from grpc_requests import Client

from test_tritonclient import DEFAULT_BIN, REPO_ROOT, Gateway

COMMON = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


@pytest.fixture(scope="module")
def demo():
    binary = Path(os.environ.get("INFERGATE_BIN", DEFAULT_BIN))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.is_file():
        pytest.fail(f"infergate binary not found at {binary}", pytrace=False)
    gw = Gateway(binary)
    gw.start()
    try:
        probe = grpcclient.InferenceServerClient(url=gw.url)
        try:
            gw.wait_ready(probe)
        finally:
            probe.close()
        yield gw
    finally:
        gw.stop()
        gw.log.close()


@pytest.mark.parametrize(
    "port, own, methods",
    [
        ("grpc_port", "inference.GRPCInferenceService", {"ModelInfer", "ModelStreamInfer", "ModelMetadata"}),
        ("admin_port", "infergate.admin.v1.Admin", {"ListBackends", "DrainBackend", "WatchEvents"}),
    ],
)
def test_every_service_resolves(demo, port, own, methods):
    client = Client.get_by_endpoint(f"127.0.0.1:{getattr(demo, port)}")
    assert set(client.service_names) == COMMON | {own}
    for name in client.service_names:
        # Asks for the file that defines the service, and its dependencies.
        assert client.service(name).method_names, name
    assert methods <= set(client.service(own).method_names)
    assert set(client.service("grpc.health.v1.Health").method_names) == {"Check", "Watch"}
    assert client.request("grpc.health.v1.Health", "Check", {"service": ""}) == {"status": "SERVING"}


def test_calls_through_what_reflection_described(demo):
    client = Client.get_by_endpoint(demo.url)
    meta = client.request("inference.GRPCInferenceService", "ModelMetadata", {"name": "simple"})
    assert meta["name"] == "simple"
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]
    tensor = lambda name, values: {  # noqa: E731
        "name": name,
        "datatype": "INT32",
        "shape": [1, 16],
        "contents": {"int_contents": values},
    }
    answer = client.request(
        "inference.GRPCInferenceService",
        "ModelInfer",
        {
            "model_name": "simple",
            "id": "reflected",
            "inputs": [tensor("INPUT0", list(range(16))), tensor("INPUT1", [1] * 16)],
        },
    )
    assert answer["model_name"] == "simple" and answer["id"] == "reflected"
    assert [o["name"] for o in answer["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert len(answer["raw_output_contents"]) == 2
