"""Text generation with a trained policy: greedy, sampling (temperature, top-k, top-p), beam search.

Prompts are laid out exactly as TextGen-v0 lays them out (``<bos>`` + prompt, left-padded into the
prompt window), so the policy sees what it saw in training. Every strategy decodes through the
policy's KV cache (``policy.make_cache``): one pass over the prompts, then one token per row and
step. Beam search keeps one cache row per beam and, each step, reorders the rows by the beam each
survivor extends (:meth:`agents.policy.RowCache.reorder`); it gives the beams of rescoring whole
sequences every step (tested against that, through :class:`agents.policy.RecomputeCache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agents.policy import Lengths, TransformerPolicy, sample_tokens
from textgym.checks import is_positive_int
from textgym.tokenizers import Tokenizer

STRATEGIES = ("greedy", "sample", "beam")


def encode_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    prompt_window: int,
    max_new_tokens: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Observation-shaped ``(input_ids, attention_mask)`` (B, P + M) for ``prompts``."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    P, L = prompt_window, prompt_window + max_new_tokens
    ids = torch.full((len(prompts), L), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        tokens = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        if len(tokens) > P:
            raise ValueError(
                f"prompt {i} ({prompt[:60]!r}) is {len(tokens)} tokens with <bos>; the policy's prompt window is {P}"
            )
        ids[i, P - len(tokens) : P] = torch.tensor(tokens)
        mask[i, P - len(tokens) : P] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    policy: TransformerPolicy,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    prompt_window: int,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    seed: int | None = None,
    min_new_tokens: int = 0,
) -> list[str]:
    """Complete each prompt with up to ``max_new_tokens`` tokens, stopping at ``<eos>``.

    :param strategy: ``"greedy"``, ``"sample"`` or ``"beam"``.
    :param temperature: divides the logits before sampling (``"sample"`` only).
    :param top_k: sample among the k most likely tokens only.
    :param top_p: sample from the smallest set of tokens holding this much probability.
    :param num_beams: beams kept per prompt (``"beam"``), ranked by total log-probability.
    :param seed: seeds a private generator for ``"sample"``; the global RNG is left alone.
    :param min_new_tokens: ``<eos>`` cannot end a completion before this many tokens (as
        transformers' ``min_new_tokens``); ``max_new_tokens`` makes every completion that long.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and not is_positive_int(top_k):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not (isinstance(min_new_tokens, int) and not isinstance(min_new_tokens, bool) and min_new_tokens >= 0):
        raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
    if max_new_tokens + prompt_window > policy.max_len:
        raise ValueError(
            f"prompt window + max_new_tokens = {prompt_window + max_new_tokens} exceeds the policy's {policy.max_len}"
        )
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    try:
        ids, mask = encode_prompts(tokenizer, prompts, prompt_window, max_new_tokens, device)
        if strategy == "beam":
            tokens = _beam_search(
                policy, ids, mask, prompt_window, max_new_tokens, tokenizer.eos_id, num_beams, min_new_tokens
            )
        else:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(seed)
            tokens = _decode(
                policy,
                ids,
                mask,
                prompt_window,
                max_new_tokens,
                tokenizer.eos_id,
                strategy,
                temperature,
                top_k,
                top_p,
                generator,
                min_new_tokens,
            )
    finally:
        policy.train(was_training)
    return [tokenizer.decode(row) for row in tokens]


def _decode(
    policy: TransformerPolicy,
    ids: torch.Tensor,
    mask: torch.Tensor,
    P: int,
    M: int,
    eos: int,
    strategy: str,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    B = ids.shape[0]
    cache = policy.make_cache(B, ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    prompt_length = mask[:, :P].sum(1).cpu().numpy()  # (B,)
    logits, _ = cache.step(ids, mask, P, Lengths(np.zeros(B, dtype=np.int64), prompt_length))
    steps = M
    for t in range(M):
        if t < min_new_tokens:
            logits[:, eos] = float("-inf")
        if strategy == "greedy":
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = sample_tokens(probs, generator)
        # Rows that ended keep decoding until all have (their tokens are cut below): the tokens
        # stay on the device, with one host sync per step, for the stopping test.
        ids[:, P + t], mask[:, P + t] = token, 1
        finished |= token == eos
        if t == M - 1 or bool(finished.all()):
            steps = t + 1
            break
        # Every row has t + 1 tokens: the step reads nothing from the device.
        logits, _ = cache.step(ids, mask, P, Lengths(np.full(B, t + 1), prompt_length))
    return [row[: row.index(eos)] if eos in row else row for row in ids[:, P : P + steps].tolist()]


class Beams(NamedTuple):
    """What beam search kept per prompt: every beam, best or not."""

    tokens: torch.Tensor  # (B, K, L) each beam's observation: prompt window, then its tokens
    mask: torch.Tensor  # (B, K, L)
    scores: torch.Tensor  # (B, K) total log-probability of each beam's tokens (its <eos> included)


def beam_search(
    policy: TransformerPolicy,
    ids: torch.Tensor,
    mask: torch.Tensor,
    P: int,
    M: int,
    eos: int,
    num_beams: int,
    min_new_tokens: int = 0,
) -> Beams:
    """Keep the ``num_beams`` highest-scoring continuations of each prompt row of ``ids`` (B, L);
    a beam that emits ``<eos>`` is finished and keeps its score. No beam ends before
    ``min_new_tokens`` tokens."""
    if not is_positive_int(num_beams):
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    B, L = ids.shape
    K = num_beams
    beams = ids.repeat_interleave(K, 0)  # (B*K, L)
    beam_mask = mask.repeat_interleave(K, 0)
    scores = torch.full((B, K), float("-inf"), device=ids.device)
    scores[:, 0] = 0.0  # all beams start equal: keep one so the first step does not pick duplicates
    done = torch.zeros(B, K, dtype=torch.bool, device=ids.device)
    first_row = torch.arange(B, device=ids.device).unsqueeze(1) * K  # (B, 1) each prompt's row 0
    cache = policy.make_cache(B * K, ids.device)
    logits, _ = cache.step(beams, beam_mask, P)  # prefills every beam's prompt
    for t in range(M):
        logp = F.log_softmax(logits.float(), -1)  # (B*K, V)
        if t < min_new_tokens:
            logp[:, eos] = float("-inf")
        V = logp.shape[-1]
        logp = logp.view(B, K, V)
        # A finished beam continues only as itself, at no cost, through a single placeholder token.
        frozen = torch.full_like(logp[0, 0], float("-inf"))
        frozen[eos] = 0.0
        logp = torch.where(done.unsqueeze(-1), frozen, logp)
        total = (scores.unsqueeze(-1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = total.topk(K, dim=-1)  # (B, K)
        parent, token = flat // V, flat % V
        pick = (parent + first_row).view(-1)  # (B*K,) the row each kept beam extends
        beams, beam_mask, done = beams[pick], beam_mask[pick], done.view(-1)[pick].view(B, K)
        cache.reorder(pick)
        was_done = done.clone()
        done = done | (token == eos)
        write = (~was_done).view(-1)
        beams[write, P + t] = token.view(-1)[write]
        beam_mask[write, P + t] = 1
        if bool(done.all()) or t == M - 1:
            break
        # Finished rows feed their last token again: recomputed the same, and ignored above.
        logits, _ = cache.step(beams, beam_mask, P)
    return Beams(beams.view(B, K, L), beam_mask.view(B, K, L), scores)


def _beam_search(
    policy: TransformerPolicy,
    ids: torch.Tensor,
    mask: torch.Tensor,
    P: int,
    M: int,
    eos: int,
    num_beams: int,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """The tokens of each prompt's best beam (finished or running), without ``<eos>``."""
    found = beam_search(policy, ids, mask, P, M, eos, num_beams, min_new_tokens)
    B = ids.shape[0]
    best = found.scores.argmax(-1)  # (B,)
    chosen = found.tokens[torch.arange(B), best]  # (B, L)
    lengths = found.mask[torch.arange(B), best][:, P:].sum(-1)
    out = []
    for row, n in zip(chosen[:, P:].tolist(), lengths.tolist(), strict=True):
        out.append([tok for tok in row[:n] if tok != eos])
    return out
