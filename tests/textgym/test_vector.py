"""The batched vector env ``gym.make_vec("TextGen-v0", num_envs=N)`` (textgym.vector.TextGenVectorEnv).

Its reference is Gymnasium's own ``SyncVectorEnv`` over the single env, with the same keyword
arguments: same seeds and actions must give the same observations, rewards, flags and infos.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics

import textgym
from textgym import RewardModel, RewardModelError, TextGenVectorEnv

ENV_ID = "TextGen-v0"
EOS = 2
MODES = ["next_step", "same_step"]
GYM_MODES = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}


def completion_length_reward(prompt: str, completion: str) -> float:
    """A module-level plain-function reward (picklable, deep-copyable)."""
    return len(completion) / 10.0 - (0.5 if "the" in prompt else 0.0)


class RecordingReward(RewardModel):
    """A batched reward model that records the size of every call."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        self.calls.append(len(completions))
        return [float(len(c)) for c in completions]


def random_actions(rng: np.random.Generator, n: int, vocab: int, p_eos: float = 0.15) -> np.ndarray:
    acts = rng.integers(0, vocab, size=n)
    acts[rng.random(n) < p_eos] = EOS
    return acts


def make_batched(num_envs: int, **kwargs) -> TextGenVectorEnv:
    env = gym.make_vec(ENV_ID, num_envs=num_envs, **kwargs)
    assert isinstance(env, TextGenVectorEnv)
    return env


def masked_equal(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> None:
    assert list(np.asarray(a, dtype=object)[mask]) == list(np.asarray(b, dtype=object)[mask])


# ------------------------------------------------------------------------------ construction
def test_make_vec_returns_batched_vector_env_with_next_step_default():
    env = gym.make_vec(ENV_ID, num_envs=3)
    assert isinstance(env, TextGenVectorEnv)
    assert isinstance(env, VectorEnv)
    assert env.num_envs == 3
    mode = env.metadata["autoreset_mode"]
    assert isinstance(mode, AutoresetMode)
    assert mode is AutoresetMode.NEXT_STEP
    # the class-level default is not mutated by an instance in another mode
    same = gym.make_vec(ENV_ID, num_envs=3, autoreset_mode="same_step")
    assert same.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    assert env.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
    assert TextGenVectorEnv.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("same_step", AutoresetMode.SAME_STEP),
        ("SameStep", AutoresetMode.SAME_STEP),
        (AutoresetMode.SAME_STEP, AutoresetMode.SAME_STEP),
        ("next_step", AutoresetMode.NEXT_STEP),
        ("NextStep", AutoresetMode.NEXT_STEP),
        (AutoresetMode.NEXT_STEP, AutoresetMode.NEXT_STEP),
    ],
)
def test_autoreset_mode_spellings(spelling, expected):
    env = gym.make_vec(ENV_ID, num_envs=2, autoreset_mode=spelling)
    assert env.metadata["autoreset_mode"] is expected
    assert isinstance(env.metadata["autoreset_mode"], AutoresetMode)
    assert env.autoreset_mode is expected


def test_spaces_are_batched_single_spaces():
    env = make_batched(5, task="arithmetic")
    single = gym.make(ENV_ID, task="arithmetic")
    assert env.single_observation_space == single.observation_space
    assert env.single_action_space == single.action_space
    assert env.observation_space["input_ids"].shape == (5, *single.observation_space["input_ids"].shape)
    assert env.action_space.shape == (5,)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space


# ------------------------------------------------------------------ equivalence with SyncVectorEnv
EQUIVALENCE_CONFIGS = [
    *[pytest.param({"task": t}, id=f"task-{t}") for t in textgym.TASKS],
    pytest.param({"task": "arithmetic", "reward": completion_length_reward}, id="function-reward"),
    pytest.param({"task": "keyword", "length_penalty": 0.05}, id="length-penalty"),
]


