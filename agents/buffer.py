"""Rollout storage, generalised advantage estimation, and the cut of a rollout into sequences.

``compute_gae`` follows Stable-Baselines3's ``RolloutBuffer.compute_returns_and_advantage``
(Schulman et al. 2016, eq. 16): arrays are shaped (T, N); ``episode_starts[t]`` marks that the
observation at step t began a new episode, so nothing flows back across that boundary; the last
step bootstraps from ``last_values`` unless ``last_dones``.

Whole-sequence updates: TextGen's transition only appends the agent's token, so the last
observation of an episode (plus its action) contains every earlier observation as a prefix.
:func:`segments` cuts the (T, N) rollout into per-episode pieces and builds that one row for each;
the update runs one causal forward pass per row and reads the log-probs, values and entropies of
all its actions from it, instead of one forward pass per transition.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def compute_gae(
    rewards: np.ndarray | torch.Tensor,
    values: np.ndarray | torch.Tensor,
    episode_starts: np.ndarray | torch.Tensor,
    last_values: np.ndarray | torch.Tensor,
    last_dones: np.ndarray | torch.Tensor,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Advantages and returns (both (T, N)) with Stable-Baselines3's semantics.

    :param rewards: (T, N) rewards; a truncated episode's bootstrap, if wanted, is already added.
    :param values: (T, N) value estimates of the observations the actions were taken in.
    :param episode_starts: (T, N) 1 where that observation started an episode.
    :param last_values: (N,) values of the observations after the last step.
    :param last_dones: (N,) 1 where the last step ended an episode.
    Works on numpy arrays or torch tensors and returns the same kind.
    """
    is_torch = isinstance(rewards, torch.Tensor)
    if not is_torch:
        rewards, values = np.asarray(rewards, dtype=np.float64), np.asarray(values, dtype=np.float64)
        episode_starts, last_dones = np.asarray(episode_starts), np.asarray(last_dones)
        last_values = np.asarray(last_values, dtype=np.float64)
    if rewards.shape != values.shape or rewards.shape != episode_starts.shape or rewards.ndim != 2:
        raise ValueError(
            "rewards, values and episode_starts must share one (T, N) shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(episode_starts.shape)}"
        )
    if tuple(last_values.shape) != (rewards.shape[1],) or tuple(last_dones.shape) != (rewards.shape[1],):
        raise ValueError(
            f"last_values and last_dones must have shape ({rewards.shape[1]},), got "
            f"{tuple(last_values.shape)} and {tuple(last_dones.shape)}"
        )
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards) if is_torch else np.zeros_like(rewards)
    last_gae = 0.0
    for t in reversed(range(T)):
        if t == T - 1:
            next_non_terminal = 1.0 - last_dones * 1.0
            next_values = last_values
        else:
            next_non_terminal = 1.0 - episode_starts[t + 1] * 1.0
            next_values = values[t + 1]
        delta = rewards[t] + gamma * next_values * next_non_terminal - values[t]
        last_gae = delta + gamma * gae_lambda * next_non_terminal * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


class Rollout(NamedTuple):
    """What one rollout of T steps on N envs collected; every tensor on the agent's device."""

    input_ids: torch.Tensor  # (T, N, L) observations the actions were taken in
    attention_mask: torch.Tensor  # (T, N, L)
    actions: torch.Tensor  # (T, N) token ids
    logprobs: torch.Tensor  # (T, N) log-probabilities under the rollout policy
    values: torch.Tensor  # (T, N) value estimates
    rewards: torch.Tensor  # (T, N) rewards (with any truncation bootstrap added)
    episode_starts: torch.Tensor  # (T, N) float, 1 where the observation began an episode
    dones: torch.Tensor  # (T, N) float, 1 where the step ended an episode


class Segments(NamedTuple):
    """A rollout cut into per-episode sequences, ready for whole-sequence forward passes."""

    input_ids: torch.Tensor  # (S, L) each segment's last observation with its action appended
    attention_mask: torch.Tensor  # (S, L)
    segment: torch.Tensor  # (T*N,) segment index of each transition (transitions in (T, N) order)
    column: torch.Tensor  # (T*N,) column whose outputs score the transition's action


def compact(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices (count,) of the true entries of the 1-D ``mask``, in increasing order: as
    ``mask.nonzero().squeeze(1)``, but without a host sync, as ``count``, their number, is known."""
    place = mask.long().cumsum(0) - 1  # (n,) each true entry's place among them
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    # The false entries all land in the spare last slot, dropped.
    out[torch.where(mask, place, count)] = torch.arange(len(mask), device=mask.device)
    return out[:count]


def segments(rollout: Rollout, prompt_window: int) -> Segments:
    """Cut ``rollout`` into sequences: a new one starts at step 0 and at every episode start."""
    T, N, L = rollout.input_ids.shape
    device = rollout.input_ids.device
    starts = rollout.episode_starts.bool().clone()  # (T, N)
    starts[0] = True
    # Number segments env by env, in time order: segment ids increase along each env's column.
    order = starts.T.reshape(-1)  # (N*T,) env-major
    seg_env_major = order.long().cumsum(0) - 1  # (N*T,)
    segment = seg_env_major.view(N, T).T.reshape(-1)  # (T*N,) back to time-major
    ends = torch.zeros(T, N, dtype=torch.bool, device=device)  # (T, N) last step of each segment
    ends[:-1] = starts[1:]
    ends[-1] = True
    generated = rollout.attention_mask[..., prompt_window:].sum(-1)  # (T, N) tokens before the action
    column = (prompt_window - 1 + generated).reshape(-1)  # (T*N,)

    S = int(seg_env_major[-1]) + 1  # the one host sync: every size below follows from it
    end = compact(ends.reshape(-1), S)  # (S,) one entry per segment, any order
    end_t, end_n = end // N, end % N
    seg_of_end = segment.view(T, N)[end_t, end_n]  # (S,)
    ids = torch.empty(S, L, dtype=rollout.input_ids.dtype, device=device)
    mask = torch.empty(S, L, dtype=rollout.attention_mask.dtype, device=device)
    ids[seg_of_end] = rollout.input_ids[end_t, end_n]
    mask[seg_of_end] = rollout.attention_mask[end_t, end_n]
    action_col = column.view(T, N)[end_t, end_n] + 1  # (S,) where the last action goes
    ids[seg_of_end, action_col] = rollout.actions[end_t, end_n].to(ids.dtype)
    mask[seg_of_end, action_col] = 1
    return Segments(ids, mask, segment, column)
