"""Verifiable rewards, learned rather than memorised: a short supervised warm-up, then GRPO, RLOO
and PPO from it, judged on held-out prompts.

    python scripts/arithmetic.py                         # 3 seeds, 2 processes: 505 s on a shared 2-core CPU
    python scripts/arithmetic.py --quick                 # a smoke run of seconds: every stage, tiny budgets
    python scripts/arithmetic.py --seeds 0 --processes 1 --total-timesteps 100000
    python scripts/arithmetic.py --model smollm2-135m    # a pretrained LM: warm-up, then GRPO (agents.pretrained_recipe)
    python scripts/arithmetic.py --model smollm2-135m --device cuda --eval-prompts all --total-timesteps 65536

For each seed (``agents.recipes``): a fresh Transformer learns the training split's equations
of ``arithmetic2`` (``a+b=`` with operands 0..99; the held-out operand pairs are in no training
text) by next-token prediction until it answers ``--warmup-target`` of 500 training prompts
exactly; a supervised control trains it on for 200 more steps; GRPO, RLOO and PPO each start
from the warm-up's checkpoint and train for ``--total-timesteps`` env steps on the training
prompts with the exact-match reward. Every policy is scored by exact match on every held-out
(test-split) prompt, greedy and sampled at temperature 1, and greedy on the training prompts.

Departures from the textbook, each chosen by measurement (``agents/recipes.py``): the warm-up is
deliberately short and stops at an accuracy, not a step count (when the model learns to carry
varies much between seeds); the group agents take PPO's 4 epochs x 4 minibatches per rollout over
512 rows in groups of 4, not the papers' one gradient step per rollout, which did not learn within
this budget. The table names the best RL agent by mean held-out greedy accuracy, and says whether
it beat the others by more than the seeds' spread.

With ``--model`` (a registered model fetched by ``scripts/get_model.py``, or a model folder) the
same recipe runs on that pretrained causal LM (``agents/pretrained_recipe.py``), once per seed, in
this process: held-out exact match of the model as it is, after ``--warmup-steps`` supervised steps
on the training equations (it learns to stop after the answer), and after each of ``--agents``
(default: GRPO) trained from the warm-up. ``--warmup-target``, ``--warmup-max-steps`` and
``--processes`` belong to the small Transformer's recipe and are refused with ``--model``.

Writes into ``--out`` (default ``runs/arithmetic_<time>``): ``results.md`` and ``results.json``
(the table, every seed's figures and every setting), atomically and only at the end;
``seed<k>/lm.pt`` (each warm-up checkpoint) and ``tb/`` (TensorBoard runs of every agent).
Every argument is checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.pretrained_recipe import PretrainedRecipeConfig, run_pretrained_recipe
from agents.recipes import AGENTS, QUICK, RecipeConfig, quick_config, results_markdown, run_recipe
from agents.runtime import (
    HelpFormatter,
    add_threads_argument,
    device_error,
    explicit_options,
    output_dir_error,
    positive_int,
    seed,
    set_threads,
)

DEFAULTS = RecipeConfig()
ONLY_BUILT_IN = ("warmup_target", "warmup_max_steps", "processes")
"""Options of the small Transformer's recipe, refused with ``--model``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--seeds", nargs="+", type=seed, default=[0, 1, 2], help="seeds, one run of everything each"
    )
    parser.add_argument(
        "--agents",
        nargs="+",
        choices=AGENTS,
        default=None,
        help="RL agents to run from the warm-up (default: all three; with --model: grpo)",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=2,
        help="worker processes: the warm-ups, then every (seed, agent) RL run, as jobs (1: all in this "
        "process); at most one per free core",
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--warmup-target",
        type=float,
        default=DEFAULTS.warmup_target,
        help="the warm-up stops when greedy exact match on training prompts reaches this, in [0, 1]",
    )
    parser.add_argument(
        "--warmup-max-steps", type=positive_int, default=DEFAULTS.warmup_max_steps, help="longest warm-up"
    )
    parser.add_argument(
        "--total-timesteps",
        type=positive_int,
        default=None,
        help=f"env steps of every RL run (default: {DEFAULTS.total_timesteps:,}; with --model: "
        f"{PretrainedRecipeConfig().total_timesteps:,})",
    )
    lm = parser.add_argument_group("a pretrained language model (agents.pretrained_recipe)")
    lm.add_argument(
        "--model",
        default=None,
        help="run the recipe on this causal LM: a registered model (scripts/get_model.py) or a folder",
    )
    lm.add_argument(
        "--warmup-steps",
        type=int,
        default=PretrainedRecipeConfig().warmup_steps,
        help="supervised steps of the pretrained model's warm-up (0: none)",
    )
    lm.add_argument(
        "--eval-prompts",
        default=str(PretrainedRecipeConfig().eval_prompts),
        help="held-out (and training) prompts evaluated, a fixed random draw; 'all': every prompt",
    )
    lm.add_argument("--device", default="cpu", help="torch device of the pretrained model: cpu, cuda, auto")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run of seconds: {', '.join(f'{k}={v}' for k, v in QUICK.items() if k != 'ppo')}, "
        "PPO n_steps=8, one process (figures mean nothing)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: runs/arithmetic_<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before anything is written; a mistake exits 2 naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.agents is None:
        args.agents = list(AGENTS) if args.model is None else list(PretrainedRecipeConfig().agents)
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.agents)) != len(args.agents):
        parser.error("--seeds and --agents must not repeat a value")
    if args.model is not None:
        return _pretrained_args(parser, args, argv)
    if args.total_timesteps is None:
        args.total_timesteps = DEFAULTS.total_timesteps
    if not 0 <= args.warmup_target <= 1:
        parser.error(f"--warmup-target must be in [0, 1], got {args.warmup_target}")
    config = dataclasses.replace(
        DEFAULTS,
        warmup_target=args.warmup_target,
        agents=tuple(args.agents),
        warmup_max_steps=args.warmup_max_steps,
        total_timesteps=args.total_timesteps,
    )
    if args.quick:
        config = quick_config(config)
        args.processes = 1
    args.config = config
    args.processes = min(args.processes, len(args.seeds) * len(args.agents))
    args.threads = 1 if args.threads is None else args.threads
    if args.out is None:
        args.out = f"runs/arithmetic_{time.strftime('%Y%m%d-%H%M%S')}"
    elif (Path(args.out) / "results.json").exists() or (Path(args.out) / "tb").is_dir():
        parser.error(f"--out: {args.out!r} already holds results; choose another directory")
    if (problem := output_dir_error(args.out, "--out")) is not None:
        parser.error(problem)
    return args


