"""Sweeps of PPO's hyperparameters, judged by reward per env step (not by speed).

One run (:func:`train_run`) trains :class:`agents.ppo.PPO` from scratch on one task with one
setting (``num_envs`` and :class:`~agents.ppo.PPOConfig` fields) and one seed, to a budget of env
steps, and records the learning curve: ``rollout/ep_rew_mean`` (the mean return of the last 100
training episodes, sampled from the policy, as Stable-Baselines3 computes it) after every update,
against the env steps taken so far. From the curve it reads

- the reward at each mark (by default 30k and 100k env steps): the **last value logged at or
  before the mark**, not an interpolation. Updates come every ``num_envs * n_steps`` env steps,
  so a setting with long rollouts is read a little earlier than the mark (at most one rollout);
- the env steps to the task's threshold: the first logged step at which the curve is at or above
  it (None if it never is). Its resolution is one rollout.

Every mark is read from the **one** run trained with ``learn(total_timesteps)``: the learning rate
anneals linearly to 0 over ``total_timesteps`` (``PPOConfig.anneal_lr``), so a run trained to 30k
separately would have a different schedule from the one read at 30k here, and is not what this
measures. ``learn`` also ends at the first whole rollout at or past the budget, so the last point
of a curve may lie a little beyond it.

:func:`run_grid` runs every task x setting x seed one after another (never in parallel: the
figures include wall time); :func:`summarize` groups runs over seeds (mean and sample std);
:func:`markdown_table` formats the groups. ``scripts/sweep.py`` is the command line.

Tasks are the built-in ones (:data:`textgym.tasks.TASKS`, threshold their ``reward_threshold``)
and :data:`PLAIN_TASKS`, plain-function rewards on a built-in task, which exercise the
``reward=<function>`` path that no built-in covers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import textgym  # noqa: F401  (registers TextGen-v0)
from agents.compare import mean_and_std
from agents.ppo import PPO, PPOConfig
from textgym.tasks import TASKS, get_task

SWEEP_FIELDS = ("num_envs", "n_steps", "n_epochs", "num_minibatches", "learning_rate")
"""The fields a setting is shown by (``num_envs`` is PPO's argument, the others PPOConfig's)."""
DEFAULT_NUM_ENVS = PPO.default_num_envs
"""``PPO``'s default ``num_envs`` (16, this sweep's choice; 64 before it)."""
DEFAULT_MARKS = (30_000, 100_000)
DEFAULT_TIMESTEPS = 100_000

Curve = Sequence[tuple[int, float]]
"""``(env steps, rollout/ep_rew_mean)`` after each update, steps ascending."""


# ----------------------------------------------------------------------------------- tasks
ALLITERATION_MAX = 8
"""The default task's ``max_new_tokens``: a completion holds at most this many words."""


def alliteration(prompt: str, completion: str) -> float:
    """A plain-function reward: the distinct whitespace-separated words of the completion that
    start with the letter its first word starts with, over :data:`ALLITERATION_MAX`, in [0, 1].

    The policy must choose a letter and then keep to it without repeating a word: a choice made
    across the tokens of an episode, unlike the per-token lexicon of the default task. The untrained
    policy scores about 0.17 on the default task's 131 words; its most common initials, s and b,
    start 16 and 15 words, so 1.0 is reachable."""
    words = completion.split()
    if not words:
        return 0.0
    initial = words[0][0]
    return len({w for w in words if w[0] == initial}) / ALLITERATION_MAX


@dataclass(frozen=True)
class SweepTask:
    """What one run trains on: the env's arguments and the reward that counts as solved."""

    name: str
    env_kwargs: Mapping[str, Any]
    reward_threshold: float


PLAIN_TASKS: dict[str, SweepTask] = {
    # 0.75: six distinct words of one initial in eight tokens, on average over sampled episodes.
    "alliteration": SweepTask(
        "alliteration", {"task": "sentiment", "reward": alliteration}, reward_threshold=0.75
    ),
}


def task_names() -> tuple[str, ...]:
    """Every task a sweep accepts: the built-ins, then :data:`PLAIN_TASKS`."""
    return (*TASKS, *PLAIN_TASKS)


def get_sweep_task(name: str) -> SweepTask:
    """The :class:`SweepTask` called ``name`` (``"default"`` is the default built-in task)."""
    if name in PLAIN_TASKS:
        return PLAIN_TASKS[name]
    if name != "default" and name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: default, {', '.join(task_names())}")
    task = get_task(name)
    return SweepTask(task.name, {"task": task.name}, task.reward_threshold)


# -------------------------------------------------------------------------------- settings
_SCALAR_FIELDS = {f.name: f.default for f in dataclasses.fields(PPOConfig) if f.name != "policy"}


