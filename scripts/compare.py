"""Compare agents on TextGen-v0: every agent x seed at the same env-step budget, and a random policy.

    python scripts/compare.py --quick                                  # about 90 s on a 2-core CPU, one thread
    python scripts/compare.py --agents ppo sb3-ppo sb3-a2c --seeds 0 1 2 3 4 --total-timesteps 50000
    python scripts/compare.py --agents ppo grpo rloo --agent-configs '{"grpo": {"group_size": 4}}'
    python scripts/compare.py --task keyword --device cuda --out runs/compare_keyword
    python scripts/compare.py --task translate --agents ppo sb3-ppo sb3-recurrent-ppo --seeds 0 1 2
    python scripts/compare.py --task translate --agents ppo ppo-seq2seq --beam 4   # + beam search
    python scripts/compare.py --summarize runs/compare_<time>          # recompute the tables and plot
    tensorboard --logdir runs/compare_<time>                           # every run, overlaid

Writes into ``--out`` (default ``runs/compare_<time>``):

- ``results.csv`` / ``results.md``: per agent, the final ``rollout/ep_rew_mean`` (mean ± std over
  seeds), the greedy and the sampled (temperature 1, seeded) evaluation reward after training
  (``eval/mean_reward``, ``eval/mean_reward_sampled``: greedy decoding of a nearly uniform policy
  repeats one token and can score far below random, sampling shows what the policy does), the
  env steps to reach the task's reward threshold, wall time, env steps per second and that speed
  as a ratio to the custom PPO's; with five or more seeds also the interquartile mean with a 95%
  stratified-bootstrap interval; when the agents train on a task's ``"train"`` split
  (``--env-kwargs '{"split": "train"}'``, the default of ``reviews``, ``arithmetic2`` and
  ``translate``), two columns more: the same greedy and sampled evaluations on the held-out
  ``"test"`` prompts (``eval/test_mean_reward``, ``eval/test_mean_reward_sampled``); with
  ``--beam K``, for the custom agents (``ppo``, ``ppo-seq2seq``, ``grpo``, ``rloo``), the reward
  model's score of the top beam of beam search with K beams on every held-out prompt (every
  training prompt where none is held out), beside greedy decoding of the same prompts
  (``eval/beam_mean_reward``, ``eval/beam_greedy_mean_reward``);
- ``runs.csv``: the same figures per run;
- ``curves.png``: ``rollout/ep_rew_mean`` against env steps (mean and ±1 std band over seeds);
- ``hyperparams/<agent>.json``, ``config.json``: every setting;
- ``tb/<agent>_s<seed>_1``: the TensorBoard runs every figure above is computed from.

``ppo-seq2seq`` is the custom PPO with the encoder-decoder policy (``agents.seq2seq``), sized by
``agents.seq2seq.seq2seq_config_like`` to about the weights of ``ppo``'s decoder-only policy (the
``--ppo-config``'s ``policy``) for the env compared; its ``hyperparams/ppo-seq2seq.json`` records
its policy and both weight counts. All agents but ``sb3-recurrent-ppo`` share the Transformer architecture (SB3 through
``agents.extractor``); ``sb3-recurrent-ppo`` (sb3-contrib's ``RecurrentPPO``) sees one new token
per step, the prompt window, the last token and the step number, and carries the history in its
LSTM (``agents.recurrent``). Where the algorithms share a meaning, all share the
hyperparameters (``grpo`` and ``rloo`` take theirs from
``--agent-configs``: ``agents.grpo.GRPOConfig`` / ``RLOOConfig``, each run ``--num-envs`` rows, so
``--num-envs / group_size`` prompts per rollout); none bootstraps the value of an episode cut at
``max_new_tokens`` (its reward is already complete). Runs are sequential and interleaved by seed.

Every argument is checked before anything is written (each agent is built once, without
training, so that a setting only SB3 can check is refused at the start, not half-way). The tables
and the plot are written at the end, each file atomically; Ctrl-C writes those of the runs that
finished. ``--threads`` (default 1) sets torch's thread count: a second thread gains the built-in
policy about 1.2x on free cores, and torch's default (one per core) slows it 4-6x whenever other
processes keep the cores busy (``python scripts/benchmark.py busy``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.baselines import SB3_AGENTS, hyperparams_error
from agents.compare import CUSTOM, agents_error, custom_agent, run_comparison, save_config, summarize
from agents.ppo import PPOConfig
from agents.runtime import (
    HelpFormatter,
    add_threads_argument,
    device_error,
    json_value,
    output_dir_error,
    seed,
    set_threads,
)
from textgym.tasks import TASKS, env_arguments_error, get_task

AGENTS = (*CUSTOM, *SB3_AGENTS)
QUICK = {"agents": ["ppo", "sb3-ppo", "sb3-a2c"], "seeds": [0, 1, 2], "total_timesteps": 16_384}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--agents",
        nargs="+",
        choices=AGENTS,
        default=None,
        help="agents to compare (default: ppo sb3-ppo sb3-a2c); ppo-seq2seq is PPO with the encoder-decoder "
        "policy of about ppo's weights; sb3-recurrent-ppo sees one new token per step (the prompt, the last "
        "token, the step) and carries the history in its LSTM",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=seed, default=None, help="seeds, each 0 to 2**32-1 (default: 0 1 2)"
    )
    parser.add_argument(
        "--total-timesteps", type=int, default=None, help="env-step budget of every run (default: 50000)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"preset: {json.dumps(QUICK)}, about 90 s on a 2-core CPU with --threads 1 (the default); "
        "explicit options override it",
    )
    parser.add_argument("--task", default="default", help=f"built-in task: default, {', '.join(TASKS)}")
    parser.add_argument(
        "--env-kwargs", type=json_value, default={}, help="JSON object of further environment arguments"
    )
    parser.add_argument(
        "--num-envs",
        type=int,
        default=64,
        help="episodes in flight, the same for every agent (the SB3 agents' settings match PPO's at 64 envs; "
        "scripts/train.py runs ppo with 16 by default)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device of every agent: auto, cpu, cuda, cuda:N"
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="reward threshold (default: the task's reward_threshold)",
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=256,
        help="episodes of each greedy and each sampled evaluation",
    )
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        metavar="K",
        help="also score each custom agent's top beam of K beams (and greedy decoding) on every held-out "
        "prompt, or every training prompt where none is held out (default: off)",
    )
    parser.add_argument("--ppo-config", type=json_value, default={}, help="JSON object of PPOConfig fields")
    parser.add_argument(
        "--agent-configs",
        type=json_value,
        default={},
        help="JSON object {agent: {config field: value}} for grpo (GRPOConfig) and rloo (RLOOConfig), e.g. "
        '\'{"grpo": {"group_size": 4, "beta": 0.04}}\'',
    )
    parser.add_argument(
        "--sb3-hyperparams",
        type=json_value,
        default={},
        help='JSON object {agent: {SB3 argument: value}}, e.g. \'{"sb3-a2c": {"n_steps": 16}}\'',
    )
    parser.add_argument("--out", default=None, help="output directory (default: runs/compare_<time>)")
    parser.add_argument(
        "--summarize",
        metavar="OUT",
        default=None,
        help="only recompute the tables and plot of an earlier --out (default: run a comparison)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked (agents built once, without training) before anything is
    written; a mistake exits 2 with a usage error naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)

    preset = (
        QUICK
        if args.quick
        else {"agents": ["ppo", "sb3-ppo", "sb3-a2c"], "seeds": [0, 1, 2], "total_timesteps": 50_000}
    )
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("env_kwargs", "ppo_config", "agent_configs", "sb3_hyperparams"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    if args.beam is not None and args.beam < 1:
        parser.error(f"--beam must be >= 1 (beams per prompt), got {args.beam}")
    if args.beam is not None and args.env_kwargs.get("chat_template"):
        parser.error(
            "--beam does not support --env-kwargs chat_template=true (generation lays prompts out without it)"
        )
    if (problem := env_arguments_error(args.task, args.env_kwargs)) is not None:
        parser.error(problem)
    for name in ("total_timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if len(set(args.agents)) != len(args.agents) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--agents and --seeds must not repeat a value")
    bad = [a for a in args.sb3_hyperparams if a not in SB3_AGENTS]
    if bad or not all(isinstance(v, dict) for v in args.sb3_hyperparams.values()):
        parser.error(f"--sb3-hyperparams must map SB3 agents ({', '.join(SB3_AGENTS)}) to JSON objects")
    for agent, params in args.sb3_hyperparams.items():
        if (problem := hyperparams_error(agent, params, args.num_envs)) is not None:
            parser.error(f"--sb3-hyperparams: {problem}")
    try:
        args.ppo = PPOConfig.from_dict(args.ppo_config)
    except (TypeError, ValueError) as exc:
        parser.error(f"--ppo-config: {exc}")
    bad = [a for a in args.agent_configs if a not in ("grpo", "rloo")]
    if bad or not all(isinstance(v, dict) for v in args.agent_configs.values()):
        parser.error("--agent-configs must map grpo and rloo to JSON objects of their config fields")
    args.group = {}
    for agent, fields in args.agent_configs.items():
        try:
            args.group[agent] = custom_agent(agent, agent_configs={agent: fields})[1]
        except (TypeError, ValueError) as exc:
            parser.error(f"--agent-configs: {agent}: {exc}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        parser.error(f"--threshold must be a finite number, got {args.threshold}")
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    args.threads = 1 if args.threads is None else args.threads
    if args.summarize is not None:
        if not (Path(args.summarize) / "tb").is_dir():
            parser.error(f"--summarize: {args.summarize!r} holds no tb/ directory of a comparison")
        if (problem := output_dir_error(args.summarize, "--summarize")) is not None:
            parser.error(problem)
        return args
    if args.out is None:
        args.out = f"runs/compare_{time.strftime('%Y%m%d-%H%M%S')}"
    elif (Path(args.out) / "tb").is_dir() and any((Path(args.out) / "tb").iterdir()):
        parser.error(f"--out: {args.out!r} already holds a comparison; choose another directory")
    if (problem := output_dir_error(args.out, "--out")) is not None:
        parser.error(problem)
    set_threads(args.threads)
    problem = agents_error(
        args.agents,
        {"task": args.task, **args.env_kwargs},
        args.num_envs,
        args.device,
        args.ppo,
        args.sb3_hyperparams,
        args.group,
    )
    if problem is not None:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
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
    config = {k: v for k, v in vars(args).items() if k not in ("ppo", "group", "no_progress", "summarize")}
    resolved = {"ppo_config_resolved": args.ppo.to_dict()}
    resolved |= {
        f"{a}_config_resolved": custom_agent(a, agent_configs=args.group)[1].to_dict()
        for a in ("grpo", "rloo")
        if a in args.agents
    }
    if "ppo-seq2seq" in args.agents:
        resolved["ppo-seq2seq_config_resolved"] = custom_agent(
            "ppo-seq2seq", args.ppo, env_kwargs={"task": args.task, **args.env_kwargs}
        )[1].to_dict()
    save_config(args.out, config | {"threshold": threshold} | resolved)
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
            agent_configs=args.group,
            num_beams=args.beam,
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
