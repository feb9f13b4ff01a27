"""Learned reward models: a Transformer with a scalar head, trained from labels or preferences.

:func:`train_reward_model` fits :class:`RewardNet` (the policy's decoder, a linear head on the
last real token of ``<bos> prompt completion <eos>``) either

- to labelled examples ``(prompt, completion, score)``, by mean squared error, or
- to preference pairs ``(prompt, chosen, rejected)``, by the Bradley–Terry loss
  ``-log σ(r(chosen) - r(rejected))``,

and reports held-out accuracy: the share of held-out pairs it orders as the data do (for labels,
pairs of held-out examples with different scores). :func:`save_reward_model` writes a checkpoint
that :class:`textgym.learned.LearnedReward` loads as a batched :class:`textgym.RewardModel`, so
the environment takes it by path or by name::

    gym.make("TextGen-v0", reward="runs/reward_sentiment_s0_<time>/reward.pt")
    gym.make("TextGen-v0", reward={"name": "learned", "path": "reward.pt", "device": "cpu"})

The network, the input encoding and the checkpoint reader are in :mod:`textgym.learned`, so the
environment loads reward models without the agents; they are re-exported here.

:func:`textgym.preferences.reward_data` generates training data for the built-in tasks.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agents.lm import fit, summary_writer
from agents.policy import PolicyConfig
from textgym.checks import is_positive_int, is_real
from textgym.core import resolve_device
from textgym.io import save_torch
from textgym.learned import REWARD_SCHEMA, LearnedReward, RewardNet, encode_pairs, vocabulary
from textgym.tokenizers import Tokenizer

__all__ = [
    "REWARD_SCHEMA",
    "LearnedReward",
    "RewardNet",
    "RewardTrainConfig",
    "check_examples",
    "encode_pairs",
    "save_reward_model",
    "train_reward_model",
]


@dataclass(frozen=True)
class RewardTrainConfig:
    """Settings of :func:`train_reward_model`."""

    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    max_len: int = 64
    val_fraction: float = 0.1
    eval_interval: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "eval_interval"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(
                    f"RewardTrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        if not is_real(self.learning_rate) or not 0 < self.learning_rate < math.inf:
            raise ValueError(f"RewardTrainConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if not is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"RewardTrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_real(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise ValueError(f"RewardTrainConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")


def check_examples(examples: Sequence[dict[str, Any]]) -> str:
    """``"labels"`` or ``"pairs"``: which kind ``examples`` are, after checking every one."""
    if not examples:
        raise ValueError("no examples to train the reward model on")
    kinds = {"labels": {"prompt", "completion", "score"}, "pairs": {"prompt", "chosen", "rejected"}}
    first = examples[0]
    kind = next((k for k, keys in kinds.items() if isinstance(first, dict) and set(first) >= keys), None)
    if kind is None:
        raise ValueError(
            "each example must be {'prompt', 'completion', 'score'} (labels) or {'prompt', 'chosen', 'rejected'} "
            f"(preference pairs); example 0 is {first!r}"
        )
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not set(ex) >= kinds[kind]:
            raise ValueError(f"example {i} is not like example 0 ({kind}: {sorted(kinds[kind])}): {ex!r}")
        texts = [ex["prompt"], *(ex[k] for k in kinds[kind] if k in ("completion", "chosen", "rejected"))]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"example {i}: prompt and completions must be strings: {ex!r}")
        if kind == "labels" and (not is_real(ex["score"]) or not math.isfinite(ex["score"])):
            raise ValueError(f"example {i}: score must be a finite number, got {ex['score']!r}")
    return kind


def _pairwise_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of pairs with different labels that ``scores`` order the same way."""
    diff_l = labels[:, None] - labels[None, :]
    diff_s = scores[:, None] - scores[None, :]
    upper = np.triu(np.ones_like(diff_l, dtype=bool), 1) & (diff_l != 0)
    return float(((diff_l * diff_s) > 0)[upper].mean()) if upper.any() else float("nan")