def _pretrained_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None
) -> argparse.Namespace:
    """The arguments of a run on a pretrained model (``--model``), checked."""
    from agents.pretrained_recipe import model_folder
    from agents.pretrained_recipe import quick_config as quick_lm

    given = explicit_options(parser, argv) & set(ONLY_BUILT_IN)
    if given:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
        parser.error(f"{names}: the small Transformer's recipe only; not with --model")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.eval_prompts in ("all", "None"):
        eval_prompts = None
    else:
        try:
            eval_prompts = int(args.eval_prompts)
        except ValueError:
            eval_prompts = 0
        if eval_prompts < 1:
            parser.error(f"--eval-prompts must be a positive integer or 'all', got {args.eval_prompts!r}")
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    try:
        model_folder(args.model)
    except FileNotFoundError as error:
        parser.error(f"--{error}")
    fields = {
        "model": args.model,
        "warmup_steps": args.warmup_steps,
        "eval_prompts": eval_prompts,
        "agents": tuple(args.agents),
        "device": args.device,
    }
    if args.total_timesteps is not None:
        fields["total_timesteps"] = args.total_timesteps
    config = PretrainedRecipeConfig(**fields)
    args.config = quick_lm(config) if args.quick else config
    args.threads = 1 if args.threads is None else args.threads
    if args.out is None:
        args.out = f"runs/arithmetic_{Path(args.model).name}_{time.strftime('%Y%m%d-%H%M%S')}"
    elif any((Path(args.out) / f"seed{s}" / "results.json").exists() for s in args.seeds):
        parser.error(f"--out: {args.out!r} already holds results; choose another directory")
    if (problem := output_dir_error(args.out, "--out")) is not None:
        parser.error(problem)
    return args


def _main_pretrained(args: argparse.Namespace) -> int:
    from agents.pretrained_recipe import results_markdown as lm_markdown

    cfg = args.config
    print(
        f"{cfg.model} on {cfg.task}: {cfg.warmup_steps} warm-up steps, then {', '.join(cfg.agents)} for "
        f"{cfg.total_timesteps:,} env steps each; seeds {args.seeds} on {cfg.device}; output: {args.out}",
        flush=True,
    )
    start = time.perf_counter()
    for s in args.seeds:
        results = run_pretrained_recipe(cfg, Path(args.out) / f"seed{s}", s, not args.no_progress)
        print(lm_markdown(results), flush=True)
    print(f"{time.perf_counter() - start:.0f} s; written: {Path(args.out)}/seed<k>/results.md, results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.model is not None:
        return _main_pretrained(args)
    cfg = args.config
    print(
        f"task {cfg.task}: warm-up to {cfg.warmup_target:.0%} on training prompts (at most "
        f"{cfg.warmup_max_steps} steps), then {', '.join(cfg.agents)} for "
        f"{cfg.total_timesteps:,} env steps each; seeds {args.seeds}, {args.processes} process(es) "
        f"of {args.threads} thread(s); output: {args.out}",
        flush=True,
    )
    start = time.perf_counter()
    summary = run_recipe(cfg, args.seeds, args.out, args.processes, args.threads, not args.no_progress)
    print(results_markdown(summary))
    print(f"{time.perf_counter() - start:.0f} s; written: {Path(args.out) / 'results.md'}, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
