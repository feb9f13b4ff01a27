"""A small sentiment lexicon and a rule-based scorer, built for the project's review domain.

Each word has a valence on a -4 (most negative) .. +4 (most positive) scale. The scorer follows
the well-known recipe of rule-based lexicon scorers such as VADER (Hutto & Gilbert, 2014): sum the
valences of the words, strengthen or weaken a word after an intensifier ("very", "slightly"), flip
and damp it after a negation ("not", "never") within three words, weigh the clause after "but"
more than the one before, and squash the sum into (-1, 1) with ``s / sqrt(s^2 + alpha)``.
The word lists and numbers here are the project's own.
"""

from __future__ import annotations

import math
import re

POSITIVE: dict[str, float] = {
    "amazing": 2.8,
    "awesome": 3.0,
    "beautiful": 2.9,
    "best": 3.2,
    "brilliant": 2.8,
    "charming": 2.2,
    "clean": 1.7,
    "comfortable": 1.9,
    "cozy": 1.8,
    "delicious": 2.9,
    "delightful": 2.8,
    "enjoy": 2.2,
    "enjoyed": 2.3,
    "excellent": 3.2,
    "fantastic": 2.6,
    "fresh": 1.3,
    "friendly": 2.2,
    "fun": 2.3,
    "generous": 2.0,
    "glad": 2.0,
    "good": 1.9,
    "great": 3.1,
    "happy": 2.7,
    "helpful": 1.8,
    "impressive": 2.2,
    "like": 1.5,
    "liked": 1.8,
    "love": 3.2,
    "loved": 2.9,
    "lovely": 2.8,
    "nice": 1.8,
    "perfect": 2.7,
    "pleasant": 2.3,
    "recommend": 1.5,
    "superb": 3.0,
    "sweet": 2.0,
    "tasty": 2.3,
    "warm": 1.2,
    "wonderful": 2.7,
}

NEGATIVE: dict[str, float] = {
    "annoying": -1.8,
    "awful": -3.0,
    "bad": -2.5,
    "bland": -1.4,
    "boring": -1.9,
    "broken": -1.8,
    "disappointed": -2.1,
    "disappointing": -2.2,
    "dirty": -1.9,
    "dislike": -1.6,
    "disliked": -1.8,
    "greasy": -1.1,
    "hate": -2.7,
    "hated": -3.0,
    "horrible": -3.1,
    "mediocre": -1.2,
    "nasty": -2.6,
    "noisy": -1.2,
    "overpriced": -1.6,
    "poor": -2.1,
    "rude": -2.0,
    "sad": -2.1,
    "slow": -1.2,
    "stale": -1.6,
    "terrible": -2.9,
    "ugly": -2.3,
    "unfriendly": -2.0,
    "waste": -1.8,
    "worst": -3.1,
    "wrong": -2.1,
}

LEXICON: dict[str, float] = {**POSITIVE, **NEGATIVE}

# Added to (or, for dampeners, taken from) the magnitude of the next sentiment word.
INTENSIFIERS: dict[str, float] = {
    "extremely": 0.4,
    "incredibly": 0.4,
    "really": 0.3,
    "so": 0.3,
    "truly": 0.3,
    "very": 0.3,
    "quite": 0.1,
    "barely": -0.3,
    "slightly": -0.3,
    "somewhat": -0.2,
}

NEGATIONS = frozenset({"not", "never", "no", "nothing", "hardly", "without", "neither", "nor"})

NEGATION_SCALE = -0.74  # a negated word keeps some of its strength, with the opposite sign
NEGATION_WINDOW = 3  # a negation reaches this many words ahead
BUT_BEFORE, BUT_AFTER = 0.5, 1.5  # weight of the clauses before and after "but"
ALPHA = 15.0  # squashing constant: a raw sum of +-3.9 maps to about +-0.7

_TOKEN_RE = re.compile(r"[a-z']+")


def sentiment_score(text: str) -> float:
    """Sentiment of ``text`` in (-1, 1); 0.0 for text without sentiment words."""
    words = _TOKEN_RE.findall(text.lower())
    valences = []
    for i, word in enumerate(words):
        valence = LEXICON.get(word)
        if valence is None:
            valences.append(0.0)
            continue
        if i > 0 and words[i - 1] in INTENSIFIERS:
            # A booster adds to the word's magnitude, a dampener (negative entry) takes from it.
            valence += math.copysign(1.0, valence) * INTENSIFIERS[words[i - 1]]
        window = words[max(0, i - NEGATION_WINDOW) : i]
        if any(w in NEGATIONS or w.endswith("n't") for w in window):
            valence *= NEGATION_SCALE
        valences.append(valence)
    if "but" in words:
        cut = words.index("but")
        valences = [v * (BUT_BEFORE if j < cut else BUT_AFTER) for j, v in enumerate(valences)]
    total = sum(valences)
    return total / math.sqrt(total * total + ALPHA)