@dataclass(frozen=True)
class Setting:
    """One point of the grid: ``num_envs`` and the PPOConfig fields that differ from the defaults."""

    num_envs: int = DEFAULT_NUM_ENVS
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_envs, bool) or not isinstance(self.num_envs, int) or self.num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {self.num_envs!r}")
        unknown = sorted(set(self.overrides) - set(_SCALAR_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown PPOConfig field(s) {unknown}; accepted: num_envs, {', '.join(_SCALAR_FIELDS)}"
            )
        # Drop the overrides equal to the default, so equal settings have equal labels.
        kept = {
            k: v
            for k, v in self.overrides.items()
            if not (v == _SCALAR_FIELDS[k] and type(v) is type(_SCALAR_FIELDS[k]))
        }
        object.__setattr__(self, "overrides", kept)
        self.config()  # PPOConfig's own checks: a bad value fails here, before any training

    def config(self) -> PPOConfig:
        return PPOConfig(**self.overrides)

    def values(self) -> dict[str, Any]:
        """Every field of :data:`SWEEP_FIELDS`, then any other override."""
        cfg = self.config()
        shown = {"num_envs": self.num_envs, **{k: getattr(cfg, k) for k in SWEEP_FIELDS[1:]}}
        return shown | {k: v for k, v in self.overrides.items() if k not in shown}

    @property
    def label(self) -> str:
        """``num_envs=16,n_steps=32,...``: the form :func:`parse_setting` reads."""
        return ",".join(f"{k}={v}" for k, v in self.values().items())

    @property
    def rollout_size(self) -> int:
        return self.num_envs * self.config().n_steps


def _parse_value(name: str, text: str) -> Any:
    text = text.strip()
    default = DEFAULT_NUM_ENVS if name == "num_envs" else _SCALAR_FIELDS[name]
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if isinstance(default, bool):
        raise ValueError(f"{name}={text!r}: must be true or false")
    try:
        number = int(text)
        # "learning_rate=1" means 1.0: a float field keeps its type (JSON, the config's checks)
        return float(number) if isinstance(default, float) else number
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not a number, true/false or none") from None
    # 1e3 for an integer field: keep it an integer if it is one, else let the checks refuse it
    if isinstance(default, int) and not isinstance(default, bool) and value.is_integer():
        return int(value)
    return value


def parse_setting(text: str) -> Setting:
    """A :class:`Setting` from ``"num_envs=16,n_steps=32,learning_rate=3e-4"``: comma-separated
    ``field=value`` pairs, any of ``num_envs`` and PPOConfig's scalar fields, the others at their
    defaults; an empty string is the defaults. ValueError naming the bad part."""
    pairs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise ValueError(f"{part!r} is not field=value")
        if name != "num_envs" and name not in _SCALAR_FIELDS:
            raise ValueError(
                f"unknown PPOConfig field {name!r}; accepted: num_envs, {', '.join(_SCALAR_FIELDS)}"
            )
        if name in pairs:
            raise ValueError(f"{name} is given twice")
        pairs[name] = _parse_value(name, value)
    return Setting(pairs.pop("num_envs", DEFAULT_NUM_ENVS), pairs)


# -------------------------------------------------------------------------------- curves
def value_at(curve: Curve, step: int) -> float | None:
    """The last value of ``curve`` logged at or before env step ``step`` (no interpolation);
    None if nothing was logged by then."""
    found = None
    for at, value in curve:
        if at > step:
            break
        found = value
    return found


def steps_to_threshold(curve: Curve, threshold: float) -> int | None:
    """The first env step at which ``curve`` is at or above ``threshold``; None if never."""
    return next((at for at, value in curve if value >= threshold), None)


@dataclass(frozen=True)
class RunResult:
    """One trained run and the figures read from its curve (see the module doc)."""

    task: str
    setting: Setting
    seed: int
    total_timesteps: int
    curve: tuple[tuple[int, float], ...]
    at_marks: dict[int, float | None]
    """Reward at each mark: the last curve value at or before it."""
    reward_threshold: float
    steps_to_threshold: int | None
    wall_seconds: float
    env_steps: int
    """Env steps actually trained: ``total_timesteps`` rounded up to whole rollouts."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "setting": self.setting.values(),
            "label": self.setting.label,
            "seed": self.seed,
            "total_timesteps": self.total_timesteps,
            "env_steps": self.env_steps,
            "wall_seconds": self.wall_seconds,
            "reward_threshold": self.reward_threshold,
            "steps_to_threshold": self.steps_to_threshold,
            "at_marks": {str(k): v for k, v in self.at_marks.items()},
            "curve": [list(p) for p in self.curve],
        }


def train_run(
    task: str,
    setting: Setting,
    seed: int = 0,
    total_timesteps: int = DEFAULT_TIMESTEPS,
    marks: Sequence[int] = DEFAULT_MARKS,
    device: str = "cpu",
) -> RunResult:
    """Train one PPO run with ``learn(total_timesteps)`` and read its curve (see the module doc).

    ``marks`` past ``total_timesteps`` are read all the same (the last value): a shorter budget
    also anneals the learning rate faster, so do not read a 30k budget as if it were the 30k mark
    of a 100k one. Set torch's threads before calling (``agents.runtime.set_threads``)."""
    spec = get_sweep_task(task)
    model = PPO("TextGen-v0", setting.config(), setting.num_envs, dict(spec.env_kwargs), device, seed=seed)
    curve: list[tuple[int, float]] = []

    def record(m: PPO) -> None:
        reward = m.last_stats.get("rollout/ep_rew_mean")
        if reward is not None:  # none yet when no episode has ended in the first rollout
            curve.append((int(m.num_timesteps), float(reward)))

    start = time.perf_counter()
    model.learn(total_timesteps, callback=record)
    seconds = time.perf_counter() - start
    return RunResult(
        task=spec.name,
        setting=setting,
        seed=seed,
        total_timesteps=total_timesteps,
        curve=tuple(curve),
        at_marks={m: value_at(curve, m) for m in marks},
        reward_threshold=spec.reward_threshold,
        steps_to_threshold=steps_to_threshold(curve, spec.reward_threshold),
        wall_seconds=seconds,
        env_steps=int(model.num_timesteps),
    )


def run_grid(
    tasks: Sequence[str],
    settings: Sequence[Setting],
    seeds: Sequence[int] = (0,),
    total_timesteps: int = DEFAULT_TIMESTEPS,
    marks: Sequence[int] = DEFAULT_MARKS,
    device: str = "cpu",
    on_result: Callable[[RunResult, int, int], None] | None = None,
) -> list[RunResult]:
    """Every task x setting x seed, one run after another, in that order (a task's settings
    side by side). ``on_result(result, index, count)`` is called after each run (1-based index),
    e.g. to print progress and save what is done so far."""
    for task in tasks:
        get_sweep_task(task)  # unknown names fail before the first run
    jobs = [(t, s, seed) for t in tasks for s in settings for seed in seeds]
    results = []
    for i, (task, setting, seed) in enumerate(jobs, 1):
        result = train_run(task, setting, seed, total_timesteps, marks, device)
        results.append(result)
        if on_result is not None:
            on_result(result, i, len(jobs))
    return results


# ------------------------------------------------------------------------------- reports
def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per (task, setting), in order of first appearance: mean and sample std over seeds
    of the reward at each mark (over the seeds that have a value there), the mean env steps to
    the threshold over the seeds that reached it and how many did, and the mean wall time."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.setting.label), []).append(r)
    rows = []
    for (task, label), runs in groups.items():
        row: dict[str, Any] = {
            "task": task,
            "label": label,
            **runs[0].setting.values(),
            "seeds": [r.seed for r in runs],
            "reward_threshold": runs[0].reward_threshold,
        }
        marks = sorted({m for r in runs for m in r.at_marks})
        for m in marks:
            values = [v for r in runs if (v := r.at_marks.get(m)) is not None]
            row[f"reward_at_{m}"] = mean_and_std(values) if values else None
        reached = [r.steps_to_threshold for r in runs if r.steps_to_threshold is not None]
        row["steps_to_threshold_mean"] = float(np.mean(reached)) if reached else None
        row["seeds_reaching"] = len(reached)
        row["wall_seconds_mean"] = float(np.mean([r.wall_seconds for r in runs]))
        rows.append(row)
    return rows


def _steps(n: float) -> str:
    return f"{n / 1000:.1f}k"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`summarize` as a Markdown table: the setting's fields, the reward at each
    mark as ``mean ± std`` (std over seeds; none with one seed), steps to the threshold as the
    mean over the seeds that reached it with ``k/n`` seeds, and mean wall seconds per run."""
    if not rows:
        return ""
    marks = sorted(
        {int(k.removeprefix("reward_at_")) for row in rows for k in row if k.startswith("reward_at_")}
    )
    extra = [k for row in rows for k in row.get("label", "").split(",")]
    fields = list(SWEEP_FIELDS) + sorted({k.partition("=")[0] for k in extra} - set(SWEEP_FIELDS) - {""})
    header = [
        "task",
        *fields,
        "seeds",
        *(f"reward @ {_steps(m)}" for m in marks),
        "steps to threshold",
        "s/run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        n = len(row["seeds"])
        cells = [f"{row['task']} (≥{row['reward_threshold']:g})"]
        cells += [_fmt_field(row.get(k)) for k in fields]
        cells.append(str(n))
        for m in marks:
            value = row.get(f"reward_at_{m}")
            if value is None:
                cells.append("–")
            else:
                mean, std = value
                cells.append(f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
        reached = row["seeds_reaching"]
        if reached:
            cells.append(f"{_steps(row['steps_to_threshold_mean'])} ({reached}/{n})")
        else:
            cells.append(f"never (0/{n})")
        cells.append(f"{row['wall_seconds_mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_field(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:g}"
    return str(value)
