"""Groups of the vector env: ``gym.make_vec("TextGen-v0", num_envs=N, group_size=G)``.

The contract (``textgym.vector.TextGenVectorEnv``, section Groups): rows ``[k*G, (k+1)*G)`` start
their episodes together on one prompt; a row whose episode ended waits (action ignored, final
observation kept, reward 0.0, flags False, ``infos["waiting"]`` True) until its whole group has
ended; then the group is reset within that step (``same_step``) or at the next (``next_step``).
Its references: the same env with ``group_size=1`` (a group whose rows act alike is one row
repeated), a twin env given other actions where actions must be ignored, and the observations
themselves (an observation only grows by the row's own action, or is a fresh prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.wrappers.vector import RecordEpisodeStatistics

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym import RewardModel, RewardModelError, TextGenVectorEnv
from textgym.sb3 import SB3VecEnv, make_sb3_vec_env

ENV_ID = "TextGen-v0"
EOS = 2
MODES = ["next_step", "same_step"]
ARRAY_TYPES = ["numpy", "torch"]


def make(num_envs: int, group_size: int, **kwargs: Any) -> TextGenVectorEnv:
    env = gym.make_vec(ENV_ID, num_envs=num_envs, group_size=group_size, **kwargs)
    assert isinstance(env, TextGenVectorEnv)
    return env


def np_(x: Any) -> Any:
    """A returned array as numpy (tensors are brought to the host), dicts recursively."""
    if isinstance(x, dict):
        return {k: np_(v) for k, v in x.items()}
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def group_all(flags: np.ndarray, G: int) -> np.ndarray:
    """(N,) True on the rows of every group whose flags are all True."""
    return flags.reshape(-1, G).all(1).repeat(G)


def fresh(obs: dict[str, np.ndarray], P: int) -> np.ndarray:
    """(N,) rows whose observation starts an episode: nothing generated yet."""
    return obs["attention_mask"][:, P] == 0


def appended(prev: dict[str, np.ndarray], action: np.ndarray, P: int) -> dict[str, np.ndarray]:
    """``prev`` with ``action`` written in each row's next generation column (if it has one)."""
    ids, mask = prev["input_ids"].copy(), prev["attention_mask"].copy()
    cols = P + mask[:, P:].sum(1)
    rows = np.flatnonzero(cols < ids.shape[1])  # a full row has ended: its action is ignored
    ids[rows, cols[rows]], mask[rows, cols[rows]] = action[rows], 1
    return {"input_ids": ids, "attention_mask": mask}


