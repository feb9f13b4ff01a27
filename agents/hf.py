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

Acting uses :class:`HFKVCache` (``cache="kv"``), handed to the model as a ``transformers`` cache:
one slot per observation column and env, new episodes prefilled over the prompt window, then one
token per row and step, its key and value written into its slot in place; tested equal to
recompute on GPT-2 and Llama. ``cache="recompute"`` runs the whole
observation every step instead, for architectures whose caches do not fit that layout.

Memory (:class:`HFConfig`, ``PPO(hf_config=...)``): bfloat16 weights or bfloat16 autocast, LoRA
adapters through ``peft`` (the ``lm`` extra) with the KL reference computed by the same model with
its adapters switched off (:class:`AdaptersDisabled`, no second copy of the weights), and
activation checkpointing. Logits and values leave the policy in float32 whatever the model's
precision, so PPO's log-probabilities, ratios and losses are float32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.policy import Lengths, RecomputeCache, RowCache, distinct_rows, last_real_column, real_positions
from textgym.checks import is_positive_int, is_real
from textgym.core import check_bfloat16
from textgym.hf import HFTokenizer, _local_dir, require
from textgym.io import save_torch
from textgym.tasks import make_action_mask
from textgym.tokenizers import NUM_SPECIAL
from textgym.vector import HostView

__all__ = [
    "CACHES",
    "DTYPES",
    "AdaptersDisabled",
    "HFConfig",
    "HFKVCache",
    "HFPolicy",
    "RecomputeCache",
    "cache_argument",
    "tiny_causal_lm",
]

CACHES = ("kv", "recompute")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LM_EXTRA = 'pip install -e ".[lm]" (or pip install "textgym[lm]")'


@dataclass(frozen=True)
class HFConfig:
    """How :class:`HFPolicy` loads and trains its model: precision, LoRA, activation checkpointing.

    Given to PPO with the model (``PPO(policy_model=..., hf_config=HFConfig(...))``, ``train.py
    --hf-config``), stored in every checkpoint and restored by ``PPO.load``. There is no LoRA
    dropout: the policy's model always runs without dropout, so that PPO's probability ratio is
    exactly 1 before the first optimizer step (as in TRL).
    """

    dtype: str = "float32"
    """Precision of the loaded weights: ``"float32"`` or ``"bfloat16"`` (half the memory). Under
    LoRA only the frozen base model takes it; the adapters and the value head, which are trained,
    stay float32. Without LoRA, ``"bfloat16"`` also trains the weights in bfloat16, where Adam's
    small steps are rounded away; use ``autocast`` for full fine-tuning in mixed precision."""
    autocast: bool = False
    """Run the transformer's forward passes under ``torch.autocast`` in bfloat16 while the weights,
    gradients and Adam's moments stay in ``dtype`` (mixed precision; CPUs and GPUs with bfloat16
    support). The LM head runs outside it, in the weights' precision, the value head in float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' activation checkpointing): less memory per sequence in the update, for one more
    forward pass of every layer. Acting and the KL reference run without gradients, unaffected."""
    lora_rank: int | None = None
    """Rank of LoRA adapters (``peft``, the ``lm`` extra): only the adapters and the value head are
    trained, and the KL reference is the same model with its adapters switched off. None: every
    weight is trained (and the KL reference is a frozen copy of the model)."""
    lora_alpha: float = 16.0
    """LoRA's scale: the adapters' output is multiplied by ``lora_alpha / lora_rank``."""
    lora_target_modules: tuple[str, ...] | str | None = None
    """Names (or suffixes of names) of the modules that get adapters, e.g. ``["q_proj", "v_proj"]``;
    ``"all-linear"``: every linear layer but the LM head; None: peft's default for the architecture
    (the attention's query and value projections for Llama, ``c_attn`` for GPT-2)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"HFConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("autocast", "gradient_checkpointing"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"HFConfig.{name} must be true or false (a bool), got {value!r}")
        if self.lora_rank is not None:
            if not is_positive_int(self.lora_rank):
                raise ValueError(
                    f"HFConfig.lora_rank must be None or a positive integer, got {self.lora_rank!r}"
                )
            object.__setattr__(self, "lora_rank", int(self.lora_rank))
        if not is_real(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"HFConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        targets = self.lora_target_modules
        if isinstance(targets, Sequence) and not isinstance(targets, str):
            targets = tuple(targets)  # a JSON list becomes a tuple, so the config stays hashable
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    "HFConfig.lora_target_modules must be None, 'all-linear' or a non-empty list of module "
                    f"names, got {self.lora_target_modules!r}"
                )
            object.__setattr__(self, "lora_target_modules", targets)
        elif targets is not None and not (isinstance(targets, str) and targets):
            raise ValueError(
                "HFConfig.lora_target_modules must be None, 'all-linear' or a non-empty list of module "
                f"names, got {targets!r}"
            )
        if self.lora_rank is None:
            given = [
                f.name
                for f in dataclasses.fields(self)
                if f.name.startswith("lora_") and f.name != "lora_rank" and getattr(self, f.name) != f.default
            ]
            if given:
                raise ValueError(f"HFConfig.{given[0]} is a LoRA setting: give lora_rank too")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    def check_device(self, device: torch.device | str) -> None:
        """Refuse bfloat16 (weights or autocast) on a device that has no bfloat16 arithmetic."""
        if self.dtype == "float32" and not self.autocast:
            return
        check_bfloat16(device, "HFConfig.autocast" if self.autocast else f"HFConfig.dtype={self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.lora_target_modules, tuple):
            data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HFConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"HFConfig needs a mapping of its fields, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HFConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def require_peft() -> Any:
    """Import ``peft`` (LoRA), or say which extra installs it."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ImportError(
            f"LoRA adapters (HFConfig.lora_rank) need peft, of the optional extra lm: {LM_EXTRA}"
        ) from None


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (a model wrapped with adapters)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


