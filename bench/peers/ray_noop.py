"""Ray's dispatch numbers for skyward-bench: a @ray.remote no-op, one at a time and pipelined.

Run by the bench with the Python of a venv holding Ray; prints exactly one JSON line on
stdout. Every loop is bounded by a count and the whole run by an alarm.
"""

import argparse
import json
import os
import signal
import sys
import time


def nearest_rank(sorted_samples, p):
    rank = max(1, min(len(sorted_samples), int(-(-p * len(sorted_samples) // 100))))
    return sorted_samples[rank - 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--pipelined", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=int, default=300)
    args = parser.parse_args()
    for name in ("warmup", "sequential", "pipelined", "repeats"):
        if not 1 <= getattr(args, name) <= 100_000:
            sys.exit(f"--{name} must be between 1 and 100000")

    # The whole run, Ray's start-up included, is bounded: SIGALRM's default action ends us.
    signal.alarm(args.time_limit)
    # No usage reports leave the machine; everything stays on loopback.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=args.temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    init_seconds = time.perf_counter() - started
    try:

        @ray.remote
        def noop():
            return None

        for _ in range(args.warmup):
            ray.get(noop.remote())
        samples = []
        for _ in range(args.sequential):
            t = time.perf_counter()
            ray.get(noop.remote())
            samples.append(time.perf_counter() - t)
        samples.sort()

        per_s = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ray.get([noop.remote() for _ in range(args.pipelined)])
            per_s.append(args.pipelined / (time.perf_counter() - t))
    finally:
        ray.shutdown()

    print(
        json.dumps(
            {
                "ray_version": ray.__version__,
                "init_s": init_seconds,
                "sequential": args.sequential,
                "p50_us": nearest_rank(samples, 50) * 1e6,
                "p99_us": nearest_rank(samples, 99) * 1e6,
                "pipelined": args.pipelined,
                "pipelined_per_s": per_s,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
