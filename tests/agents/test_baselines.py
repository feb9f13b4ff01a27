"""Stable-Baselines3 agents on TextGen-v0 and the shared evaluation routine (agents.baselines).

Training budgets here are tiny (4 envs, 8-step rollouts, 64 env steps): the tests check that each
agent/vec-env/extractor combination runs and updates, that the settings reach SB3 as documented
(hyperparameters, learning-rate schedule, truncation bootstrapping, action masks), and that
evaluate() averages what it should.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from agents.baselines import (
    DEFAULT_HYPERPARAMS,
    EXTRACTORS,
    SB3_AGENTS,
    VEC_ENVS,
    evaluate,
    evaluate_sampled,
    greedy_policy,
    hyperparams_error,
    learning_rate,
    make_sb3_model,
    repeated_word,
)
from agents.extractor import (
    MaskableTransformerActorCriticPolicy,
    TransformerActorCriticPolicy,
    TransformerExtractor,
)
from agents.ppo import PPOConfig
from textgym import TextGenEnv
from textgym.lexicon import sentiment_score
from textgym.sb3 import SB3VecEnv
from textgym.vector import TextGenVectorEnv

EOS = 2
SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2}
# The agents whose policy reads the whole observation (Transformer or MLP extractor); the recurrent
# agent has its own policy and observation (tests/agents/test_recurrent.py).
FEEDFORWARD = [agent for agent in SB3_AGENTS if agent != "sb3-recurrent-ppo"]


def tiny(agent: str, **extra) -> dict:
    """A rollout of 8 steps x 4 envs; PPO variants in minibatches of 16."""
    params = {"n_steps": 8} if agent == "sb3-a2c" else {"n_steps": 8, "batch_size": 16, "n_epochs": 2}
    return {**params, **extra}


def small_model(agent: str = "sb3-ppo", env_kwargs=None, num_envs: int = 4, **kwargs):
    hyper = tiny(agent, **kwargs.pop("hyperparams", {}))
    if kwargs.get("extractor", "transformer") == "transformer" and agent in FEEDFORWARD:
        hyper.setdefault("policy_kwargs", dict(SMALL))
    return make_sb3_model(agent, env_kwargs, num_envs=num_envs, device="cpu", hyperparams=hyper, **kwargs)


class Record(BaseCallback):
    """Keeps every action SB3 sends to the env during learn(), and the infos it gets back."""

    def __init__(self):
        super().__init__()
        self.actions: list[np.ndarray] = []
        self.infos: list[dict] = []

    def _on_step(self) -> bool:
        self.actions.append(np.asarray(self.locals["actions"]).copy())
        self.infos.extend(self.locals["infos"])
        return True


# ---------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("vec_env", VEC_ENVS)
@pytest.mark.parametrize("agent", FEEDFORWARD)
def test_every_combination_learns_a_tiny_budget(agent, vec_env, extractor):
    """Each agent x vec env x extractor builds the documented model, runs 64 env steps (two
    rollouts of 8 x 4) and changes its weights."""
    torch.manual_seed(0)
    model = small_model(agent, vec_env=vec_env, extractor=extractor)
    assert isinstance(model, SB3_AGENTS[agent])
    env = model.get_env()
    assert isinstance(env, VecMonitor)
    assert env.num_envs == 4
    assert isinstance(env.venv, SB3VecEnv if vec_env == "batched" else DummyVecEnv)
    policy = model.policy
    if extractor == "transformer":
        expected = (
            MaskableTransformerActorCriticPolicy
            if agent == "sb3-maskable-ppo"
            else TransformerActorCriticPolicy
        )
        assert type(policy) is expected
        assert isinstance(policy.features_extractor, TransformerExtractor)
        assert policy.features_extractor.decoder.cfg.d_model == 32
    else:
        assert not isinstance(policy.features_extractor, TransformerExtractor)
        assert isinstance(
            policy, MaskableActorCriticPolicy if agent == "sb3-maskable-ppo" else MultiInputActorCriticPolicy
        )
    before = [p.detach().clone() for p in policy.parameters()]

    assert model.learn(total_timesteps=64) is model
    assert model.num_timesteps == 64
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert len(model.ep_info_buffer) > 0  # sentiment's episodes are at most 8 tokens long
    for ep in model.ep_info_buffer:
        assert 1 <= ep["l"] <= 8
        assert -1 < ep["r"] < 1


# ---------------------------------------------------------------------------- hyperparameters
def test_default_ppo_hyperparams_match_ppo_config():
    """Where SB3's PPO and the custom PPO share a meaning, the defaults are the same (64 envs)."""
    cfg, hp = PPOConfig(), DEFAULT_HYPERPARAMS["sb3-ppo"]
    for name in (
        "n_steps",
        "n_epochs",
        "gamma",
        "gae_lambda",
        "clip_range",
        "ent_coef",
        "vf_coef",
        "max_grad_norm",
    ):
        assert hp[name] == getattr(cfg, name), name
    # Minibatch size in transitions: a rollout of n_steps x 64 envs in num_minibatches pieces.
    assert hp["batch_size"] * cfg.num_minibatches == hp["n_steps"] * 64
    assert cfg.anneal_lr
    schedule = learning_rate(hp["learning_rate"])
    assert schedule(1.0) == pytest.approx(cfg.learning_rate)
    assert schedule(0.0) == 0.0
    assert DEFAULT_HYPERPARAMS["sb3-maskable-ppo"] == hp
    a2c = DEFAULT_HYPERPARAMS["sb3-a2c"]
    for name in ("gamma", "gae_lambda", "ent_coef", "vf_coef", "max_grad_norm", "learning_rate"):
        assert a2c[name] == hp[name], name


