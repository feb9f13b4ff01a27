"""Tests of the single-episode face ``TextGen-v0`` (:class:`textgym.env.TextGenEnv`)."""

from __future__ import annotations

import math
import pickle
import re
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textgym
from textgym import RewardModelError, TextGenEnv

PAD, BOS, EOS, UNK = 0, 1, 2, 3
ALL_TASKS = ["default", *textgym.TASKS]


# ----------------------------------------------------------------------------------------------
# helpers


def char_count(prompt: str, completion: str) -> float:
    """A module-level (hence picklable) reward: the number of characters of the completion."""
    return float(len(completion))


def make(**kwargs) -> gym.Env:
    return gym.make("TextGen-v0", **kwargs)


def ids_of(env: gym.Env, *tokens: str) -> list[int]:
    """Token ids of vocabulary entries of the env's (table) tokenizer; fails on unknown entries."""
    tok = env.unwrapped.tokenizer
    ids = [tok.token_to_id(t) for t in tokens]
    assert UNK not in ids, f"not all of {tokens} are in the vocabulary"
    return ids


def run(env: gym.Env, actions) -> list[tuple]:
    """Step ``actions`` until the episode ends; the list of step results."""
    out = []
    for a in actions:
        out.append(env.step(a))
        if out[-1][2] or out[-1][3]:
            break
    return out


def assert_full_episode(env: gym.Env) -> None:
    """From a fresh reset, ``max_new_tokens`` non-eos tokens run and truncate at the last one."""
    M = env.unwrapped.config.max_new_tokens
    filler = env.unwrapped.action_space.n - 1  # the last id: an ordinary token, never <eos>
    env.reset()
    for t in range(M):
        _, _, terminated, truncated, _ = env.step(filler)
        assert not terminated
        assert truncated == (t == M - 1)


def assert_same_step(a: tuple, b: tuple) -> None:
    obs_a, *rest_a = a
    obs_b, *rest_b = b
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(obs_a[key], obs_b[key])
    assert rest_a == rest_b


# ----------------------------------------------------------------------------------------------
# checkers


