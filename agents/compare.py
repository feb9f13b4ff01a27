"""Compare agents on TextGen-v0: every agent x seed at one env-step budget, and a random policy.

:func:`run_comparison` trains each run and writes its TensorBoard events under
``<out>/tb/<agent>_s<seed>_1``; :func:`summarize` then computes every figure of the report from
those event files alone, so the tables can always be checked against the curves:

- per run (``runs.csv``): the final ``rollout/ep_rew_mean`` (mean return of the last 100 training
  episodes, as SB3 computes it), the greedy evaluation ``eval/mean_reward`` after training and
  the sampled one beside it, ``eval/mean_reward_sampled`` (temperature 1, the evaluation seed:
  greedy decoding of a nearly uniform policy repeats one token and can score far below the
  random policy, which the sampled figure does not), the first env step at which
  ``rollout/ep_rew_mean`` reached the threshold, wall time and env steps per second
  (``compare/wall_seconds``, ``compare/env_steps_per_second``); when the agents train on a
  task's ``"train"`` split (``split="train"``, the default of ``reviews``, ``arithmetic2`` and
  ``translate``), the same two evaluations on its held-out ``"test"`` prompts,
  ``eval/test_mean_reward`` and ``eval/test_mean_reward_sampled`` (a verifiable reward must be
  judged on prompts the agent never trained on; trained on ``"all"``, every prompt is a training
  prompt and there is none); and with ``num_beams``, for the custom agents, beam search against
  greedy decoding on the same prompts (:func:`beam_evaluation`);
- per agent (``results.csv``, ``results.md``): mean and std over seeds of those, each agent's env
  steps per second as a ratio to the custom PPO's, and with five or more seeds the interquartile
  mean (IQM) with a 95% stratified-bootstrap confidence interval (Agarwal et al. 2021);
- ``curves.png``: ``rollout/ep_rew_mean`` against env steps, the mean over seeds with a band of
  one standard deviation, one line per agent, the random policy and the threshold as lines.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from textgym.io import atomic_write, write_json, write_text

AGENT_ORDER = (
    "ppo",
    "ppo-seq2seq",
    "grpo",
    "rloo",
    "sb3-ppo",
    "sb3-a2c",
    "sb3-maskable-ppo",
    "sb3-recurrent-ppo",
)
CUSTOM = ("ppo", "ppo-seq2seq", "grpo", "rloo")  # the package's own agents (agents.ppo, agents.grpo)
"""The package's own agents; ``ppo-seq2seq`` is PPO with the encoder-decoder policy
(:func:`seq2seq_ppo_config`)."""
RANDOM = "random"
SUMMARY_TAGS = ("compare/wall_seconds", "compare/env_steps_per_second", "eval/mean_reward")
TEST_TAG = "eval/test_mean_reward"
"""The greedy evaluation on the held-out prompts; only where the agents trained on the train split."""
SAMPLED_TAG = "eval/mean_reward_sampled"
"""The sampled evaluation (temperature 1, fixed seed) on the episodes of ``eval/mean_reward``."""
TEST_SAMPLED_TAG = "eval/test_mean_reward_sampled"
"""The sampled evaluation on the held-out prompts, beside ``eval/test_mean_reward``."""
BEAM_TAG = "eval/beam_mean_reward"
"""The reward model's mean score of the top beam of beam search (``compare/num_beams`` beams) on
every held-out prompt, or every training prompt where none is held out; custom agents only."""
BEAM_GREEDY_TAG = "eval/beam_greedy_mean_reward"
"""Greedy decoding through the same generation code on the same prompts as ``eval/beam_mean_reward``:
beam against greedy with nothing else changed."""
BEAM_WIDTH_TAG = "compare/num_beams"


# ------------------------------------------------------------------------------------ statistics
def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of ``scores`` (flattened), cutting
    ``floor(n / 4)`` scores from each end, as ``scipy.stats.trim_mean(scores, 0.25)``."""
    flat = np.sort(np.asarray(scores, dtype=float).ravel())
    cut = int(0.25 * flat.size)
    return float(flat[cut : flat.size - cut].mean())


