#!/usr/bin/env python3
"""infergate chaos suite (issue 13): faults on one of three backends under open-loop load.

Everything runs as real processes on 127.0.0.1: three `infergate sim` backends (8 slots,
20 ms), one `infergate serve` with the default configuration in front of them, and
`infergate-cli bench --rate 300 --poisson --timeout-ms 2000 --timeline FILE` as the caller.
For each fault the run is ~20 s: 5 s of warm load, then the fault on backend A.

    scripts/chaos.sh                   # every fault (about 4 minutes)
    scripts/chaos.sh hang stall        # a subset
    scripts/chaos.sh soak [MINUTES]    # steady load; gateway RSS and open fds (not for CI)

Standard library only. Every wait is bounded, every run has a hard timeout, and every
child process (and any iptables rule) is removed on exit, however the script ends.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GW_BIN = os.path.join(ROOT, "target", "release", "infergate")
CLI_BIN = os.path.join(ROOT, "target", "release", "infergate-cli")

RATE = 300
TIMEOUT_MS = 2000
FAULT_AT_S = 5.0
RUN_S = 20.0
WINDOW_MS = 1500.0  # the detection window: harm after it misses the target
SIM_SLOTS = 8
SIM_LATENCY_MS = 20
POLL_S = 0.05
FLAP_S = 10.0  # flapping lasts this long, in a run of FLAP_RUN_S
FLAP_RUN_S = 30.0
SIMS = ("sim-a", "sim-b", "sim-c")  # the fault always goes to sim-a

FAULTS = ["kill", "hang", "stall", "latency", "errors", "flap", "partition", "sigterm", "reload"]
EXTRA_FAULTS = ["errors-unavailable"]
DESCRIPTION = {
    "kill": "kill -9 backend",
    "hang": "SIGSTOP (rest of run)",
    "stall": "SIGSTOP 3 s, SIGCONT",
    "latency": "latency x10 (+180 ms)",
    "errors": "30% errors (INTERNAL)",
    "errors-unavailable": "30% errors (UNAVAILABLE)",
    "flap": "SIGSTOP/SIGCONT every 1 s for 10 s",
    "partition": "partition (iptables DROP, lo)",
    "sigterm": "SIGTERM gateway",
    "reload": "SIGHUP reload x4",
}
# Targets: (eject within WINDOW_MS, no harm after WINDOW_MS, readmitted, no failed call at all)
TARGETS = {
    "hang": dict(eject=True, late=True),
    "stall": dict(eject=True, late=True, readmit=True),
    "partition": dict(eject=True, late=True),
    "kill": dict(no_fail=True),
    "reload": dict(no_fail=True),
    "sigterm": dict(no_inflight_fail=True),
}


# ---------------------------------------------------------------------------------------
# Processes and cleanup


class Reaper:
    """Every child process and iptables rule, removed on exit (normal, error or signal)."""

    def __init__(self):
        self.procs = []
        self.rules = []
        self.lock = threading.Lock()

    def spawn(self, argv, log_path, **kw):
        log = open(log_path, "wb")
        p = subprocess.Popen(argv, stdout=kw.pop("stdout", log), stderr=kw.pop("stderr", log),
                             stdin=subprocess.DEVNULL, **kw)
        log.close()
        with self.lock:
            self.procs.append(p)
        return p

    def kill(self, p, grace_s=0.0):
        if p.poll() is not None:
            return
        try:
            os.kill(p.pid, signal.SIGCONT)  # a stopped process is killed all the same
            if grace_s > 0:
                p.terminate()
                try:
                    p.wait(timeout=grace_s)
                    return
                except subprocess.TimeoutExpired:
                    pass
            p.kill()
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill_all(self):
        with self.lock:
            procs, self.procs = self.procs, []
        for p in reversed(procs):
            self.kill(p)

    def add_rule(self, chain, args):
        rule = [chain] + args
        r = subprocess.run(["iptables", "-w", "2", "-I"] + rule, capture_output=True,
                           text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"iptables -I {' '.join(rule)}: {r.stderr.strip()}")
        self.rules.append(rule)

    def remove_rules(self):
        while self.rules:
            rule = self.rules.pop()
            try:
                subprocess.run(["iptables", "-w", "2", "-D"] + rule, capture_output=True,
                               timeout=10)
            except Exception as e:  # keep removing the others
                print(f"warning: could not remove iptables rule {rule}: {e}", file=sys.stderr)

    def cleanup(self):
        self.remove_rules()
        self.kill_all()


REAPER = Reaper()


def on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url, timeout=0.5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def wait_for(what, check, timeout_s, interval_s=0.05):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval_s)
    raise RuntimeError(f"{what} not ready within {timeout_s} s ({last})")


# ---------------------------------------------------------------------------------------
# The gateway's view of its backends


LINE = re.compile(r'^(infergate_backend_[a-z_]+)\{([^}]*)\}\s+(\S+)')
LABEL = re.compile(r'(\w+)="([^"]*)"')


def pool_state(metrics_url):
    """{backend: {"ready", "ejected", "draining", "circuit", "model_circuit"}} from /metrics."""
    state = {}
    for line in http_get(metrics_url).splitlines():
        m = LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(LABEL.findall(m.group(2))), float(m.group(3))
        b = labels.get("backend")
        if b is None:
            continue
        s = state.setdefault(b, {})
        if name == "infergate_backend_ready":
            s["ready"] = value
        elif name == "infergate_backend_ejected":
            s["ejected"] = value
        elif name == "infergate_backend_draining":
            s["draining"] = value
        elif name == "infergate_backend_circuit_state":
            s["circuit"] = value
        elif name == "infergate_backend_model_circuit_state" and labels.get("model") == "simple":
            s["model_circuit"] = value
    return state


def out_reasons(s):
    """Why a backend is out of rotation ('' = in rotation)."""
    if s is None or "ejected" not in s:
        # Not in the pool: infergate_backend_ready (a global gauge) keeps its last value
        # for a removed backend; the families rendered from the pool do not list it.
        return "gone"
    r = []
    if s.get("ready", 1) < 1:
        r.append("not-ready")
    if s.get("ejected", 0) >= 1:
        r.append("ejected")
    if s.get("draining", 0) >= 1:
        r.append("draining")
    if s.get("circuit", 0) >= 2:
        r.append("circuit-open")
    if s.get("model_circuit", 0) >= 2:
        r.append("model-circuit-open")
    return "+".join(r)


class Poller(threading.Thread):
    """Polls /metrics every 50 ms; keeps (monotonic time, {backend: reasons})."""

    def __init__(self, metrics_url, stop_at):
        super().__init__(daemon=True)
        self.url, self.stop_at = metrics_url, stop_at
        self.samples, self.errors = [], 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and time.monotonic() < self.stop_at:
            t = time.monotonic()
            try:
                st = pool_state(self.url)
                self.samples.append((t, {b: out_reasons(s) for b, s in st.items()}))
            except Exception:
                self.errors += 1
            self.stop.wait(max(0.0, POLL_S - (time.monotonic() - t)))

    def transitions(self, backend):
        """[(t, reasons)] each time the backend's reasons change."""
        out, last = [], None
        for t, st in self.samples:
            r = st.get(backend, "gone")
            if r != last:
                out.append((t, r))
                last = r
        return out