@pytest.mark.parametrize("agent", ["sb3-ppo", "sb3-maskable-ppo"])
def test_default_ppo_model_is_configured_like_ppo_config(agent):
    """The SB3 model built with the defaults and 64 envs, read back from SB3's own attributes."""
    cfg = PPOConfig()
    model = make_sb3_model(agent, device="cpu", extractor="mlp")
    assert model.n_envs == 64
    assert model.n_steps * model.n_envs == cfg.n_steps * 64
    assert model.batch_size == model.n_steps * model.n_envs // cfg.num_minibatches
    assert model.n_epochs == cfg.n_epochs
    assert (model.gamma, model.gae_lambda) == (cfg.gamma, cfg.gae_lambda)
    assert (model.ent_coef, model.vf_coef, model.max_grad_norm) == (
        cfg.ent_coef,
        cfg.vf_coef,
        cfg.max_grad_norm,
    )
    assert model.clip_range(1.0) == cfg.clip_range
    assert model.clip_range_vf is cfg.clip_range_vf is None
    assert model.target_kl is cfg.target_kl is None
    assert model.normalize_advantage is cfg.normalize_advantage
    assert model.lr_schedule(1.0) == pytest.approx(cfg.learning_rate)
    assert model.lr_schedule(0.5) == pytest.approx(cfg.learning_rate / 2)
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate)
    assert model.policy.optimizer.defaults["eps"] == cfg.adam_eps
    model.get_env().close()


def test_hyperparams_override_the_defaults():
    model = small_model("sb3-ppo", hyperparams={"gamma": 0.5, "learning_rate": 3e-4})
    assert model.gamma == 0.5
    assert model.n_steps == 8 and model.batch_size == 16
    assert model.lr_schedule(1.0) == model.lr_schedule(0.1) == pytest.approx(3e-4)  # a constant
    assert DEFAULT_HYPERPARAMS["sb3-ppo"]["gamma"] == 0.99  # the defaults are not modified


def test_hyperparams_are_not_modified():
    """The caller's hyperparams are left as they were, so they can be reused for other agents."""
    hyper = {"n_steps": 8, "policy_kwargs": dict(SMALL)}
    make_sb3_model("sb3-a2c", num_envs=4, device="cpu", hyperparams=hyper)
    ppo = make_sb3_model("sb3-ppo", num_envs=4, device="cpu", hyperparams={**hyper, "batch_size": 16})
    assert isinstance(ppo.policy.optimizer, torch.optim.Adam)
    assert hyper == {"n_steps": 8, "policy_kwargs": SMALL}


