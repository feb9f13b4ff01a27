"""Agents for TextGen-v0: the custom PPO with a Transformer policy, and Stable-Baselines3 baselines.

from agents import PPO, PPOConfig
model = PPO("TextGen-v0", config=PPOConfig(), num_envs=64, device="auto", seed=0)
model.learn(total_timesteps=50_000)
"""

from agents.baselines import SB3_AGENTS, evaluate, make_sb3_model
from agents.policy import KVCache, PolicyConfig, TransformerPolicy
from agents.ppo import PPO, PPOConfig, TrainingDivergedError

__all__ = [
    "PPO",
    "SB3_AGENTS",
    "KVCache",
    "PPOConfig",
    "PolicyConfig",
    "TrainingDivergedError",
    "TransformerPolicy",
    "evaluate",
    "make_sb3_model",
]
