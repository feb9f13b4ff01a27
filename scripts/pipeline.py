"""The language-model pipeline end to end: pretrain -> PPO with a KL penalty (and without) -> compare.

    python scripts/pipeline.py                                  # sentiment task: about 1 minute on a 2-core CPU, one thread
    python scripts/pipeline.py --total-timesteps 100000 --kl-target 3 --device cuda
    python scripts/pipeline.py --reward runs/reward_sentiment_s0_<time>/reward.pt   # a learned reward model
    python scripts/pipeline.py --backbone hf                    # the same with a Hugging Face GPT-2 (hf extra)
    tensorboard --logdir runs/pipeline_<time>

1. Pretrain the Transformer policy on the task's built-in corpus (``scripts/pretrain.py``'s code).
2. From that checkpoint, PPO *with* the KL penalty to the frozen pretrained policy (adaptive β
   towards ``--kl-target`` nats per episode, Ziegler et al. 2019), and PPO *without* it, at the
   same budget and seed. Both log ``rollout/ep_rew_mean``; the first also ``train/kl_ref`` and
   ``train/kl_coef``.
3. Sample completions (temperature 1) from the pretrained policy and both fine-tuned ones on the
   same evaluation episodes, and measure each one's mean episode reward and its KL to the
   pretrained policy (the exact per-token KL summed over the episode).

``--backbone hf`` (the ``textgym[hf]`` extra) runs the same steps on Hugging Face models, built
offline: a byte-level BPE tokenizer trained on the corpus and a small randomly initialised
``transformers`` GPT-2 (``agents.hf.tiny_causal_lm``), pretrained through ``agents.hf.HFPolicy``
and saved with ``save_pretrained`` in ``lm/``; PPO then fine-tunes it as ``policy_model``.

Writes into ``--out`` (default ``runs/pipeline_<time>``): ``lm.pt``, ``ppo_kl/`` and ``ppo_no_kl/``
(checkpoints and TensorBoard runs), ``pretrain/`` (TensorBoard), ``results.md`` and
``results.json`` (the table and the samples), the last two only once every step has finished,
each written atomically. Every argument is checked before anything is written. ``--threads``
defaults to 1 (see ``agents.runtime``: more threads than free cores spin-wait).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

from agents.lm import PretrainConfig, pretrain, sample_with_kl, save_lm
from agents.ppo import PPO, PPOConfig
from agents.runtime import (
    HelpFormatter,
    add_threads_argument,
    device_error,
    make_dir,
    new_run_dir,
    seed,
    set_threads,
)
from textgym.io import write_json, write_text
from textgym.tasks import env_arguments_error, get_task, make_env_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--task", default="sentiment", help="built-in task: its corpus, prompts and reward")
    parser.add_argument(
        "--reward",
        default=None,
        help="reward model instead of the task's: a name or a reward.pt (default: the task's reward)",
    )
    parser.add_argument(
        "--backbone",
        choices=("textgym", "hf"),
        default="textgym",
        help="the built-in Transformer, or a Hugging Face GPT-2 and BPE tokenizer built offline (hf extra)",
    )
    parser.add_argument(
        "--hf-vocab-size", type=int, default=1024, help="--backbone hf: size of the BPE vocabulary"
    )
    parser.add_argument("--pretrain-steps", type=int, default=600, help="pretraining optimizer steps")
    parser.add_argument("--total-timesteps", type=int, default=40_000, help="env steps of each PPO run")
    parser.add_argument("--kl-coef", type=float, default=0.1, help="starting β of the KL penalty")
    parser.add_argument(
        "--kl-target", type=float, default=2.0, help="target KL per episode (nats); 0: fixed β"
    )
    parser.add_argument(
        "--num-envs", type=int, default=64, help="episodes in flight in each PPO run and in the evaluation"
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=512, help="evaluation episodes of each policy (temperature 1)"
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of pretraining, both PPO runs and the evaluation, 0 to 2**32-1",
    )
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    add_threads_argument(parser)
    parser.add_argument(
        "--out", default=None, help="output directory, new or empty (default: runs/pipeline_<time>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before anything is written (exit 2 naming the option)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.env_kwargs = {} if args.reward is None else {"reward": args.reward}
    if (problem := env_arguments_error(args.task, args.env_kwargs)) is not None:
        parser.error(problem.replace("--env-kwargs", "--reward"))
    if args.hf_vocab_size <= 257:
        parser.error(
            f"--hf-vocab-size must be above 257 (256 bytes and the end token), got {args.hf_vocab_size}"
        )
    if args.backbone == "hf":
        missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            parser.error(
                f"--backbone hf needs the hf extra (missing: {', '.join(missing)}): pip install 'textgym[hf]'"
            )
    for name in ("pretrain_steps", "total_timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.kl_coef < float("inf") or not 0 <= args.kl_target < float("inf"):
        parser.error(
            f"--kl-coef must be a finite number > 0 and --kl-target one >= 0, got {args.kl_coef} and {args.kl_target}"
        )
    try:
        PPOConfig(kl_coef=args.kl_coef, kl_target=args.kl_target or None)
        PretrainConfig(steps=args.pretrain_steps)
    except ValueError as exc:
        parser.error(str(exc))
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    args.threads = 1 if args.threads is None else args.threads
    args.out, problem = new_run_dir(args.out, "pipeline")
    if problem is not None:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    out, env_kwargs = args.out, {"task": args.task, **args.env_kwargs}
    env = make_env_config(**env_kwargs)
    make_dir(out, "--out", exist_ok=True)
    write_json(out / "config.json", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    progress = not args.no_progress

    print(
        f"1/3 pretraining on the {args.task} corpus ({args.pretrain_steps} steps, {args.backbone} backbone)"
    )
    corpus = get_task(args.task).corpus
    pretrain_config = PretrainConfig(steps=args.pretrain_steps, max_len=max(64, env.seq_len))
    policy = None
    if args.backbone == "hf":
        from agents.hf import HFPolicy, tiny_causal_lm
        from textgym.hf import HFTokenizer, train_bpe_tokenizer

        hf_tokenizer = train_bpe_tokenizer([*corpus, *env.prompts], args.hf_vocab_size)
        env_kwargs["tokenizer"] = str(out / "lm")
        env = make_env_config(**{**env_kwargs, "tokenizer": HFTokenizer(hf_tokenizer)})
        pretrain_config = PretrainConfig(steps=args.pretrain_steps, max_len=max(64, env.seq_len))
        model = tiny_causal_lm(hf_tokenizer, max_positions=pretrain_config.max_len)
        policy = HFPolicy(model, env.tokenizer, pretrain_config.max_len)
    lm, report = pretrain(
        corpus,
        env.tokenizer,
        pretrain_config,
        device=args.device,
        seed=args.seed,
        tensorboard_log=out / "pretrain",
        progress_bar=progress,
        samples_from=list(env.prompts[:4]),
        policy=policy,
    )
    if args.backbone == "hf":
        lm_path = lm.save_pretrained(out / "lm")
        start: dict[str, Any] = {"policy_model": lm_path}
    else:
        lm_path = save_lm(out / "lm.pt", lm, env.tokenizer, {"task": env.task, **report})
        start = {"init_policy": lm_path}
    print(
        f"   held-out perplexity {report['initial_val_perplexity']:.1f} -> {report['final_val_perplexity']:.2f}"
    )

    runs = {
        "ppo_kl": PPOConfig(kl_coef=args.kl_coef, kl_target=args.kl_target or None),
        "ppo_no_kl": PPOConfig(),
    }
    models = {}
    for i, (name, config) in enumerate(runs.items(), 2):
        print(
            f"{i}/3 PPO {'with' if config.kl_coef else 'without'} the KL penalty, {args.total_timesteps:,} env steps"
        )
        model = PPO(
            "TextGen-v0",
            config,
            args.num_envs,
            env_kwargs,
            args.device,
            args.seed,
            out / name,
            **start,
        )
        model.learn(args.total_timesteps, progress_bar=progress, checkpoint_path=out / name / "checkpoint.pt")
        models[name] = model

    reference = copy.deepcopy(models["ppo_kl"].reference)  # the frozen pretrained policy
    rows, results = [], {}
    for name, policy in (("pretrained", reference), *((n, m.policy) for n, m in models.items())):
        stats = sample_with_kl(
            policy, reference, env_kwargs, args.eval_episodes, args.num_envs, seed=10_000 + args.seed
        )
        results[name] = stats
        rows.append(
            f"| {name} | {stats['reward_mean']:.3f} ± {stats['reward_std']:.3f} | {stats['kl_mean']:.2f} | "
            + "<br>".join(f"{p} **{c}**" for p, c, _ in stats["samples"][:3])
            + " |"
        )
    kl_model = models["ppo_kl"]
    table = (
        "| policy | mean episode reward | KL to pretrained (nats/episode) | samples (temperature 1) |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    final = (
        f"\nPPO with KL: final train/kl_ref {kl_model.last_stats.get('train/kl_ref', float('nan')):.2f} "
        f"(target {args.kl_target}), train/kl_coef {kl_model.kl.value:.4f}\n"
    )
    # The results, each written whole (atomically), only once every step has finished.
    write_text(out / "results.md", table + final)
    write_json(
        out / "results.json", {"pretrain": report, "evaluation": results, "kl_coef_final": kl_model.kl.value}
    )
    print()
    print(table + final)
    print(f"written: {out}/results.md, results.json; tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted")
        sys.exit(130)
