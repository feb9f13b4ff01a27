"""sb3-recurrent-ppo (agents.recurrent): the one-token observation it sees, that it trains on a
built-in task and on translate, its evaluation with the LSTM state, and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy

from agents.baselines import evaluate, greedy_policy, make_sb3_model
from agents.recurrent import LastTokenObservation, LastTokenVecEnv, TokenEmbeddingExtractor
from textgym import TextGenEnv
from textgym.tokenizers import BOS_ID, EOS_ID, PAD_ID

TINY = {"n_steps": 8, "batch_size": 16, "n_epochs": 2, "policy_kwargs": {"lstm_hidden_size": 16}}


def small_model(env_kwargs=None, num_envs: int = 4, **kwargs):
    return make_sb3_model("sb3-recurrent-ppo", env_kwargs, num_envs, device="cpu", hyperparams=TINY, **kwargs)


# ------------------------------------------------------------------------------- observation
def test_observation_is_the_prompt_the_last_token_and_the_step_by_hand():
    """TextGen-v0 on translate: P = 10 prompt columns, M = 10 new tokens. The recurrent
    observation keeps the prompt window as it is, then the newest token (the prompt's last token
    at step 0), then the number of tokens generated."""
    env = TextGenEnv(task="translate", split="test")
    tok = env.tokenizer
    transform = LastTokenObservation(10, 10, tok.vocab_size)
    obs, info = env.reset(options={"prompt_index": 1})
    assert info["prompt"] == "the old horse finds the teacher . ="  # 8 tokens and <bos>: one pad
    prompt = [PAD_ID, BOS_ID, *tok.encode(info["prompt"])]
    equals = tok.token_to_id("=")
    np.testing.assert_array_equal(transform(obs), [*prompt, equals, 0])
    for step, word in enumerate(["la", "hebo", "veja"], start=1):
        obs, *_ = env.step(tok.token_to_id(word))
        np.testing.assert_array_equal(transform(obs), [*prompt, tok.token_to_id(word), step])
    # a batch of two, one row a step ahead of the other
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    batch["input_ids"][1, 13], batch["attention_mask"][1, 13] = EOS_ID, 1
    np.testing.assert_array_equal(
        transform(batch), [[*prompt, tok.token_to_id("veja"), 3], [*prompt, EOS_ID, 4]]
    )


def test_observation_space_and_its_layout_round_trip():
    transform = LastTokenObservation(10, 10, 96)
    space = transform.space
    assert space.shape == (12,) and space.dtype == np.int64
    assert space.high.tolist() == [95] * 11 + [10] and space.low.tolist() == [0] * 12
    back = LastTokenObservation.from_space(space)
    assert (back.P, back.M, back.V) == (10, 10, 96)
    with pytest.raises(ValueError, match="not a recurrent agent's observation space"):
        LastTokenObservation.from_space(spaces.Box(0, 1, shape=(2, 3)))


def test_observations_of_another_env_are_refused_by_their_width():
    transform = LastTokenObservation(10, 10, 96)
    obs = TextGenEnv(task="sentiment").reset(seed=0)[0]  # 9 + 8 columns
    with pytest.raises(ValueError, match=r"observations of 17 columns do not fit .*max_prompt_tokens=10"):
        transform(obs)


@pytest.mark.parametrize("vec_env", ["batched", "dummy"])
def test_the_model_trains_on_the_one_token_observation(vec_env):
    """What the model's env hands SB3, on reset, on steps and as terminal observations, is the
    recurrent observation of the underlying env's observation."""
    model = small_model({"task": "translate"}, vec_env=vec_env)
    env = model.get_env()
    assert isinstance(env, LastTokenVecEnv)
    assert model.observation_space == env.observation_space == LastTokenObservation(10, 10, 96).space
    inner = env.venv
    obs = env.reset()
    assert obs.shape == (4, 12) and (obs[:, -1] == 0).all()
    assert (obs[:, 10] == obs[:, 9]).all()  # at step 0 the last token is the prompt's last
    ended = []
    for step in range(1, 11):
        obs, _, dones, infos = env.step(np.full(4, 4 + step))
        ended += [info["terminal_observation"] for info in infos if "terminal_observation" in info]
        assert (obs[:, 10] == (4 + step if step < 10 else obs[:, 9])).all()
        assert (obs[:, 11] == (step if step < 10 else 0)).all()
    assert dones.all() and len(ended) == 4  # truncated at max_new_tokens = 10
    for terminal in ended:
        assert terminal.shape == (12,) and terminal[10] == 14 and terminal[11] == 10
    assert inner.observation_space["input_ids"].shape == (20,)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("task", ["sentiment", "translate"])
