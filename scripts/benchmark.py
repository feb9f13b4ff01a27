"""Benchmarks of textgym, each measured against its baseline in the same run.

    python scripts/benchmark.py env                    # env steps/s: single, sync, async, batched
    python scripts/benchmark.py env --sizes 16 256 1024 --seconds 3 --out benchmarks/env.json
    python scripts/benchmark.py rollout                # KV cache vs full recompute, 64 new tokens
    python scripts/benchmark.py decode                 # the built-in policy's KV cache vs a plain transformers loop
    python scripts/benchmark.py train                  # PPO training env steps/s
    python scripts/benchmark.py seq2seq                # PPO: decoder-only vs encoder-decoder policy, equal size
    python scripts/benchmark.py sb3                    # custom PPO vs SB3 PPO at matched settings
    python scripts/benchmark.py sb3 --max-new-tokens 8 32 64 --profile benchmarks/sb3_profile.txt
    python scripts/benchmark.py hf                     # Hugging Face GPT-2 policy vs built-in (hf extra)
    python scripts/benchmark.py busy                   # the main job idle and beside busy processes
    python scripts/benchmark.py generate               # SmolLM2: transformers generate vs the project's cache
    python scripts/benchmark.py generate --batch 8 --new-tokens 64 --threads 2 --dtype bfloat16
    python scripts/benchmark.py trl                    # SmolLM2: GRPO vs TRL's GRPOTrainer, side by side (pip install trl)
    python scripts/benchmark.py memory                 # SmolLM2: peak memory and s/iteration of PPO, per configuration
    python scripts/benchmark.py gpu                    # env, PPO training and SmolLM2 on the CPU and the GPU
    python scripts/benchmark.py ddp                    # PPO env steps/s: 1 process vs 2 (torch.distributed, gloo)

``env`` drives every face of TextGen-v0 with the same random policy and the same reward (by
default the cheap built-in ``length`` reward on the default task) and prints env steps per second,
the ratio of the batched env to SyncVectorEnv at each N, and the share of time spent decoding
finished episodes and in the reward model. ``rollout`` samples episodes of 64 new tokens with the
Transformer policy, acting through its KV cache and, as the baseline, recomputing the whole
sequence every step. ``decode`` decodes greedily with the built-in policy through its KV cache and
with a ``transformers`` GPT-2 of the same shape through a plain loop that feeds
``past_key_values`` back (both randomly initialised, same prompts), and reports tokens/s and the
ratio. ``train`` measures the custom PPO's training throughput and how its time
splits between rollouts and updates. ``seq2seq`` measures the same with the decoder-only policy and
with the encoder-decoder one of about its parameter count, alternating, the fastest of each kept. ``sb3`` trains the custom PPO and SB3 PPO with the same
Transformer, number of envs, rollout length, minibatch size and epochs, at each generation
length, and reports their env steps per second and the ratio; ``--profile`` writes a cProfile
report of the SB3 run. ``hf`` trains PPO with the built-in policy and with a randomly initialised
``transformers`` GPT-2 of the same size (built offline), acting through its KV cache and, as the
baseline, recomputing every step. ``busy`` trains the custom PPO (the main job's settings, a fixed number
of updates) on an idle machine and beside one process per core spinning in pure Python, with one
torch thread and with torch's default (one per core), each in a fresh process, and reports the
slowdown idle/busy: torch's OpenMP threads spin-wait for cores that the other processes hold.
``generate`` times greedy generation on one causal LM (SmolLM2-135M once ``scripts/get_model.py``
has fetched it, else a tiny GPT-2 built offline), same prompts and batch, by ``transformers``'
``model.generate``, by ``agents.generation.generate`` through the policy's KV cache, and by PPO's
acting loop through ``policy.make_cache``: tokens/s, median of repeats, ratio to ``generate``.
``memory`` fine-tunes the same causal LM with PPO (task ``reviews``, VADER, KL reference on,
``PPOConfig.pretrained``) in each configuration (float32, bfloat16 autocast, activation
checkpointing, micro-batches, LoRA and its combinations), each in a fresh process, and reports the
process's peak RSS (and CUDA peak on a GPU) and seconds per PPO iteration.
``gpu`` runs the same measurements on each device (by default the CPU, with torch's default threads,
and the GPU) and prints each figure and its ratio to the first device: env steps/s of the batched
env alone at N = 1,024, 4,096 and 16,384 (actions drawn on the device), PPO training env steps/s
with the built-in policy at 64 and 1,024 envs, and tokens/s of the causal LM in PPO's acting loop
and in ``generate``, in float32 and bfloat16.
``trl`` trains the project's GRPO and TRL's ``GRPOTrainer`` on the same causal LM at matched
settings (prompts x completions per step, completion length, VADER reward, KL to a reference, one
gradient step per batch, float32), each in fresh processes in alternating order, and reports
seconds per optimizer step, generated tokens per second and peak memory (``agents/benchmark_trl.py``).
``ddp`` trains PPO in one process and data-parallel in ``--processes`` processes (gloo, one thread
each, fresh processes as torchrun starts them) and reports env steps per second and the speed-up
(``agents/benchmark_ddp.py``).
Each report is saved as JSON; ``--threads`` sets the torch threads of the others (default 1; 0,
torch's default, for ``hf``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.runtime import (
    HelpFormatter,
    device_error,
    json_value,
    non_negative_int,
    output_dir_error,
    positive_int,
    set_threads,
)
from textgym.benchmark import format_env_table, run_env_benchmark
from textgym.io import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, threads: str = "1") -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        sub_parser.add_argument(
            "--threads",
            type=non_negative_int,
            default=int(threads),
            metavar="N",
            help="torch threads of the measurement; 0: torch's default, one per core (or OMP_NUM_THREADS)",
        )
        return sub_parser

    env = command("env", "env steps per second of every face of TextGen-v0")
    env.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024], help="batch sizes N")
    env.add_argument("--seconds", type=float, default=3.0, help="timed wall-clock budget per measurement")
    env.add_argument(
        "--async-max", type=int, default=16, help="largest N for AsyncVectorEnv (one process per sub-env)"
    )
    env.add_argument("--device", default="cpu", help="device of the batched env: cpu, cuda, auto")
    env.add_argument(
        "--env-kwargs",
        type=json_value,
        default=None,
        help='JSON keyword arguments of the env (default: {"reward": {"name": "length"}})',
    )
    env.add_argument("--out", default="benchmarks/env.json", help="where to save the JSON report")
    roll = command("rollout", "KV cache vs full recompute when acting")
    roll.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    roll.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per episode")
    roll.add_argument("--episodes", type=int, default=2, help="episodes per env and mode")
    roll.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    roll.add_argument("--out", default="benchmarks/rollout.json", help="where to save the JSON report")
    train = command("train", "PPO training env steps per second")
    train.add_argument("--total-timesteps", type=int, default=16_384, help="env steps to train for")
    train.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    train.add_argument("--task", default="default", help="built-in task")
    train.add_argument(
        "--ppo-config",
        type=json_value,
        default=None,
        help="JSON object of PPOConfig fields (default: PPOConfig's defaults), e.g. '{\"n_steps\": 32}'",
    )
    train.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    train.add_argument("--out", default="benchmarks/train.json", help="where to save the JSON report")
    s2s = command("seq2seq", "PPO env steps/s: decoder-only vs encoder-decoder policy of equal size")
    s2s.add_argument("--total-timesteps", type=int, default=16_384, help="env steps per run")
    s2s.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    s2s.add_argument(
        "--rounds", type=int, default=2, help="runs of each policy, alternating; the fastest kept"
    )
    s2s.add_argument("--task", default="default", help="built-in task")
    s2s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    s2s.add_argument("--out", default="benchmarks/seq2seq.json", help="where to save the JSON report")
    sb3 = command("sb3", "custom PPO vs SB3 PPO env steps/s at matched settings")
    sb3.add_argument("--total-timesteps", type=int, default=8192, help="env steps per agent and length")
    sb3.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    sb3.add_argument(
        "--max-new-tokens", type=int, nargs="+", default=[8, 32, 64], help="generation lengths to measure"
    )
    sb3.add_argument("--task", default="default", help="built-in task")
    sb3.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    sb3.add_argument(
        "--profile",
        default=None,
        help="file for a cProfile report of the SB3 run at the longest length (default: no profile)",
    )
    sb3.add_argument("--out", default="benchmarks/sb3.json", help="where to save the JSON report")
    hf = command(
        "hf", "PPO with a Hugging Face GPT-2 policy (KV cache, recompute) vs the built-in", threads="0"
    )
    hf.add_argument("--total-timesteps", type=int, default=8192, help="env steps per run and length")
    hf.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    hf.add_argument("--max-new-tokens", type=int, nargs="+", default=[8, 32], help="generation lengths")
    hf.add_argument("--task", default="sentiment", help="built-in task: its corpus trains the tokenizer")
    hf.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    hf.add_argument("--out", default="benchmarks/hf.json", help="where to save the JSON report")
    gen = command("generate", "greedy generation: transformers' generate vs the project's KV cache")
    gen.add_argument(
        "--model",
        default="smollm2-135m",
        help="a registered model (falls back to a tiny GPT-2 built offline when not on disk), a folder, "
        "or 'tiny'",
    )
    gen.add_argument("--batch", type=int, default=8, help="prompts generated together")
    gen.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (no early end)")
    gen.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="precision of the weights"
    )
    gen.add_argument(
        "--repeats", type=int, default=5, help="timed rounds of the three paths; the median is kept"
    )
    gen.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    gen.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    gen.add_argument("--out", default="benchmarks/generate.json", help="where to save the JSON report")
    dec = command("decode", "greedy decoding: the built-in policy's KV cache vs a plain transformers loop")
    dec.add_argument("--batch", type=positive_int, default=64, help="rows decoded together")
    dec.add_argument("--new-tokens", type=positive_int, default=64, help="tokens decoded per row")
    dec.add_argument(
        "--repeats", type=positive_int, default=25, help="timed rounds of both paths, alternating; the median"
    )
    dec.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    dec.add_argument("--task", default="default", help="built-in task: its prompts and vocabulary")
    dec.add_argument(
        "--compile",
        action="store_true",
        help="also the cache with its decoding step compiled (KVCache(compile=True), compiled in the warm-up; on CUDA also replayed as a CUDA graph)",
    )
    dec.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    dec.add_argument("--out", default="benchmarks/decode.json", help="where to save the JSON report")
    rid = command("reward-ids", "the env with a learned reward: scored as text, as ids, as ids without text")
    rid.add_argument("--num-envs", type=positive_int, default=64, help="episodes in flight")
    rid.add_argument("--max-new-tokens", type=positive_int, default=8, help="most tokens per episode")
    rid.add_argument("--steps", type=positive_int, default=64, help="env steps per path and round")
    rid.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds of the three paths; the median"
    )
    rid.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    rid.add_argument("--task", default="default", help="built-in task")
    rid.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    rid.add_argument("--out", default="benchmarks/reward_ids.json", help="where to save the JSON report")
    shp = command("shared-prompts", "a GRPO update with each group's prompt run once vs whole passes")
    shp.add_argument("--task", default="default", help="built-in task")
    shp.add_argument(
        "--policy",
        type=json_value,
        default=None,
        help="JSON object of PolicyConfig fields of the built-in policy (default: PolicyConfig's defaults), "
        'e.g. \'{"d_model": 256, "n_layers": 4}\'',
    )
    shp.add_argument("--num-envs", type=positive_int, default=64, help="rows of the rollout")
    shp.add_argument("--group-size", type=positive_int, default=8, help="completions per prompt")
    shp.add_argument("--repeats", type=positive_int, default=10, help="timed updates of each; the median")
    shp.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    shp.add_argument("--out", default="benchmarks/shared_prompts.json", help="where to save the JSON report")
    trl = command(
        "trl", "GRPO vs TRL's GRPOTrainer at matched settings, side by side (needs: pip install trl)"
    )
    trl.add_argument(
        "--model",
        default="smollm2-135m",
        help="a registered model (else a tiny GPT-2 built offline), or a folder",
    )
    trl.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    trl.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    trl.add_argument("--new-tokens", type=int, default=16, help="most tokens per completion")
    trl.add_argument(
        "--beta", type=float, default=0.04, help="weight of the KL to the reference (> 0: one is held)"
    )
    trl.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    trl.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps first, per run")
    trl.add_argument("--rounds", type=int, default=2, help="runs of each trainer, in alternating order")
    trl.add_argument("--device", default="cpu", help="torch device: cpu, cuda")
    trl.add_argument("--out", default="benchmarks/trl.json", help="where to save the JSON report")
    ddp = command("ddp", "PPO env steps/s: one process against data-parallel processes (gloo, CPU)")
    ddp.add_argument("--processes", type=int, default=2, help="processes of the data-parallel run")
    ddp.add_argument(
        "--num-envs",
        type=int,
        default=64,
        help="envs per process (one process alone runs this many, and all)",
    )
    ddp.add_argument("--updates", type=int, default=8, help="timed PPO updates, after one warm-up")
    ddp.add_argument("--rounds", type=int, default=3, help="rounds of the three runs; each row's median")
    ddp.add_argument("--task", default="default", help="built-in task")
    ddp.add_argument("--device", default="cpu", choices=["cpu"], help="the CPU only (gloo)")
    ddp.add_argument("--out", default="benchmarks/ddp.json", help="where to save the JSON report")
    busy = sub.add_parser(
        "busy",
        help="the main job's speed idle and beside one busy process per core, per thread setting",
        description="The main job (custom PPO, PPOConfig defaults, 64 envs, default task) idle and beside\n"
        "one process per core spinning in pure Python, for each --thread-settings value, each in a\n"
        "fresh process without OMP_NUM_THREADS; prints env steps/s and the slowdown idle/busy.",
        formatter_class=HelpFormatter,
    )
    busy.add_argument(
        "--thread-settings",
        type=non_negative_int,
        nargs="+",
        default=[1, 0],
        help="torch thread counts to measure; 0: torch's default (one per core)",
    )
    busy.add_argument(
        "--updates", type=int, default=3, help="timed PPO updates (2,048 env steps each), after one warm-up"
    )
    busy.add_argument("--num-envs", type=int, default=64, help="episodes in flight")
    busy.add_argument("--task", default="default", help="built-in task")
    busy.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    busy.add_argument(
        "--busy-processes",
        type=non_negative_int,
        default=None,
        help="spinning processes beside the main job (default: one per core)",
    )
    busy.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds before a measurement is stopped (and busy processes end)",
    )
    busy.add_argument("--out", default="benchmarks/busy.json", help="where to save the JSON report")
    gpu = command(
        "gpu",
        "the batched env, PPO training and a causal LM on each device, side by side",
        threads="0",
    )
    gpu.add_argument(
        "--devices", nargs="+", default=["cpu", "cuda"], help="devices to measure; ratios are to the first"
    )
    gpu.add_argument(
        "--env-sizes",
        type=int,
        nargs="*",
        default=[1024, 4096, 16_384],
        help="batch sizes of the env alone; none: skip the env",
    )
    gpu.add_argument(
        "--train-envs",
        type=int,
        nargs="*",
        default=[64, 1024],
        help="envs of the PPO training runs; none: skip",
    )
    gpu.add_argument(
        "--train-updates", type=int, default=2, help="timed PPO updates per run, after one untimed"
    )
    gpu.add_argument(
        "--train-configs",
        type=json_value,
        nargs="*",
        default=["{}", '{"compile_decode": true}', '{"autocast": true}'],
        metavar="JSON",
        help="JSON objects of PPOConfig fields, one PPO training run per device for each ('{}': the defaults)",
    )
    gpu.add_argument(
        "--model",
        default="smollm2-135m",
        help="causal LM: a registered model (falls back to a tiny GPT-2 built offline when not on disk), "
        "a folder, or 'tiny'",
    )
    gpu.add_argument("--lm-batch", type=int, default=32, help="prompts generated together by the LM")
    gpu.add_argument("--lm-new-tokens", type=int, default=64, help="tokens per prompt (no early end)")
    gpu.add_argument(
        "--lm-dtypes",
        nargs="*",
        choices=["float32", "bfloat16"],
        default=["float32", "bfloat16"],
        help="precisions of the LM's weights; none: skip the LM",
    )
    gpu.add_argument("--repeats", type=int, default=2, help="timed rounds per LM path; the median is kept")
    gpu.add_argument("--seconds", type=float, default=2.0, help="timed budget per env measurement")
    gpu.add_argument("--out", default="benchmarks/gpu.json", help="where to save the JSON report")
    from agents.benchmark import MEMORY_CONFIGS

    mem = command("memory", "peak memory and seconds per PPO iteration on a causal LM, per configuration")
    mem.add_argument(
        "--model",
        default="smollm2-135m",
        help="a registered model (falls back to a tiny GPT-2 built offline when not on disk), a folder, "
        "or 'tiny'",
    )
    mem.add_argument(
        "--configs",
        nargs="+",
        choices=list(MEMORY_CONFIGS),
        default=list(MEMORY_CONFIGS),
        metavar="NAME",
        help=f"configurations, each in a fresh process: {', '.join(MEMORY_CONFIGS)}",
    )
    mem.add_argument("--num-envs", type=int, default=16, help="envs of the PPO rollout")
    mem.add_argument("--n-steps", type=positive_int, default=16, help="steps per env of the PPO rollout")
    mem.add_argument("--max-new-tokens", type=int, default=16, help="tokens per completion")
    mem.add_argument("--iterations", type=positive_int, default=1, help="timed PPO iterations")
    mem.add_argument("--warmup", type=non_negative_int, default=1, help="untimed PPO iterations first")
    mem.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    mem.add_argument("--out", default="benchmarks/memory.json", help="where to save the JSON report")
    return parser


def ppo_config(parser: argparse.ArgumentParser, fields: dict[str, Any], option: str) -> Any:
    """The PPOConfig of ``fields``, or the parser's error naming ``option`` and what is wrong."""
    from agents.ppo import PPOConfig

    try:
        return PPOConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        parser.error(f"{option}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in (
        "num_envs",
        "max_new_tokens",
        "episodes",
        "total_timesteps",
        "updates",
        "batch",
        "new_tokens",
        "repeats",
        "prompts",
        "steps",
        "rounds",
        "train_updates",
        "lm_batch",
        "lm_new_tokens",
        "processes",
    ):
        if isinstance(getattr(args, name, 1), int) and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("env_kwargs", "ppo_config", "policy"):  # the JSON options (env, train, shared-prompts)
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {value!r}")
    for device in args.devices if args.command == "gpu" else [args.device]:
        if (
            problem := device_error(device, "--devices" if args.command == "gpu" else "--device")
        ) is not None:
            parser.error(problem)
    if (problem := output_dir_error(Path(args.out).parent, "--out")) is not None or Path(args.out).is_dir():
        parser.error(problem or f"--out: {args.out!r} is a directory; give a file name")
    if args.command != "busy":
        set_threads(args.threads)

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
    elif args.command == "seq2seq":
        from agents.benchmark import seq2seq_speed

        report = seq2seq_speed(args.total_timesteps, args.num_envs, args.device, args.task, args.rounds)
        print(
            f"PPO on task {args.task!r}, {args.num_envs} envs, {report['decoder']['env_steps']:,} env steps per run:"
        )
        for name in ("decoder", "seq2seq"):
            r = report[name]
            print(
                f"  {name:<8} {r['parameters']:>9,} parameters {r['env_steps_per_second']:>9,.0f} env steps/s "
                f"({r['rollout_share']:.0%} rollouts, {r['update_share']:.0%} updates)"
            )
        print(f"  seq2seq / decoder: {report['ratio']:.2f}x")
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
    elif args.command == "gpu":
        from agents.benchmark import format_gpu_table, gpu_benchmark

        if any(n < 1 for n in [*args.env_sizes, *args.train_envs]):
            parser.error(
                f"--env-sizes and --train-envs must be positive, got {args.env_sizes} {args.train_envs}"
            )
        if not args.seconds > 0:
            parser.error(f"--seconds must be > 0, got {args.seconds}")
        if not (args.env_sizes or args.train_envs or args.lm_dtypes):
            parser.error("--env-sizes, --train-envs and --lm-dtypes are all empty: nothing to measure")
        # argparse leaves the default's strings as they are
        args.train_configs = [json.loads(c) if isinstance(c, str) else c for c in args.train_configs]
        for fields in args.train_configs:
            if not isinstance(fields, dict):
                parser.error(f"--train-configs takes JSON objects of PPOConfig fields, got {fields!r}")
            ppo_config(parser, fields, f"--train-configs: {json.dumps(fields)}")
        try:
            report = gpu_benchmark(
                args.devices,
                args.env_sizes,
                args.train_envs,
                args.train_updates,
                args.train_configs,
                args.model,
                args.lm_batch,
                args.lm_new_tokens,
                args.lm_dtypes,
                args.repeats,
                args.seconds,
            )
        except FileNotFoundError as error:
            parser.error(str(error))
        print()
        print(format_gpu_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "generate":
        from agents.benchmark import format_generate_table, generate_speed

        try:
            report = generate_speed(
                args.model, args.batch, args.new_tokens, args.dtype, args.repeats, args.warmup, args.device
            )
        except FileNotFoundError as error:
            parser.error(str(error))
        print(format_generate_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "decode":
        from agents.benchmark import decode_speed, format_decode_table

        report = decode_speed(
            args.batch, args.new_tokens, args.repeats, args.warmup, args.device, args.task, args.compile
        )
        print(format_decode_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "reward-ids":
        from agents.benchmark import format_reward_path_table, reward_path_speed

        report = reward_path_speed(
            args.num_envs, args.max_new_tokens, args.steps, args.repeats, args.warmup, args.device, args.task
        )
        print(format_reward_path_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "shared-prompts":
        from agents.benchmark import shared_prompt_speed

        if args.num_envs % args.group_size:
            parser.error(f"--num-envs {args.num_envs} must be a multiple of --group-size {args.group_size}")
        from agents.policy import PolicyConfig

        try:
            PolicyConfig(**(args.policy or {}))
        except (TypeError, ValueError) as error:
            parser.error(f"--policy: {error}")
        report = shared_prompt_speed(
            args.task, args.policy, args.num_envs, args.group_size, args.repeats, args.device
        )
        times = report["update_seconds"]
        print(
            f"GRPO update, task {args.task}, {report['mean_prompt_tokens']:.1f} prompt and "
            f"{report['mean_completion_tokens']:.1f} completion tokens on average: shared prompts "
            f"{times['shared']['median'] * 1e3:.1f} ms, whole passes {times['whole']['median'] * 1e3:.1f} ms "
            f"(median of {args.repeats}): {report['speedup']:.2f}x"
        )
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "trl":
        from agents.benchmark_trl import format_trl_table, grpo_vs_trl

        if args.group_size < 2:
            parser.error(
                f"--group-size must be >= 2 (GRPO judges each completion against the others), got {args.group_size}"
            )
        if not args.beta >= 0:
            parser.error(f"--beta must be >= 0, got {args.beta}")
        try:
            report = grpo_vs_trl(
                args.model,
                args.prompts,
                args.group_size,
                args.new_tokens,
                args.beta,
                steps=args.steps,
                warmup=args.warmup,
                rounds=args.rounds,
                threads=args.threads,
                device=args.device,
            )
        except (ImportError, FileNotFoundError) as error:
            parser.error(str(error))
        print(format_trl_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "ddp":
        from agents.benchmark_ddp import ddp_speed, format_ddp_table

        report = ddp_speed(args.processes, args.num_envs, args.updates, args.task, args.rounds)
        print(format_ddp_table(report))
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "busy":
        from agents.benchmark import busy_speed

        report = busy_speed(
            args.thread_settings,
            args.updates,
            args.num_envs,
            args.task,
            args.device,
            args.busy_processes,
            args.timeout,
        )
        print(
            f"\nmain job (custom PPO, {args.num_envs} envs, task {args.task!r}, {args.updates} updates) on "
            f"{report['cores']} cores, beside {report['busy_processes']} busy processes:"
        )
        print(f"{'threads':>16} {'idle':>10} {'busy':>10} {'slowdown':>9}")
        for r in report["runs"]:
            name = (
                str(r["threads_setting"]) if r["threads_setting"] else f"0 ({r.get('threads', '?')}, torch)"
            )

            def cell(value: float | None) -> str:
                return "timed out" if value is None else f"{value:,.0f}"

            slowdown = "–" if r["slowdown"] is None else f"{r['slowdown']:.2f}x"
            print(
                f"{name:>16} {cell(r['idle_env_steps_per_second']):>10} "
                f"{cell(r['busy_env_steps_per_second']):>10} {slowdown:>9}"
            )
        print("(env steps per second; slowdown = idle / busy)")
        print(f"saved {write_json(args.out, report)}")
    elif args.command == "memory":
        from agents.benchmark import format_memory_table, memory_benchmark

        try:
            report = memory_benchmark(
                args.model,
                args.configs,
                args.num_envs,
                args.n_steps,
                args.max_new_tokens,
                args.iterations,
                args.warmup,
                args.device,
                args.threads,
            )
        except FileNotFoundError as error:
            parser.error(str(error))
        print(format_memory_table(report))
        print(f"saved {write_json(args.out, report)}")
    else:
        from agents.benchmark import training_speed

        config = ppo_config(parser, args.ppo_config or {}, "--ppo-config")
        report = training_speed(args.total_timesteps, args.num_envs, args.device, args.task, config)
        print(
            f"PPO training on {report['device']}: {report['env_steps_per_second']:,.0f} env steps/s "
            f"(rollouts {report['rollout_share']:.0%}, updates {report['update_share']:.0%}); "
            f"final ep_rew_mean {report['final_ep_rew_mean']:.3f}"
        )
        print(f"saved {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
