"""Reward models: anything that scores finished completions.

The general form is a :class:`RewardModel`, which scores a whole batch of ``(prompt, completion)``
pairs in one call (the vector environment calls it once per step with every episode that ended in
that step, and learned models want batches). A plain function ``(prompt, completion) -> float`` is
a reward model as given: :func:`as_reward_model` wraps it. Built-ins are available by name.

Every score passes through :meth:`RewardModel.__call__`, which checks it: a reward model that
raises, returns the wrong number of scores, a non-number, NaN or infinity raises
:class:`RewardModelError` naming the model, the offending value and the completion it scored.

Token reward models (:class:`TokenRewardModel`) score token ids instead of text: the environment
hands them the finished episodes as tensors on its device, (k, P) prompt ids and mask (left-padded,
starting with ``<bos>``, as the observation holds them) and (k, M) completion ids and mask
(``<eos>`` not in the mask), and never decodes text for the reward. A learned reward model is one
(:class:`textgym.learned.LearnedReward`), and :class:`TokenFunctionReward` makes one of a plain
function on ids. They still score text (``model(prompts, completions)``, which
``agents.compare``, the Stable-Baselines3 baselines and evaluation call): the text is encoded with
the tokenizer the model is bound to, which the environment binds when it is built, so both paths
give the same scores wherever ``encode(decode(ids)) == ids``. Where it does not (a completion the
tokenizer would spell with other tokens, e.g. a word split into pieces), the environment's id path
scores the ids the agent emitted.
"""

from __future__ import annotations

import inspect
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch

from textgym.checks import describe, is_positive_int
from textgym.lexicon import sentiment_score
from textgym.tokenizers import Tokenizer
from textgym.translation import reference as translation_reference

RewardFn = Callable[[str, str], float]
BatchRewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
TokenRewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RewardModelError(RuntimeError):
    """A reward model failed or returned something that is not one finite number per completion."""


