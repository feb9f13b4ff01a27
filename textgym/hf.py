"""Hugging Face models on the environment's side: tokenizers and sequence classifiers (``textgym[hf]``).

Both load from files already on disk; nothing is downloaded (``local_files_only=True``).

:class:`HFTokenizer` makes a ``tokenizers``/``transformers`` tokenizer the env's tokenizer::

    env = gym.make("TextGen-v0", task="sentiment", tokenizer="path/to/model_dir")      # or .../tokenizer.json

Every textgym tokenizer keeps ``<pad> <bos> <eos> <unk>`` at ids 0–3 (:mod:`textgym.tokenizers`),
so the env never has to ask which tokenizer it runs. The adapter therefore shifts the Hugging Face
vocabulary up by four, **id = 4 + Hugging Face id**, and lets ids 0–3 stand for the Hugging Face
tokenizer's own pad, bos, eos and unk tokens. The shifted copies of Hugging Face's special tokens
(``4 + eos_token_id``, ...) stay in the action space but out of the default action mask
(:meth:`HFTokenizer.reserved_ids`), so an agent ends an episode with ``<eos>`` = id 2.
:meth:`HFTokenizer.model_ids` is the table a Hugging Face model reads textgym ids through.

Which Hugging Face tokens ids 0–3 stand for is a property of the model family, not only of its
tokenizer files: SmolLM2's tokenizer declares the chat token ``<|im_start|>`` as its bos, while
the model learned to start and end documents with ``<|endoftext|>``. A model folder can say so in
a ``textgym.json`` beside its tokenizer (:data:`MAPPING_FILE`, written by
:func:`textgym.models.get_model` and :meth:`HFTokenizer.save_pretrained`)::

    {"special_tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": null},
     "chat_special_tokens": {"eos_token": "<|im_end|>"}}

``special_tokens`` replace what the tokenizer declares (``null``: none); ``chat_special_tokens``
apply on top of them for prompts rendered with the chat template (``HFTokenizer(..., chat=True)``,
the env's ``chat_template=True``), where a reply ends with the end-of-turn token. Arguments given
to :class:`HFTokenizer` win over both; a folder without the file keeps the declared tokens.

:class:`HFClassifierReward` makes an ``AutoModelForSequenceClassification`` a batched reward model::

    env = gym.make("TextGen-v0", task="sentiment",
                   reward={"name": "hf-classifier", "path": "path/to/classifier", "label": "POSITIVE"})
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from textgym.checks import is_positive_int
from textgym.rewards import RewardModel
from textgym.tokenizers import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer, _rows

SPECIAL_ROLES = ("pad", "bos", "eos", "unk")  # in the order of textgym's ids 0–3
MAPPING_FILE = "textgym.json"
"""A model folder's choice of special tokens, beside its tokenizer (see the module)."""
MAPPING_SECTIONS = ("special_tokens", "chat_special_tokens")


def require(module: str) -> Any:
    """Import ``module`` of the optional ``hf`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"the Hugging Face adapters need the optional extra (missing: {module}): pip install 'textgym[hf]'"
        ) from None


def _local_dir(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: no directory at {str(path)!r}; give a local directory written by save_pretrained "
            "(nothing is downloaded)"
        )
    return path


def read_token_mapping(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``textgym.json`` in ``folder`` (checked), or ``{}`` when there is none."""
    path = Path(folder) / MAPPING_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    for section in MAPPING_SECTIONS:
        _check_roles(data.get(section, {}), f"{str(path)!r}: {section}")
    return data


def write_token_mapping(
    folder: str | os.PathLike[str],
    special_tokens: dict[str, str | None],
    chat_special_tokens: dict[str, str | None] | None = None,
    **extra: Any,
) -> Path:
    """Write ``folder/textgym.json``: the special tokens ids 0–3 stand for (keys ``pad_token``,
    ``bos_token``, ``eos_token``, ``unk_token``; ``None`` for none), those of chat prompts, and any
    ``extra`` JSON fields (where the model came from, say). Returns the file's path."""
    from textgym.io import write_json

    data: dict[str, Any] = {"special_tokens": dict(special_tokens)}
    if chat_special_tokens:
        data["chat_special_tokens"] = dict(chat_special_tokens)
    for section in MAPPING_SECTIONS:
        _check_roles(data.get(section, {}), section)
    return write_json(Path(folder) / MAPPING_FILE, {**data, **extra})


def _check_roles(tokens: Any, where: str) -> None:
    keys = [f"{role}_token" for role in SPECIAL_ROLES]
    if not isinstance(tokens, dict):
        raise ValueError(f"{where} must be an object with keys among {keys}, got {tokens!r}")
    for key, token in tokens.items():
        if key not in keys:
            raise ValueError(f"{where}: unknown key {key!r}; accepted: {keys}")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{where}: {key} must be a token string or null, got {token!r}")


