"""A Hugging Face causal language model as the PPO policy (the optional ``textgym[hf]`` extra).

:class:`HFPolicy` puts a value head on an ``AutoModelForCausalLM`` loaded from a local directory
and gives it the interface of :class:`agents.policy.TransformerPolicy`, so PPO, the KL reference
and generation use it unchanged::

    model = PPO(env_kwargs={"task": "sentiment"}, policy_model="path/to/causal_lm")   # its tokenizer too
    model.learn(50_000)
    model.policy.save_pretrained("finetuned/")                          # a directory transformers reads

The env speaks textgym ids (:class:`textgym.hf.HFTokenizer`: Hugging Face id + 4, specials at 0–3).
The policy reads them through :meth:`~textgym.hf.HFTokenizer.model_ids` and gathers the LM head's
logits back into textgym order; the shifted copies of Hugging Face special tokens, ``<pad>``,
``<bos>`` and ``<unk>`` get probability 0, so ``<eos>`` (id 2) carries the model's own
end-of-text probability. Positions count real tokens (``cumsum(mask) - 1``), as in the built-in
policy, so left padding does not move them.

Acting uses :class:`HFKVCache` (``cache="kv"``), built on ``transformers.DynamicCache``: one slot per
observation column and env, new episodes prefilled over the prompt window, later steps feeding
one token; tested equal to recompute on GPT-2 and Llama. ``cache="recompute"`` runs the whole
observation every step instead, for architectures whose caches do not fit that layout.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.policy import RowCache, last_real_column, real_positions
from textgym.hf import HFTokenizer, _local_dir, require
from textgym.io import save_torch
from textgym.tasks import make_action_mask

CACHES = ("kv", "recompute")


class HFPolicy(nn.Module):
    """A ``transformers`` causal LM (trunk and LM head) with a value head, reading textgym ids.

    :param model: a causal LM (``AutoModelForCausalLM``) whose vocabulary covers the tokenizer's.
    :param tokenizer: the env's tokenizer; its Hugging Face ids must be the model's.
    :param max_len: the observation length the policy reads (``P + M``).
    :param cache: ``"kv"`` (incremental decoding while acting) or ``"recompute"``.
    """

    def __init__(self, model: nn.Module, tokenizer: HFTokenizer, max_len: int, cache: str = "kv"):
        super().__init__()
        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(
                "a Hugging Face policy reads the env's tokens through its own tokenizer: make the env with "
                f"tokenizer=<the model's directory>, got a {type(tokenizer).__name__}"
            )
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if tokenizer.hf_special_ids["eos"] is None:
            raise ValueError(
                "the policy's <eos> action is the model's end-of-text token, and the tokenizer declares none; "
                "make the env with tokenizer={'name': 'hf', 'path': ..., 'eos_token': ...}"
            )
        head = model.get_output_embeddings()
        model_vocab = head.out_features
        if tokenizer.hf_vocab_size > model_vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.hf_vocab_size} tokens and the model's LM head only {model_vocab}: "
                "they do not belong together"
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(
                f"observations are {max_len} tokens long and the model reads at most {limit} positions; "
                "lower max_new_tokens or max_prompt_tokens"
            )
        self.model, self.tokenizer, self.max_len, self.cache = model, tokenizer, max_len, cache
        self._cache_argument = cache_argument(model.base_model)  # asked once, not per call
        self.vocab_size = tokenizer.vocab_size
        self.cfg = None  # the architecture is the model's own (model.config)
        self.value_head = nn.Linear(head.in_features, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        param = next(model.parameters())
        self.value_head.to(device=param.device, dtype=param.dtype)
        self.register_buffer("model_ids", torch.as_tensor(tokenizer.model_ids()), persistent=False)
        impossible = ~torch.as_tensor(make_action_mask(tokenizer).copy())
        self.register_buffer("impossible", impossible, persistent=False)
        self._check_logits()
        self.train()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        tokenizer: HFTokenizer,
        max_len: int,
        cache: str = "kv",
        dtype: torch.dtype = torch.float32,
    ) -> HFPolicy:
        """Load the causal LM saved in the local directory ``path`` (nothing is downloaded)."""
        transformers = require("transformers")
        path = _local_dir(path, "policy_model")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype
        )
        policy = cls(model, tokenizer, max_len, cache)
        value_head = path / "value_head.pt"
        if value_head.is_file():  # written by save_pretrained
            policy.value_head.load_state_dict(torch.load(value_head, map_location="cpu", weights_only=True))
        return policy

    def train(self, mode: bool = True) -> HFPolicy:
        """Set the value head's mode; the model itself stays in eval mode, dropout off.

        PPO's probability ratio must be exactly 1 before the first optimizer step, and the
        rollout's log-probabilities come from the same network without dropout (as in TRL).
        """
        super().train(mode)
        self.model.eval()
        return self

    def _check_logits(self) -> None:
        """Refuse models whose logits are not their LM head applied to the trunk's output."""
        ids = torch.tensor([[int(self.model_ids[1]), 0]], device=self.model_ids.device)  # (1, 2)
        self.model.eval()
        with torch.no_grad():
            mask = torch.ones_like(ids)
            full = self.model(input_ids=ids, attention_mask=mask).logits
            trunk = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            mine = self.model.get_output_embeddings()(trunk)
        if full.shape != mine.shape or not torch.allclose(full, mine, atol=1e-4, rtol=1e-4):
            raise ValueError(
                f"{type(self.model).__name__} transforms its logits after the LM head (scaling or soft-capping); "
                "HFPolicy supports causal LMs whose logits are lm_head(last hidden state)"
            )

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, C) of textgym ids (B, T), left or right padded."""
        return self.trunk(input_ids, attention_mask, real_positions(attention_mask)).last_hidden_state

    def trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, past: Any = None
    ) -> Any:
        """The model's trunk on textgym ids at ``positions``; with ``past`` (a ``DynamicCache``) it
        attends to the cached keys too and appends its own to ``past``, in place."""
        return self.model.base_model(
            input_ids=self.model_ids[input_ids],
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=past is not None,
            **{self._cache_argument: past},
        )

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (..., V) over textgym ids and values (...) from final hidden states (..., C)."""
        logits = self.model.get_output_embeddings()(hidden).index_select(-1, self.model_ids)  # (..., V)
        logits = logits.masked_fill(self.impossible, torch.finfo(logits.dtype).min)
        return logits, self.value_head(hidden).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) at every column, as :class:`TransformerPolicy`."""
        return self.heads(self.hidden(input_ids, attention_mask))

    def make_cache(self, num_envs: int, device: torch.device | str) -> HFKVCache | RecomputeCache:
        """What acting runs through: :class:`HFKVCache` or :class:`RecomputeCache`."""
        return HFKVCache(self, num_envs, device) if self.cache == "kv" else RecomputeCache(self)

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write the model in the transformers format, with ``value_head.pt`` and the tokenizer
        (when it was loaded through ``transformers``), into ``path``.

        The directory appears whole or not at all: it is written beside ``path`` and renamed.
        An existing directory is replaced only once the new one is complete.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(tmp)
            if self.tokenizer.hf_tokenizer is not None:
                self.tokenizer.hf_tokenizer.save_pretrained(tmp)
            save_torch(tmp / "value_head.pt", {k: v.cpu() for k, v in self.value_head.state_dict().items()})
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


class RecomputeCache:
    """Acting without a cache: every step runs the whole observation (the simple, slow reference)."""

    def __init__(self, policy: HFPolicy):
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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`rebuild`; ``prompt_window`` is unused."""
        return self.rebuild(input_ids, attention_mask)