# ---------------------------------------------------------------------------------------
# One run: three sims, a gateway, the load, a fault


class Stack:
    def __init__(self, workdir, tag, config_text=None):
        self.workdir, self.tag = workdir, tag
        ports = free_ports(9)
        self.sim_ports = ports[0:3]
        self.sim_http = ports[3:6]
        self.gw, self.metrics, self.admin = ports[6:9]
        self.sims = {}
        self.gateway = None
        self.config_path = None
        self.config_text = config_text

    def backend(self, i):
        return f"127.0.0.1:{self.sim_ports[i]}"

    def start(self):
        for i, name in enumerate(SIMS):
            self.start_sim(i)
        for i, name in enumerate(SIMS):
            url = f"http://127.0.0.1:{self.sim_http[i]}/control"
            wait_for(f"{name} control port", lambda: http_get(url), 10)
        argv = [GW_BIN, "serve", "--listen", f"127.0.0.1:{self.gw}",
                "--metrics-listen", f"127.0.0.1:{self.metrics}",
                "--admin-listen", f"127.0.0.1:{self.admin}"]
        if self.config_text is not None:
            self.config_path = os.path.join(self.workdir, f"{self.tag}-gateway.toml")
            self.write_config(self.config_text)
            argv += ["--config", self.config_path]
        else:
            for i in range(3):
                argv += ["--backend", self.backend(i)]
        self.gateway_argv = argv
        self.gateway_log = os.path.join(self.workdir, f"{self.tag}-gateway.log")
        self.gateway = REAPER.spawn(argv, self.gateway_log)

        def all_ready():
            if self.gateway.poll() is not None:
                raise SystemExit(f"gateway exited ({self.gateway.returncode}); see {self.gateway_log}")
            st = pool_state(self.metrics_url)
            return all(out_reasons(st.get(self.backend(i))) == "" for i in range(3))
        wait_for("gateway with 3 ready backends", all_ready, 20)

    def start_sim(self, i):
        argv = [GW_BIN, "sim", "--listen", self.backend(i),
                "--metrics-listen", f"127.0.0.1:{self.sim_http[i]}", "--name", SIMS[i],
                "--slots", str(SIM_SLOTS), "--latency-ms", str(SIM_LATENCY_MS),
                "--seed", str(i + 1)]
        log = os.path.join(self.workdir, f"{self.tag}-{SIMS[i]}.log")
        self.sims[i] = REAPER.spawn(argv, log)

    def write_config(self, text):
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.metrics}/metrics"

    def control(self, i, query):
        return http_get(f"http://127.0.0.1:{self.sim_http[i]}/control?{query}", timeout=1.0)

    def stop(self):
        procs = list(self.sims.values()) + ([self.gateway] if self.gateway else [])
        for p in procs:
            REAPER.kill(p, grace_s=0.0)


