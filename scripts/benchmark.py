"""Benchmarks of textgym, each measured against its baseline in the same run.

    python scripts/benchmark.py env                    # env steps/s: single, sync, async, batched
    python scripts/benchmark.py env --sizes 16 256 1024 --seconds 3 --out benchmarks/env.json
    python scripts/benchmark.py rollout                # KV cache vs full recompute, 64 new tokens
    python scripts/benchmark.py train                  # PPO training env steps/s
    python scripts/benchmark.py sb3                    # custom PPO vs SB3 PPO at matched settings
    python scripts/benchmark.py sb3 --max-new-tokens 8 32 64 --profile benchmarks/sb3_profile.txt
    python scripts/benchmark.py hf                     # Hugging Face GPT-2 policy vs built-in (hf extra)

``env`` drives every face of TextGen-v0 with the same random policy and the same reward (by
default the cheap built-in ``length`` reward on the default task) and prints env steps per second,
the ratio of the batched env to SyncVectorEnv at each N, and the share of time spent decoding
finished episodes and in the reward model. ``rollout`` samples episodes of 64 new tokens with the
Transformer policy, acting through its KV cache and, as the baseline, recomputing the whole
sequence every step. ``train`` measures the custom PPO's training throughput and how its time
splits between rollouts and updates. ``sb3`` trains the custom PPO and SB3 PPO with the same
Transformer, number of envs, rollout length, minibatch size and epochs, at each generation
length, and reports their env steps per second and the ratio; ``--profile`` writes a cProfile
report of the SB3 run. ``hf`` trains PPO with the built-in policy and with a randomly initialised
``transformers`` GPT-2 of the same size (built offline), acting through its KV cache and, as the
baseline, recomputing every step. Each report is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym.benchmark import format_env_table, run_env_benchmark
from textgym.io import write_json


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
    roll = sub.add_parser("rollout", help="KV cache vs full recompute when acting")
    roll.add_argument("--num-envs", type=int, default=64)
    roll.add_argument("--max-new-tokens", type=int, default=64)
    roll.add_argument("--episodes", type=int, default=2, help="episodes per env and mode")
    roll.add_argument("--device", default="cpu")
    roll.add_argument("--out", default="benchmarks/rollout.json")
    train = sub.add_parser("train", help="PPO training env steps per second")
    train.add_argument("--total-timesteps", type=int, default=16_384)
    train.add_argument("--num-envs", type=int, default=64)
    train.add_argument("--task", default="default")
    train.add_argument("--device", default="cpu")
    train.add_argument("--out", default="benchmarks/train.json")
    sb3 = sub.add_parser("sb3", help="custom PPO vs SB3 PPO env steps/s at matched settings")
    sb3.add_argument("--total-timesteps", type=int, default=8192, help="env steps per agent and length")
    sb3.add_argument("--num-envs", type=int, default=64)
    sb3.add_argument(
        "--max-new-tokens", type=int, nargs="+", default=[8, 32, 64], help="generation lengths to measure"
    )
    sb3.add_argument("--task", default="default")
    sb3.add_argument("--device", default="cpu")
    sb3.add_argument("--profile", default=None, help="cProfile report of the SB3 run (longest length)")
    sb3.add_argument("--out", default="benchmarks/sb3.json")
    hf = sub.add_parser(
        "hf", help="PPO with a Hugging Face GPT-2 policy (KV cache, recompute) vs the built-in"
    )
    hf.add_argument("--total-timesteps", type=int, default=8192, help="env steps per run and length")
    hf.add_argument("--num-envs", type=int, default=64)
    hf.add_argument("--max-new-tokens", type=int, nargs="+", default=[8, 32], help="generation lengths")
    hf.add_argument("--task", default="sentiment")
    hf.add_argument("--device", default="cpu")
    hf.add_argument("--out", default="benchmarks/hf.json")
    args = parser.parse_args(argv)
    for name in ("num_envs", "max_new_tokens", "episodes", "total_timesteps"):
        if isinstance(getattr(args, name, 1), int) and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.command == "env":
        if any(n < 1 for n in args.sizes):
            parser.error(f"--sizes must be positive integers, got {args.sizes}")
        report = run_env_benchmark(args.sizes, args.seconds, args.async_max, args.device, args.env_kwargs)
        print()
        print(format_env_table(report))
        print(f"\nsaved {write_json(args.out, report)}")
    elif args.command == "rollout":
        from agents.benchmark import rollout_speed

        report = rollout_speed(args.num_envs, args.max_new_tokens, args.episodes, args.device)
        print(f"rollout, {args.num_envs} envs x {args.max_new_tokens} new tokens on {report['device']}:")
        print(f"  full recompute {report['recompute']:>10,.0f} env steps/s")
        print(f"  KV cache       {report['kv_cache']:>10,.0f} env steps/s   ({report['speedup']:.1f}x)")
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "sb3":
        from agents.benchmark import sb3_ratio

        if any(m < 1 for m in args.max_new_tokens):
            parser.error(f"--max-new-tokens must be positive integers, got {args.max_new_tokens}")
        if args.num_envs * 32 % 4:
            parser.error("--num-envs x 32 must split into 4 minibatches")
        rows = []
        print(f"{'new tokens':>10} {'seq len':>8} {'custom PPO':>12} {'SB3 PPO':>10} {'ratio':>7}")
        for m in args.max_new_tokens:
            profile = args.profile if m == max(args.max_new_tokens) else None
            r = sb3_ratio(args.total_timesteps, args.num_envs, m, args.device, args.task, profile)
            rows.append(r)
            print(
                f"{m:>10} {r['seq_len']:>8} {r['custom_ppo']:>12,.0f} {r['sb3_ppo']:>10,.0f} {r['ratio']:>6.1f}x"
            )
        print("(env steps per second; same Transformer, envs, rollout, minibatch and epochs)")
        if args.profile:
            print(f"SB3 profile: {args.profile}")
        print(f"saved {write_json(args.out, {'runs': rows})}")
    elif args.command == "hf":
        from agents.benchmark import hf_speed

        if any(m < 1 for m in args.max_new_tokens):
            parser.error(f"--max-new-tokens must be positive integers, got {args.max_new_tokens}")
        rows = []
        print(
            f"{'new tokens':>10} {'built-in':>10} {'HF + KV cache':>14} {'HF recompute':>13} {'cache gain':>11}"
        )
        for m in args.max_new_tokens:
            r = hf_speed(args.total_timesteps, args.num_envs, m, args.device, args.task)
            rows.append(r)
            print(
                f"{m:>10} {r['builtin']:>10,.0f} {r['hf_kv_cache']:>14,.0f} {r['hf_recompute']:>13,.0f} "
                f"{r['kv_cache_vs_recompute']:>10.2f}x"
            )
        print("(PPO training env steps per second; same env, tokens and model size)")
        print(f"saved {write_json(args.out, {'runs': rows})}")
    else:
        from agents.benchmark import training_speed

        report = training_speed(args.total_timesteps, args.num_envs, args.device, args.task)
        print(
            f"PPO training on {report['device']}: {report['env_steps_per_second']:,.0f} env steps/s "
            f"(rollouts {report['rollout_share']:.0%}, updates {report['update_share']:.0%}); "
            f"final ep_rew_mean {report['final_ep_rew_mean']:.3f}"
        )
        print(f"saved {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