@pytest.mark.parametrize("task", ALL_TASKS)
def test_gymnasium_and_sb3_env_checkers_pass_without_warnings(task):
    env = make(task=task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


# ----------------------------------------------------------------------------------------------
# registration


def test_registered_id_makes_a_text_gen_env():
    env = gym.make("TextGen-v0")
    assert isinstance(env.unwrapped, TextGenEnv)
    assert env.spec.id == "TextGen-v0" == textgym.ENV_ID
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert info["prompt"] in env.unwrapped.config.prompts


def test_namespaced_id_imports_the_package_in_a_fresh_interpreter():
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'textgym' not in sys.modules\n"
        "env = gym.make('textgym:TextGen-v0', task='arithmetic')\n"
        "obs, info = env.reset(seed=0)\n"
        "env.step(2)\n"
        "print(type(env.unwrapped).__module__, type(env.unwrapped).__name__, info['prompt'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"textgym\.env TextGenEnv \d+\+\d+=", proc.stdout), proc.stdout


def test_spec_has_a_vector_entry_point():
    spec = gym.spec("TextGen-v0")
    assert spec.entry_point == "textgym.env:TextGenEnv"
    assert spec.vector_entry_point == "textgym.vector:TextGenVectorEnv"
    venv = gym.make_vec("TextGen-v0", num_envs=2)
    assert isinstance(venv.unwrapped, textgym.TextGenVectorEnv)
    assert venv.num_envs == 2
    venv.close()


# ----------------------------------------------------------------------------------------------
# spaces and layout


@pytest.mark.parametrize("task", ALL_TASKS)
def test_spaces(task):
    env = make(task=task)
    cfg = env.unwrapped.config
    L = cfg.max_prompt_tokens + cfg.max_new_tokens
    V = env.unwrapped.tokenizer.vocab_size
    assert env.action_space == spaces.Discrete(V)
    space = env.observation_space
    assert isinstance(space, spaces.Dict)
    assert set(space.spaces) == {"input_ids", "attention_mask"}
    for key, high in (("input_ids", V - 1), ("attention_mask", 1)):
        sub = space[key]
        assert isinstance(sub, spaces.Box) and not isinstance(sub, spaces.MultiDiscrete)
        assert sub.dtype == np.int64
        assert sub.shape == (L,)
        assert np.all(sub.low == 0) and np.all(sub.high == high)
    assert env.unwrapped.prompt_window == cfg.max_prompt_tokens


@pytest.mark.parametrize("task", ALL_TASKS)
def test_prompt_is_left_padded_starts_with_bos_and_ends_at_p_minus_1(task):
    env = make(task=task)
    P = env.unwrapped.prompt_window
    tok = env.unwrapped.tokenizer
    prompts = env.unwrapped.config.prompts
    lengths = set()
    for i in range(0, len(prompts), max(1, len(prompts) // 12)):
        obs, info = env.reset(options={"prompt_index": i})
        assert info["prompt"] == prompts[i]
        ids, mask = obs["input_ids"], obs["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64
        n = len(tok.encode(prompts[i])) + 1
        lengths.add(n)
        np.testing.assert_array_equal(ids[: P - n], PAD)
        np.testing.assert_array_equal(mask[: P - n], 0)
        assert ids[P - n] == BOS
        np.testing.assert_array_equal(ids[P - n : P], [BOS, *tok.encode(prompts[i])])
        np.testing.assert_array_equal(mask[P - n : P], 1)
        np.testing.assert_array_equal(ids[P:], PAD)  # nothing generated yet
        np.testing.assert_array_equal(mask[P:], 0)
        assert obs in env.observation_space
    # the task's longest prompt fills the window exactly when max_prompt_tokens is left None: that
    # of all its splits, which share one window (reviews draws from "train" by default)
    assert max(len(tok.encode(p)) + 1 for p in prompts) <= P
    assert max(len(tok.encode(p)) + 1 for p in textgym.get_task(task).prompts) == P


def test_prompt_window_with_explicit_max_prompt_tokens_and_mixed_lengths():
    env = make(prompts=["the food", "the food was very good"], max_prompt_tokens=9)
    P = env.unwrapped.prompt_window
    assert P == 9
    obs, _ = env.reset(options={"prompt_index": 0})
    np.testing.assert_array_equal(obs["input_ids"][:P], [0, 0, 0, 0, 0, 0, BOS, *ids_of(env, "the", "food")])
    np.testing.assert_array_equal(obs["attention_mask"][:P], [0] * 6 + [1] * 3)
    obs, _ = env.reset(options={"prompt_index": 1})
    np.testing.assert_array_equal(
        obs["input_ids"][:P], [0, 0, 0, BOS, *ids_of(env, "the", "food", "was", "very", "good")]
    )


def test_generated_token_t_lands_at_column_p_plus_t_and_turns_the_mask_on():
    env = make(max_new_tokens=5)
    P = env.unwrapped.prompt_window
    obs0, _ = env.reset(seed=1)
    actions = ids_of(env, "great", "food", "and", "great", "coffee")
    prev = obs0
    for t, a in enumerate(actions):
        obs, *_ = env.step(a)
        assert obs in env.observation_space
        assert obs["input_ids"][P + t] == a
        assert obs["attention_mask"][P + t] == 1
        # everything before column P + t is as it was, everything after still padding
        np.testing.assert_array_equal(obs["input_ids"][: P + t], prev["input_ids"][: P + t])
        np.testing.assert_array_equal(obs["attention_mask"][: P + t], prev["attention_mask"][: P + t])
        np.testing.assert_array_equal(obs["input_ids"][P + t + 1 :], PAD)
        np.testing.assert_array_equal(obs["attention_mask"][P + t + 1 :], 0)
        assert obs["attention_mask"].sum() == obs0["attention_mask"].sum() + t + 1
        prev = obs
    np.testing.assert_array_equal(prev["input_ids"][P:], actions)


def test_returned_observations_are_copies():
    env = make()
    obs, _ = env.reset(seed=0)
    P = env.unwrapped.prompt_window
    prompt_ids = obs["input_ids"][:P].copy()
    obs["input_ids"][:] = 5
    obs["attention_mask"][:] = 0
    obs2, *_ = env.step(ids_of(env, "great")[0])
    np.testing.assert_array_equal(obs2["input_ids"][:P], prompt_ids)
    assert obs2["attention_mask"][P - 1] == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_action_sequence_keeps_the_layout_and_ends_at_eos_or_the_budget(data):
    env = _property_env()
    P, M = env.unwrapped.prompt_window, env.unwrapped.config.max_new_tokens
    V = env.action_space.n
    tok = env.unwrapped.tokenizer
    index = data.draw(st.integers(0, len(env.unwrapped.config.prompts) - 1), label="prompt_index")
    actions = data.draw(
        st.lists(st.one_of(st.just(EOS), st.integers(0, V - 1)), min_size=M, max_size=M), label="actions"
    )
    obs0, _ = env.reset(options={"prompt_index": index})
    steps = run(env, actions)
    end = actions.index(EOS) + 1 if EOS in actions else M
    assert len(steps) == end
    for t, (obs, reward, terminated, truncated, info) in enumerate(steps):
        assert obs in env.observation_space
        np.testing.assert_array_equal(obs["input_ids"][:P], obs0["input_ids"][:P])
        np.testing.assert_array_equal(obs["input_ids"][P : P + t + 1], actions[: t + 1])
        np.testing.assert_array_equal(obs["attention_mask"][P : P + t + 1], 1)
        np.testing.assert_array_equal(obs["attention_mask"][P + t + 1 :], 0)
        last = t == end - 1
        assert terminated == (last and actions[t] == EOS)
        assert truncated == (last and actions[t] != EOS)
        if not last:
            assert reward == 0.0
            assert "completion" not in info
    info, reward = steps[-1][4], steps[-1][1]
    kept = actions[: end - 1] if steps[-1][2] else actions[:end]
    assert info["completion"] == tok.decode(kept)
    assert reward == float(len(info["completion"]))


_PROPERTY_ENV: list[gym.Env] = []


def _property_env() -> gym.Env:
    if not _PROPERTY_ENV:
        _PROPERTY_ENV.append(make(reward=char_count, max_new_tokens=6))
    return _PROPERTY_ENV[0]


# ----------------------------------------------------------------------------------------------
# episode end and rewards


def test_eos_terminates():
    env = make()
    env.reset(seed=0)
    great = ids_of(env, "great")[0]
    _, reward, terminated, truncated, info = env.step(great)
    assert (terminated, truncated, info) == (False, False, {})
    assert reward == 0.0
    _, reward, terminated, truncated, info = env.step(EOS)
    assert terminated is True and truncated is False
    assert info["completion"] == "great"


def test_eos_as_first_action_gives_an_empty_completion():
    calls = []

    def record(prompt, completion):
        calls.append(completion)
        return 0.5

    env = make(reward=record)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(EOS)
    assert terminated and not truncated
    assert info["completion"] == "" and calls == [""]
    assert reward == 0.5


@pytest.mark.parametrize("task", ALL_TASKS)
def test_budget_of_non_eos_tokens_truncates_exactly_at_the_last_step(task):
    env = make(task=task)
    M = env.unwrapped.config.max_new_tokens
    token = env.action_space.n - 1
    assert token != EOS
    env.reset(seed=0)
    for t in range(M):
        _, reward, terminated, truncated, info = env.step(token)
        assert terminated is False
        assert truncated is (t == M - 1)
        if t < M - 1:
            assert reward == 0.0 and info == {}
    assert set(info) >= {"prompt", "completion", "reward_components"}


def test_custom_max_new_tokens_truncates_there():
    env = make(max_new_tokens=3)
    env.reset(seed=0)
    steps = run(env, ids_of(env, "the", "food", "was", "great"))
    assert [(s[2], s[3]) for s in steps] == [(False, False), (False, False), (False, True)]
    assert steps[-1][4]["completion"] == "the food was"


def test_final_reward_is_the_reward_models_score_with_the_builtin_sentiment_model():
    env = make()
    _, start = env.reset(seed=0)
    actions = [*ids_of(env, "great", "and", "delicious"), EOS]
    steps = run(env, actions)
    reward, info = steps[-1][1], steps[-1][4]
    assert info["prompt"] == start["prompt"]
    assert info["completion"] == "great and delicious"
    expected = float(env.unwrapped.config.reward([info["prompt"]], [info["completion"]])[0])
    assert expected > 0  # a positive completion: a meaningful comparison
    assert reward == pytest.approx(expected)
    assert info["reward_components"] == {"score": pytest.approx(expected), "length_penalty": 0.0}
    assert [s[1] for s in steps[:-1]] == [0.0, 0.0, 0.0]


def test_arithmetic_exact_answer_scores_one():
    env = make(task="arithmetic")
    prompts = env.unwrapped.config.prompts
    tok = env.unwrapped.tokenizer
    env.reset(options={"prompt_index": prompts.index("5+7=")})
    steps = run(env, [tok.token_to_id("1"), tok.token_to_id("2"), EOS])
    assert steps[-1][2] and steps[-1][4]["completion"] == "12"
    assert steps[-1][1] == 1.0
    env.reset(options={"prompt_index": prompts.index("5+7=")})
    steps = run(env, [tok.token_to_id("1"), tok.token_to_id("3"), EOS])
    assert steps[-1][1] == 0.0


@pytest.mark.parametrize("penalty", [0.0, 0.25])
def test_custom_reward_function_score_and_length_penalty(penalty):
    env = make(reward=char_count, length_penalty=penalty)
    _, start = env.reset(seed=3)
    actions = [*ids_of(env, "great", "food"), EOS]
    steps = run(env, actions)
    assert len(steps) == 3
    for _, reward, *_ in steps[:-1]:
        assert reward == 0.0 - penalty
    _, reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert info["prompt"] == start["prompt"]
    assert info["completion"] == "great food"
    assert info["reward_components"] == {"score": 10.0, "length_penalty": pytest.approx(-3 * penalty)}
    assert reward == pytest.approx(10.0 - penalty)
    episode_return = sum(s[1] for s in steps)
    assert episode_return == pytest.approx(sum(info["reward_components"].values()))
    assert episode_return == pytest.approx(10.0 - 3 * penalty)


def test_reward_components_sum_to_the_return_on_truncation():
    env = make(reward=char_count, length_penalty=0.1, max_new_tokens=4)
    env.reset(seed=0)
    steps = run(env, ids_of(env, "the", "food", "was", "great"))
    info = steps[-1][4]
    assert steps[-1][3] and info["completion"] == "the food was great"
    assert info["reward_components"]["score"] == 18.0
    assert info["reward_components"]["length_penalty"] == pytest.approx(-0.4)
    assert sum(s[1] for s in steps) == pytest.approx(18.0 - 0.4)


def test_reward_model_is_called_once_per_episode_with_the_episodes_text():
    calls = []

    def counting(prompt, completion):
        calls.append((prompt, completion))
        return 1.0

    env = make(reward=counting, max_new_tokens=4)
    the, food = ids_of(env, "the", "food")
    episodes = [[EOS], [the, food, EOS], [the, food, the, food], [food, EOS]]
    expected = []
    for actions in episodes:
        _, start = env.reset()
        assert len(calls) == len(expected)
        steps = run(env, actions)
        assert len(steps) == len(actions)
        expected.append((start["prompt"], steps[-1][4]["completion"]))
        assert calls == expected
    assert [c for _, c in calls] == ["", "the food", "the food the food", "food"]


# ----------------------------------------------------------------------------------------------
# seeding


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_observations_and_trajectories(task):
    env, other = make(task=task, length_penalty=0.05), make(task=task, length_penalty=0.05)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, env.action_space.n, size=40).tolist()
    for seed in (0, 7, 12345):
        results = []
        for e in (env, env, other):
            obs, info = e.reset(seed=seed)
            results.append([(obs, info), *run(e, actions)])
        for r in results[1:]:
            assert len(r) == len(results[0])
            (obs_a, info_a), (obs_b, info_b) = results[0][0], r[0]
            assert info_a == info_b
            np.testing.assert_array_equal(obs_a["input_ids"], obs_b["input_ids"])
            for a, b in zip(results[0][1:], r[1:], strict=True):
                assert_same_step(a, b)


def test_unseeded_resets_after_a_seeded_one_are_reproducible():
    a, b = make(), make()
    a.reset(seed=5)
    b.reset(seed=5)
    prompts_a = [a.reset()[1]["prompt"] for _ in range(20)]
    prompts_b = [b.reset()[1]["prompt"] for _ in range(20)]
    assert prompts_a == prompts_b
    assert len(set(prompts_a)) > 1


@pytest.mark.parametrize("task", ALL_TASKS)
def test_different_seeds_give_different_prompts(task):
    env = make(task=task)
    prompts = [env.reset(seed=s)[1]["prompt"] for s in range(60)]
    assert len(set(prompts)) >= 15


def test_prompt_index_option_picks_that_prompt():
    env = make()
    prompts = env.unwrapped.config.prompts
    tok = env.unwrapped.tokenizer
    P = env.unwrapped.prompt_window
    for i in (0, 1, len(prompts) // 2, len(prompts) - 1, np.int64(3)):
        obs, info = env.reset(seed=int(i) + 100, options={"prompt_index": i})
        assert info["prompt"] == prompts[int(i)]
        ids = [BOS, *tok.encode(prompts[int(i)])]
        np.testing.assert_array_equal(obs["input_ids"][P - len(ids) : P], ids)
        steps = run(env, [EOS])
        assert steps[-1][4]["prompt"] == prompts[int(i)]


@pytest.mark.parametrize("bad", [-1, "n", 1.0, "0", True, [0], np.int64(-2)], ids=repr)
def test_bad_prompt_index_raises_value_error(bad):
    env = make()
    n = len(env.unwrapped.config.prompts)
    bad = n if bad == "n" else bad
    # (a good reset first: Gymnasium's PassiveEnvChecker cannot take a failing *first* reset)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"prompt_index.*\[0, {n}\).*{re.escape(repr(bad))}"):
        env.reset(options={"prompt_index": bad})
    assert_full_episode(env)


# ----------------------------------------------------------------------------------------------
# pickling


def test_pickled_env_mid_episode_continues_identically():
    env = make(reward=char_count, length_penalty=0.1, max_new_tokens=6)
    env.reset(seed=11)
    run(env, ids_of(env, "the", "food"))
    clone = pickle.loads(pickle.dumps(env))
    rest = [*ids_of(env, "was", "great"), EOS]
    a, b = run(env, rest), run(clone, rest)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert_same_step(x, y)
    assert a[-1][4]["completion"] == "the food was great"
    # the random generator travelled too: the next unseeded prompts agree
    assert [env.reset()[1]["prompt"] for _ in range(10)] == [clone.reset()[1]["prompt"] for _ in range(10)]


def test_pickled_fresh_env_with_module_level_reward_function():
    env = make(reward=char_count)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.config.reward.fn is char_count
    clone.reset(seed=0)
    steps = run(clone, [*ids_of(clone, "good"), EOS])
    assert steps[-1][1] == 4.0


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (-1, ValueError),
        ("V", ValueError),
        (1.0, TypeError),
        ("a", TypeError),
        (None, TypeError),
        ([1], TypeError),
        (np.array([1, 2]), TypeError),
        (True, TypeError),
        (np.float32(1.0), TypeError),
    ],
    ids=["neg", "V", "float", "str", "None", "list", "array2", "bool", "np_float"],
)
def test_bad_action_raises_naming_the_range_and_value(bad, error):
    env = make()
    V = int(env.action_space.n)
    bad = V if isinstance(bad, str) and bad == "V" else bad
    env.reset(seed=0)
    with pytest.raises(error, match=rf"action must be .*\[0, {V}\).*{re.escape(repr(bad))}"):
        env.step(bad)
    assert_full_episode(env)


@pytest.mark.parametrize(
    "good", [5, np.int64(5), np.int32(5), np.array(5), np.array(5, dtype=np.uint8)], ids=repr
)
def test_integer_like_actions_are_accepted(good):
    env = make()
    P = env.unwrapped.prompt_window
    env.reset(seed=0)
    obs, *_ = env.step(good)
    assert obs["input_ids"][P] == 5


def test_step_before_reset_raises_reset_needed_directly():
    env = TextGenEnv()
    with pytest.raises(ResetNeeded, match="before reset"):
        env.step(5)
    env.reset(seed=0)
    assert_full_episode(env)


def test_step_before_reset_raises_reset_needed_through_gym_make():
    env = make()
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(5)
    assert_full_episode(env)


@pytest.mark.parametrize(
    ("last", "reason"), [("eos", "terminated"), ("token", "truncated")], ids=["terminated", "truncated"]
)
def test_step_after_the_episode_ended_raises_reset_needed(last, reason):
    env = make(max_new_tokens=2)
    env.reset(seed=0)
    good = ids_of(env, "good")[0]
    steps = run(env, [good, EOS if last == "eos" else good])
    assert steps[-1][2] or steps[-1][3]
    for _ in range(2):  # keeps refusing
        with pytest.raises(ResetNeeded, match=rf"episode ended.*{reason}.*reset"):
            env.step(good)
    assert_full_episode(env)


def _flaky(bad):
    state = {"bad": True}

    def flaky_reward(prompt, completion):
        if state["bad"]:
            if isinstance(bad, Exception):
                raise bad
            return bad
        return 2.0

    return flaky_reward, state


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (ZeroDivisionError("boom"), r"'flaky_reward'.*raised ZeroDivisionError: boom"),
        (float("nan"), r"'flaky_reward' returned nan .*finite"),
        (math.inf, r"'flaky_reward' returned inf .*finite"),
        (-math.inf, r"'flaky_reward' returned -inf .*finite"),
        ("high", r"'flaky_reward' returned 'high' \(str\)"),
        (None, r"'flaky_reward' returned None \(NoneType\)"),
    ],
    ids=["raises", "nan", "inf", "-inf", "str", "None"],
)
def test_failing_reward_function_raises_reward_model_error_and_reset_recovers(bad, pattern):
    fn, state = _flaky(bad)
    env = make(reward=fn, max_new_tokens=3)
    env.reset(seed=0)
    good = ids_of(env, "good")[0]
    env.step(good)
    with pytest.raises(RewardModelError, match=pattern) as excinfo:
        env.step(EOS)
    if isinstance(bad, Exception):
        assert excinfo.value.__cause__ is bad
    with pytest.raises(ResetNeeded, match="reward model failed"):
        env.step(good)
    state["bad"] = False
    env.reset()
    steps = run(env, [good] * 3)
    assert len(steps) == 3 and steps[-1][3]
    assert steps[-1][1] == 2.0


