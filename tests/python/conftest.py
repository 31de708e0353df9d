"""Shared pytest set-up for tests/python: the markers, and the gateway fixtures of the
suites with a real backend.

``mlserver`` and ``kserve``: a real model server behind the gateway (MLServer with
``mlserver-sklearn``; KServe's Python model server). Their dependencies are not in
requirements.txt (they are large); run them with ``tests/python/run_backend.sh NAME``,
which installs requirements-NAME.txt into ``.venv-NAME/``. In the default suite each
module skips itself when its server's package is not installed. Helpers they share are
in backends.py; the fixtures below put the gateway in front of the module's ``backend``
fixture (a Process from ``backends.serving``).
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mlserver: MLServer as a backend behind the gateway (tests/python/run_backend.sh mlserver)",
    )
    config.addinivalue_line(
        "markers",
        "kserve: KServe's Python model server as a backend behind the gateway"
        " (tests/python/run_backend.sh kserve)",
    )


@pytest.fixture(scope="module")
def gateway(backend, tmp_path_factory):
    from backends import gateway_in_front_of

    with gateway_in_front_of(backend, tmp_path_factory.mktemp("gateway")) as proc:
        yield proc


@pytest.fixture(scope="module")
def via_gateway(gateway):
    """A stock tritonclient.grpc client of the gateway."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(gateway.addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(backend):
    """A stock tritonclient.grpc client of the backend itself, bypassing the gateway."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(backend.addr)
    yield c
    c.close()