def _token_string(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return getattr(value, "content", None)  # an AddedToken


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer behind textgym's interface (ids shifted by four, see the module).

    :param tokenizer: a local directory holding a tokenizer saved by ``save_pretrained`` (read with
        ``transformers.AutoTokenizer``), a ``tokenizer.json`` file (read with ``tokenizers``), or a
        loaded ``tokenizers.Tokenizer`` or fast ``transformers`` tokenizer.
    :param pad_token, bos_token, eos_token, unk_token: override the special tokens the tokenizer
        declares (a ``tokenizer.json`` declares only its model's unk token) and those of the
        folder's ``textgym.json``. Each must be in the vocabulary. A missing one leaves its textgym
        id without a Hugging Face counterpart: ``<eos>`` still ends episodes, and a model reads it
        as id 0.
    :param chat: use the folder's tokens for chat prompts (``chat_special_tokens`` of its
        ``textgym.json``), for prompts rendered with :meth:`render_chat`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        chat: bool = False,
    ) -> None:
        tokenizers = require("tokenizers")
        if not isinstance(chat, bool):
            raise TypeError(f"chat must be True or False, got {chat!r}")
        self.source: str | None = None
        self.hf_tokenizer: Any = None  # the transformers tokenizer, when there is one
        self.chat = chat
        self._mapping: dict[str, Any] = {}  # the folder's textgym.json
        declared: dict[str, str | None] = dict.fromkeys(SPECIAL_ROLES)
        if isinstance(tokenizer, str | os.PathLike):
            self.source = str(tokenizer)
            path = Path(tokenizer)
            if path.is_file():
                self._mapping = read_token_mapping(path.parent)
                tokenizer = tokenizers.Tokenizer.from_file(str(path))
            elif path.is_dir():
                self._mapping = read_token_mapping(path)
                transformers = require("transformers")
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                raise FileNotFoundError(
                    f"tokenizer: no file or directory at {str(path)!r}; give a local tokenizer.json or a "
                    "directory written by save_pretrained (nothing is downloaded)"
                )
        if isinstance(tokenizer, tokenizers.Tokenizer):
            backend = tokenizer
            declared["unk"] = getattr(backend.model, "unk_token", None)
        elif isinstance(getattr(tokenizer, "backend_tokenizer", None), tokenizers.Tokenizer):
            backend = tokenizer.backend_tokenizer  # a fast transformers tokenizer
            self.hf_tokenizer = tokenizer
            for role in SPECIAL_ROLES:
                declared[role] = _token_string(getattr(tokenizer, f"{role}_token", None))
        else:
            raise TypeError(
                "tokenizer must be a path, a tokenizers.Tokenizer or a fast transformers tokenizer, got "
                f"{type(tokenizer).__name__}"
            )
        given = {"pad": pad_token, "bos": bos_token, "eos": eos_token, "unk": unk_token}
        self._given = {role: token for role, token in given.items() if token is not None}
        chosen = dict(declared)
        for section in MAPPING_SECTIONS if chat else MAPPING_SECTIONS[:1]:
            for key, token in self._mapping.get(section, {}).items():
                chosen[key.removesuffix("_token")] = token
        self._backend = backend
        self.special_tokens: dict[str, str | None] = {
            role: given[role] if given[role] is not None else chosen[role] for role in SPECIAL_ROLES
        }
        self.hf_special_ids: dict[str, int | None] = {}
        for role, token in self.special_tokens.items():
            hf_id = None if token is None else backend.token_to_id(token)
            if token is not None and hf_id is None:
                where = "" if role in self._given else f" (from {MAPPING_FILE} in {self.source!r})"
                raise ValueError(f"{role}_token {token!r}{where} is not in the tokenizer's vocabulary")
            self.hf_special_ids[role] = hf_id
        self.hf_vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        specials = {i for i, tok in added.items() if tok.special}
        specials |= {i for i in self.hf_special_ids.values() if i is not None}
        self._hf_specials = tuple(sorted(specials))

        # What each textgym id decodes as: a Hugging Face id, or -1 for nothing.
        decode = np.arange(self.vocab_size, dtype=np.int64) - NUM_SPECIAL
        decode[[PAD_ID, BOS_ID, EOS_ID]] = -1
        unk = self.hf_special_ids["unk"]
        decode[UNK_ID] = -1 if unk is None else unk
        decode[[NUM_SPECIAL + i for i in self._hf_specials]] = -1
        self._decode_table = decode
        self._digest = hashlib.sha256(backend.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.hf_vocab_size

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        unk = self.hf_special_ids["unk"]
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [UNK_ID if i == unk else i + NUM_SPECIAL for i in ids]

    def decode_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        ids = self._check_ids(ids)
        rows = [[i for i in self._decode_table[row].tolist() if i >= 0] for row in _rows(ids, lengths)]
        return self._backend.decode_batch(rows, skip_special_tokens=False) if rows else []

    def id_to_token(self, token_id: int) -> str:
        if token_id < NUM_SPECIAL:
            return SPECIAL_TOKENS[token_id]
        token = self._backend.id_to_token(token_id - NUM_SPECIAL)
        return f"<hf {token_id - NUM_SPECIAL}>" if token is None else token

    def reserved_ids(self) -> tuple[int, ...]:
        """``<pad> <bos> <unk>`` and the shifted copies of every Hugging Face special token."""
        return (*super().reserved_ids(), *(NUM_SPECIAL + i for i in self._hf_specials))

    def model_ids(self, fallback: int = 0) -> np.ndarray:
        """(vocab_size,) the Hugging Face id a model reads for each textgym id.

        Ids 0–3 become the Hugging Face pad, bos, eos and unk tokens; a ``<bos>`` without one reads
        as the eos token (GPT-2's convention), and any other missing one as ``fallback``.
        """
        table = np.arange(self.vocab_size, dtype=np.int64) - NUM_SPECIAL
        hf = self.hf_special_ids
        bos = hf["bos"] if hf["bos"] is not None else hf["eos"]
        for our_id, hf_id in ((PAD_ID, hf["pad"]), (BOS_ID, bos), (EOS_ID, hf["eos"]), (UNK_ID, hf["unk"])):
            table[our_id] = fallback if hf_id is None else hf_id
        return table

    @property
    def chat_template(self) -> str | None:
        """The Hugging Face tokenizer's chat template (a Jinja string), or None."""
        template = getattr(self.hf_tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def render_chat(self, prompt: str) -> str:
        """``prompt`` as a user message in the chat template, with the assistant's turn opened.

        A template that opens with this tokenizer's bos token loses it: the env starts every
        prompt with ``<bos>``, which stands for that token already.
        """
        if self.chat_template is None:
            what = "a bare tokenizer.json" if self.hf_tokenizer is None else "this tokenizer"
            raise ValueError(
                f"chat_template=True needs a tokenizer with a chat template, and {what} "
                f"({self.source or 'given as an object'}) has none; give the directory of a chat model"
            )
        text = self.hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        bos = self.special_tokens["bos"]
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer into the directory ``path``, with its ``textgym.json`` when it has one,
        so that ``HFTokenizer(path, chat=self.chat)`` gives this tokenizer back.

        Arguments given to this tokenizer are written into the section it uses (``chat_special_tokens``
        when ``chat``); the folder's other section is kept as it was.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.hf_tokenizer is not None:
            self.hf_tokenizer.save_pretrained(str(path))
        else:
            self._backend.save(str(path / "tokenizer.json"))
        sections = {name: dict(self._mapping.get(name, {})) for name in MAPPING_SECTIONS}
        used = MAPPING_SECTIONS[1] if self.chat else MAPPING_SECTIONS[0]
        sections[used].update({f"{role}_token": token for role, token in self._given.items()})
        if any(sections.values()):
            write_token_mapping(path, sections[MAPPING_SECTIONS[0]], sections[MAPPING_SECTIONS[1]])
        elif (path / MAPPING_FILE).is_file():
            (path / MAPPING_FILE).unlink()  # a stale one would change the tokens read back
        return path

    def _identity(self) -> tuple[object, ...]:
        return (self._digest, tuple(self.hf_special_ids.items()))

    def __repr__(self) -> str:
        where = f"{self.source!r}, " if self.source else ""
        return f"HFTokenizer({where}vocab_size={self.vocab_size})"


def join_text(prompt: str, completion: str) -> str:
    """``prompt`` and ``completion`` as one text, with a space between them unless one is there."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return prompt + completion
    return f"{prompt} {completion}"


class HFClassifierReward(RewardModel):
    """A ``transformers`` sequence classifier as a batched reward model.

    The reward of a completion is the classifier's score of ``prompt + completion`` (or of the
    completion alone with ``text="completion"``): the probability of ``label`` (softmax over the
    labels; a sigmoid for a one-label regression head) or its raw logit.

    :param path: local directory holding the classifier and its tokenizer (``save_pretrained``).
    :param label: which output scores: an index or a name of ``config.id2label``; may be left out
        when the head has one output.
    :param output: ``"probability"`` or ``"logit"``.
    :param text: ``"prompt+completion"`` or ``"completion"``.
    :param device: where the classifier runs.
    :param batch_size: texts per forward pass.
    :param max_length: longer texts are cut to this many tokens (default: the tokenizer's limit).

    An empty text (the agent's first action was ``<eos>``) is scored as one token, the tokenizer's
    bos (or eos, cls, unk) token, the same alone as in any batch.
    """

    name = "hf-classifier"

    def __init__(
        self,
        path: str | os.PathLike[str],
        label: int | str | None = None,
        output: str = "probability",
        text: str = "prompt+completion",
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
    ):
        transformers = require("transformers")
        import torch

        if output not in ("probability", "logit"):
            raise ValueError(f"output must be 'probability' or 'logit', got {output!r}")
        if text not in ("prompt+completion", "completion"):
            raise ValueError(f"text must be 'prompt+completion' or 'completion', got {text!r}")
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_length is not None and not is_positive_int(max_length):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.path = str(_local_dir(path, "hf-classifier reward"))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, dtype=torch.float32
        )
        self.model.eval().requires_grad_(False).to(device)
        if self.tokenizer.pad_token is None:  # GPT-2 style: pad with eos, which the model then skips
            fill = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fill is None:
                raise ValueError(
                    f"{self.path!r}: the tokenizer has no pad, eos or unk token to pad batches with"
                )
            self.tokenizer.pad_token = fill
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        tok = self.tokenizer
        empty = next(
            (
                t
                for t in (tok.bos_token_id, tok.eos_token_id, tok.cls_token_id, tok.unk_token_id)
                if t is not None
            ),
            None,
        )
        self._empty_id = tok.pad_token_id if empty is None else empty
        self.label = self._resolve_label(label)
        self.output, self.text, self.batch_size = output, text, batch_size
        self.max_length, self.device = max_length, device

    def _resolve_label(self, label: int | str | None) -> int:
        config = self.model.config
        n = config.num_labels
        names = {int(i): name for i, name in config.id2label.items()}
        if label is None:
            if n == 1:
                return 0
            raise ValueError(
                f"the classifier at {self.path!r} has {n} outputs {names}; choose one with label=<index or name>"
            )
        if isinstance(label, str):
            by_name = {name: i for i, name in names.items()}
            if label not in by_name:
                raise ValueError(f"label {label!r} is not one of the classifier's labels {names}")
            return by_name[label]
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n:
            return label
        raise ValueError(
            f"label must be an index in [0, {n}) or one of {list(names.values())}, got {label!r}"
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        import torch

        if self.text == "completion":
            texts = list(completions)
        else:
            texts = [join_text(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            self._fill_empty(batch)
            batch = batch.to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()  # (B, num_labels)
            if self.output == "logit":
                scores = logits[:, self.label]
            elif logits.shape[1] == 1:
                scores = logits[:, 0].sigmoid()
            else:
                scores = logits.softmax(-1)[:, self.label]
            out[start : start + len(scores)] = scores.cpu().numpy()
        return out

    def _fill_empty(self, batch: Any) -> None:
        """Give rows without a token (empty texts) one placeholder token, in place."""
        import torch

        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
        empty = mask.sum(1) == 0
        if not bool(empty.any()):
            return
        if ids.shape[1] == 0:
            ids = torch.full((len(ids), 1), self.tokenizer.pad_token_id, dtype=ids.dtype)
            mask = torch.zeros((len(ids), 1), dtype=mask.dtype)
        col = -1 if self.tokenizer.padding_side == "left" else 0
        ids[empty, col], mask[empty, col] = self._empty_id, 1
        batch["input_ids"], batch["attention_mask"] = ids, mask
        for key in set(batch) - {"input_ids", "attention_mask"}:
            del batch[key]  # e.g. token_type_ids, whose width no longer matches

    def __repr__(self) -> str:
        return f"HFClassifierReward({self.path!r}, label={self.label}, output={self.output!r})"


def train_bpe_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 512,
    end_token: str = "<|endoftext|>",
) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a fast ``transformers`` tokenizer.

    It covers every byte, so any text encodes without ``unk``, and declares ``end_token`` as its
    bos, eos and pad token (GPT-2's layout). ``save_pretrained(path)`` writes it for
    ``HFTokenizer(path)``; used by the tests and the README, offline.
    """
    tokenizers = require("tokenizers")
    transformers = require("transformers")
    if not is_positive_int(vocab_size) or vocab_size <= 257:
        raise ValueError(
            f"vocab_size must be an integer above 257 (256 bytes and {end_token}), got {vocab_size!r}"
        )
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = byte_level
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[end_token], initial_alphabet=byte_level.alphabet()
    )
    backend.train_from_iterator(list(texts), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=end_token, eos_token=end_token, pad_token=end_token
    )
