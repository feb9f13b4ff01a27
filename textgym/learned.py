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

import torch
from torch import nn

from textgym.core import resolve_device
from textgym.io import load_torch_checkpoint
from textgym.nn import PolicyConfig, TransformerDecoder
from textgym.rewards import TokenRewardModel
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


def pair_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_pairs` of episodes held as ids, as tensor operations on their device.

    ``encode_pairs`` keeps ``<bos>`` and then the last ``max_len - 1`` tokens of
    ``prompt completion <eos>``; this gathers the real tokens of each row in that order (the
    prompt's first real token is its ``<bos>``) and scatters them to the same columns.

    :param prompt_ids: (k, P) left-padded prompts starting with ``<bos>``; ``prompt_mask`` (k, P).
    :param completion_ids: (k, M) completions from column 0; ``completion_mask`` (k, M), ``<eos>``
        excluded.
    :returns: ids and mask, (k, max_len) each, right-padded with ``<pad>``.
    """
    k = prompt_ids.shape[0]
    device = completion_ids.device
    eos = torch.full((k, 1), EOS_ID, dtype=torch.long, device=device)
    body = torch.cat([prompt_ids, completion_ids, eos], dim=1)  # (k, P + M + 1)
    real = torch.cat([prompt_mask, completion_mask, torch.ones_like(eos)], dim=1).bool()  # (k, P + M + 1)
    first = real.long().argmax(1)  # (k,) the column of each prompt's <bos>
    real[torch.arange(k, device=device), first] = False  # <bos> is placed by hand, at column 0
    # Rank of each real token counted from the row's end (0 for the <eos>): the last
    # max_len - 1 of them are kept, at columns 1 .. kept.
    from_end = real.flip(1).long().cumsum(1).flip(1) - 1  # (k, P + M + 1)
    kept = real.sum(1, keepdim=True).clamp(max=max_len - 1)  # (k, 1)
    keep = real & (from_end < kept)
    column = torch.where(keep, kept - from_end, max_len)  # max_len: a spare column for the rest
    ids = torch.full((k, max_len + 1), PAD_ID, dtype=torch.long, device=device)  # (k, max_len + 1)
    ids.scatter_(1, column, torch.where(keep, body, PAD_ID))
    ids = ids[:, :max_len]  # (k, max_len)
    ids[:, 0] = BOS_ID
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


class LearnedReward(TokenRewardModel):
    """A reward-model checkpoint as a batched reward model of token ids.

    It reads the ids of the tokenizer it was trained with, which it rebuilds from the checkpoint.
    An environment whose tokenizer has that vocabulary (:meth:`reads`) hands it the ids of the
    finished episodes on the env's device, with no text decoded or encoded; another environment
    gives it text, which it encodes with its own tokenizer (:meth:`score`). Either way a
    completion is scored as :func:`encode_pairs` lays it out for training: ``<bos>``, the prompt,
    the completion and ``<eos>`` (also after a completion cut off at ``max_new_tokens``), cut to
    the network's ``max_len`` from the left of the prompt, then of the completion.

    :param path: the checkpoint (``agents.reward_model.save_reward_model`` writes them).
    :param device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).
    :param batch_size: completions scored per forward pass.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", batch_size: int = 256):
        path = Path(path)
        ckpt = read_reward_checkpoint(path)
        spec = ckpt["tokenizer_spec"]
        kwargs = {"tokenizer": spec["tokenizer"]} if spec.get("tokenizer") else {}
        super().__init__(make_env_config(spec["task"], **kwargs).tokenizer)
        self.saved_vocabulary = list(ckpt["vocabulary"])  # the ids it reads
        check_vocabulary(self.saved_vocabulary, self.tokenizer, str(path))
        self.device = resolve_device(device)
        self.net = RewardNet(ckpt["vocab_size"], ckpt["max_len"], PolicyConfig(**ckpt["policy_config"]))
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.to(self.device).eval()
        self.path, self.batch_size, self.meta = str(path), batch_size, ckpt["meta"]
        self.name = f"learned({path.name})"

    def reads(self, tokenizer: Tokenizer) -> bool:
        return tokenizer is self.tokenizer or vocabulary(tokenizer) == self.saved_vocabulary

    def bind(self, tokenizer: Tokenizer) -> None:
        """Nothing to bind: the model keeps the checkpoint's tokenizer, and an environment with
        another vocabulary gives it text to encode with it."""

    @torch.no_grad()
    def score_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        ids, mask = pair_rows(
            prompt_ids, prompt_mask, completion_ids, completion_mask, self.net.decoder.max_len
        )
        out = [
            self.net(
                ids[i : i + self.batch_size].to(self.device), mask[i : i + self.batch_size].to(self.device)
            )
            for i in range(0, ids.shape[0], self.batch_size)
        ]
        scores = torch.cat(out) if out else torch.zeros(0, device=self.device)
        return scores.float().to(completion_ids.device)

    def __repr__(self) -> str:
        return f"LearnedReward({self.path!r})"
