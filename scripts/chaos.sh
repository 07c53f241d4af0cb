#!/usr/bin/env bash
# The chaos suite: a pool of local nodes (some in network namespaces) under random faults
# for a bounded time, its invariants checked (see tests/src/bin/chaos.rs). Root, for the
# namespaces.
#
#   scripts/chaos.sh [--seconds N | --minutes N] [--seed N] [--report FILE]
#
# Prints a table of faults injected by kind, tasks, lines and bytes verified, and
# violations; exits non-zero on any violation. Same seed, same choices (the timing of a
# real pool still varies).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "the chaos suite puts nodes in network namespaces: run it as root" >&2
    exit 1
fi
for tool in python3 ip; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "the chaos suite needs $tool (python3, iproute2)" >&2
        exit 1
    }
done
cargo build --workspace --bins --locked
exec "${CARGO_TARGET_DIR:-target}/debug/skyward-chaos" "$@"
