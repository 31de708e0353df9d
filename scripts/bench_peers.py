#!/usr/bin/env python3
"""Helper for scripts/bench-peers.sh (Python standard library only).

  bench_peers.py body simple OUT                 pre-encoded gRPC ModelInfer body (the
  bench_peers.py body identity_fp32 OUT BYTES    same bytes as client/examples/grpc_body.rs)
  bench_peers.py check MODEL BODY RESPONSE       decode a gRPC ModelInferResponse and check
                                                 the values answer BODY correctly
  bench_peers.py check-trailers NGHTTP_LOG       `nghttp -nv` output: :status 200, grpc-status 0
  bench_peers.py check-cli-json JSON             `infergate-cli infer --model simple --json`
  bench_peers.py latency H2LOAD_LOG              "mean_ms p50_ms p99_ms" from h2load --log-file
  bench_peers.py sim-count METRICS MODEL         "success failure" from the simulator's /metrics
  bench_peers.py table RESULTS_TSV               the Markdown table
"""
import json
import re
import struct
import sys


# --- protobuf, just enough for ModelInferRequest / ModelInferResponse -------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(tag, data):
    return varint(tag << 3 | 2) + varint(len(data)) + data


def packed_int64(values):
    return b"".join(varint(v & 0xFFFFFFFFFFFFFFFF) for v in values)


def input_tensor(name, datatype, shape):
    # InferInputTensor: name=1, datatype=2, shape=3 (packed int64)
    return (field_bytes(1, name.encode()) + field_bytes(2, datatype.encode())
            + field_bytes(3, packed_int64(shape)))


def simple_inputs():
    return (struct.pack("<16i", *range(16)), struct.pack("<16i", *([1] * 16)))


def identity_input(payload):
    n = payload // 4
    return struct.pack("<%df" % n, *(float(i) for i in range(n)))