class Load:
    """`infergate-cli bench` in its own process; learns when its clock started."""

    def __init__(self, stack, duration_s, timeline_path, tag, seed=7):
        self.argv = [CLI_BIN, "--addr", f"127.0.0.1:{stack.gw}", "bench", "--model", "simple",
                     "--rate", str(RATE), "--poisson", "--duration", str(duration_s),
                     "--timeout-ms", str(TIMEOUT_MS), "--seed", str(seed)]
        if timeline_path:
            self.argv += ["--timeline", timeline_path]
        self.summary_path = os.path.join(stack.workdir, f"{tag}-bench.txt")
        self.spawned = time.monotonic()
        self.proc = REAPER.spawn(self.argv, self.summary_path, stderr=subprocess.PIPE)
        self.start_estimates = []
        self.progress = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        pat = re.compile(r"^\[\s*([0-9.]+)s\]")
        for raw in self.proc.stderr:
            t = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip()
            m = pat.match(line)
            if m:
                # Ticks fire at start + k s exactly; the line can only arrive later.
                self.start_estimates.append(t - float(m.group(1)))
                self.progress.append(line)

    def start_time(self, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while not self.start_estimates and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        if self.start_estimates:
            return min(self.start_estimates)
        return self.spawned

    def wait(self, timeout_s):
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            REAPER.kill(self.proc)
            return None


def sleep_until(t):
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def read_timeline(path):
    calls = []
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                p = line.split()
                if len(p) >= 3:
                    calls.append((float(p[0]), float(p[1]), p[2], p[3] if len(p) > 3 else "-"))
    except FileNotFoundError:
        pass
    return calls


# ---------------------------------------------------------------------------------------
# Faults


def base_config(stack, backends=(0, 1, 2), weights=None):
    lines = ["# chaos.py: the default configuration, its backends in a file so that SIGHUP",
             "# reloads it (watch_config off: only the signal reloads).",
             "[admin]", "watch_config = false", ""]
    for i in backends:
        lines += ["[[backends]]", f'address = "{stack.backend(i)}"']
        if weights and i in weights:
            lines.append(f"weight = {weights[i]}")
        lines.append("")
    return "\n".join(lines)


def run_fault(fault, workdir):
    """Runs one fault; returns a result dict for the table."""
    res = dict(fault=fault, desc=DESCRIPTION[fault], notes=[], skipped=None)
    if fault == "partition" and shutil.which("iptables") is None:
        res["skipped"] = "iptables is not installed on this machine; row skipped"
        return res
    reload = fault == "reload"
    stack = Stack(workdir, fault, config_text="" if reload else None)
    if reload:
        # The ports are known only now; the file names the three backends.
        stack.config_text = base_config(stack)
    # SIGTERM ends the gateway, so 5 s after it tell nothing more; flapping gets 10 s
    # of flips and then time to see the backend come back.
    run_s = {"sigterm": 10.0, "flap": FLAP_RUN_S}.get(fault, RUN_S)
    hard_stop = time.monotonic() + run_s + 40  # start-up, the run, draining, teardown
    try:
        stack.start()
        timeline = os.path.join(workdir, f"{fault}-timeline.txt")
        poller = Poller(stack.metrics_url, hard_stop)
        poller.start()
        load = Load(stack, run_s, timeline, fault)
        t0 = load.start_time()
        t_fault = t0 + FAULT_AT_S
        sleep_until(t_fault)
        lift, extra = apply_fault(fault, stack, t0, run_s, res)
        code = load.wait(timeout_s=max(1.0, t0 + run_s + TIMEOUT_MS / 1000 + 8 - time.monotonic()))
        if code is None:
            res["notes"].append("bench did not finish in time and was killed")
        time.sleep(0.1)
        poller.stop.set()
        poller.join(timeout=2)
        res.update(analyse(fault, stack, poller, read_timeline(timeline), t0,
                           extra.get("t_fault", t_fault), lift, extra))
        res["bench_cmd"] = " ".join(os.path.relpath(a, ROOT) if a in (CLI_BIN, timeline) else a
                                    for a in load.argv)
    except Exception as e:  # one broken run must not hide the others
        res["skipped"] = f"run failed: {e}"
    finally:
        REAPER.remove_rules()
        stack.stop()
    return res


def apply_fault(fault, stack, t0, run_s, res):
    """Applies the fault now; returns (time the fault was lifted or None, extra facts)."""
    sim = stack.sims[0]
    extra = {}
    now = time.monotonic()
    if fault == "kill":
        os.kill(sim.pid, signal.SIGKILL)
    elif fault == "hang":
        os.kill(sim.pid, signal.SIGSTOP)
    elif fault == "stall":
        os.kill(sim.pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(sim.pid, signal.SIGCONT)
        return time.monotonic(), extra
    elif fault == "latency":
        stack.control(0, "extra_latency_ms=180")
    elif fault == "errors":
        stack.control(0, "error_rate=0.3&error_code=INTERNAL")
    elif fault == "errors-unavailable":
        stack.control(0, "error_rate=0.3&error_code=UNAVAILABLE")
    elif fault == "flap":
        end = now + FLAP_S
        stopped, flips = False, 0
        while time.monotonic() < end and flips < 100:
            os.kill(sim.pid, signal.SIGCONT if stopped else signal.SIGSTOP)
            stopped = not stopped
            flips += 1
            time.sleep(1.0)
        if stopped:
            os.kill(sim.pid, signal.SIGCONT)
        res["notes"].append(f"{flips} flips, 1 s apart; continued for good at "
                            f"+{time.monotonic() - now:.1f} s")
        return time.monotonic(), extra
    elif fault == "partition":
        for port in (stack.sim_ports[0], stack.sim_http[0]):
            REAPER.add_rule("INPUT", ["-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"])
            REAPER.add_rule("OUTPUT", ["-o", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"])
    elif fault == "sigterm":
        extra.update(sigterm(stack, now))
    elif fault == "reload":
        extra.update(reloads(stack, t0))
    return None, extra


def sigterm(stack, t_term):
    """SIGTERM to the gateway; probes its health until it is gone; waits for its exit."""
    gw = stack.gateway
    before = health(stack)
    os.kill(gw.pid, signal.SIGTERM)
    seen = []
    deadline = t_term + 3.0
    while time.monotonic() < deadline and len(seen) < 60:
        t = time.monotonic() - t_term
        seen.append((t, health(stack)))
        if gw.poll() is not None:
            break
        time.sleep(0.03)
    try:
        gw.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    exited = gw.poll()
    t_exit = time.monotonic() - t_term
    return dict(t_fault=t_term, health_before=before, health_after=seen,
                exit_code=exited, t_exit=t_exit)


def health(stack):
    """`infergate-cli health --json` against the gateway: its grpc.health answer, or why not."""
    try:
        r = subprocess.run([CLI_BIN, "--addr", f"127.0.0.1:{stack.gw}", "health", "--json"],
                           capture_output=True, text=True, timeout=2)
    except subprocess.TimeoutExpired:
        return "timeout"
    m = re.search(r'"health"\s*:\s*"([A-Z_]+)"', r.stdout)
    if m:
        return m.group(1)
    err = r.stderr.strip()
    if "refused" in err.lower():
        return "connection refused"
    return (err.splitlines() or ["no answer"])[0][:80]


def reloads(stack, t0):
    """SIGHUP four times under load: unchanged, a weight, a backend removed, re-added."""
    steps = [
        (5.0, "unchanged file", base_config(stack)),
        (8.0, "sim-b weight 2", base_config(stack, weights={1: 2})),
        (11.0, "sim-c removed (drained)", base_config(stack, backends=(0, 1), weights={1: 2})),
        (15.0, "sim-c re-added, weight 1", base_config(stack)),
    ]
    done = []
    for at, what, text in steps:
        sleep_until(t0 + at)
        stack.write_config(text)
        os.kill(stack.gateway.pid, signal.SIGHUP)
        done.append((at, what))
    return dict(t_fault=t0 + 5.0, reload_steps=done)


# ---------------------------------------------------------------------------------------
# Analysis


def fmt_s(x):
    return "—" if x is None else f"{x:.2f} s"


def analyse(fault, stack, poller, calls, t0, t_fault, lift, extra):
    fault_ms = (t_fault - t0) * 1000.0
    late_ms = fault_ms + WINDOW_MS
    failed = [c for c in calls if c[2] != "OK"]
    past = [c for c in calls if past_deadline(c)]
    late_failed = [c for c in failed if c[0] + c[1] > late_ms]
    late_past = [c for c in past if c[0] + c[1] > late_ms]
    out = dict(sent=len(calls), failed=len(failed), past=len(past),
               late_failed=len(late_failed), late_past=len(late_past),
               eject=None, readmit=None, fault_ms=fault_ms)
    # Eject and readmit, from the gateway's metrics.
    backend = stack.backend(0)
    trans = [(t, r) for t, r in poller.transitions(backend)]
    out_at = next((t for t, r in trans if t >= t_fault and r), None)
    if out_at is not None:
        out["eject"] = out_at - t_fault
        out["eject_reason"] = next(r for t, r in trans if t == out_at)
        if lift is not None:
            back = next((t for t, r in trans if t >= max(lift, out_at) and not r), None)
            out["readmit"] = None if back is None else back - lift
    out["transitions"] = [(round(t - t_fault, 2), r or "in") for t, r in trans if t >= t_fault - 0.5]
    for i in (1, 2):
        bad = [(round(t - t_fault, 2), r) for t, r in poller.transitions(stack.backend(i))
               if t >= t0]
        if any(r for _, r in bad):
            out.setdefault("others_out", []).append((SIMS[i], bad[:6]))
    out["poll_errors"] = poller.errors
    out["fail_detail"] = detail(failed, past, fault_ms)
    if fault == "sigterm":
        in_flight = [c for c in calls if c[0] < fault_ms <= c[0] + c[1]]
        after = [c for c in calls if c[0] >= fault_ms]
        out["in_flight"] = len(in_flight)
        out["in_flight_failed"] = sum(1 for c in in_flight if c[2] != "OK")
        out["in_flight_failed_detail"] = detail([c for c in in_flight if c[2] != "OK"], [], fault_ms)
        out["sent_after"] = len(after)
        out["failed_after"] = sum(1 for c in after if c[2] != "OK")
        out["failed_before"] = sum(1 for c in calls if c[0] + c[1] < fault_ms and c[2] != "OK")
        out.update({k: extra[k] for k in ("health_before", "health_after", "exit_code", "t_exit")})
    if fault == "reload":
        out["reload_steps"] = extra["reload_steps"]
        try:
            with open(stack.gateway_log, errors="replace") as f:
                log = f.read()
            out["reload_log"] = (len(re.findall(r"configuration reloaded \(SIGHUP\)", log)),
                                 len(re.findall(r"configuration reload refused", log)))
        except OSError:
            out["reload_log"] = None
    out["verdict"] = verdict(fault, out, lift)
    return out


def past_deadline(call):
    """DEADLINE_EXCEEDED (the gateway's or bench's own timer), CANCELLED by tonic's
    grpc-timeout timer ("Timeout expired", so at the deadline), or any answer after 2 s."""
    _, lat, code, _ = call
    if code == "DEADLINE_EXCEEDED" or lat >= TIMEOUT_MS:
        return True
    return code == "CANCELLED" and lat >= 0.95 * TIMEOUT_MS


def detail(failed, past, fault_ms):
    """Failed calls grouped by code and backend, with when they were sent and answered."""
    groups = {}
    for s, lat, code, backend in failed + [c for c in past if c[2] == "OK"]:
        key = (code if code != "OK" else "OK-but-late", backend)
        groups.setdefault(key, []).append((s - fault_ms, s + lat - fault_ms, lat))
    out = []
    for (code, backend), v in sorted(groups.items()):
        sent = [x[0] for x in v]
        done = [x[1] for x in v]
        lat = sorted(x[2] for x in v)
        out.append(f"{len(v)} x {code} (backend {backend}): sent {min(sent)/1000:+.2f}..{max(sent)/1000:+.2f} s, "
                   f"answered {min(done)/1000:+.2f}..{max(done)/1000:+.2f} s after the fault, "
                   f"latency {lat[0]:.0f}..{lat[-1]:.0f} ms (median {lat[len(lat)//2]:.0f})")
    return out


def verdict(fault, r, lift):
    t = TARGETS.get(fault)
    if not t:
        return "—"
    why = []
    if t.get("eject") and (r["eject"] is None or r["eject"] > WINDOW_MS / 1000):
        why.append("not ejected within 1.5 s")
    if t.get("late") and (r["late_failed"] or r["late_past"]):
        why.append("harm after 1.5 s")
    if t.get("readmit") and r["readmit"] is None:
        why.append("not readmitted")
    if t.get("no_fail") and r["failed"]:
        why.append("calls failed")
    if t.get("no_inflight_fail") and r.get("in_flight_failed"):
        why.append("in-flight calls failed")
    v = "PASS" if not why else "MISS: " + ", ".join(why)
    if fault == "sigterm" and not any(h == "NOT_SERVING" for _, h in r.get("health_after", [])):
        first = next(((t, h) for t, h in r.get("health_after", []) if h != "SERVING"), None)
        seen = f"{first[1]} at +{first[0] * 1000:.0f} ms" if first else "nothing"
        v += f"; NOT_SERVING never seen ({seen})"
    return v


def target_text(fault):
    return {
        "hang": "eject ≤ 1.5 s, 0 harm after 1.5 s",
        "stall": "eject ≤ 1.5 s, 0 harm after 1.5 s, readmitted",
        "partition": "eject ≤ 1.5 s, 0 harm after 1.5 s",
        "kill": "0 lost calls",
        "reload": "0 failed calls",
        "sigterm": "0 failed in-flight calls",
    }.get(fault, "— (reported only)")


def print_report(results, command):
    print()
    print(f"Command: `{command}`")
    la = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"Machine: {os.cpu_count()} CPUs, load average {' '.join(la)} at the end; "
          f"three `infergate sim --slots {SIM_SLOTS} --latency-ms {SIM_LATENCY_MS}`, "
          f"`infergate serve` with the default config, "
          f"`infergate-cli bench --rate {RATE} --poisson --timeout-ms {TIMEOUT_MS} --timeline FILE`; "
          f"{RUN_S:.0f} s per run ({FLAP_RUN_S:.0f} s for flapping, 10 s for SIGTERM), "
          f"fault on sim-a at t = {FAULT_AT_S:.0f} s.")
    cmd = next((r["bench_cmd"] for r in results if r.get("bench_cmd")), None)
    if cmd:
        print(f"Load, e.g.: `{cmd}`")
    print()
    print("| fault | calls sent | failed | past deadline | failed > 1.5 s after fault | "
          "time to eject | time to readmit | target | result |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        if r.get("skipped"):
            print(f"| {r['desc']} | — | — | — | — | — | — | {target_text(r['fault'])} | "
                  f"skipped: {r['skipped']} |")
            continue
        eject = fmt_s(r["eject"])
        if r["eject"] is not None and r.get("eject_reason"):
            eject += f" ({r['eject_reason']})"
        readmit = fmt_s(r["readmit"])
        if r["fault"] in ("kill", "hang", "latency", "errors", "errors-unavailable", "partition"):
            readmit = "n/a (fault stays)"
        if r["fault"] in ("sigterm", "reload"):
            eject = readmit = "n/a"
        late = f"{r['late_failed']}"
        if r["late_past"]:
            late += f" (+{r['late_past']} past deadline)"
        if r["fault"] == "sigterm":
            late = "n/a"
        print(f"| {r['desc']} | {r['sent']} | {r['failed']} | {r['past']} | {late} | "
              f"{eject} | {readmit} | {target_text(r['fault'])} | {r['verdict']} |")
    print()
    print("Failed = any code but OK. Past deadline = DEADLINE_EXCEEDED, CANCELLED by the "
          "client's own 2 s timer, or latency ≥ 2 s. Times are from the fault (sim-a). \"After 1.5 s\" = answered more than 1.5 s "
          "after the fault began. Eject = first 50 ms poll of /metrics after the fault showing "
          "sim-a not ready, ejected, draining or circuit open; readmit = back in rotation, "
          "counted from the moment the fault was lifted.")
    print()
    print("Details:")
    for r in results:
        if r.get("skipped"):
            continue
        print(f"- {r['desc']}:")
        for n in r["notes"]:
            print(f"  - {n}")
        if r["fault"] not in ("sigterm", "reload"):
            tr = ", ".join(f"{t:+.2f} s {s}" for t, s in r["transitions"][:10])
            print(f"  - sim-a in the gateway's metrics: {tr}"
                  + (" ..." if len(r["transitions"]) > 10 else ""))
        for b, bad in r.get("others_out", []):
            tr = ", ".join(f"{t:+.2f} s {s or 'in'}" for t, s in bad)
            print(f"  - {b} out of rotation too: {tr}")
        for d in r["fail_detail"][:8]:
            print(f"  - {d}")
        if r["fault"] == "sigterm":
            ha = r["health_after"]
            firsts = []
            for t, h in ha:
                if not firsts or firsts[-1][1] != h:
                    firsts.append((t, h))
            print(f"  - health before SIGTERM: {r['health_before']}; after: "
                  + ", ".join(f"{h} at +{t*1000:.0f} ms" for t, h in firsts))
            print(f"  - in flight at SIGTERM: {r['in_flight']}, of which failed: "
                  f"{r['in_flight_failed']}; sent after SIGTERM: {r['sent_after']} "
                  f"(failed: {r['failed_after']}); failed before SIGTERM: {r['failed_before']}")
            for d in r["in_flight_failed_detail"]:
                print(f"  - in flight, failed: {d}")
            print(f"  - gateway exit code {r['exit_code']} at +{r['t_exit']:.2f} s")
        if r["fault"] == "reload":
            steps = "; ".join(f"t={a:.0f} s {w}" for a, w in r["reload_steps"])
            print(f"  - SIGHUP at {steps}; gateway log: reloaded/refused = {r['reload_log']}")
        if r.get("poll_errors"):
            print(f"  - metrics polls that failed: {r['poll_errors']}")


# ---------------------------------------------------------------------------------------
# Soak


def proc_rss_fds(pid):
    rss = "?"
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = line.split(":", 1)[1].strip()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = "?"
    return rss, fds


def soak(minutes, workdir, command):
    stack = Stack(workdir, "soak")
    try:
        stack.start()
        print(f"Command: `{command}`")
        print(f"Soak: {minutes} min of open-loop load at {RATE}/s (Poisson) through the default "
              f"gateway config; gateway pid {stack.gateway.pid}")
        print()
        print("| minute | gateway RSS | open fds |")
        print("|---:|---:|---:|")
        rss, fds = proc_rss_fds(stack.gateway.pid)
        print(f"| start (idle) | {rss} | {fds} |", flush=True)
        load = Load(stack, minutes * 60, None, "soak")
        t0 = load.start_time()
        for m in range(1, minutes + 1):
            sleep_until(t0 + 60 * m)
            if stack.gateway.poll() is not None:
                print(f"gateway exited with {stack.gateway.returncode}; see {stack.gateway_log}")
                break
            rss, fds = proc_rss_fds(stack.gateway.pid)
            print(f"| {m} | {rss} | {fds} |", flush=True)
        load.wait(timeout_s=30)
        time.sleep(1.0)
        rss, fds = proc_rss_fds(stack.gateway.pid)
        print(f"| end (load stopped) | {rss} | {fds} |")
        print()
        with open(load.summary_path, errors="replace") as f:
            print("```\n" + f.read().strip() + "\n```")
    finally:
        stack.stop()


# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", help=f"faults ({', '.join(FAULTS + EXTRA_FAULTS)}), "
                                            "or `soak [MINUTES]`; default: every fault")
    ap.add_argument("--workdir", help="where logs and timelines go [default: target/chaos/TIME]")
    args = ap.parse_args()
    command = os.environ.get("CHAOS_COMMAND") or " ".join(["scripts/chaos.py"] + sys.argv[1:])
    for b in (GW_BIN, CLI_BIN):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} is missing: run scripts/chaos.sh (it builds the release binaries)")
    workdir = args.workdir or os.path.join(ROOT, "target", "chaos", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(workdir, exist_ok=True)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        if args.what and args.what[0] == "soak":
            minutes = int(args.what[1]) if len(args.what) > 1 else 30
            if not 1 <= minutes <= 24 * 60:
                sys.exit("soak MINUTES: between 1 and 1440")
            soak(minutes, workdir, command)
            return
        faults = args.what or FAULTS
        unknown = [f for f in faults if f not in FAULTS + EXTRA_FAULTS]
        if unknown:
            sys.exit(f"unknown fault(s) {unknown}; choose from {FAULTS + EXTRA_FAULTS} or soak")
        results = []
        for f in faults:
            print(f"[chaos] {f}: {DESCRIPTION[f]} ...", file=sys.stderr, flush=True)
            r = run_fault(f, workdir)
            print(f"[chaos] {f}: {r.get('verdict') or r.get('skipped')}", file=sys.stderr, flush=True)
            results.append(r)
        print_report(results, command)
        print(f"\nLogs and per-call timelines: {os.path.relpath(workdir, ROOT)}/")
    finally:
        REAPER.cleanup()


if __name__ == "__main__":
    main()
