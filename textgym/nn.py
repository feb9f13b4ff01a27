"""The decoder-only Transformer trunk that the agents' policy and the learned reward models share.

:class:`TransformerDecoder` (token and position embeddings, pre-LayerNorm causal blocks) reads
TextGen-v0 observations directly: ``input_ids`` and ``attention_mask`` of shape ``(B, L)``, left
or right padded. Positions count real tokens only (``cumsum(mask) - 1``), so a prompt means the
same thing whatever its padding, and attention never looks at padding.

It lives in the environment package because the environment loads learned reward models
(:mod:`textgym.learned`) built on it; :mod:`agents.policy` puts the policy and value heads and
the key/value cache on the same trunk.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from textgym.checks import is_positive_int

ARCHITECTURES = ("decoder", "seq2seq")


@dataclass(frozen=True)
class PolicyConfig:
    """Size and shape of the Transformer: the agents' policy and the learned reward models.

    A reward-model or language-model checkpoint stores it as ``"policy_config"`` (its fields).
    """

    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of Transformer blocks (the decoder's, with ``architecture="seq2seq"``)."""
    n_heads: int = 4
    """Attention heads per block; must divide ``d_model``."""
    mlp_ratio: int = 4
    """Hidden width of each MLP as a multiple of ``d_model``."""
    positional: str = "learned"
    """``"learned"`` position embeddings or fixed ``"sinusoidal"`` encodings."""
    architecture: str = "decoder"
    """``"decoder"``: decoder-only (:class:`TransformerDecoder`); ``"seq2seq"``: an encoder over the
    prompt window and a decoder over the generated tokens with cross-attention to it
    (``agents.seq2seq.Seq2SeqPolicy``, a policy of the agents only)."""
    encoder_layers: int | None = None
    """Encoder blocks of the ``"seq2seq"`` architecture; None: ``n_layers``. Must be None for
    ``"decoder"``."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.positional not in ("learned", "sinusoidal"):
            raise ValueError(f"positional must be 'learned' or 'sinusoidal', got {self.positional!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}, got {self.architecture!r}"
            )
        if self.encoder_layers is not None:
            if self.architecture != "seq2seq":
                raise ValueError(
                    f"encoder_layers={self.encoder_layers!r} applies to architecture='seq2seq' only; the "
                    f"{self.architecture!r} architecture has no encoder (leave it None)"
                )
            if not is_positive_int(self.encoder_layers):
                raise ValueError(
                    f"encoder_layers must be None or a positive integer, got {self.encoder_layers!r}"
                )


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine position encodings (Vaswani et al. 2017, section 3.5): (length, dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (length, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    enc = torch.zeros(length, dim)
    enc[:, 0::2] = torch.sin(position * freq)
    enc[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return enc


class Block(nn.Module):
    """Pre-LayerNorm block: self-attention under the caller's mask (causal in the decoders,
    bidirectional in the encoder of ``agents.seq2seq``), then a GELU MLP, each around a residual."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
        start: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, C); ``attn_mask`` (B, 1, T, S) bool, True where attention is allowed.

        With ``cache = (k_cache, v_cache, rows, cols)`` the new keys/values of ``x`` are written
        into ``k_cache[rows, :, cols]`` and attention runs over those rows' first S cached slots;
        ``rows=None`` means every row of the cache in order (``B`` rows): their keys and values are
        read in place, with no copy. ``start``: only columns ``[start, T)`` of the output are
        wanted (every column still gives its key and value): (B, T - start, C). ``prefix``: keys
        and values (B, nh, S - T, hs) of columns before ``x``'s, which ``x`` attends to as well
        (no cache written; gradients flow into them).
        """
        x = self.attend(x, attn_mask, cache, start, prefix)
        return x + self.mlp(self.ln2(x))

    def attend(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
        start: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x[:, start:]`` plus its self-attention (the block's first half; arguments as
        :meth:`forward`)."""
        B, T, C = x.shape
        q, k, v = self._qkv(x)  # (B, nh, T, hs) each
        if cache is not None:
            k, v = self._cached(k, v, cache, attn_mask.shape[-1])
        elif prefix is not None:
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)  # (B, nh, S, hs)
        if start:
            q, x, attn_mask = q[:, :, start:], x[:, start:], attn_mask[:, :, start:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T - start, hs)
        y = y.transpose(1, 2).reshape(B, T - start, C)  # (B, T - start, C)
        return x + self.proj(y)

    def write_cache(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]
    ) -> None:
        """Write the keys and values of ``x`` (B, T, C) into ``cache`` (as :meth:`forward`) and
        nothing else: what a prefill needs of the last block, whose outputs it never reads."""
        _, k, v = self._qkv(x)
        self._write(k, v, cache)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    @staticmethod
    def _write(
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor],
    ) -> None:
        """Write ``k``, ``v`` (B, nh, T, hs) into the slots ``cols`` of the cache's ``rows``."""
        k_cache, v_cache, rows, cols = cache  # caches (N, nh, S, hs); rows (B,) or None, cols (B, T)
        index = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        k_cache[index.unsqueeze(1), :, cols] = k.transpose(1, 2)  # (B, T, nh, hs) into slots
        v_cache[index.unsqueeze(1), :, cols] = v.transpose(1, 2)

    @classmethod
    def _cached(
        cls,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor],
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (B, nh, T, hs) into the cache's slots; the keys and values of
        those rows' first ``width`` slots (B, nh, width, hs) (``rows=None``: a view, else a copy)."""
        cls._write(k, v, cache)
        k_cache, v_cache, rows, _ = cache
        if rows is None:
            return k_cache[:, :, :width], v_cache[:, :, :width]
        return k_cache[rows, :, :width], v_cache[rows, :, :width]


