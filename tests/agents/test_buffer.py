"""GAE against Stable-Baselines3's RolloutBuffer, and the cut of a real rollout into sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer

from agents.buffer import Rollout, compute_gae, segments
from agents.ppo import PPO, PPOConfig


def random_case(T: int, N: int, seed: int) -> dict[str, np.ndarray]:
    """float32 data (SB3 stores float32), random episode starts and random last dones."""
    rng = np.random.default_rng(seed)
    return {
        "rewards": rng.normal(size=(T, N)).astype(np.float32),
        "values": rng.normal(size=(T, N)).astype(np.float32),
        "episode_starts": (rng.random((T, N)) < 0.3).astype(np.float32),
        "last_values": rng.normal(size=N).astype(np.float32),
        "last_dones": rng.random(N) < 0.5,
    }


def sb3_gae(case: dict[str, np.ndarray], gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    T, N = case["rewards"].shape
    buf = RolloutBuffer(
        T,
        spaces.Box(-1.0, 1.0, (1,), np.float32),
        spaces.Discrete(3),
        device="cpu",
        gae_lambda=gae_lambda,
        gamma=gamma,
        n_envs=N,
    )
    for t in range(T):
        buf.add(
            np.zeros((N, 1), np.float32),
            np.zeros(N, np.int64),
            case["rewards"][t],
            case["episode_starts"][t],
            torch.as_tensor(case["values"][t]),
            torch.zeros(N),
        )
    buf.compute_returns_and_advantage(torch.as_tensor(case["last_values"]), case["last_dones"])
    return buf.advantages.copy(), buf.returns.copy()


CASES = [
    # (T, N, gamma, gae_lambda, seed)
    (1, 1, 0.99, 0.95, 0),
    (5, 3, 0.99, 0.95, 1),
    (16, 8, 0.9, 0.8, 2),
    (12, 4, 1.0, 0.95, 3),
    (12, 4, 0.99, 0.0, 4),
    (12, 4, 0.99, 1.0, 5),
    (20, 6, 1.0, 1.0, 6),
    (7, 2, 0.0, 0.5, 7),
]


@pytest.mark.parametrize(("T", "N", "gamma", "gae_lambda", "seed"), CASES)
def test_compute_gae_matches_sb3_rollout_buffer(T, N, gamma, gae_lambda, seed):
    case = random_case(T, N, seed)
    adv_ref, ret_ref = sb3_gae(case, gamma, gae_lambda)
    adv, ret = compute_gae(**case, gamma=gamma, gae_lambda=gae_lambda)
    assert isinstance(adv, np.ndarray) and isinstance(ret, np.ndarray)
    assert adv.shape == ret.shape == (T, N)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("T", "N", "gamma", "gae_lambda", "seed"), CASES)
def test_compute_gae_torch_equals_numpy(T, N, gamma, gae_lambda, seed):
    # All float64: with float32 episode starts numpy's weak-scalar rules round gamma * lambda
    # to float32 in the numpy path (a ~1e-7 relative difference, SB3's own precision).
    case = {k: np.asarray(v, dtype=np.float64) for k, v in random_case(T, N, seed).items()}
    adv_np, ret_np = compute_gae(**case, gamma=gamma, gae_lambda=gae_lambda)
    tcase = {k: torch.as_tensor(v) for k, v in case.items()}
    adv, ret = compute_gae(**tcase, gamma=gamma, gae_lambda=gae_lambda)
    assert isinstance(adv, torch.Tensor) and isinstance(ret, torch.Tensor)
    assert adv.shape == ret.shape == (T, N) and adv.dtype == torch.float64
    np.testing.assert_allclose(adv.numpy(), adv_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), ret_np, rtol=1e-12, atol=1e-12)
    # float32 tensors and bool flags, as the PPO agent passes them
    tcase32 = {k: torch.as_tensor(v) for k, v in random_case(T, N, seed).items()}
    adv32, ret32 = compute_gae(**tcase32, gamma=gamma, gae_lambda=gae_lambda)
    assert adv32.dtype == torch.float32
    np.testing.assert_allclose(adv32.numpy(), adv_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret32.numpy(), ret_np, rtol=1e-4, atol=1e-5)


def test_compute_gae_by_hand():
    # One env, three steps; the observation at t=2 starts a new episode.
    r, v = np.array([[1.0], [2.0], [3.0]]), np.array([[0.5], [0.25], [1.0]])
    starts = np.array([[1.0], [0.0], [1.0]])
    g, lam = 0.9, 0.5
    adv, ret = compute_gae(r, v, starts, np.array([2.0]), np.array([False]), g, lam)
    d2 = 3.0 + g * 2.0 - 1.0  # bootstraps from last_values
    d1 = 2.0 - 0.25  # the next observation starts a new episode: no bootstrap
    d0 = 1.0 + g * 0.25 - 0.5
    expected = np.array([[d0 + g * lam * d1], [d1], [d2]])
    np.testing.assert_allclose(adv, expected)
    np.testing.assert_allclose(ret, expected + v)
    adv_done, _ = compute_gae(r, v, starts, np.array([2.0]), np.array([True]), g, lam)
    assert adv_done[2, 0] == pytest.approx(3.0 - 1.0)


def test_compute_gae_shape_errors():
    case = random_case(4, 3, 0)
    bad = dict(case, values=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"must share one \(T, N\) shape"):
        compute_gae(**bad)
    bad = dict(case, episode_starts=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"must share one \(T, N\) shape"):
        compute_gae(**bad)
    flat = {k: v.reshape(-1) if k in ("rewards", "values", "episode_starts") else v for k, v in case.items()}
    with pytest.raises(ValueError, match=r"\(T, N\)"):
        compute_gae(**flat)
    with pytest.raises(ValueError, match=r"last_values and last_dones must have shape \(3,\)"):
        compute_gae(**dict(case, last_values=np.zeros(4)))
    with pytest.raises(ValueError, match=r"last_values and last_dones must have shape \(3,\)"):
        compute_gae(**dict(case, last_dones=np.zeros((3, 1), bool)))
    tcase = {k: torch.as_tensor(v) for k, v in case.items()}
    with pytest.raises(ValueError, match="last_values and last_dones"):
        compute_gae(**dict(tcase, last_values=torch.zeros(2)))


# --------------------------------------------------------------------------------- segments
@pytest.fixture(scope="module")
def rollouts() -> tuple[PPO, list[Rollout]]:
    """Two consecutive rollouts of a small PPO: the second begins mid-episode on some envs."""
    model = PPO("TextGen-v0", PPOConfig(n_steps=12), num_envs=8, device="cpu", seed=0)
    model._obs = model.env.reset(seed=0)[0]
    out = [model.collect_rollout()[0] for _ in range(2)]
    return model, out


@pytest.mark.parametrize("which", [0, 1])
def test_segments_hold_every_transition_as_a_prefix(rollouts, which):
    model, rs = rollouts
    rollout = rs[which]
    P = model.prompt_window
    T, N, L = rollout.input_ids.shape
    seg = segments(rollout, P)
    S = seg.input_ids.shape[0]
    assert seg.attention_mask.shape == (S, L)
    assert seg.segment.shape == seg.column.shape == (T * N,)
    ids, mask = rollout.input_ids.reshape(T * N, L), rollout.attention_mask.reshape(T * N, L)
    actions = rollout.actions.reshape(-1)
    for i in range(T * N):
        s, c = int(seg.segment[i]), int(seg.column[i])
        last = int(mask[i].nonzero().max())  # the observation's last real column
        assert c == last, (i, c, last)
        assert torch.equal(seg.input_ids[s, : c + 1], ids[i, : c + 1]), i
        assert torch.equal(seg.attention_mask[s, : c + 1], mask[i, : c + 1]), i
        assert int(seg.input_ids[s, c + 1]) == int(actions[i]), i
        assert int(seg.attention_mask[s, c + 1]) == 1, i
    # A segment row is real exactly up to its last action: nothing after it is attended to.
    for s in range(S):
        members = (seg.segment == s).nonzero().squeeze(1)
        assert len(members) >= 1
        end = int(seg.column[members].max()) + 1
        assert int(seg.attention_mask[s, end + 1 :].sum()) == 0


@pytest.mark.parametrize("which", [0, 1])
def test_segments_start_at_step_zero_and_at_every_episode_start(rollouts, which):
    model, rs = rollouts
    rollout = rs[which]
    T, N, _ = rollout.input_ids.shape
    seg = segments(rollout, model.prompt_window)
    ids = seg.segment.view(T, N)
    starts = rollout.episode_starts.bool()
    assert starts[1:].any(), "the rollout should cross episode boundaries"
    if which == 1:
        assert not starts[0].all(), "the second rollout should begin mid-episode somewhere"
    # Every segment lives in one env and covers consecutive steps; a new one begins exactly at
    # step 0 and wherever an observation starts an episode.
    for n in range(N):
        for t in range(1, T):
            assert (ids[t, n] != ids[t - 1, n]) == bool(starts[t, n]), (t, n)
    owners = {}
    for t in range(T):
        for n in range(N):
            assert owners.setdefault(int(ids[t, n]), n) == n
    assert sorted(owners) == list(range(seg.input_ids.shape[0]))
    assert seg.input_ids.shape[0] == N + int(starts[1:].sum())
    # Within a segment the observation grows by one token per step.
    cols = seg.column.view(T, N)
    for n in range(N):
        for t in range(1, T):
            if not starts[t, n]:
                assert int(cols[t, n]) == int(cols[t - 1, n]) + 1


def test_segments_on_a_hand_made_rollout():
    # P = 2, L = 4; one env, three steps: tokens a, b in episode 1 (ends), then c in episode 2.
    P, pad, bos = 2, 0, 1
    ids = torch.tensor([[[pad, bos, pad, pad]], [[pad, bos, 5, pad]], [[bos, 9, pad, pad]]])
    mask = (torch.arange(4) < 0).long().expand(3, 1, 4).clone()
    mask[0, 0, 1] = mask[1, 0, 1:3] = 1
    mask[2, 0, :2] = 1
    zeros = torch.zeros(3, 1)
    rollout = Rollout(
        ids,
        mask,
        torch.tensor([[5], [6], [7]]),
        zeros,
        zeros,
        zeros,
        torch.tensor([[1.0], [0.0], [1.0]]),
        torch.tensor([[0.0], [1.0], [0.0]]),
    )
    seg = segments(rollout, P)
    assert seg.segment.tolist() == [0, 0, 1]
    assert seg.column.tolist() == [1, 2, 1]
    assert seg.input_ids.tolist() == [[pad, bos, 5, 6], [bos, 9, 7, pad]]
    assert seg.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
