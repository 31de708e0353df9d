#!/usr/bin/env python3
"""Offline checks of the deployment files against the gateway's source.

Reads rendered kustomize output (one file per overlay) and checks that what the manifests
say agrees with what the binary does, as written in the source: default ports and
shutdown grace (server/src/config/mod.rs), the config fields that exist (the config structs),
the admin token variable (server/src/server.rs), the CLI's health check
(client/src/cli), the metric names (docs/METRICS.md, server/src), and the Dockerfile.

    check_manifests.py --root . --rendered dev=/tmp/dev.yaml --rendered production=/tmp/prod.yaml \
        [--adapter /tmp/adapter.yaml] [--summary-file FILE]

Prints one line per check and `manifest-checks: N passed, M failed`; exits 1 on a failure.
Needs PyYAML (scripts/check-deploy.sh runs it from .venv-deploy) and Python 3.11+ (tomllib).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tomllib

import yaml

PASSED: list[str] = []
FAILED: list[str] = []


def check(name: str, ok: bool, why: str = "") -> bool:
    if ok:
        PASSED.append(name)
        print(f"ok   {name}")
    else:
        FAILED.append(name)
        print(f"FAIL {name}{': ' + why if why else ''}")
    return ok


def warn(message: str) -> None:
    print(f"WARN {message}")


# --- facts from the source ---------------------------------------------------------------


class Source:
    def __init__(self, root: pathlib.Path):
        self.root = root

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text(encoding="utf-8")

    def struct_fields(self, rel: str, name: str) -> set[str]:
        text = self.read(rel)
        m = re.search(r"pub struct " + re.escape(name) + r"\s*\{", text)
        if not m:
            raise LookupError(f"struct {name} not found in {rel}")
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        return set(re.findall(r"^\s*pub (\w+)\s*:", text[m.end():i], re.M))

    def default_port(self, field: str) -> int:
        text = self.read("server/src/config/mod.rs")
        m = re.search(field + r": SocketAddr::from\(\(\[[\d, ]+\], (\d+)\)\)", text)
        if not m:
            raise LookupError(f"default of {field} not found in server/src/config/mod.rs")
        return int(m.group(1))

    def default_int(self, field: str) -> int:
        text = self.read("server/src/config/mod.rs")
        body = text[text.index("impl Default for Config"):]
        m = re.search(r"\b" + field + r": ([\d_]+),", body)
        if not m:
            raise LookupError(f"default of {field} not found in server/src/config/mod.rs")
        return int(m.group(1).replace("_", ""))


# Config tables -> (file, struct). `[]` marks an array of tables, `*` a map of tables.
TABLES = {
    "": ("server/src/config/mod.rs", "Config"),
    "admin": ("server/src/config/mod.rs", "AdminConfig"),
    "balancer": ("server/src/config/mod.rs", "BalancerConfig"),
    "health": ("server/src/config/mod.rs", "HealthConfig"),
    "discovery": ("server/src/config/mod.rs", "DiscoveryConfig"),
    "tenants": ("server/src/config/mod.rs", "TenantConfig"),
    "backends[]": ("server/src/config/mod.rs", "BackendConfig"),
    "models*": ("server/src/config/mod.rs", "ModelConfig"),
    "models*.bulkhead": ("server/src/config/resilience.rs", "BulkheadConfig"),
    "models*.retry": ("server/src/config/resilience.rs", "RetryConfig"),
    "models*.hedge": ("server/src/config/resilience.rs", "HedgeConfig"),
    "dns[]": ("server/src/config/net.rs", "DnsConfig"),
    "load": ("server/src/config/load.rs", "LoadConfig"),
    "outlier": ("server/src/config/resilience.rs", "OutlierConfig"),
    "breaker": ("server/src/config/resilience.rs", "BreakerConfig"),
    "retry": ("server/src/config/resilience.rs", "RetryConfig"),
    "hedge": ("server/src/config/resilience.rs", "HedgeConfig"),
    "rate_limit": ("server/src/config/limits.rs", "RateLimitConfig"),
}


def unknown_fields(src: Source, doc: dict) -> list[str]:
    """Fields of the TOML that no config struct has (serde's deny_unknown_fields)."""
    bad: list[str] = []

    def walk(table: dict, key: str, where: str) -> None:
        file, struct = TABLES[key]
        fields = src.struct_fields(file, struct)
        for name, value in table.items():
            path = f"{where}.{name}" if where else name
            if name not in fields:
                bad.append(f"{path} (not a field of {struct})")
                continue
            sub = f"{key}.{name}" if key else name
            if isinstance(value, list) and value and isinstance(value[0], dict) and sub + "[]" in TABLES:
                for i, item in enumerate(value):
                    walk(item, sub + "[]", f"{path}[{i}]")
            elif isinstance(value, dict) and sub + "*" in TABLES:
                for child, item in value.items():
                    walk(item, sub + "*", f"{path}.{child}")
            elif isinstance(value, dict) and sub in TABLES:
                walk(value, sub, path)

    walk(doc, "", "")
    return bad


# --- the rendered manifests --------------------------------------------------------------


class Render:
    def __init__(self, name: str, path: pathlib.Path):
        self.name = name
        self.docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict | None:
        for d in self.all(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def get_prefix(self, kind: str, name: str) -> dict | None:
        """A generated object (kustomize appends a content hash to its name)."""
        return self.get(kind, name) or next(
            (d for d in self.all(kind) if re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", d["metadata"]["name"])),
            None,
        )


def selects(selector: dict, labels: dict) -> bool:
    want = selector.get("matchLabels", selector)
    return bool(want) and all(labels.get(k) == v for k, v in want.items())


def port_number(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def cpu_cores(quantity: str) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def prestop_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"):
        return float(command[1])
    return 0.0


def check_overlay(src: Source, r: Render, ports: dict, grace_default_ms: int) -> dict:
    """Checks one rendered overlay; returns facts shared with the Dockerfile checks."""
    n = r.name
    facts: dict = {}
    dep = r.get("Deployment", "infergate")
    if not check(f"{n}: Deployment infergate rendered", dep is not None):
        return facts
    ns = dep["metadata"].get("namespace", "default")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    check(f"{n}: Deployment selector matches its pod labels", selects(dep["spec"]["selector"], labels))
    if n == "production":
        check(f"{n}: 3 gateway replicas", dep["spec"].get("replicas") == 3, f"replicas={dep['spec'].get('replicas')}")
    c = next((c for c in spec["containers"] if c["name"] == "infergate"), None)
    if not check(f"{n}: container infergate", c is not None):
        return facts

    # Command line: infergate serve --config PATH
    argv = c.get("command", []) + c.get("args", [])
    ok = len(argv) >= 4 and pathlib.PurePath(argv[0]).name == "infergate" and argv[1] == "serve" and "--config" in argv
    check(f"{n}: command is `infergate serve --config FILE`", ok, " ".join(argv))
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else ""
    facts["config_path"] = config_path
    main_rs = src.read("server/src/main.rs")
    check(f"{n}: `serve` has a --config flag (server/src/main.rs)",
          "Serve(ServeArgs)" in main_rs and re.search(r"struct ServeArgs \{[^}]*\bconfig: Option<PathBuf>", main_rs, re.S) is not None)
    log_format = argv[argv.index("--log-format") + 1] if "--log-format" in argv[:-1] else "text"
    check(f"{n}: --log-format is text or json", log_format in ("text", "json"), log_format)

    # The config file comes from a ConfigMap mounted as a directory (updates reach it).
    mount = next((m for m in c.get("volumeMounts", [])
                  if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    volume = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
    cm_name = volume.get("configMap", {}).get("name") if volume else None
    check(f"{n}: {config_path} is on a ConfigMap volume", cm_name is not None)
    check(f"{n}: the ConfigMap is mounted without subPath (kubelet updates reach it)",
          mount is not None and "subPath" not in mount and "subPathExpr" not in mount)
    cm = r.get("ConfigMap", cm_name) if cm_name else None
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1:] if mount else ""
    if not check(f"{n}: ConfigMap {cm_name} has the key {key!r} and a stable name",
                 cm is not None and key in cm.get("data", {}),
                 "missing (a hashed generator name would also roll pods instead of reloading)"):
        return facts
    try:
        cfg = tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        check(f"{n}: {key} is valid TOML", False, str(e))
        return facts
    check(f"{n}: {key} is valid TOML", True)
    bad = unknown_fields(src, cfg)
    check(f"{n}: {key} uses only fields of the config structs", not bad, ", ".join(bad))

    # Listen addresses: all interfaces, the binary's default ports, the container's ports.
    by_name = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for field, port_name in (("listen", "grpc"), ("metrics_listen", "metrics"), ("admin_listen", "admin")):
        value = cfg.get(field, f"127.0.0.1:{ports[field]}")
        host, _, port = value.rpartition(":")
        check(f"{n}: {field} = {value} listens on all interfaces", host in ("0.0.0.0", "[::]"))
        check(f"{n}: {field} port is the default {ports[field]} (server/src/config/mod.rs)", int(port) == ports[field])
        check(f"{n}: containerPort {port_name} = {ports[field]}", by_name.get(port_name) == ports[field],
              f"got {by_name.get(port_name)}")
    facts["ports"] = ports
    front = ports["listen"]

    # Admin token: off loopback the gateway refuses to start without one.
    server_rs = src.read("server/src/server.rs")
    env = {e["name"]: e for e in c.get("env", [])}
    tok = env.get("INFERGATE_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    check(f"{n}: the gateway reads INFERGATE_ADMIN_TOKEN (server/src/server.rs)",
          'std::env::var("INFERGATE_ADMIN_TOKEN")' in server_rs)
    check(f"{n}: INFERGATE_ADMIN_TOKEN comes from a Secret", tok is not None and "token" not in cfg.get("admin", {}))
    if tok and n != "production":
        secret = r.get("Secret", tok["name"])
        check(f"{n}: Secret {tok['name']} has key {tok['key']}", secret is not None and tok["key"] in
              {**secret.get("data", {}), **secret.get("stringData", {})})

    # Probes on the front door.
    probes = {k: c.get(k) for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    check(f"{n}: readiness is a grpc.health.v1 probe on {front}",
          (probes["readinessProbe"] or {}).get("grpc", {}).get("port") == front)
    for k in ("livenessProbe", "startupProbe"):
        p = probes[k] or {}
        target = p.get("grpc", {}).get("port") or port_number(c, p.get("tcpSocket", {}).get("port"))
        check(f"{n}: {k} on the front door {front}", target == front, f"got {target}")

    # Shutdown: kubelet must not kill the gateway before its grace is over.
    grace_ms = cfg.get("shutdown_grace_ms", grace_default_ms)
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    sleep = prestop_seconds(c)
    check(f"{n}: preStop sleeps (endpoint removal before SIGTERM)", sleep > 0)
    check(f"{n}: terminationGracePeriodSeconds {tgps} > preStop {sleep:g} s + shutdown_grace_ms {grace_ms}/1000",
          tgps > sleep + grace_ms / 1000)

    # Security and resources.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    facts["uid"] = uid
    check(f"{n}: runs as non-root", (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True) and uid not in (None, 0))
    check(f"{n}: readOnlyRootFilesystem", csc.get("readOnlyRootFilesystem") is True)
    check(f"{n}: no privilege escalation", csc.get("allowPrivilegeEscalation") is False)
    res = c.get("resources", {})
    check(f"{n}: cpu and memory requests and limits",
          all(k in res.get(s, {}) for s in ("requests", "limits") for k in ("cpu", "memory")))
    if "worker_threads" in cfg and "cpu" in res.get("limits", {}):
        check(f"{n}: worker_threads {cfg['worker_threads']} <= cpu limit {res['limits']['cpu']}",
              cfg["worker_threads"] <= cpu_cores(res["limits"]["cpu"]))

    # PodDisruptionBudget.
    pdb = next((p for p in r.all("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)), None)
    ok = pdb is not None and ("maxUnavailable" in pdb["spec"] or
                              pdb["spec"].get("minAvailable", 0) < dep["spec"].get("replicas", 1))
    check(f"{n}: a PodDisruptionBudget covers the gateway and allows a disruption", ok)

    # Services.
    def service_for(port: int):
        for s in r.all("Service"):
            if selects(s["spec"].get("selector", {}), labels):
                for p in s["spec"]["ports"]:
                    if p["port"] == port and port_number(c, p.get("targetPort", p["port"])) == port:
                        yield s, p

    fronts = list(service_for(front))
    check(f"{n}: a Service on {front} with appProtocol kubernetes.io/h2c",
          any(p.get("appProtocol") == "kubernetes.io/h2c" for _, p in fronts))
    ops = [s for s, _ in service_for(ports["metrics_listen"])]
    check(f"{n}: a Service for metrics ({ports['metrics_listen']}) and admin ({ports['admin_listen']})",
          any(any(p["port"] == ports["admin_listen"] for p in s["spec"]["ports"]) for s in ops))

    # [[dns]] follows the headless Service of the Triton pods.
    dns = cfg.get("dns", [])
    check(f"{n}: {key} has a [[dns]] entry", bool(dns))
    for d in dns:
        name = d["name"].rstrip(".")
        svc_name, _, rest = name.partition(".")
        svc = r.get("Service", svc_name)
        svc_ns = (svc or {}).get("metadata", {}).get("namespace", "default")
        check(f"{n}: [[dns]] {d['name']} is Service {svc_name} in namespace {svc_ns}",
              svc is not None and rest in (f"{svc_ns}.svc.cluster.local", f"{svc_ns}.svc", svc_ns),
              f"namespace part is {rest!r}")
        if not svc:
            continue
        check(f"{n}: Service {svc_name} is headless", svc["spec"].get("clusterIP") == "None")
        backend = next((w for w in r.all("StatefulSet") + r.all("Deployment")
                        if selects(svc["spec"].get("selector", {}), w["spec"]["template"]["metadata"]["labels"])), None)
        check(f"{n}: Service {svc_name} selects a workload", backend is not None)
        if backend:
            bc = backend["spec"]["template"]["spec"]["containers"][0]
            sp = next((p for p in svc["spec"]["ports"] if p["port"] == d["port"]), None)
            check(f"{n}: [[dns]] port {d['port']} reaches the backend's gRPC port",
                  sp is not None and port_number(bc, sp.get("targetPort", sp["port"])) == d["port"] == by_port_name(bc, "grpc"))
            if "tritonserver" in bc["image"]:
                check(f"{n}: Triton image from nvcr.io with gRPC 8001 and metrics 8002",
                      bc["image"].startswith("nvcr.io/nvidia/tritonserver:") and
                      by_port_name(bc, "grpc") == 8001 and by_port_name(bc, "metrics") == 8002)
            facts["backend"] = backend

    # Monitoring: ServiceMonitor, HPA on a per-model queue metric.
    sm = r.get("ServiceMonitor", "infergate")
    scraped = [s for s in ops if sm and selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
    check(f"{n}: ServiceMonitor selects the metrics Service",
          bool(scraped) and all(any(p.get("name") == e["port"] for p in scraped[0]["spec"]["ports"])
                                for e in sm["spec"]["endpoints"]))
    hpa = next(iter(r.all("HorizontalPodAutoscaler")), None)
    if check(f"{n}: an autoscaling/v2 HPA", hpa is not None and hpa["apiVersion"] == "autoscaling/v2"):
        ref = hpa["spec"]["scaleTargetRef"]
        check(f"{n}: HPA scales {ref['kind']} {ref['name']}, which is rendered", r.get(ref["kind"], ref["name"]) is not None)
        check(f"{n}: HPA workload has no fixed replicas (apply would fight the HPA)",
              "replicas" not in (r.get(ref["kind"], ref["name"]) or {}).get("spec", {"replicas": 0}))
        for m in hpa["spec"]["metrics"]:
            obj = m.get("object") or m.get("pods") or m.get("external") or {}
            metric = obj.get("metric", {})
            facts.setdefault("hpa_metrics", set()).add(metric.get("name"))
            model = metric.get("selector", {}).get("matchLabels", {}).get("model")
            check(f"{n}: HPA metric {metric.get('name')} is a per-model gauge of docs/METRICS.md",
                  metric.get("name") in metric_table(src) and "`model`" in metric_table(src)[metric.get("name")])
            check(f"{n}: HPA model {model} has a bulkhead (else the gauge is absent)",
                  "bulkhead" in cfg.get("models", {}).get(model, {}))
            if m.get("object"):
                d = obj["describedObject"]
                check(f"{n}: HPA reads the metric on the scraped Service {d['name']}",
                      any(s["metadata"]["name"] == d["name"] for s in scraped))
    return facts


def by_port_name(container: dict, name: str) -> int | None:
    return port_number(container, name)


_METRICS: dict[str, str] = {}


def metric_table(src: Source) -> dict[str, str]:
    """docs/METRICS.md: metric name -> its table row."""
    if not _METRICS:
        for line in src.read("docs/METRICS.md").splitlines():
            m = re.match(r"\| `(infergate_\w+)` \|", line)
            if m:
                _METRICS[m.group(1)] = line
    return _METRICS


def check_alerts(src: Source) -> None:
    alerts = yaml.safe_load(src.read("deploy/prometheus/alerts.yml"))
    rule = yaml.safe_load(src.read("deploy/kubernetes/base/prometheusrule.yaml"))
    check("PrometheusRule spec.groups == alerts.yml groups", rule.get("spec", {}).get("groups") == alerts["groups"])
    code = "\n".join(p.read_text(encoding="utf-8") for p in (src.root / "server/src").rglob("*.rs"))
    tests = yaml.safe_load(src.read("deploy/prometheus/alerts_test.yml"))
    tested = {t["alertname"] for g in tests["tests"] for t in g.get("alert_rule_test", [])}
    fired = {t["alertname"] for g in tests["tests"] for t in g.get("alert_rule_test", []) if t.get("exp_alerts")}
    cleared = {t["alertname"] for g in tests["tests"] for t in g.get("alert_rule_test", []) if not t.get("exp_alerts")}
    for group in alerts["groups"]:
        for r in group["rules"]:
            a = r.get("alert")
            if not a:
                continue
            names = set(re.findall(r"\binfergate_\w+", r["expr"]))
            base = {re.sub(r"_(bucket|sum|count)$", "", x) for x in names}
            missing = sorted(x for x in base if x not in metric_table(src) or f'"{x}"' not in code)
            check(f"alert {a}: metrics exist in docs/METRICS.md and server/src", bool(base) and not missing,
                  ", ".join(missing))
            check(f"alert {a}: severity label and summary/description annotations",
                  r.get("labels", {}).get("severity") in ("info", "warning", "critical")
                  and {"summary", "description"} <= set(r.get("annotations", {})))
            check(f"alert {a}: alerts_test.yml fires and clears it", a in tested and a in fired and a in cleared)


def check_dockerfile(src: Source, facts: dict) -> None:
    text = src.read("deploy/Dockerfile")
    joined = re.sub(r"\\\n", " ", text)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    check("Dockerfile: rust:bookworm builder, debian:bookworm-slim runtime",
          len(froms) >= 2 and froms[0].startswith("rust:") and "bookworm" in froms[0] and froms[-1] == "debian:bookworm-slim")
    check("Dockerfile: cargo build --release --bin infergate --bin infergate-cli",
          re.search(r"cargo build --release.*--bin infergate .*--bin infergate-cli", joined) is not None)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    ports = facts.get("ports", {})
    check("Dockerfile: EXPOSE 8001 8002 8003 (the default ports)", exposed == set(ports.values()) == {8001, 8002, 8003})
    user = re.findall(r"^USER (\S+)", text, re.M)
    uid = user[-1].split(":")[0] if user else "root"
    check("Dockerfile: non-root USER, the Deployment's runAsUser", uid.isdigit() and int(uid) != 0 and int(uid) == facts.get("uid"))
    hc = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])", joined, re.M | re.S)
    argv = yaml.safe_load(hc.group(1)) if hc else []
    cli = src.read("client/src/cli/mod.rs")
    has_cmd = "Health(health::HealthArgs)" in cli and re.search(r"global = true[^\n]*\n\s*pub addr:", cli) is not None
    addr = argv[argv.index("--addr") + 1] if "--addr" in argv[:-1] else ""
    check("Dockerfile: HEALTHCHECK runs `infergate-cli --addr 127.0.0.1:<front door> health`",
          has_cmd and argv[:1] == ["infergate-cli"] and "health" in argv and addr == f"127.0.0.1:{ports.get('listen')}",
          " ".join(argv))
    cmd = re.search(r"^CMD (\[.*\])", text, re.M)
    argv = yaml.safe_load(cmd.group(1)) if cmd else []
    check("Dockerfile: CMD reads the config path the Deployment mounts",
          "--config" in argv[:-1] and argv[argv.index("--config") + 1] == facts.get("config_path"))


def check_adapter(path: pathlib.Path, metrics: set) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    cm = next((d for d in docs if d.get("kind") == "ConfigMap"), None)
    rules = yaml.safe_load(cm["data"]["config.yaml"]).get("rules", []) if cm else []
    served = set()
    for rule in rules:
        as_name = rule.get("name", {}).get("as")
        series = re.match(r"'?(\w+)", rule["seriesQuery"]).group(1)
        served.add(as_name or series)
        check(f"adapter rule for {series}: maps namespace and service, sums in metricsQuery",
              {"namespace", "service"} <= set(rule.get("resources", {}).get("overrides", {}))
              and "<<.LabelMatchers>>" in rule.get("metricsQuery", ""))
    check(f"adapter serves every HPA metric ({', '.join(sorted(metrics))})", bool(metrics) and metrics <= served)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".")
    ap.add_argument("--rendered", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--adapter", metavar="FILE")
    ap.add_argument("--summary-file")
    args = ap.parse_args()
    src = Source(pathlib.Path(args.root).resolve())

    ports = {f: src.default_port(f) for f in ("listen", "metrics_listen", "admin_listen")}
    check("server/src/config/mod.rs default ports are 8001/8002/8003",
          ports == {"listen": 8001, "metrics_listen": 8002, "admin_listen": 8003}, str(ports))
    grace = src.default_int("shutdown_grace_ms")
    check(f"server/src/config/mod.rs default shutdown_grace_ms is {grace}", grace > 0)
    control = src.read("server/src/control.rs")
    check("the gateway watches its config file's modification time (control.rs watch_reloads)",
          "fn watch_reloads" in control and "modified()" in control and "watch_config" in control)
    main_rs = src.read("server/src/main.rs")
    if "backends.is_empty()" in main_rs and "dns.is_empty()" not in main_rs:
        warn("server/src/main.rs: `serve` refuses a config whose only backends come from [[dns]] "
             "(`no backends`); the Kubernetes config has no [[backends]], so the gateway will not start "
             "until main.rs accepts `config.backends.is_empty() && !config.dns.is_empty()`")

    facts: dict = {}
    hpa_metrics: set = set()
    for item in args.rendered:
        name, _, path = item.partition("=")
        f = check_overlay(src, Render(name, pathlib.Path(path)), ports, grace)
        hpa_metrics |= f.get("hpa_metrics", set())
        if name == "production" or not facts:
            facts = f
    check_alerts(src)
    check_dockerfile(src, facts)
    if args.adapter:
        check_adapter(pathlib.Path(args.adapter), hpa_metrics)

    print(f"manifest-checks: {len(PASSED)} passed, {len(FAILED)} failed")
    if args.summary_file:
        pathlib.Path(args.summary_file).write_text(f"{len(PASSED)} {len(FAILED)}\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
