"""Tasks bundle a tokenizer, prompts, a reward model and lengths; ``task=`` picks one.

===============  ====================================================  =========  =================
task             what the agent does                                   tokenizer  reward
===============  ====================================================  =========  =================
``sentiment``    continues the opening of a short review               word       lexicon sentiment
``arithmetic``   answers ``"a+b="`` for operands below 20              char       exact match
``arithmetic2``  answers ``"a+b="`` for operands below 100             char       exact match
``keyword``      continues a story, rewarded for "happy friend home"   word       keyword fraction
``reviews``      continues a natural review opening ("The movie was")  byte       VADER sentiment
``translate``    translates a sentence into a synthetic language       word       chrF (sacrebleu)
===============  ====================================================  =========  =================

``default`` is ``sentiment``: its reward is dense enough that learning shows within a few
thousand episodes. Any part of a task can be overridden through the environment's keyword
arguments (:func:`make_env_config`).

Every task's prompts are split once, by a seeded draw, into ``"train"`` (80%) and ``"test"``
(20%) (:func:`held_out`); ``split=`` picks ``"train"``, ``"test"`` or ``"all"``. Left at None
it is the task's ``default_split``: ``"train"`` for ``reviews``, ``arithmetic2`` and ``translate``,
``"all"`` for the older tasks, whose prompt sets stay what they were. Both arithmetic tasks hold
out operand pairs (``3+4=`` and ``4+3=`` fall on the same side), and their corpora, which hold the
answers, leave the test equations out; so does ``translate``'s corpus its test sentences.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from textgym import corpora, translation
from textgym.checks import as_int, describe, is_finite_real, is_positive_int, short_repr
from textgym.rewards import (
    ExactMatchReward,
    KeywordReward,
    RewardFn,
    RewardModel,
    SentimentReward,
    TokenRewardModel,
    TranslationReward,
    VaderReward,
    arithmetic_answer,
    as_reward_model,
)
from textgym.tokenizers import BOS_ID, EOS_ID, TOKENIZER_NAMES, UNK_ID, Tokenizer, make_tokenizer


@dataclass(frozen=True)
class Task:
    """A built-in task: what a default ``gym.make("TextGen-v0", task=name)`` runs."""

    name: str
    description: str
    tokenizer_kind: str  #: "byte", "char" or "word"; char/word vocabularies come from corpus + prompts
    prompts: tuple[str, ...]
    corpus: tuple[str, ...]  #: in-domain text: the vocabulary's source, and pretraining data
    reward: Callable[[], RewardModel]
    max_new_tokens: int
    reward_threshold: float
    """Mean episode reward that counts as solving the task (as Gymnasium's ``EnvSpec.reward_threshold``);
    the comparison reports the env steps each agent needs to reach it."""
    test_indices: tuple[int, ...] = ()
    """Indices into ``prompts`` of the held-out ``"test"`` split (see :func:`held_out`); the
    others are ``"train"``."""
    default_split: str = "all"
    """The split an env gets when ``split=None``."""

    def split_prompts(self, split: str) -> tuple[str, ...]:
        """The prompts of ``split`` (``"train"``, ``"test"`` or ``"all"``), in the order of ``prompts``."""
        return tuple(self.prompts[i] for i in self.split_indices(split))

    def split_indices(self, split: str) -> tuple[int, ...]:
        """Indices into ``prompts`` of ``split``'s prompts, ascending."""
        if split not in SPLITS:
            raise ValueError(
                f"split must be one of {', '.join(map(repr, SPLITS))}, or None for the task's default "
                f"({self.default_split!r} for task {self.name!r}); got {describe(split)}"
            )
        if split == "all":
            return tuple(range(len(self.prompts)))
        test = set(self.test_indices)
        return tuple(i for i in range(len(self.prompts)) if (i in test) == (split == "test"))


SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2


def held_out(keys: Sequence[Hashable], fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[int, ...]:
    """Indices of the prompts held out for testing: ``round(fraction * k)`` of the ``k`` distinct
    ``keys``, drawn with ``seed``, and every prompt whose key is one of them.

    ``keys[i]`` names what prompt ``i`` asks: prompts with equal keys (``3+4=`` and ``4+3=``) fall
    on the same side, so the test split asks nothing the training split already answered. The draw
    depends only on the keys' order and the seed, so a split is the same on every machine; change
    it and results on ``"test"`` are no longer comparable with earlier ones.
    """
    distinct = list(dict.fromkeys(keys))  # in order of first appearance
    chosen = set(random.Random(seed).sample(distinct, round(fraction * len(distinct))))
    return tuple(i for i, key in enumerate(keys) if key in chosen)


def _sentiment() -> Task:
    prompts = tuple(corpora.review_prompts())
    return Task(
        name="sentiment",
        description="continue a short review; reward: lexicon sentiment of the continuation in (-1, 1)",
        tokenizer_kind="word",
        prompts=prompts,
        corpus=tuple(corpora.generate("reviews", 4000, seed=0)),
        reward=SentimentReward,
        max_new_tokens=8,
        reward_threshold=0.8,
        test_indices=held_out(prompts),
    )


def _addition(name: str, max_operand: int, default_split: str) -> Task:
    prompts = tuple(corpora.arithmetic_prompts(max_operand))
    # One key per unordered operand pair: "3+4=" and "4+3=" are held out together.
    test = held_out([tuple(sorted(map(int, re.findall(r"\d+", p)))) for p in prompts])
    held = set(test)
    return Task(
        name=name,
        description=(
            f"answer 'a+b=' (operands 0..{max_operand - 1}); reward: 1 for the exact answer then <eos>, else 0"
        ),
        tokenizer_kind="char",
        prompts=prompts,
        # The equations of the training prompts only: a model pretrained on this corpus has not
        # seen the answers of the test split (the vocabulary is unchanged: it includes the prompts).
        corpus=tuple(p + arithmetic_answer(p) for i, p in enumerate(prompts) if i not in held),
        reward=ExactMatchReward,
        max_new_tokens=4,
        reward_threshold=0.5,
        test_indices=test,
        default_split=default_split,
    )


def _arithmetic() -> Task:
    return _addition("arithmetic", 20, default_split="all")


def _arithmetic2() -> Task:
    # 10,000 prompts, answers of up to three digits, carries. A small Transformer needs a
    # few hundred supervised steps before it carries (scripts/arithmetic.py), so a short warm-up
    # leaves room for RL to learn on the training prompts what carries over to the held-out ones.
    return _addition("arithmetic2", 100, default_split="train")


def _keyword() -> Task:
    prompts = tuple(corpora.story_prompts())
    return Task(
        name="keyword",
        description="continue a story; reward: fraction of the words 'happy', 'friend', 'home' used",
        tokenizer_kind="word",
        prompts=prompts,
        corpus=tuple(corpora.generate("stories", 2000, seed=0)),
        reward=lambda: KeywordReward(["happy", "friend", "home"]),
        max_new_tokens=10,
        reward_threshold=0.6,
        test_indices=held_out(prompts),
    )


def _reviews() -> Task:
    prompts = tuple(corpora.review_openings())
    test = held_out(prompts)
    train = [p for i, p in enumerate(prompts) if i not in set(test)]
    return Task(
        name="reviews",
        description="continue a natural review opening ('The movie was'); reward: VADER compound in [-1, 1]",
        # Bytes: any text, no vocabulary to build and nothing to download; pass tokenizer=<model
        # folder> to use a real model's tokenizer instead.
        tokenizer_kind="byte",
        prompts=prompts,
        # Reviews that open with the training openings only, so that pretraining does not see the
        # test split's openings either.
        corpus=tuple(corpora.natural_reviews(4000, seed=0, openings=train)),
        # VADER reads natural text; the project's lexicon knows some 70 lowercase words. Not
        # installed, it fails with the extra to install rather than fall back silently to a
        # different reward (the same command would give other numbers on another machine).
        reward=VaderReward,
        max_new_tokens=24,
        reward_threshold=0.6,  # VADER gives " was great!" 0.66, " was great." 0.62
        test_indices=test,
        default_split="train",
    )


def _translate() -> Task:
    # 5,000 of the language pair's 174,960 sentences: enough that every word form occurs in the
    # training split, few enough that the held-out sentences are new combinations, not new words.
    sentences = translation.sentences(5000, seed=0)
    prompts = tuple(translation.prompt(s.source) for s in sentences)
    test = held_out(prompts)
    held = set(test)
    return Task(
        name="translate",
        description=(
            "translate a sentence into a synthetic language (word substitutions, adjective after the "
            "noun, verb last, number agreement); reward: chrF against the reference in [0, 1]"
        ),
        tokenizer_kind="word",
        prompts=prompts,
        # The training pairs only, as for arithmetic2: pretraining does not see the test translations.
        corpus=tuple(
            f"{p} {s.target}"
            for i, (p, s) in enumerate(zip(prompts, sentences, strict=True))
            if i not in held
        ),
        reward=TranslationReward,
        max_new_tokens=10,  # the longest translation is 8 words with its full stop, then <eos>
        reward_threshold=0.8,
        test_indices=test,
        default_split="train",
    )


TASKS: dict[str, Callable[[], Task]] = {
    "sentiment": _sentiment,
    "arithmetic": _arithmetic,
    "arithmetic2": _arithmetic2,
    "keyword": _keyword,
    "reviews": _reviews,
    "translate": _translate,
}
DEFAULT_TASK = "sentiment"


@cache
def get_task(name: str) -> Task:
    """The built-in task called ``name`` (``"default"`` is ``sentiment``)."""
    if name == "default":
        name = DEFAULT_TASK
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: default, {', '.join(TASKS)}")
    return TASKS[name]()


@lru_cache(maxsize=16)
def _tokenizer(kind: str, corpus: tuple[str, ...], prompts: tuple[str, ...]) -> Tokenizer:
    return make_tokenizer(kind, corpus + prompts)


PROMPTS_ACCEPTED = (
    "the path of a UTF-8 text file (one prompt a line; .json: a list of strings; .jsonl: a JSON string "
    'or {"prompt": ...} a line) or a list or tuple of strings'
)


def load_prompts(prompts: Sequence[str] | str | os.PathLike[str]) -> tuple[str, ...]:
    """Prompts from a sequence of strings, or from a UTF-8 file.

    A file is read by its suffix: ``.json`` holds a JSON list of strings; ``.jsonl`` a JSON string or
    an object with a ``"prompt"`` string on each non-blank line (both can hold prompts of several
    lines, spelt ``\\n``); any other file one prompt per non-empty line.

    A list or tuple (any ``Sequence``, a 1-D array, or an iterator such as a generator) is taken
    in order, as given. Mappings and sets are refused: a dict would give its keys and a set no
    stable order, so the prompt a seed draws would change from run to run.
    """
    if isinstance(prompts, str | os.PathLike):
        return _read_prompts_file(Path(prompts))
    ordered = isinstance(prompts, Sequence | np.ndarray | Iterator) and not isinstance(
        prompts, bytes | bytearray
    )
    if not ordered:
        why = ""
        if isinstance(prompts, Mapping):
            why = " (a mapping: its keys would be taken as the prompts)"
        elif isinstance(prompts, Set):
            why = " (a set: it has no order, so the prompt a seed draws would change from run to run)"
        raise TypeError(
            f"prompts must be a list of strings or a path to a text file, got {type(prompts).__name__}: "
            f"{short_repr(prompts)}{why}; accepted: {PROMPTS_ACCEPTED}"
        )
    loaded = tuple(prompts)
    for i, p in enumerate(loaded):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}: {p!r}")
    if not loaded:
        raise ValueError("prompts: the list holds no prompts; at least one is needed")
    return tuple(str(p) for p in loaded)  # plain str, not str subclasses such as numpy.str_


def _read_prompts_file(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        why = " (it is a directory)" if path.is_dir() else ""
        raise FileNotFoundError(
            f"prompts: no file {str(path)!r}{why}; pass a path to a text file (one prompt a line, or "
            ".json/.jsonl) or a list of strings"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not a prompt
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompts: file {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); prompts must be {PROMPTS_ACCEPTED}"
        ) from None
    if b"\0" in data:
        raise ValueError(
            f"prompts: file {str(path)!r} is binary, not text (a NUL byte at offset {data.index(0)}); "
            f"prompts must be {PROMPTS_ACCEPTED}"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        loaded = _json_prompts(path, text)
    elif suffix == ".jsonl":
        loaded = _jsonl_prompts(path, text)
    else:
        loaded = tuple(line.rstrip("\r\n") for line in text.splitlines())
        loaded = tuple(p for p in loaded if p.strip())
    if not loaded:
        raise ValueError(f"prompts: the file {str(path)!r} holds no prompts; at least one is needed")
    return loaded


def _json_prompts(path: Path, text: str) -> tuple[str, ...]:
    """The prompts of a ``.json`` file: a list of strings."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"prompts: file {str(path)!r} is not valid JSON ({exc}); a .json file must hold a list of strings"
        ) from None
    if not isinstance(data, list):
        raise ValueError(
            f"prompts: file {str(path)!r} holds a JSON {type(data).__name__}; a .json file must hold a "
            "list of strings"
        )
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(
                f"prompts: item {i} of the list in {str(path)!r} is {short_repr(item)}, not a string"
            )
    return tuple(data)


def _jsonl_prompts(path: Path, text: str) -> tuple[str, ...]:
    """The prompts of a ``.jsonl`` file: a JSON string or ``{"prompt": ...}`` on each non-blank line."""
    loaded = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts: line {number} of {str(path)!r} is not valid JSON ({exc})") from None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise ValueError(
                f"prompts: line {number} of {str(path)!r} must be a JSON string or an object with a "
                f'"prompt" string, got {short_repr(line.strip())}'
            )
        loaded.append(item)
    return tuple(loaded)


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines a TextGen episode, resolved from a task and its overrides."""

    task: str
    tokenizer: Tokenizer
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]  #: each prompt's ids, starting with <bos>
    reward: RewardModel
    max_new_tokens: int
    max_prompt_tokens: int
    length_penalty: float
    action_mask: np.ndarray = field(
        compare=False
    )  #: (vocab_size,) bool, read-only: the tokens an agent may emit
    split: str = "all"  #: the task's prompt split ("train", "test", "all"); "all" for prompts= of one's own
    chat_template: bool = False
    """Whether ``prompt_ids`` are the prompts put into the chat template (the reward model still
    sees the prompts as written, so the environment then gives a token reward model text)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickle and deepcopy rebuild the array writeable; keep the mask read-only
        self.__dict__.update(state)
        self.action_mask.flags.writeable = False

    @property
    def seq_len(self) -> int:
        """Length of an observation: the prompt window plus the generation window."""
        return self.max_prompt_tokens + self.max_new_tokens


TOKENIZER_FILE_ACCEPTED = "a Hugging Face tokenizer.json file or a directory written by save_pretrained"


def _hf_tokenizer(path: Any, **kwargs: Any) -> Tokenizer:
    """``HFTokenizer(path, **kwargs)``; a file that is not a ``tokenizer.json`` is refused by name.

    The ``tokenizers`` library reports such a file only as "expected value at line 1 column 1",
    without its name, so a file that does not open with a JSON object is refused before it is
    parsed, and a parse failure is reported with the file's name.
    """
    from textgym.hf import HFTokenizer

    if not isinstance(path, str | os.PathLike) or not os.path.isfile(path):
        return HFTokenizer(path, **kwargs)
    with open(path, "rb") as f:
        head = f.read(1024).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"{"):
        opening = f"it starts with {head[:24]!r}" if head else "it is empty"
        raise ValueError(
            f"tokenizer: file {str(path)!r} is not a tokenizer.json ({opening}, not a JSON object); "
            f"a tokenizer path must be {TOKENIZER_FILE_ACCEPTED}"
        )
    try:
        return HFTokenizer(path, **kwargs)
    except Exception as exc:
        if type(exc) is not Exception:  # ours (ValueError, TypeError, ImportError, ...) pass as raised
            raise
        # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(
            f"tokenizer: file {str(path)!r} is not a valid tokenizer.json ({exc}); "
            f"a tokenizer path must be {TOKENIZER_FILE_ACCEPTED}"
        ) from None


def _resolve_tokenizer(
    tokenizer: Tokenizer | str | os.PathLike[str] | Mapping[str, Any] | None,
    base: Task,
    prompts: tuple[str, ...],
    chat: bool = False,
) -> Tokenizer:
    hf = "or a local Hugging Face tokenizer: its path, or {'name': 'hf', 'path': ..., 'eos_token': ...}"
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer in TOKENIZER_NAMES):
        return _tokenizer(base.tokenizer_kind if tokenizer is None else str(tokenizer), base.corpus, prompts)
    if isinstance(tokenizer, Mapping):
        args = dict(tokenizer)
        if args.pop("name", None) != "hf" or "path" not in args:
            raise ValueError(f"tokenizer: a mapping must be {{'name': 'hf', 'path': ...}}, got {tokenizer!r}")
        if chat:
            args.setdefault("chat", True)
        try:
            return _hf_tokenizer(args.pop("path"), **args)
        except TypeError as exc:
            raise TypeError(f"tokenizer: {exc}") from None
    if isinstance(tokenizer, str | os.PathLike) and os.path.exists(tokenizer):
        return _hf_tokenizer(tokenizer, **({"chat": True} if chat else {}))
    if isinstance(tokenizer, str | os.PathLike):
        raise ValueError(
            f"unknown tokenizer {str(tokenizer)!r}; accepted: {', '.join(TOKENIZER_NAMES)} or a Tokenizer, {hf}"
        )
    raise TypeError(
        f"tokenizer must be a Tokenizer, one of {', '.join(TOKENIZER_NAMES)}, {hf}; got {describe(tokenizer)}"
    )


def _chat_prompts(tokenizer: Tokenizer, prompts: tuple[str, ...], chat_template: bool) -> tuple[str, ...]:
    """``prompts`` as the text the env encodes: each put into the chat template if asked for."""
    if not chat_template:
        return prompts
    render = getattr(tokenizer, "render_chat", None)  # textgym.hf.HFTokenizer's
    if render is None:
        raise ValueError(
            f"chat_template=True needs a Hugging Face tokenizer with a chat template, got the "
            f"{type(tokenizer).__name__}; pass tokenizer=<the directory of a chat model>"
        )
    return tuple(render(p) for p in prompts)


def make_env_config(
    task: str = "default",
    reward: RewardModel | RewardFn | str | Mapping[str, Any] | None = None,
    tokenizer: Tokenizer | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    prompts: Sequence[str] | str | os.PathLike[str] | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    length_penalty: float = 0.0,
    allowed_tokens: Sequence[str | int] | None = None,
    split: str | None = None,
    chat_template: bool = False,
) -> EnvConfig:
    """Resolve the environment's keyword arguments against the task's defaults, checking each.

    ``split`` selects the task's prompts: ``"train"``, ``"test"`` or ``"all"`` (see
    :func:`held_out`); None is the task's ``default_split``. Every split of a task shares its
    tokenizer and, with ``max_prompt_tokens=None``, its prompt window (that of the longest prompt
    of all splits), so that a policy trained on one split runs unchanged on another. With
    ``prompts=`` of one's own there is nothing to split: ``split`` must be None or ``"all"``.

    Prompts longer than ``max_prompt_tokens`` (counting ``<bos>``) are refused rather than cut:
    a silently shortened prompt changes what the reward model is asked to judge. Left at
    ``None``, ``max_prompt_tokens`` is the length of the longest prompt.

    ``allowed_tokens`` (token strings or ids) restricts the action mask to those tokens and
    ``<eos>``; left at ``None``, every token but ``<pad>``, ``<bos>`` and ``<unk>`` is allowed.

    ``chat_template=True`` puts each prompt into the chat template of a Hugging Face tokenizer
    (a model directory whose tokenizer has one; an error otherwise): a user message, then the
    opening of the assistant's turn (:meth:`textgym.hf.HFTokenizer.render_chat`). A tokenizer given
    as a path then takes the folder's chat tokens (``chat_special_tokens`` of its ``textgym.json``:
    ``<eos>`` is the end of the turn). The reward model still sees the prompt as written, and
    ``max_prompt_tokens`` counts the rendered prompt.
    """
    base = get_task(task) if isinstance(task, str) else None
    if base is None:
        raise TypeError(f"task must be the name of a built-in task, got {type(task).__name__}: {task!r}")
    if split is None:
        split = base.default_split if prompts is None else "all"
    selected = base.split_indices(split)  # refuses a split that is not one of SPLITS
    if prompts is not None and split != "all":
        raise ValueError(
            f"split={split!r} selects among the built-in prompts of task {base.name!r}, which prompts= "
            "replaces; with prompts of your own leave split at None (or 'all'), or pass only the "
            "prompts you want"
        )
    all_prompts = base.prompts if prompts is None else load_prompts(prompts)
    prompt_list = tuple(all_prompts[i] for i in selected) if prompts is None else all_prompts

    if not isinstance(chat_template, bool | np.bool_):
        raise TypeError(f"chat_template must be True or False, got {describe(chat_template)}")
    tok = _resolve_tokenizer(tokenizer, base, all_prompts, chat=bool(chat_template))

    if max_new_tokens is None:
        max_new_tokens = base.max_new_tokens
    if not is_positive_int(max_new_tokens):
        raise ValueError(
            f"max_new_tokens must be a positive integer, got {describe(max_new_tokens)}; accepted: an "
            "integer >= 1 (Python or NumPy), or None for the task's default"
        )
    if not is_finite_real(length_penalty):
        raise ValueError(
            f"length_penalty must be a finite number, got {describe(length_penalty)}; accepted: any "
            "finite real number (Python or NumPy), e.g. 0.01"
        )

    every_ids = [(BOS_ID, *tok.encode(p)) for p in _chat_prompts(tok, all_prompts, bool(chat_template))]
    prompt_ids = tuple(every_ids[i] for i in selected) if prompts is None else tuple(every_ids)
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if max_prompt_tokens is None:
        max_prompt_tokens = max(len(ids) for ids in every_ids)  # the same window for every split
    if not is_positive_int(max_prompt_tokens):
        raise ValueError(
            f"max_prompt_tokens must be a positive integer, got {describe(max_prompt_tokens)}; accepted: "
            "an integer >= 1 (Python or NumPy), or None to fit the longest prompt"
        )
    # Stored as plain Python numbers: NumPy scalars would leak into JSON configs and repr.
    max_new_tokens, max_prompt_tokens = as_int(max_new_tokens), as_int(max_prompt_tokens)
    if len(prompt_ids[longest]) > max_prompt_tokens:
        over = sum(len(ids) > max_prompt_tokens for ids in prompt_ids)
        raise ValueError(
            f"prompt {longest} ({prompt_list[longest][:60]!r}) is {len(prompt_ids[longest])} tokens "
            f"with <bos>, over max_prompt_tokens={max_prompt_tokens} ({over} prompt(s) are too long); "
            "prompts are never cut: raise max_prompt_tokens or leave it None to fit the longest prompt"
        )
    reward_model = as_reward_model(base.reward() if reward is None else reward)
    if isinstance(reward_model, TokenRewardModel):
        reward_model.bind(tok)  # its text form encodes with the env's tokenizer; refuses another vocabulary
    return EnvConfig(
        task=base.name,
        tokenizer=tok,
        prompts=prompt_list,
        prompt_ids=prompt_ids,
        reward=reward_model,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        length_penalty=float(length_penalty),
        action_mask=make_action_mask(tok, allowed_tokens),
        split=split,
        chat_template=bool(chat_template),
    )


def make_action_mask(tokenizer: Tokenizer, allowed_tokens: Sequence[str | int] | None = None) -> np.ndarray:
    """(vocab_size,) read-only bool mask of the tokens an agent may emit.

    ``None`` allows every token but ``<pad>``, ``<bos>``, ``<unk>`` and any other of the
    tokenizer's :meth:`~textgym.tokenizers.Tokenizer.reserved_ids`, which never belong in a completion. Otherwise only ``<eos>`` (so an episode can always end) and the given tokens:
    ids, token strings as :meth:`~textgym.tokenizers.Tokenizer.id_to_token` spells them, or
    strings that encode to exactly one known token.
    """
    V = tokenizer.vocab_size
    mask = np.zeros(V, dtype=bool)
    reserved = list(tokenizer.reserved_ids())
    if allowed_tokens is None:
        mask[:] = True
        mask[reserved] = False
    else:
        if isinstance(allowed_tokens, str | bytes) or not isinstance(allowed_tokens, Sequence | np.ndarray):
            raise TypeError(
                f"allowed_tokens must be a sequence of token strings or ids, got {allowed_tokens!r}"
            )
        spelled = {tokenizer.id_to_token(i): i for i in range(V)}
        mask[EOS_ID] = True
        for token in allowed_tokens:
            if isinstance(token, int | np.integer) and not isinstance(token, bool | np.bool_):
                if not 0 <= int(token) < V:
                    raise ValueError(f"allowed_tokens: id {token} is outside the vocabulary [0, {V})")
                mask[int(token)] = True
            elif isinstance(token, str) and token in spelled:
                mask[spelled[token]] = True
            elif isinstance(token, str) and len(ids := tokenizer.encode(token)) == 1 and ids[0] != UNK_ID:
                mask[ids[0]] = True  # e.g. "a" for the byte tokenizer, which spells it b'a'
            else:
                raise ValueError(
                    f"allowed_tokens: {token!r} is neither a token of the {type(tokenizer).__name__} "
                    f"nor an id in [0, {V})"
                )
        if mask[reserved].any():
            bad = [tokenizer.id_to_token(i) for i in reserved if mask[i]]
            raise ValueError(
                f"allowed_tokens may not include <pad>, <bos> or <unk> (or another reserved token), got {bad}"
            )
    mask.flags.writeable = False
    return mask


def env_arguments_error(task: str, env_kwargs: Mapping[str, Any]) -> str | None:
    """Why ``task`` with ``env_kwargs`` cannot make an environment, or None if it can.

    The scripts call it on their ``--task`` and ``--env-kwargs`` so that a mistake is reported
    at once, under the option's name, rather than deep inside training.
    """
    if not isinstance(env_kwargs, Mapping):
        return f"--env-kwargs must be a JSON object, got {env_kwargs!r}"
    if "task" in env_kwargs:
        return "give the task with --task, not inside --env-kwargs"
    try:
        make_env_config(task, **env_kwargs)
    except (TypeError, ValueError, KeyError, OSError, ImportError) as exc:
        return f"--task/--env-kwargs: {exc}"
    return None