def test_unknown_task_raises_at_construction():
    with pytest.raises(ValueError, match=r"unknown task 'poetry'.*sentiment"):
        TextGenEnv(task="poetry")
    with pytest.raises(ValueError, match=r"unknown task 'poetry'"):
        make(task="poetry")


@pytest.mark.parametrize("mode", ["rgb_array", "ANSI", ""])
def test_bad_render_mode_raises_at_construction(mode):
    with pytest.raises(ValueError, match=rf"render_mode .*'ansi'.*'human'.*got {re.escape(repr(mode))}"):
        TextGenEnv(render_mode=mode)


def test_empty_prompts_raise_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"prompts: the list holds no prompts"):
        TextGenEnv(prompts=[])
    path = tmp_path / "prompts.txt"
    path.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts: the file .*prompts\.txt.* holds no prompts"):
        TextGenEnv(prompts=path)


def test_prompt_longer_than_explicit_max_prompt_tokens_raises_at_construction():
    prompts = ["the food", "the food was very good"]  # 3 and 6 tokens with <bos>
    with pytest.raises(
        ValueError, match=r"prompt 1 .*'the food was very good'.* 6 tokens.*max_prompt_tokens=5"
    ):
        TextGenEnv(prompts=prompts, max_prompt_tokens=5)
    env = TextGenEnv(prompts=prompts, max_prompt_tokens=6)  # an exact fit is fine
    assert env.prompt_window == 6


