"""Agents for TextGen-v0: the custom PPO, GRPO and RLOO with a Transformer policy, and
Stable-Baselines3 baselines.

from agents import PPO, PPOConfig
model = PPO("TextGen-v0", config=PPOConfig(), num_envs=64, device="auto", seed=0)
model.learn(total_timesteps=50_000)

from agents import GRPO, GRPOConfig   # or RLOO, RLOOConfig: G completions per prompt, no critic
model = GRPO("TextGen-v0", config=GRPOConfig(group_size=8), num_envs=64, seed=0).learn(50_000)

from agents import PolicyConfig   # an encoder-decoder policy instead of the decoder-only one
model = PPO(config=PPOConfig(policy=PolicyConfig(architecture="seq2seq", n_layers=1, encoder_layers=1)))
"""

from agents.baselines import SB3_AGENTS, evaluate, make_sb3_model
from agents.grpo import GRPO, RLOO, GRPOConfig, RLOOConfig
from agents.policy import KVCache, PolicyConfig, TransformerPolicy
from agents.ppo import PPO, PPOConfig, TrainingDivergedError
from agents.seq2seq import Seq2SeqPolicy

__all__ = [
    "GRPO",
    "PPO",
    "RLOO",
    "SB3_AGENTS",
    "GRPOConfig",
    "KVCache",
    "PPOConfig",
    "PolicyConfig",
    "RLOOConfig",
    "Seq2SeqPolicy",
    "TrainingDivergedError",
    "TransformerPolicy",
    "evaluate",
    "make_sb3_model",
]