class HFPolicy(nn.Module):
    """A ``transformers`` causal LM (trunk and LM head) with a value head, reading textgym ids.

    :param model: a causal LM (``AutoModelForCausalLM``) whose vocabulary covers the tokenizer's, or
        a ``peft.PeftModel`` of one (its adapters are trained, the rest is frozen).
    :param tokenizer: the env's tokenizer; its Hugging Face ids must be the model's.
    :param max_len: the observation length the policy reads (``P + M``).
    :param cache: ``"kv"`` (incremental decoding while acting) or ``"recompute"``.
    :param options: precision, LoRA and checkpointing (:class:`HFConfig`), applied to ``model``
        (cast to ``options.dtype``, adapters added); None uses ``model`` as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: HFTokenizer,
        max_len: int,
        cache: str = "kv",
        options: HFConfig | None = None,
    ):
        super().__init__()
        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(
                "a Hugging Face policy reads the env's tokens through its own tokenizer: make the env with "
                f"tokenizer=<the model's directory>, got a {type(tokenizer).__name__}"
            )
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if options is not None and not isinstance(options, HFConfig):
            raise TypeError(f"options must be an HFConfig, got {type(options).__name__}")
        if tokenizer.hf_special_ids["eos"] is None:
            raise ValueError(
                "the policy's <eos> action is the model's end-of-text token, and the tokenizer declares none; "
                "make the env with tokenizer={'name': 'hf', 'path': ..., 'eos_token': ...}"
            )
        causal_lm = model.get_base_model() if is_peft_model(model) else model
        head = causal_lm.get_output_embeddings()
        model_vocab = head.out_features
        if tokenizer.hf_vocab_size > model_vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.hf_vocab_size} tokens and the model's LM head only {model_vocab}: "
                "they do not belong together"
            )
        limit = getattr(causal_lm.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(
                f"observations are {max_len} tokens long and the model reads at most {limit} positions; "
                "lower max_new_tokens or max_prompt_tokens"
            )
        if options is not None:
            model = _prepare(model, options)
        self.model, self.tokenizer, self.max_len, self.cache = model, tokenizer, max_len, cache
        self.options = options
        self.lora = is_peft_model(model)
        self.autocast = options is not None and options.autocast
        # Plain lists, not registered as submodules: the decoder layers that checkpoint (see train()).
        self._checkpointed = _checkpointed_layers(self.causal_lm)
        self._in_place: dict[str, nn.Parameter] | None = None  # in_place_gradients' weights, inside it
        self._cache_argument = cache_argument(self.causal_lm.base_model)  # asked once, not per call
        self.vocab_size = tokenizer.vocab_size
        self.cfg = None  # the architecture is the model's own (model.config)
        # float32 whatever the model's precision: it is trained, and it is tiny
        self.value_head = nn.Linear(head.in_features, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=next(model.parameters()).device)
        model_ids = torch.as_tensor(tokenizer.model_ids())
        self.register_buffer("model_ids", model_ids, persistent=False)
        # textgym ids from NUM_SPECIAL on are the LM head's first outputs in order (HFTokenizer's
        # layout): the head's logits then become textgym's by one contiguous copy, not a gather.
        self._hf_vocab = tokenizer.hf_vocab_size
        self._shifted = torch.equal(model_ids[NUM_SPECIAL:], torch.arange(self._hf_vocab))
        impossible = ~torch.as_tensor(make_action_mask(tokenizer).copy())
        self.register_buffer("impossible", impossible, persistent=False)
        self.register_buffer("impossible_ids", impossible.nonzero().squeeze(1), persistent=False)
        self._check_logits()
        self.train()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        tokenizer: HFTokenizer,
        max_len: int,
        cache: str = "kv",
        options: HFConfig | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> HFPolicy:
        """Load the causal LM saved in the local directory ``path`` (nothing is downloaded).

        :param options: how to load and train it (:class:`HFConfig`; default: float32, no LoRA).
        :param dtype: shorthand for ``options.dtype`` (``torch.bfloat16`` or ``"bfloat16"``); given,
            it replaces it.
        """
        transformers = require("transformers")
        path = _local_dir(path, "policy_model")
        options = options if options is not None else HFConfig()
        if dtype is not None:
            names = {v: k for k, v in DTYPES.items()}
            name = names.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
            if name not in DTYPES:
                raise ValueError(
                    f"dtype must be one of {sorted(DTYPES)} (or the torch dtypes), got {dtype!r}"
                )
            options = dataclasses.replace(options, dtype=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=options.torch_dtype
        )
        policy = cls(model, tokenizer, max_len, cache, options)
        value_head = path / "value_head.pt"
        if value_head.is_file():  # written by save_pretrained
            policy.value_head.load_state_dict(torch.load(value_head, map_location="cpu", weights_only=True))
        return policy

    @property
    def causal_lm(self) -> nn.Module:
        """The ``transformers`` causal LM (inside the ``PeftModel`` under LoRA)."""
        return self.model.get_base_model() if self.lora else self.model

    def train(self, mode: bool = True) -> HFPolicy:
        """Set the value head's mode; the model itself stays in eval mode, dropout off.

        PPO's probability ratio must be exactly 1 before the first optimizer step, and the
        rollout's log-probabilities come from the same network without dropout (as in TRL).
        transformers checkpoints a decoder layer only while that layer is in training mode, so
        with ``gradient_checkpointing`` the layers alone (not the attention and MLP modules inside
        them, which hold the dropout) follow ``mode``.
        """
        super().train(mode)
        self.model.eval()
        for layer in self._checkpointed:
            layer.training = mode
        return self

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.model_ids.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def in_place_gradients(self) -> Iterator[None]:
        """Inside, a backward pass adds every trained weight's gradient in place into its
        ``.grad``, where autograd would sum a weight's shares out of place first: the embedding
        that the LM head shares (SmolLM2, GPT-2), and every weight of the trunk under
        :meth:`hidden_shared_prefix`, which reads it once for the shared prompts and once for the
        rest. Each trunk pass runs on leaf stand-ins of the trained weights (their storage, no
        copy) whose gradients a hook adds into the weights' own, and the embedding's share is the
        rows it read (a sparse tensor), not a dense zero-filled (model vocabulary, width) tensor.
        The gradients are the same; autograd's sums would each take a fresh buffer of the weight's
        size, and fresh memory is slow on a CPU (one GRPO update of ``benchmark.py trl``'s on one
        core: see the README's TRL section).

        For the agents' updates, which call ``backward`` on losses that read the LM head: a hook
        on a weight sees only the LM head's share of its gradient, and ``torch.autograd.grad`` of
        a trunk weight sees none of it. The embedding's setting is restored on leaving."""
        if not torch.is_grad_enabled() or self._in_place is not None:
            yield
            return
        embedding = self.causal_lm.get_input_embeddings()
        tied = (
            isinstance(embedding, nn.Embedding)
            and embedding.weight is getattr(self.causal_lm.get_output_embeddings(), "weight", None)
            and embedding.weight.requires_grad
        )
        trained = {name: w for name, w in self.causal_lm.base_model.named_parameters() if w.requires_grad}
        before = embedding.sparse
        embedding.sparse = before or tied
        self._in_place = trained
        try:
            yield
        finally:
            embedding.sparse = before
            self._in_place = None

    def _check_logits(self) -> None:
        """Refuse models whose logits are not their LM head applied to the trunk's output."""
        ids = torch.tensor([[int(self.model_ids[1]), 0]], device=self.model_ids.device)  # (1, 2)
        self.model.eval()
        with torch.no_grad():
            mask = torch.ones_like(ids)
            full = self.model(input_ids=ids, attention_mask=mask).logits.float()
            trunk = self.causal_lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            mine = self.causal_lm.get_output_embeddings()(trunk).float()
        tol = 1e-4 if full.dtype == torch.float32 and trunk.dtype == torch.float32 else 2e-2
        if full.shape != mine.shape or not torch.allclose(full, mine, atol=tol, rtol=tol):
            raise ValueError(
                f"{type(self.causal_lm).__name__} transforms its logits after the LM head (scaling or soft-capping); "
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
        trunk = self.causal_lm.base_model
        kwargs = {
            "input_ids": self.model_ids[input_ids],
            "attention_mask": attention_mask,
            "position_ids": positions,
            "use_cache": past is not None,
            self._cache_argument: past,
        }
        with self._autocast():
            if self._in_place is None or not torch.is_grad_enabled():
                return trunk(**kwargs)
            return torch.func.functional_call(
                trunk, _stand_ins(self._in_place), (), kwargs, tie_weights=False
            )

    def new_cache(self) -> Any:
        """An empty ``transformers`` ``DynamicCache`` for this model, for :meth:`trunk`'s ``past``."""
        return require("transformers").DynamicCache(config=self.causal_lm.config)

    def hidden_shared_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: int,
        shared: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor | None:
        """Final hidden states (B, T - prefix + 1, C) of columns ``[prefix - 1, T)``, as
        ``hidden(input_ids, attention_mask)[:, prefix - 1:]``, where rows share their first
        ``prefix`` columns: ``shared = (first, inverse)`` (:func:`~agents.policy.distinct_rows` of
        those columns). The prefix runs once per distinct row, its keys and values are handed to
        every row sharing it, and the rest of each row runs on them; gradients reach the prefix's
        weights through every row that read it. A group-relative update scores ``G`` completions
        of one prompt: each prompt's columns run once, not ``G`` times.

        None under activation checkpointing (``transformers`` turns the cache off in checkpointed
        layers): the caller then runs the whole pass."""
        if self._checkpointed:
            return None
        first, inverse = shared
        head_ids, head_mask = input_ids[first, :prefix], attention_mask[first, :prefix]  # (u, prefix)
        past = self.new_cache()
        head = self.trunk(
            head_ids, head_mask, real_positions(head_mask), past
        ).last_hidden_state  # (u, prefix, C)
        every_row = self.new_cache()
        for layer, cached in enumerate(past.layers):  # (u, kv heads, prefix, head size) -> (B, ...)
            every_row.update(cached.keys[inverse], cached.values[inverse], layer)
        positions = real_positions(attention_mask)[:, prefix:]  # (B, T - prefix)
        tail = self.trunk(input_ids[:, prefix:], attention_mask, positions, every_row).last_hidden_state
        return torch.cat([head[inverse, -1:], tail], 1)  # (B, T - prefix + 1, C)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (..., V) over textgym ids and values (...) from final hidden states (..., C),
        both float32: the log-probabilities and losses of PPO are computed in float32."""
        head = self.causal_lm.get_output_embeddings()
        with torch.autocast(self.model_ids.device.type, enabled=False):
            model_logits = head(hidden.to(head.weight.dtype))  # (..., model vocabulary)
            if self._shifted:
                specials = model_logits.index_select(-1, self.model_ids[:NUM_SPECIAL])  # (..., 4)
                logits = torch.cat([specials, model_logits[..., : self._hf_vocab]], -1)  # (..., V)
            else:
                logits = model_logits.index_select(-1, self.model_ids)  # (..., V)
            logits = logits.float()
            values = self.value_head(hidden.float()).squeeze(-1)
        # in place on a fresh tensor, a few columns: no pass over the whole (..., V) as masked_fill
        return logits.index_fill_(-1, self.impossible_ids, torch.finfo(logits.dtype).min), values

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) at every column, as :class:`TransformerPolicy`."""
        return self.heads(self.hidden(input_ids, attention_mask))

    def make_cache(self, num_envs: int, device: torch.device | str) -> HFKVCache | RecomputeCache:
        """What acting runs through: :class:`HFKVCache` or :class:`RecomputeCache`."""
        return HFKVCache(self, num_envs, device) if self.cache == "kv" else RecomputeCache(self)

    # ------------------------------------------------------------------------------------ LoRA
    def adapters_disabled(self) -> AdaptersDisabled:
        """This policy with its LoRA adapters switched off: the model it started from, sharing
        its weights (the KL reference under LoRA)."""
        if not self.lora:
            raise ValueError("the policy has no LoRA adapters to switch off (HFConfig.lora_rank)")
        return AdaptersDisabled(self)

    def trained_names(self) -> set[str]:
        """Names (in ``state_dict``) of the parameters that training changes."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a PPO checkpoint holds: every weight, or under LoRA only the trained ones (the
        adapters and the value head); the frozen base model is read again from its directory."""
        state = self.state_dict()
        if not self.lora:
            return state
        trained = self.trained_names()
        return {k: v for k, v in state.items() if k in trained}

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; under LoRA every trained weight must be in ``state``."""
        if not self.lora:
            self.load_state_dict(state)
            return
        missing, unexpected = self.load_state_dict(state, strict=False)
        lacking = sorted(self.trained_names() & set(missing))
        if unexpected or lacking:
            raise ValueError(
                "the checkpoint does not hold this policy's LoRA adapters: "
                + (f"{len(lacking)} trained weights missing, e.g. {lacking[0]!r}" if lacking else "")
                + ("; " if lacking and unexpected else "")
                + (f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]!r}" if unexpected else "")
            )

    def frozen_digest(self) -> str | None:
        """SHA-256 of the frozen weights (the base model under LoRA), to check that a checkpoint
        holding only adapters meets the base model it was trained on; None without LoRA."""
        if not self.lora:
            return None
        digest = hashlib.sha256()
        for name, p in self.named_parameters():
            if not p.requires_grad:
                digest.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
                digest.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        return digest.hexdigest()

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write the model in the transformers format, with ``value_head.pt`` and the tokenizer
        (when it was loaded through ``transformers``), into ``path``. Under LoRA the adapters are
        merged into a copy of the weights first (the policy keeps its own), so the directory is a
        plain causal LM that ``from_pretrained`` and PPO read.

        The directory appears whole or not at all: it is written beside ``path`` and renamed.
        An existing directory is replaced only once the new one is complete.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            if self.lora:
                # merge_and_unload changes the model it merges: merge a copy.
                copy.deepcopy(self.model).merge_and_unload().save_pretrained(tmp)
            else:
                self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)  # with its textgym.json (special-token choice)
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


class AdaptersDisabled:
    """An :class:`HFPolicy` with its LoRA adapters switched off, for the KL reference: the base
    model the policy started from, computed by the policy's own modules (no copy of any weight).

    It has the acting interface of a policy (``make_cache``, ``hidden``, ``heads``, a forward call);
    each call switches the adapters off and back on when it ends, once per cache step. It flips the
    flag that peft's LoRA layers read (``BaseTunerLayer.disable_adapters``) on a list of the layers
    made once: ``PeftModel.disable_adapter()`` walks every module and checks the model's status on
    every call, 30 ms on a SmolLM2-sized model with adapters on every linear layer, per step.
    """

    training = False

    def __init__(self, policy: HFPolicy):
        tuner_layer = importlib.import_module("peft.tuners.tuners_utils").BaseTunerLayer
        self.policy = policy
        self.model, self.tokenizer, self.cache = policy.model, policy.tokenizer, policy.cache
        self.vocab_size, self.max_len = policy.vocab_size, policy.max_len
        self._layers = [m for m in policy.model.modules() if isinstance(m, tuner_layer)]

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The block runs without adapters; they are as before afterwards, even on an error."""
        before = [layer._disable_adapters for layer in self._layers]
        for layer in self._layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(self._layers, before, strict=True):
                layer._disable_adapters = flag

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.off():
            return self.policy.hidden(input_ids, attention_mask)

    def hidden_shared_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: int,
        shared: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor | None:
        with self.off():
            return self.policy.hidden_shared_prefix(input_ids, attention_mask, prefix, shared)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.off():  # an LM head can have an adapter too
            return self.policy.heads(hidden)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.off():
            return self.policy(input_ids, attention_mask)

    def make_cache(self, num_envs: int, device: torch.device | str) -> _CacheWithoutAdapters:
        """The policy's own kind of cache, each of its calls run without the adapters."""
        return _CacheWithoutAdapters(self.policy.make_cache(num_envs, device), self)

    def train(self, mode: bool = True) -> AdaptersDisabled:
        """Nothing to set: it is never trained (``eval``/``train`` exist for callers of policies)."""
        return self

    def eval(self) -> AdaptersDisabled:
        return self


class _CacheWithoutAdapters:
    """A cache of the policy (:class:`HFKVCache` or :class:`RecomputeCache`) whose every call runs
    with the adapters switched off: the keys and values it keeps are the base model's."""

    def __init__(self, cache: HFKVCache | RecomputeCache, view: AdaptersDisabled):
        self.inner, self.view = cache, view

    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.view.off():
            return self.inner.rebuild(input_ids, attention_mask)

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_window: int,
        host: HostView | Lengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.view.off():
            return self.inner.step(input_ids, attention_mask, prompt_window, host)

    def reorder(self, rows: torch.Tensor) -> None:
        self.inner.reorder(rows)


def _stand_ins(weights: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """A leaf tensor on each weight's storage, whose gradient is added into the weight's own
    ``.grad`` in place as soon as autograd has it (:meth:`HFPolicy.in_place_gradients`)."""
    stand_ins = {}
    for name, weight in weights.items():
        leaf = weight.detach().requires_grad_()
        leaf.register_post_accumulate_grad_hook(functools.partial(_add_into, weight))
        stand_ins[name] = leaf
    return stand_ins


def _add_into(weight: nn.Parameter, leaf: torch.Tensor) -> None:
    """Hook of :func:`_stand_ins`: move ``leaf``'s gradient into ``weight``'s, in place."""
    grad, leaf.grad = leaf.grad, None
    if weight.grad is not None:
        weight.grad.add_(grad)  # a dense gradient, plus a dense or a sparse one
    elif grad.layout == torch.strided and grad.stride() == weight.stride():
        weight.grad = grad
    else:  # the weight's layout, as autograd gives it
        weight.grad = torch.zeros_like(weight).add_(grad)


def _prepare(model: nn.Module, options: HFConfig) -> nn.Module:
    """``model`` cast to ``options.dtype``, with activation checkpointing and LoRA adapters as asked."""
    if is_peft_model(model):
        if options.lora:
            raise ValueError(
                "the model already has peft adapters: give HFConfig.lora_rank=None to train them"
            )
        dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
        if dtypes - {options.torch_dtype}:
            raise ValueError(
                f"the PeftModel's frozen weights are {sorted(map(str, dtypes))}, HFConfig.dtype is {options.dtype!r}: "
                "cast the base model before adding adapters"
            )
        causal_lm = model.get_base_model()
    else:
        if any(p.dtype != options.torch_dtype for p in model.parameters() if p.is_floating_point()):
            # only then: .to() would also cast buffers that transformers keeps in float32 (RoPE's)
            model = model.to(options.torch_dtype)
        causal_lm = model
    if options.gradient_checkpointing:
        if not getattr(causal_lm, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"HFConfig.gradient_checkpointing: {type(causal_lm).__name__} does not support activation checkpointing"
            )
        # Non-reentrant checkpointing: gradients reach the adapters although the embeddings are frozen.
        kwargs = {"use_reentrant": False}
        if hasattr(causal_lm, "activation_checkpointing_enable"):  # the name since transformers 5.x
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not _checkpointed_layers(causal_lm):
            raise ValueError(
                f"HFConfig.gradient_checkpointing: {type(causal_lm).__name__} has no checkpointable decoder layers"
            )
    if options.lora:
        peft = require_peft()
        conv1d = require("transformers.pytorch_utils").Conv1D
        config = peft.LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(options.lora_target_modules)
            if isinstance(options.lora_target_modules, tuple)
            else options.lora_target_modules,
            # GPT-2's projections are Conv1D, whose weights are stored transposed
            fan_in_fan_out=any(isinstance(m, conv1d) for m in model.modules()),
            bias="none",
        )
        with warnings.catch_warnings():
            # peft asks transformers for a deprecated attribute name (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = peft.get_peft_model(model, config)
    return model


def _checkpointed_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The decoder layers with activation checkpointing switched on."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without the class
        return []
    return [
        m
        for m in causal_lm.modules()
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)
    ]


class HFKVCache(RowCache):
    """Per-env keys and values of every layer, one slot per observation column, as
    :class:`agents.policy.KVCache` keeps them, fed to the model as a ``transformers`` cache.

    The slots run from column 0 to the rightmost column any row has reached (not to the end of
    the observation): a rebuild keeps the keys and values the model computed over the observations
    up to their last real column, and a decoding step (:class:`_Slots`) hands the model the
    filled columns ``[0, W)`` of every row, stale ones masked out by the observation's own mask.
    Each row's new key and value go into its own column: in place, or, when a row reaches a new
    rightmost column, by appending that column, as ``transformers``' own cache appends its one
    token per step. Generation thus costs what ``model.generate`` costs per step, and a PPO
    rollout, whose rows soon span the whole observation, writes in place with no copy at all.
    (On a CPU, attending to keys just appended is faster than to keys written in place one
    step earlier, which have left the processor's caches: 3% of a SmolLM2 decoding step.)
    """

    def __init__(self, policy: HFPolicy, num_envs: int, device: torch.device | str):
        self.policy, self.num_envs, self.device = policy, num_envs, torch.device(device)
        # per layer (N, kv heads, W, head size), in the dtype the model computes keys in
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def reorder(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    @torch.no_grad()
    def rebuild(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refill every row from full observations (N, L); logits (N, V) and values (N,) at each
        row's last real token."""
        last = last_real_column(attention_mask)  # (N,)
        W = int(last.max()) + 1  # the columns after every row's last real token hold nothing
        ids, mask = input_ids[:, :W], attention_mask[:, :W]
        distinct = distinct_rows(ids, mask)
        if distinct is not None:  # each distinct row once (the rows of a group share a prompt)
            first, inverse = distinct
            ids, mask, last = ids[first], mask[first], last[first]
        past = self.policy.new_cache()
        out = self.policy.trunk(ids, mask, real_positions(mask), past)
        self.keys = [layer.keys for layer in past.layers]  # (u, kv heads, W, head size) each
        self.values = [layer.values for layer in past.layers]
        logits, values = self.policy.heads(
            out.last_hidden_state[torch.arange(len(ids), device=ids.device), last]
        )
        if distinct is None:
            return logits, values
        self.reorder(inverse)  # (N, kv heads, W, head size): every row its distinct row's copy
        return logits[inverse], values[inverse]

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_window: int,
        host: HostView | Lengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`agents.policy.RowCache.step`; the first call fills every row."""
        if not self.keys:
            return self.rebuild(input_ids, attention_mask)
        return super().step(input_ids, attention_mask, prompt_window, host)

    def _prefill(
        self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
    ) -> None:
        mask = attention_mask[rows, :width]
        past = self.policy.new_cache()
        self.policy.trunk(input_ids[rows, :width], mask, real_positions(mask), past)
        for layer, cached in enumerate(past.layers):  # the slots reach column P - 1 at least
            self.keys[layer][rows, :, :width] = cached.keys
            self.values[layer][rows, :, :width] = cached.values

    def _decode(
        self,
        col: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        span: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = torch.stack(torch.aminmax(col)).tolist() if span is None else span  # read if None
        past = _slot_cache(self, col, last + 1, aligned=first == last)
        newest = input_ids.gather(1, col.unsqueeze(1))  # (N, 1)
        positions = attention_mask.sum(1, keepdim=True) - 1  # (N, 1) real tokens before the newest
        out = self.policy.trunk(newest, attention_mask[:, : last + 1], positions, past)
        return self.policy.heads(out.last_hidden_state[:, -1])


@functools.cache
def _slots_class() -> type:
    """:class:`_Slots`, a ``transformers`` cache layer (defined on first use: transformers is an
    optional dependency of this module)."""
    CacheLayerMixin = require("transformers.cache_utils").CacheLayerMixin

    class _Slots(CacheLayerMixin):
        """One decoder layer of an :class:`HFKVCache` for one decoding step: ``update`` puts each
        row's new key and value (N, kv heads, 1, head size) into its column ``col[row]`` and
        returns the columns ``[0, width)`` of every row (``width = max(col) + 1``)."""

        is_sliding = False

        def __init__(self, cache: HFKVCache, layer: int, index: torch.Tensor, width: int, aligned: bool):
            super().__init__()
            self.cache, self.layer, self.index, self.width, self.aligned = cache, layer, index, width, aligned
            self.keys, self.values = cache.keys[layer], cache.values[layer]
            self.device, self.is_initialized = self.keys.device, True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Nothing to allocate: the slots exist before the first update."""

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys = self._write(self.keys, key_states)
            self.values = self._write(self.values, value_states)
            self.cache.keys[self.layer], self.cache.values[self.layer] = self.keys, self.values
            return self.keys[:, :, : self.width], self.values[:, :, : self.width]

        def _write(self, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            have = slots.shape[2]
            if have < self.width:  # a row reached a new rightmost column: append it
                gap = slots.new_zeros(*slots.shape[:2], self.width - 1 - have, slots.shape[3])
                slots = torch.cat([slots, gap, new] if gap.shape[2] else [slots, new], 2)
                if self.aligned:  # every row's newest token is in that column: written
                    return slots
            return slots.scatter_(2, self.index.expand_as(new), new)

        def get_seq_length(self) -> int:
            return self.width - 1  # the query comes after every other slot it may attend to

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.width, 0

        def get_max_length(self) -> int:
            return -1

    return _Slots


def _slot_cache(cache: HFKVCache, col: torch.Tensor, width: int, aligned: bool) -> Any:
    """A ``transformers.Cache`` over ``cache``'s slots for one decoding step: each row's new key
    and value go into its column ``col`` (N,) and attention runs over columns ``[0, width)``,
    masked by the observation's own mask (stale slots of earlier episodes are 0 there).
    ``aligned``: every row's newest token is in the same column."""
    layer_class = _slots_class()
    index = col.view(-1, 1, 1, 1)  # (N, 1, 1, 1), expanded to (N, kv heads, 1, head size)
    layers = [layer_class(cache, i, index, width, aligned) for i in range(len(cache.keys))]
    return require("transformers.cache_utils").Cache(layers=layers)


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
