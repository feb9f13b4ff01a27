"""sb3-contrib's ``RecurrentPPO`` on TextGen-v0, seeing one new token per step.

TextGen-v0's observation is the whole history: the prompt and every token generated so far. A
recurrent agent should carry that history in its LSTM state instead, so ``sb3-recurrent-ppo``
sees, at every step, an observation that grows by nothing but the newest token:

    [prompt ids (P columns, left-padded as in TextGen-v0), last token, step]    int64, (P + 2,)

- **prompt ids**: the prompt window, unchanged through the episode. Actions emit tokens, so the
  prompt cannot be fed one token per step; it is given whole, at every step, as a fixed context.
- **last token**: the token emitted at the previous step, or at step 0 the prompt's last token
  (the step is what tells the two apart).
- **step**: how many tokens have been generated, 0 .. ``max_new_tokens``.

:class:`TokenEmbeddingExtractor` embeds it (each prompt token with its column, the last token
with the same embedding table, the step) into one vector, which the policy's LSTM reads once per
step (sb3-contrib's ``MlpLstmPolicy`` with this features extractor). :class:`LastTokenVecEnv`
gives the recurrent agent this observation during training; :func:`recurrent_policy` gives it at
evaluation, where it also starts the LSTM state afresh wherever an episode starts (step 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn
from torch import nn


class LastTokenObservation:
    """Maps TextGen-v0 observations to the recurrent agent's ``[prompt ids, last token, step]``.

    :param max_prompt_tokens: P, the env's prompt window.
    :param max_new_tokens: M, the env's generation budget.
    :param vocab_size: V, the env's vocabulary.
    """

    def __init__(self, max_prompt_tokens: int, max_new_tokens: int, vocab_size: int):
        self.P, self.M, self.V = int(max_prompt_tokens), int(max_new_tokens), int(vocab_size)

    @classmethod
    def from_space(cls, space: spaces.Box) -> LastTokenObservation:
        """The mapping whose :attr:`space` is ``space`` (a trained model's observation space)."""
        high = np.asarray(space.high)
        if space.shape is None or len(space.shape) != 1 or space.shape[0] < 3:
            raise ValueError(f"not a recurrent agent's observation space: {space}")
        return cls(space.shape[0] - 2, int(high[-1]), int(high[0]) + 1)

    @property
    def space(self) -> spaces.Box:
        high = np.array([self.V - 1] * (self.P + 1) + [self.M], dtype=np.int64)
        return spaces.Box(0, high, shape=(self.P + 2,), dtype=np.int64)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """``obs`` of one env (arrays of shape (L,)) or of a batch (N, L) -> (P + 2,) or (N, P + 2)."""
        ids, mask = np.asarray(obs["input_ids"]), np.asarray(obs["attention_mask"])
        single = ids.ndim == 1
        ids, mask = np.atleast_2d(ids), np.atleast_2d(mask)  # (N, L)
        if ids.shape[1] != self.P + self.M:
            raise ValueError(
                f"observations of {ids.shape[1]} columns do not fit the recurrent agent's env "
                f"(max_prompt_tokens={self.P} + max_new_tokens={self.M}); evaluate it on the env it trained on"
            )
        steps = mask[:, self.P :].sum(axis=1)  # (N,) tokens generated so far
        # The t-th generated token is in column P + t, so the newest is in column P - 1 + t; at
        # t = 0 that is the prompt's last token.
        last = ids[np.arange(len(ids)), self.P - 1 + steps]  # (N,)
        out = np.concatenate([ids[:, : self.P], last[:, None], steps[:, None]], axis=1).astype(np.int64)
        return out[0] if single else out  # (N, P + 2)


class LastTokenVecEnv(VecEnvWrapper):
    """A TextGen-v0 ``VecEnv`` whose observations (and ``terminal_observation`` infos) are
    :class:`LastTokenObservation`'s."""

    def __init__(self, venv: VecEnv):
        config = venv.get_attr("config", indices=[0])[0]
        self.transform = LastTokenObservation(
            config.max_prompt_tokens, config.max_new_tokens, config.tokenizer.vocab_size
        )
        super().__init__(venv, observation_space=self.transform.space)

    def reset(self) -> np.ndarray:
        return self.transform(self.venv.reset())

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self.transform(info["terminal_observation"])
        return self.transform(obs), rewards, dones, infos


class TokenEmbeddingExtractor(BaseFeaturesExtractor):
    """Embeds ``[prompt ids, last token, step]``: each prompt token plus its column's embedding,
    the last token (the same token table) and the step, concatenated: ``(P + 2) * embed_dim``
    features.

    :param observation_space: :attr:`LastTokenObservation.space`.
    :param embed_dim: size of each embedding.
    """

    def __init__(self, observation_space: spaces.Box, embed_dim: int = 16):
        layout = LastTokenObservation.from_space(observation_space)
        super().__init__(observation_space, features_dim=(layout.P + 2) * embed_dim)
        self.P = layout.P
        self.token = nn.Embedding(layout.V, embed_dim)
        self.column = nn.Embedding(layout.P, embed_dim)
        self.step = nn.Embedding(layout.M + 1, embed_dim)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        ids = observations.long()  # SB3 hands Box observations over as floats; (B, P + 2)
        prompt = self.token(ids[:, : self.P]) + self.column.weight  # (B, P, E)
        last, step = self.token(ids[:, self.P]), self.step(ids[:, self.P + 1])  # (B, E) each
        return torch.cat([prompt.flatten(1), last, step], dim=1)  # (B, (P + 2) * E)


def recurrent_policy(
    model: RecurrentPPO, deterministic: bool = True
) -> Callable[[dict[str, Any]], np.ndarray]:
    """``model``'s policy as a function of a batch of TextGen-v0 observations (for
    :func:`agents.baselines.evaluate`): it maps them to the recurrent observation and keeps the
    LSTM state between calls, starting it afresh for every row at step 0 (an episode's start)."""
    transform = LastTokenObservation.from_space(model.observation_space)
    state: tuple[np.ndarray, ...] | None = None

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal state
        x = transform(obs)  # (N, P + 2)
        if state is not None and state[0].shape[1] != len(x):  # (layers, N, hidden)
            state = None
        actions, state = model.predict(
            x, state=state, episode_start=x[:, -1] == 0, deterministic=deterministic
        )
        return actions

    return act
