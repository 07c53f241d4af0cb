#!/usr/bin/env bash
# What a cold start costs on this machine: clones the committed HEAD into an empty temporary
# folder (nothing beside it), then times, with an empty cargo target dir,
#   readme: the README's two commands, `cargo build --release && ./target/release/skyward run
#           --nodes 3 --on all -- hostname`, then `scripts/test.sh` (crates are fetched
#           first, timed apart, so a warm ~/.cargo registry changes only that line);
#   ci:     `.ci/run`, in a target dir of its own (CARGO_TARGET_DIR, which must be empty);
#   library: the library crate alone, as a program that uses it builds it, with one HTTP
#           provider (Verda) and with every provider (the default), each in an empty target
#           dir of its own.
# Peak memory is the machine's memory in use (MemTotal - MemAvailable, sampled each second)
# above what was in use before the step: run it on an otherwise idle machine. Each step's
# figures replace its row in bench/cold-costs.tsv, which BENCHMARKS.md's footprint table shows.
set -euo pipefail
mode=${1:?usage: scripts/cold-cost.sh readme|ci|library}
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d /var/tmp/skyward-cold.XXXXXX)
git clone --quiet "$repo" "$scratch/skyward"
cd "$scratch/skyward"
echo "cold-cost $mode: $(git rev-parse --short HEAD) in $scratch/skyward, $(nproc) cores"

used_kib() { awk '/^MemTotal:/ { t = $2 } /^MemAvailable:/ { a = $2 } END { print t - a }' /proc/meminfo; }

# measure NAME COMMAND...: wall time and peak memory above the baseline, one line each.
measure() {
    local name=$1 base peak_file t0 status=0
    shift
    base=$(used_kib)
    peak_file=$(mktemp)
    echo 0 >"$peak_file"
    ( peak=0; while :; do u=$(( $(used_kib) - base )); (( u > peak )) && { peak=$u; echo "$peak" >"$peak_file"; }; sleep 1; done ) &
    local sampler=$!
    t0=$(date +%s)
    "$@" || status=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    local secs=$(( $(date +%s) - t0 ))
    local kib
    kib=$(cat "$peak_file")
    awk -v n="$name" -v s="$secs" -v kib="$kib" -v rc="$status" 'BEGIN {
        printf "COST %-28s %4dm%02ds  peak %.1f GB  exit %d\n", n, s / 60, s % 60, kib / 1048576, rc }' |
        tee -a "$scratch/costs.txt"
    rm -f "$peak_file"
    # The record BENCHMARKS.md's footprint table shows (skyward-bench reads it): one row per
    # step, replaced by the newest successful measurement of that step.
    if [ "$status" = 0 ]; then
        local record="$repo/bench/cold-costs.tsv" row
        row=$(printf '%s\t%d\t%d\t%s\t%s\t%d' "$name" "$secs" "$kib" "$(git rev-parse --short HEAD)" \
            "$(date -u +%Y-%m-%d)" "$(nproc)")
        { grep -v -F "$(printf '%s\t' "$name")" "$record" 2>/dev/null || true; echo "$row"; } >"$record.new"
        mv "$record.new" "$record"
    fi
    return "$status"
}

case "$mode" in
readme)
    unset CARGO_TARGET_DIR
    export SKYWARD_TOOLS_DIR="$scratch/tools"
    measure "cargo fetch (downloads)" cargo fetch --locked
    measure "cargo build --release" cargo build --release
    measure "skyward run (3 nodes)" ./target/release/skyward run --nodes 3 --on all -- hostname
    measure "scripts/test.sh, after the build" scripts/test.sh
    ;;
ci)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$scratch/target}"
    if [ -n "$(ls -A "$CARGO_TARGET_DIR" 2>/dev/null)" ]; then
        echo "$CARGO_TARGET_DIR is not empty: a cold run needs an empty target dir" >&2
        exit 2
    fi
    measure ".ci/run" bash .ci/run
    ;;
library)
    measure "cargo build --release -p skyward, verda only" env CARGO_TARGET_DIR="$scratch/target-verda" \
        cargo build --release --locked -p skyward --no-default-features --features verda
    measure "cargo build --release -p skyward, every provider" env CARGO_TARGET_DIR="$scratch/target-all" \
        cargo build --release --locked -p skyward
    ;;
*) echo "usage: scripts/cold-cost.sh readme|ci|library" >&2; exit 2 ;;
esac
echo "figures in $scratch/costs.txt"
