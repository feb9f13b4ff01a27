"""An encoder-decoder Transformer policy with a value head, and the cache that lets it act.

``PolicyConfig(architecture="seq2seq")`` makes the agents (PPO, GRPO, RLOO) use this policy in place
of the decoder-only :class:`~agents.policy.TransformerPolicy`. It reads the same TextGen-v0
observations, ``input_ids`` and ``attention_mask`` of shape ``(B, L)`` with the prompt padded into the
first ``P`` columns and the generated tokens from column ``P``, and splits them there:

- the **encoder** reads the prompt window: bidirectional self-attention that never attends to
  padding, positions counting real tokens only, so left or right padding inside the window changes
  nothing;
- the **decoder** reads a learned start vector and then the generated tokens (decoder position ``i``
  holds generated token ``i - 1``): causal self-attention, then cross-attention to the encoder's
  output (padding masked), then the MLP. The policy and value heads read the decoder's states.

It keeps the decoder-only policy's interface: ``hidden(input_ids, attention_mask)`` gives one state per
observation column, column ``j >= P - 1`` being the state whose last token is in column ``j`` (the
decoder's position ``j - P + 1``); every column of the prompt window gives the decoder's start state,
the state after the prompt, so each row's last real column reads the right one, whatever the
prompt's padding. The update's whole-sequence passes, ``predict`` and the group agents' log-prob
passes therefore run unchanged; they only must not cut columns off the left of the prompt window
(:func:`agents.on_policy.forward_span`).

Acting (:class:`Seq2SeqCache`): the encoder runs once when a row starts an episode (every row with
no generated token, so also when it autoresets onto a new prompt); each decoder layer's
cross-attention keys and values of that prompt are kept for the whole episode, and each step decodes
one token per row through a self-attention cache of the decoder's positions. The logits equal those
of a full pass over the observation (tested, across autoresets).

Sizes: :func:`agents.policy.count_parameters` counts either architecture's weights for an env, and
:func:`seq2seq_config_like` picks the width of a seq2seq policy whose count is closest to a given
decoder-only one (within 10% for the built-in tasks, tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.policy import Lengths, RowCache
from textgym.core import to_device
from textgym.nn import Block, PolicyConfig, init_weights, real_positions, sinusoidal_encoding
from textgym.vector import HostView

__all__ = ["DecoderBlock", "Seq2SeqCache", "Seq2SeqPolicy", "seq2seq_config_like"]


class DecoderBlock(Block):
    """Pre-LayerNorm decoder block: causal self-attention (:meth:`Block.attend`, with its cache),
    cross-attention to the encoder's output, then the GELU MLP, each around a residual."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__(cfg)
        self.ln_cross = nn.LayerNorm(cfg.d_model)
        self.q_cross = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv_cross = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj_cross = nn.Linear(cfg.d_model, cfg.d_model)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, nh, P, hs) each of the encoder's output (B, P, C)."""
        B, P, C = memory.shape
        k, v = self.kv_cross(memory).split(C, dim=2)
        k = k.view(B, P, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, P, hs)
        v = v.view(B, P, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, P, hs)
        return k, v

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, C); ``attn_mask`` (B, 1, T, S) and ``cache`` as :meth:`Block.forward`;
        ``memory_kv`` from :meth:`memory_kv`; ``memory_mask`` (B, 1, 1, P) bool, True at real
        prompt tokens."""
        B, T, C = x.shape
        x = self.attend(x, attn_mask, cache)
        q = self.q_cross(self.ln_cross(x)).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, *memory_kv, attn_mask=memory_mask)  # (B, nh, T, hs)
        x = x + self.proj_cross(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class Seq2SeqPolicy(nn.Module):
    """Encoder over the prompt window, decoder over the generated tokens, policy and value heads.

    :param vocab_size: number of token ids (the env's ``Discrete`` action space); the encoder and
        the decoder share one token embedding.
    :param max_len: longest sequence (observation length ``P + M``).
    :param prompt_window: ``P``, the columns of the prompt (the env's ``prompt_window``).
    :param cfg: the architecture, ``architecture="seq2seq"``: ``encoder_layers`` encoder blocks
        (None: ``n_layers``) and ``n_layers`` decoder blocks.
    """

    def __init__(self, vocab_size: int, max_len: int, prompt_window: int, cfg: PolicyConfig):
        super().__init__()
        if cfg.architecture != "seq2seq":
            raise ValueError(
                f"Seq2SeqPolicy needs PolicyConfig.architecture='seq2seq', got {cfg.architecture!r} "
                "(agents.policy.TransformerPolicy is the decoder-only policy)"
            )
        if not 1 <= prompt_window < max_len:
            raise ValueError(
                f"prompt_window must be in [1, max_len={max_len}) (the generated tokens follow it), got {prompt_window}"
            )
        self.cfg, self.vocab_size, self.max_len, self.prompt_window = cfg, vocab_size, max_len, prompt_window
        self.decoder_len = max_len - prompt_window + 1  # the start, then every generated token
        C = cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, C)
        self.dec_start = nn.Parameter(torch.zeros(C))
        if cfg.positional == "learned":
            self.enc_pos = nn.Embedding(prompt_window, C)
            self.dec_pos = nn.Embedding(self.decoder_len, C)
        else:
            table = sinusoidal_encoding(max(prompt_window, self.decoder_len), C)
            self.register_buffer("pos_table", table, persistent=False)
        encoder_layers = cfg.n_layers if cfg.encoder_layers is None else cfg.encoder_layers
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(encoder_layers))
        self.ln_enc = nn.LayerNorm(C)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(C)
        self.policy_head = nn.Linear(C, vocab_size)
        self.value_head = nn.Linear(C, 1)
        init_weights(self)
        nn.init.normal_(self.dec_start, std=0.02)
        # As the decoder-only policy: near-uniform logits and zero values at the start.
        nn.init.normal_(self.policy_head.weight, std=0.01 / math.sqrt(C))
        nn.init.zeros_(self.value_head.weight)

    # ---------------------------------------------------------------------------------- encoder
    def encode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's output (B, P, C) over the prompt window (B, P): bidirectional, padding
        never attended (a padding column sees itself only, so its finite output is never read)."""
        P = prompt_ids.shape[1]
        mask = prompt_mask.bool()
        allowed = mask[:, None, :] | torch.eye(P, dtype=torch.bool, device=mask.device)  # (B, P, P)
        positions = real_positions(prompt_mask)  # (B, P)
        pos = self.enc_pos(positions) if self.cfg.positional == "learned" else self.pos_table[positions]
        x = self.tok_emb(prompt_ids) + pos  # (B, P, C)
        for block in self.encoder:
            x = block(x, allowed.unsqueeze(1))
        return self.ln_enc(x)

    def memory(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Every decoder layer's cross-attention keys and values of the prompts (B, P), and the
        cross-attention mask (B, 1, 1, P)."""
        memory = self.encode(prompt_ids, prompt_mask)
        return [block.memory_kv(memory) for block in self.decoder], memory_mask(prompt_mask)

    # ---------------------------------------------------------------------------------- decoder
    def _decoder_input(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, C) of decoder ``positions`` (B, T): the start vector at position 0,
        else the generated token in ``tokens`` (B, T)."""
        emb = torch.where((positions == 0).unsqueeze(-1), self.dec_start, self.tok_emb(tokens))
        pos = self.dec_pos(positions) if self.cfg.positional == "learned" else self.pos_table[positions]
        return emb + pos

    def _decode(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        memory: list[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The decoder blocks and the final LayerNorm over ``x`` (B, T, C)."""
        for layer, block in enumerate(self.decoder):
            x = block(x, attn_mask, memory[layer], cross_mask, None if caches is None else caches[layer])
        return self.ln_f(x)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, W, C) at every column of observations (B, W), ``W >= P``.

        Column ``j >= P - 1`` holds the decoder's state at position ``j - P + 1`` (the state whose
        last token is in column ``j``); the columns before ``P - 1`` repeat the start state, so any
        column of the prompt window reads the state after the prompt."""
        B, W = input_ids.shape
        P = self.prompt_window
        if W < P or self.max_len < W:
            raise ValueError(
                f"Seq2SeqPolicy reads observations of {P} to {self.max_len} columns (the prompt window "
                f"{P} first; do not cut columns off its left), got {W}"
            )
        memory, cross_mask = self.memory(input_ids[:, :P], attention_mask[:, :P])
        out = self._decoder_states(input_ids, memory, cross_mask)  # (B, W - P + 1, C)
        return torch.cat([out[:, :1].expand(B, P - 1, out.shape[2]), out], 1)  # (B, W, C)

    def hidden_shared_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: int,
        shared: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor | None:
        """``hidden(input_ids, attention_mask)[:, P - 1:]`` (B, W - P + 1, C) where rows share
        their prompt windows: ``shared = (first, inverse)`` (``agents.policy.distinct_rows``).
        The encoder and the cross-attention keys and values run once per distinct prompt. None
        unless ``prefix`` is the prompt window (the only prefix the encoder reads)."""
        P = self.prompt_window
        if prefix != P:
            return None
        first, inverse = shared
        memory, cross_mask = self.memory(input_ids[first, :P], attention_mask[first, :P])
        memory = [(k[inverse], v[inverse]) for k, v in memory]  # (B, nh, P, hs) each
        return self._decoder_states(input_ids, memory, cross_mask[inverse])

    def _decoder_states(
        self,
        input_ids: torch.Tensor,
        memory: list[tuple[torch.Tensor, torch.Tensor]],
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder's final states (B, W - P + 1, C) over the generated columns of
        ``input_ids`` (B, W), the start state first."""
        B, W = input_ids.shape
        T = W - self.prompt_window + 1
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        # (B, T); column 0 unused: the start
        tokens = torch.cat([input_ids[:, :1], input_ids[:, self.prompt_window :]], 1)
        # Generated tokens are contiguous from column P, so causal attention never sees padding.
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        return self._decode(self._decoder_input(tokens, positions), causal, memory, cross_mask)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (..., V) and values (...) from final hidden states (..., C)."""
        return self.policy_head(hidden), self.value_head(hidden).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, W, V) and values (B, W) at every column of ``input_ids`` (B, W), as
        :meth:`hidden` lays them out."""
        return self.heads(self.hidden(input_ids, attention_mask))

    def make_cache(self, num_envs: int, device: torch.device | str) -> Seq2SeqCache:
        """The :class:`Seq2SeqCache` that acting runs through."""
        return Seq2SeqCache(self, num_envs, device)


def memory_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Cross-attention mask (B, 1, 1, P) of prompt windows (B, P): the real tokens; a window with
    none (no episode in the row) attends to its last column, to stay finite."""
    mask = prompt_mask.bool().clone()
    mask[:, -1] |= ~mask.any(1)
    return mask[:, None, None, :]


class Seq2SeqCache(RowCache):
    """Per-env cache of a :class:`Seq2SeqPolicy`: each decoder layer's cross-attention keys and
    values of the row's prompt (N, nh, P, hs), computed when its episode starts, and its
    self-attention keys and values, one slot per decoder position (N, nh, M + 1, hs). It has its
    own :meth:`step` (a new row is encoded, not prefilled) and shares the acting interface of
    :class:`~agents.policy.RowCache`: ``step``, ``rebuild``, ``reorder``.

    :param policy: the policy whose keys and values are cached.
    :param num_envs: rows of the cache.
    """

    def __init__(self, policy: Seq2SeqPolicy, num_envs: int, device: torch.device | str):
        cfg, P = policy.cfg, policy.prompt_window
        hs = cfg.d_model // cfg.n_heads
        dtype = next(policy.parameters()).dtype

        def zeros(width: int) -> list[torch.Tensor]:
            shape = (num_envs, cfg.n_heads, width, hs)  # (N, nh, width, hs)
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

        self.keys, self.values = zeros(policy.decoder_len), zeros(policy.decoder_len)
        self.cross_keys, self.cross_values = zeros(P), zeros(P)
        self.cross_mask = torch.ones(num_envs, 1, 1, P, dtype=torch.bool, device=device)  # (N, 1, 1, P)
        self.policy = policy

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_window: int,
        host: HostView | Lengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (N, V) and values (N,) for the current observations (N, L).

        Rows with no generated token yet (new episodes) are encoded; then every row decodes its
        newest position: the start for those rows, the token appended since the previous call
        for the others. ``host``: as for :meth:`agents.policy.RowCache.step` (with it, no read
        of the device)."""
        P = self._check_window(prompt_window)
        generated = attention_mask[:, P:].sum(1)  # (N,) tokens generated so far
        if host is None:
            new = (generated == 0).nonzero().squeeze(1)
            width = None
        else:
            new = to_device(np.flatnonzero(host.generated == 0), input_ids.device)
            width = int(host.generated.max()) + 1
        if new.numel():
            self._encode(new, input_ids[new, :P], attention_mask[new, :P])
        return self._run(input_ids, generated.unsqueeze(1), generated, width)

    @torch.no_grad()
    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refill every row from full observations (N, L), e.g. after the policy's weights changed:
        encode every prompt and decode every generated token. Returns the logits (N, V) and values
        (N,) of each row's current state."""
        P = self.policy.prompt_window
        N = input_ids.shape[0]
        rows = torch.arange(N, device=input_ids.device)
        self._encode(rows, input_ids[:, :P], attention_mask[:, :P])
        generated = attention_mask[:, P:].sum(1)  # (N,)
        T = int(generated.max()) + 1
        positions = torch.arange(T, device=input_ids.device).expand(N, T)  # (N, T)
        return self._run(input_ids, positions, generated, T)

    def reorder(self, rows: torch.Tensor) -> None:
        for name in ("keys", "values", "cross_keys", "cross_values"):
            setattr(self, name, [t[rows] for t in getattr(self, name)])  # (N, nh, ·, hs) each
        self.cross_mask = self.cross_mask[rows]

    def _check_window(self, prompt_window: int) -> int:
        if prompt_window != self.policy.prompt_window:
            raise ValueError(
                f"the Seq2SeqPolicy was built for a prompt window of {self.policy.prompt_window} columns, "
                f"got prompt_window={prompt_window}"
            )
        return prompt_window

    def _encode(self, rows: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Encode the prompts (n, P) of ``rows`` and keep their cross-attention keys and values."""
        memory, cross_mask = self.policy.memory(prompt_ids, prompt_mask)
        for layer, (k, v) in enumerate(memory):
            self.cross_keys[layer][rows] = k
            self.cross_values[layer][rows] = v
        self.cross_mask[rows] = cross_mask

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        current: torch.Tensor,
        width: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed decoder ``positions`` (N, T) of every row (their tokens read from ``input_ids``
        (N, L)) through the cache, in place (no copy of the cached rows; self-attention over the
        slots up to the furthest position only, ``width`` of them: ``max(positions) + 1``, read
        from the device if None); the logits and values at each row's ``current`` position (N,)."""
        policy, P = self.policy, self.policy.prompt_window
        n, T = positions.shape
        tokens = input_ids.gather(1, (P - 1 + positions).clamp(max=input_ids.shape[1] - 1))  # (n, T)
        width = int(positions.max()) + 1 if width is None else width
        slots = torch.arange(width, device=input_ids.device)
        # Causal over the decoder's slots; slots past ``current`` only ever meet positions past it.
        allowed = slots[None, None, :] <= positions[:, :, None]  # (n, T, width)
        memory = list(zip(self.cross_keys, self.cross_values, strict=True))
        caches = [(k, v, None, positions) for k, v in zip(self.keys, self.values, strict=True)]
        x = policy._decoder_input(tokens, positions)
        hidden = policy._decode(x, allowed.unsqueeze(1), memory, self.cross_mask, caches)  # (n, T, C)
        at = (current - positions[:, 0]).clamp(min=0, max=T - 1)  # (n,) current position's index in T
        return policy.heads(hidden[torch.arange(n, device=hidden.device), at])


def seq2seq_config_like(
    decoder_cfg: PolicyConfig, vocab_size: int, max_len: int, prompt_window: int
) -> PolicyConfig:
    """The seq2seq :class:`PolicyConfig` whose parameter count is closest to the decoder-only
    ``decoder_cfg``'s for an env of ``vocab_size`` tokens, ``max_len`` columns and a prompt window
    of ``prompt_window``: the layers split between encoder (``n_layers // 2``, at least 1) and
    decoder (the rest, at least 1), heads, MLP ratio and positions kept, the width searched over
    multiples of ``n_heads``. A decoder block holds a third more weights than an encoder block
    (its cross-attention), so the width comes out a little narrower than the decoder-only one.
    """
    from agents.policy import count_parameters

    if decoder_cfg.architecture != "decoder":
        raise ValueError(
            f"decoder_cfg must be a decoder-only PolicyConfig, got architecture={decoder_cfg.architecture!r}"
        )
    target = count_parameters(vocab_size, max_len, prompt_window, decoder_cfg)
    encoder_layers = max(1, decoder_cfg.n_layers // 2)
    decoder_layers = max(1, decoder_cfg.n_layers - encoder_layers)
    best: tuple[float, PolicyConfig] | None = None
    h = decoder_cfg.n_heads
    for d_model in range(h, 2 * decoder_cfg.d_model + h, h):
        cfg = PolicyConfig(
            d_model=d_model,
            n_layers=decoder_layers,
            n_heads=h,
            mlp_ratio=decoder_cfg.mlp_ratio,
            positional=decoder_cfg.positional,
            architecture="seq2seq",
            encoder_layers=encoder_layers,
        )
        gap = abs(count_parameters(vocab_size, max_len, prompt_window, cfg) - target) / target
        if best is None or gap < best[0]:
            best = (gap, cfg)
    assert best is not None
    return best[1]