class HFKVCache(RowCache):
    """Per-env keys and values of every layer, one slot per observation column, as
    :class:`agents.policy.KVCache` keeps them, fed to the model as a ``transformers.DynamicCache``.

    A step feeds each running row's newest token with every earlier slot as its past (stale slots
    masked out) and writes the new key and value back into that token's column.
    """

    def __init__(self, policy: HFPolicy, num_envs: int, device: torch.device | str):
        self.policy, self.num_envs, self.device = policy, num_envs, torch.device(device)
        self.keys: list[torch.Tensor] = []  # per layer (N, kv heads, L, head size)
        self.values: list[torch.Tensor] = []

    def _new_cache(self) -> Any:
        return require("transformers").DynamicCache(config=self.policy.model.config)

    @torch.no_grad()
    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refill every row from full observations (N, L); logits (N, V) and values (N,) at each
        row's last real token."""
        past = self._new_cache()
        out = self.policy.trunk(input_ids, attention_mask, real_positions(attention_mask), past)
        self.keys = [layer.keys for layer in past.layers]
        self.values = [layer.values for layer in past.layers]
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.policy.heads(out.last_hidden_state[rows, last_real_column(attention_mask)])

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`agents.policy.RowCache.step`; the first call fills every row."""
        if not self.keys:
            return self.rebuild(input_ids, attention_mask)
        return super().step(input_ids, attention_mask, prompt_window)

    def _prefill(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, P: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = attention_mask[rows, :P]
        past = self._new_cache()
        out = self.policy.trunk(input_ids[rows, :P], mask, real_positions(mask), past)
        for layer, cached in enumerate(past.layers):
            self.keys[layer][rows, :, :P] = cached.keys
            self.values[layer][rows, :, :P] = cached.values
        return self.policy.heads(out.last_hidden_state[:, -1])

    def _decode(
        self, rows: torch.Tensor, col: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        everything = rows.numel() == input_ids.shape[0]
        past = self._new_cache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            past.update(k if everything else k[rows], v if everything else v[rows], layer)
        mask = attention_mask[rows].clone()
        n = torch.arange(rows.numel(), device=input_ids.device)
        mask[n, col] = 0  # its key is not cached yet: the model appends it after slot L - 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (n, L + 1)
        positions = (attention_mask[rows].sum(1) - 1).unsqueeze(1)  # (n, 1)
        newest = input_ids[rows, col].unsqueeze(1)  # (n, 1)
        out = self.policy.trunk(newest, mask, positions, past)
        for layer, cached in enumerate(past.layers):
            self.keys[layer][rows, :, col] = cached.keys[:, :, -1]
            self.values[layer][rows, :, col] = cached.values[:, :, -1]
        return self.policy.heads(out.last_hidden_state[:, -1])


def cache_argument(trunk: nn.Module) -> str:
    """The name under which ``trunk.forward`` takes its key/value cache: ``"cache"`` where its
    signature has it (transformers renamed ``past_key_values`` to ``cache``; the old name warns,
    and goes in 5.40), else ``"past_key_values"`` (the releases of the ``>=5`` range before that)."""
    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


def tiny_causal_lm(
    tokenizer: Any, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, max_positions: int = 128
) -> nn.Module:
    """A randomly initialised GPT-2 sized for ``tokenizer`` (a ``transformers`` tokenizer), built
    offline from its config: for tests, and for ``scripts/pipeline.py --backbone hf``."""
    transformers = require("transformers")
    end = tokenizer.eos_token_id
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_positions=max_positions,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.GPT2LMHeadModel(config)
