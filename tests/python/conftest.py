"""Shared pytest set-up for tests/python: the markers.

``mlserver``: a real MLServer (PyPI ``mlserver`` + ``mlserver-sklearn``) behind the
gateway. Its dependencies are not in requirements.txt (they are large); run it with
``tests/python/run_mlserver.sh``, which installs them into ``.venv-mlserver/``. In the
default suite the module skips itself when ``mlserver`` is not installed.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mlserver: MLServer as a backend behind the gateway (tests/python/run_mlserver.sh)",
    )
