#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, builds the real
# binaries the end-to-end tests run, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run real programs on the agents (sh, python3, coreutils), boot nodes
# whose bootstrap fetches the agent (curl), and put nodes in network namespaces (iproute2).
missing=()
for tool in python3 sh cat wc sleep hostname curl ip tc iptables; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing test dependencies: ${missing[*]}"
        apt-get update -qq
        apt-get install -y -qq python3 coreutils hostname dash curl iproute2 iptables >/dev/null
    else
        echo "the tests need: ${missing[*]} (install them, or run this script as root on Debian/Ubuntu)" >&2
        exit 1
    fi
fi

# AWS runs against moto (PyPI), in a venv of its own.
tools="${SKYWARD_TOOLS_DIR:-/var/tmp/skyward-tools}"
if [ ! -x "$tools/moto/bin/moto_server" ]; then
    echo "installing moto (the EC2 stand-in) into $tools/moto"
    mkdir -p "$tools"
    python3 -m venv "$tools/moto"
    "$tools/moto/bin/pip" install -q 'moto[server]'
fi
export SKYWARD_MOTO_SERVER="$tools/moto/bin/moto_server"

cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: a failing test binary does not stop the ones after it, so one closing
# line counts the whole suite; cargo still exits non-zero when any test failed.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# The providers without any cloud: the feature gates compile, and a cloud left out says so.
cargo test -p skyward-providers --no-default-features --lib --locked 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary, the last often
# being an empty doc-test run).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
