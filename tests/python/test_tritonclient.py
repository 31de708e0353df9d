"""Compatibility suite: the stock ``tritonclient.grpc`` client against ``infergate demo``.

A session fixture starts the real gateway binary (``$INFERGATE_BIN``, default
``target/debug/infergate`` under the repository root) with its three simulated backends
on free loopback ports, waits until ``is_server_ready()`` answers true (bounded by a
deadline), and stops it with SIGTERM (then SIGKILL) at the end. The process output is
printed when startup or any test fails.

Run with ``scripts/test.sh``, or directly:
``INFERGATE_BIN=target/debug/infergate .venv/bin/python -m pytest -q tests/python``.
"""

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "infergate"

# Every wait in this file is bounded by one of these.
READY_TIMEOUT_S = float(os.environ.get("INFERGATE_READY_TIMEOUT", "60"))
CALL_TIMEOUT_S = 20.0  # client_timeout of unary calls
STREAM_TIMEOUT_S = 30.0  # deadline of the whole ModelStreamInfer call
RESPONSE_TIMEOUT_S = 15.0  # wait for one streamed response
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL

MODELS = ("simple", "identity_fp32", "tiny_llm", "accumulate")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n):
    ports = set()
    while len(ports) < n:
        ports.add(_free_port())
    return sorted(ports)


class Gateway:
    """A running ``infergate demo`` process and where it listens."""

    def __init__(self, binary):
        self.binary = binary
        self.grpc_port, self.metrics_port, self.admin_port = _free_ports(3)
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.TemporaryFile(mode="w+b")
        self.proc = None

    def start(self):
        cmd = [
            str(self.binary),
            "demo",
            "--listen",
            f"127.0.0.1:{self.grpc_port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "NO_COLOR": "1"},
        )

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", errors="replace")

    def wait_ready(self, client):
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_error = None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                pytest.fail(
                    f"infergate demo exited with status {code} before becoming ready\n"
                    f"--- infergate output ---\n{self.output()}",
                    pytrace=False,
                )
            try:
                if client.is_server_ready(client_timeout=1.0):
                    return
            except InferenceServerException as e:  # not listening yet
                last_error = e
            time.sleep(0.05)
        pytest.fail(
            f"infergate demo not ready within {READY_TIMEOUT_S:.0f}s "
            f"(last error: {last_error})\n--- infergate output ---\n{self.output()}",
            pytrace=False,
        )

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)