def test_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the food was\n\nthe coffee was\n", encoding="utf-8")
    env = make(prompts=str(path))
    assert env.unwrapped.config.prompts == ("the food was", "the coffee was")
    assert env.reset(options={"prompt_index": 1})[1]["prompt"] == "the coffee was"


# ----------------------------------------------------------------------------------------------
# render


def test_render_ansi_returns_prompt_and_generated_text():
    env = make(render_mode="ansi")
    _, info = env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str) and info["prompt"] in text
    env.step(ids_of(env, "delicious")[0])
    env.step(ids_of(env, "coffee")[0])
    text = env.render()
    assert isinstance(text, str)
    assert info["prompt"] in text and "delicious coffee" in text
    assert text.index(info["prompt"]) < text.index("delicious coffee")


def test_render_human_prints(capsys):
    env = make(render_mode="human")
    _, info = env.reset(seed=0)
    env.step(ids_of(env, "delicious")[0])
    env.step(ids_of(env, "coffee")[0])
    assert env.render() is None
    out = capsys.readouterr().out
    assert info["prompt"] in out and "delicious coffee" in out


def test_render_without_render_mode_warns_and_returns_none():
    env = TextGenEnv()
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert env.render() is None


# ----------------------------------------------------------------------------------------------
# Stable-Baselines3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*render_mode='rgb_array'")  # make_vec_env's first try, then its fallback
def test_sb3_ppo_trains_on_a_dummy_vec_env():
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = make_vec_env("TextGen-v0", n_envs=4, seed=0, env_kwargs={"task": "sentiment", "max_new_tokens": 8})
    assert isinstance(venv, DummyVecEnv)
    model = PPO("MultiInputPolicy", venv, n_steps=32, batch_size=64, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=1024)
    assert model.num_timesteps >= 1024
    assert len(model.ep_info_buffer) > 0
    for ep in model.ep_info_buffer:
        assert 1 <= ep["l"] <= 8
        assert -1.0 < ep["r"] < 1.0  # the sentiment score, no length penalty


@pytest.mark.filterwarnings("ignore:.*render_mode='rgb_array'")
def test_sb3_make_vec_env_with_default_render_mode():
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs={"task": "arithmetic"})
    assert venv.reset()["input_ids"].shape[0] == 2
