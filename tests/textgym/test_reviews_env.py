"""The "reviews" task and the VADER reward through the environment, with the byte-level tokenizer
and a Hugging Face tokenizer folder; the task's prompt splits through ``gym.make``."""

from __future__ import annotations

import inspect

import gymnasium as gym
import numpy as np
import pytest

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym import TextGenEnv, TextGenVectorEnv
from textgym.tasks import SPLITS, get_task
from textgym.tokenizers import EOS_ID

pytest.importorskip("vaderSentiment")
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

VADER = SentimentIntensityAnalyzer()
COMPLETIONS = [" was great!", " was not good at all.", " was a phone."]

needs_split = pytest.mark.skipif(
    "split" not in inspect.signature(TextGenEnv.__init__).parameters
    or "split" not in inspect.signature(TextGenVectorEnv.__init__).parameters,
    reason="TextGenEnv/TextGenVectorEnv do not take split= yet (textgym/env.py, textgym/vector.py)",
)


def play(env: gym.Env, ids: list[int], seed: int = 0) -> tuple[float, dict]:
    """One episode from reset(seed) that emits ``ids`` then <eos>; its return and last info."""
    _, info = env.reset(seed=seed)
    total = 0.0
    for action in [*ids, EOS_ID]:
        _, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        if terminated or truncated:
            break
    assert terminated and not truncated
    return total, info


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_reviews_env_rewards_the_vader_score_of_the_completion(completion):
    env = gym.make("TextGen-v0", task="reviews")
    tok = env.unwrapped.tokenizer
    ret, info = play(env, tok.encode(completion))
    assert info["completion"] == completion
    assert info["prompt"] in get_task("reviews").split_prompts("train")  # the default split
    assert ret == info["reward_components"]["score"] == VADER.polarity_scores(completion)["compound"]


def test_vector_reviews_env_scores_a_batch_with_vader():
    venv = gym.make_vec("TextGen-v0", num_envs=3, task="reviews")
    tok = venv.unwrapped.tokenizer
    rows = [tok.encode(c) for c in COMPLETIONS]
    venv.reset(seed=0)
    scores = np.zeros(3)
    for t in range(max(map(len, rows)) + 1):
        actions = np.array([row[t] if t < len(row) else EOS_ID for row in rows])
        _, reward, terminated, _, _ = venv.step(actions)
        ending = terminated & np.array([t == len(row) for row in rows])
        scores[ending] = reward[ending]
    expected = [VADER.polarity_scores(c)["compound"] for c in COMPLETIONS]
    np.testing.assert_array_equal(scores, expected)
    venv.close()


def test_reviews_with_a_hugging_face_tokenizer_folder(tmp_path):
    pytest.importorskip("transformers")
    from textgym.hf import HFTokenizer, train_bpe_tokenizer

    task = get_task("reviews")
    train_bpe_tokenizer([*task.corpus, *task.prompts], 400).save_pretrained(tmp_path / "tok")
    env = gym.make("TextGen-v0", task="reviews", tokenizer=str(tmp_path / "tok"), reward="vader")
    tok = env.unwrapped.tokenizer
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(" was great!")
    assert len(ids) < len(" was great!")  # merged tokens, not bytes
    ret, info = play(env, ids, seed=3)
    assert info["completion"] == " was great!" and ret == pytest.approx(0.6588)


@needs_split
@pytest.mark.parametrize("split", SPLITS)
def test_split_through_gym_make_and_make_vec(split):
    task = get_task("reviews")
    expected = task.split_prompts(split)
    env = gym.make("TextGen-v0", task="reviews", reward="vader", split=split)
    venv = gym.make_vec("TextGen-v0", num_envs=2, task="reviews", split=split)
    assert env.unwrapped.config.prompts == venv.unwrapped.config.prompts == expected
    seen = {env.reset(seed=s)[1]["prompt"] for s in range(40)}
    assert seen <= set(expected) and len(seen) > 10
    # One observation space for every split: a policy trained on "train" runs on "test".
    default = gym.make("TextGen-v0", task="reviews")
    assert env.observation_space == default.observation_space
    venv.close()


@needs_split
def test_split_through_gym_make_for_arithmetic_and_errors():
    assert len(gym.make("TextGen-v0", task="arithmetic").unwrapped.config.prompts) == 400  # unchanged
    test = gym.make("TextGen-v0", task="arithmetic", split="test").unwrapped.config.prompts
    assert test == get_task("arithmetic").split_prompts("test")
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'test', 'all'.*got 'dev'"):
        gym.make("TextGen-v0", task="arithmetic", split="dev")