def request(model, payload):
    # ModelInferRequest: model_name=1, inputs=5, raw_input_contents=7
    if model == "simple":
        a, b = simple_inputs()
        msg = (field_bytes(1, b"simple")
               + field_bytes(5, input_tensor("INPUT0", "INT32", [1, 16]))
               + field_bytes(5, input_tensor("INPUT1", "INT32", [1, 16]))
               + field_bytes(7, a) + field_bytes(7, b))
    elif model == "identity_fp32":
        raw = identity_input(payload)
        msg = (field_bytes(1, b"identity_fp32")
               + field_bytes(5, input_tensor("INPUT0", "FP32", [1, len(raw) // 4]))
               + field_bytes(7, raw))
    else:
        sys.exit("unknown model %r: simple or identity_fp32" % model)
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def fields(buf):
    """Yields (tag, wire_type, value) of one message; value is bytes for wire type 2."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        tag, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            ln, i = read_varint(buf, i)
            v = bytes(buf[i:i + ln])
            i += ln
        elif wt == 1:
            v = buf[i:i + 8]
            i += 8
        elif wt == 5:
            v = buf[i:i + 4]
            i += 4
        else:
            raise ValueError("wire type %d" % wt)
        yield tag, wt, v


def grpc_message(data, what):
    if len(data) < 5:
        raise ValueError("%s: %d bytes, not a gRPC message" % (what, len(data)))
    flag, ln = data[0], struct.unpack(">I", data[1:5])[0]
    if flag != 0:
        raise ValueError("%s: compressed flag %d" % (what, flag))
    if len(data) != 5 + ln:
        raise ValueError("%s: %d bytes, gRPC length prefix says %d" % (what, len(data), 5 + ln))
    return data[5:]


def check(model, body_path, resp_path):
    with open(body_path, "rb") as f:
        req = grpc_message(f.read(), "request")
    with open(resp_path, "rb") as f:
        resp = grpc_message(f.read(), "response")
    names, raws, got_model = [], [], None
    for tag, _, v in fields(resp):
        if tag == 1:
            got_model = v.decode()
        elif tag == 5:
            names.append(next(x for t, _, x in fields(v) if t == 1).decode())
        elif tag == 6:
            raws.append(v)
    if got_model != model:
        raise ValueError("response model_name %r, expected %r" % (got_model, model))
    if model == "simple":
        a, b = (struct.unpack("<16i", r) for r in simple_inputs())
        want = {"OUTPUT0": [x + y for x, y in zip(a, b)],
                "OUTPUT1": [x - y for x, y in zip(a, b)]}
        got = {n: list(struct.unpack("<16i", r)) for n, r in zip(names, raws)}
        if got != want:
            raise ValueError("simple answered %r, expected %r" % (got, want))
        return "OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1"
    raw_in = [v for t, _, v in fields(req) if t == 7][0]
    if names != ["OUTPUT0"] or raws != [raw_in]:
        raise ValueError("identity_fp32: outputs %r, %s bytes, not the %d bytes sent"
                         % (names, [len(r) for r in raws], len(raw_in)))
    return "OUTPUT0 == INPUT0 (%d bytes)" % len(raw_in)


def check_trailers(log_path):
    text = open(log_path, errors="replace").read()
    status = re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", text)
    grpc = re.findall(r"recv \(stream_id=\d+\) grpc-status: (\d+)", text)
    if status != ["200"] or grpc != ["0"]:
        msg = re.findall(r"recv \(stream_id=\d+\) grpc-message: (.*)", text)
        raise ValueError(":status %s, grpc-status %s %s" % (status, grpc, msg))
    return ":status 200, trailer grpc-status 0"


def check_cli_json(path):
    r = json.load(open(path))
    out = {o["name"]: o["data"] for o in r["outputs"]}
    want = {"OUTPUT0": list(range(1, 17)), "OUTPUT1": list(range(-1, 15))}
    if out != want:
        raise ValueError("infergate-cli got %r" % out)
    return "infergate-cli: OUTPUT0 = 1..16, OUTPUT1 = -1..14"


def latency(path):
    us = []
    for line in open(path):
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            us.append(int(parts[2]))
    if not us:
        return "- - -"
    us.sort()
    pct = lambda p: us[min(len(us) - 1, int(round(p * (len(us) - 1))))]
    return "%.3f %.3f %.3f" % (sum(us) / len(us) / 1000, pct(0.50) / 1000, pct(0.99) / 1000)


def sim_count(path, model):
    ok = fail = 0
    for line in open(path):
        m = re.match(r'nv_inference_request_(success|failure)\{([^}]*)\} (\d+)', line)
        if m and 'model="%s"' % model in m.group(2):
            if m.group(1) == "success":
                ok += int(m.group(3))
            else:
                fail += int(m.group(3))
    return "%d %d" % (ok, fail)


def table(path):
    rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
    # proxy workload rps mean p50 p99 cpu_us hwm_kb status
    res = {(r[0], r[1]): r for r in rows}

    def num(r, i):
        try:
            return float(r[i])
        except (ValueError, IndexError):
            return None

    def ratio(a, b):
        return "%.2f×" % (a / b) if a is not None and b else "—"

    print("| proxy | workload | req/s | mean ms | p99 ms | added latency | CPU/call µs "
          "| peak RSS MB | infergate ÷ this, req/s | infergate ÷ this, CPU/call |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        proxy, wl = r[0], r[1]
        if r[-1] != "ok":
            print("| %s | %s | **FAILED: %s** | | | | | | | |" % (proxy, wl, r[-1]))
            continue
        rps, mean, p99, cpu, hwm = num(r, 2), num(r, 3), num(r, 5), num(r, 6), num(r, 7)
        d = res.get(("direct", wl))
        dmean = num(d, 3) if d and d[-1] == "ok" else None
        added = ("+%.0f µs" % ((mean - dmean) * 1000)
                 if proxy != "direct" and dmean and "c1m1" in wl else "—")
        g = res.get(("infergate", wl))
        g_ok = g is not None and g[-1] == "ok" and proxy not in ("infergate", "direct")
        print("| %s | %s | %s | %.3f | %.3f | %s | %s | %s | %s | %s |" % (
            proxy, wl, "{:,.0f}".format(rps), mean, p99, added,
            "%.1f" % cpu if cpu is not None else "—",
            "%.0f" % (hwm / 1024) if hwm is not None else "—",
            ratio(num(g, 2), rps) if g_ok else "—",
            ratio(num(g, 6), cpu) if g_ok else "—"))


def main():
    a = sys.argv[1:]
    try:
        if a[:1] == ["body"]:
            data = request(a[1], int(a[3]) if len(a) > 3 else 1 << 20)
            open(a[2], "wb").write(data)
            print("%s: %d bytes" % (a[2], len(data)))
        elif a[:1] == ["check"]:
            print(check(a[1], a[2], a[3]))
        elif a[:1] == ["check-trailers"]:
            print(check_trailers(a[1]))
        elif a[:1] == ["check-cli-json"]:
            print(check_cli_json(a[1]))
        elif a[:1] == ["latency"]:
            print(latency(a[1]))
        elif a[:1] == ["sim-count"]:
            print(sim_count(a[1], a[2]))
        elif a[:1] == ["table"]:
            table(a[1])
        else:
            sys.exit(__doc__)
    except (ValueError, KeyError, IndexError, StopIteration, OSError, struct.error) as e:
        print("WRONG ANSWER: %s" % e, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