@pytest.mark.parametrize("vec_env", VEC_ENVS)
@pytest.mark.parametrize("agent", list(SB3_AGENTS))
def test_same_seed_same_training(agent, vec_env):
    """seed fixes the model and the env: the same seed trains to the same weights, another not."""

    def trained(seed):
        model = small_model(agent, vec_env=vec_env, seed=seed)
        model.learn(64)
        return model.policy.state_dict()

    first, again, other = trained(3), trained(3), trained(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_batched_and_dummy_envs_start_from_the_same_prompts():
    """Both vec envs seed sub-env i with seed + i, as SB3 does."""
    obs = [
        small_model("sb3-ppo", num_envs=4, seed=5, vec_env=vec_env, extractor="mlp").get_env().reset()
        for vec_env in VEC_ENVS
    ]
    for key in obs[0]:
        np.testing.assert_array_equal(obs[0][key], obs[1][key])
    assert len({row.tobytes() for row in obs[0]["input_ids"]}) > 1


# ------------------------------------------------------------------------------ learning rate
def test_linear_learning_rate_schedule():
    schedule = learning_rate("lin_1e-3")
    assert callable(schedule)
    assert schedule(1.0) == pytest.approx(1e-3)
    assert schedule(0.5) == pytest.approx(5e-4)
    assert schedule(0.0) == 0.0
    assert learning_rate("lin_2.5")(0.2) == pytest.approx(0.5)
    assert learning_rate(3e-4) == 3e-4  # a number passes through
    copy = pickle.loads(pickle.dumps(schedule))
    assert [copy(p) for p in (1.0, 0.5, 0.0)] == [schedule(p) for p in (1.0, 0.5, 0.0)]


@pytest.mark.parametrize("value", ["lin_abc", "lin_", "cos_1e-3", "1e-3", "", "lin1e-3"])
def test_bad_learning_rate_string(value):
    with pytest.raises(ValueError, match=f"got {value!r}"):
        learning_rate(value)
    with pytest.raises(ValueError, match=f"got {value!r}"):
        small_model("sb3-ppo", hyperparams={"learning_rate": value})


@pytest.mark.parametrize("agent", FEEDFORWARD)
def test_save_and_load_with_the_linear_schedule(agent, tmp_path):
    """model.save pickles the schedule; the loaded model has it, the same weights and actions,
    and trains on."""
    model = small_model(agent)
    model.learn(32)
    path = tmp_path / "model.zip"
    model.save(path)
    cls = SB3_AGENTS[agent]
    loaded = cls.load(path, env=model.get_env(), device="cpu")
    assert type(loaded.policy) is type(model.policy)
    assert loaded.policy.features_extractor.decoder.cfg.d_model == 32
    assert loaded.lr_schedule(1.0) == pytest.approx(1e-3)
    assert loaded.lr_schedule(0.5) == pytest.approx(5e-4)
    assert loaded.lr_schedule(0.0) == 0.0
    for (name, a), b in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    obs = model.get_env().reset()
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )
    loaded.learn(32, reset_num_timesteps=False)
    assert loaded.num_timesteps == 64


