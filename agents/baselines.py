"""Stable-Baselines3 agents on TextGen-v0, and one evaluation routine for every agent.

SB3 agents train on the batched environment through :class:`textgym.sb3.SB3VecEnv` (or, for
reference, on SB3's ``DummyVecEnv`` of single ``gym.make("TextGen-v0")`` envs), wrapped in
``VecMonitor``, so they log ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean`` to TensorBoard
under SB3's own tags, with env steps on the x axis.

By default their policy is the custom agent's Transformer (:mod:`agents.extractor`) with linear
heads, and their hyperparameters match :class:`agents.ppo.PPOConfig`'s defaults where the two
algorithms share a meaning (rollout length, minibatch size in transitions, epochs, learning rate
and its linear annealing, discount, GAE, clipping, entropy and value coefficients, gradient
clipping). ``extractor="mlp"`` gives SB3's default ``MultiInputPolicy`` instead (an MLP on the
token ids read as numbers).

``sb3-recurrent-ppo`` (sb3-contrib's ``RecurrentPPO``, an ``MlpLstmPolicy``) is the exception: it
sees one new token per step, ``[prompt ids, last token, step]``, and carries the rest of the
history in its LSTM (:mod:`agents.recurrent`), so ``extractor`` does not apply to it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from agents.extractor import MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from agents.recurrent import LastTokenVecEnv, TokenEmbeddingExtractor, recurrent_policy
from textgym.checks import is_positive_int, is_real
from textgym.sb3 import make_sb3_vec_env
from textgym.vector import TextGenVectorEnv

SB3_AGENTS: dict[str, type[BaseAlgorithm]] = {
    "sb3-ppo": PPO,
    "sb3-a2c": A2C,
    "sb3-maskable-ppo": MaskablePPO,
    "sb3-recurrent-ppo": RecurrentPPO,
}
EXTRACTORS = ("transformer", "mlp")
VEC_ENVS = ("batched", "dummy")

_PPO_MATCHED = {  # PPOConfig's defaults, with 64 envs: 32 x 64 = 2048 transitions, 4 minibatches
    "n_steps": 32,
    "batch_size": 512,
    "n_epochs": 4,
    "learning_rate": "lin_1e-3",
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
}
DEFAULT_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "sb3-ppo": dict(_PPO_MATCHED),
    "sb3-maskable-ppo": dict(_PPO_MATCHED),
    # The LSTM policy's own sizes are SB3's defaults (lstm_hidden_size 256); policy_kwargs may
    # change them, and features_extractor_kwargs={"embed_dim": ...} the token embeddings.
    "sb3-recurrent-ppo": dict(_PPO_MATCHED),
    # A2C: one gradient step per 8 x 64 transitions, with PPO's discount, GAE and coefficients.
    "sb3-a2c": {
        "n_steps": 8,
        "learning_rate": "lin_1e-3",
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "ent_coef": 0.01,
        "vf_coef": 0.5,
        "max_grad_norm": 0.5,
    },
}


def learning_rate(value: float | str) -> float | Callable[[float], float]:
    """A number, or ``"lin_<x>"``: linear decay from x to 0 over training (as the custom PPO's
    ``anneal_lr``), in SB3's schedule form (a function of the remaining progress, 1 -> 0)."""
    if isinstance(value, str):
        if not value.startswith("lin_"):
            raise ValueError(f"learning_rate must be a number or 'lin_<number>', got {value!r}")
        try:
            start = float(value[4:])
        except ValueError:
            raise ValueError(f"learning_rate must be a number or 'lin_<number>', got {value!r}") from None
        return _Linear(start)
    return value


class _Linear:
    """Picklable linear schedule (SB3 saves the schedule with the model)."""

    def __init__(self, start: float):
        self.start = start

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.start

    def __repr__(self) -> str:
        return f"lin_{self.start}"


