"""The vector env's host view: what the host knows of every row without reading the device (the
rows' lengths, prompts and last flags), and the step's reads of the device: one per step, one more
where episodes end. Counted on the CPU by the conversions that would wait for a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textgym import TokenFunctionReward
from textgym.vector import TextGenVectorEnv


def _length(prompt_ids, prompt_mask, completion_ids, completion_mask):
    return completion_mask.sum(1).double()


def _actions(gen: torch.Generator, env: TextGenVectorEnv) -> torch.Tensor:
    """Random token ids with extra <eos>, so that episodes end at many lengths."""
    actions = torch.randint(0, env.single_action_space.n, (env.num_envs,), generator=gen)
    actions[torch.rand(env.num_envs, generator=gen) < 0.2] = env.tokenizer.eos_id
    return actions


def _assert_view_matches(env: TextGenVectorEnv, terminated=None, truncated=None, waiting=None) -> None:
    view, core, P = env.host_view, env._core, env.prompt_window
    np.testing.assert_array_equal(view.generated, core.gen_len.numpy())
    np.testing.assert_array_equal(view.generated, core.mask[:, P:].sum(1).numpy())
    np.testing.assert_array_equal(view.prompt_index, core.prompt_index.numpy())
    np.testing.assert_array_equal(view.prompt_length, core.mask[:, :P].sum(1).numpy())
    for got, want in ((view.terminated, terminated), (view.truncated, truncated), (view.waiting, waiting)):
        if want is not None:
            np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("array_type", ["numpy", "torch"])
def test_the_host_view_is_the_device_state(autoreset_mode, group_size, array_type):
    env = TextGenVectorEnv(
        8, autoreset_mode=autoreset_mode, group_size=group_size, array_type=array_type, max_new_tokens=5
    )
    env.reset(seed=0)
    _assert_view_matches(env, np.zeros(8, bool), np.zeros(8, bool), np.zeros(8, bool))
    gen = torch.Generator().manual_seed(0)
    ends = waits = 0
    for _ in range(30):
        _, _, terminated, truncated, infos = env.step(_actions(gen, env))
        waiting = infos.get("waiting", np.zeros(8, bool))
        _assert_view_matches(env, terminated, truncated, waiting)
        ends += int((np.asarray(terminated) | np.asarray(truncated)).sum())
        waits += int(np.asarray(waiting).sum())
    assert ends > 16 and (waits > 0 or group_size == 1)
    # A partial reset, then a restored state.
    env.reset(options={"reset_mask": np.repeat([True, False], 4), "prompt_index": 7})
    _assert_view_matches(env)
    assert (env.host_view.generated[:4] == 0).all() and (env.host_view.prompt_index[:4] == 7).all()
    state = env.get_state()
    other = TextGenVectorEnv(
        8, autoreset_mode=autoreset_mode, group_size=group_size, array_type=array_type, max_new_tokens=5
    )
    other.set_state(state)
    none = np.zeros(8, bool)
    _assert_view_matches(other, none, none, none)  # no step since
    np.testing.assert_array_equal(other.host_view.generated, env.host_view.generated)


def test_the_host_view_is_a_copy():
    env = TextGenVectorEnv(4, autoreset_mode="same_step")
    env.reset(seed=0)
    view = env.host_view
    view.generated[:] = 99
    view.terminated[:] = True
    assert (env.host_view.generated == 0).all() and not env.host_view.terminated.any()


def test_returned_numpy_flags_are_not_changed_by_a_later_reset():
    env = TextGenVectorEnv(4, max_new_tokens=1)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.full(4, 5))
    assert truncated.all()
    env.reset(seed=1)
    assert truncated.all() and not terminated.any()


REWARDS = {
    "text": ({}, 1),
    "token-ids": ({"reward": TokenFunctionReward(_length), "text_infos": False}, 1),
    "token-ids-with-text": ({"reward": TokenFunctionReward(_length)}, 2),  # the text's ids come back too
}


@pytest.mark.parametrize("reward", sorted(REWARDS))
@pytest.mark.parametrize("group_size", [1, 4])
def test_a_step_reads_the_device_once_and_once_more_where_episodes_end(reward, group_size, counting_syncs):
    kwargs, at_ends = REWARDS[reward]
    env = TextGenVectorEnv(
        8, autoreset_mode="same_step", array_type="torch", group_size=group_size, max_new_tokens=4, **kwargs
    )
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for t in range(20):
        actions = _actions(gen, env)
        if t % 3:  # no <eos>: steps where no episode ends, between truncations
            actions[actions == env.tokenizer.eos_id] = env.tokenizer.eos_id + 1
        with counting_syncs() as calls:
            env.step(actions)
        ended = bool(env.host_view.terminated.any() or env.host_view.truncated.any())
        assert len(calls) == 1 + at_ends * ended, calls
        seen.add(ended)
    assert seen == {False, True}


def test_the_step_counter_sees_numpy_rewards(counting_syncs):
    """The counter can fail: NumPy arrays are read from the device (the rewards, and the
    observation's ids and mask) beside the flags."""
    env = TextGenVectorEnv(4, autoreset_mode="same_step", max_new_tokens=4)
    env.reset(seed=0)
    with counting_syncs() as calls:
        env.step(np.full(4, 5))
    assert len(calls) == 4, calls


@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
@pytest.mark.parametrize("group_size", [1, 2])
def test_a_refused_tensor_of_actions_leaves_the_env_as_it_was(autoreset_mode, group_size):
    """Range-checked with the step's one read, after the step began: undone, exactly, and with
    the error of the first action out of range. Under next_step with rows to reset first, checked
    before anything moves."""
    env = TextGenVectorEnv(
        4, autoreset_mode=autoreset_mode, group_size=group_size, array_type="torch", max_new_tokens=3
    )
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    for t in range(12):
        before, view = env.get_state(), env.host_view
        bad = _actions(gen, env)
        bad[2], bad[3] = env.single_action_space.n + t, -1
        with pytest.raises(
            ValueError, match=rf"actions\[2\] = {env.single_action_space.n + t} \(sub-env 2\)"
        ):
            env.step(bad)
        after = env.get_state()
        for key in ("tokens", "mask", "gen_len", "prompt_index", "ended", "autoreset", "needs_reset"):
            assert torch.equal(before[key], after[key]), key
        assert before["rngs"] == after["rngs"]
        for got, want in zip(env.host_view, view, strict=True):
            np.testing.assert_array_equal(got, want)
        env.step(_actions(gen, env))  # and the env goes on