def actions_with_staggered_ends(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Random tokens; each row emits <eos> with its own probability, so rows of a group end apart."""
    acts = rng.integers(4, vocab, size=n)
    p_eos = np.linspace(0.05, 0.6, n)
    acts[rng.random(n) < p_eos] = EOS
    return acts


class RecordingReward(RewardModel):
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        self.calls.append(len(completions))
        return [float(len(c)) + 1.0 for c in completions]


# -------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("group_size", [0, -2, 2.0, True, "2", None])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match=r"group_size must be an integer >= 1"):
        make(4, group_size)


@pytest.mark.parametrize(("num_envs", "group_size"), [(6, 4), (3, 2), (1, 2)])
def test_num_envs_must_be_a_multiple_of_group_size(num_envs, group_size):
    with pytest.raises(ValueError, match=rf"num_envs={num_envs} .*group_size={group_size}"):
        make(num_envs, group_size)


def test_group_attributes_and_numpy_group_size():
    env = make(12, np.int64(4))
    assert (env.group_size, env.num_groups) == (4, 3)
    assert type(env.group_size) is int
    plain = gym.make_vec(ENV_ID, num_envs=5)
    assert (plain.group_size, plain.num_groups) == (1, 5)
    assert env.num_prompts == len(env.config.prompts)


# -------------------------------------------------------------- the contract, step by step
def check_contract(env: TextGenVectorEnv, twin: TextGenVectorEnv, steps: int, seed: int) -> dict[str, int]:
    """Step ``env`` and ``twin`` (same configuration) with the same actions, except that ``twin``
    gets other tokens wherever the contract says an action is ignored, and check every rule of
    the Groups section at every step. Returns counts of what the run exercised."""
    N, G, P = env.num_envs, env.group_size, env.prompt_window
    same_step = env.autoreset_mode.value == "SameStep"
    torch_arrays = env.array_type == "torch"
    prompts = env.config.prompts
    rng = np.random.default_rng(seed)
    vocab = env.single_action_space.n
    group = np.arange(N) // G

    obs, info = env.reset(seed=seed)
    t_obs, _ = twin.reset(seed=seed)
    obs, t_obs = np_(obs), np_(t_obs)
    episode_prompt = info["prompt_index"].copy()  # (N,) prompt index of each row's episode
    assert info["_prompt_index"].all() and (info["group"] == group).all()
    if G > 1:
        assert not np_(info["waiting"]).any()
    prev_done = np.zeros(N, dtype=bool)
    prev_waiting = np.zeros(N, dtype=bool)
    counts = {"waits": 0, "resets": 0, "staggered_groups": 0, "ends": 0, "truncated": 0}
    waited = np.zeros(N, dtype=int)  # steps each row has waited since its episode ended
    for _ in range(steps):
        acts = actions_with_staggered_ends(rng, N, vocab)
        # What the contract predicts from the last step alone.
        ended = prev_done | prev_waiting  # rows holding an ended episode
        complete = group_all(ended, G)  # their whole group has ended
        expect_waiting = ended & ~complete
        if same_step:
            ignored = expect_waiting
            expect_reset = None  # known after the step: the groups that complete in it
        else:
            ignored = ended  # waits, and the autoreset of the groups completed at the last step
            expect_reset = ended & complete

        t_acts = acts.copy()
        t_acts[ignored] = np.where(acts[ignored] == EOS, 5, EOS)  # other tokens; must change nothing
        as_input = (lambda a: torch.as_tensor(a)) if torch_arrays else (lambda a: a)
        out = env.step(as_input(acts))
        t_out = twin.step(as_input(t_acts))
        new_obs, rew, term, trunc, info = np_(out[0]), *map(np_, out[1:4]), out[4]
        if torch_arrays:
            for x in out[1:4]:
                assert isinstance(x, torch.Tensor) and x.device == env.device
        for a, b in zip((new_obs, rew, term, trunc), map(np_, (t_out[0], *t_out[1:4])), strict=True):
            if isinstance(a, dict):
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key])
            else:
                np.testing.assert_array_equal(a, b)
        done = term | trunc

        # infos["waiting"]: present iff G > 1, (N,) bool of the array type, all-True mask
        if G == 1:
            assert "waiting" not in info and "_waiting" not in info
            waiting = np.zeros(N, dtype=bool)
        else:
            if torch_arrays:
                assert isinstance(info["waiting"], torch.Tensor) and info["waiting"].device == env.device
                assert info["waiting"].dtype == torch.bool
            else:
                assert isinstance(info["waiting"], np.ndarray) and info["waiting"].dtype == np.bool_
            waiting = np_(info["waiting"])
            assert info["_waiting"].dtype == np.bool_ and info["_waiting"].all()
        np.testing.assert_array_equal(waiting, expect_waiting)
        assert not (waiting & done).any()  # never waiting and done in one step

        # ignored rows: reward 0.0 exactly, no flags
        assert (rew[ignored] == 0.0).all() and not np.signbit(rew[ignored]).any()
        assert not done[ignored].any()

        # which rows start an episode in this step
        if same_step:
            expect_reset = group_all(waiting | done, G)
        now_fresh = fresh(new_obs, P)
        np.testing.assert_array_equal(now_fresh, expect_reset)
        if not env.stable_info:  # "prompt" is given where an episode starts, and where one ends
            starts_or_ends = expect_reset if same_step else expect_reset | done
            np.testing.assert_array_equal(info.get("_prompt", np.zeros(N, bool)), starts_or_ends)

        # a waiting row keeps its final observation (unless its group is reset in this step)
        keep = waiting & ~expect_reset
        for key in obs:
            np.testing.assert_array_equal(new_obs[key][keep], obs[key][keep])
        # a used action is appended to the row's observation (before any same-step reset)
        used = ~ignored
        end_obs = dict(new_obs)
        if same_step and done.any():
            final_obs = np_(info["final_obs"])
            np.testing.assert_array_equal(info["_final_obs"], done)
            end_obs = {k: np.where(done[:, None], final_obs[k], new_obs[k]) for k in new_obs}
        grown = appended(obs, acts, P)
        for key in obs:
            np.testing.assert_array_equal(end_obs[key][used], grown[key][used])

        # episode ends carry prompt_index and group, where prompt and completion are
        if done.any():
            final = info["final_info"] if same_step else info
            np.testing.assert_array_equal(final["_prompt_index"][done], True)
            np.testing.assert_array_equal(final["_group"][done], True)
            np.testing.assert_array_equal(final["prompt_index"][done], episode_prompt[done])
            np.testing.assert_array_equal(final["group"][done], group[done])
            assert final["prompt_index"].dtype == final["group"].dtype == np.int64
            for i in np.flatnonzero(done):
                assert final["prompt"][i] == prompts[episode_prompt[i]]
                assert isinstance(final["completion"][i], str)
            counts["ends"] += int(done.sum())
            counts["truncated"] += int((trunc & ~term).sum())

        # rows starting an episode: one prompt per group, reported with its index and group
        if expect_reset.any():
            counts["resets"] += int(expect_reset.sum()) // G
            rows = np.flatnonzero(expect_reset)
            start = np_(info)  # the reset info is in the step's top-level infos
            index = start["prompt_index"][rows]
            np.testing.assert_array_equal(start["group"][rows], group[rows])
            assert (index.reshape(-1, G) == index.reshape(-1, G)[:, :1]).all()
            by_group = new_obs["input_ids"][rows].reshape(-1, G, new_obs["input_ids"].shape[1])
            assert (by_group == by_group[:, :1]).all()
            for i in rows:
                assert start["prompt"][i] == prompts[start["prompt_index"][i]]
            # the groups whose rows ended at different steps
            counts["staggered_groups"] += int((waited[rows] > 0).reshape(-1, G).any(1).sum())
            episode_prompt[rows] = index
            waited[rows] = 0
        assert (episode_prompt.reshape(-1, G) == episode_prompt.reshape(-1, G)[:, :1]).all()
        waited[waiting] += 1
        counts["waits"] += int(waiting.sum())
        obs, prev_done, prev_waiting = new_obs, done, waiting
    return counts


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_contract(group_size, mode, array_type):
    kwargs = {
        "task": "arithmetic",
        "length_penalty": 0.125,
        "autoreset_mode": mode,
        "array_type": array_type,
    }
    env, twin = make(8, group_size, **kwargs), make(8, group_size, **kwargs)
    counts = check_contract(env, twin, steps=150, seed=3)
    assert counts["ends"] > 100 and counts["truncated"] > 5
    assert counts["resets"] > 10
    if group_size > 1:
        assert counts["waits"] > 50
        assert counts["staggered_groups"] > 10
    else:
        assert counts["waits"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_group_contract_with_stable_info_and_a_longer_task(mode):
    kwargs = {"task": "keyword", "autoreset_mode": mode, "stable_info": True}
    counts = check_contract(make(8, 4, **kwargs), make(8, 4, **kwargs), steps=120, seed=8)
    assert counts["waits"] > 50 and counts["staggered_groups"] > 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_group_contract_on_cuda(mode):
    kwargs = {"task": "arithmetic", "autoreset_mode": mode, "array_type": "torch", "device": "cuda"}
    counts = check_contract(make(16, 4, **kwargs), make(16, 4, **kwargs), steps=100, seed=5)
    assert counts["waits"] > 50 and counts["staggered_groups"] > 10


# ---------------------------------------------------------------------- a scripted timeline
# Two groups of two rows (rows 0, 1 and rows 2, 3). Row 0 ends at step 1, row 1 at step 2,
# row 3 at step 3, row 2 at step 4; "." is a plain token. Per step: the action of each row, and
# what the contract says it reports: done, waiting, and whether its returned observation is fresh.
#                 actions            done        waiting      fresh obs
SAME_STEP = [
    ("E . . .", "1 0 0 0", "0 0 0 0", "0 0 0 0"),
    (". E . .", "0 1 0 0", "1 0 0 0", "1 1 0 0"),  # group 0 complete: reset within the step
    (". . . E", "0 0 0 1", "0 0 0 0", "0 0 0 0"),
    (". . E .", "0 0 1 0", "0 0 0 1", "0 0 1 1"),  # group 1 complete: reset within the step
    (". . . .", "0 0 0 0", "0 0 0 0", "0 0 0 0"),
]
NEXT_STEP = [
    ("E . . .", "1 0 0 0", "0 0 0 0", "0 0 0 0"),
    (". E . .", "0 1 0 0", "1 0 0 0", "0 0 0 0"),
    (". . . E", "0 0 0 1", "0 0 0 0", "1 1 0 0"),  # group 0's autoreset step: both actions ignored
    (". . E .", "0 0 1 0", "0 0 0 1", "0 0 0 0"),
    (". . . .", "0 0 0 0", "0 0 0 0", "0 0 1 1"),  # group 1's autoreset step
]


@pytest.mark.parametrize(("mode", "timeline"), [("same_step", SAME_STEP), ("next_step", NEXT_STEP)])
def test_scripted_timeline(mode, timeline):
    env = make(4, 2, task="arithmetic", autoreset_mode=mode, length_penalty=0.25)
    P = env.prompt_window
    obs, info = env.reset(seed=0)
    first = info["prompt_index"].copy()
    assert first[0] == first[1] and first[2] == first[3]
    for step, (acts, done, waiting, is_fresh) in enumerate(timeline, 1):
        actions = np.array([EOS if a == "E" else 7 for a in acts.split()])
        obs, rew, term, trunc, info = env.step(actions)
        bits = lambda s: np.array([c == "1" for c in s.split()])  # noqa: E731
        np.testing.assert_array_equal(term | trunc, bits(done), err_msg=f"step {step}")
        np.testing.assert_array_equal(info["waiting"], bits(waiting), err_msg=f"step {step}")
        np.testing.assert_array_equal(fresh(obs, P), bits(is_fresh), err_msg=f"step {step}")
        ignored = bits(waiting) | (bits(is_fresh) & (mode == "next_step"))
        assert (rew[ignored] == 0.0).all()
        assert (rew[~ignored & ~(term | trunc)] == -0.25).all()
        starts_or_ends = bits(is_fresh) | ((term | trunc) & (mode == "next_step"))
        np.testing.assert_array_equal(info.get("_prompt", np.zeros(4, bool)), starts_or_ends)
    index = env._core.prompt_index.tolist()  # each group's rows are on one prompt
    assert index[0] == index[1] and index[2] == index[3]


# ------------------------------------------------------------ reference: group_size=1 repeated
@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", [2, 4])
def test_groups_acting_alike_are_rows_of_the_plain_env_repeated(group_size, mode, array_type):
    """When every row of a group gets its group's action, the rows of group k follow row k of
    the env without groups, seeded alike: same prompts (group k's generator is seeded with
    seed + k, as sub-env k's), observations, rewards, flags and infos; no row ever waits."""
    n_groups, G = 3, group_size
    kwargs = {"task": "sentiment", "autoreset_mode": mode, "array_type": array_type, "length_penalty": 0.1}
    grouped = make(n_groups * G, G, **kwargs)
    plain = make(n_groups, 1, **kwargs)
    g_obs, g_info = grouped.reset(seed=21)
    p_obs, p_info = plain.reset(seed=21)
    rep = lambda x: np.repeat(np_(x), G, axis=0)  # noqa: E731

    def same(g: Any, p: Any) -> None:
        if isinstance(p, dict):
            for key in p:
                if not key.startswith("_") or key in g:
                    same(g[key], p[key])
        else:
            np.testing.assert_array_equal(np_(g), rep(p))

    same(g_obs, p_obs)
    for key in ("prompt", "prompt_index", "group", "_prompt"):
        same(g_info[key], p_info[key])
    rng = np.random.default_rng(4)
    ends = 0
    for _ in range(80):
        acts = actions_with_staggered_ends(rng, n_groups, plain.single_action_space.n)
        g_out = grouped.step(np.repeat(acts, G))
        p_out = plain.step(acts)
        for g, p in zip(g_out[:4], p_out[:4], strict=True):
            same(g, p)
        g_info, p_info = g_out[4], p_out[4]
        assert not np_(g_info.pop("waiting")).any()
        g_info.pop("_waiting")
        assert set(g_info) == set(p_info)
        same(g_info, p_info)
        ends += int(np_(p_out[2] | p_out[3]).sum())
    assert ends > 30


def test_group_k_draws_from_seed_plus_k():
    env = make(8, 4, task="arithmetic")
    _, info = env.reset(seed=100)
    _, info_shifted = env.reset(seed=101)
    # group 1 of seed 100 is group 0 of seed 101
    assert info["prompt_index"][4] == info_shifted["prompt_index"][0]
    _, again = env.reset(seed=100)
    np.testing.assert_array_equal(again["prompt_index"], info["prompt_index"])


def test_a_list_of_seeds_has_one_entry_per_group():
    env = make(6, 3, task="arithmetic")
    _, by_list = env.reset(seed=[7, 9])
    _, by_int = env.reset(seed=7)
    assert by_list["prompt_index"][0] == by_int["prompt_index"][0]
    assert by_list["prompt_index"][3] == env.reset(seed=9)[1]["prompt_index"][0]
    with pytest.raises(
        ValueError, match=r"one entry per group, num_envs=6 / group_size=3 = 2 entries, got 6"
    ):
        env.reset(seed=list(range(6)))


# ----------------------------------------------------------------------- reset and its options
def test_reset_mask_must_cover_whole_groups():
    env = make(6, 2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"whole groups of group_size=2 rows; group 1 \(rows 2..3\)"):
        env.reset(options={"reset_mask": np.array([True, True, True, False, False, False])})


@pytest.mark.parametrize("mode", MODES)
def test_partial_reset_keeps_other_groups_waiting(mode):
    env = make(4, 2, task="arithmetic", autoreset_mode=mode)
    P = env.prompt_window
    env.reset(seed=0)
    env.step(np.array([EOS, 7, EOS, 7]))  # rows 0 and 2 end; both groups still running
    obs, info = env.reset(options={"reset_mask": np.array([True, True, False, False])})
    assert not info["waiting"].any()  # reset takes no action
    np.testing.assert_array_equal(info["_prompt"], [True, True, False, False])
    assert fresh(obs, P).tolist() == [True, True, False, False]
    obs, _, _, _, info = env.step(np.array([7, 7, 7, 7]))
    # group 0 starts afresh (every action used); row 2 is still waiting for row 3
    np.testing.assert_array_equal(info["waiting"], [False, False, True, False])
    assert obs["attention_mask"][:2, P:].sum(1).tolist() == [1, 1]
    assert obs["attention_mask"][2:, P:].sum(1).tolist() == [1, 2]


def test_reset_clears_waiting_rows():
    env = make(4, 4, task="arithmetic")
    env.reset(seed=0)
    env.step(np.array([EOS, 7, 7, 7]))
    env.reset(seed=1)
    _, _, _, _, info = env.step(np.array([EOS, 7, 7, 7]))
    assert not info["waiting"].any()


@pytest.mark.parametrize(
    "prompt_index",
    [
        pytest.param(5, id="int"),
        pytest.param(np.int32(5), id="numpy-int"),
        pytest.param([5, 5, 9, 9], id="list"),
        pytest.param(np.array([5, 5, 9, 9], dtype=np.uint8), id="numpy-array"),
        pytest.param(torch.tensor([5, 5, 9, 9]), id="tensor"),
    ],
)
@pytest.mark.parametrize("array_type", ARRAY_TYPES)
def test_reset_onto_chosen_prompts(prompt_index, array_type):
    env = make(4, 2, task="keyword", array_type=array_type)
    obs, info = env.reset(seed=0, options={"prompt_index": prompt_index})
    expected = np.broadcast_to(np.asarray(np_(prompt_index)), (4,))
    np.testing.assert_array_equal(info["prompt_index"], expected)
    assert list(info["prompt"]) == [env.config.prompts[i] for i in expected]
    ids = np_(obs["input_ids"])
    for i, index in enumerate(expected):
        reference, _ = make(1, 1, task="keyword").reset(options={"prompt_index": int(index)})
        np.testing.assert_array_equal(ids[i], reference["input_ids"][0])


def test_prompt_index_with_reset_mask_takes_all_rows_or_the_rows_reset():
    env = make(6, 2, task="arithmetic")
    _, first = env.reset(seed=0)
    mask = np.array([False, False, True, True, False, False])
    _, info = env.reset(options={"reset_mask": mask, "prompt_index": [0, 0, 17, 17, 0, 0]})
    np.testing.assert_array_equal(info["_prompt_index"], mask)
    assert info["prompt_index"][2:4].tolist() == [17, 17]
    # entries of rows not reset are ignored, even outside the range
    _, info = env.reset(options={"reset_mask": mask, "prompt_index": [-1, -1, 18, 18, 10**6, 10**6]})
    assert info["prompt_index"][2:4].tolist() == [18, 18]
    _, info = env.reset(options={"reset_mask": mask, "prompt_index": np.array([19, 19])})
    assert info["prompt_index"][2:4].tolist() == [19, 19]
    env.reset(options={"reset_mask": mask, "prompt_index": 20})
    assert env._core.prompt_index.tolist() == [*first["prompt_index"][:2], 20, 20, *first["prompt_index"][4:]]


def test_chosen_prompts_do_not_advance_the_generators():
    chosen, drawn = make(4, 2, task="arithmetic"), make(4, 2, task="arithmetic")
    chosen.reset(seed=5, options={"prompt_index": 3})
    _, first_draw = drawn.reset(seed=5)
    _, _, _, _, info = chosen.step(np.full(4, EOS))
    _, _, _, _, info = chosen.step(np.full(4, 7))  # next_step: the autoreset draws now
    np.testing.assert_array_equal(info["prompt_index"], first_draw["prompt_index"])


@pytest.mark.parametrize(
    ("prompt_index", "error", "match"),
    [
        (400, ValueError, r"options\['prompt_index'\] = 400 is not a prompt index in \[0, 400\)"),
        (np.int8(-1), ValueError, r"= -1 is not a prompt index in \[0, 400\)"),
        ([9, 9, 400, 400], ValueError, r"gives sub-env 2 the prompt index 400, not in \[0, 400\)"),
        ([9, 9, 2**70, 2**70], ValueError, r"sub-env 2 the prompt index 1180591620717411303424, not in"),
        ([1, 1, 2**64 - 1, 2**64 - 1], ValueError, r"sub-env 2 the prompt index 18446744073709551615"),
        ([1, 1, 2, 3], ValueError, r"same prompt \(group_size=2\); group 1 \(rows 2..3\) got \[2, 3\]"),
        ([1, 1, 2], ValueError, r"has shape \(3,\); accepted: .* integers in \[0, 400\) of shape \(4,\), as"),
        (np.ones((4, 1), dtype=int), ValueError, r"shape \(4, 1\)"),
        (1.0, TypeError, r"must be integers, got 1.0 \(float\).*\[0, 400\)"),
        (True, TypeError, r"must be integers, got True"),
        (np.array([1.0, 1.0, 2.0, 2.0]), TypeError, r"must be integers"),
        (torch.ones(4, dtype=torch.bool), TypeError, r"must be integers"),
        ([1, 1, True, True], TypeError, r"\[2\] is True \(bool\), not an integer"),
        ("3", TypeError, r"must be integers, got '3' \(str\)"),
    ],
)
def test_bad_prompt_index(prompt_index, error, match):
    env = make(4, 2, task="arithmetic")
    env.reset(seed=0)
    before = env._core.tokens.clone()
    with pytest.raises(error, match=match):
        env.reset(options={"prompt_index": prompt_index})
    assert torch.equal(env._core.tokens, before)  # nothing was reset


def test_unknown_reset_option_is_refused():
    with pytest.raises(ValueError, match=r"\['prompt'\].*'reset_mask' and 'prompt_index'"):
        make(2, 1).reset(options={"prompt": "x"})


# -------------------------------------------------------------------------- group_size = 1
@pytest.mark.parametrize("mode", MODES)
def test_group_size_one_reports_prompt_index_and_row_as_group(mode):
    N = 5
    env = make(N, 1, task="arithmetic", autoreset_mode=mode)
    _, info = env.reset(seed=0)
    assert "waiting" not in info
    np.testing.assert_array_equal(info["group"], np.arange(N))
    assert list(info["prompt"]) == [env.config.prompts[i] for i in info["prompt_index"]]
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(40):
        _, _, term, trunc, info = env.step(actions_with_staggered_ends(rng, N, env.single_action_space.n))
        done = term | trunc
        if done.any():
            final = info["final_info"] if mode == "same_step" else info
            ends += int(done.sum())
            np.testing.assert_array_equal(final["group"][done], np.flatnonzero(done))
            for i in np.flatnonzero(done):
                assert final["prompt"][i] == env.config.prompts[final["prompt_index"][i]]
        if "_prompt" in info:
            np.testing.assert_array_equal(info["_prompt_index"], info["_prompt"])
            np.testing.assert_array_equal(info["_group"], info["_prompt"])
    assert ends > 20


# ------------------------------------------------------------------------------- stable_info
@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_stable_info_with_groups_keeps_its_layout_through_waits(mode, array_type):
    N, G = 8, 4
    env = make(N, G, task="arithmetic", autoreset_mode=mode, array_type=array_type, stable_info=True)
    _, info = env.reset(seed=2)

    def layout(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: layout(v) for k, v in value.items()}
        return (type(value).__name__, str(value.dtype), tuple(value.shape))

    expected = layout(info)
    assert {"waiting", "_waiting", "prompt_index", "_prompt_index", "group", "_group"} <= set(info)
    final_layout = None
    ended_completion = np.full(N, None, dtype=object)
    rng = np.random.default_rng(1)
    waits = 0
    for _ in range(60):
        _, _, term, trunc, info = env.step(actions_with_staggered_ends(rng, N, env.single_action_space.n))
        done = np_(term | trunc)
        waiting = np_(info["waiting"])
        if mode == "same_step":
            final, _ = info.pop("final_info"), info.pop("final_obs")
            info.pop("_final_info"), info.pop("_final_obs")
            final_layout = final_layout or layout(final)
            assert layout(final) == final_layout and "waiting" not in final
        assert layout(info) == expected
        assert info["_prompt"].all() and info["_waiting"].all()
        np.testing.assert_array_equal(info["group"], np.arange(N) // G)
        assert list(info["prompt"]) == [env.config.prompts[i] for i in info["prompt_index"]]
        # a waiting row reports its ended episode with 0.0 components
        for comp in ("score", "length_penalty"):
            assert (info["reward_components"][comp][waiting] == 0.0).all()
        held = waiting & ~fresh(np_(env.unwrapped._obs()), env.prompt_window)
        for i in np.flatnonzero(held):
            assert info["completion"][i] == ended_completion[i]
        ending = final if mode == "same_step" else info
        ended_completion[done] = ending["completion"][done]
        waits += int(held.sum())
    assert waits > 20


# ------------------------------------------------------------- reward model, statistics, errors
@pytest.mark.parametrize("mode", MODES)
def test_reward_model_called_once_per_step_and_never_for_waits(mode):
    N = 8
    reward = RecordingReward()
    env = make(N, 4, task="arithmetic", reward=reward, autoreset_mode=mode)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        before = len(reward.calls)
        _, rew, term, trunc, _ = env.step(actions_with_staggered_ends(rng, N, env.single_action_space.n))
        done = term | trunc
        assert reward.calls[before:] == ([int(done.sum())] if done.any() else [])
        assert (rew[done] >= 1.0).all() and (rew[~done] == 0.0).all()


@pytest.mark.parametrize("mode", MODES)
def test_record_episode_statistics_counts_waits_into_the_next_episode(mode):
    """The documented caveat: returns are exact, lengths include the waits before the episode."""
    N, G = 8, 4
    env = RecordEpisodeStatistics(
        make(N, G, task="arithmetic", length_penalty=0.5, autoreset_mode=mode), buffer_length=1000
    )
    P = env.unwrapped.prompt_window
    env.reset(seed=3)
    rng = np.random.default_rng(2)
    waited = np.zeros(N, dtype=int)
    expected_returns, expected_lengths = [], []
    for _ in range(100):
        obs, _, term, trunc, info = env.step(actions_with_staggered_ends(rng, N, env.single_action_space.n))
        done = term | trunc
        if done.any():
            end_obs = info["final_obs"] if mode == "same_step" else obs
            generated = end_obs["attention_mask"][:, P:].sum(1)
            score = info.get("final_info", info)["reward_components"]["score"]
            expected_returns += (score - 0.5 * generated)[done].tolist()
            expected_lengths += (generated + waited)[done].tolist()
            waited[done] = 0
        waited[info["waiting"]] += 1
    assert len(expected_lengths) > 30
    assert any(n > 4 for n in expected_lengths)  # some waits were counted in (max_new_tokens = 4)
    np.testing.assert_allclose(list(env.return_queue), expected_returns)
    assert list(env.length_queue) == expected_lengths


_FAIL = {"armed": False}


def failing_reward(prompt: str, completion: str) -> float:
    if _FAIL["armed"]:
        raise ZeroDivisionError("boom")
    return 1.0


@pytest.mark.parametrize("mode", MODES)
def test_reward_model_error_with_groups_needs_a_reset(mode):
    env = make(4, 2, task="arithmetic", reward=failing_reward, autoreset_mode=mode)
    env.reset(seed=0)
    env.step(np.array([EOS, 7, 7, 7]))  # row 0 waits for row 1
    _FAIL["armed"] = True
    try:
        with pytest.raises(RewardModelError):
            env.step(np.array([7, EOS, 7, 7]))
    finally:
        _FAIL["armed"] = False
    with pytest.raises(ResetNeeded):
        env.step(np.array([7, 7, 7, 7]))
    env.reset(seed=0)
    _, _, term, _, info = env.step(np.array([EOS, 7, 7, 7]))
    assert term.tolist() == [True, False, False, False] and not info["waiting"].any()


def test_determinism_with_groups():
    def run() -> list[np.ndarray]:
        env = make(8, 4, task="sentiment", autoreset_mode="same_step", length_penalty=0.01)
        out = [env.reset(seed=9)[0]["input_ids"]]
        rng = np.random.default_rng(9)
        for _ in range(40):
            obs, rew, *_ = env.step(actions_with_staggered_ends(rng, 8, env.single_action_space.n))
            out += [obs["input_ids"], rew]
        return out

    for a, b in zip(run(), run(), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_get_state_and_set_state_continue_exactly_through_waits(mode, array_type, tmp_path):
    N, G = 8, 4
    kwargs = {"task": "arithmetic", "autoreset_mode": mode, "array_type": array_type, "length_penalty": 0.1}
    env = make(N, G, **kwargs)
    env.reset(seed=6)
    rng = np.random.default_rng(6)
    vocab = env.single_action_space.n
    for _ in range(7):
        env.step(actions_with_staggered_ends(rng, N, vocab))
    path = tmp_path / "state.pt"
    torch.save(env.get_state(), path)
    future = [actions_with_staggered_ends(rng, N, vocab) for _ in range(40)]
    expected = [tuple(map(np_, env.step(a))) for a in future]
    restored = make(N, G, **kwargs)
    restored.set_state(torch.load(path, weights_only=True))
    waits = 0
    for acts, want in zip(future, expected, strict=True):
        got = tuple(map(np_, restored.step(acts)))
        for a, b in zip(got[:4], want[:4], strict=True):
            for key in a if isinstance(a, dict) else [None]:
                np.testing.assert_array_equal(a[key] if key else a, b[key] if key else b)
        assert set(got[4]) == set(want[4])
        for key in ("waiting", "_prompt", "prompt_index", "group"):
            if key in want[4]:
                np.testing.assert_array_equal(got[4][key], want[4][key])
        waits += int(got[4]["waiting"].sum())
    assert waits > 10


def test_set_state_refuses_another_shape_and_keeps_needing_a_reset():
    fresh_state = make(4, 2).get_state()
    with pytest.raises(ValueError, match=r"\(4, 2, \d+\), this env has \(4, 4, \d+\)"):
        make(4, 4).set_state(fresh_state)
    env = make(4, 2)
    env.set_state(fresh_state)  # taken before any reset: the env still needs one
    with pytest.raises(ResetNeeded):
        env.step(np.full(4, 5))


# ------------------------------------------------------------------------ Stable-Baselines3
def test_sb3_adapter_refuses_groups():
    venv = TextGenVectorEnv(4, autoreset_mode="same_step", group_size=2)
    with pytest.raises(ValueError, match=r"group_size=1\), got group_size=2"):
        SB3VecEnv(venv)
    with pytest.raises(ValueError, match=r"group_size=1"):
        make_sb3_vec_env(num_envs=4, group_size=2)


def test_sb3_episode_infos_carry_prompt_index_and_group():
    venv = make_sb3_vec_env(num_envs=3, monitor=False, task="arithmetic")
    venv.reset()
    prompts = venv.venv.config.prompts
    index = venv.venv._core.prompt_index.tolist()
    _, _, dones, infos = venv.step(np.array([7, EOS, EOS]))
    assert dones.tolist() == [False, True, True]
    for i in (1, 2):
        assert infos[i]["group"] == i and type(infos[i]["group"]) is int
        assert infos[i]["prompt_index"] == index[i] and type(infos[i]["prompt_index"]) is int
        assert prompts[infos[i]["prompt_index"]] == infos[i]["prompt"]
    assert "prompt_index" not in infos[0]