class TransformerDecoder(nn.Module):
    """Token embedding + positions and pre-LN causal blocks: the trunk every model here shares.

    The agents' policy (``agents.policy.TransformerPolicy``), their Stable-Baselines3 features
    extractor and the learned reward models (:class:`textgym.learned.RewardNet`) put their heads
    on this trunk, so one architecture and one initialisation serve all of them.

    :param vocab_size: number of token ids (the env's ``Discrete`` action space).
    :param max_len: longest sequence (observation length ``P + M``).
    :param cfg: the architecture.
    """

    autocast = False
    """Run the blocks and heads under ``torch.autocast`` in bfloat16 (mixed precision: the weights,
    their gradients and the residual stream stay float32). Not part of the architecture or the
    weights: the agents set it from their config (``PPOConfig.autocast``)."""

    def __init__(self, vocab_size: int, max_len: int, cfg: PolicyConfig = PolicyConfig()):
        super().__init__()
        if cfg.architecture != "decoder":
            raise ValueError(
                f"TransformerDecoder is decoder-only: PolicyConfig.architecture must be 'decoder' here, got "
                f"{cfg.architecture!r} (the encoder-decoder policy, agents.seq2seq.Seq2SeqPolicy, serves the "
                "PPO, GRPO and RLOO agents only)"
            )
        self.cfg, self.vocab_size, self.max_len = cfg, vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        if cfg.positional == "learned":
            self.pos_emb = nn.Embedding(max_len, cfg.d_model)
        else:
            self.register_buffer("pos_table", sinusoidal_encoding(max_len, cfg.d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights for every Linear and Embedding, zero biases, unit LayerNorms."""
        init_weights(self)

    def precision(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` in bfloat16 on the weights' device where :attr:`autocast` is set,
        else nothing."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.tok_emb.weight.device.type, dtype=torch.bfloat16)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype the blocks make keys and values in, what a cache of them holds: bfloat16
        under :attr:`autocast`, else the weights'."""
        return torch.bfloat16 if self.autocast else self.tok_emb.weight.dtype

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        pos = self.pos_emb(positions) if self.cfg.positional == "learned" else self.pos_table[positions]
        return self.tok_emb(ids) + pos  # (B, T, C)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Final (layer-normed) hidden states (B, T - start, C) of a full causal pass, at columns
        ``[start, T)``: the last block computes its attention and MLP for those columns only (the
        others' outputs would be read by no later block), the same numbers for less work."""
        allowed = causal_padding_mask(attention_mask)  # (B, 1, T, T)
        x = self._embed(input_ids, real_positions(attention_mask))
        last = len(self.blocks) - 1
        with self.precision():
            for i, block in enumerate(self.blocks):
                x = block(x, allowed, start=start if i == last else 0)
            return self.ln_f(x)

    def hidden_shared_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: int,
        shared: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Final hidden states (B, T - prefix + 1, C) of columns ``[prefix - 1, T)``, as
        ``hidden(input_ids, attention_mask, start=prefix - 1)``, where rows share their first
        ``prefix`` columns: ``shared = (first, inverse)``, each distinct row's first occurrence
        (u,) and every row's entry in it (B,) (``agents.policy.distinct_rows``). The prefix runs
        once per distinct row; every row's other columns attend to its keys and values, and the
        gradients reach the prefix through all of them."""
        first, inverse = shared
        head_mask = attention_mask[first, :prefix]  # (u, prefix)
        x = self._embed(input_ids[first, :prefix], real_positions(head_mask))  # (u, prefix, C)
        allowed = causal_padding_mask(head_mask)  # (u, 1, prefix, prefix)
        cols = torch.arange(prefix, device=x.device).expand(len(first), prefix)  # (u, prefix)
        C, nh = self.cfg.d_model, self.cfg.n_heads
        keys, values = [], []
        last = len(self.blocks) - 1
        with self.precision():
            for i, block in enumerate(self.blocks):
                # Fresh slots (u, nh, prefix, hs), filled by the block before it reads them and
                # never written again: autograd follows the in-place write.
                k = x.new_zeros(len(first), nh, prefix, C // nh, dtype=self.kv_dtype)
                v = x.new_zeros(len(first), nh, prefix, C // nh, dtype=self.kv_dtype)
                x = block(x, allowed, (k, v, None, cols), start=prefix - 1 if i == last else 0)
                keys.append(k[inverse])  # (B, nh, prefix, hs)
                values.append(v[inverse])
            if input_ids.shape[1] == prefix:  # no column after the prefix
                return self.ln_f(x[inverse])
            y = self._embed(
                input_ids[:, prefix:], real_positions(attention_mask)[:, prefix:]
            )  # (B, T - prefix, C)
            allowed = causal_padding_mask(attention_mask)[:, :, prefix:]  # (B, 1, T - prefix, T)
            for block, k, v in zip(self.blocks, keys, values, strict=True):
                y = block(y, allowed, prefix=(k, v))
            return self.ln_f(torch.cat([x[inverse], y], 1))  # (B, T - prefix + 1, C)

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, C) of each row's last real token."""
        hidden = self.hidden(input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_column(attention_mask)]


def init_weights(model: nn.Module) -> None:
    """Normal(0, 0.02) weights for every Linear and Embedding of ``model``, zero biases, unit
    LayerNorms: the one initialisation of every Transformer here."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool attention mask of a causal pass over rows with ``attention_mask`` (B, T):
    each column attends to the real tokens up to itself, never to padding, and a padding column
    to itself (so its softmax stays finite; nothing reads its output)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    allowed = causal & attention_mask.bool()[:, None, :]  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return allowed.unsqueeze(1)


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each column: the number of real tokens before it (``cumsum(mask) - 1``)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def last_real_column(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of the last real token of each row of a TextGen observation mask (B, L)."""
    L = attention_mask.shape[1]
    cols = torch.arange(L, device=attention_mask.device)
    return torch.where(attention_mask.bool(), cols, -1).max(dim=1).values