def _print_uncaptured(config, text):
    """Writes ``text`` to the terminal even while pytest captures output."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(text)
            sys.stderr.flush()
    else:
        sys.stderr.write(text)


@pytest.fixture(scope="session")
def gateway(request):
    binary = Path(os.environ.get("INFERGATE_BIN", DEFAULT_BIN))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.is_file():
        pytest.fail(
            f"infergate binary not found at {binary}: build it with `cargo build -p infergate` "
            "or set INFERGATE_BIN",
            pytrace=False,
        )
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
        returncode_before_stop = gw.proc.poll()
        gw.stop()
        failed = request.session.testsfailed
        if failed or returncode_before_stop is not None:
            why = (
                f"{failed} test(s) failed"
                if failed
                else f"exited early with status {returncode_before_stop}"
            )
            _print_uncaptured(
                request.config,
                f"\n--- infergate demo output ({why}; exit status {gw.proc.returncode}) ---\n"
                f"{gw.output()}--- end of infergate output ---\n",
            )
        gw.log.close()


@pytest.fixture(scope="session")
def client(gateway):
    c = grpcclient.InferenceServerClient(url=gateway.url)
    yield c
    c.close()


def _simple_inputs(a, b):
    inputs = [
        grpcclient.InferInput("INPUT0", list(a.shape), "INT32"),
        grpcclient.InferInput("INPUT1", list(b.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def _llm_inputs(prompt, max_tokens):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return [text, tokens]


def _is_final(result):
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


# --- health and metadata ---------------------------------------------------------------


def test_server_live(client):
    assert client.is_server_live(client_timeout=CALL_TIMEOUT_S) is True


def test_server_ready(client):
    assert client.is_server_ready(client_timeout=CALL_TIMEOUT_S) is True


@pytest.mark.parametrize("model", MODELS)
def test_model_ready(client, model):
    assert client.is_model_ready(model, client_timeout=CALL_TIMEOUT_S) is True


def test_unknown_model_not_ready(client):
    assert client.is_model_ready("no_such_model", client_timeout=CALL_TIMEOUT_S) is False


def test_server_metadata(client):
    md = client.get_server_metadata(client_timeout=CALL_TIMEOUT_S)
    assert md.name == "infergate"
    assert md.version


def test_model_metadata_simple(client):
    md = client.get_model_metadata("simple", client_timeout=CALL_TIMEOUT_S)
    assert md.name == "simple"
    inputs = {t.name: t for t in md.inputs}
    assert set(inputs) == {"INPUT0", "INPUT1"}
    for t in inputs.values():
        assert t.datatype == "INT32"
        assert list(t.shape) == [-1, 16]
    outputs = {t.name: t for t in md.outputs}
    assert set(outputs) == {"OUTPUT0", "OUTPUT1"}
    for t in outputs.values():
        assert t.datatype == "INT32"
        assert list(t.shape) == [-1, 16]


def test_model_metadata_as_json(client):
    md = client.get_model_metadata("identity_fp32", as_json=True, client_timeout=CALL_TIMEOUT_S)
    assert md["name"] == "identity_fp32"
    assert [t["datatype"] for t in md["inputs"]] == ["FP32"]


def test_repository_index(client):
    index = client.get_model_repository_index(client_timeout=CALL_TIMEOUT_S)
    names = {m.name for m in index.models}
    assert set(MODELS) <= names


def test_model_config_tiny_llm_is_decoupled(client):
    cfg = client.get_model_config("tiny_llm", client_timeout=CALL_TIMEOUT_S).config
    assert cfg.name == "tiny_llm"
    assert cfg.model_transaction_policy.decoupled is True


def test_model_config_simple_is_not_decoupled(client):
    cfg = client.get_model_config("simple", client_timeout=CALL_TIMEOUT_S).config
    assert cfg.name == "simple"
    assert cfg.model_transaction_policy.decoupled is False
    assert {i.name for i in cfg.input} == {"INPUT0", "INPUT1"}


# --- unary inference -----------------------------------------------------------------


def test_simple_infer(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    result = client.infer("simple", _simple_inputs(a, b), client_timeout=CALL_TIMEOUT_S)
    out0 = result.as_numpy("OUTPUT0")
    out1 = result.as_numpy("OUTPUT1")
    assert out0.dtype == np.int32 and out0.shape == (1, 16)
    assert out1.dtype == np.int32 and out1.shape == (1, 16)
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
    assert result.get_response().model_name == "simple"


def test_simple_infer_request_id_and_requested_outputs(client):
    rng = np.random.default_rng(7)
    a = rng.integers(-1000, 1000, size=(1, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(1, 16), dtype=np.int32)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer(
        "simple",
        _simple_inputs(a, b),
        outputs=outputs,
        request_id="compat-42",
        client_timeout=CALL_TIMEOUT_S,
    )
    assert result.get_response().id == "compat-42"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_simple_async_infer(client):
    a = np.full((1, 16), 5, dtype=np.int32)
    b = np.arange(16, dtype=np.int32).reshape(1, 16)
    done = queue.Queue()
    client.async_infer(
        "simple",
        _simple_inputs(a, b),
        callback=lambda result, error: done.put((result, error)),
        request_id="async-1",
        client_timeout=CALL_TIMEOUT_S,
    )
    result, error = done.get(timeout=CALL_TIMEOUT_S + 5)
    assert error is None, error
    assert result.get_response().id == "async-1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_identity_fp32_round_trip(client):
    data = np.random.default_rng(1234).standard_normal(1000).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    result = client.infer("identity_fp32", [inp], client_timeout=CALL_TIMEOUT_S)
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.float32
    assert out.shape == data.shape
    np.testing.assert_array_equal(out, data)


def _accumulate(client, value, **sequence):
    inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    result = client.infer("accumulate", [inp], client_timeout=CALL_TIMEOUT_S, **sequence)
    return int(result.as_numpy("OUTPUT")[0][0])


def test_model_config_accumulate_has_a_sequence_batcher(client):
    cfg = client.get_model_config("accumulate", client_timeout=CALL_TIMEOUT_S).config
    assert cfg.sequence_batching.max_sequence_idle_microseconds == 1_000_000


def test_accumulate_sequences_interleaved(client):
    # Two sequences, one with an integer id and one with a string id, interleaved:
    # the gateway pins each to one backend, so every running sum is right.
    assert _accumulate(client, 1, sequence_id=4242, sequence_start=True) == 1
    assert _accumulate(client, 10, sequence_id="py-seq", sequence_start=True) == 10
    for i in range(2, 6):
        assert _accumulate(client, i, sequence_id=4242) == sum(range(1, i + 1))
        assert _accumulate(client, i, sequence_id="py-seq") == 10 + sum(range(2, i + 1))
    assert _accumulate(client, 100, sequence_id=4242, sequence_end=True) == 115
    # Ended: the next request without sequence_start is refused, naming the sequence.
    with pytest.raises(InferenceServerException) as info:
        _accumulate(client, 1, sequence_id=4242)
    assert "4242" in info.value.message()


def test_unknown_model_infer_is_not_found(client):
    a = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", _simple_inputs(a, a), client_timeout=CALL_TIMEOUT_S)
    e = info.value
    assert "no_such_model" in e.message()
    assert "NOT_FOUND" in str(e.status())


# --- streaming (decoupled) -------------------------------------------------------------


def _collect_stream(client, requests, enable_empty_final_response):
    """Sends ``requests`` [(request_id, prompt, max_tokens)] on one stream; returns
    {request_id: [InferResult, ...]} collected until each request's final response."""
    responses = queue.Queue()

    def callback(q, result, error):
        q.put((result, error))

    client.start_stream(callback=partial(callback, responses), stream_timeout=STREAM_TIMEOUT_S)
    try:
        for request_id, prompt, max_tokens in requests:
            client.async_stream_infer(
                model_name="tiny_llm",
                inputs=_llm_inputs(prompt, max_tokens),
                request_id=request_id,
                enable_empty_final_response=enable_empty_final_response,
            )
        got = {request_id: [] for request_id, _, _ in requests}
        pending = set(got)
        while pending:
            try:
                result, error = responses.get(timeout=RESPONSE_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(
                    f"no streamed response within {RESPONSE_TIMEOUT_S}s; "
                    f"so far: { {k: len(v) for k, v in got.items()} }"
                )
            assert error is None, f"stream error: {error}"
            request_id = result.get_response().id
            assert request_id in got, f"response for unexpected id {request_id!r}"
            assert request_id in pending, f"response for {request_id!r} after its final one"
            got[request_id].append(result)
            if _is_final(result):
                pending.discard(request_id)
    finally:
        # Closes the request side and waits for the server to end the call (bounded by
        # stream_timeout).
        client.stop_stream()
    # Everything that arrived before the call ended is in the queue now.
    leftovers = []
    while not responses.empty():
        leftovers.append(responses.get_nowait())
    assert not leftovers, f"responses after the final ones: {leftovers}"
    return got


def _tokens(results):
    texts = []
    for r in results:
        out = r.as_numpy("text_output")
        if out is None:
            continue
        assert out.shape == (1,)
        texts.append(out[0])
    return texts


def test_tiny_llm_stream(client):
    max_tokens = 5
    got = _collect_stream(client, [("llm-1", b"hello infergate", max_tokens)], False)
    results = got["llm-1"]
    assert len(results) == max_tokens
    tokens = _tokens(results)
    assert len(tokens) == max_tokens
    assert all(isinstance(t, bytes) and t for t in tokens)
    assert [_is_final(r) for r in results] == [False] * (max_tokens - 1) + [True]
    for r in results:
        assert r.get_response().model_name == "tiny_llm"


def test_tiny_llm_stream_with_empty_final_response_enabled(client):
    # With the flag on, a server may end with an extra empty response carrying
    # triton_final_response; either way exactly max_tokens tokens arrive and the last
    # response is the final one.
    max_tokens = 3
    got = _collect_stream(client, [("llm-2", b"prompt", max_tokens)], True)
    results = got["llm-2"]
    assert len(_tokens(results)) == max_tokens
    assert max_tokens <= len(results) <= max_tokens + 1
    assert _is_final(results[-1])
    assert not any(_is_final(r) for r in results[:-1])


def test_tiny_llm_two_requests_on_one_stream(client):
    got = _collect_stream(client, [("a", b"first", 2), ("b", b"second", 4)], False)
    assert len(_tokens(got["a"])) == 2
    assert len(_tokens(got["b"])) == 4
    assert _is_final(got["a"][-1]) and _is_final(got["b"][-1])
