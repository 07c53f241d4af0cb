#!/usr/bin/env bash
# Builds the portable skyward-agent that cloud nodes run: release, linked against glibc 2.17
# (through zig, as cargo-zigbuild does it), so it starts on every image users boot (Ubuntu
# 22.04/24.04, Amazon Linux 2023, Debian 12, the GPU deep-learning images and older ones).
# Then checks that no symbol needs a newer glibc. The result is copied beside `skyward` as
# target/release/skyward-agent-linux-x86_64, which the coordinator serves to nodes.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC_BASELINE=2.17
tools="${SKYWARD_TOOLS_DIR:-/var/tmp/skyward-tools}"
mkdir -p "$tools"

# zig from PyPI (the ziglang package ships the compiler) in a venv of our own.
if [ ! -x "$tools/venv/bin/python" ]; then
    python3 -m venv "$tools/venv"
fi
if ! "$tools/venv/bin/python" -m ziglang version >/dev/null 2>&1; then
    "$tools/venv/bin/pip" install -q ziglang
fi
if [ ! -x "$tools/bin/cargo-zigbuild" ]; then
    cargo install -q --locked cargo-zigbuild --root "$tools"
fi
export PATH="$tools/bin:$tools/venv/bin:$PATH"

target=x86_64-unknown-linux-gnu
cargo zigbuild --release --locked -p skyward-agent --target "$target.$GLIBC_BASELINE"
built="${CARGO_TARGET_DIR:-target}/$target/release/skyward-agent"

# The newest glibc symbol version the binary needs must not pass the baseline.
newest=$(objdump -T "$built" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_BASELINE" | sort -V | tail -n 1)" != "$GLIBC_BASELINE" ]; then
    echo "skyward-agent needs glibc $newest, newer than the $GLIBC_BASELINE baseline" >&2
    exit 1
fi
out="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$out"
cp "$built" "$out/skyward-agent-linux-x86_64"
size=$(stat -c %s "$built")
echo "skyward-agent for linux-x86_64: glibc >= $newest needed (baseline $GLIBC_BASELINE), $size bytes: $out/skyward-agent-linux-x86_64"
