"""The custom agent's Transformer as a Stable-Baselines3 features extractor.

A comparison between the custom PPO and SB3's agents should measure the algorithms and their
engineering, not model capacity. :class:`TransformerExtractor` is the same decoder as
:class:`agents.policy.TransformerPolicy` (same :class:`~agents.policy.PolicyConfig`, same
initialisation); its features are the hidden state of the last real token of the observation,
on which SB3 puts its own policy and value heads (``net_arch=[]``: one linear layer each, like
the custom policy's heads).

Two details of SB3 matter here:

- observations reach the extractor as float tensors (SB3 casts ``Box`` observations to float);
  the extractor rounds them back to integer token ids;
- with ``ortho_init=True`` (SB3's default) ``ActorCriticPolicy`` re-initialises every ``Linear``
  inside the features extractor orthogonally with gain sqrt(2). The policies below restore the
  decoder's own initialisation after SB3's, and keep SB3's for the heads (gain 0.01 for the
  action head, 1 for the value head).

Use them through :func:`agents.baselines.make_sb3_model`, or directly::

    from stable_baselines3 import PPO
    from agents.extractor import TransformerActorCriticPolicy

    model = PPO(TransformerActorCriticPolicy, make_sb3_vec_env(64), policy_kwargs={"d_model": 64})
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from agents.policy import PolicyConfig, TransformerDecoder

POLICY_FIELDS = ("d_model", "n_layers", "n_heads", "mlp_ratio", "positional")


class TransformerExtractor(BaseFeaturesExtractor):
    """Hidden state (B, d_model) of the last real token of TextGen-v0 observations.

    :param observation_space: TextGen-v0's ``Dict(input_ids, attention_mask)``; the vocabulary
        size and the sequence length are read from it.
    :param d_model, n_layers, n_heads, mlp_ratio, positional: the
        :class:`~agents.policy.PolicyConfig` (defaults: the custom policy's).
    """

    def __init__(self, observation_space: spaces.Dict, **policy: Any):
        if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != {
            "input_ids",
            "attention_mask",
        }:
            raise ValueError(
                "TransformerExtractor reads TextGen-v0 observations, a Dict of input_ids and "
                f"attention_mask; got {observation_space}"
            )
        unknown = set(policy) - set(POLICY_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown TransformerExtractor argument(s) {sorted(unknown)}; accepted: {POLICY_FIELDS}"
            )
        cfg = PolicyConfig(**policy)
        super().__init__(observation_space, features_dim=cfg.d_model)
        ids_space = observation_space["input_ids"]
        vocab_size = int(ids_space.high.max()) + 1
        self.decoder = TransformerDecoder(vocab_size, ids_space.shape[0], cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The decoder's own initialisation (undoes SB3's orthogonal one)."""
        self.decoder.reset_parameters()

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = observations["input_ids"].round().long()  # SB3 hands over floats
        mask = observations["attention_mask"].round().long()
        return self.decoder.last_hidden(ids, mask)


class _RestoreExtractorInit:
    """Mixin for SB3 actor-critic policies: after SB3 builds (and orthogonally initialises) the
    networks, give every :class:`TransformerExtractor` back its own initialisation."""

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, TransformerExtractor):
                module.reset_parameters()


def _transformer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Default to the Transformer extractor with linear heads; SB3 kwargs pass through."""
    policy = {k: kwargs.pop(k) for k in POLICY_FIELDS if k in kwargs}
    kwargs.setdefault("features_extractor_class", TransformerExtractor)
    if kwargs["features_extractor_class"] is TransformerExtractor:
        kwargs["features_extractor_kwargs"] = {**policy, **kwargs.get("features_extractor_kwargs", {})}
    elif policy:
        raise TypeError(f"{sorted(policy)} apply to the TransformerExtractor only")
    kwargs.setdefault("net_arch", [])
    return kwargs


class TransformerActorCriticPolicy(_RestoreExtractorInit, MultiInputActorCriticPolicy):
    """SB3's ``MultiInputPolicy`` (PPO, A2C) on :class:`TransformerExtractor`.

    Takes every SB3 policy argument, plus the :class:`~agents.policy.PolicyConfig` fields
    (``d_model``, ``n_layers``, ...) as shortcuts for ``features_extractor_kwargs``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **_transformer_kwargs(kwargs))


class MaskableTransformerActorCriticPolicy(_RestoreExtractorInit, MaskableMultiInputActorCriticPolicy):
    """sb3-contrib's ``MaskableMultiInputActorCriticPolicy`` (MaskablePPO) on :class:`TransformerExtractor`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **_transformer_kwargs(kwargs))
