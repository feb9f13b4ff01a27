"""PPO with a Transformer policy on the batched TextGen-v0, everything on the agent's device.

One update reads top to bottom in :meth:`OnPolicyAgent.learn` with :meth:`PPO.collect_rollout` and
:meth:`PPO.update`: a rollout of ``n_steps`` on all envs (acting
through a KV cache, one new token per env per step), GAE (:func:`agents.buffer.compute_gae`), then
``n_epochs`` passes over minibatches of whole sequences with the clipped surrogate objective
(Schulman et al. 2017, eq. 7), an optionally clipped value loss, an entropy bonus, global
gradient-norm clipping, Adam (eps 1e-5), linear learning-rate annealing and early stopping on
``target_kl``; then logging under Stable-Baselines3's TensorBoard tags.

Where it departs from the textbook: the update groups transitions by episode and computes the
log-probs, values and entropies of all actions of an episode in one causal forward pass over its
last observation (:func:`agents.buffer.segments`), so minibatches are sets of sequences; and a
truncated episode is not bootstrapped by default (``PPOConfig.bootstrap_truncated``), because
TextGen-v0 delivers the reward model's score when it truncates at ``max_new_tokens``: the return
is complete and there is no future to estimate.

Memory: a minibatch can be cut into micro-batches of ``PPOConfig.micro_batch_size`` sequences, each
one forward and backward pass, whose gradients add up to the minibatch's before its single optimizer
step (advantages normalised and losses averaged over the whole minibatch). A Hugging Face policy can
also run in bfloat16, train LoRA adapters and checkpoint activations (:class:`agents.hf.HFConfig`).

What is not PPO's own lives in :class:`agents.on_policy.OnPolicyAgent`, which the group agents of
:mod:`agents.grpo` (GRPO, RLOO) share: the env and the policy, the KL reference, the training loop
with its interrupt handling, checkpoints, logging, ``predict`` and ``generate``; and in
:func:`~agents.on_policy.check_fields` / :class:`~agents.on_policy.ConfigIO`, the validation and
JSON round trip of every config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents import distributed as dist
from agents.buffer import Rollout, Segments, compact, compute_gae, segments
from agents.on_policy import (
    CHECKPOINT_SCHEMA,
    ConfigIO,
    OnPolicyAgent,
    TrainingDivergedError,
    check_fields,
    filled_columns,
    forward_span,
)
from agents.policy import PolicyConfig, hidden_from, last_real_column
from textgym.core import device_memory, to_device
from textgym.vector import TextGenVectorEnv

__all__ = ["CHECKPOINT_SCHEMA", "PPO", "OnPolicyAgent", "PPOConfig", "TrainingDivergedError"]

BOOL_FIELDS = (
    "anneal_lr",
    "normalize_advantage",
    "bootstrap_truncated",
    "mask_actions",
    "compile_decode",
    "autocast",
)


@dataclass(frozen=True)
class PPOConfig(ConfigIO):
    """Hyperparameters of :class:`PPO`; saved as ``config.json`` and inside every checkpoint."""

    n_steps: int = 32
    """Env steps per env in each rollout; a rollout holds ``n_steps * num_envs`` transitions."""
    n_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per epoch; each is a set of whole sequences (episode pieces)."""
    micro_batch_size: int | None = None
    """Sequences per forward and backward pass inside a minibatch: their gradients add up to the
    minibatch's before the one optimizer step (the same gradient up to float rounding; advantages
    are normalised and losses averaged over the whole minibatch), so memory is bounded by this
    many sequences whatever the minibatch holds. None: the whole minibatch in one pass."""
    learning_rate: float = 1e-3
    """Adam step size at the start of training."""
    anneal_lr: bool = True
    """Decay the learning rate linearly to 0 over ``total_timesteps``."""
    adam_eps: float = 1e-5
    """Adam's epsilon (1e-5 rather than torch's 1e-8, as in the reference PPO implementations)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE's bias/variance trade-off."""
    clip_range: float = 0.2
    """Clip of the probability ratio in the surrogate objective."""
    clip_range_vf: float | None = None
    """Clip of the value change around the rollout's values; None: unclipped value loss."""
    normalize_advantage: bool = True
    """Normalise advantages to mean 0, std 1 within each minibatch."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs of an update once approx-KL exceeds 1.5 × this (SB3's rule); None: never."""
    bootstrap_truncated: bool = False
    """Add γ·V(final observation) to the reward of truncated episodes (SB3 semantics). Off by
    default: TextGen-v0 scores the completion when it truncates, so the return is complete."""
    kl_coef: float = 0.0
    """β of the per-token KL penalty ``-β·(log π - log π_ref)`` to the reference policy: the initial
    policy (e.g. a pretrained one), frozen; a copy of it, or under LoRA (``HFConfig.lora_rank``) the
    policy's own model with its adapters switched off. 0 with ``kl_target=None``: no penalty."""
    kl_target: float | None = None
    """Adapt β after each rollout towards this KL per episode (nats), as Ziegler et al. 2019;
    None keeps β fixed. Needs ``kl_coef > 0`` as the starting β."""
    kl_horizon: int | None = None
    """How fast the adaptive β moves: after a rollout of n env steps (all envs together) β is
    multiplied by ``1 + e·min(n / kl_horizon, 1)``, e the clipped error (±20%). None: one rollout,
    so β moves by up to 20% after every update. An integer counts env steps, not Ziegler et al.'s
    episodes: 10_000 with rollouts of 256 env steps moves β by at most 0.5% per update."""
    mask_actions: bool = False
    """Sample only the tokens of the env's action mask (its ``allowed_tokens``); the reference
    policy of the KL penalty is masked the same way."""
    sample_interval: int = 10
    """Write generated text samples to TensorBoard every this many updates."""
    compile_decode: bool = False
    """Act through a KV cache whose decoding step is compiled by ``torch.compile`` with fixed
    shapes (the built-in decoder-only policy only): compiled once, on the first step (about 7 s on
    a CPU core), then 1.65x faster per step on the default task's 64 rows (one core); falls back
    to eager decoding with a warning where compilation fails. Acting is a quarter of training time
    on the default task: a 65k-env-step run there did not earn the compilation back (3,557–4,200
    against 4,937–5,048 env steps/s, the same final reward). It pays where acting dominates:
    generation, long episodes, long runs. On a CUDA device the compiled step is also captured as
    a CUDA graph and replayed (:class:`agents.policy.KVCache`): one launch per decoding step."""
    autocast: bool = False
    """Run the built-in policy under ``torch.autocast`` in bfloat16, acting and updating alike
    (:attr:`textgym.nn.TransformerDecoder.autocast`): its products, attention and KV cache in
    bfloat16; its weights, their gradients, Adam's moments, the residual stream, the logits and
    the losses in float32. For a GPU with bfloat16 arithmetic and a policy large enough to be
    bound by it; see the README's Speed section for what it does on a CPU. A Hugging Face policy
    has its own: ``HFConfig(autocast=True)``."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Architecture of the Transformer policy."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            bools=BOOL_FIELDS,
            positive_ints=("n_steps", "n_epochs", "num_minibatches", "sample_interval"),
            optional_positive_ints=("kl_horizon", "micro_batch_size"),
            positive=("learning_rate", "adam_eps", "clip_range", "max_grad_norm"),
            unit_interval=("gamma", "gae_lambda"),
            non_negative=("ent_coef", "vf_coef", "kl_coef"),
            optional_positive=("clip_range_vf", "target_kl", "kl_target"),
        )
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError(
                "PPOConfig.kl_target needs kl_coef > 0 as the starting β (β adapts by multiplication)"
            )

    @classmethod
    def pretrained(cls, lora: bool = False, kl: bool = True, **overrides: Any) -> PPOConfig:
        """A preset for fine-tuning a pretrained language model (e.g. SmolLM2-135M), not a policy
        trained from scratch, whose defaults take far too large steps on such a model (measured:
        approx-KL 0.1–3 and clip fractions 0.3–0.5 per update at lr 1.41e-5–3e-5 with 4 × 4
        minibatch steps).

        - Few, large optimizer steps: 2 epochs × 2 minibatches per rollout of ``n_steps=16``
          (4 steps, not 16): each step averages over more episodes, so it is less noisy, and an
          update costs a quarter of the optimizer work, which dominates on a CPU.
        - ``target_kl=0.05`` stops an update's epochs once approx-KL passes 0.075, a guard against
          the occasional too-large step; no learning-rate annealing (the budget is short anyway).
        - Learning rate 2e-5 for full fine-tuning, 1e-3 under LoRA: LoRA's B matrices start at
          zero and move by about the learning rate per Adam step, so small rates barely move the
          policy (first update on SmolLM2, ``scripts/benchmark.py memory``: approx-KL 0.043 in
          full fine-tuning at 2e-5, 0.0003 under LoRA rank 16 at 2e-4, 0.000 at 1.41e-5). At 1e-3
          a whole LoRA run (below) moved the policy less than full fine-tuning did; higher rates
          were not tried.
        - ``ent_coef=0`` (the KL penalty already keeps the distribution broad), ``vf_coef=0.1``
          (the value head starts random and shares the trunk: its loss must not swamp the policy's
          gradient), ``gamma=1`` (the reward comes once, at the end of a short episode).
        - With ``kl=True``: β starts at 0.1 and adapts towards 3 nats per episode slowly,
          ``kl_horizon=2560`` env steps (at most 2% per rollout of 16 × 16 steps). Measured on
          SmolLM2 (``scripts/rlhf.py``, task ``reviews``, 8,448 env steps, held-out VADER sampled
          at temperature 1, pretrained 0.172): this preset 0.530 at KL 2.91 nats; the same with
          β 0.05 moving up to 20% per rollout 0.722 at KL 7.53 (the KL stayed below the target
          for the first 22 updates, so β collapsed to 0.00045 and could not climb back in time);
          no penalty 0.721 at KL 7.82; the first hand-picked settings (``scripts/rlhf.py --preset baseline``) 0.294 at KL 2.58 (target 2). LoRA
          rank 16 with this preset: 0.401 at KL 2.29.

        ``overrides`` replace any field, e.g. ``PPOConfig.pretrained(learning_rate=1e-5)``.
        """
        preset: dict[str, Any] = {
            "n_steps": 16,
            "n_epochs": 2,
            "num_minibatches": 2,
            "learning_rate": 1e-3 if lora else 2e-5,
            "anneal_lr": False,
            "target_kl": 0.05,
            "ent_coef": 0.0,
            "vf_coef": 0.1,
            "gamma": 1.0,
            "max_grad_norm": 1.0,
        }
        if kl:
            preset.update(kl_coef=0.1, kl_target=3.0, kl_horizon=2560)
        return cls(**{**preset, **overrides})


class PPO(OnPolicyAgent):
    """PPO with a Transformer policy on ``TextGen-v0`` (API modelled on Stable-Baselines3).

    :param env: ``"TextGen-v0"``, or a :class:`~textgym.vector.TextGenVectorEnv` made with
        ``autoreset_mode="same_step", array_type="torch"`` on the agent's device (``group_size=1``:
        PPO trains on every step, and a group's waiting rows are no transitions).
    :param config: hyperparameters (:class:`PPOConfig`).

    Every other parameter, and ``learn``, ``save``, ``load``, ``predict`` and ``generate``, are
    :class:`OnPolicyAgent`'s.
    """

    algorithm = "ppo"
    config_class = PPOConfig
    config: PPOConfig
    default_num_envs = 16
    """16 envs × ``n_steps=32``: 512 transitions per update. Chosen by a sweep of num_envs,
    n_steps, epochs, minibatches and learning rate (``scripts/sweep.py``; the README's "Defaults
    chosen by a sweep"): it reaches each task's reward threshold in fewer env steps than 64 envs,
    which made only 15 updates in 30k env steps."""

    def _check_env(self, env: TextGenVectorEnv) -> None:
        if env.group_size != 1:
            raise ValueError(
                f"PPO trains on every env step, and an env with group_size={env.group_size} has waiting rows "
                "that are not transitions: give group_size=1, or use agents.GRPO or agents.RLOO for groups"
            )
        _check_rollout_fits(self.config.n_steps, env.num_envs, env.config.seq_len, self.device)

    def _kl_settings(self) -> tuple[float, float | None, int | None]:
        return self.config.kl_coef, self.config.kl_target, self.config.kl_horizon

    def _rollout_size(self) -> int | None:
        return self.config.n_steps * self.total_envs

    def _compiles_decode(self) -> bool:
        return self.config.compile_decode

    def _collect(self) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        return self.collect_rollout()

    def _train(self, batch: tuple[Rollout, torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return self.update(*batch)

    @torch.no_grad()
    def collect_rollout(self) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """Run the policy for ``n_steps`` on every env; returns the rollout, the values of the
        observations after it (N,) and whether its last step ended each episode (N,)."""
        assert self._obs is not None
        T, N, cfg = self.config.n_steps, self.num_envs, self.config
        L, dev = self.seq_len, self.device
        ids = torch.empty(T, N, L, dtype=torch.long, device=dev)
        masks = torch.empty_like(ids)
        actions = torch.empty(T, N, dtype=torch.long, device=dev)
        logprobs, values, rewards = (torch.empty(T, N, device=dev) for _ in range(3))
        starts, dones = torch.empty(T, N, device=dev), torch.empty(T, N, device=dev)
        self.policy.eval()
        obs = self._obs
        # The weights changed in the last update: recompute every cached key and value.
        logits, value = self._cache.rebuild(obs["input_ids"], obs["attention_mask"])
        ref = self.reference is not None
        if ref:
            ref_logits, _ = self._ref_cache.rebuild(obs["input_ids"], obs["attention_mask"])
        self._rollout_kl, self._ended_episodes = [], []
        beta = self.kl.value
        for t in range(T):
            ids[t], masks[t] = obs["input_ids"], obs["attention_mask"]
            starts[t] = (obs["attention_mask"][:, self.prompt_window :].sum(1) == 0).float()
            action, log_probs, logprob = self._sample(logits)
            actions[t], logprobs[t], values[t] = action, logprob, value
            if ref:
                # The reference scores the very token sampled, under the same mask and temperature.
                ref_log_probs = self._reference_log_probs(ref_logits)
                kl_sampled = logprob - ref_log_probs.gather(1, action.unsqueeze(1)).squeeze(1)
                kl_exact = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)  # KL(π(·|s) ‖ π_ref(·|s))
            obs, reward, terminated, truncated, infos = self.env.step(action)
            host = self.env.host_view  # what ended, and the rows' lengths: no read of the device
            done = terminated | truncated
            if ref:
                self._episode_kl += torch.stack([kl_exact, kl_sampled], 1).double()
            # The env's own rewards, before any bootstrap or penalty.
            ended = np.flatnonzero(host.terminated | host.truncated)
            self._track_episodes(reward, done, ended, infos, kl=self._episode_kl if ref else None)
            if ref:
                reward = reward - beta * kl_sampled.double()
            cut = np.flatnonzero(host.truncated)
            if cfg.bootstrap_truncated and cut.size:
                rows = to_device(cut, dev)
                final_ids, final_mask = (
                    infos["final_obs"]["input_ids"][rows],
                    infos["final_obs"]["attention_mask"][rows],
                )
                _, final_values = self.policy(final_ids, final_mask)  # (k, L)
                last = final_values[torch.arange(len(rows), device=dev), last_real_column(final_mask)]
                reward = reward.clone()
                reward[rows] += cfg.gamma * last.double()
            rewards[t], dones[t] = reward.float(), done.float()
            # Counted per step, so an interrupted rollout leaves a consistent state to save.
            self._obs = obs
            self.num_timesteps += N
            if t + 1 < T:
                logits, value = self._cache.step(
                    obs["input_ids"], obs["attention_mask"], self.prompt_window, host
                )
                if ref:
                    ref_logits, _ = self._ref_cache.step(
                        obs["input_ids"], obs["attention_mask"], self.prompt_window, host
                    )
        _, last_values = self._cache.step(obs["input_ids"], obs["attention_mask"], self.prompt_window, host)
        self._check_logits()
        self._log_episodes()
        rollout = Rollout(ids, masks, actions, logprobs, values, rewards, starts, dones)
        return rollout, last_values, dones[-1]

    def update(
        self, rollout: Rollout, last_values: torch.Tensor, last_dones: torch.Tensor
    ) -> dict[str, float]:
        """``n_epochs`` of clipped-PPO minibatch steps on whole sequences of ``rollout``.

        Returns the update's metrics under Stable-Baselines3's tags: means over its minibatches,
        except ``train/loss`` (the last minibatch's, as SB3 logs it).

        Under ``torchrun`` a minibatch is the union of every rank's: advantages are normalised by
        its mean and std over all ranks, each rank's loss is divided by its transition count over
        all ranks and the gradients are summed (:mod:`agents.distributed`), and the logged sums
        are reduced: every rank takes the same steps and stops early after the same minibatch.

        Host syncs: on a GPU each read of the device waits for it. In one process without
        ``target_kl`` the update reads it three times, whatever its number of minibatches: the
        number of sequences (:func:`~agents.buffer.segments`), the sizes of every gather, and every
        minibatch's statistics at the end, where it also raises :class:`TrainingDivergedError` for
        a non-finite loss or gradient (the fused Adam has skipped that step and the later ones:
        :meth:`_divergence_flag`). ``target_kl`` (the approx-KL decides after each
        minibatch whether to go on), Adam without ``fused`` (checked before each step) and
        ``torchrun`` (the normalisers are counts over all ranks) read it once per minibatch more.
        """
        cfg = self.config
        advantages, returns = compute_gae(
            rollout.rewards,
            rollout.values,
            rollout.episode_starts,
            last_values,
            last_dones,
            cfg.gamma,
            cfg.gae_lambda,
        )
        seg = segments(rollout, self.prompt_window)
        # Transitions flattened in (T, N) order: (T*N,)
        actions, old_logprobs = rollout.actions.reshape(-1), rollout.logprobs.reshape(-1)
        old_values, advantages, returns = (
            rollout.values.reshape(-1),
            advantages.reshape(-1),
            returns.reshape(-1),
        )
        num_segments = seg.input_ids.shape[0]
        micro = cfg.micro_batch_size or num_segments
        # The transition count of each sequence and every epoch's order of the sequences, in one
        # read: the host then knows the size of every gather below without asking the device. The
        # minibatch steps draw no random numbers, so the orders drawn up front are those drawn epoch
        # by epoch; with target_kl, which may stop early and draw fewer, they are drawn per epoch.
        per_segment = torch.zeros(num_segments, dtype=torch.long, device=self.device)
        per_segment.index_add_(0, seg.segment, torch.ones_like(seg.segment))
        n_orders = cfg.n_epochs if cfg.target_kl is None else 0
        orders = [torch.randperm(num_segments, device=self.device) for _ in range(n_orders)]
        counts, firsts, lasts, *orders_host = torch.stack(
            [per_segment, *filled_columns(seg.attention_mask), *orders]
        ).tolist()
        self.policy.train()
        # Each minibatch's mean losses, approx-KL and clip fraction, and its gradient norm: (6,)
        rows: list[torch.Tensor] = []
        continue_training, epochs = True, 0
        skipped = self._divergence_flag(enabled=cfg.target_kl is None)
        for epoch in range(cfg.n_epochs):
            epochs += 1
            order = orders[epoch] if orders else torch.randperm(num_segments, device=self.device)
            order_host = orders_host[epoch] if orders else order.tolist()
            batches = list(order.chunk(cfg.num_minibatches))
            # Ranks hold different numbers of sequences; all must take num_minibatches steps.
            batches += [order[:0]] * (cfg.num_minibatches - len(batches))
            offset = 0
            for batch in batches:
                batch_host = order_host[offset : offset + len(batch)]
                offset += len(batch)
                in_batch = torch.zeros(num_segments, dtype=torch.bool, device=self.device)
                in_batch[batch] = True
                transitions = compact(in_batch[seg.segment], sum(counts[i] for i in batch_host))
                adv = advantages[transitions]  # (n,) the minibatch's transitions
                # n, and the normalisation, over the whole minibatch (every rank's share), however
                # it is cut into micro-batches
                n, adv_mean, adv_var = dist.mean_var(adv)
                if n == 0:
                    continue  # fewer sequences than minibatches on every rank
                adv_mean, adv_scale = (
                    (adv_mean, adv_var.sqrt() + 1e-8) if cfg.normalize_advantage and n > 1 else (0.0, 1.0)
                )
                self.optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(5, device=self.device)
                for start in range(0, len(batch), micro):
                    part = batch_host[start : start + micro]
                    terms = self._loss_sums(
                        batch[start : start + micro],
                        sum(counts[i] for i in part),
                        (min(firsts[i] for i in part), max(lasts[i] for i in part)),
                        seg,
                        actions,
                        old_logprobs,
                        old_values,
                        advantages,
                        returns,
                        adv_mean,
                        adv_scale,
                    )
                    # Each micro-batch adds its share of the minibatch's mean loss to the gradients.
                    part_loss = (terms[0] + cfg.ent_coef * terms[2] + cfg.vf_coef * terms[1]) / n
                    part_loss.backward()
                    sums += terms.detach()
                # Under torchrun: the gradient and the sums of the whole minibatch, every rank's share.
                dist.reduce_gradients(self._trainable, sums)
                means = sums / n  # (5,)
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, cfg.max_grad_norm)
                rows.append(torch.cat([means, grad_norm.float().reshape(1)]))
                if skipped is None:  # read now: target_kl's early stop, or Adam without fused
                    row = rows[-1].tolist()
                    if cfg.target_kl is not None and row[3] > 1.5 * cfg.target_kl:
                        continue_training = False
                        break
                    self._check_minibatch(len(rows), row, returns)
                finite = torch.isfinite(means[:3]).all() & torch.isfinite(grad_norm)
                self._step(finite, skipped)
            if not continue_training:
                break
        self.optimizer.zero_grad(set_to_none=True)  # the rollout needs that memory more
        _, _, var_returns = dist.mean_var(returns)
        _, _, var_errors = dist.mean_var(returns - old_values)
        # The update's last read of the device: every minibatch's statistics at once.
        *flat, var_returns, explained = torch.cat(
            [*rows, var_returns.reshape(1), (1 - var_errors / var_returns).reshape(1)]
        ).tolist()
        host_rows = [flat[i : i + 6] for i in range(0, len(flat), 6)]
        if skipped is not None:
            for minibatch, row in enumerate(host_rows, 1):
                self._check_minibatch(minibatch, row, returns)
        pg_losses, value_losses, entropy_losses, approx_kls, clip_fractions, _ = zip(*host_rows, strict=True)
        pg_loss, value_loss, entropy_loss = host_rows[-1][:3]
        loss = pg_loss + cfg.ent_coef * entropy_loss + cfg.vf_coef * value_loss  # last minibatch, as SB3
        return {
            "train/policy_gradient_loss": float(np.mean(pg_losses)),
            "train/value_loss": float(np.mean(value_losses)),
            "train/entropy_loss": float(np.mean(entropy_losses)),
            "train/approx_kl": float(np.mean(approx_kls)),
            "train/clip_fraction": float(np.mean(clip_fractions)),
            "train/loss": loss,
            "train/explained_variance": float("nan") if var_returns == 0 else explained,
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
            "train/clip_range": cfg.clip_range,
            "train/n_updates": self.n_updates + 1,
            "train/epochs": epochs,
            "train/sequences": dist.sum_int(num_segments),
        }

    def _check_minibatch(self, minibatch: int, row: list[float], returns: torch.Tensor) -> None:
        """Raise :class:`TrainingDivergedError` if the losses or the gradient norm of ``row`` (a
        minibatch's statistics as the update keeps them) are not finite."""
        pg_loss, value_loss, entropy_loss, *_, grad_norm = row
        if not math.isfinite(pg_loss + value_loss + entropy_loss):
            self._diverged(
                f"the loss is not finite in minibatch {minibatch} of the update (policy-gradient {pg_loss}, "
                f"value {value_loss}, entropy {entropy_loss}; returns in [{returns.min().item():.3g}, "
                f"{returns.max().item():.3g}])"
            )
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm} in minibatch {minibatch} of the update")

    def _loss_sums(
        self,
        part: torch.Tensor,
        transitions: int,
        filled: tuple[int, int],
        seg: Segments,
        actions: torch.Tensor,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        adv_mean: torch.Tensor | float,
        adv_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """One forward pass over the sequences ``part`` (indices into ``seg``), which hold
        ``transitions`` transitions and real tokens in the columns ``filled`` (as the host knows
        them: no sync here): sums over them of the clipped surrogate loss, the squared value
        error and the negative entropy (differentiable), then of the approx-KL and of the clipped
        ratios (not), as a (5,) tensor."""
        cfg = self.config
        num_segments = seg.input_ids.shape[0]
        in_part = torch.zeros(num_segments, dtype=torch.bool, device=self.device)
        in_part[part] = True
        local = torch.empty(num_segments, dtype=torch.long, device=self.device)
        local[part] = torch.arange(len(part), device=self.device)
        sel = compact(in_part[seg.segment], transitions)  # (m,) transitions of these sequences
        first, last = forward_span(self.policy, seg.attention_mask[part], filled)
        ids, mask = seg.input_ids[part, first : last + 1], seg.attention_mask[part, first : last + 1]
        # Every action is scored at column P - 1 or later: the columns before it feed attention only.
        start = max(self.prompt_window - 1 - first, 0)
        with self._in_place_gradients():
            hidden = hidden_from(self.policy, ids, mask, start)  # (b, last - first + 1 - start, C)
        logits, values = self.policy.heads(
            hidden[local[seg.segment[sel]], seg.column[sel] - first - start]
        )  # (m, V), (m,)
        log_probs = F.log_softmax(self._masked(logits), dim=-1)  # (m, V), float32 whatever the model's dtype
        new_logprobs = log_probs.gather(1, actions[sel].unsqueeze(1)).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (m,)

        adv = (advantages[sel] - adv_mean) / adv_scale
        log_ratio = new_logprobs - old_logprobs[sel]
        ratio = log_ratio.exp()
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
        if cfg.clip_range_vf is None:
            value_pred = values
        else:
            value_pred = old_values[sel] + (values - old_values[sel]).clamp(
                -cfg.clip_range_vf, cfg.clip_range_vf
            )
        value_error = (returns[sel] - value_pred) ** 2
        with torch.no_grad():
            # (r - 1) - log r: unbiased, non-negative estimator of KL(old || new) (Schulman 2020)
            approx_kl = (ratio - 1) - log_ratio
            clipped = ((ratio - 1).abs() > cfg.clip_range).float()
        return torch.stack([pg.sum(), value_error.sum(), -entropy.sum(), approx_kl.sum(), clipped.sum()])


def _check_rollout_fits(n_steps: int, num_envs: int, seq_len: int, device: torch.device) -> None:
    """Refuse a rollout buffer larger than the device's memory before torch tries to allocate it."""
    # Per transition: the observation (ids and mask, int64) and seven other numbers.
    need = n_steps * num_envs * (2 * seq_len * 8 + 8 + 6 * 4)
    have = device_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"a rollout of n_steps={n_steps} x num_envs={num_envs} transitions of {seq_len} tokens needs "
            f"{need / 2**30:,.1f} GiB for its buffer alone, more than the {have / 2**30:,.1f} GiB of {device}; "
            "lower n_steps or num_envs"
        )