@pytest.mark.parametrize("agent", ["sb3-ppo", "sb3-maskable-ppo"])
def test_policy_save_and_load(agent, tmp_path):
    """The policy alone round-trips too: its constructor arguments rebuild the same extractor."""
    model = small_model(agent)
    path = tmp_path / "policy.pt"
    model.policy.save(path)
    policy = type(model.policy).load(path, device="cpu")
    assert policy.features_extractor.decoder.cfg == model.policy.features_extractor.decoder.cfg
    assert policy.features_extractor.decoder.cfg.d_model == 32
    obs = model.get_env().reset()
    np.testing.assert_array_equal(
        policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"agent": "sb3-dqn"}, r"unknown SB3 agent 'sb3-dqn'"),
        ({"agent": "ppo"}, r"unknown SB3 agent 'ppo'"),
        ({"extractor": "cnn"}, r"extractor must be one of transformer, mlp, got 'cnn'"),
        ({"vec_env": "subproc"}, r"vec_env must be one of batched, dummy, got 'subproc'"),
        ({"hyperparams": {"n_stepz": 8}}, r"sb3-ppo: bad hyperparameters .*'n_stepz'"),
        (
            {"agent": "sb3-a2c", "hyperparams": {"batch_size": 16}},
            r"sb3-a2c: bad hyperparameters .*'batch_size'",
        ),
        (
            {"hyperparams": {**tiny("sb3-ppo"), "policy_kwargs": {"d_modle": 32}}},
            r"bad hyperparameters .*'d_modle'",
        ),
        (
            {"extractor": "mlp", "hyperparams": {**tiny("sb3-ppo"), "policy_kwargs": {"d_model": 32}}},
            r"bad hyperparameters .*'d_model'",
        ),
    ],
    ids=[
        "agent",
        "agent-custom-ppo",
        "extractor",
        "vec_env",
        "hyperparam",
        "a2c-batch_size",
        "policy",
        "mlp-d_model",
    ],
)
def test_bad_arguments_name_the_bad_value(kwargs, match):
    kwargs = {"agent": "sb3-ppo", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_sb3_model(kwargs.pop("agent"), num_envs=2, device="cpu", **kwargs)


@pytest.mark.parametrize(
    ("agent", "params", "match"),
    [
        ("sb3-ppo", {"n_steps": -1}, "n_steps must be a positive integer, got -1"),
        ("sb3-ppo", {"n_steps": 1.5}, "n_steps must be a positive integer"),
        ("sb3-ppo", {"batch_size": 1}, "batch_size must be >= 2 with normalize_advantage"),
        ("sb3-maskable-ppo", {"n_epochs": 0}, "n_epochs must be a positive integer"),
        ("sb3-a2c", {"gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
        ("sb3-ppo", {"learning_rate": "lin_-1"}, "learning_rate must be a positive number or 'lin_"),
        ("sb3-ppo", {"learning_rate": 0}, "learning_rate must be a positive number"),
        ("sb3-ppo", {"clip_range_vf": -0.1}, "clip_range_vf must be null or a positive number"),
        ("sb3-ppo", {"ent_coef": -1}, "ent_coef must be a finite number >= 0"),
        ("sb3-ppo", {"normalize_advantage": "yes"}, "normalize_advantage must be true or false"),
        ("sb3-ppo", {"policy_kwargs": [1]}, "policy_kwargs must be a JSON object"),
        ("sb3-ppo", {"seed": 1}, r"seed \(--seed\)"),
        ("sb3-ppo", {"device": "cpu"}, r"device \(--device\)"),
        ("sb3-a2c", {"n_epochs": 2}, r"A2C has no argument\(s\) \['n_epochs'\]"),
    ],
)
def test_hyperparams_error_names_the_value_sb3_would_reject(agent, params, match):
    """What SB3 asserts on (an AssertionError from deep inside its constructor) or fails on only
    during training is named up front, with the value and what is accepted."""
    problem = hyperparams_error(agent, params, num_envs=4)
    assert problem is not None and problem.startswith(f"{agent}: bad hyperparameters")
    assert re.search(match, problem), problem
    with pytest.raises(ValueError, match=match):
        make_sb3_model(agent, num_envs=4, device="cpu", hyperparams=params)


def test_hyperparams_error_accepts_the_defaults_and_sensible_overrides():
    for agent in SB3_AGENTS:
        assert hyperparams_error(agent, {}, num_envs=64) is None
        assert hyperparams_error(agent, {"n_steps": 16, "learning_rate": 3e-4, "gamma": 1.0}) is None
    assert hyperparams_error("sb3-ppo", {"normalize_advantage": False, "batch_size": 1}) is None


def test_a_rollout_of_one_transition_is_refused():
    """SB3 asserts ``n_steps * n_envs > 1`` when normalising advantages: a ValueError instead."""
    with pytest.raises(ValueError, match="n_steps x num_envs must be >= 2"):
        make_sb3_model("sb3-ppo", num_envs=1, device="cpu", hyperparams={"n_steps": 1, "batch_size": 2})


def test_repeated_word():
    def samples(*completions):
        return [("p", c, 0.0) for c in completions]

    assert repeated_word(samples(*["best best best best"] * 8)) == "best"
    assert repeated_word(samples(*["best good best good best"] * 6, "a b c d", "e f g h")) == "best"
    assert repeated_word(samples(*["the food was good and hot"] * 8)) is None
    assert repeated_word(samples(*["best best best"] * 4, *["a b c d"] * 4)) is None  # half only
    assert repeated_word(samples(*["great great great"] * 4, *["best best best"] * 4)) in ("great", "best")
    assert repeated_word([]) is None


# -------------------------------------------------------------------- truncation bootstrapping
@pytest.mark.parametrize("vec_env", VEC_ENVS)
@pytest.mark.parametrize("bootstrap", [None, False, True], ids=["default", "False", "True"])
def test_truncation_flag_reaching_sb3(vec_env, bootstrap):
    """An episode cut at max_new_tokens reports TimeLimit.truncated == bootstrap_truncated
    (default False); an <eos> termination never does."""
    kwargs = {} if bootstrap is None else {"bootstrap_truncated": bootstrap}
    model = small_model(
        "sb3-ppo", {"max_new_tokens": 3}, num_envs=2, vec_env=vec_env, extractor="mlp", **kwargs
    )
    env = model.get_env()
    env.reset()
    for _ in range(2):
        _, _, dones, infos = env.step(np.array([5, 5]))
        assert not dones.any()
        assert all(info.get("TimeLimit.truncated", False) is False for info in infos)
    _, _, dones, infos = env.step(np.array([5, 5]))
    assert dones.tolist() == [True, True]
    for info in infos:
        assert info["TimeLimit.truncated"] is bool(bootstrap)
        assert info["terminal_observation"]["input_ids"][-3:].tolist() == [5, 5, 5]
    _, _, dones, infos = env.step(np.array([EOS, 5]))  # a termination: never bootstrapped
    assert dones.tolist() == [True, False]
    assert infos[0]["TimeLimit.truncated"] is False


@pytest.mark.parametrize("vec_env", VEC_ENVS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_bootstrapping_shows_in_the_rollout_rewards(vec_env, bootstrap):
    """End to end: with a reward of 0 everywhere, SB3's rollout rewards stay 0 unless truncated
    episodes are bootstrapped (reward += gamma * V(final observation))."""
    torch.manual_seed(0)
    env_kwargs = {"max_new_tokens": 2, "reward": lambda prompt, completion: 0.0}
    model = small_model(
        "sb3-ppo", env_kwargs, vec_env=vec_env, extractor="mlp", bootstrap_truncated=bootstrap
    )
    model.learn(32)
    rewards = model.rollout_buffer.rewards
    assert rewards.shape == (8, 4)
    if bootstrap:
        assert (rewards != 0).sum() >= 8  # ~one step in two ends an episode, nearly all truncated
    else:
        assert np.all(rewards == 0)


# ------------------------------------------------------------------------------ action masks
def expected_mask(env_kwargs: dict) -> np.ndarray:
    return TextGenEnv(**env_kwargs).action_masks()


@pytest.mark.parametrize("vec_env", VEC_ENVS)
@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("env_kwargs", [{}, {"allowed_tokens": ["good", "bad"]}], ids=["default", "allowed"])
def test_get_action_masks_reads_the_env_mask(vec_env, bootstrap, env_kwargs):
    model = small_model(
        "sb3-maskable-ppo", env_kwargs, num_envs=3, vec_env=vec_env, bootstrap_truncated=bootstrap
    )
    env = model.get_env()
    env.reset()
    masks = get_action_masks(env)
    V = env.action_space.n
    assert masks.shape == (3, V)
    assert masks.dtype == np.bool_
    np.testing.assert_array_equal(masks, np.broadcast_to(expected_mask(env_kwargs), (3, V)))
    tok = TextGenEnv().tokenizer
    if env_kwargs:
        assert set(np.flatnonzero(masks[0])) == {EOS, tok.token_to_id("good"), tok.token_to_id("bad")}
    else:
        assert set(np.flatnonzero(~masks[0])) == {tok.pad_id, tok.bos_id, tok.unk_id}
    env.step(np.array([5, EOS, 5]))  # the same mask after steps and resets
    np.testing.assert_array_equal(get_action_masks(env), masks)


@pytest.mark.parametrize("vec_env", VEC_ENVS)
def test_maskable_ppo_only_emits_allowed_tokens(vec_env):
    """Every action MaskablePPO takes while learning, and every predict(action_masks=...), is an
    allowed token or <eos>; without the mask the same policy does emit other tokens."""
    torch.manual_seed(0)
    tok = TextGenEnv().tokenizer
    allowed = {EOS, tok.token_to_id("good"), tok.token_to_id("bad")}
    model = small_model("sb3-maskable-ppo", {"allowed_tokens": ["good", "bad"]}, vec_env=vec_env)
    record = Record()
    model.learn(64, callback=record)
    actions = np.concatenate(record.actions)
    assert actions.size == 64
    assert set(actions.tolist()) <= allowed
    assert len(set(actions.tolist())) > 1
    completions = [info["completion"] for info in record.infos if "terminal_observation" in info]
    assert completions
    for text in completions:
        assert set(text.split()) <= {"good", "bad"}

    env = model.get_env()
    obs = env.reset()
    masks = get_action_masks(env)
    for deterministic in (False, False, False, True):
        acts, _ = model.predict(obs, action_masks=masks, deterministic=deterministic)
        assert set(acts.tolist()) <= allowed
    unmasked = np.concatenate([model.predict(obs)[0] for _ in range(8)])
    assert not set(unmasked.tolist()) <= allowed


# -------------------------------------------------------------------------------- evaluation
def good_return(max_new_tokens: int = 8) -> float:
    """The return of always emitting "good", from a single env."""
    env = TextGenEnv()
    env.reset(seed=0)
    good, total, done = env.tokenizer.token_to_id("good"), 0.0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(good)
        total += reward
        done = terminated or truncated
    assert info["completion"] == " ".join(["good"] * max_new_tokens)
    return total


@pytest.mark.parametrize(("episodes", "num_envs"), [(32, 8), (64, 64), (12, 4)])
def test_evaluate_random_policy(episodes, num_envs):
    result = evaluate(None, episodes=episodes, num_envs=num_envs)
    assert result["episodes"] == episodes
    assert -1 < result["mean"] < 1
    assert 0 <= result["std"] < 1
    assert 1 <= len(result["samples"]) <= 8
    for prompt, completion, reward in result["samples"]:
        assert isinstance(prompt, str) and prompt
        assert isinstance(completion, str)
        assert -1 < reward < 1
    assert evaluate(None, episodes=episodes, num_envs=num_envs) == result  # seeded
    assert evaluate(None, episodes=episodes, num_envs=num_envs, seed=1)["mean"] != result["mean"]


def test_evaluate_rounds_episodes_up_to_whole_rounds():
    """Every sub-env contributes the same number of episodes: 10 over 4 envs gives 12."""
    result = evaluate(None, episodes=10, num_envs=4)
    assert result["episodes"] == 12


def test_evaluate_deterministic_policy_by_hand():
    """Always "good": every episode has the single-env return of "good" x 8, std 0."""
    tok = TextGenEnv().tokenizer
    good = tok.token_to_id("good")
    result = evaluate(lambda obs: np.full(len(obs["input_ids"]), good), episodes=16, num_envs=8)
    expected = good_return()
    assert expected == pytest.approx(sentiment_score(" ".join(["good"] * 8))) and expected > 0.5
    assert result["episodes"] == 16
    assert result["mean"] == pytest.approx(expected)
    assert result["std"] == pytest.approx(0.0, abs=1e-12)
    assert all(c == " ".join(["good"] * 8) and r == pytest.approx(expected) for _, c, r in result["samples"])
    # All 8 envs finish their first episode together: the samples are those, with their prompts.
    _, info = TextGenVectorEnv(8, autoreset_mode="same_step").reset(seed=10_000)
    assert [prompt for prompt, _, _ in result["samples"]] == list(info["prompt"])


def test_evaluate_does_not_over_count_short_episodes():
    """Half the envs end every episode at once with <eos> (return 0), half write "good" x 8:
    each env contributes equally, so the mean is half the "good" return, not close to 0."""
    tok = TextGenEnv().tokenizer
    good = tok.token_to_id("good")

    def policy(obs):
        n = len(obs["input_ids"])
        return np.where(np.arange(n) % 2 == 0, EOS, good)

    result = evaluate(policy, episodes=16, num_envs=4)
    assert result["episodes"] == 16
    assert result["mean"] == pytest.approx(good_return() / 2)
    assert result["std"] == pytest.approx(good_return() / 2)


@pytest.mark.parametrize("agent", ["sb3-ppo", "sb3-maskable-ppo"])
def test_evaluate_a_trained_sb3_policy(agent):
    model = small_model(agent)
    model.learn(64)

    def policy(obs):
        return model.predict(obs, deterministic=True)[0]

    result = evaluate(policy, episodes=8, num_envs=4)
    assert result["episodes"] == 8
    assert -1 < result["mean"] < 1
    assert len(result["samples"]) == 8


# ----------------------------------------------------------------------------- sampled evaluation
def distinct_words(prompt: str, completion: str) -> float:
    """A diversity reward: the share of distinct words (0 for an empty completion)."""
    words = completion.split()
    return len(set(words)) / len(words) if words else 0.0


def test_sampled_evaluation_shows_what_greedy_hides():
    """A nearly uniform policy (an untrained PPO whose logits favour one token by 0.1) scores far
    below the random policy greedily, on a diversity reward: greedy decoding repeats that token.
    Sampled at temperature 1 it scores at the random level, which is what the policy does."""
    from agents.ppo import PPO

    env = {"task": "default", "reward": distinct_words}
    model = PPO(
        "TextGen-v0", PPOConfig(policy={"d_model": 16, "n_layers": 1, "n_heads": 2}), 8, env, "cpu", seed=0
    )
    obs, _ = TextGenVectorEnv(8, **env).reset(seed=0)
    with torch.no_grad():
        model.policy.policy_head.bias[10] += 0.1
        ids, mask = (torch.as_tensor(obs[key]) for key in ("input_ids", "attention_mask"))
        probs = model.policy(ids, mask)[0].softmax(-1)  # (B, L, V)
    vocab = probs.shape[-1]
    assert float(probs.max()) < 1.2 / vocab  # nearly uniform

    random_level = evaluate(None, env, 64, 8)["mean"]
    greedy = evaluate(greedy_policy(model), env, 64, 8)
    sampled = evaluate_sampled(model, env, 64, 8)
    assert greedy["mean"] < random_level - 0.5
    assert all(len(set(c.split())) == 1 for _, c, _ in greedy["samples"])  # one word, repeated
    assert sampled["mean"] > random_level - 0.05
    assert sampled["mean"] > greedy["mean"] + 0.5


@pytest.mark.parametrize("agent", ["ppo", "sb3-ppo", "sb3-maskable-ppo", "sb3-recurrent-ppo"])
def test_sampled_evaluation_is_seeded_and_leaves_the_global_generator_alone(agent):
    """The same seed gives the same sampled evaluation, another seed another one; torch's global
    random stream is where it was before (training's randomness is untouched); the sampled policy
    is not the greedy one."""
    from agents.ppo import PPO

    env = {"task": "default", "max_new_tokens": 6}
    if agent == "ppo":
        model = PPO(
            "TextGen-v0", PPOConfig(policy={"d_model": 16, "n_layers": 1, "n_heads": 2}), 4, env, "cpu"
        )
    else:
        params = {"n_steps": 8, "batch_size": 16}
        params |= {"policy_kwargs": {"lstm_hidden_size": 16}} if agent == "sb3-recurrent-ppo" else {}
        model = make_sb3_model(agent, env, num_envs=4, device="cpu", hyperparams=params)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate_sampled(model, env, 16, 4, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert evaluate_sampled(model, env, 16, 4, seed=7) == first
    completions = [c for _, c, _ in first["samples"]]
    assert completions != [c for _, c, _ in evaluate_sampled(model, env, 16, 4, seed=8)["samples"]]
    assert completions != [c for _, c, _ in evaluate(greedy_policy(model), env, 16, 4, seed=7)["samples"]]


def test_evaluate_sampled_of_no_model_is_the_random_policy():
    env = {"task": "default", "max_new_tokens": 6}
    assert evaluate_sampled(None, env, 16, 4, seed=3) == evaluate(None, env, 16, 4, seed=3)