# The arguments make_sb3_model sets itself, from the script's own options.
_SET_BY_CALLER = {"seed": "--seed", "device": "--device", "tensorboard_log": "--logdir", "verbose": None}
_NOT_FROM_JSON = {"_init_setup_model", "rollout_buffer_class"}


def hyperparams_error(agent: str, hyperparams: Mapping[str, Any] | None, num_envs: int = 64) -> str | None:
    """Why ``hyperparams`` (overrides of :data:`DEFAULT_HYPERPARAMS`) cannot build ``agent`` with
    ``num_envs`` envs, or None: an argument the SB3 class does not take, one the caller sets
    (seed, device, ...), or a value SB3 would reject with an ``AssertionError`` or only fail on
    later in training (a non-positive ``n_steps``, ``batch_size`` below 2, ``gamma`` outside
    [0, 1], ...). What this cannot see (``policy_kwargs`` contents) :func:`make_sb3_model` reports
    as a ValueError."""
    if agent not in SB3_AGENTS:
        return f"unknown SB3 agent {agent!r}; accepted: {', '.join(SB3_AGENTS)}"
    if not isinstance(hyperparams, Mapping):
        return f"{agent}: hyperparameters must be a JSON object, got {hyperparams!r}"
    accepted = set(inspect.signature(SB3_AGENTS[agent].__init__).parameters) - {"self", "policy", "env"}
    accepted -= _NOT_FROM_JSON
    if unknown := sorted(set(hyperparams) - accepted):
        return (
            f"{agent}: bad hyperparameters {dict(hyperparams)}: {SB3_AGENTS[agent].__name__} has no "
            f"argument(s) {unknown}; accepted: {sorted(accepted - set(_SET_BY_CALLER))}"
        )
    if own := sorted(set(hyperparams) & set(_SET_BY_CALLER)):
        options = ", ".join(f"{k} ({_SET_BY_CALLER[k] or 'fixed'})" for k in own)
        return f"{agent}: bad hyperparameters: set by the script's own options, not here: {options}"
    params = {**DEFAULT_HYPERPARAMS[agent], **dict(hyperparams)}
    problems = []

    def check(name: str, ok: Callable[[Any], bool], accepted: str) -> None:
        if name in params and not ok(params[name]):
            problems.append(f"{name} must be {accepted}, got {params[name]!r}")

    def number_in(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
        return lambda v: is_real(v) and (low < v if low_open else low <= v) and v <= high

    def positive_or_none(v: Any) -> bool:
        return v is None or (is_real(v) and 0 < v < math.inf)

    def rate(v: Any) -> bool:
        try:
            value = learning_rate(v)
        except ValueError:
            return False
        if isinstance(value, _Linear):
            return 0 < value.start < math.inf
        return is_real(value) and 0 < value < math.inf

    for name in ("n_steps", "n_epochs", "batch_size", "stats_window_size"):
        check(name, is_positive_int, "a positive integer")
    check("sde_sample_freq", lambda v: is_real(v) and v == int(v), "an integer (-1: only at the start)")
    check("gamma", number_in(0, 1), "a number in [0, 1]")
    check("gae_lambda", number_in(0, 1), "a number in [0, 1]")
    check("learning_rate", rate, "a positive number or 'lin_<positive number>'")
    for name in ("clip_range", "max_grad_norm", "rms_prop_eps"):
        check(name, number_in(0, math.inf, low_open=True), "a positive number")
    for name in ("clip_range_vf", "target_kl"):
        check(name, positive_or_none, "null or a positive number")
    for name in ("ent_coef", "vf_coef"):
        check(name, lambda v: is_real(v) and 0 <= v < math.inf, "a finite number >= 0")
    for name in ("normalize_advantage", "use_sde", "use_rms_prop"):
        check(name, lambda v: isinstance(v, bool), "true or false")
    check("policy_kwargs", lambda v: isinstance(v, Mapping), "a JSON object")
    check("rollout_buffer_kwargs", lambda v: isinstance(v, Mapping), "a JSON object")
    normalize = params.get("normalize_advantage", agent != "sb3-a2c")
    if not problems and normalize and agent != "sb3-a2c":
        # SB3 asserts both (the advantages of a minibatch are normalised by their std).
        if params.get("batch_size", 64) < 2:
            problems.append(f"batch_size must be >= 2 with normalize_advantage, got {params['batch_size']}")
        elif params.get("n_steps", 2048) * num_envs < 2:
            problems.append(f"n_steps x num_envs must be >= 2, got {params.get('n_steps')} x {num_envs}")
    if problems:
        return f"{agent}: bad hyperparameters: " + "; ".join(problems)
    return None


def make_sb3_vec_env_for(
    num_envs: int,
    env_kwargs: Mapping[str, Any] | None = None,
    vec_env: str = "batched",
    bootstrap_truncated: bool = False,
) -> VecEnv:
    """The SB3 ``VecEnv`` an agent trains on: the batched env through the adapter, or
    ``DummyVecEnv`` over ``num_envs`` copies of ``gym.make("TextGen-v0")``; in ``VecMonitor``.

    :param bootstrap_truncated: whether SB3 bootstraps episodes cut at ``max_new_tokens``
        (see :class:`textgym.sb3.SB3VecEnv`). ``False`` matches the custom PPO's default.
    """
    kwargs = dict(env_kwargs or {})
    if vec_env == "batched":
        return make_sb3_vec_env(num_envs, bootstrap_truncated=bootstrap_truncated, **kwargs)
    if vec_env == "dummy":

        def make() -> gym.Env:
            env = gym.make("TextGen-v0", **kwargs)
            return env if bootstrap_truncated else _TruncationAsTermination(env)

        return VecMonitor(DummyVecEnv([make] * num_envs))
    raise ValueError(f"vec_env must be one of {', '.join(VEC_ENVS)}, got {vec_env!r}")


class _TruncationAsTermination(gym.Wrapper):
    """Report the ``max_new_tokens`` cut as a termination: its return is already complete."""

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated or truncated, False, info

    def action_masks(self) -> np.ndarray:
        return self.env.get_wrapper_attr("action_masks")()


def make_sb3_model(
    agent: str,
    env_kwargs: Mapping[str, Any] | None = None,
    num_envs: int = 64,
    seed: int | None = 0,
    device: str = "auto",
    tensorboard_log: str | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    extractor: str = "transformer",
    vec_env: str = "batched",
    bootstrap_truncated: bool = False,
) -> BaseAlgorithm:
    """An SB3 model of ``agent`` (see :data:`SB3_AGENTS`) on TextGen-v0.

    :param env_kwargs: keyword arguments of the environment (task, reward, ...).
    :param num_envs: episodes in flight.
    :param hyperparams: overrides of :data:`DEFAULT_HYPERPARAMS` passed to the SB3 constructor;
        ``policy_kwargs`` may hold :class:`~agents.policy.PolicyConfig` fields (``d_model``, ...).
        ``learning_rate`` may be ``"lin_<x>"`` (linear decay).
    :param extractor: ``"transformer"`` (the custom agent's architecture) or ``"mlp"`` (SB3's
        default ``MultiInputPolicy``). ``sb3-recurrent-ppo`` takes neither: its policy is always the
        LSTM over one new token per step of :mod:`agents.recurrent` (``"mlp"`` is refused,
        ``"transformer"``, the default, ignored).
    :param vec_env: ``"batched"`` (the batched env through the SB3 adapter) or ``"dummy"``.
    :param bootstrap_truncated: see :func:`make_sb3_vec_env_for`.
    """
    if agent not in SB3_AGENTS:
        raise ValueError(f"unknown SB3 agent {agent!r}; accepted: {', '.join(SB3_AGENTS)}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {', '.join(EXTRACTORS)}, got {extractor!r}")
    if agent == "sb3-recurrent-ppo" and extractor != "transformer":  # "transformer": left at the default
        raise ValueError(
            f"extractor={extractor!r} does not apply to sb3-recurrent-ppo, whose policy is always an LSTM over "
            "one new token per step (agents.recurrent); extractors apply to sb3-ppo, sb3-a2c, sb3-maskable-ppo"
        )
    if (problem := hyperparams_error(agent, dict(hyperparams or {}), num_envs)) is not None:
        raise ValueError(problem)
    # A deep copy: SB3 writes into policy_kwargs (A2C adds its optimizer), and the caller's dict
    # must not carry that into the next model.
    params = copy.deepcopy({**DEFAULT_HYPERPARAMS[agent], **dict(hyperparams or {})})
    if "learning_rate" in params:
        params["learning_rate"] = learning_rate(params["learning_rate"])
    venv = make_sb3_vec_env_for(num_envs, env_kwargs, vec_env, bootstrap_truncated)
    policy: Any
    if agent == "sb3-recurrent-ppo":
        venv = LastTokenVecEnv(venv)
        policy = "MlpLstmPolicy"
        params["policy_kwargs"] = {
            "features_extractor_class": TokenEmbeddingExtractor,
            **params.get("policy_kwargs", {}),
        }
    elif extractor == "mlp":
        policy = "MultiInputPolicy"
    else:
        policy = (
            MaskableTransformerActorCriticPolicy
            if agent == "sb3-maskable-ppo"
            else TransformerActorCriticPolicy
        )
    try:
        return SB3_AGENTS[agent](
            policy, venv, seed=seed, device=device, tensorboard_log=tensorboard_log, verbose=0, **params
        )
    except (TypeError, ValueError, AssertionError) as exc:  # SB3 asserts on some of its arguments
        venv.close()
        raise ValueError(f"{agent}: bad hyperparameters {dict(hyperparams or {})}: {exc}") from exc


Policy = Callable[[dict[str, np.ndarray]], np.ndarray]


def greedy_policy(model: Any) -> Policy:
    """``model``'s (an SB3 model's or :class:`agents.ppo.PPO`'s) deterministic policy as a function
    of a batch of observations, for :func:`evaluate`. MaskablePPO gets the env's action mask, as it had in training (the custom
    PPO applies its own mask inside ``predict``); RecurrentPPO its one-token observation and its LSTM
    state (:func:`agents.recurrent.recurrent_policy`)."""
    return model_policy(model, deterministic=True)


def sampled_policy(model: Any) -> Policy:
    """``model``'s stochastic policy (actions sampled at temperature 1, ``predict(deterministic=False)``),
    with the same handling of masks and LSTM state as :func:`greedy_policy`. The samples come from
    torch's global generator: :func:`evaluate_sampled` seeds it for a reproducible evaluation.

    Greedy decoding of a nearly uniform policy repeats its one most likely token, which a reward of
    diversity or overlap (chrF) can score far below the random policy; the sampled evaluation is
    what the policy actually does, and for an untrained policy it sits at the random level."""
    return model_policy(model, deterministic=False)


def model_policy(model: Any, deterministic: bool) -> Policy:
    """``model``'s greedy (``deterministic``) or sampled policy: see :func:`greedy_policy`."""
    if isinstance(model, RecurrentPPO):
        return recurrent_policy(model, deterministic=deterministic)
    if isinstance(model, MaskablePPO):
        mask = np.asarray(model.get_env().env_method("action_masks", indices=[0])[0], dtype=bool)

        def masked(obs: dict[str, np.ndarray]) -> np.ndarray:
            masks = np.tile(mask, (len(obs["input_ids"]), 1))
            return model.predict(obs, deterministic=deterministic, action_masks=masks)[0]

        return masked
    return lambda obs: model.predict(obs, deterministic=deterministic)[0]


def evaluate_sampled(
    model: Any,
    env_kwargs: Mapping[str, Any] | None = None,
    episodes: int = 256,
    num_envs: int = 64,
    seed: int = 10_000,
) -> dict[str, Any]:
    """:func:`evaluate` of ``model``'s :func:`sampled_policy`, with torch's generator seeded by
    ``seed`` for the evaluation and restored after it (training's random stream is left as it
    was). None is the random policy, whose greedy and sampled evaluations are one and the same."""
    import torch

    if model is None:
        return evaluate(None, env_kwargs, episodes, num_envs, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return evaluate(sampled_policy(model), env_kwargs, episodes, num_envs, seed)


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
                if len(samples) < 8 and "completion" in infos["final_info"]:  # absent with text_infos=False
                    final = infos["final_info"]
                    samples.append((final["prompt"][i], final["completion"][i], float(running[i])))
            running[i] = 0.0
    reward_name = getattr(venv.config.reward, "name", None)
    venv.close()
    return {
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "episodes": len(returns),
        "samples": samples,
        "reward_name": reward_name,
    }


def sb3_hyperparameters(agent: str, hyperparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every constructor argument :func:`make_sb3_model` gives ``agent``: the defaults of
    :data:`DEFAULT_HYPERPARAMS` with ``hyperparams`` over them, as JSON-ready data."""
    return {**DEFAULT_HYPERPARAMS[agent], **dict(hyperparams or {})}


def repeated_word(samples: Sequence[tuple[str, str, float]], share: float = 0.5) -> str | None:
    """The word that most completions of ``samples`` are mostly made of, if they are degenerate:
    in at least three quarters of the samples of three words or more, one word makes up at least
    ``share`` of the words and it is the same word in most of them; else None."""
    tops = []
    for _, completion, _ in samples:
        words = completion.split()
        if len(words) >= 3:
            word, count = Counter(words).most_common(1)[0]
            if count >= share * len(words):
                tops.append(word)
    if not samples or len(tops) < 0.75 * len(samples):
        return None
    word, count = Counter(tops).most_common(1)[0]
    return word if count >= 0.5 * len(samples) else None


def log_evaluation(
    tb_dir: str | Path,
    step: int,
    random_level: Mapping[str, Any],
    trained: Mapping[str, Any],
    run_config: Mapping[str, Any],
    hparams: Mapping[str, Any],
    agent_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a run's evaluation into its TensorBoard directory ``tb_dir`` (beside its training
    curves): scalars ``eval/mean_reward`` (the trained agent's greedy evaluation, at ``step``) and
    ``eval/mean_reward_random`` (the random policy on the same episodes, at step 0); text
    ``eval/samples`` (the evaluation's samples as a table), ``run/config`` (``run_config``) and,
    when given, ``config`` (the agent's hyperparameters, the tag under which the custom PPO logs
    its own); and an HParams entry of ``hparams`` with ``eval/mean_reward`` as its metric
    (TensorBoard's HPARAMS tab). Values of ``hparams`` that are not numbers, strings or booleans
    are written as JSON."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    def text(value: Any) -> str:
        return f"```\n{json.dumps(value, indent=2, default=repr)}\n```"

    writer = SummaryWriter(str(tb_dir))
    try:
        writer.add_scalar("eval/mean_reward_random", random_level["mean"], 0)
        writer.add_scalar("eval/mean_reward", trained["mean"], step)
        rows = "\n".join(f"| {p} | {c} | {r:.3f} |" for p, c, r in trained["samples"])
        writer.add_text("eval/samples", f"| prompt | completion | return |\n|---|---|---|\n{rows}", step)
        writer.add_text("run/config", text(run_config), step)
        if agent_config is not None:
            writer.add_text("config", text(agent_config), step)
        plain = {
            k: v if isinstance(v, bool | int | float | str) else json.dumps(v, default=repr)
            for k, v in hparams.items()
        }
        for summary in hparams_summary(plain, {"eval/mean_reward": trained["mean"]}):
            writer.file_writer.add_summary(summary, step)
    finally:
        writer.close()
    return Path(tb_dir)
