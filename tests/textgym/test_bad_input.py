"""Hardening: arguments and reward models the environment must accept, or refuse with a clear error.

Each section is one item of the "hardening" issue: NumPy scalars as arguments; boolean actions in
the vector env; batched reward models that return a mapping or a set; prompts given as a mapping
or a set; reward models that mutate their inputs; sizes that cannot fit in memory; files of the
wrong kind as ``tokenizer=`` or ``prompts=``; the registered reward threshold; and the stable info
layout (``stable_info=True``) that Tianshou and TorchRL need.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textgym
from textgym import FunctionReward, LengthReward, RewardModel, RewardModelError, TextGenEnv, TextGenVectorEnv
from textgym import core as textgym_core
from textgym.checks import is_positive_int, is_real
from textgym.tasks import get_task, load_prompts, make_env_config

ENV_ID = "TextGen-v0"
EOS = 2
MODES = ["next_step", "same_step"]


def first_error(call: Any) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


# ------------------------------------------------------------------------- 1. NumPy scalars
NUMPY_INTS = [np.int8(3), np.int16(3), np.int32(3), np.int64(3), np.uint8(3), np.uint64(3)]
NUMPY_FLOATS = [np.float16(0.5), np.float32(0.5), np.float64(0.5)]
BOOLS = [True, False, np.True_, np.False_]


@pytest.mark.parametrize("value", [3, 0.5, -2, Fraction(1, 2), *NUMPY_INTS, *NUMPY_FLOATS])
def test_is_real_accepts_every_real_type(value):
    assert is_real(value) is True


@pytest.mark.parametrize("value", [*BOOLS, "3", None, 1 + 2j, np.complex64(1), [1], np.array([1.0])])
def test_is_real_refuses_bools_and_non_numbers(value):
    assert is_real(value) is False


@pytest.mark.parametrize("value", [1, 7, *NUMPY_INTS])
def test_is_positive_int_accepts_every_integer_type(value):
    assert is_positive_int(value) is True


@pytest.mark.parametrize(
    "value", [0, -1, np.int64(0), np.int32(-3), 3.0, np.float64(3.0), *BOOLS, "3", None, np.array([3])]
)
def test_is_positive_int_refuses_bools_floats_and_non_positive(value):
    assert is_positive_int(value) is False


def test_env_arguments_take_numpy_scalars_and_store_python_numbers():
    env = gym.make(
        ENV_ID,
        max_new_tokens=np.int64(5),
        max_prompt_tokens=np.int32(12),
        length_penalty=np.float32(0.25),
    )
    config = env.unwrapped.config
    assert (config.max_new_tokens, config.max_prompt_tokens, config.length_penalty) == (5, 12, 0.25)
    assert type(config.max_new_tokens) is int and type(config.max_prompt_tokens) is int
    assert type(config.length_penalty) is float
    json.dumps({"max_new_tokens": config.max_new_tokens, "length_penalty": config.length_penalty})
    assert env.observation_space["input_ids"].shape == (17,)
    env.reset(seed=0)
    _, reward, *_ = env.step(5)
    assert reward == -0.25 and type(reward) is float


def test_vector_env_takes_numpy_scalars_for_every_size():
    venv = gym.make_vec(
        ENV_ID, num_envs=np.int64(3), max_new_tokens=np.uint8(4), max_prompt_tokens=np.int16(12)
    )
    assert (venv.num_envs, venv.config.max_new_tokens, venv.config.max_prompt_tokens) == (3, 4, 12)
    assert all(type(v) is int for v in (venv.num_envs, venv.config.max_new_tokens))
    assert venv.observation_space["input_ids"].shape == (3, 16)


def test_reward_arguments_take_numpy_integers():
    model = textgym.as_reward_model({"name": "length", "target": np.int64(4)})
    assert isinstance(model, LengthReward)
    assert model.target == 4 and type(model.target) is int


def test_seeds_take_numpy_integers():
    env = gym.make(ENV_ID)
    assert env.reset(seed=np.int64(3))[1] == env.reset(seed=3)[1]
    venv = gym.make_vec(ENV_ID, num_envs=2)
    by_numpy = venv.reset(seed=[np.int64(3), np.uint8(4)])[1]["prompt"]
    assert list(by_numpy) == list(venv.reset(seed=[3, 4])[1]["prompt"])
    assert list(venv.reset(seed=np.int32(5))[1]["prompt"]) == list(venv.reset(seed=5)[1]["prompt"])


@pytest.mark.parametrize("seed", [True, np.True_, 1.0, "0"])
def test_seeds_refuse_bools_and_non_integers(seed):
    with pytest.raises(
        TypeError, match=rf"seed must be None or an integer >= 0.*got .*\({type(seed).__name__}\)"
    ):
        gym.make(ENV_ID).reset(seed=seed)
    with pytest.raises(TypeError, match=r"seed"):
        gym.make_vec(ENV_ID, num_envs=2).reset(seed=[seed, 1])


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("max_new_tokens", True),
        ("max_new_tokens", np.True_),
        ("max_new_tokens", np.float64(4.0)),
        ("max_new_tokens", np.int64(0)),
        ("max_new_tokens", "8"),
        ("max_prompt_tokens", np.bool_(True)),
        ("max_prompt_tokens", np.float32(20)),
        ("length_penalty", np.True_),
        ("length_penalty", np.float64("nan")),
        ("length_penalty", 10**400),
        ("length_penalty", "0.1"),
    ],
)
def test_bad_numeric_arguments_name_the_argument_value_type_and_what_is_accepted(argument, value):
    with pytest.raises(ValueError) as info:
        gym.make(ENV_ID, **{argument: value})
    message = str(info.value)
    assert message.startswith(f"{argument} must be")
    assert f"({type(value).__name__})" in message
    assert "accepted:" in message


@pytest.mark.parametrize("num_envs", [np.True_, np.float64(2.0), np.int64(0)])
def test_bad_num_envs_names_the_value_and_type(num_envs):
    with pytest.raises(ValueError, match=rf"num_envs must be an integer >= 1.*\({type(num_envs).__name__}\)"):
        TextGenVectorEnv(num_envs=num_envs)


# ------------------------------------------------------------- 2. boolean actions (vector env)
@pytest.fixture
def venv4() -> TextGenVectorEnv:
    env = TextGenVectorEnv(num_envs=4, task="arithmetic")
    env.reset(seed=0)
    return env


@pytest.mark.parametrize(
    ("actions", "index"),
    [
        ([True, 5, 5, 5], 0),
        ([5, 5, np.True_, 5], 2),
        ((5, 5, 5, False), 3),
        ([5, torch.tensor(True), 5, 5], 1),
        ([5, 5, np.array(False), 5], 2),
    ],
)
def test_vector_env_refuses_booleans_in_action_lists(venv4, actions, index):
    # numpy would read [True, 5, 5, 5] as [1, 5, 5, 5]: token 1, <bos>, where the single env refuses.
    before = venv4._core.tokens.clone()
    with pytest.raises(TypeError, match=rf"actions\[{index}\] \(sub-env {index}\) is .*boolean.*\[0, \d+\)"):
        venv4.step(actions)
    assert torch.equal(venv4._core.tokens, before)
    venv4.step([5, 5, 5, 5])  # still steppable


@pytest.mark.parametrize(
    "actions", [np.array([True, False, True, False]), torch.tensor([True, False, True, False]), [True] * 4]
)
def test_vector_env_refuses_boolean_arrays_and_tensors(venv4, actions):
    with pytest.raises(TypeError, match=r"bool.*accepted: 4 integer token ids"):
        venv4.step(actions)


def test_single_env_refuses_booleans_too():
    env = gym.make(ENV_ID)
    env.reset(seed=0)
    for action in (True, np.True_, np.array(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="action must be one integer token id"):
            env.step(action)


# ------------------------------------------------------------ 3. mappings and sets as scores
@pytest.mark.parametrize(
    ("returned", "kind"),
    [
        ({0.5: "a", 1.0: "b"}, "dict"),
        ({0.5, 1.0}, "set"),
        (frozenset({0.5, 1.0}), "frozenset"),
        ("ab", "str"),
        (b"ab", "bytes"),
    ],
)
def test_batched_reward_model_returning_a_mapping_or_set_is_refused(returned, kind):
    # Iterating them gives keys, an arbitrary order or characters: never the scores, in order.
    model = FunctionReward(lambda p, c: returned, batched=True, name="junk")
    with pytest.raises(RewardModelError, match=rf"reward model 'junk' returned .*\({kind}\); .*2 in all"):
        model(["a", "b"], ["x", "y"])


def test_reward_model_returning_dict_values_through_the_env_is_refused():
    venv = TextGenVectorEnv(
        num_envs=2,
        task="arithmetic",
        reward=FunctionReward(lambda p, c: {1.0: 0, 2.0: 1}, batched=True, name="d"),
    )
    venv.reset(seed=0)
    with pytest.raises(RewardModelError, match=r"'d' returned \{1\.0: 0, 2\.0: 1\} \(dict\)"):
        venv.step([EOS, EOS])


# ----------------------------------------------------------------- 4. mappings and sets as prompts
@pytest.mark.parametrize(
    ("prompts", "why"),
    [
        ({"the food was": 1, "the room was": 2}, "mapping"),
        ({"the food was", "the room was"}, "set"),
        (frozenset({"the food was"}), "set"),
        ({"the food was": 1}.keys(), "set"),
        (b"prompts.txt", ""),
        (5, ""),
    ],
)
def test_prompts_as_a_mapping_or_set_are_refused(prompts, why):
    with pytest.raises(TypeError) as info:
        gym.make(ENV_ID, prompts=prompts)
    message = str(info.value)
    assert f"got {type(prompts).__name__}:" in message
    assert why in message
    assert "accepted: the path of a UTF-8 text file" in message


def test_ordered_prompt_collections_are_accepted_as_plain_strings():
    assert load_prompts(["a", "b"]) == load_prompts(("a", "b")) == ("a", "b")
    assert load_prompts(p for p in ["a", "b"]) == ("a", "b")
    from_numpy = load_prompts(np.array(["a", "b"]))
    assert from_numpy == ("a", "b") and all(type(p) is str for p in from_numpy)


# ----------------------------------------------------------- 5. reward models that mutate inputs
class MutatingReward(RewardModel):
    """Scores, then vandalises the lists it was given."""

    name = "mutating"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores = [float(len(c)) for c in completions]
        prompts.pop()  # type: ignore[attr-defined]
        completions.clear()  # type: ignore[attr-defined]
        return scores


def test_mutating_reward_model_cannot_alter_the_single_envs_info():
    env = gym.make(ENV_ID, task="arithmetic", reward=MutatingReward())
    _, reset_info = env.reset(seed=0)
    ids = env.unwrapped.tokenizer.encode("12")
    env.step(ids[0])
    env.step(ids[1])
    _, reward, terminated, _, info = env.step(EOS)
    assert terminated and reward == 2.0
    assert info["prompt"] == reset_info["prompt"] and info["completion"] == "12"
    assert info["reward_components"]["score"] == 2.0


@pytest.mark.parametrize("mode", MODES)
def test_mutating_reward_model_cannot_alter_the_vector_envs_info(mode):
    venv = TextGenVectorEnv(num_envs=3, task="arithmetic", reward=MutatingReward(), autoreset_mode=mode)
    _, reset_info = venv.reset(seed=0)
    digit = venv.tokenizer.encode("7")[0]
    venv.step([digit, digit, digit])
    _, rewards, terminated, _, infos = venv.step([EOS, digit, EOS])
    np.testing.assert_array_equal(terminated, [True, False, True])
    np.testing.assert_array_equal(rewards, [1.0, 0.0, 1.0])
    final = infos if mode == "next_step" else infos["final_info"]
    assert list(final["completion"][[0, 2]]) == ["7", "7"]
    assert list(final["prompt"][[0, 2]]) == list(reset_info["prompt"][[0, 2]])
    np.testing.assert_array_equal(final["reward_components"]["score"], [1.0, 0.0, 1.0])


def test_reward_model_receives_copies():
    seen: list[Any] = []

    def keep(prompts, completions):
        seen.append((prompts, completions))
        return [0.0] * len(completions)

    prompts, completions = ["p1", "p2"], ["c1", "c2"]
    FunctionReward(keep, batched=True)(prompts, completions)
    assert seen[0] == (prompts, completions)
    assert seen[0][0] is not prompts and seen[0][1] is not completions


def test_score_array_returned_by_a_model_is_copied():
    buffer = np.array([1.0, 2.0])
    scores = FunctionReward(lambda p, c: buffer, batched=True)(["a", "b"], ["x", "y"])
    buffer[:] = 99.0  # a model that reuses its output buffer
    np.testing.assert_array_equal(scores, [1.0, 2.0])


# ---------------------------------------------------------------------- 6. sizes that cannot fit
@pytest.mark.parametrize(
    "kwargs", [{"num_envs": 10**9}, {"num_envs": 10**12}, {"num_envs": 4, "max_new_tokens": 10**12}]
)
def test_vector_sizes_that_cannot_fit_are_refused_before_allocating(kwargs):
    with pytest.raises(ValueError) as info:
        gym.make_vec(ENV_ID, **kwargs)
    message = str(info.value)
    assert f"num_envs={kwargs['num_envs']}" in message
    assert "GiB for the episode state" in message and "of memory on cpu" in message
    assert "lower num_envs or max_new_tokens" in message


@pytest.mark.parametrize("max_new_tokens", [10**11, 10**12])
def test_single_env_budget_that_cannot_fit_is_refused(max_new_tokens):
    with pytest.raises(ValueError, match=rf"max_new_tokens={max_new_tokens}\) need [\d,.]+ GiB"):
        gym.make(ENV_ID, max_new_tokens=max_new_tokens)


def test_memory_bound_is_a_quarter_of_the_devices_total(monkeypatch):
    config = make_env_config("arithmetic")
    need_8 = textgym_core.state_nbytes(config, 8)
    assert need_8 == 8 * (2 * 8 * config.seq_len + 2 * 400 * config.seq_len + 3 * 8)
    monkeypatch.setattr(textgym_core, "device_memory", lambda device: 4 * need_8)
    assert TextGenVectorEnv(num_envs=8, task="arithmetic").num_envs == 8
    with pytest.raises(ValueError, match=r"num_envs=9 episodes .* 25% of the 0\.0 GiB of memory on cpu"):
        TextGenVectorEnv(num_envs=9, task="arithmetic")
    monkeypatch.setattr(textgym_core, "device_memory", lambda device: None)  # unknown: assume 1 TiB
    with pytest.raises(ValueError, match=r"25% of an assumed 1,024\.0 GiB"):
        TextGenVectorEnv(num_envs=10**10, task="arithmetic")


# ------------------------------------------------------------- 7. files of the wrong kind
@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the food was\nthe room was\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("as_mapping", [False, True])
def test_text_file_as_tokenizer_names_the_file_and_what_is_accepted(text_file, as_mapping):
    tokenizer = {"name": "hf", "path": str(text_file)} if as_mapping else str(text_file)
    with pytest.raises(ValueError) as info:
        make_env_config(tokenizer=tokenizer)
    message = str(info.value)
    assert str(text_file) in message and "not a tokenizer.json" in message
    assert "starts with b'the food was" in message
    assert "a Hugging Face tokenizer.json file or a directory written by save_pretrained" in message
    assert "expected value" not in message


def test_empty_file_as_tokenizer(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.json' is not a tokenizer\.json \(it is empty"):
        make_env_config(tokenizer=path)


def test_malformed_json_as_tokenizer_names_the_file(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "broken.json"
    path.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"broken\.json' is not a valid tokenizer\.json \(.+\); a tokenizer path"
    ):
        make_env_config(tokenizer=path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"is not UTF-8 text \(byte 0x89 at offset 0\)"),
        (b"good line\n\xff\xfe bad", r"is not UTF-8 text \(byte 0xff at offset 10\)"),
        (b"ab\x00\x00cd\n", r"is binary, not text \(a NUL byte at offset 2\)"),
    ],
)
def test_binary_prompts_file_names_the_file_and_what_is_accepted(tmp_path, data, match):
    path = tmp_path / "prompts.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        gym.make(ENV_ID, prompts=path)
    assert str(path) in str(info.value)
    assert "accepted" in str(info.value) or "prompts must be the path of a UTF-8 text file" in str(info.value)


def test_prompts_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffthe food was\n".encode())
    assert load_prompts(path) == ("the food was",)


# ------------------------------------------------------------------- 8. registered threshold
def test_registered_reward_threshold_is_the_default_tasks():
    spec = gym.spec(ENV_ID)
    assert spec.reward_threshold == get_task("default").reward_threshold == 0.8
    assert gym.make(ENV_ID).spec.reward_threshold == 0.8


# ------------------------------------------------------------------ 9. stable info layout
def layout(value: Any) -> Any:
    """The keys and types of an info, recursively: what must not change from step to step."""
    if isinstance(value, dict):
        return {key: layout(v) for key, v in value.items()}
    if isinstance(value, np.ndarray):
        kinds = {type(v).__name__ for v in value.tolist()} if value.dtype == object else None
        return ("ndarray", value.dtype.str, value.shape, frozenset(kinds or ()))
    return type(value).__name__


SINGLE_LAYOUT = {
    "prompt": "str",
    "completion": "str",
    "reward_components": {"score": "float", "length_penalty": "float"},
}


@pytest.mark.parametrize("task", ["sentiment", "arithmetic"])
def test_stable_info_single_env_has_the_same_keys_and_types_at_every_step(task):
    env = gym.make(ENV_ID, task=task, stable_info=True, length_penalty=0.125)
    plain = gym.make(ENV_ID, task=task, length_penalty=0.125)
    V = env.action_space.n
    rng = np.random.default_rng(0)
    _, info = env.reset(seed=1)
    plain.reset(seed=1)
    assert layout(info) == SINGLE_LAYOUT
    assert info["completion"] == "" and info["reward_components"] == {"score": 0.0, "length_penalty": 0.0}
    episodes = 0
    for _ in range(120):
        action = EOS if rng.random() < 0.1 else int(rng.integers(4, V))
        obs, _, terminated, truncated, info = env.step(action)
        *_, plain_info = plain.step(action)
        assert layout(info) == SINGLE_LAYOUT
        if terminated or truncated:
            assert info == plain_info  # the end-of-episode info is the default one
            episodes += 1
            _, info = env.reset()
            plain.reset()
            assert layout(info) == SINGLE_LAYOUT
        else:
            P = env.unwrapped.prompt_window
            generated = obs["input_ids"][P:][obs["attention_mask"][P:] == 1]
            assert info["completion"] == env.unwrapped.tokenizer.decode(generated)
            assert info["reward_components"] == {"score": 0.0, "length_penalty": 0.0}
            assert plain_info == {}
    assert episodes >= 5


def test_stable_info_passes_the_env_checkers():
    env = gym.make(ENV_ID, stable_info=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_stable_info_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=r"stable_info must be True or False, got"):
        TextGenEnv(stable_info=bad)
    with pytest.raises(TypeError, match=r"stable_info must be True or False"):
        TextGenVectorEnv(num_envs=2, stable_info=bad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_stable_info_vector_env_has_the_same_keys_and_types_at_every_step(mode, array_type):
    N = 5
    kwargs = {"task": "arithmetic", "autoreset_mode": mode, "length_penalty": 0.125}
    venv = TextGenVectorEnv(num_envs=N, stable_info=True, array_type=array_type, **kwargs)
    plain = TextGenVectorEnv(num_envs=N, **kwargs)
    V = venv.single_action_space.n
    rng = np.random.default_rng(0)
    _, info = venv.reset(seed=3)
    plain.reset(seed=3)
    expected = layout(info)
    assert set(info) == {
        "prompt",
        "_prompt",
        "completion",
        "_completion",
        "reward_components",
        "_reward_components",
        "prompt_index",
        "_prompt_index",
        "group",
        "_group",
    }
    assert all(info[k].all() for k in ("_prompt", "_completion", "_reward_components"))
    ends = 0
    for step in range(60):
        actions = rng.integers(4, V, size=N)
        actions[rng.random(N) < 0.2] = EOS
        _, _, terminated, truncated, info = venv.step(actions)
        *_, plain_info = plain.step(actions)
        done = np.asarray(terminated | truncated)
        if mode == "same_step":
            final = info.pop("final_info")
            final_obs = info.pop("final_obs")
            assert layout(final) == expected  # its masks are False where no episode ended
            np.testing.assert_array_equal(info.pop("_final_info"), done)
            np.testing.assert_array_equal(info.pop("_final_obs"), done)
            assert set(final_obs) == {"input_ids", "attention_mask"}
            reference = plain_info.get("final_info", {})
        else:
            reference = plain_info
        assert layout(info) == expected, f"step {step}"
        if done.any():
            ends += int(done.sum())
            source = final if mode == "same_step" else info
            mask = reference["_completion"]
            np.testing.assert_array_equal(mask, done)
            assert list(source["completion"][done]) == list(reference["completion"][done])
            assert list(source["prompt"][done]) == list(reference["prompt"][done])
            for key in ("score", "length_penalty"):
                np.testing.assert_array_equal(
                    source["reward_components"][key][done], reference["reward_components"][key][done]
                )
                assert (source["reward_components"][key][~done] == 0.0).all()
    assert ends >= 10


def test_stable_info_vector_completion_is_the_text_so_far():
    venv = TextGenVectorEnv(num_envs=2, task="arithmetic", stable_info=True)
    _, info = venv.reset(seed=0)
    one, two = venv.tokenizer.encode("12")
    _, _, _, _, info = venv.step([one, two])
    assert list(info["completion"]) == ["1", "2"]
    _, _, _, _, info = venv.step([two, EOS])
    assert list(info["completion"]) == ["12", "2"]
    _, _, _, _, info = venv.step([EOS, 5])  # sub-env 1 restarts (next_step autoreset)
    assert list(info["completion"]) == ["12", ""]
    assert info["prompt"][1] != "" and info["reward_components"]["score"][1] == 0.0


def test_stable_info_reset_mask_reports_every_sub_env():
    venv = TextGenVectorEnv(num_envs=3, task="arithmetic", stable_info=True)
    venv.reset(seed=0)
    digit = venv.tokenizer.encode("3")[0]
    venv.step([digit, digit, digit])
    _, info = venv.reset(options={"reset_mask": np.array([True, False, False])})
    assert list(info["completion"]) == ["", "3", "3"]
    assert info["_prompt"].all()
