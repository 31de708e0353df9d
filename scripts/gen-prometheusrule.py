#!/usr/bin/env python3
"""Generates deploy/kubernetes/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

alerts.yml is the one source of truth for the alert rules (promtool checks and tests it);
the PrometheusRule is the same `groups:` under `spec:`, copied as text so comments and
layout survive. Standard library only.

    python3 scripts/gen-prometheusrule.py          # write the file
    python3 scripts/gen-prometheusrule.py --check  # exit 1 if it is out of date
"""
import difflib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy/prometheus/alerts.yml"
TARGET = ROOT / "deploy/kubernetes/base/prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by scripts/gen-prometheusrule.py: do not
# edit; change alerts.yml and run the script (scripts/check-deploy.sh checks they agree).
# The Prometheus Operator loads it into every Prometheus whose ruleSelector matches its
# labels (set `release: <your kube-prometheus-stack release>` in an overlay if needed).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: infergate
  labels:
    app.kubernetes.io/name: infergate
    app.kubernetes.io/component: gateway-ops
spec:
"""


def render() -> str:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(("  " + line).rstrip() + "\n" for line in lines[start:])
    return HEADER + body


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current == text:
            print(f"{TARGET.relative_to(ROOT)} is in sync with {SOURCE.relative_to(ROOT)}")
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(True), text.splitlines(True),
                str(TARGET.relative_to(ROOT)), "generated",
            )
        )
        print(f"{TARGET.relative_to(ROOT)} is out of date: run python3 scripts/gen-prometheusrule.py")
        return 1
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
