"""Tests of the ``translate`` task: the language pair (textgym.translation), its split, and the
chrF/BLEU reward (textgym.rewards.TranslationReward)."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from sacrebleu.metrics import BLEU, CHRF
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from textgym import translation
from textgym.rewards import TranslationReward, as_reward_model
from textgym.tasks import get_task, make_env_config
from textgym.tokenizers import EOS_ID, UNK_ID

# Hand-checked: adjective after its noun, verb last; plural nouns in -n, adjectives -a/-i by their
# noun's number, the verb -as/-an by the subject's.
HAND = [
    ("the big dog sees the small cats .", "la kano granda la mivon mali vidas ."),
    ("the old kings help the girl .", "la rekon veji la lina hulpan ."),
    ("the bird finds the happy farmers .", "la pero la falon gaji trovas ."),
    ("the boys call the teacher .", "la tavon la dosko vokan ."),
]
# The same sentences glossed word by word: each word's target stem in the source's order, with
# the singular endings (what a dictionary lookup gives).
GLOSSES = [
    "la granda kano vidas la mala mivo .",
    "la veja reko hulpas la lina .",
    "la pero trovas la gaja falo .",
    "la tavo vokas la dosko .",
]


@pytest.mark.parametrize(("source", "target"), HAND)
def test_translation_of_known_sentences_by_hand(source, target):
    assert translation.translate(source) == target
    assert translation.reference(translation.prompt(source)) == target
    assert translation.prompt(source) == source + " ="


def test_sentence_structure_round_trips_through_its_source():
    for sentence in translation.sentences(300, seed=3):
        assert translation.parse(sentence.source) == sentence
        assert translation.translate(sentence.source) == sentence.target


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("the dog see the cat .", r"a verb agreeing with the singular subject .* at word 3, got 'see'"),
        ("the dogs sees the cat .", r"a verb agreeing with the plural subject .* at word 3, got 'sees'"),
        ("the big sees the cat .", r"expected a noun .* at word 3, got 'sees'"),
        ("a dog sees the cat .", r"expected 'the' at word 1, got 'a'"),
        ("the dog sees the cat", r"expected '.' as the last word at word 6, got the end of the sentence"),
    ],
)
def test_sentences_outside_the_grammar_are_refused_by_word(source, why):
    with pytest.raises(ValueError, match=why):
        translation.translate(source)


def test_reference_needs_the_separator():
    with pytest.raises(ValueError, match=r"does not end with the separator '='"):
        translation.reference("the dog sees the cat .")


# ------------------------------------------------------------------------------------- reward
def test_reference_scores_one_and_copying_scores_clearly_below():
    reward = TranslationReward()
    prompts = [translation.prompt(s) for s, _ in HAND]
    n = len(HAND)
    assert reward(prompts, [t for _, t in HAND]).tolist() == [1.0] * n
    copied = reward(prompts, [s for s, _ in HAND])
    glossed = reward(prompts, GLOSSES)
    assert (copied < 0.2).all(), copied  # English shares few character n-grams with the target
    assert (glossed < 0.7).all(), glossed  # right words, wrong order and endings
    assert (copied < glossed).all()
    assert reward(prompts[:1], [""]).tolist() == [0.0]


def test_the_decoded_completion_of_the_reference_scores_one():
    """What the env hands the reward model (the word tokenizer's decoding, the full stop attached)
    scores 1.0 against the reference."""
    cfg = make_env_config("translate", split="test")
    tok = cfg.tokenizer
    completions = [tok.decode(tok.encode(translation.reference(p))) for p in cfg.prompts[:50]]
    assert completions[0].endswith(".") and not completions[0].endswith(" .")
    assert cfg.reward(list(cfg.prompts[:50]), completions).tolist() == [1.0] * 50


@pytest.mark.parametrize("metric", ["chrf", "bleu"])
def test_score_is_sacrebleus_sentence_score_over_100(metric):
    reward = as_reward_model({"name": "translation", "metric": metric})
    assert isinstance(reward, TranslationReward) and reward.metric == metric
    scorer = CHRF() if metric == "chrf" else BLEU(effective_order=True)
    prompts = [translation.prompt(s) for s, _ in HAND]
    hyps = ["la kano granda la mivo mala vidas .", "la reko veji hulpan .", GLOSSES[2], "la tavon"]
    expected = [scorer.sentence_score(h, [t]).score / 100 for h, (_, t) in zip(hyps, HAND, strict=True)]
    np.testing.assert_allclose(reward(prompts, hyps), expected, rtol=0, atol=1e-12)
    assert min(expected) > 0 and max(expected) < 1


def test_bleu_is_stricter_than_chrf_on_a_partly_right_translation():
    prompt, hyp = translation.prompt(HAND[0][0]), GLOSSES[0]
    chrf, bleu = (TranslationReward(metric=m)([prompt], [hyp])[0] for m in ("chrf", "bleu"))
    assert 0 <= bleu < chrf < 1


@pytest.mark.parametrize("bad", ["BLEU", "ter", "", None, 3])
def test_bad_metric_names_the_value_and_the_accepted_ones(bad):
    with pytest.raises(ValueError, match=r"metric must be one of 'chrf', 'bleu', got ") as info:
        TranslationReward(metric=bad)
    assert repr(bad) in str(info.value)


def test_references_from_a_mapping_and_a_missing_one():
    reward = TranslationReward({"hello =": "saluton"})
    assert reward(["hello ="], ["saluton"]).tolist() == [1.0]
    with pytest.raises(Exception, match=r"no reference translation is known for prompt 'bye ='"):
        reward(["bye ="], ["x"])


def test_reward_pickles_and_scores_the_same():
    reward = TranslationReward(metric="bleu")
    copy = pickle.loads(pickle.dumps(reward))
    prompt = translation.prompt(HAND[1][0])
    assert copy([prompt], [GLOSSES[1]]).tolist() == reward([prompt], [GLOSSES[1]]).tolist()


# -------------------------------------------------------------------------------------- task
def test_split_holds_out_whole_sentences_and_their_translations():
    task = get_task("translate")
    train, test = set(task.split_prompts("train")), set(task.split_prompts("test"))
    assert len(task.prompts) == len(set(task.prompts)) == 5000
    assert len(test) == 1000 and train.isdisjoint(test) and train | test == set(task.prompts)
    # The corpus holds the training pairs only: no test sentence, and no test translation.
    corpus = set(task.corpus)
    assert len(corpus) == 4000
    assert {line.split(" = ")[0] + " =" for line in corpus} == train
    assert all(f"{p} {translation.reference(p)}" in corpus for p in list(train)[:200])
    test_targets = {translation.reference(p) for p in test}
    train_targets = {line.split(" = ")[1] for line in corpus}
    assert not test_targets & train_targets
    assert make_env_config("translate").split == "train"


def test_splits_are_pinned():
    # Results on "test" stay comparable only while the sentence set and the split stay the same.
    task = get_task("translate")
    assert task.test_indices[:4] == (0, 1, 2, 9)
    assert task.split_prompts("test")[:2] == (
        "the black kings follow the friends . =",
        "the old horse finds the teacher . =",
    )


def test_vocabulary_covers_every_reference_and_leaves_other_tasks_alone():
    cfg = make_env_config("translate", split="all")
    tok = cfg.tokenizer
    for prompt in cfg.prompts:
        assert UNK_ID not in tok.encode(translation.reference(prompt)), prompt
    targets = {w for p in cfg.prompts for w in translation.reference(p).split()}
    # la; 10 nouns x 2 numbers; 8 adjectives x 2 endings; 6 verbs x 2 endings; the full stop
    assert len(targets) == 1 + 20 + 16 + 12 + 1
    assert tok.vocab_size == 4 + len(targets | {w for p in cfg.prompts for w in p.split()})
    # Other tasks build their vocabularies from their own corpora: none holds a target word.
    sentiment = make_env_config("sentiment").tokenizer
    assert not targets - {"."} & set(sentiment.vocabulary)


def test_an_episode_by_hand_scores_the_reference_one():
    env = gym.make("TextGen-v0", task="translate", split="test")
    _, info = env.reset(seed=0)
    tok = env.unwrapped.tokenizer
    reference = translation.reference(info["prompt"])
    for token in [*tok.encode(reference), EOS_ID]:
        _, reward, terminated, truncated, info = env.step(token)
    assert terminated and not truncated
    assert reward == 1.0 and info["completion"] == tok.decode(tok.encode(reference))
    env.close()


@pytest.mark.parametrize("metric", ["chrf", "bleu"])
def test_env_checkers_pass(metric):
    env = gym.make("TextGen-v0", task="translate", reward={"name": "translation", "metric": metric})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert [str(w.message) for w in caught] == []
