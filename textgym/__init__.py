"""textgym: reinforcement learning for language generation as a Gymnasium environment.

Importing the package registers ``TextGen-v0``::

    import gymnasium as gym
    import textgym

    env = gym.make("TextGen-v0")                          # one episode at a time
    venv = gym.make_vec("TextGen-v0", num_envs=256)       # N episodes as one batch

``gym.make("textgym:TextGen-v0")`` imports the package itself.
"""

import gymnasium as gym

from textgym.env import TextGenEnv
from textgym.rewards import (
    ExactMatchReward,
    FunctionReward,
    KeywordReward,
    LengthReward,
    RegexReward,
    RewardModel,
    RewardModelError,
    SentimentReward,
    TokenFunctionReward,
    TokenRewardModel,
    TranslationReward,
    VaderReward,
    as_reward_model,
)
from textgym.tasks import SPLITS, TASKS, EnvConfig, get_task, make_env_config
from textgym.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer
from textgym.vector import TextGenVectorEnv

__version__ = "0.1.0"

ENV_ID = "TextGen-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="textgym.env:TextGenEnv",
        vector_entry_point="textgym.vector:TextGenVectorEnv",
        # The default task's; another task= has its own, get_task(name).reward_threshold.
        reward_threshold=get_task("default").reward_threshold,
    )

__all__ = [
    "ENV_ID",
    "SPLITS",
    "TASKS",
    "ByteTokenizer",
    "CharTokenizer",
    "EnvConfig",
    "ExactMatchReward",
    "FunctionReward",
    "KeywordReward",
    "LengthReward",
    "RegexReward",
    "RewardModel",
    "RewardModelError",
    "SentimentReward",
    "TextGenEnv",
    "TextGenVectorEnv",
    "TokenFunctionReward",
    "TokenRewardModel",
    "Tokenizer",
    "TranslationReward",
    "VaderReward",
    "WordTokenizer",
    "as_reward_model",
    "get_task",
    "make_env_config",
]
