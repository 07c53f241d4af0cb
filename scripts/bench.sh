#!/usr/bin/env bash
# The whole benchmark suite, from a fresh clone: installs the peers it compares against
# (Debian's openssh-server and rsync; Ray in a venv of its own), builds the release binaries,
# runs `skyward-bench` (which prints the tables and rewrites BENCHMARKS.md). Arguments go to
# skyward-bench (--no-write, --out PATH, --strict).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v rsync >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing the benchmark's peers: openssh-server openssh-client rsync"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
    else
        echo "the benchmark compares against sshd, ssh, scp and rsync: install openssh-server, openssh-client and rsync (or run this as root on Debian/Ubuntu); they are reported as not measured otherwise" >&2
    fi
fi

tools="${SKYWARD_TOOLS_DIR:-/var/tmp/skyward-tools}"
if [ ! -x "$tools/ray/bin/python" ] || ! "$tools/ray/bin/python" -c 'import ray' 2>/dev/null; then
    echo "installing Ray into $tools/ray"
    mkdir -p "$tools"
    python3 -m venv "$tools/ray"
    "$tools/ray/bin/pip" install -q ray
fi
export SKYWARD_TOOLS_DIR="$tools"

cargo build --release --workspace --locked
exec cargo run --release --locked -p skyward-bench -- "$@"
