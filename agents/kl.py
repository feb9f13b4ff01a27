"""The coefficient β of the KL penalty to a reference policy: fixed, or adaptive.

The penalty keeps a fine-tuned language model near the model it started from: each generated
token's reward gets ``-β · (log π(a|s) - log π_ref(a|s))``. With a target, β follows the
proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences", section 2.2): after each rollout,

    e = clip(KL / target - 1, -0.2, 0.2),    β ← β · (1 + e · min(n / horizon, 1)),

where KL is the rollout's mean KL per episode (nats, summed over an episode's tokens) and n the env
steps in the rollout, all envs together. Too much KL raises β, too little lowers it; the clip
bounds the change per rollout to 20%, and ``n / horizon`` (capped at 1, so that β stays positive
however long a rollout is) scales it down further.

**Choosing the horizon.** ``n / horizon`` is the controller's gain per update. Ziegler et al.'s
``horizon=10000`` counted episodes, with 512 of them per update: a gain of 0.05. Here n counts
env steps, and PPO's rollouts are a few hundred of them: with ``horizon=10000`` and 256 env steps
per rollout the gain is 0.0256, so β moves by at most ±0.51% per update, about 136 updates to
double. Worse, a run starts with π = π_ref, KL = 0 below any target, so β first falls at that
rate for as long as the policy takes to drift: 27 such updates take β from 0.100 to 0.087
(0.99488²⁷ = 0.870), and when KL then overshoots to twice its target β climbs back by 0.5% per
update: the run that led here saw β go from 0.100 to 0.087 while KL rose from 0 to 2.1 (target
1). ``horizon=None`` (the controller's default) makes the horizon one rollout, a gain of 1: β
moves by its clipped error, up to ±20%, after every update, ×1.2⁴ ≈ 2.07 in four updates when KL
stays far above target. An integer horizon keeps its meaning in env steps; the controller warns once when it is
so long that β can move less than 1% per update.

A rollout in which no episode ended measures no KL (``kl`` is NaN): β stays, and its env steps are
carried over to the next measured rollout, whose episodes span both, so that β's rate does not
depend on whether episodes end inside rollouts or across them.
"""

from __future__ import annotations

import math
import warnings

from textgym.checks import is_integer, is_positive_int, is_real

MAX_ERROR = 0.2  # the clip of the proportional error (Ziegler et al. 2019)
SLOW_STEP = 0.01  # warn when β can move by less than this fraction per update


class KLController:
    """β, fixed (``target=None``) or adapted towards ``target`` nats per episode.

    :param init: β at the start (>= 0).
    :param target: KL per episode the controller aims at; None keeps β fixed.
    :param horizon: env steps (all envs together) over which a persistent clipped error of 20%
        changes β by about 20%: each update multiplies β by ``1 + e · min(n / horizon, 1)``.
        None: one rollout, whatever its size, so that β moves by its clipped error (up to 20%)
        after every update.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int | None = None):
        if not is_real(init) or not 0 <= init < math.inf:
            raise ValueError(f"the initial KL coefficient must be a finite number >= 0, got {init!r}")
        if target is not None and (not is_real(target) or not 0 < target < math.inf):
            raise ValueError(f"the KL target must be None or a positive number, got {target!r}")
        if horizon is not None and not is_positive_int(horizon):
            raise ValueError(
                f"the KL horizon must be None (one rollout) or a positive integer of env steps, got {horizon!r}"
            )
        self.value, self.target = float(init), target
        self.horizon = None if horizon is None else int(horizon)
        self.pending_steps = 0
        """Env steps of rollouts in which no episode ended, not yet counted in an update."""
        self._warned = False

    def gain(self, n_steps: int) -> float:
        """The fraction of the clipped error by which an update after ``n_steps`` env steps moves β."""
        return 1.0 if self.horizon is None else min(n_steps / self.horizon, 1.0)

    def update(self, kl: float, n_steps: int) -> float:
        """Move β after a rollout of ``n_steps`` env steps whose mean KL per episode was ``kl``.

        A non-finite ``kl`` (no episode ended in the rollout) leaves β and carries ``n_steps``
        over to the next update.
        """
        if not is_integer(n_steps) or n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0 (env steps in the rollout), got {n_steps!r}")
        if self.target is None:
            return self.value
        if not math.isfinite(kl):
            self.pending_steps += int(n_steps)
            return self.value
        n, self.pending_steps = int(n_steps) + self.pending_steps, 0
        gain = self.gain(n)
        if MAX_ERROR * gain < SLOW_STEP and not self._warned:
            self._warned = True
            warnings.warn(
                f"KL horizon {self.horizon:,} env steps against rollouts of {n:,}: β can change by at "
                f"most ±{100 * MAX_ERROR * gain:.2g}% per update, about "
                f"{math.log(2) / math.log1p(MAX_ERROR * gain):.0f} updates to double or halve, so it "
                "barely follows the KL; use a horizon of one to a few rollouts, or None (one rollout)",
                stacklevel=2,
            )
        error = min(max(kl / self.target - 1.0, -MAX_ERROR), MAX_ERROR)
        self.value *= 1.0 + error * gain
        return self.value

    def __repr__(self) -> str:
        return f"KLController(value={self.value:.4g}, target={self.target}, horizon={self.horizon})"