class RewardModel(ABC):
    """Scores completions of prompts, many at a time.

    Subclasses implement :meth:`score`; callers use the instance as a function, which validates
    the scores. ``name`` identifies the model in errors and logs.
    """

    name: str = "reward_model"

    @abstractmethod
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Sequence[float] | np.ndarray:
        """One score per ``(prompts[i], completions[i])`` pair."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions")
        try:
            # Copies: a model that mutates what it is given (pop, clear, sort) must not alter the
            # environment's record of the episodes it reports in ``info``.
            raw = self.score(list(prompts), list(completions))
        except RewardModelError:
            raise
        except Exception as exc:
            raise RewardModelError(
                f"reward model {self.name!r} raised {type(exc).__name__}: {exc} "
                f"(while scoring {n} completion(s){_first(prompts, completions)})"
            ) from exc
        return self._validate(raw, prompts, completions)

    def _validate(self, raw: Any, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        n = len(completions)
        count: int
        if isinstance(raw, np.ndarray) and raw.dtype.kind in "iuf":
            # A copy, so a model that reuses its output buffer cannot change scores already given.
            scores = raw.astype(np.float64).reshape(-1) if raw.size == n else None
            count = raw.size
        elif isinstance(raw, Mapping | AbstractSet | str | bytes | bytearray):
            # Iterating these would give keys, an arbitrary order or characters, not scores.
            raise RewardModelError(
                f"reward model {self.name!r} returned {describe(raw)}; a batched reward model must return "
                f"one number per completion, {n} in all, in their order: a list, a tuple or a numpy array"
            )
        else:
            try:
                values = list(raw)
            except TypeError:
                raise RewardModelError(
                    f"reward model {self.name!r} must return a sequence of {n} numbers, "
                    f"got {type(raw).__name__}: {raw!r}"
                ) from None
            for i, v in enumerate(values):
                if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
                    raise RewardModelError(
                        f"reward model {self.name!r} returned {v!r} ({type(v).__name__}) for completion "
                        f"{completions[i] if i < n else '?'!r}; a reward must be a real number (int or float)"
                    )
            count = len(values)
            try:
                scores = np.asarray(values, dtype=np.float64) if count == n else None
            except OverflowError:
                big = next(v for v in values if not _fits_float(v))
                raise RewardModelError(
                    f"reward model {self.name!r} returned {big!r}, too large for a float; rewards must be finite"
                ) from None
        if scores is None:
            raise RewardModelError(f"reward model {self.name!r} returned {count} scores for {n} completions")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardModelError(
                f"reward model {self.name!r} returned {scores[i]} for completion {completions[i]!r} "
                f"of prompt {prompts[i]!r}; rewards must be finite"
            )
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _fits_float(value: numbers.Real) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _first(prompts: Sequence[str], completions: Sequence[str]) -> str:
    return f", the first {completions[0]!r} for prompt {prompts[0]!r}" if completions else ""


class FunctionReward(RewardModel):
    """A plain function as a reward model.

    :param fn: ``fn(prompt, completion) -> float``, or with ``batched=True``
        ``fn(prompts, completions) -> sequence of floats``.
    :param batched: whether ``fn`` takes whole lists.
    :param name: name in errors and logs; defaults to the function's ``__name__``.
    """

    def __init__(self, fn: RewardFn | BatchRewardFn, batched: bool = False, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}: {fn!r}")
        self.fn = fn
        self.batched = batched
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Sequence[float]:
        if self.batched:
            return self.fn(prompts, completions)  # type: ignore[call-arg,arg-type]
        fn = self.fn
        return [fn(p, c) for p, c in zip(prompts, completions, strict=True)]  # type: ignore[call-arg,arg-type]


class TokenRewardModel(RewardModel):
    """A reward model that scores token ids, on the device the environment's state is on.

    Subclasses implement :meth:`score_ids`. The environment calls it (through :meth:`call_ids`,
    which validates the scores) with the finished episodes as they are in its state, and decodes
    no text for the reward. :meth:`score`, the text form, encodes ``(prompt, completion)`` pairs
    with :attr:`tokenizer` and calls :meth:`score_ids`, so that the same model scores text for
    evaluation and for the baselines.

    The tokenizer is the one given, or else the first environment's that uses the model
    (:meth:`bind`); a model bound to one vocabulary refuses an environment with another, as the
    same ids would then mean other tokens.

    :param tokenizer: the tokenizer whose ids the model reads; None to take the environment's.
    """

    def __init__(self, tokenizer: Tokenizer | None = None):
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a textgym Tokenizer or None, got {describe(tokenizer)}")
        self.tokenizer = tokenizer

    @abstractmethod
    def score_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(k,) float scores, on the device of the inputs.

        :param prompt_ids: (k, P) int64, each prompt left-padded with ``<pad>``, starting with ``<bos>``.
        :param prompt_mask: (k, P) int64, 1 on the prompt's tokens.
        :param completion_ids: (k, M) int64, each completion from column 0, then padding.
        :param completion_mask: (k, M) int64, 1 on the completion's tokens (a prefix of each
            row); an ``<eos>`` that ended the episode is not in the mask.
        """

    def reads(self, tokenizer: Tokenizer) -> bool:
        """Whether the ids of ``tokenizer`` are ids this model reads (the same vocabulary)."""
        return self.tokenizer is not None and same_vocabulary(self.tokenizer, tokenizer)

    def bind(self, tokenizer: Tokenizer) -> None:
        """Take ``tokenizer`` as the model's if it has none; refuse one with another vocabulary.

        The environment calls this when it is built (:func:`textgym.tasks.make_env_config`)."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        elif not self.reads(tokenizer):
            raise ValueError(
                f"reward model {self.name!r} reads the ids of a {type(self.tokenizer).__name__} of "
                f"{self.tokenizer.vocab_size} tokens, but the environment's tokenizer "
                f"({type(tokenizer).__name__}, {tokenizer.vocab_size} tokens) spells ids otherwise; "
                "build the model with the environment's tokenizer (or with tokenizer=None, to take it)"
            )

    def call_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """:meth:`score_ids`, checked: (k,) float64 on the device of ``completion_ids``.

        A model that raises, or returns anything but a (k,) real tensor of finite values on that
        device, raises :class:`RewardModelError` naming the model and the value. The finite check
        reads the device; ``check_finite=False`` leaves it to a caller that reads the scores
        anyway (:meth:`check_finite`)."""
        k = completion_ids.shape[0]
        try:
            raw = self.score_ids(prompt_ids, prompt_mask, completion_ids, completion_mask)
        except RewardModelError:
            raise
        except Exception as exc:
            raise RewardModelError(
                f"reward model {self.name!r} raised {type(exc).__name__}: {exc} "
                f"(while scoring the ids of {k} completion(s))"
            ) from exc
        accepted = f"score_ids must return a float tensor of shape ({k},) on {completion_ids.device}"
        if not isinstance(raw, torch.Tensor):
            raise RewardModelError(f"reward model {self.name!r} returned {describe(raw)}; {accepted}")
        if raw.dtype == torch.bool or raw.is_complex():
            raise RewardModelError(
                f"reward model {self.name!r} returned a tensor of dtype {raw.dtype}; {accepted}"
            )
        if tuple(raw.shape) != (k,):
            raise RewardModelError(
                f"reward model {self.name!r} returned a tensor of shape {tuple(raw.shape)} for {k} "
                f"completions; {accepted}"
            )
        if raw.device != completion_ids.device:
            raise RewardModelError(
                f"reward model {self.name!r} returned a tensor on {raw.device}; {accepted}"
            )
        # A copy in float64 (the environment's reward dtype), so a reused output buffer cannot
        # change scores already given.
        scores = raw.detach().to(torch.float64, copy=True)
        if check_finite:
            self.check_finite(scores.cpu().numpy(), completion_ids, completion_mask)
        return scores

    def check_finite(
        self, scores: np.ndarray, completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> None:
        """Raise :class:`RewardModelError` at the first score in ``scores`` (k,), the host's copy
        of :meth:`call_ids`' result, that is NaN or infinite, naming its completion's ids."""
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardModelError(
                f"reward model {self.name!r} returned {scores[i]} for completion {i} (ids "
                f"{completion_ids[i][completion_mask[i].bool()].tolist()}); rewards must be finite"
            )

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise RewardModelError(
                f"reward model {self.name!r} scores token ids and has no tokenizer to encode text with: "
                "pass tokenizer= when building it, or build an environment with it first (which binds "
                "the environment's tokenizer)"
            )
        ids = self.encode(prompts, completions)
        return self.call_ids(*ids).cpu().numpy()

    def encode(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs of :meth:`score_ids` for text, as the environment would hold it: prompts as
        ``<bos>`` and their ids, left-padded; completions right-padded; on the CPU."""
        tok = self.tokenizer
        assert tok is not None
        prompt_rows = [[tok.bos_id, *tok.encode(p)] for p in prompts]
        completion_rows = [tok.encode(c) for c in completions]
        P = max((len(r) for r in prompt_rows), default=1)
        M = max(1, max((len(r) for r in completion_rows), default=1))  # (k, 0) would be no column to fill
        prompt_ids = torch.full((len(prompts), P), tok.pad_id, dtype=torch.long)  # (k, P)
        completion_ids = torch.full((len(completions), M), tok.pad_id, dtype=torch.long)  # (k, M)
        for i, (p, c) in enumerate(zip(prompt_rows, completion_rows, strict=True)):
            prompt_ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        prompt_lengths = torch.tensor([len(r) for r in prompt_rows], dtype=torch.long)
        completion_lengths = torch.tensor([len(r) for r in completion_rows], dtype=torch.long)
        prompt_mask = (torch.arange(P) >= P - prompt_lengths.unsqueeze(1)).long()  # (k, P)
        completion_mask = (torch.arange(M) < completion_lengths.unsqueeze(1)).long()  # (k, M)
        return prompt_ids, prompt_mask, completion_ids, completion_mask


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` spell every id the same (so that ids of one mean the same in the other)."""
    from textgym.learned import vocabulary  # here: textgym.learned imports this module

    return a is b or (a.vocab_size == b.vocab_size and vocabulary(a) == vocabulary(b))


class TokenFunctionReward(TokenRewardModel):
    """A plain function of token ids as a reward model (see :class:`TokenRewardModel`).

    Pickled with the environment (vector envs, Stable-Baselines3) where ``fn`` pickles: a function
    defined at the top level of a module, not a lambda.

    :param fn: ``fn(prompt_ids, prompt_mask, completion_ids, completion_mask) -> (k,) tensor``,
        shapes (k, P), (k, P), (k, M), (k, M) as in :meth:`TokenRewardModel.score_ids`.
    :param tokenizer: the tokenizer whose ids ``fn`` reads; None to take the environment's.
    :param name: name in errors and logs; defaults to the function's ``__name__``.
    """

    def __init__(self, fn: TokenRewardFn, tokenizer: Tokenizer | None = None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}: {fn!r}")
        super().__init__(tokenizer)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score_ids(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.fn(prompt_ids, prompt_mask, completion_ids, completion_mask)


class SentimentReward(RewardModel):
    """Lexicon sentiment of the completion, in (-1, 1): see :mod:`textgym.lexicon`."""

    name = "sentiment"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [sentiment_score(c) for c in completions]


VADER_MISSING = (
    "reward 'vader' needs the vaderSentiment package, which is not installed: "
    'pip install -e ".[lm]" (or pip install vaderSentiment); reward="sentiment" is the '
    "project's own lexicon scorer, with no extra dependency"
)


def _vader_analyzer() -> Any:
    """vaderSentiment's ``SentimentIntensityAnalyzer`` (it reads its lexicon from the package)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError(VADER_MISSING) from exc
    return SentimentIntensityAnalyzer()


class VaderReward(RewardModel):
    """VADER's compound sentiment score in [-1, 1] (Hutto & Gilbert, 2014), from the
    ``vaderSentiment`` package (the ``lm`` extra): a 7,500-word lexicon with rules for negation,
    intensifiers, "but", capitals, punctuation and emoticons, which reads natural text as people
    write it, where the project's ``sentiment`` lexicon knows about 70 lowercase words.

    :param text: ``"completion"`` (the default) or ``"prompt+completion"``, joined as
        :func:`textgym.hf.join_text` joins them for a classifier: with a space unless one is there
        (the byte-level and Hugging Face tokenizers keep the spaces a model generates; the
        word-level tokenizer's completions start without one). The completion alone by default, as
        for ``sentiment`` and unlike ``hf-classifier`` (a classifier wants context, VADER scores
        words): the agent writes only the completion, and the prompt's own sentiment would add a
        per-prompt offset it cannot change, variance rather than signal. With the prompt, a
        negation it ends with reaches the completion ("The food was not" + " good").
    """

    name = "vader"

    def __init__(self, text: str = "completion"):
        if text not in ("completion", "prompt+completion"):
            raise ValueError(f"text must be 'completion' or 'prompt+completion', got {describe(text)}")
        self.text = text
        self._analyzer = _vader_analyzer()  # here, so that a missing package is reported at once

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        polarity = self._analyzer.polarity_scores
        if self.text == "completion":
            return [polarity(c)["compound"] for c in completions]
        from textgym.hf import join_text  # here: textgym.hf imports this module

        return [polarity(join_text(p, c))["compound"] for p, c in zip(prompts, completions, strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        # The analyzer holds its 800 kB lexicon: rebuild it (a few ms) rather than pickle it into
        # every copy of the environment.
        return {k: v for k, v in self.__dict__.items() if k != "_analyzer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._analyzer = _vader_analyzer()


class KeywordReward(RewardModel):
    """Fraction of ``keywords`` that occur in the completion as whole words, in [0, 1].

    :param keywords: the words to look for.
    :param case_sensitive: match case exactly.
    """

    name = "keyword"

    def __init__(self, keywords: Sequence[str], case_sensitive: bool = False):
        if isinstance(keywords, str) or not keywords:
            raise ValueError(f"keywords must be a non-empty list of strings, got {keywords!r}")
        self.keywords = tuple(keywords)
        flags = 0 if case_sensitive else re.IGNORECASE
        self._patterns = [re.compile(rf"\b{re.escape(k)}\b", flags) for k in self.keywords]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        pats, k = self._patterns, len(self._patterns)
        return [sum(p.search(c) is not None for p in pats) / k for c in completions]


class RegexReward(RewardModel):
    """1.0 where the completion matches ``pattern``, else 0.0.

    :param pattern: a regular expression.
    :param fullmatch: require the whole (stripped) completion to match instead of a search.
    """

    name = "regex"

    def __init__(self, pattern: str, fullmatch: bool = False):
        try:
            self.pattern = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
        self.fullmatch = fullmatch

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if self.fullmatch:
            return [float(self.pattern.fullmatch(c.strip()) is not None) for c in completions]
        return [float(self.pattern.search(c) is not None) for c in completions]


class LengthReward(RewardModel):
    """``1 - |n - target| / target``, clipped at -1, where ``n`` is the completion's length.

    :param target: the length that scores 1.0.
    :param unit: count ``"words"`` or ``"chars"``.
    """

    name = "length"

    def __init__(self, target: int = 8, unit: str = "words"):
        if not is_positive_int(target):
            raise ValueError(f"target must be a positive integer (Python or NumPy), got {describe(target)}")
        if unit not in ("words", "chars"):
            raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")
        self.target, self.unit = int(target), unit  # a plain int, whatever integer type was given

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        size = (lambda c: len(c.split())) if self.unit == "words" else len
        return [max(-1.0, 1.0 - abs(size(c) - self.target) / self.target) for c in completions]


_ARITHMETIC_RE = re.compile(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*$")


def arithmetic_answer(prompt: str) -> str:
    """The answer to a prompt of the form ``"a+b="``, ``"a-b="`` or ``"a*b="``."""
    match = _ARITHMETIC_RE.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not of the form 'a+b=', 'a-b=' or 'a*b='")
    a, op, b = int(match[1]), match[2], int(match[3])
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _look_up(table: Mapping[str, str] | Callable[[str], str], prompt: str, what: str) -> str:
    """``table[prompt]`` for a mapping, ``table(prompt)`` for a function; a prompt missing from a
    mapping is a KeyError that names it and ``what`` was looked up."""
    if isinstance(table, Mapping):
        try:
            return table[prompt]
        except KeyError:
            raise KeyError(f"no {what} is known for prompt {prompt!r}") from None
    return table(prompt)


class ExactMatchReward(RewardModel):
    """1.0 where the stripped completion equals the prompt's answer, else 0.0.

    :param answers: a mapping from prompt to answer, or a function ``prompt -> answer``.
        The default answers arithmetic prompts such as ``"12+7="``.
    """

    name = "exact_match"

    def __init__(self, answers: Mapping[str, str] | Callable[[str], str] = arithmetic_answer):
        if not (callable(answers) or isinstance(answers, Mapping)):
            raise TypeError(f"answers must be a mapping or a function, got {type(answers).__name__}")
        self.answers = answers

    def answer(self, prompt: str) -> str:
        return _look_up(self.answers, prompt, "answer")

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(c.strip() == self.answer(p)) for p, c in zip(prompts, completions, strict=True)]


TRANSLATION_METRICS = ("chrf", "bleu")


class TranslationReward(RewardModel):
    """How close the completion is to the prompt's reference translation, in [0, 1]: sacrebleu's
    sentence-level chrF (Popović, 2015: character n-gram F-score, ``CHRF().sentence_score``) or
    BLEU (``BLEU(effective_order=True).sentence_score``, so that a short sentence without a
    matching 4-gram is not scored 0 outright), divided by 100.

    chrF is the default: it gives partial credit for a word with the right stem and the wrong
    ending, which is what an agent learning agreement needs, where sentence BLEU is mostly 0 until
    whole phrases are right. Spacing does not matter to either (chrF ignores whitespace, BLEU
    splits punctuation off).

    :param references: a mapping from prompt to reference, or a function ``prompt -> reference``.
        The default translates the prompts of the built-in ``translate`` task
        (:func:`textgym.translation.reference`).
    :param metric: ``"chrf"`` or ``"bleu"``.
    """

    name = "translation"

    def __init__(
        self,
        references: Mapping[str, str] | Callable[[str], str] = translation_reference,
        metric: str = "chrf",
    ):
        if metric not in TRANSLATION_METRICS:
            raise ValueError(
                f"metric must be one of {', '.join(map(repr, TRANSLATION_METRICS))}, got {describe(metric)}"
            )
        if not (callable(references) or isinstance(references, Mapping)):
            raise TypeError(f"references must be a mapping or a function, got {type(references).__name__}")
        self.references, self.metric = references, metric
        self._scorer = _sentence_scorer(metric)

    def reference(self, prompt: str) -> str:
        return _look_up(self.references, prompt, "reference translation")

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        score = self._scorer.sentence_score
        return [
            min(1.0, score(c.strip(), [self.reference(p)]).score / 100.0)  # BLEU gives 100.00000000000004
            for p, c in zip(prompts, completions, strict=True)
        ]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_scorer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._scorer = _sentence_scorer(self.metric)


def _sentence_scorer(metric: str) -> Any:
    """sacrebleu's scorer of ``metric`` (imported here: it is needed by the translate task only)."""
    from sacrebleu.metrics import BLEU, CHRF

    return CHRF() if metric == "chrf" else BLEU(effective_order=True)


def _learned(path: str, device: str = "cpu", batch_size: int = 256) -> RewardModel:
    """A reward-model checkpoint of ``scripts/train_reward.py`` (see :mod:`textgym.learned`)."""
    from textgym.learned import LearnedReward  # here, not at the top: textgym.learned imports this module

    return LearnedReward(path, device, batch_size)


def _hf_classifier(path: str, **kwargs: Any) -> RewardModel:
    """A local Hugging Face sequence classifier (see :class:`textgym.hf.HFClassifierReward`)."""
    from textgym.hf import HFClassifierReward

    return HFClassifierReward(path, **kwargs)


REWARD_MODELS: dict[str, Callable[..., RewardModel]] = {
    "sentiment": SentimentReward,
    "keyword": KeywordReward,
    "regex": RegexReward,
    "length": LengthReward,
    "exact_match": ExactMatchReward,
    "translation": TranslationReward,
    "vader": VaderReward,
    "learned": _learned,
    "hf-classifier": _hf_classifier,
}


def as_reward_model(spec: RewardModel | RewardFn | str | Mapping[str, Any]) -> RewardModel:
    """Turn what a user passes as ``reward=`` into a :class:`RewardModel`.

    Accepted: a ``RewardModel`` instance; a plain function ``(prompt, completion) -> float``; the
    name of a built-in (``"sentiment"``, ``"vader"``, ``"length"``, ``"exact_match"``,
    ``"translation"``); a mapping
    ``{"name": <built-in>, **arguments}``, e.g. ``{"name": "keyword", "keywords": ["great"]}``; or
    the path of a learned reward model's checkpoint (``"reward.pt"``, the same as
    ``{"name": "learned", "path": "reward.pt"}``; see ``scripts/train_reward.py``); or a local
    Hugging Face sequence classifier, ``{"name": "hf-classifier", "path": ..., "label": ...}``.
    A reward model of token ids is an instance too: a :class:`TokenRewardModel`, e.g.
    ``TokenFunctionReward(fn)`` for a function ``fn(prompt_ids, prompt_mask, completion_ids,
    completion_mask) -> (k,) tensor``; such a function passed bare is refused with that advice.
    """
    if isinstance(spec, RewardModel):
        return spec
    if isinstance(spec, type) and issubclass(spec, RewardModel):
        raise TypeError(
            f"reward: pass an instance of {spec.__name__}, e.g. reward={spec.__name__}(...), not the class"
        )
    if isinstance(spec, str) and spec not in REWARD_MODELS and spec.endswith(".pt"):
        spec = {"name": "learned", "path": spec}  # a learned reward model's checkpoint
    if isinstance(spec, str | Mapping):
        args = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
        name = args.pop("name", None)
        if name not in REWARD_MODELS:
            raise ValueError(
                f"unknown reward model {name!r}; built-ins: {', '.join(REWARD_MODELS)} "
                "(or pass a RewardModel or a function (prompt, completion) -> float)"
            )
        try:
            return REWARD_MODELS[name](**args)
        except TypeError as exc:
            raise TypeError(f"reward model {name!r}: {exc}") from None
    if callable(spec):
        if _positional_parameters(spec) == 4:
            raise TypeError(
                f"reward: {getattr(spec, '__name__', spec)!r} takes 4 arguments; a plain reward function "
                "takes (prompt, completion), and one of token ids (prompt_ids, prompt_mask, completion_ids, "
                "completion_mask) is passed as reward=TokenFunctionReward(fn)"
            )
        return FunctionReward(spec)
    raise TypeError(
        f"reward must be a RewardModel, a function (prompt, completion) -> float, a built-in name "
        f"({', '.join(REWARD_MODELS)}) or a mapping with 'name'; got {type(spec).__name__}: {spec!r}"
    )


def _positional_parameters(fn: Callable[..., Any]) -> int | None:
    """How many positional parameters ``fn`` requires, or None if it cannot be told."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)
