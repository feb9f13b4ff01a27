"""Agents for TextGen-v0: Stable-Baselines3 baselines and evaluation helpers.

The custom PPO agent with a Transformer policy lands here as ``agents.PPO`` (see the README's
roadmap); until then :mod:`agents.baselines` trains SB3 agents on the batched environment.
"""

from agents.baselines import SB3_AGENTS, evaluate, make_sb3_model

__all__ = ["SB3_AGENTS", "evaluate", "make_sb3_model"]
