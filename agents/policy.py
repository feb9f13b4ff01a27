"""A decoder-only Transformer policy with a value head, and the key/value cache that lets it act.

The policy reads TextGen-v0 observations directly: ``input_ids`` and ``attention_mask`` of shape
``(B, L)``, prompts left-padded into the first ``P`` columns, generated tokens from column ``P``.
Its trunk, :class:`~textgym.nn.TransformerDecoder` (re-exported here with :class:`PolicyConfig`),
is in the environment package, which loads learned reward models built on it: positions count
real tokens only (``cumsum(mask) - 1``), so a prompt means the same thing whatever its padding,
and attention is causal and never looks at padding.

Acting with a cache (:class:`KVCache`): the environment's transition only appends the agent's
own token, so the keys and values of every earlier token stay valid. The cache has one slot per
observation column, per env; a new episode's row is filled by one forward pass over its prompt
window but the last column (prefill), and every step feeds each row's newest token, the prompt's
last for a new episode, in one batch (decode). The logits equal
those of a full forward pass over the observation (tested against recompute). Beam search keeps
the rows of the beams it extends with :meth:`RowCache.reorder` instead of recomputing them.

:func:`build_policy` makes the policy that ``PolicyConfig.architecture`` names: this decoder-only
one or the encoder-decoder :class:`agents.seq2seq.Seq2SeqPolicy`; :func:`count_parameters` counts
either's weights.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from textgym.core import to_device
from textgym.nn import (
    Block,
    PolicyConfig,
    TransformerDecoder,
    causal_padding_mask,
    last_real_column,
    real_positions,
    sinusoidal_encoding,
)
from textgym.vector import HostView

# The trunk's names stay importable from here, where they were first defined.
__all__ = [
    "Block",
    "KVCache",
    "Lengths",
    "PolicyConfig",
    "RecomputeCache",
    "RowCache",
    "TransformerDecoder",
    "TransformerPolicy",
    "build_policy",
    "count_parameters",
    "distinct_rows",
    "hidden_from",
    "last_real_column",
    "real_positions",
    "sinusoidal_encoding",
]


class TransformerPolicy(TransformerDecoder):
    """The decoder with a policy head (next-token logits) and a value head on every position.

    :param vocab_size: number of token ids (the env's ``Discrete`` action space).
    :param max_len: longest sequence (observation length ``P + M``).
    :param cfg: the architecture (default: ``PolicyConfig()``).
    """

    def __init__(self, vocab_size: int, max_len: int, cfg: PolicyConfig | None = None):
        cfg = cfg or PolicyConfig()
        super().__init__(vocab_size, max_len, cfg)
        self.policy_head = nn.Linear(cfg.d_model, vocab_size)
        self.value_head = nn.Linear(cfg.d_model, 1)
        self.reset_parameters()
        # Small policy logits start the agent near uniform; a small value head near zero.
        nn.init.normal_(self.policy_head.weight, std=0.01 / math.sqrt(cfg.d_model))
        nn.init.zeros_(self.value_head.weight)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) at every column of ``input_ids`` (B, T).

        Column ``j`` gives the next-token distribution and the value of the state whose last
        token is in column ``j``. Padding columns give finite but meaningless outputs.
        """
        return self.heads(self.hidden(input_ids, attention_mask))

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (..., V) and values (...) from final hidden states (..., C); in float32 under
        :attr:`autocast` (whose products give bfloat16), so that sampling and the losses read
        the same precision either way."""
        if not self.autocast:
            return self.policy_head(hidden), self.value_head(hidden).squeeze(-1)
        with self.precision():
            logits, values = self.policy_head(hidden), self.value_head(hidden).squeeze(-1)
        return logits.float(), values.float()

    def make_cache(self, num_envs: int, device: torch.device | str, compile: bool = False) -> KVCache:
        """The :class:`KVCache` that acting runs through (every policy class has its own);
        ``compile``: its decoding step through ``torch.compile`` (see :class:`KVCache`)."""
        return KVCache(self, num_envs, device, compile=compile)


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` (N, V), each drawn with its row's probabilities (which need
    not be normalised), by inverting the cumulative distribution at one uniform draw per row.

    ``torch.multinomial`` draws V random numbers per row on the CPU: 8 ms for 8 rows of SmolLM2's
    49,152 tokens, a tenth of a decoding step, where this takes 0.4 ms (one thread); 10x faster
    for 64 rows of 131 tokens too. The running sum is in float64, so that the draw always falls
    strictly below the row's total, and ``right=True`` skips tokens of probability 0 (masked ones
    included): a token is picked only where the running sum rises. Returns (N,) int64.
    """
    cdf = probs.to(torch.float64).cumsum(-1)  # (N, V)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)


def distinct_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of ``input_ids``/``attention_mask`` (N, T) that hold the same real tokens in the same
    columns give a causal model the same keys, values and outputs: ``(first, inverse)``, where
    ``first`` (u,) is each distinct row's first occurrence and ``inverse`` (N,) maps every row to
    its entry in ``first``; None when every row is distinct (or there is one row).

    A group-relative rollout starts the ``G`` rows of each group on one prompt, so a rebuild at
    its start computes each prompt once, not ``G`` times: with SmolLM2-135M, 2 prompts × 8 rows,
    the rebuild falls from 0.72 s to 0.18 s of a 7.9 s GRPO step (one CPU thread). Padding
    columns compare equal whatever they hold."""
    N = input_ids.shape[0]
    if N < 2:
        return None
    key = torch.where(attention_mask.bool(), input_ids, -1)  # (N, T); token ids are >= 0
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)  # (u, T), (N,)
    if len(unique) == N:
        return None
    rows = torch.arange(N, device=input_ids.device)
    first = torch.full((len(unique),), N, device=rows.device).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


def hidden_from(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``model``'s final hidden states (B, T - start, C) of columns ``[start, T)`` of a whole
    pass over ``input_ids``/``attention_mask`` (B, T): what an update reads when only those
    columns score actions. The built-in decoder runs its last block on those columns alone
    (:meth:`~textgym.nn.TransformerDecoder.hidden`; in a 2-block policy on the default task about
    a fifth of an update's arithmetic is the prompt columns' last block); other models (the
    encoder-decoder policy, Hugging Face ones) compute every column and the others are cut.

    ``shared``: ``(first, inverse)`` where rows hold the same first ``start + 1`` columns (the
    prompts of a group, :func:`distinct_rows`): a model with ``hidden_shared_prefix`` (each policy
    here: the built-in decoder, the encoder-decoder, whose encoder reads the prompt window, and
    the Hugging Face policy) runs those columns once per distinct row."""
    if shared is not None and hasattr(model, "hidden_shared_prefix"):
        hidden = model.hidden_shared_prefix(input_ids, attention_mask, start + 1, shared)
        if hidden is not None:
            return hidden
    if isinstance(model, TransformerDecoder):
        return model.hidden(input_ids, attention_mask, start=start)
    return model.hidden(input_ids, attention_mask)[:, start:]


def build_policy(
    vocab_size: int, max_len: int, prompt_window: int, cfg: PolicyConfig | None = None
) -> nn.Module:
    """The built-in policy that ``cfg.architecture`` names, with fresh weights: the decoder-only
    :class:`TransformerPolicy` or the encoder-decoder :class:`agents.seq2seq.Seq2SeqPolicy` (which
    needs the env's ``prompt_window``: its encoder reads those columns)."""
    cfg = cfg or PolicyConfig()
    if cfg.architecture == "seq2seq":
        from agents.seq2seq import Seq2SeqPolicy

        return Seq2SeqPolicy(vocab_size, max_len, prompt_window, cfg)
    return TransformerPolicy(vocab_size, max_len, cfg)


def count_parameters(vocab_size: int, max_len: int, prompt_window: int, cfg: PolicyConfig) -> int:
    """Weights of the policy :func:`build_policy` makes for an env of ``vocab_size`` tokens,
    observations of ``max_len`` columns and a prompt window of ``prompt_window``, counted without
    allocating them (on torch's meta device). :func:`agents.seq2seq.seq2seq_config_like` sizes an
    encoder-decoder policy with it."""
    with torch.device("meta"):
        policy = build_policy(vocab_size, max_len, prompt_window, cfg)
    return sum(p.numel() for p in policy.parameters())


class Lengths(NamedTuple):
    """What a cache's step needs to know of its rows from the host (the fields of the same names
    of :class:`textgym.vector.HostView`), for acting without an env."""

    generated: np.ndarray  #: (N,) int64: tokens generated in each row so far
    prompt_length: np.ndarray  #: (N,) int64: each row's prompt tokens (``<bos>`` included)


class RowCache:
    """Acting through a cache of per-env rows: the step that every cache class shares.

    A step first fills the slots of the rows that start an episode over their prompt window but
    its last column (``_prefill``: keys and values only, no outputs), then feeds every row's newest
    token, the prompt's last one for those rows, in one batch (``_decode``), which gives the
    next-token logits (N, V) and values (N,) of all rows. One pass over all rows, not one for new
    rows and one for the others: no gather of the running rows' cached slots and no scatter of two
    sets of outputs, at the price of one prompt token fed apart from the rest of its prompt.

    Rows that start on the same prompt in one step (the env's ``host_view.prompt_index`` says
    which) are prefilled once and the others get a copy of its slots (:meth:`_copy_slots`).
    """

    policy: nn.Module
    keys: list[torch.Tensor]  #: per layer (N, heads, slots, head size)
    values: list[torch.Tensor]  #: per layer, as ``keys``

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_window: int,
        host: HostView | Lengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (N, V) and values (N,) for the current observations (N, L).

        Rows with no generated token yet are prefilled over the prompt window; every other row
        feeds only its newest token, which must be the one appended since the previous call.
        The outputs have the dtype the policy's heads give (float32 logits for a bfloat16
        Hugging Face model, the weights' dtype for the built-in policy).

        ``host``: the env's :attr:`~textgym.vector.TextGenVectorEnv.host_view` of these
        observations, or any :class:`Lengths` of them. With it the step reads nothing from the
        device (which rows start, and how far the furthest has got, come from the host); without
        it, it reads them (on a GPU, a wait for the device).
        """
        P = prompt_window
        generated = attention_mask[:, P:].sum(1)  # (N,) tokens generated so far
        col = P - 1 + generated  # (N,) the newest token's column (the prompt's last for new rows)
        if host is None:
            if P > 1:
                # A prompt of <bos> alone has nothing before its last column: nothing to prefill.
                starting = (generated == 0) & attention_mask[:, : P - 1].bool().any(1)
                new = starting.nonzero().squeeze(1)
                if new.numel():
                    self._prefill(new, input_ids, attention_mask, P - 1)
            return self._decode(col, input_ids, attention_mask)
        starting = np.flatnonzero((host.generated == 0) & (host.prompt_length > 1))
        if P > 1 and starting.size:
            self._prefill_distinct(
                starting, getattr(host, "prompt_index", None), input_ids, attention_mask, P - 1
            )
        span = (P - 1 + int(host.generated.min()), P - 1 + int(host.generated.max()))
        return self._decode(col, input_ids, attention_mask, span)

    def _prefill_distinct(
        self,
        rows: np.ndarray,
        prompt_index: np.ndarray | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        width: int,
    ) -> None:
        """Prefill ``rows`` (host indices): each distinct ``prompt_index`` among them once, into
        its first row, copied into the others (None: every row is prefilled)."""
        device = input_ids.device
        if prompt_index is not None and len(rows) > 1:
            _, first, inverse = np.unique(prompt_index[rows], return_index=True, return_inverse=True)
            if len(first) < len(rows):
                self._prefill(to_device(rows[first], device), input_ids, attention_mask, width)
                copies = np.ones(len(rows), dtype=bool)
                copies[first] = False  # the rows prefilled above
                source = rows[first][inverse]  # (k,) each row's prefilled twin
                self._copy_slots(to_device(source[copies], device), to_device(rows[copies], device), width)
                return
        self._prefill(to_device(rows, device), input_ids, attention_mask, width)

    def _copy_slots(self, source: torch.Tensor, target: torch.Tensor, width: int) -> None:
        """Make the first ``width`` slots of rows ``target`` (k,) copies of those of ``source`` (k,)."""
        for cached in (*self.keys, *self.values):
            cached[target, :, :width] = cached[source, :, :width]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row ``i`` of the cache a copy of row ``rows[i]`` (beam search keeps the rows of
        the beams it extends, in the order it keeps them)."""
        raise NotImplementedError

    def _prefill(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
    ) -> None:
        """Fill the slots of columns ``[0, width)`` of ``rows`` from the observations."""
        raise NotImplementedError

    def _decode(
        self,
        col: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        span: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row's token in column ``col`` (N,), whose earlier slots are filled; its
        key and value go into that column. Logits (N, V) and values (N,). ``span``: the
        smallest and largest entry of ``col`` where the host knows them (None: read them)."""
        raise NotImplementedError


class KVCache(RowCache):
    """Per-env keys and values of every layer, one slot per observation column.

    :param policy: the policy whose keys and values are cached.
    :param num_envs: rows of the cache.
    :param compile: decode through ``torch.compile`` (inductor, ``fullgraph``, static shapes):
        the compiled step attends over all ``max_len`` slots (the unfilled ones masked), so its
        shapes never change and it is compiled once, on the first decoding step (about 7 s on a
        CPU core), with no host synchronisation inside. Measured on one CPU core, default task, 64
        rows: 636 against 1,051 µs per decoding step. On a CUDA device the compiled step is then
        captured once as a CUDA graph and every later step replays it: one launch instead of one
        per kernel, which is most of a small policy's decoding time on a GPU (the observations are
        copied into the graph's own input tensors first; the cache's tensors keep their storage,
        :meth:`reorder` included). Where compilation or capture fails (no C++ compiler, no
        Triton) the cache warns once and decodes eagerly.
    """

    def __init__(
        self, policy: TransformerPolicy, num_envs: int, device: torch.device | str, compile: bool = False
    ):
        cfg, S = policy.cfg, policy.max_len
        shape = (num_envs, cfg.n_heads, S, cfg.d_model // cfg.n_heads)  # (N, nh, S, hs)
        dtype = policy.kv_dtype  # bfloat16 under the policy's autocast
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.policy = policy
        self._compiled: Any = None
        if compile:
            self._compiled = torch.compile(self._decode_all_slots, dynamic=False, fullgraph=True)
        self._graphed = compile and torch.device(device).type == "cuda"
        self._graph: Any = None  # torch.cuda.CUDAGraph, captured on the first decoding step
        self._graph_inputs: tuple[torch.Tensor, ...] = ()  # what the graph reads: col, ids, mask
        self._graph_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # what it writes

    @torch.no_grad()
    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refill every row from full observations (N, L), e.g. after the policy's weights changed.

        Returns the next-token logits (N, V) and values (N,) at each row's last real token.
        """
        last = last_real_column(attention_mask)  # (N,)
        W = int(last.max()) + 1  # the columns after every row's last real token hold nothing yet
        ids, mask = input_ids[:, :W], attention_mask[:, :W]
        distinct = distinct_rows(ids, mask)
        if distinct is None:
            hidden = self._run(None, ids, mask)
            return self.policy.heads(hidden[torch.arange(len(last), device=last.device), last])
        first, inverse = distinct  # each distinct row computed once, into its first occurrence's slots
        hidden = self._run(first, ids[first], mask[first])  # (u, W, C)
        self.reorder(first[inverse])  # every row a copy of its first twin
        logits, values = self.policy.heads(hidden[torch.arange(len(first), device=last.device), last[first]])
        return logits[inverse], values[inverse]

    def reorder(self, rows: torch.Tensor) -> None:
        if self._graphed:  # the captured graph reads these tensors' storage: rewrite it in place
            for cached in (*self.keys, *self.values):
                cached.copy_(cached[rows])
            return
        self.keys = [k[rows] for k in self.keys]  # (N, nh, S, hs) each
        self.values = [v[rows] for v in self.values]

    def _prefill(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
    ) -> None:
        if len(rows) == input_ids.shape[0]:  # every row starts (as all do after a reset): in place
            self._run(None, input_ids[:, :width], attention_mask[:, :width], hidden=False)
        else:
            self._run(rows, input_ids[rows, :width], attention_mask[rows, :width], hidden=False)

    def _decode(
        self,
        col: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        span: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row at once, in place: each block writes the row's new key and value into its
        slot and attends over the cache's first ``max(col) + 1`` slots as they lie (no copy of the
        cached rows, no attention over slots that no row has filled yet)."""
        if self._compiled is not None:
            try:
                if self._graphed:
                    return self._replay(col, input_ids, attention_mask)
                return self._compiled(col, input_ids, attention_mask, self.keys, self.values)
            except Exception as exc:  # compilation or capture failed: the eager step computes the same
                what = "torch.compile or CUDA graph capture" if self._graphed else "torch.compile"
                warnings.warn(
                    f"{what} of the KV cache's decoding step failed ({type(exc).__name__}: {exc}); "
                    "decoding eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._compiled, self._graph, self._graphed = None, None, False
        width = (int(col.max()) if span is None else span[1]) + 1
        return self._decode_slots(col, input_ids, attention_mask, width, self.keys, self.values)

    def _replay(
        self, col: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled decoding step as a CUDA graph: captured on the first call (and again if
        the observations' shape changes), replayed on every other. A step is idempotent (it writes
        the same keys and values into the same slots and returns the same outputs), so the warm-up
        calls that compile the step before the capture can run on this step's inputs."""
        inputs = (col, input_ids, attention_mask)
        if self._graph is None or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(self._graph_inputs, inputs, strict=True)
        ):
            self._graph_inputs = tuple(x.clone() for x in inputs)
            device = input_ids.device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capturing stream, as CUDA graphs need
                for _ in range(2):
                    self._compiled(*self._graph_inputs, self.keys, self.values)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._graph_outputs = self._compiled(*self._graph_inputs, self.keys, self.values)
            self._graph = graph
        else:
            for static, x in zip(self._graph_inputs, inputs, strict=True):
                static.copy_(x)
        self._graph.replay()
        assert self._graph_outputs is not None
        logits, values = self._graph_outputs
        return logits.clone(), values.clone()  # the next replay overwrites the graph's outputs

    def _decode_all_slots(
        self,
        col: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_decode_slots` over all ``max_len`` slots: fixed shapes, for ``torch.compile``."""
        return self._decode_slots(col, input_ids, attention_mask, self.policy.max_len, keys, values)

    def _decode_slots(
        self,
        col: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        width: int,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding step with attention over slots ``[0, width)``, which hold every row's
        tokens so far (``width > max(col)``; slots past a row's newest token are masked)."""
        policy = self.policy
        col = col.unsqueeze(1)  # (N, 1)
        slots = torch.arange(width, device=input_ids.device)
        real = attention_mask[:, :width].bool() & (slots <= col)  # (N, width) real tokens up to col
        positions = (real.sum(1, keepdim=True) - 1).clamp(min=0)  # (N, 1) real tokens before col
        allowed = real.scatter(1, col, True)  # a padding token sees itself
        x = policy._embed(input_ids.gather(1, col), positions)  # (N, 1, C)
        mask = allowed[:, None, None, :]  # (N, 1, 1, width)
        with policy.precision():
            for layer, block in enumerate(policy.blocks):
                x = block(x, mask, (keys[layer], values[layer], None, col))
            x = policy.ln_f(x[:, -1])
        return policy.heads(x)

    def _run(
        self,
        rows: torch.Tensor | None,
        ids: torch.Tensor,
        mask: torch.Tensor,
        hidden: bool = True,
    ) -> torch.Tensor | None:
        """Feed ``ids`` (n, T), the first ``T`` columns of ``rows`` (None: every row, in order),
        with the rows' observation masks ``mask`` (n, T), through the cache into slots ``[0, T)``;
        the final hidden states (n, T, C), unless ``hidden`` is False (prefill: the keys and
        values alone, so the last block stops once it has written them)."""
        policy = self.policy
        n, T = ids.shape
        cols = torch.arange(T, device=ids.device).expand(n, T)  # (n, T)
        allowed = causal_padding_mask(mask)  # (n, 1, T, T)
        x = policy._embed(ids, real_positions(mask))
        *blocks, last = policy.blocks
        with policy.precision():
            for layer, block in enumerate(blocks):
                x = block(x, allowed, (self.keys[layer], self.values[layer], rows, cols))
            if not hidden:
                last.write_cache(x, (self.keys[-1], self.values[-1], rows, cols))
                return None
            x = last(x, allowed, (self.keys[-1], self.values[-1], rows, cols))
            return policy.ln_f(x)


class RecomputeCache:
    """Acting without a cache: every step runs the whole observation (the simple, slow reference
    that the caches are tested against; works with any policy)."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    @torch.no_grad()
    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (N, V) and values (N,) at each row's last real token."""
        logits, values = self.policy(input_ids, attention_mask)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        last = last_real_column(attention_mask)
        return logits[rows, last], values[rows, last]

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_window: int,
        host: HostView | Lengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`rebuild`; ``prompt_window`` and ``host`` are unused."""
        return self.rebuild(input_ids, attention_mask)

    def reorder(self, rows: torch.Tensor) -> None:
        """Nothing to reorder: every step reads the whole observation."""