def _compare_obs(batched_obs, sync_obs):
    assert set(batched_obs) == set(sync_obs) == {"input_ids", "attention_mask"}
    for key in sync_obs:
        assert isinstance(batched_obs[key], np.ndarray)
        assert batched_obs[key].dtype == sync_obs[key].dtype
        np.testing.assert_array_equal(batched_obs[key], sync_obs[key])


def _compare_prompt_info(batched_info, sync_info):
    assert ("_prompt" in batched_info) == ("_prompt" in sync_info)
    if "_prompt" in sync_info:
        np.testing.assert_array_equal(batched_info["_prompt"], sync_info["_prompt"])
        masked_equal(batched_info["prompt"], sync_info["prompt"], sync_info["_prompt"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", EQUIVALENCE_CONFIGS)
def test_equivalent_to_sync_vector_env(kwargs, mode):
    N, steps = 6, 150
    sync = gym.make_vec(
        ENV_ID,
        num_envs=N,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": GYM_MODES[mode]},
        **kwargs,
    )
    assert isinstance(sync, SyncVectorEnv)
    batched = make_batched(N, autoreset_mode=mode, **kwargs)
    assert batched.metadata["autoreset_mode"] is sync.metadata["autoreset_mode"]

    s_obs, s_info = sync.reset(seed=11)
    b_obs, b_info = batched.reset(seed=11)
    _compare_obs(b_obs, s_obs)
    _compare_prompt_info(b_info, s_info)

    rng = np.random.default_rng(5)
    vocab = batched.single_action_space.n
    n_done = 0
    nonzero_rewards = 0
    for _ in range(steps):
        acts = random_actions(rng, N, vocab)
        s_obs, s_rew, s_term, s_trunc, s_info = sync.step(acts)
        b_obs, b_rew, b_term, b_trunc, b_info = batched.step(acts)
        _compare_obs(b_obs, s_obs)
        np.testing.assert_array_equal(b_rew, s_rew)
        np.testing.assert_array_equal(b_term, s_term)
        np.testing.assert_array_equal(b_trunc, s_trunc)
        assert b_term.dtype == b_trunc.dtype == np.bool_
        _compare_prompt_info(b_info, s_info)
        done = s_term | s_trunc
        n_done += int(done.sum())
        nonzero_rewards += int(np.count_nonzero(s_rew))
        if mode == "same_step":
            assert ("_final_obs" in b_info) == bool(done.any())
            if done.any():
                np.testing.assert_array_equal(b_info["_final_obs"], done)
                np.testing.assert_array_equal(b_info["_final_info"], done)
                for i in np.flatnonzero(done):
                    for key in ("input_ids", "attention_mask"):
                        np.testing.assert_array_equal(
                            b_info["final_obs"][key][i], s_info["final_obs"][i][key]
                        )
                b_final, s_final = b_info["final_info"], s_info["final_info"]
                np.testing.assert_array_equal(b_final["_completion"], done)
                masked_equal(b_final["completion"], s_final["completion"], done)
                masked_equal(b_final["prompt"], s_final["prompt"], done)
                for comp in ("score", "length_penalty"):
                    np.testing.assert_array_equal(
                        b_final["reward_components"][comp][done], s_final["reward_components"][comp][done]
                    )
        elif done.any():
            # next-step mode: the final info is in the infos of the step that ended the episode
            np.testing.assert_array_equal(b_info["_completion"], s_info["_completion"])
            masked_equal(b_info["completion"], s_info["completion"], done)
    # the run exercised episode ends of both kinds and the reward path
    assert n_done > 20
    if "length_penalty" in kwargs or "reward" in kwargs:
        assert nonzero_rewards > 0


@pytest.mark.parametrize("mode", MODES)
def test_equivalent_to_sync_with_list_of_seeds_and_reseeding(mode):
    N = 4
    seeds = [3, 100, 7, 3]
    sync = gym.make_vec(
        ENV_ID, num_envs=N, vectorization_mode="sync", vector_kwargs={"autoreset_mode": GYM_MODES[mode]}
    )
    batched = make_batched(N, autoreset_mode=mode)
    rng = np.random.default_rng(0)
    vocab = batched.single_action_space.n
    for reset_seed in (seeds, 21, [None, 5, None, 6]):
        s_obs, s_info = sync.reset(seed=reset_seed)
        b_obs, b_info = batched.reset(seed=reset_seed)
        if reset_seed is seeds:
            # equal seeds give equal sub-envs
            np.testing.assert_array_equal(b_obs["input_ids"][0], b_obs["input_ids"][3])
        _compare_obs(b_obs, s_obs)
        _compare_prompt_info(b_info, s_info)
        for _ in range(30):
            acts = random_actions(rng, N, vocab)
            s_out, b_out = sync.step(acts), batched.step(acts)
            _compare_obs(b_out[0], s_out[0])
            for s_arr, b_arr in zip(s_out[1:4], b_out[1:4], strict=True):
                np.testing.assert_array_equal(b_arr, s_arr)


def test_reset_with_wrong_number_of_seeds_raises():
    env = make_batched(3)
    with pytest.raises(ValueError, match="num_envs=3"):
        env.reset(seed=[1, 2])


def test_same_seed_reproduces_and_different_seeds_differ():
    env = make_batched(16)
    a, _ = env.reset(seed=1)
    b, _ = env.reset(seed=1)
    c, _ = env.reset(seed=2)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    # seed s gives sub-env i the seed s + i: sub-env 1 of seed 1 is sub-env 0 of seed 2
    np.testing.assert_array_equal(a["input_ids"][1:], c["input_ids"][:-1])


# ------------------------------------------------------------------- reward model batching
@pytest.mark.parametrize("mode", MODES)
def test_reward_model_called_once_per_step_with_finished_episodes(mode):
    N = 12
    reward = RecordingReward()
    env = make_batched(N, reward=reward, autoreset_mode=mode)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    vocab = env.single_action_space.n
    for _ in range(80):
        before = len(reward.calls)
        _, _, term, trunc, _ = env.step(random_actions(rng, N, vocab, p_eos=0.2))
        done = term | trunc
        new_calls = reward.calls[before:]
        if done.any():
            assert new_calls == [int(done.sum())]
        else:
            assert new_calls == []
    assert max(reward.calls) > 1  # some steps did batch several episodes


# ---------------------------------------------------------------- next-step autoreset semantics
def test_next_step_autoreset_returns_fresh_prompt_and_ignores_action():
    N = 8
    kwargs = {"task": "sentiment", "length_penalty": 0.1}
    env_a = make_batched(N, **kwargs)
    env_b = make_batched(N, **kwargs)
    P = env_a.prompt_window
    tok = env_a.tokenizer
    env_a.reset(seed=4)
    env_b.reset(seed=4)
    rng = np.random.default_rng(2)
    vocab = env_a.single_action_space.n
    prev_done = np.zeros(N, dtype=bool)
    autoreset_steps = 0
    for _ in range(60):
        acts = random_actions(rng, N, vocab, p_eos=0.3)
        acts_b = acts.copy()
        # on autoreset rows, env_b gets other actions: they must make no difference
        acts_b[prev_done] = np.where(acts[prev_done] == EOS, 5, EOS)
        obs, rew, term, trunc, info = env_a.step(acts)
        obs_b, rew_b, term_b, trunc_b, _ = env_b.step(acts_b)
        np.testing.assert_array_equal(obs["input_ids"], obs_b["input_ids"])
        np.testing.assert_array_equal(rew, rew_b)
        np.testing.assert_array_equal(term, term_b)
        np.testing.assert_array_equal(trunc, trunc_b)
        for i in np.flatnonzero(prev_done):
            autoreset_steps += 1
            assert rew[i] == 0.0  # no length penalty on the reset step either
            assert not term[i] and not trunc[i]
            assert info["_prompt"][i]
            prompt_ids = [tok.bos_id, *tok.encode(info["prompt"][i])]
            np.testing.assert_array_equal(obs["input_ids"][i, P - len(prompt_ids) : P], prompt_ids)
            assert (obs["input_ids"][i, P:] == tok.pad_id).all()
            assert (obs["attention_mask"][i, P:] == 0).all()
        active = ~prev_done
        # every active sub-env pays the length penalty, plus its score when it ends
        assert (rew[active & ~(term | trunc)] == -0.1).all()
        prev_done = term | trunc
    assert autoreset_steps > 10


def test_next_step_autoreset_reward_is_positive_zero_as_sync():
    # the reset step pays no length penalty: +0.0 as SyncVectorEnv gives, not 0.0 * -penalty = -0.0
    kwargs = {"task": "arithmetic", "length_penalty": 0.5}
    env = make_batched(3, **kwargs)
    sync = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="sync", **kwargs)
    env.reset(seed=0)
    sync.reset(seed=0)
    for acts in ([EOS, 5, 5], [5, 5, 5]):
        _, rew, *_ = env.step(np.array(acts))
        _, s_rew, *_ = sync.step(np.array(acts))
        np.testing.assert_array_equal(np.signbit(rew), np.signbit(s_rew))
    assert rew[0] == 0.0 and not np.signbit(rew[0])


# ------------------------------------------------------------------- RecordEpisodeStatistics
@pytest.mark.parametrize("mode", MODES)
def test_record_episode_statistics_matches_own_accounting(mode):
    N = 6
    env = RecordEpisodeStatistics(
        make_batched(N, task="keyword", length_penalty=0.02, autoreset_mode=mode), buffer_length=1000
    )
    env.reset(seed=9)
    rng = np.random.default_rng(3)
    vocab = env.single_action_space.n
    returns, lengths = np.zeros(N), np.zeros(N, dtype=int)
    prev_done = np.zeros(N, dtype=bool)
    expected_returns: list[float] = []
    expected_lengths: list[int] = []
    for _ in range(120):
        _, rew, term, trunc, info = env.step(random_actions(rng, N, vocab))
        done = term | trunc
        if mode == "next_step":
            # the step after an end is the reset step: not part of any episode
            returns[prev_done], lengths[prev_done] = 0.0, 0
            returns[~prev_done] += rew[~prev_done]
            lengths[~prev_done] += 1
        else:
            returns += rew
            lengths += 1
        if done.any():
            np.testing.assert_array_equal(info["_episode"], done)
            np.testing.assert_allclose(info["episode"]["r"][done], returns[done])
            np.testing.assert_array_equal(info["episode"]["l"][done], lengths[done])
            expected_returns.extend(returns[done].tolist())
            expected_lengths.extend(lengths[done].tolist())
        else:
            assert "episode" not in info
        if mode == "same_step":
            returns[done], lengths[done] = 0.0, 0
        prev_done = done
    assert len(expected_lengths) > 20
    max_new = env.unwrapped.config.max_new_tokens
    assert all(1 <= n <= max_new for n in expected_lengths)
    np.testing.assert_allclose(list(env.return_queue), expected_returns)
    assert list(env.length_queue) == expected_lengths


# ------------------------------------------------------------------------- torch arrays
@pytest.mark.parametrize("mode", MODES)
def test_torch_array_type_matches_numpy(mode):
    N = 8
    env_np = make_batched(N, autoreset_mode=mode, length_penalty=0.01)
    env_t = make_batched(N, autoreset_mode=mode, length_penalty=0.01, array_type="torch")
    o_np, _ = env_np.reset(seed=2)
    o_t, _ = env_t.reset(seed=2)
    for key in o_np:
        assert isinstance(o_t[key], torch.Tensor)
        assert o_t[key].device == env_t.device
        np.testing.assert_array_equal(o_t[key].cpu().numpy(), o_np[key])
    rng = np.random.default_rng(4)
    vocab = env_np.single_action_space.n
    n_done = 0
    for step in range(60):
        acts = random_actions(rng, N, vocab)
        # alternate numpy and torch actions for the torch env (int32 tensors too)
        acts_t = torch.as_tensor(acts, dtype=torch.int32 if step % 2 else torch.int64)
        np_out = env_np.step(acts)
        t_out = env_t.step(acts_t)
        for key in np_out[0]:
            assert isinstance(t_out[0][key], torch.Tensor)
            np.testing.assert_array_equal(t_out[0][key].cpu().numpy(), np_out[0][key])
        for np_arr, t_arr in zip(np_out[1:4], t_out[1:4], strict=True):
            assert isinstance(t_arr, torch.Tensor)
            assert t_arr.device == env_t.device
            np.testing.assert_array_equal(t_arr.cpu().numpy(), np_arr)
        assert t_out[2].dtype == t_out[3].dtype == torch.bool
        done = np_out[2] | np_out[3]
        n_done += int(done.sum())
        if mode == "same_step" and done.any():
            for key in ("input_ids", "attention_mask"):
                np.testing.assert_array_equal(
                    t_out[4]["final_obs"][key].cpu().numpy()[done], np_out[4]["final_obs"][key][done]
                )
    assert n_done > 10


def test_numpy_env_accepts_torch_actions_and_lists():
    N = 4
    env_a, env_b, env_c = make_batched(N), make_batched(N), make_batched(N)
    for env in (env_a, env_b, env_c):
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        acts = random_actions(rng, N, env_a.single_action_space.n)
        out_a = env_a.step(acts)
        out_b = env_b.step(torch.as_tensor(acts))
        out_c = env_c.step([int(a) for a in acts])
        for out in (out_b, out_c):
            np.testing.assert_array_equal(out[0]["input_ids"], out_a[0]["input_ids"])
            np.testing.assert_array_equal(out[1], out_a[1])


@pytest.mark.parametrize("array_type", ["numpy", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_returned_observations_are_not_aliased(array_type, mode):
    N = 4
    env = make_batched(N, task="keyword", autoreset_mode=mode, array_type=array_type)
    as_np = (lambda x: x.cpu().numpy().copy()) if array_type == "torch" else (lambda x: x.copy())
    obs0, _ = env.reset(seed=0)
    kept = [(obs0, {k: as_np(v) for k, v in obs0.items()})]
    rng = np.random.default_rng(0)
    vocab = env.single_action_space.n
    for _ in range(25):
        obs, *_rest, info = env.step(random_actions(rng, N, vocab, p_eos=0.1))
        kept.append((obs, {k: as_np(v) for k, v in obs.items()}))
        if "final_obs" in info:
            kept.append((info["final_obs"], {k: as_np(v) for k, v in info["final_obs"].items()}))
    for returned, snapshot in kept:
        for key in snapshot:
            value = returned[key]
            value = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
            np.testing.assert_array_equal(value, snapshot[key])
    # the env kept moving: the first and last observations differ
    assert not np.array_equal(kept[0][1]["input_ids"], kept[-1][1]["input_ids"])


def test_reset_observation_not_aliased_with_step_writes():
    env = make_batched(3)
    obs, _ = env.reset(seed=0)
    before = obs["input_ids"].copy()
    obs["input_ids"][:] = 7  # writing into a returned obs does not reach the env either
    out, *_ = env.step(np.full(3, 5))
    P = env.prompt_window
    np.testing.assert_array_equal(out["input_ids"][:, :P], before[:, :P])
    assert (out["input_ids"][:, P] == 5).all()
    np.testing.assert_array_equal(obs["input_ids"], 7)


# ------------------------------------------------------------------ reset mask, device, timings
def test_reset_mask_resets_only_masked_rows():
    N = 5
    env = make_batched(N, task="keyword")
    P = env.prompt_window
    env.reset(seed=0)
    for _ in range(3):
        obs, _, term, trunc, _ = env.step(np.full(N, 7))
    assert not (term | trunc).any()
    mask = np.array([True, False, True, False, False])
    new_obs, info = env.reset(seed=50, options={"reset_mask": mask})
    np.testing.assert_array_equal(info["_prompt"], mask)
    # unmasked rows keep their three generated tokens
    np.testing.assert_array_equal(new_obs["input_ids"][~mask], obs["input_ids"][~mask])
    assert (new_obs["input_ids"][~mask, P : P + 3] == 7).all()
    # masked rows are fresh episodes with the seeds 50 + i
    assert (new_obs["attention_mask"][mask, P:] == 0).all()
    fresh = make_batched(N, task="keyword")
    fresh_obs, _ = fresh.reset(seed=50)
    np.testing.assert_array_equal(new_obs["input_ids"][mask], fresh_obs["input_ids"][mask])
    # the next step continues unmasked rows at column P+3 and masked rows at column P
    out, *_ = env.step(np.full(N, 8))
    assert (out["input_ids"][mask, P] == 8).all()
    assert (out["input_ids"][~mask, P + 3] == 8).all()


def test_reset_mask_clears_pending_next_step_autoreset():
    N = 3
    env = make_batched(N)
    env.reset(seed=0)
    _, _, term, _, _ = env.step(np.array([EOS, 5, 5]))
    assert term.tolist() == [True, False, False]
    env.reset(options={"reset_mask": np.array([True, False, False])})
    # row 0 was reset by hand: its next action is used, not swallowed by an autoreset
    obs, _, term, _, _ = env.step(np.array([EOS, 5, 5]))
    assert term.tolist() == [True, False, False]
    assert obs["input_ids"][0, env.prompt_window] == EOS


@pytest.mark.parametrize("bad_mask", [np.ones(4, dtype=bool), np.ones(3, dtype=int), [True, True, True]])
def test_reset_mask_validation(bad_mask):
    env = make_batched(3)
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": bad_mask})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of device='auto'")
def test_device_auto_on_cpu():
    env = make_batched(3, device="auto")
    assert env.device == torch.device("cpu")
    obs, _ = env.reset(seed=0)
    env.step(np.zeros(3, dtype=np.int64))
    ref = make_batched(3)
    ref_obs, _ = ref.reset(seed=0)
    np.testing.assert_array_equal(obs["input_ids"], ref_obs["input_ids"])


def test_timings_increase():
    # the key names are the env's own business: every entry is a float that never decreases, a
    # step increases the step time, and a step that ends episodes also the decode/reward time
    env = make_batched(4, task="arithmetic")
    env.reset(seed=0)
    start = dict(env.timings)
    assert start
    assert all(isinstance(v, float) and v >= 0.0 for v in start.values())
    env.step(np.full(4, 5))
    after_one = dict(env.timings)
    grown_one = {k for k in start if after_one[k] > start[k]}
    assert grown_one
    env.step(np.full(4, EOS))  # every episode ends: the decode/reward path runs
    after_two = dict(env.timings)
    grown_two = {k for k in start if after_two[k] > after_one[k]}
    assert all(after_two[k] >= after_one[k] >= start[k] for k in start)
    assert grown_two > grown_one


# ------------------------------------------------------------------------------- bad input
@pytest.fixture
def env4():
    env = make_batched(4, task="arithmetic")
    env.reset(seed=0)
    return env


@pytest.mark.parametrize(
    "actions", [np.zeros(3, dtype=np.int64), np.zeros((4, 1), dtype=np.int64), np.int64(5), [1, 2, 3, 4, 5]]
)
def test_actions_of_wrong_shape(env4, actions):
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env4.step(actions)


def test_torch_actions_of_wrong_shape(env4):
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env4.step(torch.zeros((4, 1), dtype=torch.long))


@pytest.mark.parametrize(
    ("actions", "match"),
    [
        (np.array([1.0, 2.0, 3.0, 4.0]), "float64"),
        (np.array([True, False, True, False]), "bool"),
        (np.array(["a", "b", "c", "d"]), "integer token ids"),
        (np.array([1, 2, 3, None], dtype=object), r"sub-env 3: None"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "float32"),
        (torch.tensor([True, False, True, False]), "bool"),
    ],
)
def test_actions_of_wrong_dtype(env4, actions, match):
    with pytest.raises(TypeError, match=match):
        env4.step(actions)


@pytest.mark.parametrize("index", [0, 2, 3])
@pytest.mark.parametrize("kind", ["negative", "vocab_size"])
def test_actions_out_of_range_name_index(env4, index, kind):
    V = env4.single_action_space.n
    bad = -1 if kind == "negative" else V
    actions = np.full(4, 5, dtype=np.int64)
    actions[index] = bad
    with pytest.raises(ValueError, match=rf"actions\[{index}\] = {bad} \(sub-env {index}\).*\[0, {V}\)"):
        env4.step(actions)
    with pytest.raises(ValueError, match=rf"actions\[{index}\] = {bad}"):
        env4.step(torch.as_tensor(actions))


def test_bad_actions_do_not_change_state(env4):
    obs, _ = env4.reset(seed=1)
    with pytest.raises(ValueError):
        env4.step(np.array([5, 5, -1, 5]))
    out, *_ = env4.step(np.array([5, 5, 5, 5]))
    P = env4.prompt_window
    np.testing.assert_array_equal(out["input_ids"][:, :P], obs["input_ids"][:, :P])
    assert (out["input_ids"][:, P] == 5).all()
    assert (out["input_ids"][:, P + 1] == 0).all()


def test_step_before_reset_raises_reset_needed():
    env = make_batched(2)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("num_envs", [0, -1, 2.5, True, "4"])
def test_bad_num_envs(num_envs):
    with pytest.raises(ValueError, match="num_envs"):
        gym.make_vec(ENV_ID, num_envs=num_envs)
    with pytest.raises(ValueError, match="num_envs"):
        TextGenVectorEnv(num_envs=num_envs)


def test_numpy_integer_num_envs_accepted():
    env = TextGenVectorEnv(num_envs=np.int64(3))
    assert env.num_envs == 3
    assert type(env.num_envs) is int


def test_unknown_device():
    with pytest.raises(ValueError, match=r"tpu.*accepted: cpu, cuda, auto"):
        make_batched(2, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda(device):
    with pytest.raises(ValueError, match=r"CUDA is not available.*'cpu' or 'auto'"):
        make_batched(2, device=device)


@pytest.mark.parametrize("mode", ["sometimes", "disabled", "Disabled", AutoresetMode.DISABLED, None])
def test_bad_autoreset_mode(mode):
    with pytest.raises(ValueError, match="autoreset_mode must be 'next_step', 'same_step'"):
        make_batched(2, autoreset_mode=mode)


@pytest.mark.parametrize("array_type", ["jax", "Torch", None])
def test_bad_array_type(array_type):
    with pytest.raises(ValueError, match="array_type must be one of numpy, torch"):
        make_batched(2, array_type=array_type)


def test_bad_render_mode():
    with pytest.raises(ValueError, match="render_mode"):
        make_batched(2, render_mode="human")


_FAIL = {"armed": False}


def failing_reward(prompt: str, completion: str) -> float:
    if _FAIL["armed"]:
        raise ZeroDivisionError("boom")
    return 1.0


@pytest.mark.parametrize("mode", MODES)
def test_reward_model_error_needs_reset(mode):
    N = 3
    env = make_batched(N, reward=failing_reward, autoreset_mode=mode)
    env.reset(seed=0)
    _FAIL["armed"] = True
    try:
        env.step(np.array([5, 5, 5]))  # no episode ends: the reward is not asked
        with pytest.raises(RewardModelError, match=r"failing_reward.*ZeroDivisionError: boom"):
            env.step(np.array([5, EOS, 5]))
        for _ in range(2):
            with pytest.raises(ResetNeeded, match="reward model error"):
                env.step(np.array([5, 5, 5]))
    finally:
        _FAIL["armed"] = False
    obs, _ = env.reset(seed=0)
    P = env.prompt_window
    assert (obs["attention_mask"][:, P:] == 0).all()
    _, rew, term, _, _ = env.step(np.array([EOS, 5, 5]))
    assert term.tolist() == [True, False, False]
    assert rew.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("ending", ["truncated", "terminated"])
def test_partial_reset_after_reward_error_keeps_failed_rows_blocked(ending):
    N = 3
    env = make_batched(N, task="arithmetic", reward=failing_reward)
    M = env.config.max_new_tokens
    env.reset(seed=0)
    if ending == "truncated":  # sub-env 1 reaches max_new_tokens, the others emit <eos>
        for _ in range(M - 1):
            env.step(np.array([5, 5, 5]))
        last = np.array([EOS, 5, EOS])
    else:  # only sub-env 1 ends, with <eos> as its first token
        last = np.array([5, EOS, 5])
    _FAIL["armed"] = True
    try:
        with pytest.raises(RewardModelError):
            env.step(last)
    finally:
        _FAIL["armed"] = False
    # sub-env 1 ended in the failing step; this reset leaves it out
    env.reset(options={"reset_mask": np.array([True, False, True])})
    with pytest.raises(ResetNeeded):
        env.step(np.array([5, 5, 5]))


def test_first_reset_with_partial_mask_does_not_start_empty_episodes():
    env = make_batched(3)
    with pytest.raises((ResetNeeded, ValueError)):
        env.reset(options={"reset_mask": np.array([True, False, False])})
        env.step(np.array([5, 5, 5]))


def test_reset_options_other_than_reset_mask_honoured_or_refused():
    N = 3
    sync = gym.make_vec(ENV_ID, num_envs=N, vectorization_mode="sync")
    _, s_info = sync.reset(seed=0, options={"prompt_index": 3})
    env = make_batched(N)
    try:
        _, b_info = env.reset(seed=0, options={"prompt_index": 3})
    except ValueError as exc:
        assert "prompt_index" in str(exc)
    else:
        assert list(b_info["prompt"]) == list(s_info["prompt"])


# -------------------------------------------------------------------------------- render
def test_render_ansi_returns_one_string_per_sub_env():
    N = 3
    env = make_batched(N, task="arithmetic", render_mode="ansi")
    _, info = env.reset(seed=0)
    text = env.render()
    assert isinstance(text, tuple)
    assert len(text) == N
    for i, t in enumerate(text):
        assert isinstance(t, str)
        assert t == f"{info['prompt'][i]} | "
    digit = env.tokenizer.encode("7")
    env.step(np.full(N, digit[0]))
    env.step(np.full(N, digit[0]))
    for i, t in enumerate(env.render()):
        assert t == f"{info['prompt'][i]} | 77"


def test_render_without_mode_returns_none():
    env = make_batched(2)
    env.reset(seed=0)
    assert env.render() is None


# --------------------------------------------------------------------------- a large batch
@pytest.mark.parametrize("mode", MODES)
def test_large_batch(mode):
    N = 1024
    env = make_batched(N, autoreset_mode=mode, length_penalty=0.01)
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"].shape == (N, env.single_observation_space["input_ids"].shape[0])
    rng = np.random.default_rng(0)
    vocab = env.single_action_space.n
    n_done = 0
    for _ in range(50):
        obs, rew, term, trunc, _ = env.step(random_actions(rng, N, vocab))
        assert rew.shape == term.shape == trunc.shape == (N,)
        assert np.isfinite(rew).all()
        n_done += int((term | trunc).sum())
    assert obs in env.observation_space
    assert n_done > N
