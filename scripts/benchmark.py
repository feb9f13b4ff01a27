"""Benchmarks of textgym, each measured against its baseline in the same run.

    python scripts/benchmark.py env                    # env steps/s: single, sync, async, batched
    python scripts/benchmark.py env --sizes 16 256 1024 --seconds 3 --out benchmarks/env.json

``env`` drives every face of TextGen-v0 with the same random policy and the same reward (by
default the cheap built-in ``length`` reward on the default task) and prints env steps per second,
the ratio of the batched env to SyncVectorEnv at each N, and the share of time spent decoding
finished episodes and in the reward model. The report is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym.benchmark import format_env_table, run_env_benchmark, save_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="env steps per second of every face of TextGen-v0")
    env.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024], help="batch sizes N")
    env.add_argument("--seconds", type=float, default=3.0, help="timed wall-clock budget per measurement")
    env.add_argument(
        "--async-max", type=int, default=16, help="largest N for AsyncVectorEnv (one process per sub-env)"
    )
    env.add_argument("--device", default="cpu", help="device of the batched env: cpu, cuda, auto")
    env.add_argument(
        "--env-kwargs",
        type=json.loads,
        default=None,
        help='JSON keyword arguments of the env (default: {"reward": {"name": "length"}})',
    )
    env.add_argument("--out", default="benchmarks/env.json", help="where to save the JSON report")
    args = parser.parse_args(argv)

    if args.command == "env":
        if any(n < 1 for n in args.sizes):
            parser.error(f"--sizes must be positive integers, got {args.sizes}")
        report = run_env_benchmark(args.sizes, args.seconds, args.async_max, args.device, args.env_kwargs)
        print()
        print(format_env_table(report))
        print(f"\nsaved {save_report(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
