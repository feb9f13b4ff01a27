"""Train an agent on TextGen-v0 and print what it generates.

    python scripts/train.py --agent sb3-ppo                       # default task, 30k env steps
    python scripts/train.py --agent sb3-a2c --task keyword --total-timesteps 50000
    python scripts/train.py --agent sb3-ppo --env-kwargs '{"reward": {"name": "length", "target": 4}}'
    tensorboard --logdir runs

Each run writes into ``<logdir>/<agent>_<task>_s<seed>_<time>/``: ``config.json`` (every setting of
the run), the TensorBoard events (``rollout/ep_rew_mean``, ``train/...``, x axis = env steps) and the
trained model (``model.zip``, written atomically). Before training it measures the random policy's
mean episode reward, and afterwards the trained agent's, on the same evaluation episodes, and
prints sample generations. Ctrl-C stops training early and still saves the model.

Agents: ``sb3-ppo`` and ``sb3-a2c`` (Stable-Baselines3 on the batched env). The custom PPO with a
Transformer policy (``--agent ppo``) is on the roadmap in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.baselines import SB3_AGENTS, evaluate, make_sb3_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agent", choices=sorted(SB3_AGENTS), default="sb3-ppo", help="which agent to train")
    parser.add_argument(
        "--task", default="default", help="built-in task: default, sentiment, arithmetic, keyword"
    )
    parser.add_argument(
        "--env-kwargs",
        type=json.loads,
        default={},
        help="JSON object of further environment arguments, e.g. '{\"max_new_tokens\": 12}'",
    )
    parser.add_argument("--total-timesteps", type=int, default=30_000, help="env steps (tokens) to train for")
    parser.add_argument("--num-envs", type=int, default=64, help="episodes in flight in the batched env")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agent and the environment")
    parser.add_argument("--logdir", default="runs", help="parent directory of the run directory")
    parser.add_argument("--device", default="auto", help="torch device of the agent: auto, cpu, cuda")
    parser.add_argument("--eval-episodes", type=int, default=256, help="episodes of each evaluation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if not isinstance(args.env_kwargs, dict):
        parser.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    if "task" in args.env_kwargs:
        parser.error("give the task with --task, not inside --env-kwargs")
    for name in ("total_timesteps", "num_envs", "eval_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env_kwargs = {"task": args.task, **args.env_kwargs}
    run_dir = Path(args.logdir) / f"{args.agent}_{args.task}_s{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    config = {k: v for k, v in vars(args).items() if k != "no_progress"} | {"run_dir": str(run_dir)}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=repr) + "\n")
    print("config:", json.dumps(config, default=repr))

    model = make_sb3_model(args.agent, env_kwargs, args.num_envs, args.seed, args.device, str(run_dir))
    random_level = evaluate(None, env_kwargs, args.eval_episodes, args.num_envs)
    print(f"random policy: mean episode reward {random_level['mean']:.3f} ± {random_level['std']:.3f}")

    start = time.perf_counter()
    try:
        model.learn(args.total_timesteps, tb_log_name="tb", progress_bar=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted at {model.num_timesteps} env steps; saving the model")
    seconds = time.perf_counter() - start
    tmp = run_dir / "model.tmp.zip"
    model.save(tmp)
    os.replace(tmp, run_dir / "model.zip")

    def policy(obs: dict[str, np.ndarray]) -> np.ndarray:
        return model.predict(obs, deterministic=True)[0]

    trained = evaluate(policy, env_kwargs, args.eval_episodes, args.num_envs)
    print(
        f"\ntrained {args.agent}: {model.num_timesteps} env steps in {seconds:.0f} s "
        f"({model.num_timesteps / seconds:,.0f} env steps/s)"
    )
    print(
        f"mean episode reward: random {random_level['mean']:.3f} -> trained {trained['mean']:.3f} "
        f"± {trained['std']:.3f} ({trained['episodes']} episodes)"
    )
    print("\nsample generations (prompt | completion  -> reward):")
    for prompt, completion, reward in trained["samples"]:
        print(f"  {prompt} | {completion}  -> {reward:.3f}")
    print(f"\nrun directory: {run_dir}   (tensorboard --logdir {args.logdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