def stratified_bootstrap_ci(
    scores: np.ndarray,
    statistic: Callable[[np.ndarray], float] = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile confidence interval of ``statistic`` over ``scores`` shaped (runs, tasks).

    Each replicate resamples the runs with replacement within every task (column) independently,
    the stratified bootstrap of Agarwal et al. 2021. A 1-D array is one task.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 1:
        scores = scores[:, None]
    runs, tasks = scores.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    cols = np.arange(tasks)
    for r in range(reps):
        idx = rng.integers(0, runs, size=(runs, tasks))
        stats[r] = statistic(scores[idx, cols])
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ------------------------------------------------------------------------------ TensorBoard I/O
def read_scalars(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a TensorBoard run directory: ``{tag: (steps, values)}``, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=float)
        order = np.argsort(steps, kind="stable")
        out[tag] = (steps[order], values[order])
    return out


def run_name(agent: str, seed: int) -> str:
    return f"{agent}_s{seed}"


def find_run_dir(tb_root: Path, agent: str, seed: int) -> Path:
    """``<tb_root>/<agent>_s<seed>_<k>`` with the largest k (as SB3 numbers its runs)."""
    prefix = run_name(agent, seed) + "_"
    found = [p for p in tb_root.glob(prefix + "*") if p.is_dir() and p.name[len(prefix) :].isdigit()]
    if not found:
        raise FileNotFoundError(f"no TensorBoard run {prefix}<k> under {tb_root}")
    return max(found, key=lambda p: int(p.name[len(prefix) :]))


# --------------------------------------------------------------------------------- summaries
@dataclass
class RunSummary:
    agent: str
    seed: int
    env_steps: int
    final_reward: float
    eval_reward: float
    steps_to_threshold: int | None
    wall_seconds: float
    env_steps_per_second: float
    curve: tuple[np.ndarray, np.ndarray] = field(repr=False)
    test_eval_reward: float | None = None
    """The greedy evaluation on the held-out test prompts; None when the run trained on them too."""
    sampled_eval_reward: float | None = None
    """The sampled evaluation (temperature 1, fixed seed); None in a comparison made without it."""
    test_sampled_eval_reward: float | None = None
    """The sampled evaluation on the held-out prompts; None where there is none."""
    beam_reward: float | None = None
    """The top beam's mean score (:data:`BEAM_TAG`); None without ``num_beams`` or for SB3 agents."""
    beam_greedy_reward: float | None = None
    """Greedy decoding on the beam's prompts (:data:`BEAM_GREEDY_TAG`)."""
    num_beams: int | None = None

    def row(self) -> dict[str, Any]:
        optional = {
            key: getattr(self, key)
            for key in (
                "sampled_eval_reward",
                "test_eval_reward",
                "test_sampled_eval_reward",
                "num_beams",
                "beam_reward",
                "beam_greedy_reward",
            )
            if getattr(self, key) is not None
        }
        return {
            "agent": self.agent,
            "seed": self.seed,
            "env_steps": self.env_steps,
            "final_reward": self.final_reward,
            "eval_reward": self.eval_reward,
            **optional,
            "steps_to_threshold": "" if self.steps_to_threshold is None else self.steps_to_threshold,
            "wall_seconds": self.wall_seconds,
            "env_steps_per_second": self.env_steps_per_second,
        }


def summarize_run(run_dir: Path, agent: str, seed: int, threshold: float) -> RunSummary:
    """A run's figures, from its TensorBoard scalars only."""
    scalars = read_scalars(run_dir)
    missing = [t for t in ("rollout/ep_rew_mean", *SUMMARY_TAGS) if t not in scalars]
    if missing:
        raise ValueError(f"TensorBoard run {run_dir} lacks the scalar(s) {missing}")
    steps, rewards = scalars["rollout/ep_rew_mean"]
    reached = np.flatnonzero(rewards >= threshold)

    def last(tag: str) -> float | None:
        return float(scalars[tag][1][-1]) if tag in scalars else None

    beams = last(BEAM_WIDTH_TAG)
    return RunSummary(
        agent=agent,
        seed=seed,
        env_steps=int(scalars["compare/wall_seconds"][0][-1]),
        final_reward=float(rewards[-1]),
        eval_reward=float(scalars["eval/mean_reward"][1][-1]),
        steps_to_threshold=int(steps[reached[0]]) if reached.size else None,
        wall_seconds=float(scalars["compare/wall_seconds"][1][-1]),
        env_steps_per_second=float(scalars["compare/env_steps_per_second"][1][-1]),
        curve=(steps, rewards),
        test_eval_reward=last(TEST_TAG),
        sampled_eval_reward=last(SAMPLED_TAG),
        test_sampled_eval_reward=last(TEST_SAMPLED_TAG),
        beam_reward=last(BEAM_TAG),
        beam_greedy_reward=last(BEAM_GREEDY_TAG),
        num_beams=None if beams is None else int(beams),
    )


OPTIONAL_FIGURES = (
    "sampled_eval_reward",
    "test_eval_reward",
    "test_sampled_eval_reward",
    "beam_reward",
    "beam_greedy_reward",
)
"""Per-run figures that only some comparisons or agents have: each agent's mean and std of one is
reported when every run of the agent has it."""


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(runs: Sequence[RunSummary], iqm_min_seeds: int = 5) -> list[dict[str, Any]]:
    """One row per agent (in :data:`AGENT_ORDER`, the random policy last); see the module doc."""
    by_agent: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_agent.setdefault(run.agent, []).append(run)
    order = [a for a in AGENT_ORDER if a in by_agent] + sorted(
        a for a in by_agent if a not in AGENT_ORDER and a != RANDOM
    )
    if RANDOM in by_agent:
        order.append(RANDOM)
    ppo_speed = None
    if "ppo" in by_agent:
        ppo_speed = float(np.mean([r.env_steps_per_second for r in by_agent["ppo"]]))
    rows = []
    for agent in order:
        group = sorted(by_agent[agent], key=lambda r: r.seed)
        final_mean, final_std = mean_and_std([r.final_reward for r in group])
        eval_mean, eval_std = mean_and_std([r.eval_reward for r in group])
        reached = [r.steps_to_threshold for r in group if r.steps_to_threshold is not None]
        trained = agent != RANDOM
        speed = float(np.mean([r.env_steps_per_second for r in group])) if trained else math.nan
        row: dict[str, Any] = {
            "agent": agent,
            "seeds": len(group),
            "env_steps": max(r.env_steps for r in group),
            "final_reward_mean": final_mean,
            "final_reward_std": final_std,
            "eval_reward_mean": eval_mean,
            "eval_reward_std": eval_std,
        }
        for key in OPTIONAL_FIGURES:
            values = [getattr(r, key) for r in group]
            if all(v is not None for v in values):
                row[f"{key}_mean"], row[f"{key}_std"] = mean_and_std(values)
        widths = {r.num_beams for r in group if r.num_beams is not None}
        if widths:
            row["num_beams"] = max(widths)
        row |= {
            "steps_to_threshold_mean": float(np.mean(reached)) if reached and trained else math.nan,
            "seeds_reaching_threshold": len(reached) if trained else 0,
            "wall_seconds_mean": float(np.mean([r.wall_seconds for r in group])) if trained else math.nan,
            "env_steps_per_second_mean": speed,
            "speed_vs_ppo": speed / ppo_speed if ppo_speed and trained else math.nan,
        }
        if len(group) >= iqm_min_seeds:
            for key in ("final_reward", "eval_reward"):
                scores = np.array([getattr(r, key) for r in group])
                low, high = stratified_bootstrap_ci(scores)
                row[f"{key}_iqm"], row[f"{key}_iqm_ci_low"], row[f"{key}_iqm_ci_high"] = (
                    iqm(scores),
                    low,
                    high,
                )
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def results_markdown(rows: Sequence[Mapping[str, Any]], threshold: float) -> str:
    """The per-agent table as Markdown. Columns of figures that no agent has are left out; an
    agent without one that others have gets a dash (an SB3 agent in the beam columns)."""
    with_iqm = any("final_reward_iqm" in r for r in rows)
    with_test = any("test_eval_reward_mean" in r for r in rows)
    widths = sorted({r["num_beams"] for r in rows if "num_beams" in r})
    prompts = "held-out" if with_test else "training"
    optional = [
        ("sampled_eval_reward", "sampled eval reward (mean ± std)"),
        ("test_eval_reward", "held-out greedy eval (mean ± std)"),
        ("test_sampled_eval_reward", "held-out sampled eval (mean ± std)"),
        ("beam_reward", f"beam {'/'.join(map(str, widths))}, {prompts} prompts (mean ± std)"),
        ("beam_greedy_reward", f"greedy, same {prompts} prompts (mean ± std)"),
    ]
    optional = [(key, title) for key, title in optional if any(f"{key}_mean" in r for r in rows)]
    head = [
        "agent",
        "seeds",
        "final ep_rew_mean (mean ± std)",
        "greedy eval reward (mean ± std)",
        *(title for _, title in optional),
    ]
    if with_iqm:
        head.append("final ep_rew_mean IQM [95% CI]")
    head += [f"env steps to {threshold:g}", "wall time (s)", "env steps/s", "speed vs ppo"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean_std(r: Mapping[str, Any], key: str) -> str:
        if f"{key}_mean" not in r:
            return "–"
        return f"{_fmt(r[f'{key}_mean'])} ± {_fmt(r[f'{key}_std'])}"

    for r in rows:
        cells = [r["agent"], str(r["seeds"]), mean_std(r, "final_reward"), mean_std(r, "eval_reward")]
        cells += [mean_std(r, key) for key, _ in optional]
        if with_iqm:
            cells.append(
                f"{_fmt(r['final_reward_iqm'])} [{_fmt(r['final_reward_iqm_ci_low'])}, "
                f"{_fmt(r['final_reward_iqm_ci_high'])}]"
                if "final_reward_iqm" in r
                else "–"
            )
        if r["agent"] == RANDOM:
            cells += ["–", "–", "–", "–"]
        else:
            steps = r["steps_to_threshold_mean"]
            cells.append(
                "not reached"
                if math.isnan(steps)
                else f"{steps:,.0f} ({r['seeds_reaching_threshold']}/{r['seeds']} seeds)"
            )
            cells += [
                _fmt(r["wall_seconds_mean"], 1),
                f"{r['env_steps_per_second_mean']:,.0f}",
                "–" if math.isnan(r["speed_vs_ppo"]) else f"{r['speed_vs_ppo']:.3f}×",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if any(key.endswith("sampled_eval_reward") for key, _ in optional) and any(
        r["agent"] == RANDOM for r in rows
    ):
        notes.append(
            "random: uniform sampling is its only policy, so its greedy and sampled columns are one "
            "evaluation. Sampled: temperature 1, the same seed for every agent."
        )
    if widths:
        notes.append(
            "Beam: the reward model's score of the top beam; custom agents only (SB3 agents and the "
            "random policy have no cached decoder to search with)."
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows as CSV (columns: the union of the rows' keys, in first-seen order), written atomically."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                )

    return atomic_write(path, write)


def plot_curves(runs: Sequence[RunSummary], path: Path, threshold: float, title: str = "") -> Path:
    """``rollout/ep_rew_mean`` against env steps: mean over seeds and a ±1 std band per agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    agents = [r["agent"] for r in aggregate(runs, iqm_min_seeds=10**9)]
    budget = max(r.env_steps for r in runs)
    grid = np.linspace(0, budget, 200)
    for agent in agents:
        group = [r for r in runs if r.agent == agent]
        if agent == RANDOM:
            level = float(np.mean([r.final_reward for r in group]))
            ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"random ({level:.2f})")
            continue
        # Each seed's curve on a common grid; no value before its first logged point.
        curves = np.array([np.interp(grid, *r.curve, left=np.nan) for r in group])
        valid = ~np.isnan(curves).any(axis=0)
        mean, std = curves[:, valid].mean(0), curves[:, valid].std(0)
        (line,) = ax.plot(grid[valid], mean, label=f"{agent} ({len(group)} seeds)")
        ax.fill_between(grid[valid], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("env steps (tokens)")
    ax.set_ylabel("rollout/ep_rew_mean")
    ax.set_title(title or "mean episode reward (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def summarize(
    out: str | Path, threshold: float, seeds_expected: Sequence[int] | None = None
) -> dict[str, Any]:
    """Read every run under ``<out>/tb`` and write ``runs.csv``, ``results.csv``, ``results.md``
    and ``curves.png``; returns the per-agent rows and the per-run summaries."""
    out = Path(out)
    tb_root = out / "tb"
    runs, incomplete = [], []
    for run_dir in sorted(p for p in tb_root.iterdir() if p.is_dir()):
        name, _, k = run_dir.name.rpartition("_")
        agent, _, seed = name.rpartition("_s")
        if not (k.isdigit() and seed.isdigit() and agent):
            continue
        if run_dir != find_run_dir(tb_root, agent, int(seed)):
            continue  # an older run of the same agent and seed
        try:
            runs.append(summarize_run(run_dir, agent, int(seed), threshold))
        except ValueError:  # interrupted before its summary scalars were written
            incomplete.append(run_dir.name)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {tb_root}")
    rows = aggregate(runs)
    write_csv(out / "runs.csv", [r.row() for r in sorted(runs, key=lambda r: (r.agent, r.seed))])
    write_csv(out / "results.csv", rows)
    md = results_markdown(rows, threshold)
    write_text(out / "results.md", md)
    plot_curves(runs, out / "curves.png", threshold)
    return {"rows": rows, "runs": runs, "markdown": md, "incomplete": incomplete}


# ------------------------------------------------------------------------------------ running
def _log_summary(run_dir: Path, step: int, values: Mapping[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
    writer.close()


def custom_agent(
    agent: str,
    ppo_config: Any = None,
    agent_configs: Mapping[str, Any] | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """``(class, config)`` of one of the package's own agents (:data:`CUSTOM`): ``ppo_config``
    for ``ppo``, ``ppo_config`` with its policy made encoder-decoder by :func:`seq2seq_ppo_config`
    for ``ppo-seq2seq`` (sized for the env of ``env_kwargs``), ``agent_configs[agent]`` (a config or
    a mapping of its fields) for the others."""
    from agents.grpo import GRPO, RLOO
    from agents.ppo import PPO

    cls = {"ppo": PPO, "ppo-seq2seq": PPO, "grpo": GRPO, "rloo": RLOO}[agent]
    if agent == "ppo-seq2seq":
        return cls, seq2seq_ppo_config(ppo_config, env_kwargs)[0]
    config = ppo_config if agent == "ppo" else (agent_configs or {}).get(agent)
    if isinstance(config, Mapping):
        config = cls.config_class.from_dict(config)
    return cls, config if config is not None else cls.config_class()


def seq2seq_ppo_config(
    ppo_config: Any = None, env_kwargs: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, int]]:
    """The ``ppo-seq2seq`` agent's config and the two policies' sizes.

    ``ppo_config`` (default ``PPOConfig()``) with its decoder-only ``policy`` replaced by the
    encoder-decoder policy of about the same number of weights
    (:func:`agents.seq2seq.seq2seq_config_like`) for the env of ``env_kwargs``: its vocabulary
    (the action space), observation length and prompt window. Returns ``(config, {"ppo-seq2seq":
    weights, "ppo": weights of the decoder-only policy})``."""
    import dataclasses

    from agents.policy import count_parameters
    from agents.ppo import PPOConfig
    from agents.seq2seq import seq2seq_config_like
    from textgym.tasks import make_env_config

    config = PPOConfig() if ppo_config is None else ppo_config
    if isinstance(config, Mapping):
        config = PPOConfig.from_dict(config)
    if config.policy.architecture != "decoder":
        raise ValueError(
            f"ppo-seq2seq is sized like the decoder-only policy of --ppo-config, whose policy.architecture "
            f"must be 'decoder', got {config.policy.architecture!r}"
        )
    env = make_env_config(**dict(env_kwargs or {}))
    sizes = (len(env.action_mask), env.seq_len, env.max_prompt_tokens)
    policy = seq2seq_config_like(config.policy, *sizes)
    counts = {
        "ppo-seq2seq": count_parameters(*sizes, policy),
        "ppo": count_parameters(*sizes, config.policy),
    }
    return dataclasses.replace(config, policy=policy), counts


def hyperparameters(
    agent: str,
    ppo_config: Any = None,
    sb3_hyperparams: Mapping[str, Any] | None = None,
    agent_configs: Mapping[str, Any] | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting of ``agent`` in the comparison, as JSON-ready data; ``ppo-seq2seq``'s also
    the weights of its policy and of the decoder-only policy it is sized like."""
    from agents.baselines import sb3_hyperparameters

    if agent == "ppo-seq2seq":
        config, counts = seq2seq_ppo_config(ppo_config, env_kwargs)
        return {
            **config.to_dict(),
            "policy_parameters": counts["ppo-seq2seq"],
            "decoder_only_policy_parameters": counts["ppo"],
        }
    if agent in CUSTOM:
        return custom_agent(agent, ppo_config, agent_configs)[1].to_dict()
    if agent == RANDOM:
        return {"policy": "uniform over the vocabulary"}
    params = sb3_hyperparameters(agent, (sb3_hyperparams or {}).get(agent))
    params.setdefault("policy_kwargs", {})
    return {"policy": "TransformerExtractor (PolicyConfig defaults) + linear heads", **params}


def agents_error(
    agents: Sequence[str],
    env_kwargs: Mapping[str, Any],
    num_envs: int = 64,
    device: str = "auto",
    ppo_config: Any = None,
    sb3_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
    agent_configs: Mapping[str, Any] | None = None,
) -> str | None:
    """Why one of ``agents`` cannot be built with these settings, or None: each is built once
    (no training, nothing written), so that a comparison never stops half-way on a setting that
    could have been refused at the start."""
    from agents.baselines import SB3_AGENTS, make_sb3_model

    for agent in agents:
        try:
            if agent in CUSTOM:
                cls, config = custom_agent(agent, ppo_config, agent_configs, env_kwargs)
                cls("TextGen-v0", config, num_envs, env_kwargs, device, seed=0)
            elif agent in SB3_AGENTS:
                model = make_sb3_model(
                    agent, env_kwargs, num_envs, 0, device, None, (sb3_hyperparams or {}).get(agent)
                )
                model.get_env().close()
            else:
                return f"unknown agent {agent!r}; accepted: {', '.join((*CUSTOM, *SB3_AGENTS))}"
        except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
            option = {
                "ppo": "--ppo-config",
                "ppo-seq2seq": "--ppo-config",
                "grpo": "--agent-configs",
                "rloo": "--agent-configs",
            }.get(agent, "--sb3-hyperparams")
            return f"{option}: {agent} cannot be built: {exc}"
    return None


def run_comparison(
    out: str | Path,
    agents: Sequence[str],
    seeds: Sequence[int],
    total_timesteps: int,
    task: str = "default",
    env_kwargs: Mapping[str, Any] | None = None,
    num_envs: int = 64,
    device: str = "auto",
    threshold: float | None = None,
    eval_episodes: int = 256,
    ppo_config: Any = None,
    sb3_hyperparams: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    agent_configs: Mapping[str, Any] | None = None,
    num_beams: int | None = None,
) -> dict[str, Any]:
    """Train every agent x seed for ``total_timesteps`` env steps, then :func:`summarize`.

    Runs are interleaved (seed by seed, every agent within a seed) so that a slow spell of a
    shared machine does not fall on one agent. Each run ends with a greedy and a sampled
    (temperature 1) evaluation on the same ``eval_episodes`` episodes (fixed evaluation seed, which
    also seeds the sampling), and the same two on the held-out prompts where there are some; with
    ``num_beams``, each custom agent also with :func:`beam_evaluation`. The random policy gets one
    run per seed.
    The tables and the plot are written once, at the end (atomically, by :func:`summarize`);
    Ctrl-C stops after writing those of the runs that finished, then re-raises. Any other error
    writes none: no half-made results beside the TensorBoard runs.
    """
    from tqdm.auto import tqdm

    from agents.baselines import SB3_AGENTS, evaluate, evaluate_sampled, greedy_policy, make_sb3_model
    from textgym.checks import is_positive_int
    from textgym.tasks import get_task

    if num_beams is not None and not is_positive_int(num_beams):
        raise ValueError(f"num_beams must be None (no beam search) or a positive integer, got {num_beams!r}")
    unknown = [a for a in agents if a not in CUSTOM and a not in SB3_AGENTS]
    if unknown:
        raise ValueError(f"unknown agent(s) {unknown}; accepted: {', '.join((*CUSTOM, *SB3_AGENTS))}")
    out = Path(out)
    tb_root = out / "tb"
    if tb_root.exists() and any(tb_root.iterdir()):
        raise FileExistsError(f"{out} already holds a comparison; choose another output directory")
    tb_root.mkdir(parents=True, exist_ok=True)
    env = {"task": task, **dict(env_kwargs or {})}
    test_env = held_out_env(env)
    if threshold is None:
        threshold = get_task(task).reward_threshold
    for agent in (*agents, RANDOM):
        write_json(
            out / "hyperparams" / f"{agent}.json",
            hyperparameters(agent, ppo_config, sb3_hyperparams, agent_configs, env),
        )

    bar = tqdm(
        total=len(seeds) * len(agents) * total_timesteps,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    done_steps, summary, finished = 0, None, False
    try:
        for seed in seeds:
            random_level = evaluate(None, env, eval_episodes, num_envs, seed=10_000 + seed)
            random_dir, level = tb_root / f"{run_name(RANDOM, seed)}_1", random_level["mean"]
            random_test = {}
            if test_env is not None:
                test_level = evaluate(None, test_env, eval_episodes, num_envs, seed=10_000 + seed)["mean"]
                random_test = {TEST_TAG: test_level, TEST_SAMPLED_TAG: test_level}
            # a flat line in TensorBoard, beside the agents' curves, and the summary at the end
            _log_summary(random_dir, 0, {"rollout/ep_rew_mean": level})
            _log_summary(
                random_dir,
                total_timesteps,
                {
                    "rollout/ep_rew_mean": level,
                    "compare/wall_seconds": 0.0,
                    "compare/env_steps_per_second": 0.0,
                    "eval/mean_reward": level,
                    SAMPLED_TAG: level,  # the random policy's greedy and sampled policies are one
                    **random_test,
                },
            )
            for agent in agents:
                bar.set_description(f"{agent} seed {seed}")
                name = run_name(agent, seed)
                start = time.perf_counter()
                if agent in CUSTOM:
                    cls, config = custom_agent(agent, ppo_config, agent_configs, env)
                    model = cls("TextGen-v0", config, num_envs, env, device, seed, tb_root)

                    def on_update(m: Any, base: int = done_steps) -> None:
                        bar.update(base + min(m.num_timesteps, total_timesteps) - bar.n)
                        if "rollout/ep_rew_mean" in m.last_stats:
                            bar.set_postfix(ep_rew_mean=f"{m.last_stats['rollout/ep_rew_mean']:.3f}")

                    model.learn(total_timesteps, tb_log_name=name, callback=on_update)
                    seconds = time.perf_counter() - start
                    run_dir = Path(model._tb_dir)
                else:
                    model = make_sb3_model(
                        agent, env, num_envs, seed, device, str(tb_root), (sb3_hyperparams or {}).get(agent)
                    )
                    model.learn(
                        total_timesteps,
                        tb_log_name=name,
                        log_interval=1,
                        callback=_bar_callback(bar, done_steps, total_timesteps),
                    )
                    seconds = time.perf_counter() - start
                    run_dir = find_run_dir(tb_root, agent, seed)

                steps, eval_seed = model.num_timesteps, 10_000 + seed
                result = evaluate(greedy_policy(model), env, eval_episodes, num_envs, eval_seed)
                sampled = evaluate_sampled(model, env, eval_episodes, num_envs, eval_seed)
                extra = {SAMPLED_TAG: sampled["mean"]}
                if test_env is not None:
                    test = evaluate(greedy_policy(model), test_env, eval_episodes, num_envs, eval_seed)
                    test_sampled = evaluate_sampled(model, test_env, eval_episodes, num_envs, eval_seed)
                    extra |= {TEST_TAG: test["mean"], TEST_SAMPLED_TAG: test_sampled["mean"]}
                if num_beams is not None and agent in CUSTOM:
                    extra |= beam_evaluation(model, test_env or env, num_beams)
                _log_summary(
                    run_dir,
                    steps,
                    {
                        "compare/wall_seconds": seconds,
                        "compare/env_steps_per_second": steps / seconds,
                        "eval/mean_reward": result["mean"],
                        **extra,
                    },
                )
                done_steps += total_timesteps
                bar.update(done_steps - bar.n)
        finished = True
    except KeyboardInterrupt:
        finished = True  # summarise the runs that finished, then stop
        raise
    finally:
        bar.close()
        if finished and any(tb_root.iterdir()):
            try:
                summary = summarize(out, threshold)
            except FileNotFoundError:  # interrupted before any run finished
                summary = None
    return {**(summary or {}), "threshold": threshold}


def beam_evaluation(
    model: Any, env_kwargs: Mapping[str, Any], num_beams: int, batch_size: int = 256
) -> dict[str, float]:
    """Beam search against greedy decoding of a custom agent, on every prompt of the env of
    ``env_kwargs`` (the held-out split in a comparison that has one).

    Each prompt is completed by ``model.generate`` (:func:`agents.generation.generate`) with
    ``strategy="beam"`` and ``num_beams`` beams (the top beam, by total log-probability) and with
    ``strategy="greedy"``; each completion is scored by the env's reward model (its score only: a
    task's per-token terms, such as a length penalty, are not added). Returns the means under
    :data:`BEAM_TAG` and :data:`BEAM_GREEDY_TAG`, and ``num_beams`` under :data:`BEAM_WIDTH_TAG`.
    """
    from textgym.tasks import make_env_config

    if env_kwargs.get("chat_template"):
        raise ValueError(
            "beam_evaluation lays prompts out as the env does without a chat template; "
            "chat_template=True is not supported (leave num_beams None)"
        )
    config = make_env_config(**dict(env_kwargs))
    prompts = list(config.prompts)
    scores: dict[str, list[float]] = {"beam": [], "greedy": []}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        for strategy in scores:
            completions = model.generate(batch, strategy=strategy, num_beams=num_beams)
            scores[strategy] += [float(x) for x in config.reward(batch, completions)]
    return {
        BEAM_TAG: float(np.mean(scores["beam"])),
        BEAM_GREEDY_TAG: float(np.mean(scores["greedy"])),
        BEAM_WIDTH_TAG: float(num_beams),
    }


def held_out_env(env_kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The env arguments of the held-out evaluation (``split="test"``) when ``env_kwargs`` (with
    ``task``) train on a task's ``"train"`` split, given or by the task's default; else None (the
    split is ``"all"``, or the prompts are one's own: none is held out)."""
    from textgym.tasks import get_task

    kwargs = dict(env_kwargs)
    if kwargs.get("prompts") is not None:
        return None
    split = kwargs.get("split") or get_task(kwargs.get("task", "default")).default_split
    return {**kwargs, "split": "test"} if split == "train" else None


def _bar_callback(bar: Any, done_steps: int, total_timesteps: int) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class _Progress(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            bar.update(done_steps + min(self.num_timesteps, total_timesteps) - bar.n)
            buf = self.model.ep_info_buffer
            if buf:
                bar.set_postfix(ep_rew_mean=f"{np.mean([e['r'] for e in buf]):.3f}")

    return _Progress()


def save_config(out: str | Path, config: Mapping[str, Any]) -> Path:
    return write_json(Path(out) / "config.json", json.loads(json.dumps(config, default=repr)))
