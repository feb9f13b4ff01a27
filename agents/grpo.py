"""Group-relative agents on TextGen-v0: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

Both sample G completions of every prompt (the env's ``group_size``), take each completion's
episode return as its reward, and judge it against the other completions of the same prompt
instead of a learned critic. The policy acts through its KV cache and is updated on whole
sequences, as PPO's; the training loop, interrupts, checkpoints, logging, ``predict`` and
``generate`` are :class:`agents.on_policy.OnPolicyAgent`'s, shared with PPO.

**Rollouts: one episode per row, whole groups only.** A rollout starts every row on a fresh
episode, the G rows of a group on one prompt, and steps the env until every row's episode has
ended (at most ``max_new_tokens`` steps); then it trains on all ``num_envs`` completions, i.e.
``num_envs / G`` complete groups, and nothing else. A row whose episode has ended is done for the
rollout: while the rest of its group runs it *waits* (``infos["waiting"]``: its action is ignored,
its reward 0; such a step is no transition), and once its group has ended the env resets the group
onto a new prompt (``autoreset_mode="same_step"``), whose first tokens the rollout discards:
the next rollout restarts those groups on the same prompts (``reset(options={"prompt_index":
...})``, so no prompt is skipped and the prompt generators stay where the env left them) under
the new weights. Every token trained on was therefore sampled by the weights being updated, and
the first minibatch's ratio is 1 (to the rounding between the KV cache and the update's
whole-sequence forward pass, about 1e-6). ``num_timesteps`` counts every row of every env step,
waits and discarded steps included, as PPO counts them, so equal budgets mean equal env work;
``rollout/trained_fraction`` logs the share of them that are trained on.

**GRPO** (Shao et al. 2024, DeepSeekMath, section 4.1): completion i of a group gets the
advantage ``(r_i - mean(r)) / (std(r) + 1e-4)`` (std over the group, population: ddof 0) at every
one of its tokens, and the loss is PPO's clipped surrogate per token plus ``beta`` times the k3
estimate of the KL to the reference, ``exp(ref - logp) - (ref - logp) - 1`` per token (eq. 4),
averaged as ``loss_aggregation`` says. The default, ``"sequence"``, is the paper's objective
(eq. 3): the mean over each completion's tokens, then over completions. The **Dr. GRPO**
correction (Liu et al. 2025, "Understanding R1-Zero-Like Training") is
``scale_rewards=False, loss_aggregation="constant"``: no division by the group's std (which
up-weights groups whose rewards barely differ) and no per-completion length normalisation (which
makes a wrong answer's loss per token smaller the longer it is): token terms are summed and
divided by a constant, completions x ``max_new_tokens``. ``"token"`` (DAPO's token-level mean)
is offered as well. The default is the paper's, so that "GRPO" means what its authors and most
implementations mean by it; on the built-in tasks, whose completions are at most a few tokens,
the two differ little.

**RLOO** (Ahmadian et al. 2024, "Back to Basics", section 3.1): completion i's baseline is the
mean reward of the other G - 1 completions of its prompt, ``b_i = (sum_j r_j - r_i) / (G - 1)``,
and the loss is REINFORCE's, ``-(r_i - b_i) * sum_t log π(a_t)``, averaged over completions (each
completion's token terms summed, not averaged). With more than one optimizer step per rollout
(``n_epochs`` or ``num_minibatches`` > 1) each token's term becomes PPO's clipped
``-min(ρ_t A_i, clip(ρ_t, 1 ± clip_range) A_i)``, ``ρ_t = π(a_t) / π_old(a_t)``, whose gradient is
REINFORCE's while ρ_t = 1. The KL to the reference is a **reward penalty**, as in the paper: with
``beta > 0`` a completion's reward is ``r_i - beta * sum_t (log π_old(a_t) - log π_ref(a_t))``
(the sampled log-ratio of its tokens) before the baselines are taken.

TensorBoard: Stable-Baselines3's tags where the quantity is PPO's (``rollout/ep_rew_mean``,
``rollout/ep_len_mean``, ``train/approx_kl``, ``train/clip_fraction``, ``train/entropy_loss``,
``train/policy_gradient_loss`` and ``train/loss`` (both aggregated as the loss is), ``train/learning_rate``, ``train/clip_range``,
``train/n_updates``, ``train/epochs``, ``train/sequences``, ``time/fps``, ``time/rollout_seconds``,
``time/update_seconds``, ``time/time_elapsed``, and with a reference
``train/kl_ref_sampled``, ``train/kl_coef``), and these: ``train/group_reward_std``
(the mean over groups of the std of their rewards), ``train/zero_std_fraction`` (the share of
groups whose rewards are all equal: their advantages are 0 and they teach nothing),
``train/kl_k3`` (GRPO with a reference: the k3 term of the loss, aggregated as the loss is; a mean
over the update's minibatches) and ``rollout/trained_fraction``.

**The reference** (with ``beta > 0``) scores the finished completions after the rollout, in one
causal pass over whole sequences (``micro_batch_size`` rows at a time), not token by token beside
the policy as PPO's must (PPO's KL penalty enters the rewards as they are collected): one pass
costs less than as many decoding steps as tokens. It gives the log-probabilities of the sampled
tokens, so the KL logged and steered by ``kl_target`` is the sampled one, ``train/kl_ref_sampled``
(the sum over a completion of log π_old - log π_ref, averaged over completions); PPO's exact
per-step ``train/kl_ref`` is not computed. Both passes, the reference's and the update's, leave out
the columns that are padding in every row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agents import distributed as dist
from agents.buffer import compact
from agents.on_policy import ConfigIO, OnPolicyAgent, check_fields, filled_columns, forward_span
from agents.policy import PolicyConfig, hidden_from
from textgym.core import to_device
from textgym.vector import TextGenVectorEnv

STD_EPS = 1e-4
"""Added to a group's reward std before GRPO divides by it (as TRL): a group of equal rewards gets
advantages 0, not NaN."""
LOSS_AGGREGATIONS = ("sequence", "token", "constant")


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class GroupConfig(ConfigIO):
    """Hyperparameters that GRPO and RLOO share; saved as ``config.json`` and in every checkpoint."""

    group_size: int = 8
    """G: completions sampled per prompt (the env's ``group_size``; ``num_envs`` must be a
    multiple). A rollout holds ``num_envs / G`` groups, one completion per env row."""
    n_epochs: int = 1
    """Passes over each rollout. 1 with one minibatch (the papers' setting): one on-policy gradient
    step per rollout. More steps per rollout (PPO's 4 x 4) learnt the default task in half the env
    steps in one measured run, but degraded a pretrained arithmetic policy with 64 envs (minibatches
    of 16 completions): raise ``num_envs`` with them."""
    num_minibatches: int = 1
    """Minibatches per epoch, each a random set of whole completions (advantages are computed
    per group before the rollout is cut, so a minibatch need not hold whole groups)."""
    micro_batch_size: int | None = None
    """Completions per forward and backward pass inside a minibatch (gradients accumulated before
    the one optimizer step: the minibatch's gradient up to float rounding). None: all at once."""
    learning_rate: float = 1e-3
    """Adam step size at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over ``total_timesteps``."""
    adam_eps: float = 1e-5
    """Adam's epsilon (as PPOConfig)."""
    clip_range: float = 0.2
    """Clip of the per-token probability ratio (inactive while the ratio is 1: the first
    minibatch of every rollout)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    beta: float = 0.0
    """Weight of the KL to the reference policy (the initial policy, frozen; under LoRA the model
    with its adapters off): GRPO's k3 term in the loss, RLOO's reward penalty. 0: no reference.
    0 by default as PPOConfig.kl_coef: from a random policy there is nothing to stay near (the
    GRPO paper used 0.04 from a pretrained model). With ``kl_target``, the starting value."""
    kl_target: float | None = None
    """Adapt β after each rollout towards this KL per completion (nats; the sampled KL to the
    reference, ``train/kl_ref_sampled``), as PPOConfig.kl_target; None keeps β fixed. Needs
    ``beta > 0`` as the starting β."""
    kl_horizon: int | None = None
    """How fast the adaptive β moves, as PPOConfig.kl_horizon: None moves it by its clipped error
    (up to 20%) after every rollout."""
    mask_actions: bool = False
    """Sample only the tokens of the env's action mask (its ``allowed_tokens``); the reference is
    masked the same way."""
    sample_interval: int = 10
    """Write generated text samples to TensorBoard every this many updates."""
    autocast: bool = False
    """Run the built-in policy under bfloat16 autocast, acting and updating alike (as
    ``PPOConfig.autocast``; a Hugging Face policy has ``HFConfig(autocast=True)``)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Architecture of the Transformer policy (unused with ``policy_model``)."""

    def __post_init__(self) -> None:
        bools = tuple(
            name for name in ("anneal_lr", "mask_actions", "autocast", "scale_rewards") if hasattr(self, name)
        )
        check_fields(
            self,
            bools=bools,
            positive_ints=("group_size", "n_epochs", "num_minibatches", "sample_interval"),
            optional_positive_ints=("micro_batch_size", "kl_horizon"),
            positive=("learning_rate", "adam_eps", "clip_range", "max_grad_norm"),
            optional_positive=("kl_target",),
            non_negative=("beta",),
        )
        if self.kl_target is not None and self.beta == 0:
            raise ValueError(
                f"{type(self).__name__}.kl_target needs beta > 0 as the starting β (β adapts by multiplication)"
            )
        if self.group_size < 2:
            raise ValueError(
                f"{type(self).__name__}.group_size must be >= 2 (completions are judged against the others "
                f"of their prompt), got {self.group_size}"
            )


@dataclass(frozen=True)
class GRPOConfig(GroupConfig):
    """Hyperparameters of :class:`GRPO` (with :class:`GroupConfig`'s). The Dr. GRPO correction
    (Liu et al. 2025) is ``GRPOConfig(scale_rewards=False, loss_aggregation="constant")``."""

    scale_rewards: bool = True
    """Divide each completion's advantage by its group's reward std (+1e-4), as the GRPO paper;
    False: centre only (Dr. GRPO)."""
    loss_aggregation: str = "sequence"
    """How token terms become the minibatch's loss: "sequence" (the paper's: the mean over each
    completion's tokens, then over completions), "token" (DAPO: the mean over all tokens of the
    minibatch) or "constant" (Dr. GRPO: their sum divided by completions x max_new_tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"GRPOConfig.loss_aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got "
                f"{self.loss_aggregation!r}"
            )


@dataclass(frozen=True)
class RLOOConfig(GroupConfig):
    """Hyperparameters of :class:`RLOO` (:class:`GroupConfig`'s; ``beta`` is a reward penalty)."""


# --------------------------------------------------------------------------------------- maths
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = STD_EPS
) -> torch.Tensor:
    """GRPO's advantages (N,) of rewards (N,) in consecutive groups of ``group_size``:
    ``r_i - mean`` of the group, divided by the group's std (ddof 0) + ``eps`` if ``scale``."""
    r = rewards.view(-1, group_size)  # (groups, G)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, correction=0, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_baselines(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's baselines (N,): for each reward, the mean of the other ``group_size - 1`` rewards of
    its group (groups are consecutive)."""
    r = rewards.view(-1, group_size)  # (groups, G)
    return ((r.sum(1, keepdim=True) - r) / (group_size - 1)).reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π ‖ π_ref) per sampled token, ``exp(d) - d - 1`` with
    ``d = log π_ref(a) - log π(a)``: non-negative, and exactly 0 where the two agree."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_token_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """PPO's clipped surrogate per token, to minimise: ``max(-A ρ, -A clip(ρ, 1 ± clip_range))``,
    ``ρ = exp(logprobs - old_logprobs)``; all arrays (m,), one entry per token."""
    ratio = torch.exp(logprobs - old_logprobs)
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def group_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip_range: float,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a set of tokens (all arrays (m,), one entry per token: its log-prob now and at
    sampling, its completion's advantage, its weight from :func:`token_weights`): ``sum(weights *
    (clipped surrogate + beta * k3))``, with its two parts (the weighted surrogate and the weighted
    k3 before ``beta``; the k3 part is 0 without ``ref_logprobs``)."""
    pg = clipped_token_loss(logprobs, old_logprobs, advantages, clip_range)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(pg)
    pg_part, kl_part = (weights * pg).sum(), (weights * kl).sum()
    return pg_part + beta * kl_part, pg_part, kl_part


def token_weights(
    lengths: torch.Tensor,
    max_new_tokens: int,
    aggregation: str,
    totals: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(n, max_new_tokens) weight of each token of n completions of ``lengths`` (n,) in their
    minibatch's loss (0 past a completion's end), so that the loss is ``sum(weights * terms)``.
    ``totals``: the completions and tokens of the whole minibatch when these n are only a share of
    it (one rank's, under ``torchrun``); None: they are the whole minibatch.

    - ``"sequence"``: ``1 / (n * length_i)``, the mean over each completion, then over completions;
    - ``"token"``: ``1 / sum(lengths)``, the mean over all tokens;
    - ``"constant"``: ``1 / (n * max_new_tokens)``, the sum over tokens divided by a constant;
    - ``"sum"``: ``1 / n``, each completion's sum over its tokens, averaged over completions (RLOO).
    """
    n, tokens = totals if totals is not None else (lengths.shape[0], lengths.sum().double())
    valid = torch.arange(max_new_tokens, device=lengths.device) < lengths.unsqueeze(1)  # (n, M)
    if aggregation == "sequence":
        w = 1.0 / (n * lengths.unsqueeze(1).double())
    elif aggregation == "token":
        w = 1.0 / tokens
    elif aggregation == "constant":
        w = lengths.new_full((), 1.0 / (n * max_new_tokens), dtype=torch.float64)  # no host-to-device copy
    elif aggregation == "sum":
        w = lengths.new_full((), 1.0 / n, dtype=torch.float64)
    else:
        raise ValueError(f"aggregation must be one of {(*LOSS_AGGREGATIONS, 'sum')}, got {aggregation!r}")
    return torch.where(valid, w, 0.0).float()


class GroupRollout(NamedTuple):
    """One rollout of a group agent: one finished episode per env row, rows in group order
    (group k = rows ``[k*G, (k+1)*G)``); every tensor on the agent's device."""

    input_ids: torch.Tensor  # (N, L) each row's episode: its prompt, then its completion from column P
    attention_mask: torch.Tensor  # (N, L)
    lengths: torch.Tensor  # (N,) long, tokens generated (>= 1)
    logprobs: torch.Tensor  # (N, M) log π_old of generated token t (column P + t); 0 from lengths on
    ref_logprobs: torch.Tensor | None  # (N, M) log π_ref of the same tokens; None without a reference
    rewards: torch.Tensor  # (N,) float32, the episode's return (the env's rewards, no KL penalty)
    kl_sampled: torch.Tensor  # (N,) float32, sum over the completion of log π_old - log π_ref (0 without)
    env_steps: int  # env steps of the rollout, every row counted (waits and discarded steps too)


# --------------------------------------------------------------------------------------- agents
class GroupAgent(OnPolicyAgent):
    """What GRPO and RLOO share: group rollouts, one completion per row, and the update on whole
    completions; they differ in :meth:`advantages`, the loss's aggregation and where the KL goes.

    Parameters as :class:`agents.on_policy.OnPolicyAgent`'s: ``env`` (``"TextGen-v0"`` or a
    :class:`~textgym.vector.TextGenVectorEnv` with ``group_size=config.group_size``,
    ``autoreset_mode="same_step"``, ``array_type="torch"``), ``config``, ``num_envs`` (a multiple of
    ``config.group_size``), ``env_kwargs`` (without ``group_size``), ``device``, ``seed``,
    ``tensorboard_log``, ``verbose``, ``init_policy``, ``policy_model``, ``hf_config``.
    """

    config: GroupConfig
    aggregation = "sequence"
    kl_in_loss = False
    reference_decodes = False  # the reference scores the finished completions in one pass
    kl_control_tag = "train/kl_ref_sampled"

    def _env_options(self) -> dict[str, Any]:
        if "group_size" in self.env_kwargs:
            raise ValueError(
                f"group_size is {type(self.config).__name__}.group_size (here {self.config.group_size}), "
                "not an env argument: leave it out of env_kwargs"
            )
        return {"group_size": self.config.group_size}

    def _check_env(self, env: TextGenVectorEnv) -> None:
        if env.group_size != self.config.group_size:
            raise ValueError(
                f"{type(self).__name__} needs an env with group_size={self.config.group_size} "
                f"({type(self.config).__name__}.group_size), got group_size={env.group_size}"
            )

    def _kl_settings(self) -> tuple[float, float | None, int | None]:
        return self.config.beta, self.config.kl_target, self.config.kl_horizon

    def _collect(self) -> GroupRollout:
        return self.collect_rollout()

    def _train(self, batch: GroupRollout) -> dict[str, float]:
        return self.update(batch)

    def advantages(self, rollout: GroupRollout) -> torch.Tensor:
        """(N,) the advantage of each completion, given to every one of its tokens."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect_rollout(self) -> GroupRollout:
        """One episode per row (see the module docstring): every row starts a fresh episode on the
        prompt its group holds, and the env steps until every row's episode has ended."""
        assert self._obs is not None
        env, N, P = self.env, self.num_envs, self.prompt_window
        M, dev = env.config.max_new_tokens, self.device
        # A group that ended early in the last rollout began a new episode under the old weights:
        # restart every group on the prompt it holds (the generators are not advanced).
        prompts = env.host_view.prompt_index
        obs, _ = env.reset(options={"prompt_index": prompts})
        self._obs = obs
        for acc in (self._episode_return, self._episode_length):
            acc.zero_()
        self._rollout_kl, self._ended_episodes = [], []
        ids, masks = obs["input_ids"].clone(), obs["attention_mask"].clone()  # (N, L) final observations
        logprobs = torch.zeros(N, M, device=dev)
        returns = torch.zeros(N, dtype=torch.float64, device=dev)
        live = torch.ones(N, dtype=torch.bool, device=dev)  # rows whose rollout episode runs
        live_host = np.ones(N, dtype=bool)  # the same, as the host knows it from the env
        self.policy.eval()
        # The weights changed in the last update: recompute every cached key and value.
        logits, _ = self._cache.rebuild(obs["input_ids"], obs["attention_mask"])
        steps = 0
        for t in range(M):  # a live row generates token t at step t; all have ended after M steps
            action, _, logprob = self._sample(logits)
            logprobs[:, t] = torch.where(live, logprob, 0.0)
            obs, reward, terminated, truncated, infos = env.step(action)
            host = env.host_view  # no read of the device
            steps += 1
            # Under same_step a waiting row's step is no transition; a live row never waits, so
            # this is a guard: the steps trained on are the live rows' only.
            trained = live & ~infos["waiting"] if "waiting" in infos else live
            done = (terminated | truncated) & trained
            ended = np.flatnonzero((host.terminated | host.truncated) & live_host & ~host.waiting)
            returns += torch.where(trained, reward, 0.0)
            self._track_episodes(reward, done, ended, infos, live=trained)
            if ended.size:
                final = infos["final_obs"]
                ids = torch.where(done.unsqueeze(1), final["input_ids"], ids)
                masks = torch.where(done.unsqueeze(1), final["attention_mask"], masks)
            live &= ~done
            live_host[ended] = False
            # Counted per step, so an interrupted rollout leaves a consistent state to save.
            self._obs = obs
            self.num_timesteps += N
            if not live_host.any():
                break
            logits, _ = self._cache.step(obs["input_ids"], obs["attention_mask"], P, host)
        assert not live_host.any(), "every episode ends within max_new_tokens steps"
        self._check_logits()
        self._log_episodes()
        lengths = masks[:, P:].sum(1)  # (N,)
        ref_logprobs, kl_sampled = None, torch.zeros(N, device=dev)
        if self.reference is not None:
            ref_logprobs = self._reference_pass(ids, masks, lengths)
            kl_sampled = (logprobs.double() - ref_logprobs.double()).sum(1).float()  # both 0 past the end
            self._rollout_kl = kl_sampled.tolist()
        return GroupRollout(
            ids, masks, lengths, logprobs, ref_logprobs, returns.float(), kl_sampled, steps * N
        )

    @torch.no_grad()
    def _reference_pass(self, ids: torch.Tensor, masks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log π_ref (N, M) of every completion's tokens (0 past its length), by causal passes of
        the reference over the finished completions, ``micro_batch_size`` rows at a time. One
        pass over whole sequences costs less than decoding the reference beside the policy token
        by token, as PPO must (its KL penalty enters the rewards as they are collected)."""
        N, M = len(ids), self.env.config.max_new_tokens
        out = torch.zeros(N, M, device=self.device)
        micro = self.config.micro_batch_size or N
        for start in range(0, N, micro):
            rows = torch.arange(start, min(start + micro, N), device=self.device)
            valid = torch.arange(M, device=self.device).unsqueeze(0) < lengths[rows].unsqueeze(1)  # (b, M)
            r, t = valid.nonzero(as_tuple=True)  # (m,) each generated token: its row, its index
            shared = self._shared_prompts(self.reference, range(start, min(start + micro, N)))
            log_probs, tokens = self._token_log_probs(
                self.reference, ids[rows], masks[rows], r, t, shared=shared
            )
            out[rows[r], t] = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return out

    def _token_log_probs(
        self,
        model: Any,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        t: torch.Tensor,
        filled: tuple[int, int] | None = None,
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probabilities (m, V) that ``model`` (the policy or the reference, under the
        action mask) gives completion token ``t`` of row ``rows`` (m,) of ``ids``/``mask`` (b, L),
        by one causal pass, and those tokens (m,). The pass covers the columns from the first real
        token of any row to the last (:func:`agents.on_policy.filled_span`: a third of them on the
        reviews task with a real tokenizer are padding in every row), from column 0 for the
        encoder-decoder policy (:func:`agents.on_policy.forward_span`; ``filled``: as there).
        ``shared``: the rows that hold one prompt (:meth:`_shared_prompts`), whose prompt columns
        the model then runs once (:func:`agents.policy.hidden_from`)."""
        first, last = forward_span(model, mask, filled)
        ids, mask = ids[:, first : last + 1], mask[:, first : last + 1]
        P = self.prompt_window - first  # the completions' first column in the cut arrays
        hidden = hidden_from(
            model, ids, mask, P - 1, shared
        )  # (b, last - first + 2 - P, C): columns from P - 1
        logits, _ = model.heads(hidden[rows, t])  # (m, V): the column before each token
        return F.log_softmax(self._masked(logits), dim=-1), ids[rows, P + t]  # float32 log-probs

    def _shared_prompts(self, model: Any, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(first, inverse)`` of the rollout's ``rows`` (as the host knows them) by group, as
        :func:`agents.policy.distinct_rows` gives them: every row of a group holds its group's
        prompt (the rollout restarts each group on it). None where no two rows share a group, or
        ``model`` cannot run shared prompts once (no ``hidden_shared_prefix``)."""
        if not hasattr(model, "hidden_shared_prefix"):
            return None
        place: dict[int, int] = {}
        inverse = [place.setdefault(row // self.config.group_size, len(place)) for row in rows]
        if len(place) == len(inverse):
            return None
        first = [0] * len(place)
        for i in reversed(range(len(inverse))):
            first[inverse[i]] = i
        index = to_device(np.array(first + inverse, dtype=np.int64), self.device)  # (u + b,), no wait
        return index[: len(first)], index[len(first) :]

    def _kl_stats(self) -> dict[str, float]:
        """The sampled KL to the reference of the rollout's completions, sum over each one's tokens
        of log π_old - log π_ref, averaged (nats per completion): the reference scores the sampled
        tokens in one pass, so the exact per-step KL (``train/kl_ref`` of PPO) is not computed."""
        means = dist.global_mean(self._rollout_kl)  # over every rank's completions
        sampled = float("nan") if means is None else float(means[0])
        return {"train/kl_ref_sampled": sampled, "train/kl_coef": self.kl.value}

    # ----------------------------------------------------------------------------------- update
    def update(self, rollout: GroupRollout) -> dict[str, float]:
        """``n_epochs`` passes of minibatch steps on the rollout's whole completions.

        Returns the update's metrics: means over its minibatches, except ``train/loss`` (the last
        minibatch's, as SB3 logs it), and the rollout's group statistics.

        Under ``torchrun`` a minibatch is the union of every rank's (each rank has ``num_envs``
        rows, so all take the same steps): token weights count the completions and tokens of all
        ranks, gradients and logged sums are summed over them (:mod:`agents.distributed`). The
        advantages are the groups' own, and a group's rows live in one rank: nothing to share.

        Host syncs: on a GPU each read of the device waits for it. In one process the update reads
        it twice, whatever its number of minibatches: the sizes of every gather, and every
        minibatch's statistics at the end, where it also raises
        :class:`~agents.on_policy.TrainingDivergedError` for a non-finite loss or gradient (the fused
        Adam has skipped that step and the later ones: :meth:`_divergence_flag`). Adam
        without ``fused`` (checked before each step) and ``torchrun`` (token counts over all ranks)
        read it once per minibatch more.
        """
        cfg = self.config
        N, M = rollout.logprobs.shape
        advantages = self.advantages(rollout)  # (N,)
        micro = cfg.micro_batch_size or N
        beta = self.kl.value if self.kl_in_loss and rollout.ref_logprobs is not None else 0.0
        # Each completion's length and real columns and every epoch's order of the completions, in
        # one read: the host then knows the size of every gather below without asking the device.
        # The minibatch steps draw no random numbers, so these are the orders drawn epoch by epoch.
        orders = [torch.randperm(N, device=self.device) for _ in range(cfg.n_epochs)]
        lengths_host, firsts, lasts, *orders_host = torch.stack(
            [rollout.lengths, *filled_columns(rollout.attention_mask), *orders]
        ).tolist()
        self.policy.train()
        rows: list[torch.Tensor] = []  # each minibatch's (8,): the sums of _loss_sums, the grad norm
        skipped = self._divergence_flag()
        for order, order_host in zip(orders, orders_host, strict=True):
            offset = 0
            for batch in order.chunk(cfg.num_minibatches):
                batch_host = order_host[offset : offset + len(batch)]
                offset += len(batch)
                # Weights over the whole minibatch (every rank's share), however it is cut into
                # micro-batches.
                lengths = rollout.lengths[batch]
                totals = None
                if dist.world_size() > 1:
                    count = dist.all_sum(torch.stack([lengths.new_tensor(len(batch)), lengths.sum()]))
                    totals = (int(count[0]), int(count[1]))
                weights = token_weights(lengths, M, self.aggregation, totals)  # (b, M)
                self.optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(7, device=self.device)
                for start in range(0, len(batch), micro):
                    part = batch_host[start : start + micro]
                    terms = self._loss_sums(
                        rollout,
                        batch[start : start + micro],
                        weights[start : start + micro],
                        advantages,
                        beta,
                        (
                            sum(lengths_host[i] for i in part),
                            min(firsts[i] for i in part),
                            max(lasts[i] for i in part),
                        ),
                        part,
                    )
                    terms[0].backward()  # each micro-batch adds its share of the minibatch's loss
                    sums += terms.detach()
                # Under torchrun: the gradient and the sums of the whole minibatch, every rank's share.
                dist.reduce_gradients(self._trainable, sums)
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, cfg.max_grad_norm)
                rows.append(torch.cat([sums, grad_norm.float().reshape(1)]))
                if skipped is None:  # Adam without fused: read now
                    self._check_minibatch(len(rows), rows[-1].tolist(), advantages)
                self._step(torch.isfinite(sums[0]) & torch.isfinite(grad_norm), skipped)
        self.optimizer.zero_grad(set_to_none=True)  # the rollout needs that memory more
        by_group = rollout.rewards.view(-1, cfg.group_size)  # (groups, G)
        spread = by_group.std(1, correction=0)
        # Every rank has as many groups: the global mean over groups is the mean of the ranks'.
        zero_std = (by_group == by_group[:, :1]).all(1).float()
        group_means = dist.all_sum(torch.stack([spread.mean(), zero_std.mean()])) / dist.world_size()
        # The update's last read of the device: every minibatch's statistics at once.
        *flat, group_std, zero_std_fraction = torch.cat([*rows, group_means]).tolist()
        host_rows = [flat[i : i + 8] for i in range(0, len(flat), 8)]
        if skipped is not None:
            for minibatch, row in enumerate(host_rows, 1):
                self._check_minibatch(minibatch, row, advantages)
        trained, env_steps = dist.sum_int(sum(lengths_host)), dist.sum_int(rollout.env_steps)
        pg_losses = [row[1] for row in host_rows]
        kl_losses = [row[2] for row in host_rows]
        entropy_losses = [row[3] / row[6] for row in host_rows]
        approx_kls = [row[4] / row[6] for row in host_rows]
        clip_fractions = [row[5] / row[6] for row in host_rows]
        stats = {
            "train/policy_gradient_loss": float(np.mean(pg_losses)),
            "train/entropy_loss": float(np.mean(entropy_losses)),
            "train/approx_kl": float(np.mean(approx_kls)),
            "train/clip_fraction": float(np.mean(clip_fractions)),
            "train/loss": host_rows[-1][0],  # last minibatch, as SB3
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
            "train/clip_range": cfg.clip_range,
            "train/n_updates": self.n_updates + 1,
            "train/epochs": cfg.n_epochs,
            "train/sequences": N * dist.world_size(),
            "train/group_reward_std": group_std,
            "train/zero_std_fraction": zero_std_fraction,
            "rollout/trained_fraction": trained / env_steps,
        }
        if beta > 0:
            stats["train/kl_k3"] = float(np.mean(kl_losses))
        return stats

    def _check_minibatch(self, minibatch: int, row: list[float], advantages: torch.Tensor) -> None:
        """Raise :class:`~agents.on_policy.TrainingDivergedError` if the loss or the gradient norm of
        ``row`` (a minibatch's statistics as the update keeps them) is not finite."""
        loss, pg_loss, kl_loss, *_, grad_norm = row
        if not math.isfinite(loss):
            self._diverged(
                f"the loss is not finite in minibatch {minibatch} of the update (policy-gradient {pg_loss}, "
                f"k3 KL {kl_loss}; advantages in [{advantages.min().item():.3g}, {advantages.max().item():.3g}])"
            )
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm} in minibatch {minibatch} of the update")

    def _loss_sums(
        self,
        rollout: GroupRollout,
        part: torch.Tensor,
        weights: torch.Tensor,
        advantages: torch.Tensor,
        beta: float,
        sizes: tuple[int, int, int] | None = None,
        part_rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One forward pass over the completions ``part`` (indices into the rollout's rows) with
        their token ``weights`` (b, M): the weighted loss (differentiable), its policy-gradient and
        k3 parts, and sums over their tokens of the negative entropy, the approx-KL, the clipped
        ratios and the token count (not), as a (7,) tensor. ``sizes``: their number of tokens and
        the first and last columns of ``part`` that hold a real token, as the host knows them (no
        host sync here); None: read from the device. ``part_rows``: ``part`` as the host knows it,
        whose rows of one group share their prompt's pass (:meth:`_shared_prompts`)."""
        cfg = self.config
        ids, mask = rollout.input_ids[part], rollout.attention_mask[part]  # (b, L)
        trained = (weights > 0).reshape(-1)  # (b*M,)
        count, filled = (int(trained.sum()), None) if sizes is None else (sizes[0], (sizes[1], sizes[2]))
        index = compact(trained, count)  # (m,) each trained token, row by row
        rows, t = index // weights.shape[1], index % weights.shape[1]  # its row in part, its index
        shared = None if part_rows is None else self._shared_prompts(self.policy, part_rows)
        with self._in_place_gradients():
            log_probs, tokens = self._token_log_probs(
                self.policy, ids, mask, rows, t, filled, shared
            )  # (m, V), (m,)
        new_logprobs = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (m,)
        with torch.no_grad():  # logged only: no (m, V) tensors kept for a backward
            entropy = -(log_probs.exp() * log_probs).sum(-1)  # (m,)
        old_logprobs = rollout.logprobs[part][rows, t]
        ref = rollout.ref_logprobs[part][rows, t] if beta > 0 and rollout.ref_logprobs is not None else None
        loss, pg, kl = group_loss(
            new_logprobs, old_logprobs, advantages[part][rows], weights[rows, t], cfg.clip_range, ref, beta
        )
        with torch.no_grad():
            log_ratio = new_logprobs - old_logprobs
            ratio = log_ratio.exp()
            approx_kl = (ratio - 1) - log_ratio  # as PPO: (r - 1) - log r
            clipped = ((ratio - 1).abs() > cfg.clip_range).float()
        return torch.stack(
            [
                loss,
                pg.detach(),
                kl.detach(),
                -entropy.sum().detach(),
                approx_kl.sum(),
                clipped.sum(),
                loss.new_full((), float(len(t))),
            ]
        )


class GRPO(GroupAgent):
    """Group Relative Policy Optimization (Shao et al. 2024) on ``TextGen-v0``; see the module
    docstring. ``GRPO(config=GRPOConfig(...), num_envs=64, ...)``, then ``learn``, ``save``,
    ``GRPO.load``, ``predict``, ``generate`` as :class:`agents.PPO`."""

    algorithm = "grpo"
    config_class = GRPOConfig
    config: GRPOConfig
    kl_in_loss = True

    @property
    def aggregation(self) -> str:  # type: ignore[override]
        return self.config.loss_aggregation

    def advantages(self, rollout: GroupRollout) -> torch.Tensor:
        return group_advantages(rollout.rewards, self.config.group_size, self.config.scale_rewards)


class RLOO(GroupAgent):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024) on ``TextGen-v0``; see the module docstring.
    ``RLOO(config=RLOOConfig(...), num_envs=64, ...)``, then as :class:`agents.PPO`."""

    algorithm = "rloo"
    config_class = RLOOConfig
    config: RLOOConfig
    aggregation = "sum"

    def advantages(self, rollout: GroupRollout) -> torch.Tensor:
        rewards = rollout.rewards
        if self.reference is not None:  # the KL penalty is part of the reward (section 3.1)
            rewards = rewards - self.kl.value * rollout.kl_sampled
        return rewards - leave_one_out_baselines(rewards, self.config.group_size)
