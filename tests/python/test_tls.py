"""Stock ``tritonclient.grpc`` over TLS (ssl=True, root certificates), unary and
streaming, and a plaintext client not served, against two real set-ups:

- ``serve``: ``infergate serve --tls-cert/--tls-key`` in front of a plaintext
  ``infergate sim``, with a certificate the ``openssl`` command line makes;
- ``demo``: ``infergate demo --tls``, TLS on every hop (the gateway dials its simulated
  backends over TLS too), with the CA it makes and writes on the spot.

Run with the rest: ``bash scripts/test.sh``.
"""

import os
import queue
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("INFERGATE_BIN", str(REPO_ROOT / "target" / "debug" / "infergate"))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _serve_setup(tmp):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    sim_port, port, admin, metrics = _free_ports(4)
    procs = [subprocess.Popen([BIN, "sim", "--listen", f"127.0.0.1:{sim_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(
        [BIN, "serve", "--backend", f"127.0.0.1:{sim_port}",
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--metrics-listen", f"127.0.0.1:{metrics}",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs, port, cert


def _demo_setup(tmp):
    port, admin, metrics = _free_ports(3)
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen(
        [BIN, "demo", "--tls", "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{admin}", "--metrics-listen", f"127.0.0.1:{metrics}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # The demo writes its CA to TMPDIR/infergate-demo-tls-PID/ca.pem before it serves.
    ca = tmp / f"infergate-demo-tls-{proc.pid}" / "ca.pem"
    deadline = time.monotonic() + 30
    while not ca.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"infergate demo --tls wrote no CA at {ca}")
        time.sleep(0.05)
    return [proc], port, ca


@pytest.fixture(scope="module", params=["serve", "demo"])
def tls_gateway(request):
    tmp = Path(tempfile.mkdtemp(prefix="infergate-tls-"))
    procs, port, root = (_serve_setup if request.param == "serve" else _demo_setup)(tmp)
    client = grpcclient.InferenceServerClient(
        f"localhost:{port}", ssl=True, root_certificates=str(root))
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.is_server_ready():
                break
        except Exception:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail("the TLS gateway did not become ready within 30 s")
        time.sleep(0.1)
    yield client, port
    client.close()
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=15)
    shutil.rmtree(tmp, ignore_errors=True)


def _inputs():
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a + b


def test_unary_over_tls(tls_gateway):
    client, _ = tls_gateway
    inputs, want = _inputs()
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), want)


def test_stream_over_tls(tls_gateway):
    client, _ = tls_gateway
    inputs, want = _inputs()
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for _ in range(3):
            client.async_stream_infer("simple", inputs)
        for _ in range(3):
            result, error = answers.get(timeout=10)
            assert error is None, error
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), want)
    finally:
        client.stop_stream()


def test_plaintext_client_is_not_served(tls_gateway):
    _, port = tls_gateway
    plain = grpcclient.InferenceServerClient(f"localhost:{port}")
    with pytest.raises(Exception):
        plain.is_server_live(client_timeout=3)
    plain.close()
