#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, builds the real
# binaries the end-to-end tests run, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run real programs on the agents: sh, python3, coreutils.
missing=()
for tool in python3 sh cat wc sleep hostname; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing test dependencies: ${missing[*]}"
        apt-get update -qq
        apt-get install -y -qq python3 coreutils hostname dash >/dev/null
    else
        echo "the tests need: ${missing[*]} (install them, or run this script as root on Debian/Ubuntu)" >&2
        exit 1
    fi
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked
