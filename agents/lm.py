"""Pretraining the Transformer policy as a language model, and its checkpoint.

PPO on language is only useful from a policy that already writes text: :func:`pretrain` trains
:class:`~agents.policy.TransformerPolicy`'s decoder and policy head by next-token prediction on a
task's corpus (or any list of texts), with held-out loss and perplexity logged to TensorBoard.
Its checkpoint (:func:`save_lm` / :func:`load_lm`) loads into :class:`agents.ppo.PPO` as the
initial policy (``init_policy=``) and, frozen, as the reference policy of the KL penalty.

Sequences are ``<bos> text <eos>``, right-padded. The policy counts positions over real tokens
only and never attends to padding, so this is the same input as the environment's left-padded
observations: a model trained here reads TextGen-v0 observations unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.policy import PolicyConfig, TransformerPolicy
from textgym.checks import is_positive_int, is_real
from textgym.core import resolve_device
from textgym.io import load_torch_checkpoint, save_torch
from textgym.learned import check_vocabulary, vocabulary
from textgym.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# vocabulary and check_vocabulary (textgym.learned, where the environment's reward models use them)
# stay importable from here.
__all__ = [
    "LM_SCHEMA",
    "PretrainConfig",
    "check_vocabulary",
    "encode_texts",
    "evaluate_lm",
    "fit",
    "lm_loss",
    "load_lm",
    "pretrain",
    "read_lm_checkpoint",
    "sample_with_kl",
    "save_lm",
    "summary_writer",
    "vocabulary",
]

LM_SCHEMA = "textgym-lm/1"


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of :func:`pretrain`."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step."""
    learning_rate: float = 3e-3
    """AdamW peak step size, reached after ``warmup_steps`` and decayed to 10% by cosine."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_len: int = 64
    """Longest sequence (tokens, ``<bos>`` and ``<eos>`` included); longer texts are cut. Also the
    size of the learned position table: it must cover the environment's observation length."""
    val_fraction: float = 0.1
    """Share of the texts held out for the validation loss."""
    eval_interval: int = 200
    """Steps between validation measurements."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "eval_interval"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(
                    f"PretrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        if not is_positive_int(self.warmup_steps) and self.warmup_steps != 0:
            raise ValueError(
                f"PretrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}"
            )
        if self.max_len < 3:
            raise ValueError(
                f"PretrainConfig.max_len must be >= 3 (<bos>, a token, <eos>), got {self.max_len}"
            )
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not is_real(value) or not 0 < value < math.inf:
                raise ValueError(f"PretrainConfig.{name} must be a positive number, got {value!r}")
        if not is_real(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"PretrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_real(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise ValueError(f"PretrainConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")


def encode_texts(
    texts: Sequence[str], tokenizer: Tokenizer, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``<bos> text <eos>`` rows, right-padded: ids (n, max_len), mask (n, max_len), number cut."""
    ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
    cut = 0
    for i, text in enumerate(texts):
        row = [BOS_ID, *tokenizer.encode(text), EOS_ID]
        if len(row) > max_len:
            row, cut = row[:max_len], cut + 1
        ids[i, : len(row)] = torch.tensor(row)
    mask = (ids != PAD_ID).long()
    return ids, mask, cut


def lm_loss(policy: TransformerPolicy, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over the real target tokens of ``ids`` (B, L)."""
    logits = policy.heads(policy.hidden(ids, mask)[:, :-1])[0]  # (B, L-1, V)
    targets = ids[:, 1:]
    real = mask[:, 1:].bool()
    return F.cross_entropy(logits[real], targets[real])


@torch.no_grad()
def evaluate_lm(
    policy: TransformerPolicy, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 256
) -> float:
    """Token-weighted mean cross-entropy over a whole set (nats per token)."""
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = int(b_mask[:, 1:].sum())
        total += float(lm_loss(policy, b_ids, b_mask)) * n
        count += n
    policy.train(was_training)
    return total / max(count, 1)


def pretrain(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    config: PretrainConfig | None = None,
    policy_config: PolicyConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    tensorboard_log: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
    samples_from: Sequence[str] = (),
    policy: Any = None,
) -> tuple[TransformerPolicy, dict[str, Any]]:
    """Train a :class:`TransformerPolicy` on ``texts`` by next-token prediction.

    :param samples_from: prompts to continue greedily in the TensorBoard text samples.
    :param policy: train this policy instead of a new ``TransformerPolicy(policy_config)``, e.g.
        a Hugging Face model (:class:`agents.hf.HFPolicy`); it is moved to ``device``.
    :return: the policy and a report: initial and final validation loss and perplexity, the
        number of training and held-out texts, the number cut to ``max_len``, seconds.
    """
    config = config or PretrainConfig()
    policy_config = policy_config or PolicyConfig()
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        raise ValueError(f"pretraining needs at least 2 non-empty texts, got {len(texts)}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, round(config.val_fraction * len(texts)))
    val_texts = [texts[i] for i in order[:n_val]]
    train_texts = [texts[i] for i in order[n_val:]]
    tr_ids, tr_mask, cut_tr = encode_texts(train_texts, tokenizer, config.max_len)
    va_ids, va_mask, cut_va = encode_texts(val_texts, tokenizer, config.max_len)
    tr_ids, tr_mask, va_ids, va_mask = (t.to(dev) for t in (tr_ids, tr_mask, va_ids, va_mask))

    if policy is None:
        policy = TransformerPolicy(tokenizer.vocab_size, config.max_len, policy_config)
    policy = policy.to(dev)
    decay = [p for n, p in policy.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in policy.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    start = time.perf_counter()
    with summary_writer(tensorboard_log) as writer:
        if writer is not None:
            architecture = (
                asdict(policy.cfg) if isinstance(policy, TransformerPolicy) else type(policy).__name__
            )
            writer.add_text("config", f"```\n{asdict(config)}\n{architecture}\n```", 0)

        def evaluate(step: int) -> dict[str, float]:
            val = evaluate_lm(policy, va_ids, va_mask)
            if writer is not None and samples_from:
                writer.add_text("samples", _samples_markdown(policy, tokenizer, samples_from), step)
            return {"val_loss": val, "val_perplexity": math.exp(val)}

        evaluations = fit(
            policy,
            optimizer,
            lambda rows: lm_loss(policy, tr_ids[rows], tr_mask[rows]),
            evaluate,
            n_train=len(tr_ids),
            steps=config.steps,
            batch_size=config.batch_size,
            eval_interval=config.eval_interval,
            max_grad_norm=config.max_grad_norm,
            lr_at=lr_at,
            seed=seed,
            writer=writer,
            prefix="pretrain",
            progress_bar=progress_bar,
        )
    history = [(step, metrics["val_loss"]) for step, metrics in evaluations]
    initial_val, final_val = history[0][1], history[-1][1]
    report = {
        "initial_val_loss": initial_val,
        "initial_val_perplexity": math.exp(initial_val),
        "final_val_loss": final_val,
        "final_val_perplexity": math.exp(final_val),
        "val_history": history,
        "train_texts": len(train_texts),
        "val_texts": len(val_texts),
        "texts_cut": cut_tr + cut_va,
        "seconds": time.perf_counter() - start,
    }
    return policy, report


def summary_writer(log_dir: str | os.PathLike[str] | None) -> contextlib.AbstractContextManager[Any]:
    """A TensorBoard ``SummaryWriter`` on ``log_dir``, closed on leaving the ``with``; ``None`` when
    ``log_dir`` is ``None``."""
    if log_dir is None:
        return contextlib.nullcontext()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    minibatch_loss: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[int], dict[str, float]],
    *,
    n_train: int,
    steps: int,
    batch_size: int,
    eval_interval: int,
    max_grad_norm: float,
    lr_at: Callable[[int], float],
    seed: int,
    writer: Any = None,
    prefix: str,
    progress_bar: bool = False,
) -> list[tuple[int, dict[str, float]]]:
    """The minibatch loop of pretraining, which reward-model training shares.

    Each of ``steps`` steps sets the learning rate to ``lr_at(step)``, draws ``batch_size`` of the
    ``n_train`` training rows uniformly with replacement (from a CPU generator seeded with
    ``seed``), and takes one optimizer step on ``minibatch_loss(rows)`` with the gradient norm
    clipped to ``max_grad_norm``. ``evaluate(step)`` returns held-out metrics by name (it must leave
    the model in training mode); it runs before the first step, every ``eval_interval`` steps and
    after the last.

    TensorBoard, when ``writer`` is a ``SummaryWriter``: ``<prefix>/train_loss`` (that step's
    minibatch) and ``<prefix>/learning_rate`` every 10 steps, and each metric of every evaluation
    as ``<prefix>/<name>``.

    :return: ``(step, metrics)`` of every evaluation, step 0 first; the model is left in eval mode.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    history: list[tuple[int, dict[str, float]]] = []

    def record(step: int) -> dict[str, float]:
        metrics = evaluate(step)
        history.append((step, metrics))
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(f"{prefix}/{name}", value, step)
        return metrics

    record(0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    with tqdm(total=steps, unit="step", dynamic_ncols=True, disable=not progress_bar) as bar:
        for step in range(steps):
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = torch.randint(0, n_train, (batch_size,), generator=gen).to(device)
            loss = minibatch_loss(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            done = step + 1
            if writer is not None and (done % 10 == 0 or done == steps):
                writer.add_scalar(f"{prefix}/train_loss", loss.item(), done)
                writer.add_scalar(f"{prefix}/learning_rate", lr, done)
            if done % eval_interval == 0 or done == steps:
                bar.set_postfix({name: f"{value:.3g}" for name, value in record(done).items()})
            bar.update(1)
    model.eval()
    return history


def _samples_markdown(policy: TransformerPolicy, tokenizer: Tokenizer, prompts: Sequence[str]) -> str:
    from agents.generation import generate

    window = max(1 + len(tokenizer.encode(p)) for p in prompts)
    new = min(16, policy.max_len - window)
    if new < 1:
        return "(prompts too long for samples)"
    completions = generate(policy, tokenizer, prompts, window, new)
    rows = [f"| {p} | {c} |" for p, c in zip(prompts, completions, strict=True)]
    return "| prompt | greedy continuation |\n|---|---|\n" + "\n".join(rows)


def save_lm(
    path: str | os.PathLike[str],
    policy: TransformerPolicy,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a language-model checkpoint atomically (weights, architecture, vocabulary, ``meta``)."""
    ckpt = {
        "schema": LM_SCHEMA,
        "policy_config": asdict(policy.cfg),
        "vocab_size": policy.vocab_size,
        "max_len": policy.max_len,
        "vocabulary": vocabulary(tokenizer),
        "state_dict": {k: v.detach().cpu() for k, v in policy.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_torch(path, ckpt)


def load_lm(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer | None = None,
    max_len: int | None = None,
    device: str | torch.device = "cpu",
) -> TransformerPolicy:
    """A :class:`TransformerPolicy` from a checkpoint of :func:`save_lm`.

    :param tokenizer: when given, its vocabulary must be the checkpoint's (same token at every id).
    :param max_len: the sequence length the policy will read (the env's observation length); the
        learned position table is cut to it, and must be at least that long.
    """
    ckpt = read_lm_checkpoint(path)
    if tokenizer is not None:
        check_vocabulary(ckpt["vocabulary"], tokenizer, str(path))
    saved_len = int(ckpt["max_len"])
    max_len = saved_len if max_len is None else max_len
    if max_len > saved_len:
        raise ValueError(
            f"{str(path)!r} was trained on sequences of at most {saved_len} tokens, but this environment's "
            f"observations are {max_len} long: pretrain with a larger max_len"
        )
    cfg = PolicyConfig(**ckpt["policy_config"])
    policy = TransformerPolicy(int(ckpt["vocab_size"]), max_len, cfg)
    state = dict(ckpt["state_dict"])
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][:max_len]
    policy.load_state_dict(state)
    return policy.to(device).eval()


def read_lm_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return load_torch_checkpoint(path, LM_SCHEMA, "language-model")


@torch.no_grad()
def sample_with_kl(
    policy: TransformerPolicy,
    reference: TransformerPolicy,
    env_kwargs: dict[str, Any],
    episodes: int = 256,
    num_envs: int = 64,
    seed: int = 10_000,
    samples: int = 8,
    cache: bool = False,
) -> dict[str, Any]:
    """Sample ``episodes`` completions from ``policy`` (temperature 1) on TextGen-v0 and measure
    the mean episode reward and the KL to ``reference``: per episode, the sum over its steps of
    KL(π(·|s) ‖ π_ref(·|s)), computed exactly from both next-token distributions. The first
    ``samples`` episodes to end are returned as (prompt, completion, reward).

    ``cache=True`` acts through both models' KV caches (``make_cache``), one token per step, instead
    of recomputing the whole sequence at every step: the same episodes (same env seed, same sampling
    generator) and statistics to float rounding, for far less work on a real model (SmolLM2's
    49k-token head alone scores every column when recomputing). ``reference`` may be ``policy``
    itself: its KL is then 0, and it is computed once."""
    from agents.policy import last_real_column
    from textgym.vector import TextGenVectorEnv

    dev = next(policy.parameters()).device
    env = TextGenVectorEnv(num_envs, device=dev, autoreset_mode="same_step", array_type="torch", **env_kwargs)
    models = [policy] if reference is policy else [policy, reference]
    P, rows = env.prompt_window, torch.arange(num_envs, device=dev)
    caches = [m.make_cache(num_envs, dev) for m in models] if cache else []

    def next_token_logits(obs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(N, V) of each model at every row's newest token."""
        ids, mask = obs["input_ids"], obs["attention_mask"]
        if cache:
            return [c.step(ids, mask, P)[0] for c in caches]
        col = last_real_column(mask)
        return [m(ids, mask)[0][rows, col] for m in models]

    gen = torch.Generator(device=dev).manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    ret = torch.zeros(num_envs, dtype=torch.float64, device=dev)
    kl = torch.zeros(num_envs, dtype=torch.float64, device=dev)
    per_env = -(-episodes // num_envs)
    counts = np.zeros(num_envs, dtype=int)
    returns: list[float] = []
    kls: list[float] = []
    shown: list[tuple[str, str, float]] = []
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    while counts.min() < per_env:
        logits = next_token_logits(obs)
        logp = F.log_softmax(logits[0].float(), -1)  # (N, V)
        if len(logits) > 1:
            logq = F.log_softmax(logits[1].float(), -1)
            kl += (logp.exp() * (logp - logq)).sum(-1).double()
        action = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        obs, reward, terminated, truncated, infos = env.step(action)
        ret += reward.double()
        for i in (terminated | truncated).nonzero().squeeze(1).tolist():
            if counts[i] < per_env:
                returns.append(float(ret[i]))
                kls.append(float(kl[i]))
                counts[i] += 1
                if (
                    len(shown) < samples and "completion" in infos["final_info"]
                ):  # absent with text_infos=False
                    final = infos["final_info"]
                    shown.append((final["prompt"][i], final["completion"][i], float(ret[i])))
            ret[i], kl[i] = 0.0, 0.0
    env.close()
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return {
        "reward_mean": float(np.mean(returns)),
        "reward_std": float(np.std(returns)),
        "kl_mean": float(np.mean(kls)),
        "episodes": len(returns),
        "samples": shown,
    }
