"""Compare agents on TextGen-v0: every agent x seed at the same env-step budget, and a random policy.

    python scripts/compare.py --quick                                  # a few minutes on a 2-core CPU
    python scripts/compare.py --agents ppo sb3-ppo sb3-a2c --seeds 0 1 2 3 4 --total-timesteps 50000
    python scripts/compare.py --task keyword --device cuda --out runs/compare_keyword
    python scripts/compare.py --summarize runs/compare_<time>          # recompute the tables and plot
    tensorboard --logdir runs/compare_<time>                           # every run, overlaid

Writes into ``--out`` (default ``runs/compare_<time>``):

- ``results.csv`` / ``results.md``: per agent, the final ``rollout/ep_rew_mean`` (mean ± std over
  seeds), the greedy evaluation reward after training, the env steps to reach the task's reward
  threshold, wall time, env steps per second and that speed as a ratio to the custom PPO's; with
  five or more seeds also the interquartile mean with a 95% stratified-bootstrap interval;
- ``runs.csv``: the same figures per run;
- ``curves.png``: ``rollout/ep_rew_mean`` against env steps (mean and ±1 std band over seeds);
- ``hyperparams/<agent>.json``, ``config.json``: every setting;
- ``tb/<agent>_s<seed>_1``: the TensorBoard runs every figure above is computed from.

All agents share the Transformer architecture (SB3 through ``agents.extractor``) and, where the
algorithms share a meaning, the hyperparameters; none bootstraps the value of an episode cut at
``max_new_tokens`` (its reward is already complete). Runs are sequential and interleaved by seed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.baselines import SB3_AGENTS
from agents.compare import run_comparison, save_config, summarize
from agents.ppo import PPOConfig
from textgym.tasks import TASKS, env_arguments_error, get_task

AGENTS = ("ppo", *SB3_AGENTS)
QUICK = {"agents": ["ppo", "sb3-ppo", "sb3-a2c"], "seeds": [0, 1, 2], "total_timesteps": 16_384}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agents",
        nargs="+",
        choices=AGENTS,
        default=None,
        help="agents to compare (default: ppo sb3-ppo sb3-a2c)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2)")
    parser.add_argument(
        "--total-timesteps", type=int, default=None, help="env-step budget of every run (default: 50000)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"preset for a few minutes on a 2-core CPU: {json.dumps(QUICK)}; explicit options override it",
    )
    parser.add_argument("--task", default="default", help=f"built-in task: default, {', '.join(TASKS)}")
    parser.add_argument(
        "--env-kwargs", type=json.loads, default={}, help="JSON object of further environment arguments"
    )
    parser.add_argument("--num-envs", type=int, default=64, help="episodes in flight, for every agent")
    parser.add_argument("--device", default="auto", help="torch device of every agent: auto, cpu, cuda")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="reward threshold (default: the task's reward_threshold)",
    )
    parser.add_argument("--eval-episodes", type=int, default=256, help="episodes of each greedy evaluation")
    parser.add_argument("--ppo-config", type=json.loads, default={}, help="JSON object of PPOConfig fields")
    parser.add_argument(
        "--sb3-hyperparams",
        type=json.loads,
        default={},
        help='JSON object {agent: {SB3 argument: value}}, e.g. \'{"sb3-a2c": {"n_steps": 16}}\'',
    )
    parser.add_argument("--out", default=None, help="output directory (default: runs/compare_<time>)")
    parser.add_argument(
        "--summarize",
        metavar="OUT",
        default=None,
        help="only recompute the tables and plot of an earlier --out",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    preset = (
        QUICK
        if args.quick
        else {"agents": ["ppo", "sb3-ppo", "sb3-a2c"], "seeds": [0, 1, 2], "total_timesteps": 50_000}
    )
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("env_kwargs", "ppo_config", "sb3_hyperparams"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    if (problem := env_arguments_error(args.task, args.env_kwargs)) is not None:
        parser.error(problem)
    for name in ("total_timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if len(set(args.agents)) != len(args.agents) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--agents and --seeds must not repeat a value")
    if any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be non-negative, got {args.seeds}")
    bad = [a for a in args.sb3_hyperparams if a not in SB3_AGENTS]
    if bad or not all(isinstance(v, dict) for v in args.sb3_hyperparams.values()):
        parser.error(f"--sb3-hyperparams must map SB3 agents ({', '.join(SB3_AGENTS)}) to JSON objects")
    for agent, params in args.sb3_hyperparams.items():
        accepted = set(inspect.signature(SB3_AGENTS[agent].__init__).parameters) - {"self", "policy", "env"}
        if unknown := sorted(set(params) - accepted):
            parser.error(f"--sb3-hyperparams: {agent} has no argument(s) {unknown}")
    try:
        args.ppo = PPOConfig.from_dict(args.ppo_config)
    except (TypeError, ValueError) as exc:
        parser.error(f"--ppo-config: {exc}")
    if args.summarize is not None and not (Path(args.summarize) / "tb").is_dir():
        parser.error(f"--summarize: {args.summarize!r} holds no tb/ directory of a comparison")
    if args.out is None:
        args.out = f"runs/compare_{time.strftime('%Y%m%d-%H%M%S')}"
    elif (
        args.summarize is None and (Path(args.out) / "tb").is_dir() and any((Path(args.out) / "tb").iterdir())
    ):
        parser.error(f"--out: {args.out!r} already holds a comparison; choose another directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        config_file = Path(args.summarize) / "config.json"
        saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
        threshold = args.threshold if args.threshold is not None else saved.get("threshold")
        if threshold is None:
            threshold = get_task(saved.get("task", args.task)).reward_threshold
        result = summarize(args.summarize, threshold)
        print(result["markdown"])
        print(f"written: {Path(args.summarize) / 'results.csv'}, results.md, runs.csv, curves.png")
        return 0

    threshold = args.threshold if args.threshold is not None else get_task(args.task).reward_threshold
    config = {k: v for k, v in vars(args).items() if k not in ("ppo", "no_progress", "summarize")}
    save_config(args.out, config | {"threshold": threshold, "ppo_config_resolved": args.ppo.to_dict()})
    runs = len(args.agents) * len(args.seeds)
    print(
        f"comparing {', '.join(args.agents)} x seeds {args.seeds} ({runs} runs of {args.total_timesteps:,} "
        f"env steps) on task {args.task!r}, device {args.device}; output: {args.out}"
    )
    try:
        result = run_comparison(
            args.out,
            args.agents,
            args.seeds,
            args.total_timesteps,
            args.task,
            args.env_kwargs,
            args.num_envs,
            args.device,
            threshold,
            args.eval_episodes,
            args.ppo,
            args.sb3_hyperparams,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted: the runs that finished are summarised in {args.out}")
        return 130
    print()
    print(result["markdown"])
    print(f"written: {args.out}/results.csv, results.md, runs.csv, curves.png, hyperparams/, tb/")
    print(f"curves: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
