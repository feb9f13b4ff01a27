"""Stable-Baselines3 agents on TextGen-v0, and one evaluation routine for every agent.

SB3 agents train on the batched environment through :class:`textgym.sb3.SB3VecEnv` (wrapped in
``VecMonitor``), so they log ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` to TensorBoard
under SB3's own tags, with env steps on the x axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm

from textgym.sb3 import make_sb3_vec_env
from textgym.vector import TextGenVectorEnv

SB3_AGENTS: dict[str, type[BaseAlgorithm]] = {"sb3-ppo": PPO, "sb3-a2c": A2C}

# Settings under which SB3 learns the default task within a few tens of thousands of env steps.
DEFAULT_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "sb3-ppo": {"n_steps": 32, "batch_size": 512, "n_epochs": 4, "learning_rate": 1e-3},
    "sb3-a2c": {"n_steps": 8, "learning_rate": 1e-3},
}


def make_sb3_model(
    agent: str,
    env_kwargs: Mapping[str, Any] | None = None,
    num_envs: int = 64,
    seed: int | None = 0,
    device: str = "auto",
    tensorboard_log: str | None = None,
    hyperparams: Mapping[str, Any] | None = None,
) -> BaseAlgorithm:
    """An SB3 model of ``agent`` (``"sb3-ppo"`` or ``"sb3-a2c"``) on the batched TextGen-v0.

    :param env_kwargs: keyword arguments of the environment (task, reward, ...).
    :param num_envs: episodes in flight.
    :param hyperparams: overrides of :data:`DEFAULT_HYPERPARAMS` passed to the SB3 constructor.
    """
    if agent not in SB3_AGENTS:
        raise ValueError(f"unknown SB3 agent {agent!r}; accepted: {', '.join(SB3_AGENTS)}")
    venv = make_sb3_vec_env(num_envs, **dict(env_kwargs or {}))
    params = {**DEFAULT_HYPERPARAMS[agent], **dict(hyperparams or {})}
    return SB3_AGENTS[agent](
        "MultiInputPolicy",
        venv,
        seed=seed,
        device=device,
        tensorboard_log=tensorboard_log,
        verbose=0,
        **params,
    )


Policy = Callable[[dict[str, np.ndarray]], np.ndarray]


def random_policy(vocab_size: int, seed: int = 0) -> Policy:
    """Uniformly random token ids: the reference level every agent must beat."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.integers(0, vocab_size, size=len(obs["input_ids"]))


def evaluate(
    policy: Policy | None,
    env_kwargs: Mapping[str, Any] | None = None,
    episodes: int = 256,
    num_envs: int = 64,
    seed: int = 10_000,
) -> dict[str, Any]:
    """Mean and std of the episode return of ``policy`` over ``episodes`` episodes.

    Each of the ``num_envs`` sub-envs contributes the same number of episodes, so short episodes
    are not over-counted. ``policy`` maps a batch of observations to a batch of token ids; None
    means the random policy. Also returns up to 8 ``(prompt, completion, reward)`` samples.
    """
    venv = TextGenVectorEnv(num_envs, autoreset_mode="same_step", **dict(env_kwargs or {}))
    if policy is None:
        policy = random_policy(venv.single_action_space.n, seed)
    per_env = -(-episodes // num_envs)  # ceil
    obs, _ = venv.reset(seed=seed)
    running, counts = np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    returns: list[float] = []
    samples: list[tuple[str, str, float]] = []
    while counts.min() < per_env:
        obs, rewards, terminated, truncated, infos = venv.step(policy(obs))
        running += rewards
        for i in np.flatnonzero(terminated | truncated):
            if counts[i] < per_env:
                returns.append(float(running[i]))
                counts[i] += 1
                if len(samples) < 8:
                    final = infos["final_info"]
                    samples.append((final["prompt"][i], final["completion"][i], float(running[i])))
            running[i] = 0.0
    venv.close()
    return {
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "episodes": len(returns),
        "samples": samples,
    }