def train_reward_model(
    examples: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    config: RewardTrainConfig | None = None,
    policy_config: PolicyConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    tensorboard_log: str | os.PathLike[str] | None = None,
    progress_bar: bool = False,
) -> tuple[RewardNet, dict[str, Any]]:
    """Fit a :class:`RewardNet` to labelled examples (MSE) or preference pairs (Bradley–Terry).

    :return: the model and a report: kind, held-out accuracy before and after training (pairs
        ordered correctly), held-out loss, example counts, seconds.
    """
    config = config or RewardTrainConfig()
    kind = check_examples(examples)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(2, round(config.val_fraction * len(examples)))
    if len(examples) - n_val < 2:
        raise ValueError(f"{len(examples)} examples are too few to hold {n_val} out and train on the rest")
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]

    def tensors(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt"] for r in rows]
        if kind == "labels":
            ids, mask = encode_pairs(tokenizer, prompts, [r["completion"] for r in rows], config.max_len)
            return {
                "ids": ids.to(dev),
                "mask": mask.to(dev),
                "y": torch.tensor([float(r["score"]) for r in rows], device=dev),
            }
        c_ids, c_mask = encode_pairs(tokenizer, prompts, [r["chosen"] for r in rows], config.max_len)
        r_ids, r_mask = encode_pairs(tokenizer, prompts, [r["rejected"] for r in rows], config.max_len)
        return {
            k: v.to(dev) for k, v in {"ids": c_ids, "mask": c_mask, "r_ids": r_ids, "r_mask": r_mask}.items()
        }

    tr, va = tensors(train), tensors(val)
    net = RewardNet(tokenizer.vocab_size, config.max_len, policy_config or PolicyConfig()).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if kind == "labels":
            return F.mse_loss(net(batch["ids"], batch["mask"]), batch["y"])
        margin = net(batch["ids"], batch["mask"]) - net(batch["r_ids"], batch["r_mask"])
        return -F.logsigmoid(margin).mean()

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        net.eval()
        loss = float(loss_of(va))
        if kind == "labels":
            acc = _pairwise_accuracy(net(va["ids"], va["mask"]).cpu().numpy(), va["y"].cpu().numpy())
        else:
            acc = float((net(va["ids"], va["mask"]) > net(va["r_ids"], va["r_mask"])).float().mean())
        net.train()
        return {"val_loss": loss, "val_accuracy": acc}

    start = time.perf_counter()
    with summary_writer(tensorboard_log) as writer:
        evaluations = fit(
            net,
            optimizer,
            lambda rows: loss_of({k: v[rows] for k, v in tr.items()}),
            evaluate,
            n_train=len(train),
            steps=config.steps,
            batch_size=min(config.batch_size, len(train)),
            eval_interval=config.eval_interval,
            max_grad_norm=1.0,
            lr_at=lambda step: config.learning_rate,
            seed=seed,
            writer=writer,
            prefix="reward_model",
            progress_bar=progress_bar,
        )
    history = [(step, metrics["val_loss"], metrics["val_accuracy"]) for step, metrics in evaluations]
    return net, {
        "kind": kind,
        "initial_val_accuracy": history[0][2],
        "final_val_accuracy": history[-1][2],
        "initial_val_loss": history[0][1],
        "final_val_loss": history[-1][1],
        "history": history,
        "train_examples": len(train),
        "val_examples": len(val),
        "seconds": time.perf_counter() - start,
    }


def save_reward_model(
    path: str | os.PathLike[str],
    net: RewardNet,
    tokenizer_spec: dict[str, Any],
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a reward-model checkpoint atomically (the layout of :mod:`textgym.learned`).

    :param tokenizer_spec: how :class:`~textgym.learned.LearnedReward` rebuilds the tokenizer:
        ``{"task": <task>, "tokenizer": <kind or None>}`` (the task's env tokenizer).
    """
    ckpt = {
        "schema": REWARD_SCHEMA,
        "policy_config": asdict(net.decoder.cfg),
        "vocab_size": net.decoder.vocab_size,
        "max_len": net.decoder.max_len,
        "tokenizer_spec": dict(tokenizer_spec),
        "vocabulary": vocabulary(tokenizer),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_torch(path, ckpt)
