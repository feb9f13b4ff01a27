"""Learned reward models as the environment loads them: the network, its checkpoint, its scoring.

A learned reward model is :class:`RewardNet`, a :class:`~textgym.nn.TransformerDecoder` with a
linear head on the last real token of ``<bos> prompt completion <eos>`` (:func:`encode_pairs`).
:class:`LearnedReward` reads its checkpoint (:func:`read_reward_checkpoint`) and scores batches of
completions as a :class:`~textgym.rewards.RewardModel`, so the environment takes it by path or
by name::

    gym.make("TextGen-v0", reward="runs/reward_sentiment_s0_<time>/reward.pt")
    gym.make("TextGen-v0", reward={"name": "learned", "path": "reward.pt", "device": "cpu"})

Training and writing checkpoints is the agents' side (``agents.reward_model``,
``scripts/train_reward.py``); everything the environment needs to use one is here, so textgym
stands alone.

A checkpoint is a dict, loaded with ``weights_only=True``::

    {"schema": "textgym-reward/1", "policy_config": {<PolicyConfig fields>}, "vocab_size": int,
     "max_len": int, "tokenizer_spec": {"task": str, "tokenizer": str | None},
     "vocabulary": [str, ...], "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from textgym.core import resolve_device
from textgym.io import load_torch_checkpoint
from textgym.nn import PolicyConfig, TransformerDecoder
from textgym.rewards import RewardModel
from textgym.tasks import make_env_config
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


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Every token's spelling, by id: what must agree for a checkpoint to fit an environment."""
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def check_vocabulary(saved: Sequence[str], tokenizer: Tokenizer, where: str) -> None:
    """Raise ValueError unless ``tokenizer`` spells every id as ``saved`` (a checkpoint's
    :func:`vocabulary`) does."""
    current = vocabulary(tokenizer)
    if list(saved) != current:
        if len(saved) != len(current):
            detail = f"{len(saved)} tokens in the checkpoint, {len(current)} in the environment"
        else:
            i = next(i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
            detail = f"id {i} is {saved[i]!r} in the checkpoint but {current[i]!r} in the environment"
        raise ValueError(
            f"{where}: the checkpoint's vocabulary differs from the environment's tokenizer ({detail}); "
            "train it with the same task and tokenizer as the environment"
        )


def read_reward_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict of a reward-model checkpoint (the module docstring's layout), on the CPU."""
    return load_torch_checkpoint(path, REWARD_SCHEMA, "reward-model")


class LearnedReward(RewardModel):
    """A reward-model checkpoint as a batched reward model.

    :param path: the checkpoint (``agents.reward_model.save_reward_model`` writes them).
    :param device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).
    :param batch_size: completions scored per forward pass.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", batch_size: int = 256):
        path = Path(path)
        ckpt = read_reward_checkpoint(path)
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
