"""Train an agent on TextGen-v0 and print what it generates.

    python scripts/train.py                                   # custom PPO, default task, 50k env steps
    python scripts/train.py --agent ppo --task keyword --total-timesteps 100000 --device cuda
    python scripts/train.py --agent sb3-ppo --env-kwargs '{"reward": {"name": "length", "target": 4}}'
    python scripts/train.py --agent sb3-maskable-ppo --env-kwargs '{"allowed_tokens": ["great", "good", "bad"]}'
    python scripts/train.py --agent sb3-a2c --hyperparams '{"n_steps": 16}' --extractor mlp
    python scripts/train.py --task sentiment --policy-model path/to/causal_lm   # a local Hugging Face model
    python scripts/train.py --resume runs/ppo_default_s0_<time>/checkpoint.pt
    tensorboard --logdir runs

Each run writes into ``<logdir>/<agent>_<task>_s<seed>_<time>/``: ``config.json`` (every setting of
the run), TensorBoard events under Stable-Baselines3's tags (``rollout/ep_rew_mean``,
``train/approx_kl``, ...; x axis = env steps; the custom PPO also logs text samples and its
config), and the model, written atomically: ``checkpoint.pt`` for ``ppo`` (model, optimizer,
config, step, RNG and environment state), ``model.zip`` for SB3 agents. Before training the script
measures the random policy's mean episode reward and afterwards the trained agent's greedy one, on
the same evaluation episodes, and prints sample generations.

SB3 agents (``sb3-ppo``, ``sb3-a2c``, ``sb3-maskable-ppo``) use the custom agent's Transformer as
their features extractor and hyperparameters matched to ``PPOConfig``'s defaults (see
``agents.baselines``); ``--extractor mlp`` gives SB3's default MLP, ``--vec-env dummy`` trains on
SB3's ``DummyVecEnv`` of single envs instead of the batched env.

``--policy-model DIR`` (the ``textgym[hf]`` extra) makes the ``ppo`` policy a Hugging Face causal LM
saved in ``DIR`` with a value head (``agents.hf.HFPolicy``); the env reads text with the model's
tokenizer from the same directory unless ``--env-kwargs`` names another ``tokenizer``. Nothing is
downloaded: ``DIR`` is a directory written by ``save_pretrained``.

Ctrl-C stops training, saves a checkpoint (``ppo``) or the model (SB3) and flushes the logs.
``--resume CHECKPOINT`` continues a ``ppo`` run where its checkpoint left it, in the same run
directory and TensorBoard run, to the same ``--total-timesteps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.baselines import EXTRACTORS, SB3_AGENTS, VEC_ENVS, evaluate, greedy_policy, make_sb3_model
from agents.ppo import PPO, PPOConfig
from textgym.io import write_json
from textgym.tasks import env_arguments_error

AGENTS = ("ppo", *SB3_AGENTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agent", choices=AGENTS, default="ppo", help="which agent to train (default: ppo)")
    parser.add_argument(
        "--task", default="default", help="built-in task: default, sentiment, arithmetic, keyword"
    )
    parser.add_argument(
        "--env-kwargs",
        type=json.loads,
        default={},
        help="JSON object of further environment arguments, e.g. '{\"max_new_tokens\": 12}'",
    )
    parser.add_argument(
        "--ppo-config",
        type=json.loads,
        default={},
        help="JSON object of PPOConfig fields for --agent ppo, e.g. '{\"n_steps\": 64}'",
    )
    parser.add_argument(
        "--hyperparams",
        type=json.loads,
        default={},
        help="JSON object of SB3 constructor arguments for sb3-* agents, e.g. '{\"n_steps\": 16}'",
    )
    parser.add_argument(
        "--extractor", choices=EXTRACTORS, default="transformer", help="sb3-* agents: policy network"
    )
    parser.add_argument(
        "--vec-env", choices=VEC_ENVS, default="batched", help="sb3-* agents: batched env or DummyVecEnv"
    )
    parser.add_argument(
        "--init-policy",
        default=None,
        help="ppo: language-model checkpoint (scripts/pretrain.py) to start from; with kl_coef in "
        "--ppo-config it is also the frozen reference of the KL penalty",
    )
    parser.add_argument(
        "--policy-model",
        default=None,
        help="ppo: local directory of a Hugging Face causal LM to fine-tune as the policy (the hf extra); "
        "its tokenizer becomes the env's unless --env-kwargs gives one",
    )
    parser.add_argument("--total-timesteps", type=int, default=50_000, help="env steps (tokens) to train for")
    parser.add_argument("--num-envs", type=int, default=64, help="episodes in flight in the batched env")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agent and the environment")
    parser.add_argument("--logdir", default="runs", help="parent directory of the run directory")
    parser.add_argument("--device", default="auto", help="torch device of the agent: auto, cpu, cuda")
    parser.add_argument("--resume", default=None, help="checkpoint.pt of an interrupted ppo run to continue")
    parser.add_argument(
        "--checkpoint-interval",
        type=int,
        default=10,
        help="ppo: also save the checkpoint every this many updates (0: only at the end)",
    )
    parser.add_argument("--eval-episodes", type=int, default=256, help="episodes of each evaluation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ("env_kwargs", "ppo_config", "hyperparams"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    if args.policy_model is not None:
        if args.agent != "ppo" or args.resume or args.init_policy is not None:
            parser.error("--policy-model applies to a new --agent ppo run without --init-policy only")
        if not Path(args.policy_model).is_dir():
            parser.error(f"--policy-model: no directory at {args.policy_model!r} (nothing is downloaded)")
        args.env_kwargs.setdefault("tokenizer", args.policy_model)
    if (problem := env_arguments_error(args.task, args.env_kwargs)) is not None:
        parser.error(problem)
    for name in ("total_timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resume is not None and not Path(args.resume).is_file():
        parser.error(f"--resume: no checkpoint file at {args.resume!r}")
    if args.ppo_config and args.agent != "ppo":
        parser.error("--ppo-config applies to --agent ppo only")
    if args.init_policy is not None and (args.agent != "ppo" or args.resume):
        parser.error("--init-policy applies to a new --agent ppo run only")
    if args.init_policy is not None and not Path(args.init_policy).is_file():
        parser.error(f"--init-policy: no checkpoint file at {args.init_policy!r}")
    if args.agent == "ppo" and (
        args.hyperparams or args.extractor != "transformer" or args.vec_env != "batched"
    ):
        parser.error("--hyperparams, --extractor and --vec-env apply to sb3-* agents only")
    try:
        args.ppo = PPOConfig.from_dict(args.ppo_config)
    except (TypeError, ValueError) as exc:
        parser.error(f"--ppo-config: {exc}")
    return args


def make_run_dir(args: argparse.Namespace) -> Path:
    run_dir = Path(args.logdir) / f"{args.agent}_{args.task}_s{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def train_ppo(args: argparse.Namespace, env_kwargs: dict[str, Any], run_dir: Path) -> tuple[Any, Any]:
    checkpoint = run_dir / "checkpoint.pt"
    if args.resume:
        model = PPO.load(args.resume, device=args.device, tensorboard_log=run_dir)
        remaining = max(model._target_timesteps - model.num_timesteps, 0)
        print(f"resuming at {model.num_timesteps} env steps; {remaining} to go")
        reset = False
    else:
        try:
            model = PPO(
                "TextGen-v0",
                args.ppo,
                args.num_envs,
                env_kwargs,
                args.device,
                args.seed,
                run_dir,
                verbose=1,
                init_policy=args.init_policy,
                policy_model=args.policy_model,
            )
        except (ValueError, FileNotFoundError, ImportError) as exc:
            raise SystemExit(f"error: {exc}") from None
        if args.init_policy is not None:  # the checkpoint's architecture replaced --ppo-config's
            saved = json.loads((run_dir / "config.json").read_text())
            write_json(run_dir / "config.json", saved | {"ppo_config_resolved": model.config.to_dict()})
        remaining, reset = args.total_timesteps, True
    if remaining:
        model.learn(
            remaining,
            progress_bar=not args.no_progress,
            reset_num_timesteps=reset,
            checkpoint_path=checkpoint,
            checkpoint_interval=args.checkpoint_interval,
        )

    return model, greedy_policy(model)


def train_sb3(args: argparse.Namespace, env_kwargs: dict[str, Any], run_dir: Path) -> tuple[Any, Any]:
    try:
        model = make_sb3_model(
            args.agent,
            env_kwargs,
            args.num_envs,
            args.seed,
            args.device,
            str(run_dir),
            args.hyperparams,
            args.extractor,
            args.vec_env,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        model.learn(args.total_timesteps, tb_log_name="tb", log_interval=1, progress_bar=not args.no_progress)
    finally:  # also on Ctrl-C: keep what was learned
        tmp = run_dir / "model.tmp.zip"
        model.save(tmp)
        os.replace(tmp, run_dir / "model.zip")
    return model, greedy_policy(model)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:  # outside training (evaluation, set-up): nothing to save
        print("\ninterrupted")
        return 130


def run(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume).resolve().parent
        saved = json.loads((run_dir / "config.json").read_text())
        args.agent, args.task, args.env_kwargs = saved["agent"], saved["task"], saved["env_kwargs"]
    else:
        run_dir = make_run_dir(args)
        write_json(
            run_dir / "config.json",
            {k: v for k, v in vars(args).items() if k not in ("no_progress", "ppo")}
            | {"run_dir": str(run_dir)}
            # every PPOConfig field, defaults included, so the file alone describes the run
            | ({"ppo_config_resolved": args.ppo.to_dict()} if args.agent == "ppo" else {}),
        )
    env_kwargs = {"task": args.task, **args.env_kwargs}
    print(
        "run:",
        json.dumps({k: v for k, v in vars(args).items() if k not in ("no_progress", "ppo")}, default=repr),
    )

    random_level = evaluate(None, env_kwargs, args.eval_episodes, args.num_envs)
    print(f"random policy: mean episode reward {random_level['mean']:.3f} ± {random_level['std']:.3f}")
    start = time.perf_counter()
    try:
        model, policy = (train_ppo if args.agent == "ppo" else train_sb3)(args, env_kwargs, run_dir)
    except KeyboardInterrupt:
        saved_as = "checkpoint.pt" if args.agent == "ppo" else "model.zip"
        print(f"\ninterrupted: saved {run_dir / saved_as}; logs flushed")
        return 130
    seconds = time.perf_counter() - start

    trained = evaluate(policy, env_kwargs, args.eval_episodes, args.num_envs)
    print(
        f"\ntrained {args.agent}: {model.num_timesteps} env steps in {seconds:.0f} s "
        f"({model.num_timesteps / seconds:,.0f} env steps/s, evaluation excluded)"
    )
    print(
        f"mean episode reward (greedy): random {random_level['mean']:.3f} -> trained {trained['mean']:.3f} "
        f"± {trained['std']:.3f} ({trained['episodes']} episodes)"
    )
    print("\nsample generations (prompt | completion  -> reward):")
    for prompt, completion, reward in trained["samples"]:
        print(f"  {prompt} | {completion}  -> {reward:.3f}")
    print(f"\nrun directory: {run_dir}   (tensorboard --logdir {args.logdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
