"""Sweep PPO's hyperparameters on TextGen-v0, judged by reward per env step (``agents/sweep.py``).

    python scripts/sweep.py --tasks default keyword alliteration \\
        --config 'num_envs=64' --config 'num_envs=16' --config 'num_envs=16,n_steps=16'
    python scripts/sweep.py --tasks all --seeds 0 1 2 --config '' --config 'num_envs=16' --out runs/sweep_b
    python scripts/sweep.py --tasks keyword --total-timesteps 50000 --marks 10000 50000 --config 'learning_rate=3e-4'

Every task x ``--config`` x seed is one PPO run from scratch, trained with
``learn(--total-timesteps)``; the runs go one after another, never in parallel. Each run records
``rollout/ep_rew_mean`` (mean return of the last 100 sampled training episodes) after every update
and reads from that one curve the reward at each ``--marks`` (the last value logged at or before
the mark: a 100k run read at 30k, not a 30k run, since the learning rate anneals to 0 over the
whole budget) and the first env step at which it reaches the task's ``reward_threshold``.

A ``--config`` is comma-separated ``field=value`` pairs: ``num_envs`` (PPO's number of envs,
default 16, 64 before this sweep chose 16) and any scalar field of ``agents.ppo.PPOConfig`` (``n_steps``, ``n_epochs``,
``num_minibatches``, ``learning_rate``, ...); fields not given keep their defaults, and ``''`` is
the defaults. Tasks: the built-in ones (``textgym.tasks.TASKS``; ``default`` is ``sentiment``),
``alliteration`` (a plain Python function as the reward, ``agents.sweep.alliteration``: distinct
words of the completion that share its first word's initial, over 8, on the default task's prompts;
threshold 0.75), or ``all`` for every one of them.

Writes into ``--out`` after every run, each file atomically: ``runs.json`` (every run's setting,
seed, curve, reward at the marks, steps to the threshold, wall seconds), ``summary.json`` (per
task and setting, mean and sample std over seeds) and ``results.md`` (that table in Markdown),
so an interrupted sweep keeps what it finished. One progress line per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agents.runtime import (
    HelpFormatter,
    add_threads_argument,
    default_threads,
    device_error,
    new_run_dir,
    positive_int,
    seed,
    set_threads,
)
from agents.sweep import (
    DEFAULT_MARKS,
    DEFAULT_TIMESTEPS,
    RunResult,
    Setting,
    get_sweep_task,
    markdown_table,
    parse_setting,
    run_grid,
    summarize,
    task_names,
)
from textgym.io import write_json, write_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["default"],
        metavar="TASK",
        help=f"tasks to train on: default, {', '.join(task_names())}, or all",
    )
    parser.add_argument(
        "--config",
        action="append",
        dest="configs",
        metavar="FIELDS",
        help="one setting of the grid, e.g. 'num_envs=16,n_steps=32,learning_rate=3e-4'; repeat the "
        "option for each setting (default: one setting, the defaults)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=seed, default=[0], metavar="SEED", help="seeds of each setting"
    )
    parser.add_argument(
        "--total-timesteps",
        type=positive_int,
        default=DEFAULT_TIMESTEPS,
        help="env steps per run (rounded up to whole rollouts); the learning rate anneals over them",
    )
    parser.add_argument(
        "--marks",
        nargs="+",
        type=positive_int,
        default=list(DEFAULT_MARKS),
        metavar="STEPS",
        help="env steps at which to read each run's reward (the last value logged at or before each)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    parser.add_argument(
        "--out",
        default=None,
        help="directory for runs.json, summary.json and results.md; must be new or empty "
        "(default: runs/sweep_<time>)",
    )
    add_threads_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = list(task_names()) if "all" in args.tasks else list(dict.fromkeys(args.tasks))
    for task in tasks:
        try:
            get_sweep_task(task)
        except ValueError as exc:
            parser.error(f"--tasks: {exc}")
    settings: list[Setting] = []
    for text in args.configs if args.configs is not None else [""]:
        try:
            setting = parse_setting(text)
        except ValueError as exc:
            parser.error(f"--config {text!r}: {exc}")
        if setting in settings:
            parser.error(f"--config {text!r}: the same setting as an earlier --config ({setting.label})")
        settings.append(setting)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    out, problem = new_run_dir(args.out, "sweep")
    if problem is not None:
        parser.error(problem)
    set_threads(args.threads if args.threads is not None else default_threads())

    count = len(tasks) * len(settings) * len(args.seeds)
    print(f"{count} runs: {len(tasks)} task(s) x {len(settings)} setting(s) x {len(args.seeds)} seed(s), "
          f"{args.total_timesteps:,} env steps each; writing into {out}", flush=True)  # fmt: skip
    done: list[RunResult] = []
    start = time.perf_counter()

    def save(result: RunResult, index: int, total: int) -> None:
        done.append(result)
        rows = summarize(done)
        write_json(out / "runs.json", [r.to_dict() for r in done])
        write_json(out / "summary.json", rows)
        write_text(out / "results.md", markdown_table(rows))
        marks = "  ".join(
            f"@{m // 1000}k {'–' if v is None else f'{v:.3f}'}" for m, v in result.at_marks.items()
        )
        reached = result.steps_to_threshold
        print(
            f"[{index}/{total}] {result.task} seed {result.seed} {result.setting.label}: {marks}  "
            f"threshold {result.reward_threshold:g} at {'never' if reached is None else f'{reached:,}'}  "
            f"{result.wall_seconds:.0f} s (total {time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    run_grid(tasks, settings, args.seeds, args.total_timesteps, args.marks, args.device, on_result=save)
    print()
    print(markdown_table(summarize(done)), end="")
    print(f"\nwritten: {Path(out) / 'results.md'}, summary.json, runs.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
