"""Learned reward models: a Transformer with a scalar head, trained from labels or preferences.

:func:`train_reward_model` fits :class:`RewardNet` (the policy's decoder, a linear head on the
last real token of ``<bos> prompt completion <eos>``) either

- to labelled examples ``(prompt, completion, score)``, by mean squared error, or
- to preference pairs ``(prompt, chosen, rejected)``, by the Bradley–Terry loss
  ``-log σ(r(chosen) - r(rejected))``,

and reports held-out accuracy: the share of held-out pairs it orders as the data do (for labels,
pairs of held-out examples with different scores). :func:`save_reward_model` writes a checkpoint
that :class:`LearnedReward` loads as a batched :class:`textgym.RewardModel`, so the environment
takes it by path or by name::

    gym.make("TextGen-v0", reward="runs/reward_sentiment_s0_<time>/reward.pt")
    gym.make("TextGen-v0", reward={"name": "learned", "path": "reward.pt", "device": "cpu"})

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
from torch import nn

from agents.lm import check_vocabulary, vocabulary
from agents.policy import PolicyConfig, TransformerDecoder
from textgym.checks import is_positive_int, is_real
from textgym.core import resolve_device
from textgym.io import load_torch_checkpoint, save_torch
from textgym.rewards import RewardModel
from textgym.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer

REWARD_SCHEMA = "textgym-reward/1"


class RewardNet(nn.Module):
    """The policy's decoder with a scalar head on the last real token."""

    def __init__(self, vocab_size: int, max_len: int, cfg: PolicyConfig | None = None):
        super().__init__()
        cfg = cfg or PolicyConfig()
        self.decoder = TransformerDecoder(vocab_size, max_len, cfg)
        self.decoder.reset_parameters()
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of right- or left-padded sequences (B, L)."""
        return self.head(self.decoder.last_hidden(input_ids, attention_mask)).squeeze(-1)


def encode_pairs(
    tokenizer: Tokenizer, prompts: Sequence[str], completions: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> prompt completion <eos>`` rows, right-padded to ``max_len``; the prompt is cut
    from the left when the whole does not fit, so the completion and ``<eos>`` always do."""
    ids = torch.full((len(prompts), max_len), PAD_ID, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        tail = [*tokenizer.encode(completion), EOS_ID][-(max_len - 1) :]
        head = [BOS_ID, *tokenizer.encode(prompt)]
        row = [BOS_ID, *head[1:][max(0, len(head) + len(tail) - max_len) :], *tail]
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != PAD_ID).long()


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
    def evaluate() -> tuple[float, float]:
        net.eval()
        loss = float(loss_of(va))
        if kind == "labels":
            acc = _pairwise_accuracy(net(va["ids"], va["mask"]).cpu().numpy(), va["y"].cpu().numpy())
        else:
            acc = float((net(va["ids"], va["mask"]) > net(va["r_ids"], va["r_mask"])).float().mean())
        net.train()
        return loss, acc

    writer = None
    if tensorboard_log is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_log))
    initial_loss, initial_acc = evaluate()
    history = [(0, initial_loss, initial_acc)]
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    n_train = len(train)
    try:
        for step in range(config.steps):
            idx = torch.randint(0, n_train, (min(config.batch_size, n_train),), generator=gen).to(dev)
            loss = loss_of({k: v[idx] for k, v in tr.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            done = step + 1
            if writer is not None and (done % 10 == 0 or done == config.steps):
                writer.add_scalar("reward_model/train_loss", loss.item(), done)
            if done % config.eval_interval == 0 or done == config.steps:
                val_loss, val_acc = evaluate()
                history.append((done, val_loss, val_acc))
                if writer is not None:
                    writer.add_scalar("reward_model/val_loss", val_loss, done)
                    writer.add_scalar("reward_model/val_accuracy", val_acc, done)
                if bar is not None:
                    bar.set_postfix(val_acc=f"{val_acc:.3f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    net.eval()
    return net, {
        "kind": kind,
        "initial_val_accuracy": initial_acc,
        "final_val_accuracy": history[-1][2],
        "initial_val_loss": initial_loss,
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
    """Write a reward-model checkpoint atomically.

    :param tokenizer_spec: how :class:`LearnedReward` rebuilds the tokenizer:
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


class LearnedReward(RewardModel):
    """A checkpoint of :func:`save_reward_model` as a batched reward model.

    :param path: the checkpoint.
    :param device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).
    :param batch_size: completions scored per forward pass.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", batch_size: int = 256):
        from textgym.tasks import make_env_config

        path = Path(path)
        ckpt = load_torch_checkpoint(path, REWARD_SCHEMA, "reward-model")
        spec = ckpt["tokenizer_spec"]
        kwargs = {"tokenizer": spec["tokenizer"]} if spec.get("tokenizer") else {}
        self.tokenizer = make_env_config(spec["task"], **kwargs).tokenizer
        check_vocabulary(ckpt["vocabulary"], self.tokenizer, str(path))
        self.device = resolve_device(device)
        self.net = RewardNet(ckpt["vocab_size"], ckpt["max_len"], PolicyConfig(**ckpt["policy_config"]))
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.to(self.device).eval()
        self.path, self.batch_size, self.meta = str(path), batch_size, ckpt["meta"]
        self.name = f"learned({path.name})"

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = encode_pairs(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                completions[start : start + self.batch_size],
                self.net.decoder.max_len,
            )
            out.append(self.net(ids.to(self.device), mask.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def __repr__(self) -> str:
        return f"LearnedReward({self.path!r})"
