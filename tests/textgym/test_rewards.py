"""Tests of textgym.rewards and textgym.lexicon: built-in rewards, wrapping, validation of scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textgym.lexicon import INTENSIFIERS, LEXICON, NEGATIONS, NEGATIVE, POSITIVE, sentiment_score
from textgym.rewards import (
    REWARD_MODELS,
    ExactMatchReward,
    FunctionReward,
    KeywordReward,
    LengthReward,
    RegexReward,
    RewardModel,
    RewardModelError,
    SentimentReward,
    VaderReward,
    arithmetic_answer,
    as_reward_model,
)

FAST = settings(max_examples=150, deadline=None)


def squash(s: float) -> float:
    """The documented squashing s / sqrt(s^2 + 15), for hand-computed raw sums."""
    return s / math.sqrt(s * s + 15.0)


# ---------------------------------------------------------------------------------- sentiment
def test_sentiment_single_words_by_hand():
    assert sentiment_score("good") == pytest.approx(squash(1.9))
    assert sentiment_score("bad") == pytest.approx(squash(-2.5))
    # Negation: 1.9 * -0.74; intensifier: 1.9 + 0.3.
    assert sentiment_score("not good") == pytest.approx(squash(-1.406))
    assert sentiment_score("very good") == pytest.approx(squash(2.2))
    # "but": clause before x0.5, clause after x1.5: -2.5*0.5 + 3.1*1.5 = 3.4
    assert sentiment_score("the food was bad but the service was great") == pytest.approx(squash(3.4))


@pytest.mark.parametrize("word", sorted(POSITIVE))
def test_positive_words_score_positive(word):
    assert 0 < sentiment_score(f"the food was {word}") < 1


@pytest.mark.parametrize("word", sorted(NEGATIVE))
def test_negative_words_score_negative(word):
    assert -1 < sentiment_score(f"the food was {word}") < 0


@pytest.mark.parametrize("word", sorted(LEXICON))
@pytest.mark.parametrize("negation", ["not", "never", "isn't", "wasn't"])
def test_negation_flips_the_sign(word, negation):
    plain, negated = sentiment_score(word), sentiment_score(f"{negation} {word}")
    assert negated != 0
    assert math.copysign(1, negated) == -math.copysign(1, plain)
    assert abs(negated) < abs(plain)  # damped as well as flipped


def test_negation_reaches_three_words_ahead_only():
    assert sentiment_score("not the food good") < 0  # "not" three words before "good"
    assert sentiment_score("not the food was good") > 0  # four words before: out of reach
    assert sentiment_score("not the food was good") == pytest.approx(sentiment_score("good"))


@pytest.mark.parametrize("word", sorted(LEXICON))
@pytest.mark.parametrize("booster", ["very", "extremely", "really"])
def test_intensifier_increases_magnitude(word, booster):
    plain, boosted = sentiment_score(word), sentiment_score(f"{booster} {word}")
    assert math.copysign(1, boosted) == math.copysign(1, plain)
    assert abs(boosted) > abs(plain)


@pytest.mark.parametrize("dampener", ["slightly", "barely", "somewhat"])
def test_dampener_decreases_magnitude(dampener):
    for word in ("good", "great", "bad", "awful"):
        plain, damped = sentiment_score(word), sentiment_score(f"{dampener} {word}")
        assert math.copysign(1, damped) == math.copysign(1, plain)
        assert abs(damped) < abs(plain), (dampener, word)


def test_dampener_keeps_the_sign():
    for dampener in ("slightly", "barely", "somewhat"):
        assert sentiment_score(f"{dampener} good") > 0 > sentiment_score(f"{dampener} bad")


def test_but_weighs_the_later_clause_more():
    assert sentiment_score("the food was bad but the service was great") > 0
    assert sentiment_score("the food was great but the service was bad") < 0
    # Equal and opposite words: whichever follows "but" wins.
    assert sentiment_score("good but poor") < 0 < sentiment_score("poor but good")
    # The clause after "but" counts more than the same clause alone.
    assert sentiment_score("the room was ok but great") > sentiment_score("great")


@pytest.mark.parametrize("text", ["", "   ", "the food was served at noon .", "12345 !!!"])
def test_sentiment_of_text_without_sentiment_words_is_zero(text):
    assert sentiment_score(text) == 0.0


def test_sentiment_is_case_insensitive_and_ordered():
    assert sentiment_score("GREAT") == sentiment_score("great")
    assert sentiment_score("awful") < sentiment_score("bad") < 0 < sentiment_score("good")
    assert sentiment_score("good") < sentiment_score("good and great") < 1


_sentiment_words = st.sampled_from(
    sorted(LEXICON) + sorted(INTENSIFIERS) + sorted(NEGATIONS) + ["but", "the"]
)


@FAST
@given(st.lists(_sentiment_words, max_size=200))
def test_sentiment_strictly_inside_open_interval_for_lexicon_text(words):
    score = sentiment_score(" ".join(words))
    assert isinstance(score, float)
    assert -1 < score < 1


@FAST
@given(st.text(max_size=200))
def test_sentiment_strictly_inside_open_interval_for_any_text(text):
    score = sentiment_score(text)
    assert math.isfinite(score)
    assert -1 < score < 1


def test_sentiment_near_bounds_for_long_uniform_text():
    assert 0.99 < sentiment_score(" ".join(["love"] * 200)) < 1
    assert -1 < sentiment_score(" ".join(["worst"] * 200)) < -0.99


def test_sentiment_reward_scores_completions_not_prompts():
    rm = SentimentReward()
    scores = rm(["awful awful", "great"], ["great food", "terrible food"])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    assert scores[0] == pytest.approx(sentiment_score("great food"))
    assert scores[1] == pytest.approx(sentiment_score("terrible food"))
    assert scores[0] > 0 > scores[1]
    assert rm.name == "sentiment"


# ----------------------------------------------------------------------------------------- vader
# Compound scores published in vaderSentiment's README (github.com/cjhutto/vaderSentiment), an
# independent record of what the scorer gives: they pin the package's behaviour as well as ours.
VADER_README = {
    "VADER is smart, handsome, and funny.": 0.8316,
    "VADER is not smart, handsome, nor funny.": -0.7424,
    "VADER is smart, handsome, and funny!": 0.8439,
    "VADER is very smart, handsome, and funny.": 0.8545,
    "The book was good.": 0.4404,
    "The book was kind of good.": 0.3832,
    "Today SUX!": -0.5461,
    "Make sure you :) or :D today!": 0.8633,
    "Not bad at all": 0.431,
}


def analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def test_vader_matches_the_published_scores_and_the_analyzer():
    rm = VaderReward()
    texts = list(VADER_README)
    scores = rm(["The movie was"] * len(texts), texts)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (len(texts),)
    np.testing.assert_array_equal(scores, [VADER_README[t] for t in texts])
    reference = analyzer()
    more = [" was great!", " was not great.", "", "   ", " was terrible, but the staff were lovely."]
    np.testing.assert_array_equal(
        rm(["p"] * len(more), more), [reference.polarity_scores(t)["compound"] for t in more]
    )
    assert rm.name == "vader" and type(as_reward_model("vader")) is VaderReward


def test_vader_scores_the_completion_unless_asked_for_the_prompt():
    reference = analyzer().polarity_scores
    prompts = ["The food was not", "What an awful night. The food was", "x"]
    completions = [" good", " good", ""]
    alone = VaderReward()(prompts, completions)
    joined = VaderReward(text="prompt+completion")(prompts, completions)
    assert alone.tolist() == [reference(" good")["compound"]] * 2 + [0.0]
    assert joined.tolist() == [
        reference(p + c)["compound"] for p, c in zip(prompts, completions, strict=True)
    ]
    assert joined[0] < 0 < alone[0]  # the negation at the end of the prompt reaches the completion
    # A seam without whitespace (the word-level tokenizer's completions) gets one space.
    word = VaderReward(text="prompt+completion")(["the food was"], ["great ."])[0]
    assert word == reference("the food was great .")["compound"] > 0.5
    assert reference("the food wasgreat .")["compound"] == 0.0  # what plain concatenation would score


def test_vader_from_a_mapping_and_bad_arguments():
    rm = as_reward_model({"name": "vader", "text": "prompt+completion"})
    assert isinstance(rm, VaderReward) and rm.text == "prompt+completion"
    assert VaderReward().text == "completion"
    for bad in ("prompt", True, None):
        with pytest.raises(ValueError, match=r"text must be 'completion' or 'prompt\+completion', got"):
            VaderReward(text=bad)
    with pytest.raises(TypeError, match=r"reward model 'vader':.*colour"):
        as_reward_model({"name": "vader", "colour": "red"})


def test_vader_pickles_without_its_lexicon():
    import pickle

    rm = VaderReward(text="prompt+completion")
    data = pickle.dumps(rm)
    assert len(data) < 1000  # the analyzer (800 kB of lexicon) is rebuilt, not stored
    copy = pickle.loads(data)
    assert copy.text == "prompt+completion"
    assert copy(["The food was"], [" great"]).tolist() == rm(["The food was"], [" great"]).tolist()


def test_vader_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match=r'vaderSentiment.*pip install -e "\.\[lm\]".*reward="sentiment"'):
        as_reward_model("vader")


# ------------------------------------------------------------------------------------- keyword
def test_keyword_fraction_of_keywords():
    rm = KeywordReward(["happy", "friend", "home"])
    scores = rm(["p"] * 4, ["a happy friend", "happy happy happy", "home , friend and happy", "nothing"])
    np.testing.assert_allclose(scores, [2 / 3, 1 / 3, 1.0, 0.0])


def test_keyword_matches_whole_words_only():
    rm = KeywordReward(["happy", "home"])
    np.testing.assert_allclose(
        rm(["p"] * 3, ["unhappy homes", "happyhome", "(happy) home."]),
        [0.0, 0.0, 1.0],
    )


def test_keyword_case_handling():
    insensitive = KeywordReward(["Happy"])
    sensitive = KeywordReward(["Happy"], case_sensitive=True)
    np.testing.assert_allclose(insensitive(["p", "p"], ["HAPPY", "happy"]), [1.0, 1.0])
    np.testing.assert_allclose(sensitive(["p", "p", "p"], ["HAPPY", "happy", "so Happy"]), [0.0, 0.0, 1.0])


def test_keyword_special_characters_are_literal():
    rm = KeywordReward(["a.b"])
    np.testing.assert_allclose(rm(["p", "p"], ["axb", "see a.b here"]), [0.0, 1.0])


@pytest.mark.parametrize("bad", ["happy", [], ()])
def test_keyword_argument_errors(bad):
    with pytest.raises(ValueError, match="keywords must be a non-empty list of strings"):
        KeywordReward(bad)


# --------------------------------------------------------------------------------------- regex
def test_regex_search_vs_fullmatch():
    search = RegexReward(r"\d+")
    full = RegexReward(r"\d+", fullmatch=True)
    completions = ["abc 12", " 12 \n", "12a", "none"]
    np.testing.assert_allclose(search(["p"] * 4, completions), [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(full(["p"] * 4, completions), [0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("bad", ["(", "[a-", "*x", None])
def test_regex_invalid_pattern(bad):
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        RegexReward(bad)


# -------------------------------------------------------------------------------------- length
def test_length_in_words():
    rm = LengthReward(target=4)
    completions = ["a b c d", "a b", "  a   b  c d e ", " ".join("w" * 12), " ".join("w" * 30), ""]
    # 1 - |n - 4| / 4, clipped at -1
    np.testing.assert_allclose(rm(["p"] * 6, completions), [1.0, 0.5, 0.75, -1.0, -1.0, 0.0])


def test_length_in_chars():
    rm = LengthReward(target=5, unit="chars")
    np.testing.assert_allclose(rm(["p"] * 3, ["hello", "hi", "hello world"]), [1.0, 0.4, -0.2])


def test_length_default_target_is_eight_words():
    rm = LengthReward()
    assert (rm.target, rm.unit) == (8, "words")
    assert rm(["p"], [" ".join("w" * 8)])[0] == 1.0


@pytest.mark.parametrize("target", [0, -1, 2.5, "8", None])
def test_length_target_errors(target):
    with pytest.raises(ValueError, match="target must be a positive integer"):
        LengthReward(target=target)


def test_length_target_rejects_bool():
    with pytest.raises(ValueError, match="target must be a positive integer"):
        LengthReward(target=True)


@pytest.mark.parametrize("unit", ["tokens", "WORDS", ""])
def test_length_unit_errors(unit):
    with pytest.raises(ValueError, match="unit must be 'words' or 'chars'"):
        LengthReward(unit=unit)


# ---------------------------------------------------------------------------------- exact match
@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("2+3=", "5"),
        ("2-3=", "-1"),
        ("12*7=", "84"),
        ("-2*3=", "-6"),
        ("5--7=", "12"),
        (" 10 * 10 = ", "100"),
        ("0+0=", "0"),
    ],
)
def test_arithmetic_answer(prompt, answer):
    assert arithmetic_answer(prompt) == answer


@pytest.mark.parametrize("prompt", ["2/3=", "2+3", "2+3=5", "two+three=", "", "2+3+4=", "1.5+2="])
def test_arithmetic_answer_bad_prompt(prompt):
    with pytest.raises(ValueError, match="is not of the form 'a\\+b=', 'a-b=' or 'a\\*b='"):
        arithmetic_answer(prompt)


def test_exact_match_default_arithmetic():
    rm = ExactMatchReward()
    scores = rm(["12+7=", "3*4=", "5-9=", "5-9=", "1+1="], ["19", " 12\n", "4", "-4", "2 2"])
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.0, 1.0, 0.0])


def test_exact_match_with_mapping_and_function():
    mapped = ExactMatchReward({"capital of france?": "paris", "2+2=": "four"})
    np.testing.assert_allclose(
        mapped(["capital of france?", "2+2=", "2+2="], [" paris ", "4", "four"]), [1.0, 0.0, 1.0]
    )
    upper = ExactMatchReward(str.upper)
    np.testing.assert_allclose(upper(["abc", "abc"], ["ABC", "abc"]), [1.0, 0.0])


def test_exact_match_missing_key():
    rm = ExactMatchReward({"hi": "there"})
    with pytest.raises(KeyError, match="no answer is known for prompt 'bye'"):
        rm.answer("bye")
    with pytest.raises(RewardModelError, match="no answer is known for prompt 'bye'") as info:
        rm(["bye"], ["there"])
    assert "'exact_match'" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_exact_match_bad_prompt_is_reported_by_name():
    with pytest.raises(RewardModelError, match=r"reward model 'exact_match' raised ValueError") as info:
        ExactMatchReward()(["hello"], ["5"])
    assert isinstance(info.value.__cause__, ValueError)


def test_exact_match_answers_type_error():
    with pytest.raises(TypeError, match="answers must be a mapping or a function, got int"):
        ExactMatchReward(5)


# ------------------------------------------------------------------------------ FunctionReward
def completion_length(prompt, completion):
    return len(completion)


def test_function_reward_plain_function():
    rm = FunctionReward(completion_length)
    assert rm.name == "completion_length"
    scores = rm(["a", "b"], ["abc", "d"])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [3.0, 1.0])


def test_function_reward_receives_prompt_and_completion_pairs():
    seen = []
    rm = FunctionReward(lambda p, c: seen.append((p, c)) or 0.0)
    rm(["p1", "p2"], ["c1", "c2"])
    assert seen == [("p1", "c1"), ("p2", "c2")]
    assert rm.name == "<lambda>"


def test_function_reward_batched():
    calls = []

    def batch_fn(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return [float(len(p) + len(c)) for p, c in zip(prompts, completions, strict=True)]

    rm = FunctionReward(batch_fn, batched=True)
    np.testing.assert_array_equal(rm(["ab", "c"], ["d", ""]), [3.0, 1.0])
    assert calls == [(["ab", "c"], ["d", ""])]  # one call for the whole batch


def test_function_reward_explicit_name_and_not_callable():
    assert FunctionReward(completion_length, name="mine").name == "mine"
    with pytest.raises(TypeError, match="reward function must be callable, got int"):
        FunctionReward(42)


def test_function_reward_empty_batch():
    out = FunctionReward(completion_length)([], [])
    assert out.shape == (0,)


def test_mismatched_prompts_and_completions():
    with pytest.raises(ValueError, match="got 1 prompts for 2 completions"):
        FunctionReward(completion_length)(["p"], ["a", "b"])


# ------------------------------------------------------------------------------ as_reward_model
def test_as_reward_model_passes_instances_through():
    rm = KeywordReward(["x"])
    assert as_reward_model(rm) is rm


def test_as_reward_model_wraps_functions():
    rm = as_reward_model(completion_length)
    assert isinstance(rm, FunctionReward)
    assert rm.name == "completion_length"
    np.testing.assert_array_equal(rm(["p"], ["abcd"]), [4.0])


@pytest.mark.parametrize(
    "name, cls",
    [("sentiment", SentimentReward), ("length", LengthReward), ("exact_match", ExactMatchReward)],
)
def test_as_reward_model_built_in_names(name, cls):
    rm = as_reward_model(name)
    assert type(rm) is cls
    assert rm.name == name


def test_built_in_registry():
    assert set(REWARD_MODELS) == {
        "sentiment",
        "keyword",
        "regex",
        "length",
        "exact_match",
        "translation",
        "vader",
        "learned",
        "hf-classifier",
    }
    for name, cls in REWARD_MODELS.items():
        if name not in ("learned", "hf-classifier"):  # loaders of saved models, named after what they load
            assert cls.name == name


def test_as_reward_model_mapping_with_arguments():
    spec = {"name": "keyword", "keywords": ["great"], "case_sensitive": True}
    rm = as_reward_model(spec)
    assert isinstance(rm, KeywordReward)
    assert rm.keywords == ("great",)
    np.testing.assert_array_equal(rm(["p", "p"], ["great", "GREAT"]), [1.0, 0.0])
    assert spec == {"name": "keyword", "keywords": ["great"], "case_sensitive": True}  # not mutated

    length = as_reward_model({"name": "length", "target": 3, "unit": "chars"})
    assert (length.target, length.unit) == (3, "chars")
    regex = as_reward_model({"name": "regex", "pattern": "^ok$", "fullmatch": True})
    np.testing.assert_array_equal(regex(["p", "p"], [" ok ", "not ok"]), [1.0, 0.0])


@pytest.mark.parametrize("spec", ["bleu", {"name": "bleu"}, {"keywords": ["x"]}, "Sentiment"])
def test_as_reward_model_unknown_name_lists_built_ins(spec):
    with pytest.raises(ValueError, match="unknown reward model") as info:
        as_reward_model(spec)
    message = str(info.value)
    assert "built-ins: sentiment, keyword, regex, length, exact_match" in message


def test_as_reward_model_bad_arguments_name_the_model():
    with pytest.raises(TypeError, match=r"reward model 'keyword':.*keywords"):
        as_reward_model("keyword")  # required argument missing
    with pytest.raises(TypeError, match=r"reward model 'length':.*colour"):
        as_reward_model({"name": "length", "colour": "red"})
    with pytest.raises(ValueError, match="target must be a positive integer"):
        as_reward_model({"name": "length", "target": 0})


@pytest.mark.parametrize("spec", [42, 1.5, None, ["sentiment"], b"sentiment"])
def test_as_reward_model_wrong_type(spec):
    with pytest.raises(TypeError, match="reward must be a RewardModel, a function") as info:
        as_reward_model(spec)
    assert type(spec).__name__ in str(info.value)


# ---------------------------------------------------------------------------------- validation
def test_raising_reward_is_wrapped_with_name_and_cause():
    original = ZeroDivisionError("division by zero")

    def boom(prompt, completion):
        raise original

    with pytest.raises(
        RewardModelError, match="reward model 'boom' raised ZeroDivisionError: division by zero"
    ) as info:
        FunctionReward(boom)(["the prompt"], ["the completion"])
    assert info.value.__cause__ is original
    assert "'the completion'" in str(info.value)
    assert "'the prompt'" in str(info.value)


def test_raising_reward_model_subclass_is_wrapped():
    class Broken(RewardModel):
        name = "broken_model"

        def score(self, prompts, completions):
            raise KeyError("missing")

    with pytest.raises(RewardModelError, match="reward model 'broken_model' raised KeyError") as info:
        Broken()(["p"], ["c"])
    assert isinstance(info.value.__cause__, KeyError)


def test_reward_model_error_from_score_is_not_rewrapped():
    def inner(prompt, completion):
        raise RewardModelError("inner problem")

    with pytest.raises(RewardModelError, match=r"^inner problem$"):
        FunctionReward(inner)(["p"], ["c"])


@pytest.mark.parametrize(
    "value, shown",
    [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"), (np.float64("nan"), "nan")],
)
def test_non_finite_scores_are_refused(value, shown):
    def bad_value(prompt, completion):
        return value if completion == "second" else 0.5

    with pytest.raises(
        RewardModelError, match=rf"reward model 'bad_value' returned {shown} for completion 'second'"
    ) as info:
        FunctionReward(bad_value)(["p1", "p2"], ["first", "second"])
    assert "rewards must be finite" in str(info.value)
    assert "'p2'" in str(info.value)


@pytest.mark.parametrize(
    "value, shown",
    [
        ("0.5", r"'0\.5' \(str\)"),
        (None, r"None \(NoneType\)"),
        (True, r"True \(bool\)"),
        (False, r"False \(bool\)"),
        (np.bool_(True), r".*True_? \(bool_?\)"),
        ([0.5], r"\[0\.5\] \(list\)"),
        (1 + 2j, r"\(1\+2j\) \(complex\)"),
    ],
)
def test_non_number_scores_are_refused(value, shown):
    def weird(prompt, completion):
        return value

    with pytest.raises(
        RewardModelError, match=rf"reward model 'weird' returned {shown} for completion 'c'"
    ) as info:
        FunctionReward(weird)(["p"], ["c"])
    assert "a reward must be a real number" in str(info.value)


def test_batched_non_sequence_is_refused():
    with pytest.raises(
        RewardModelError, match=r"reward model 'scalar' must return a sequence of 2 numbers, got float: 1\.0"
    ):
        FunctionReward(lambda p, c: 1.0, batched=True, name="scalar")(["a", "b"], ["x", "y"])
    with pytest.raises(RewardModelError, match=r"'none' must return a sequence of 1 numbers, got NoneType"):
        FunctionReward(lambda p, c: None, batched=True, name="none")(["a"], ["x"])


@pytest.mark.parametrize("returned", [[1.0], [1.0, 2.0, 3.0], [], np.array([1.0]), np.zeros(3)])
def test_wrong_number_of_scores_is_refused(returned):
    rm = FunctionReward(lambda p, c: returned, batched=True, name="miscount")
    with pytest.raises(
        RewardModelError, match=rf"reward model 'miscount' returned {len(returned)} scores for 2 completions"
    ):
        rm(["a", "b"], ["x", "y"])


def test_batched_string_is_refused():
    # Refused as a whole, by type: its characters are not scores.
    rm = FunctionReward(lambda p, c: "ab", batched=True, name="stringy")
    with pytest.raises(
        RewardModelError, match=r"reward model 'stringy' returned 'ab' \(str\); .*2 in all.*a list"
    ):
        rm(["a", "b"], ["x", "y"])


@pytest.mark.parametrize(
    "returned",
    [
        np.array([1, 2], dtype=np.int32),
        np.array([1.0, 2.0], dtype=np.float32),
        np.array([[1.0], [2.0]]),
        (1, 2.0),
        [np.float32(1.0), np.int64(2)],
    ],
)
def test_numeric_arrays_and_numpy_scalars_are_accepted(returned):
    rm = FunctionReward(lambda p, c: returned, batched=True)
    out = rm(["a", "b"], ["x", "y"])
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float64 and out.shape == (2,)
    np.testing.assert_array_equal(out, [1.0, 2.0])


def test_numpy_array_with_nan_is_refused():
    rm = FunctionReward(lambda p, c: np.array([0.0, np.nan]), batched=True, name="arr")
    with pytest.raises(RewardModelError, match=r"'arr' returned nan for completion 'y'"):
        rm(["a", "b"], ["x", "y"])


def test_numpy_bool_array_is_refused():
    rm = FunctionReward(lambda p, c: np.array([True, False]), batched=True, name="bools")
    with pytest.raises(RewardModelError, match=r"'bools' returned .*True.* \(bool_?\)"):
        rm(["a", "b"], ["x", "y"])


def test_wrong_number_of_scores_from_generator_reports_count():
    rm = FunctionReward(lambda p, c: (x for x in [1.0, 2.0, 3.0]), batched=True, name="gen")
    with pytest.raises(RewardModelError, match="returned 3 scores for 2 completions"):
        rm(["a", "b"], ["x", "y"])


def test_raising_reward_on_empty_batch_is_reward_model_error():
    def boom(prompts, completions):
        raise RuntimeError("no batch")

    with pytest.raises(RewardModelError, match="no batch"):
        FunctionReward(boom, batched=True)([], [])


def test_huge_int_score_is_reward_model_error():
    with pytest.raises(RewardModelError, match="huge"):
        FunctionReward(lambda p, c: 10**400, name="huge")(["p"], ["c"])


@pytest.mark.filterwarnings("ignore:Casting complex values")
def test_complex_array_is_refused():
    rm = FunctionReward(lambda p, c: np.array([1 + 2j]), batched=True, name="cplx")
    with pytest.raises(RewardModelError, match="cplx"):
        rm(["p"], ["c"])
