"""The Stable-Baselines3 ``VecEnv`` adapter over the batched env (textgym.sb3).

The reference for every step is N plain single envs ``TextGenEnv`` seeded ``seed + i`` and
driven with the same actions, reset by hand when their episode ends, which is what SB3's own
``DummyVecEnv`` does.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor
from stable_baselines3.common.vec_env.util import obs_space_info

from textgym import TextGenEnv, TextGenVectorEnv
from textgym.sb3 import SB3VecEnv, make_sb3_vec_env

EOS = 2


def random_actions(rng: np.random.Generator, n: int, vocab: int, p_eos: float = 0.15) -> np.ndarray:
    acts = rng.integers(0, vocab, size=n)
    acts[rng.random(n) < p_eos] = EOS
    return acts


def test_make_sb3_vec_env_types():
    venv = make_sb3_vec_env(num_envs=4)
    assert isinstance(venv, VecMonitor)
    assert isinstance(venv.venv, SB3VecEnv)
    inner = venv.venv.venv
    assert isinstance(inner, TextGenVectorEnv)
    assert inner.autoreset_mode is gym.vector.AutoresetMode.SAME_STEP
    assert inner.array_type == "numpy"
    bare = make_sb3_vec_env(num_envs=4, monitor=False, task="arithmetic")
    assert isinstance(bare, SB3VecEnv)
    assert isinstance(bare, VecEnv)
    assert bare.num_envs == 4
    assert bare.observation_space == bare.venv.single_observation_space
    assert bare.action_space == gym.spaces.Discrete(bare.venv.tokenizer.vocab_size)


def test_reset_returns_dict_of_batched_arrays():
    N = 5
    venv = make_sb3_vec_env(num_envs=N, monitor=False, task="keyword")
    keys, shapes, dtypes = obs_space_info(venv.observation_space)
    obs = venv.reset()
    assert isinstance(obs, dict)
    assert sorted(obs) == sorted(keys) == ["attention_mask", "input_ids"]
    for key in keys:
        assert isinstance(obs[key], np.ndarray)
        assert obs[key].shape == (N, *shapes[key])
        assert obs[key].dtype == dtypes[key]
        assert venv.observation_space[key].contains(obs[key][0])
    assert len(venv.reset_infos) == N
    assert all(isinstance(info["prompt"], str) for info in venv.reset_infos)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"task": "sentiment"}, id="sentiment"),
        pytest.param({"task": "arithmetic", "length_penalty": 0.1}, id="arithmetic-penalty"),
    ],
)
def test_step_contract_matches_single_envs(kwargs):
    N, seed, steps = 6, 40, 120
    venv = make_sb3_vec_env(num_envs=N, monitor=False, **kwargs)
    singles = [TextGenEnv(**kwargs) for _ in range(N)]

    venv.seed(seed)
    obs = venv.reset()
    for i, env in enumerate(singles):
        s_obs, s_info = env.reset(seed=seed + i)
        for key in s_obs:
            np.testing.assert_array_equal(obs[key][i], s_obs[key])
        assert venv.reset_infos[i] == {"prompt": s_info["prompt"]}

    rng = np.random.default_rng(0)
    vocab = venv.action_space.n
    seen = {"terminated": 0, "truncated": 0}
    for _ in range(steps):
        acts = random_actions(rng, N, vocab)
        obs, rewards, dones, infos = venv.step(acts)
        assert isinstance(infos, list)
        assert len(infos) == N
        assert rewards.shape == dones.shape == (N,)
        assert rewards.dtype == np.float32
        assert dones.dtype == np.bool_
        for i, env in enumerate(singles):
            s_obs, s_rew, s_term, s_trunc, s_info = env.step(int(acts[i]))
            assert rewards[i] == np.float32(s_rew)
            assert bool(dones[i]) == (s_term or s_trunc)
            info = infos[i]
            assert info["TimeLimit.truncated"] is (s_trunc and not s_term)
            if s_term or s_trunc:
                seen["terminated" if s_term else "truncated"] += 1
                final = info["terminal_observation"]
                assert set(final) == set(s_obs)
                for key in s_obs:
                    np.testing.assert_array_equal(final[key], s_obs[key])
                assert info["completion"] == s_info["completion"]
                assert info["prompt"] == s_info["prompt"]
                assert info["reward_components"] == pytest.approx(s_info["reward_components"])
                s_obs, s_reset_info = env.reset()
                assert venv.reset_infos[i] == {"prompt": s_reset_info["prompt"]}
            else:
                assert "terminal_observation" not in info
            for key in s_obs:
                np.testing.assert_array_equal(obs[key][i], s_obs[key])
    assert seen["terminated"] > 10
    assert seen["truncated"] > 3


def test_terminal_observation_not_aliased_with_later_steps():
    N = 3
    venv = make_sb3_vec_env(num_envs=N, monitor=False, task="arithmetic")
    venv.reset()
    _, _, dones, infos = venv.step(np.array([5, EOS, 5]))
    assert dones.tolist() == [False, True, False]
    final = infos[1]["terminal_observation"]
    snapshot = {k: v.copy() for k, v in final.items()}
    for _ in range(3):
        venv.step(np.array([EOS, EOS, EOS]))
    for key in snapshot:
        np.testing.assert_array_equal(final[key], snapshot[key])


def test_vec_monitor_episode_stats_match_rewards():
    N = 4
    venv = make_sb3_vec_env(num_envs=N, task="keyword", length_penalty=0.05)
    venv.seed(1)
    venv.reset()
    rng = np.random.default_rng(1)
    returns, lengths = np.zeros(N), np.zeros(N, dtype=int)
    episodes = 0
    for _ in range(60):
        _, rewards, dones, infos = venv.step(random_actions(rng, N, venv.action_space.n))
        returns += rewards
        lengths += 1
        for i in np.flatnonzero(dones):
            episodes += 1
            assert infos[i]["episode"]["l"] == lengths[i]
            assert infos[i]["episode"]["r"] == pytest.approx(returns[i], abs=1e-5)
            returns[i], lengths[i] = 0.0, 0
        for i in np.flatnonzero(~dones):
            assert "episode" not in infos[i]
    assert episodes > 10


def test_seed_then_reset_is_reproducible():
    N = 8
    venv = make_sb3_vec_env(num_envs=N, monitor=False)
    other = make_sb3_vec_env(num_envs=N, monitor=False)
    assert venv.seed(123) == [123 + i for i in range(N)]
    first = venv.reset()
    rng = np.random.default_rng(0)
    acts = [random_actions(rng, N, venv.action_space.n, p_eos=0.3) for _ in range(20)]
    first_run = [venv.step(a)[0]["input_ids"] for a in acts]
    # the seed holds for one reset only, as in SB3
    assert venv._seeds == [None] * N
    other.seed(123)
    second = other.reset()
    second_run = [other.step(a)[0]["input_ids"] for a in acts]
    np.testing.assert_array_equal(first["input_ids"], second["input_ids"])
    for a, b in zip(first_run, second_run, strict=True):
        np.testing.assert_array_equal(a, b)
    # reseeding the same env gives the same again; another seed gives other prompts
    venv.seed(123)
    np.testing.assert_array_equal(venv.reset()["input_ids"], first["input_ids"])
    venv.seed(124)
    shifted = venv.reset()["input_ids"]
    np.testing.assert_array_equal(shifted[:-1], first["input_ids"][1:])
    venv.seed(999)
    assert not np.array_equal(venv.reset()["input_ids"], first["input_ids"])


def test_numpy_integer_seed_is_the_same_as_the_int():
    # SB3's VecEnv.seed(np.int64(...)) hands numpy seeds to reset(), which Gymnasium's seeding refuses.
    venv = make_sb3_vec_env(num_envs=3, monitor=False)
    venv.seed(np.int64(7))
    by_numpy = venv.reset()["input_ids"]
    venv.seed(7)
    np.testing.assert_array_equal(venv.reset()["input_ids"], by_numpy)


def test_stable_info_passes_through_to_the_vector_env():
    venv = make_sb3_vec_env(num_envs=2, monitor=False, task="arithmetic", stable_info=True)
    venv.reset()
    _, _, dones, infos = venv.step(np.array([EOS, 5]))
    assert dones.tolist() == [True, False]
    assert infos[0]["completion"] == "" and "terminal_observation" in infos[0]
    assert venv.reset_infos[0]["prompt"] == venv.venv.config.prompts[venv.venv._core.prompt_index[0]]


def test_reset_options_are_refused():
    venv = make_sb3_vec_env(num_envs=2, monitor=False)
    venv.set_options({"reset_mask": np.array([True, False])})
    with pytest.raises(ValueError, match="no reset options"):
        venv.reset()


def test_step_wait_without_step_async():
    venv = make_sb3_vec_env(num_envs=2, monitor=False)
    venv.reset()
    with pytest.raises(RuntimeError, match="step_async"):
        venv.step_wait()


def test_attribute_access():
    N = 3
    venv = make_sb3_vec_env(num_envs=N, monitor=False, task="arithmetic")
    assert venv.get_attr("render_mode") == [None] * N
    assert venv.get_attr("num_envs", indices=[0, 2]) == [N, N]
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * N
    with pytest.raises(AttributeError, match="share one configuration"):
        venv.set_attr("task", "sentiment")


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"autoreset_mode": "next_step"}, r"autoreset_mode='same_step'.*got autoreset_mode='NextStep'"),
        (
            {"autoreset_mode": "same_step", "array_type": "torch"},
            r"array_type='numpy'.*got .*array_type='torch'",
        ),
        ({}, r"autoreset_mode='same_step', array_type='numpy'"),  # the default is next-step
    ],
)
def test_wrong_vector_env_settings_refused(kwargs, match):
    inner = TextGenVectorEnv(num_envs=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        SB3VecEnv(inner)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gym.make_vec("TextGen-v0", num_envs=2, vectorization_mode="sync"),
        lambda: TextGenEnv(),
        lambda: DummyVecEnv([TextGenEnv]),
    ],
    ids=["SyncVectorEnv", "TextGenEnv", "DummyVecEnv"],
)
def test_non_textgen_vector_env_refused(make):
    with pytest.raises(TypeError, match="venv must be a TextGenVectorEnv"):
        SB3VecEnv(make())


# ------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["PPO", "A2C"])
def test_sb3_agents_learn_on_adapter(algo):
    torch.manual_seed(0)
    N = 16
    venv = make_sb3_vec_env(num_envs=N, task="arithmetic")
    if algo == "PPO":
        model = PPO(
            "MultiInputPolicy", venv, n_steps=32, batch_size=256, n_epochs=2, seed=0, device="cpu", verbose=0
        )
        total = 2048
    else:
        model = A2C("MultiInputPolicy", venv, n_steps=8, seed=0, device="cpu", verbose=0)
        total = 1024
    assert model.learn(total_timesteps=total) is model
    assert model.num_timesteps >= total
    assert len(model.ep_info_buffer) > 0
    max_new = venv.venv.venv.config.max_new_tokens
    for ep in model.ep_info_buffer:
        assert 1 <= ep["l"] <= max_new
        assert np.isfinite(ep["r"])
    actions, _ = model.predict(venv.reset(), deterministic=True)
    assert actions.shape == (N,)
