"""The coefficient β of the KL penalty to a reference policy: fixed, or adaptive.

The penalty keeps a fine-tuned language model near the model it started from: each generated
token's reward gets ``-β · (log π(a|s) - log π_ref(a|s))``. With a target, β follows the
proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences", section 2.2): after each rollout,

    e = clip(KL / target - 1, -0.2, 0.2),    β ← β · (1 + e · min(n / horizon, 1)),

where KL is the rollout's mean KL per episode and n the env steps in the rollout (capped at the
horizon, so that β stays positive however long a rollout is). Too much KL
raises β, too little lowers it; the clip bounds the change per rollout.
"""

from __future__ import annotations

import math

from textgym.checks import is_positive_int, is_real


class KLController:
    """β, fixed (``target=None``) or adapted towards ``target`` nats per episode.

    :param init: β at the start (>= 0).
    :param target: KL per episode the controller aims at; None keeps β fixed.
    :param horizon: env steps over which a persistent error of 20% changes β by about 20%.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10_000):
        if not is_real(init) or not 0 <= init < math.inf:
            raise ValueError(f"the initial KL coefficient must be a finite number >= 0, got {init!r}")
        if target is not None and (not is_real(target) or not 0 < target < math.inf):
            raise ValueError(f"the KL target must be None or a positive number, got {target!r}")
        if not is_positive_int(horizon):
            raise ValueError(f"the KL horizon must be a positive integer, got {horizon!r}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        """Move β after a rollout of ``n_steps`` env steps whose mean KL per episode was ``kl``."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            # n / horizon is capped at 1 so that one long rollout cannot flip β's sign
            self.value *= 1.0 + error * min(n_steps / self.horizon, 1.0)
        return self.value

    def __repr__(self) -> str:
        return f"KLController(value={self.value:.4g}, target={self.target}, horizon={self.horizon})"
