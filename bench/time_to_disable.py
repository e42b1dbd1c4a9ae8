"""How long an endpoint that keeps answering 500 takes to be disabled (SPEC §5: "about 15
minutes" with the defaults), simulated on the pure delivery policy with a fake clock.

    python bench/time_to_disable.py [--runs 1000] [--initial 1] [--max 300] [--limit 10]

Prints min / median / p90 / max in minutes over the runs (no sockets, no sleeps: each run
is the first burst of ``concurrency`` requests, then one probe per backoff step, until the
``failure_limit``-th counted failure).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bridge.config import RetryConfig
from bridge.policy import time_to_disable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--initial", type=float, default=1.0, help="retry.initial, seconds")
    parser.add_argument("--max", type=float, default=300.0, help="retry.max, seconds")
    parser.add_argument("--limit", type=int, default=10, help="failure_limit")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    retry = RetryConfig(initial=args.initial, max=args.max)
    runs = sorted(time_to_disable(retry, args.limit, rng) / 60 for _ in range(args.runs))
    p90 = runs[min(len(runs) - 1, int(len(runs) * 0.9))]
    print(f"{args.runs} runs, retry {args.initial:g}s..{args.max:g}s, failure_limit"
          f" {args.limit}: time to disable min {runs[0]:.1f} median"
          f" {statistics.median(runs):.1f} p90 {p90:.1f} max {runs[-1]:.1f} minutes"
          f" (mean {statistics.fmean(runs):.1f}, stdev {statistics.stdev(runs):.1f})")


if __name__ == "__main__":
    main()