def test_trains_a_few_hundred_steps_and_changes_its_weights(task):
    torch.manual_seed(0)
    model = small_model({"task": task}, num_envs=8)
    assert isinstance(model, RecurrentPPO) and isinstance(model.policy, RecurrentActorCriticPolicy)
    extractor = model.policy.features_extractor
    assert isinstance(extractor, TokenEmbeddingExtractor)
    assert extractor.features_dim == (model.get_env().transform.P + 2) * 16
    assert model.policy.lstm_actor.hidden_size == 16
    before = [p.detach().clone() for p in model.policy.parameters()]
    assert model.learn(320) is model
    assert model.num_timesteps == 320
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))
    assert len(model.ep_info_buffer) >= 8
    result = evaluate(greedy_policy(model), {"task": task}, episodes=16, num_envs=8)
    assert result["episodes"] == 16 and np.isfinite(result["mean"])


def test_evaluation_carries_the_lstm_state_and_restarts_it_with_each_episode():
    """greedy_policy acts as model.predict does with the state carried step by step, and starts
    afresh at an episode's first step: two evaluations give the same result."""
    torch.manual_seed(0)
    model = small_model({"task": "translate"})
    model.learn(64)
    env = TextGenEnv(task="translate")
    transform = LastTokenObservation.from_space(model.observation_space)
    act = greedy_policy(model)
    obs, _ = env.reset(seed=3)
    state, start, by_hand, through = None, np.array([True]), [], []
    for _ in range(10):
        batch = {k: v[None] for k, v in obs.items()}
        action, state = model.predict(transform(obs)[None], state, start, deterministic=True)
        start = np.array([False])
        by_hand.append(int(action[0]))
        through.append(int(act(batch)[0]))
        obs, _, terminated, truncated, _ = env.step(by_hand[-1])
        if terminated or truncated:
            break
    assert through == by_hand
    first = evaluate(greedy_policy(model), {"task": "translate"}, episodes=8, num_envs=4)
    assert evaluate(greedy_policy(model), {"task": "translate"}, episodes=8, num_envs=4) == first


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = small_model({"task": "translate"})
    model.learn(64)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = RecurrentPPO.load(path, device="cpu")  # no env: the layout comes from the saved space
    assert loaded.observation_space == model.observation_space
    assert isinstance(loaded.policy.features_extractor, TokenEmbeddingExtractor)
    for (name, a), b in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    env_kwargs = {"task": "translate", "split": "test"}
    assert evaluate(greedy_policy(loaded), env_kwargs, 8, 4) == evaluate(
        greedy_policy(model), env_kwargs, 8, 4
    )
    loaded.set_env(model.get_env())
    loaded.learn(32, reset_num_timesteps=False)
    assert loaded.num_timesteps == 96


def test_bad_lstm_arguments_name_the_bad_value():
    with pytest.raises(ValueError, match=r"sb3-recurrent-ppo: bad hyperparameters .*'lstm_hiden_size'"):
        make_sb3_model(
            "sb3-recurrent-ppo",
            num_envs=4,
            device="cpu",
            hyperparams={"policy_kwargs": {"lstm_hiden_size": 8}},
        )


def test_an_extractor_choice_is_refused_naming_the_agents_it_applies_to():
    with pytest.raises(ValueError, match=r"extractor='mlp' does not apply to sb3-recurrent-ppo.*sb3-ppo"):
        small_model(extractor="mlp")
