"""agents.compare: the IQM and its stratified-bootstrap interval, per-agent aggregation, the Markdown
table, and the summaries computed from hand-written TensorBoard runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from agents.compare import (
    BEAM_GREEDY_TAG,
    BEAM_TAG,
    SAMPLED_TAG,
    TEST_SAMPLED_TAG,
    TEST_TAG,
    RunSummary,
    agents_error,
    aggregate,
    beam_evaluation,
    custom_agent,
    find_run_dir,
    held_out_env,
    hyperparameters,
    iqm,
    read_scalars,
    results_markdown,
    run_comparison,
    seq2seq_ppo_config,
    stratified_bootstrap_ci,
    summarize,
    summarize_run,
)

RESULT_COLUMNS = [
    "agent",
    "seeds",
    "env_steps",
    "final_reward_mean",
    "final_reward_std",
    "eval_reward_mean",
    "eval_reward_std",
    "steps_to_threshold_mean",
    "seeds_reaching_threshold",
    "wall_seconds_mean",
    "env_steps_per_second_mean",
    "speed_vs_ppo",
]
IQM_COLUMNS = [
    f"{key}_iqm{suffix}" for key in ("final_reward", "eval_reward") for suffix in ("", "_ci_low", "_ci_high")
]
RUN_COLUMNS = [
    "agent",
    "seed",
    "env_steps",
    "final_reward",
    "eval_reward",
    "steps_to_threshold",
    "wall_seconds",
    "env_steps_per_second",
]


def summary(
    agent: str,
    seed: int,
    final: float = 0.5,
    eval_reward: float = 0.5,
    steps_to_threshold: int | None = None,
    wall: float = 1.0,
    speed: float = 100.0,
    env_steps: int = 1000,
) -> RunSummary:
    curve = (np.array([0, env_steps]), np.array([0.0, final]))
    return RunSummary(agent, seed, env_steps, final, eval_reward, steps_to_threshold, wall, speed, curve)


def approx(x: float):
    """Equal up to float32 rounding: TensorBoard stores scalars as float32."""
    return pytest.approx(x, rel=1e-6)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


# ------------------------------------------------------------------------------------------- iqm
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 16, 33, 100, 101])
def test_iqm_matches_scipy_trim_mean(n):
    """iqm() is scipy.stats.trim_mean(x, 0.25) for every size, including sizes not divisible by 4."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n)
    for _ in range(5):
        x = rng.normal(size=n) * rng.uniform(0.1, 10)
        assert iqm(x) == pytest.approx(stats.trim_mean(x, 0.25), rel=1e-12, abs=1e-12)


def test_iqm_hand_computed():
    """Small cases by hand: floor(n/4) values are cut from each end of the sorted scores."""
    assert iqm(np.array([1.0, 2.0, 3.0, 4.0])) == 2.5  # cut 1 each end: mean(2, 3)
    assert iqm(np.array([4.0, 3.0, 1.0, 2.0])) == 2.5  # order does not matter
    # 8 values: the middle 4 of the sorted scores.
    assert iqm(np.array([100.0, -50.0, 3.0, 1.0, 2.0, 4.0, 0.0, 7.0])) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert iqm(np.array([1.0, 2.0, 3.0])) == 2.0  # floor(3/4) = 0: the plain mean
    assert iqm(np.array([5.0])) == 5.0
    # 5 values: one cut from each end.
    assert iqm(np.array([0.0, 10.0, 1.0, 2.0, 3.0])) == pytest.approx(2.0)
    # an outlier does not move it
    assert iqm(np.array([1.0, 2.0, 3.0, 1e9])) == 2.5


def test_iqm_flattens_2d_input():
    """A (runs, tasks) array is pooled: the IQM of all its scores."""
    x = np.array([[1.0, 100.0], [2.0, 3.0], [4.0, -7.0], [5.0, 6.0]])
    assert iqm(x) == iqm(x.ravel())
    assert iqm(x) == pytest.approx(np.mean([2.0, 3.0, 4.0, 5.0]))  # 8 scores: the middle 4


# ----------------------------------------------------------------------- stratified bootstrap
def test_bootstrap_interval_contains_point_iqm():
    """For typical scores the 95% interval holds the point IQM and is not degenerate."""
    rng = np.random.default_rng(1)
    for trial in range(5):
        x = rng.normal(loc=trial, size=20)
        low, high = stratified_bootstrap_ci(x, seed=trial)
        assert low < iqm(x) < high
        assert x.min() <= low < high <= x.max()


def test_bootstrap_degenerate_for_constant_scores():
    """Every replicate of constant scores has the same IQM: low == high == the value."""
    assert stratified_bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)
    assert stratified_bootstrap_ci(np.full((6, 3), -1.5), reps=100) == (-1.5, -1.5)


def test_bootstrap_narrows_with_more_runs():
    """With 25 times the runs the interval is several times narrower."""
    rng = np.random.default_rng(2)
    few = rng.normal(size=8)
    many = rng.normal(size=200)
    low_few, high_few = stratified_bootstrap_ci(few)
    low_many, high_many = stratified_bootstrap_ci(many)
    assert (high_many - low_many) < 0.5 * (high_few - low_few)


def test_bootstrap_reproducible_for_a_seed():
    """Same seed, same interval; another seed gives (for continuous data) another one."""
    x = np.random.default_rng(3).normal(size=(9, 2))
    assert stratified_bootstrap_ci(x, seed=5) == stratified_bootstrap_ci(x, seed=5)
    assert stratified_bootstrap_ci(x, seed=5) != stratified_bootstrap_ci(x, seed=6)


def test_bootstrap_resamples_within_columns():
    """Column 0 all 0, column 1 all 1, 10 runs: a stratified replicate always holds 10 zeros and
    10 ones, whose IQM is 0.5, so the interval is exactly [0.5, 0.5]. (Resampling the 20 scores
    together would mix the counts and widen it.)"""
    scores = np.column_stack([np.zeros(10), np.ones(10)])
    assert iqm(scores) == 0.5
    assert stratified_bootstrap_ci(scores) == (0.5, 0.5)

    seen = []

    def counting(sample: np.ndarray) -> float:
        assert sample.shape == (10, 2)
        seen.append((int((sample[:, 0] == 0).sum()), int((sample[:, 1] == 1).sum())))
        return iqm(sample)

    stratified_bootstrap_ci(scores, statistic=counting, reps=50)
    assert seen == [(10, 10)] * 50


def test_bootstrap_resamples_columns_independently():
    """Each replicate draws every column's runs from that column only, and independently of the
    other columns (not whole rows): two identical columns come out different."""
    column = np.arange(10.0)
    scores = np.column_stack([column, column, column + 100])
    samples = []

    def keep(sample: np.ndarray) -> float:
        samples.append(sample.copy())
        return 0.0

    stratified_bootstrap_ci(scores, statistic=keep, reps=20, seed=1)
    assert len(samples) == 20
    for sample in samples:
        assert sample.shape == (10, 3)
        assert np.isin(sample[:, :2], column).all() and np.isin(sample[:, 2], column + 100).all()
    assert sum(not np.array_equal(s[:, 0], s[:, 1]) for s in samples) == 20
    assert len({s[:, 0].tobytes() for s in samples}) > 1  # resampled, not the data itself


def test_bootstrap_confidence_level():
    """A lower confidence gives a nested, narrower interval; a 1-D array is one column."""
    x = np.random.default_rng(4).normal(size=30)
    low95, high95 = stratified_bootstrap_ci(x, confidence=0.95)
    low50, high50 = stratified_bootstrap_ci(x, confidence=0.5)
    assert low95 < low50 < high50 < high95
    assert stratified_bootstrap_ci(x) == stratified_bootstrap_ci(x[:, None])


# --------------------------------------------------------------------------------- aggregate
def test_aggregate_orders_agents_random_last():
    """Rows follow ppo, sb3-ppo, sb3-a2c, sb3-maskable-ppo, other agents sorted, random last,
    whatever the order of the runs."""
    agents = ["random", "sb3-maskable-ppo", "zeta", "sb3-a2c", "alpha", "sb3-ppo", "ppo"]
    rows = aggregate([summary(a, 0) for a in agents])
    assert [r["agent"] for r in rows] == [
        "ppo",
        "sb3-ppo",
        "sb3-a2c",
        "sb3-maskable-ppo",
        "alpha",
        "zeta",
        "random",
    ]
    rows = aggregate([summary("random", 0), summary("sb3-a2c", 0), summary("sb3-ppo", 0)])
    assert [r["agent"] for r in rows] == ["sb3-ppo", "sb3-a2c", "random"]


def test_aggregate_statistics():
    """Means, sample standard deviations (ddof=1), steps to threshold over the seeds that reached
    it, and speed as a ratio to ppo's mean speed, computed by hand."""
    runs = [
        summary("ppo", 0, final=0.2, eval_reward=0.1, steps_to_threshold=None, wall=2.0, speed=100.0),
        summary("ppo", 1, final=0.4, eval_reward=0.5, steps_to_threshold=3000, wall=4.0, speed=300.0),
        summary("ppo", 2, final=0.9, eval_reward=0.9, steps_to_threshold=1000, wall=6.0, speed=200.0),
        summary("sb3-ppo", 0, final=1.0, eval_reward=0.0, steps_to_threshold=500, wall=1.0, speed=800.0),
        summary("sb3-ppo", 1, final=0.0, eval_reward=1.0, steps_to_threshold=None, wall=3.0, speed=400.0),
        summary("sb3-a2c", 0, final=0.3, eval_reward=0.3, steps_to_threshold=None, speed=50.0),
        summary("random", 0, final=0.1, eval_reward=0.1, steps_to_threshold=0, wall=0.0, speed=0.0),
        summary("random", 1, final=0.3, eval_reward=0.3, steps_to_threshold=None, wall=0.0, speed=0.0),
    ]
    rows = {r["agent"]: r for r in aggregate(runs)}
    ppo = rows["ppo"]
    assert ppo["seeds"] == 3 and ppo["env_steps"] == 1000
    assert ppo["final_reward_mean"] == pytest.approx(0.5)
    assert ppo["final_reward_std"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert ppo["eval_reward_mean"] == pytest.approx(0.5)
    assert ppo["eval_reward_std"] == pytest.approx(0.4)  # deviations -0.4, 0, 0.4; ddof=1
    assert ppo["steps_to_threshold_mean"] == 2000.0  # over the 2 seeds that reached it
    assert ppo["seeds_reaching_threshold"] == 2
    assert ppo["wall_seconds_mean"] == pytest.approx(4.0)
    assert ppo["env_steps_per_second_mean"] == pytest.approx(200.0)
    assert ppo["speed_vs_ppo"] == pytest.approx(1.0)

    sb3 = rows["sb3-ppo"]
    assert sb3["final_reward_mean"] == 0.5 and sb3["final_reward_std"] == pytest.approx(math.sqrt(0.5))
    assert sb3["steps_to_threshold_mean"] == 500.0 and sb3["seeds_reaching_threshold"] == 1
    assert sb3["env_steps_per_second_mean"] == 600.0
    assert sb3["speed_vs_ppo"] == pytest.approx(3.0)

    a2c = rows["sb3-a2c"]
    assert a2c["final_reward_std"] == 0.0  # one seed
    assert math.isnan(a2c["steps_to_threshold_mean"]) and a2c["seeds_reaching_threshold"] == 0
    assert a2c["speed_vs_ppo"] == pytest.approx(0.25)

    rnd = rows["random"]
    assert rnd["final_reward_mean"] == pytest.approx(0.2) and rnd["eval_reward_mean"] == pytest.approx(0.2)
    # no training: no threshold, time or speed figures
    assert math.isnan(rnd["steps_to_threshold_mean"]) and rnd["seeds_reaching_threshold"] == 0
    assert math.isnan(rnd["wall_seconds_mean"])
    assert math.isnan(rnd["env_steps_per_second_mean"]) and math.isnan(rnd["speed_vs_ppo"])
    assert all(list(r)[: len(RESULT_COLUMNS)] == RESULT_COLUMNS for r in rows.values())


def test_aggregate_without_ppo_has_no_speed_ratio():
    rows = aggregate([summary("sb3-ppo", 0, speed=100.0), summary("sb3-a2c", 0, speed=50.0)])
    assert all(math.isnan(r["speed_vs_ppo"]) for r in rows)
    assert [r["env_steps_per_second_mean"] for r in rows] == [100.0, 50.0]


def test_aggregate_iqm_only_with_five_seeds():
    """IQM columns appear for agents with >= 5 seeds only, equal to iqm() and the bootstrap CI."""
    finals = [0.9, 0.1, 0.5, 0.3, 0.7]
    evals = [0.0, 1.0, 0.2, 0.6, 0.4]
    runs = [
        summary("ppo", s, final=f, eval_reward=e) for s, (f, e) in enumerate(zip(finals, evals, strict=True))
    ]
    runs += [summary("sb3-ppo", s) for s in range(4)]
    rows = {r["agent"]: r for r in aggregate(runs)}
    assert not any(c in rows["sb3-ppo"] for c in IQM_COLUMNS)
    ppo = rows["ppo"]
    assert list(ppo)[len(RESULT_COLUMNS) :] == IQM_COLUMNS
    assert ppo["final_reward_iqm"] == pytest.approx(0.5)  # middle 3 of 0.1 .. 0.9
    assert ppo["eval_reward_iqm"] == pytest.approx(0.4)
    # The seeds are sorted before bootstrapping, so the interval is that of the scores by seed.
    assert (ppo["final_reward_iqm_ci_low"], ppo["final_reward_iqm_ci_high"]) == stratified_bootstrap_ci(
        np.array(finals)
    )
    for key in ("final_reward", "eval_reward"):
        assert ppo[f"{key}_iqm_ci_low"] <= ppo[f"{key}_iqm"] <= ppo[f"{key}_iqm_ci_high"]
    assert "final_reward_iqm" in aggregate(runs, iqm_min_seeds=4)[1]


# ---------------------------------------------------------------------------------- markdown
def test_results_markdown_table():
    """A header with the documented columns, a separator, one row per agent; "not reached" when
    no seed reached the threshold, the count of seeds that did otherwise, dashes for random."""
    runs = [
        summary("ppo", 0, final=0.25, steps_to_threshold=1500, speed=1000.0),
        summary("ppo", 1, final=0.75, steps_to_threshold=None, speed=3000.0),
        summary("sb3-a2c", 0, steps_to_threshold=None, speed=1000.0),
        summary("random", 0, final=0.125, eval_reward=0.125),
    ]
    md = results_markdown(aggregate(runs), threshold=0.8)
    lines = md.strip("\n").split("\n")
    assert len(lines) == 2 + 3
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == [
        "agent",
        "seeds",
        "final ep_rew_mean (mean ± std)",
        "greedy eval reward (mean ± std)",
        "env steps to 0.8",
        "wall time (s)",
        "env steps/s",
        "speed vs ppo",
    ]
    assert lines[1] == "|" + "---|" * len(head)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(head) for row in cells)
    ppo, a2c, rnd = cells
    assert ppo[:2] == ["ppo", "2"]
    assert ppo[2] == f"0.500 ± {np.std([0.25, 0.75], ddof=1):.3f}"
    assert ppo[4] == "1,500 (1/2 seeds)"
    assert ppo[6] == "2,000" and ppo[7] == "1.000×"
    assert a2c[0] == "sb3-a2c" and a2c[4] == "not reached" and a2c[7] == "0.500×"
    assert rnd[0] == "random" and rnd[2] == "0.125 ± 0.000" and rnd[4:] == ["–"] * 4


def test_results_markdown_iqm_column():
    """With an agent of >= 5 seeds the table gains the IQM column; agents without it get a dash."""
    runs = [summary("ppo", s, final=0.1 * s) for s in range(5)] + [summary("sb3-ppo", 0)]
    rows = aggregate(runs)
    lines = results_markdown(rows, threshold=1.0).strip().split("\n")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[4] == "final ep_rew_mean IQM [95% CI]" and head[5] == "env steps to 1"
    ppo = [c.strip() for c in lines[2].strip("|").split("|")]
    r = rows[0]
    assert ppo[4] == (
        f"{r['final_reward_iqm']:.3f} [{r['final_reward_iqm_ci_low']:.3f}, {r['final_reward_iqm_ci_high']:.3f}]"
    )
    assert [c.strip() for c in lines[3].strip("|").split("|")][4] == "–"


# ------------------------------------------------------------------- summaries from TensorBoard
def write_run(
    run_dir: Path,
    rollout: list[tuple[int, float]],
    final: tuple[int, float, float, float] | None,
) -> None:
    """A TensorBoard run: rollout/ep_rew_mean at (step, value) pairs, then, unless ``final`` is
    None, the comparison's scalars at ``(step, wall_seconds, env_steps_per_second, eval_reward)``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for step, value in rollout:
        writer.add_scalar("rollout/ep_rew_mean", value, step)
        writer.add_scalar("train/loss", -value, step)  # other tags are ignored
    if final is not None:
        step, wall, speed, eval_reward = final
        writer.add_scalar("compare/wall_seconds", wall, step)
        writer.add_scalar("compare/env_steps_per_second", speed, step)
        writer.add_scalar("eval/mean_reward", eval_reward, step)
    writer.close()


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    """Hand-written runs of a comparison with threshold 0.8 (expected figures in the tests)."""
    tb = tmp_path / "tb"
    write_run(tb / "ppo_s0_1", [(100, 0.1), (200, 0.5), (300, 0.9), (400, 0.7)], (400, 2.0, 200.0, 0.6))
    write_run(tb / "ppo_s1_1", [(100, 0.2), (200, 0.3), (400, 0.4)], (400, 4.0, 100.0, 0.2))
    write_run(tb / "sb3-ppo_s0_1", [(100, 0.85), (400, 0.95)], (400, 1.0, 400.0, 0.9))
    # seed 1 ran three times: only the run numbered highest (10, not the lexically larger 2) counts
    write_run(tb / "sb3-ppo_s1_1", [(100, -1.0)], (100, 50.0, 2.0, -1.0))
    write_run(tb / "sb3-ppo_s1_2", [(100, -0.5)], (100, 60.0, 1.0, -0.5))
    write_run(tb / "sb3-ppo_s1_10", [(100, 0.5), (200, 0.8), (400, 0.75)], (400, 3.0, 200.0, 0.7))
    # interrupted before its summary scalars
    write_run(tb / "sb3-a2c_s0_1", [(100, 0.3), (200, 0.4)], None)
    write_run(tb / "random_s0_1", [(0, 0.25), (400, 0.25)], (400, 0.0, 0.0, 0.25))
    (tb / "not-a-run").mkdir()
    return tmp_path


def test_find_run_dir_takes_the_highest_number(comparison):
    tb = comparison / "tb"
    assert find_run_dir(tb, "sb3-ppo", 1) == tb / "sb3-ppo_s1_10"
    assert find_run_dir(tb, "ppo", 1) == tb / "ppo_s1_1"
    with pytest.raises(FileNotFoundError):
        find_run_dir(tb, "ppo", 2)


def test_summarize_run_from_scalars(comparison):
    run = summarize_run(comparison / "tb" / "ppo_s0_1", "ppo", 0, threshold=0.8)
    assert (run.agent, run.seed, run.env_steps) == ("ppo", 0, 400)
    assert run.final_reward == pytest.approx(0.7)  # the last value, not the best
    assert run.eval_reward == pytest.approx(0.6)
    assert run.steps_to_threshold == 300  # first step with ep_rew_mean >= 0.8
    assert run.wall_seconds == 2.0 and run.env_steps_per_second == 200.0
    np.testing.assert_array_equal(run.curve[0], [100, 200, 300, 400])
    np.testing.assert_allclose(run.curve[1], [0.1, 0.5, 0.9, 0.7], rtol=1e-6)
    # the threshold is inclusive
    assert summarize_run(comparison / "tb" / "sb3-ppo_s1_10", "sb3-ppo", 1, 0.8).steps_to_threshold == 200
    assert summarize_run(comparison / "tb" / "ppo_s1_1", "ppo", 1, 0.8).steps_to_threshold is None
    with pytest.raises(ValueError, match="compare/wall_seconds"):
        summarize_run(comparison / "tb" / "sb3-a2c_s0_1", "sb3-a2c", 0, 0.8)


def test_summarize_writes_tables_equal_to_the_scalars(comparison):
    """runs.csv, results.csv, results.md and curves.png; every figure as computed by hand from the
    scalars written above; the interrupted run is listed, not counted; older runs are ignored."""
    result = summarize(comparison, threshold=0.8)
    for name in ("runs.csv", "results.csv", "results.md", "curves.png"):
        assert (comparison / name).is_file() and (comparison / name).stat().st_size > 0
    assert not list(comparison.glob("*.tmp*"))
    assert (comparison / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["incomplete"] == ["sb3-a2c_s0_1"]

    columns, runs = read_csv(comparison / "runs.csv")
    assert columns == RUN_COLUMNS
    assert [(r["agent"], r["seed"]) for r in runs] == [
        ("ppo", "0"),
        ("ppo", "1"),
        ("random", "0"),
        ("sb3-ppo", "0"),
        ("sb3-ppo", "1"),
    ]
    expected_runs = [
        # env_steps, final, eval, steps_to_threshold, wall, speed
        (400, 0.7, 0.6, "300", 2.0, 200.0),
        (400, 0.4, 0.2, "", 4.0, 100.0),
        (400, 0.25, 0.25, "", 0.0, 0.0),
        (400, 0.95, 0.9, "100", 1.0, 400.0),
        (400, 0.75, 0.7, "200", 3.0, 200.0),  # sb3-ppo_s1_10, not _1 or _2
    ]
    for row, (steps, final, ev, reached, wall, speed) in zip(runs, expected_runs, strict=True):
        assert int(row["env_steps"]) == steps
        assert float(row["final_reward"]) == pytest.approx(final, rel=1e-6)
        assert float(row["eval_reward"]) == pytest.approx(ev, rel=1e-6)
        assert row["steps_to_threshold"] == reached
        assert float(row["wall_seconds"]) == pytest.approx(wall)
        assert float(row["env_steps_per_second"]) == pytest.approx(speed)

    columns, results = read_csv(comparison / "results.csv")
    assert columns == RESULT_COLUMNS  # fewer than 5 seeds: no IQM columns
    assert [r["agent"] for r in results] == ["ppo", "sb3-ppo", "random"]
    ppo, sb3, rnd = results
    assert ppo["seeds"] == "2" and ppo["env_steps"] == "400"
    assert float(ppo["final_reward_mean"]) == approx(0.55)
    assert float(ppo["final_reward_std"]) == approx(np.std([0.7, 0.4], ddof=1))
    assert float(ppo["eval_reward_mean"]) == approx(0.4)
    assert float(ppo["eval_reward_std"]) == approx(np.std([0.6, 0.2], ddof=1))
    assert float(ppo["steps_to_threshold_mean"]) == 300.0 and ppo["seeds_reaching_threshold"] == "1"
    assert float(ppo["wall_seconds_mean"]) == 3.0
    assert float(ppo["env_steps_per_second_mean"]) == 150.0 and float(ppo["speed_vs_ppo"]) == 1.0

    assert sb3["seeds"] == "2"
    assert float(sb3["final_reward_mean"]) == approx(0.85)
    assert float(sb3["eval_reward_mean"]) == approx(0.8)
    assert float(sb3["steps_to_threshold_mean"]) == 150.0 and sb3["seeds_reaching_threshold"] == "2"
    assert float(sb3["wall_seconds_mean"]) == 2.0
    assert float(sb3["env_steps_per_second_mean"]) == 300.0 and float(sb3["speed_vs_ppo"]) == 2.0

    assert float(rnd["final_reward_mean"]) == 0.25 and float(rnd["eval_reward_mean"]) == 0.25
    assert rnd["seeds_reaching_threshold"] == "0"
    for key in ("steps_to_threshold_mean", "wall_seconds_mean", "env_steps_per_second_mean", "speed_vs_ppo"):
        assert rnd[key] == ""  # NaN is written as an empty cell

    md = (comparison / "results.md").read_text()
    assert md == result["markdown"] == results_markdown(result["rows"], 0.8)
    assert "| ppo | 2 |" in md and "| sb3-ppo | 2 |" in md and "| random | 1 |" in md
    assert "sb3-a2c" not in md
    assert "300 (1/2 seeds)" in md and "150 (2/2 seeds)" in md


def test_summarize_threshold_changes_only_threshold_figures(comparison):
    """A threshold nobody reaches: "not reached" and an empty steps cell for every agent."""
    summarize(comparison, threshold=2.0)
    _, results = read_csv(comparison / "results.csv")
    assert all(r["steps_to_threshold_mean"] == "" and r["seeds_reaching_threshold"] == "0" for r in results)
    assert (comparison / "results.md").read_text().count("not reached") == 2
    assert float(results[0]["final_reward_mean"]) == pytest.approx(0.55, rel=1e-6)


def test_summarize_five_seeds_adds_iqm(tmp_path):
    """With five seeds results.csv holds the IQM columns, equal to iqm() of the final rewards."""
    finals = [0.1, 0.9, 0.3, 0.7, 0.5]
    for seed, value in enumerate(finals):
        write_run(tmp_path / "tb" / f"ppo_s{seed}_1", [(10, 0.0), (20, value)], (20, 1.0, 20.0, value / 2))
    summarize(tmp_path, threshold=0.5)
    columns, (row,) = read_csv(tmp_path / "results.csv")
    assert columns == RESULT_COLUMNS + IQM_COLUMNS
    assert float(row["final_reward_iqm"]) == pytest.approx(0.5, rel=1e-6)
    assert float(row["eval_reward_iqm"]) == pytest.approx(0.25, rel=1e-6)
    for key in ("final_reward", "eval_reward"):
        assert float(row[f"{key}_iqm_ci_low"]) <= float(row[f"{key}_iqm"]) <= float(row[f"{key}_iqm_ci_high"])
    assert float(row["steps_to_threshold_mean"]) == 20.0 and row["seeds_reaching_threshold"] == "3"


def test_summarize_without_finished_runs(tmp_path):
    """Only interrupted runs: FileNotFoundError, and no tables."""
    write_run(tmp_path / "tb" / "ppo_s0_1", [(10, 0.5)], None)
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        summarize(tmp_path, threshold=0.8)
    assert not (tmp_path / "results.csv").exists()


# ------------------------------------------------------------------------ running: failures
TINY_RUN = {"total_timesteps": 32, "num_envs": 4, "device": "cpu", "eval_episodes": 4, "progress": False}
TINY_SB3 = {"sb3-ppo": {"n_steps": 8, "batch_size": 16, "n_epochs": 1, "policy_kwargs": {"d_model": 16}}}


def tiny_ppo_config():
    from agents.ppo import PPOConfig

    return PPOConfig(n_steps=8, policy={"d_model": 16, "n_layers": 1, "n_heads": 2})


def test_agents_error_builds_each_agent_once():
    env = {"task": "default"}
    assert agents_error(["ppo", "sb3-ppo"], env, 4, "cpu", tiny_ppo_config(), TINY_SB3) is None
    bad = {"sb3-ppo": {"n_steps": 8, "batch_size": 16, "policy_kwargs": {"d_modle": 8}}}
    problem = agents_error(["ppo", "sb3-ppo"], env, 4, "cpu", tiny_ppo_config(), bad)
    assert problem.startswith("--sb3-hyperparams: sb3-ppo cannot be built") and "d_modle" in problem
    assert "unknown agent 'dqn'" in agents_error(["dqn"], env, 4, "cpu")


def test_an_error_mid_comparison_writes_no_results(tmp_path):
    """A run that fails after others finished leaves their TensorBoard runs, and no tables: the
    results are written once, at the end (a failing run once left a partial results.md)."""
    bad = {"sb3-ppo": {"n_steps": 8, "batch_size": 16, "policy_kwargs": {"d_modle": 8}}}
    with pytest.raises(ValueError, match="d_modle"):
        run_comparison(
            tmp_path, ["ppo", "sb3-ppo"], [0], ppo_config=tiny_ppo_config(), sb3_hyperparams=bad, **TINY_RUN
        )
    assert (tmp_path / "tb" / "ppo_s0_1").is_dir()
    for name in ("results.md", "results.csv", "runs.csv", "curves.png"):
        assert not (tmp_path / name).exists(), name


def test_ctrl_c_mid_comparison_summarises_the_finished_runs(tmp_path, monkeypatch):
    import agents.baselines

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agents.baselines, "make_sb3_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(
            tmp_path,
            ["ppo", "sb3-ppo"],
            [0],
            ppo_config=tiny_ppo_config(),
            sb3_hyperparams=TINY_SB3,
            **TINY_RUN,
        )
    assert "| ppo | 1 |" in (tmp_path / "results.md").read_text()
    assert "sb3-ppo" not in (tmp_path / "results.md").read_text()


# --------------------------------------------------------------------------- held-out evaluation
def test_held_out_env_only_when_training_on_the_train_split():
    assert held_out_env({"task": "arithmetic2"}) == {"task": "arithmetic2", "split": "test"}  # default: train
    assert held_out_env({"task": "arithmetic", "split": "train"}) == {"task": "arithmetic", "split": "test"}
    assert held_out_env({"task": "reviews", "reward": "length"})["split"] == "test"
    # trained on every prompt, or on prompts of one's own: nothing is held out
    assert held_out_env({"task": "arithmetic"}) is None
    assert held_out_env({"task": "default"}) is None
    assert held_out_env({"task": "arithmetic2", "split": "all"}) is None
    assert held_out_env({"task": "arithmetic", "prompts": ["1+1="]}) is None


def test_held_out_column_from_the_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb"
    for name, test in (("ppo_s0_1", 0.3), ("ppo_s1_1", 0.5), ("random_s0_1", 0.0)):
        write_run(tb / name, [(100, 0.2), (400, 0.4)], (400, 2.0, 200.0, 0.6))
        writer = SummaryWriter(str(tb / name))
        writer.add_scalar(TEST_TAG, test, 400)
        writer.close()
    result = summarize(tmp_path, threshold=0.8)
    assert [r.test_eval_reward for r in result["runs"]] == pytest.approx([0.3, 0.5, 0.0])
    columns, results = read_csv(tmp_path / "results.csv")
    assert columns[:9] == [*RESULT_COLUMNS[:7], "test_eval_reward_mean", "test_eval_reward_std"]
    assert float(results[0]["test_eval_reward_mean"]) == approx(0.4)
    assert float(results[0]["test_eval_reward_std"]) == approx(np.std([0.3, 0.5], ddof=1))
    columns, runs = read_csv(tmp_path / "runs.csv")
    assert "test_eval_reward" in columns and float(runs[0]["test_eval_reward"]) == approx(0.3)
    md = (tmp_path / "results.md").read_text()
    assert "held-out greedy eval (mean ± std)" in md and "| 0.400 ± 0.141 |" in md


def test_comparison_on_a_train_split_evaluates_the_held_out_prompts(tmp_path):
    """A tiny real run on arithmetic2 (trains on its train split by default): the held-out column is
    the greedy evaluation on the test prompts; on the default task (split "all") there is none."""
    run_comparison(tmp_path / "a", ["ppo"], [0], task="arithmetic2", ppo_config=tiny_ppo_config(), **TINY_RUN)
    columns, results = read_csv(tmp_path / "a" / "results.csv")
    assert "test_eval_reward_mean" in columns
    for row in results:  # ppo, then random
        assert 0.0 <= float(row["test_eval_reward_mean"]) <= 1.0
    run_comparison(tmp_path / "b", ["ppo"], [0], ppo_config=tiny_ppo_config(), **TINY_RUN)
    columns, _ = read_csv(tmp_path / "b" / "results.csv")
    assert columns == [
        *RESULT_COLUMNS[:7],
        "sampled_eval_reward_mean",
        "sampled_eval_reward_std",
        *RESULT_COLUMNS[7:],
    ]


def test_comparison_of_the_recurrent_agent_on_translate(tmp_path):
    """sb3-recurrent-ppo beside sb3-ppo on translate (train split by default): both train, are
    evaluated greedily on the train and the held-out sentences (chrF in [0, 1]), in agent order."""
    sb3 = {
        **TINY_SB3,
        "sb3-recurrent-ppo": {
            "n_steps": 8,
            "batch_size": 16,
            "n_epochs": 1,
            "policy_kwargs": {"lstm_hidden_size": 16},
        },
    }
    # three rollouts of 8 steps: translate's episodes take up to 10, so that some end
    run_comparison(
        tmp_path,
        ["sb3-recurrent-ppo", "sb3-ppo"],
        [0],
        task="translate",
        sb3_hyperparams=sb3,
        **{**TINY_RUN, "total_timesteps": 96},
    )
    columns, results = read_csv(tmp_path / "results.csv")
    assert [row["agent"] for row in results] == ["sb3-ppo", "sb3-recurrent-ppo", "random"]
    assert "test_eval_reward_mean" in columns
    for row in results:
        assert 0.0 <= float(row["eval_reward_mean"]) <= 1.0
        assert 0.0 <= float(row["test_eval_reward_mean"]) <= 1.0
    assert (tmp_path / "hyperparams" / "sb3-recurrent-ppo.json").is_file()


# ------------------------------------------------------------- ppo-seq2seq, sampled and beam columns
@pytest.mark.parametrize("task", ["translate", "default"])
def test_ppo_seq2seq_is_sized_like_the_decoder_only_ppo(task):
    """ppo-seq2seq's encoder-decoder policy holds within 10% of the weights of ppo's decoder-only
    policy (PolicyConfig() by default) on the env compared; the agent built has that policy, and
    its hyperparameters record it and both counts."""
    from agents.ppo import PPOConfig

    env = {"task": task}
    config, counts = seq2seq_ppo_config(None, env)
    assert config.policy.architecture == "seq2seq"
    assert abs(counts["ppo-seq2seq"] - counts["ppo"]) <= 0.1 * counts["ppo"]
    assert config == dataclasses.replace(PPOConfig(), policy=config.policy)  # only the policy changes
    cls, built_config = custom_agent("ppo-seq2seq", env_kwargs=env)
    assert built_config == config
    agent = cls("TextGen-v0", built_config, 4, env, "cpu", seed=0)
    assert sum(p.numel() for p in agent.policy.parameters()) == counts["ppo-seq2seq"]
    decoder = custom_agent("ppo")[0]("TextGen-v0", PPOConfig(), 4, env, "cpu", seed=0)
    assert sum(p.numel() for p in decoder.policy.parameters()) == counts["ppo"]
    params = hyperparameters("ppo-seq2seq", env_kwargs=env)
    assert params["policy"]["d_model"] == config.policy.d_model
    assert params["policy"]["architecture"] == "seq2seq"
    assert (params["policy_parameters"], params["decoder_only_policy_parameters"]) == (
        counts["ppo-seq2seq"],
        counts["ppo"],
    )


def test_ppo_seq2seq_follows_the_ppo_config():
    """Sized like the --ppo-config's policy (by seq2seq_config_like, for the env's vocabulary,
    observation length and prompt window), with its other settings; a seq2seq --ppo-config is
    refused, naming the field."""
    from agents.policy import count_parameters
    from agents.ppo import PPOConfig
    from agents.seq2seq import seq2seq_config_like
    from textgym.tasks import make_env_config

    small = PPOConfig(n_steps=8, learning_rate=3e-4, policy={"d_model": 32, "n_layers": 2, "n_heads": 4})
    config, counts = seq2seq_ppo_config(small, {"task": "translate"})
    assert (config.n_steps, config.learning_rate, config.policy.n_heads) == (8, 3e-4, 4)
    env = make_env_config("translate")
    sizes = (len(env.action_mask), env.seq_len, env.max_prompt_tokens)
    assert config.policy == seq2seq_config_like(small.policy, *sizes)
    assert counts == {
        "ppo-seq2seq": count_parameters(*sizes, config.policy),
        "ppo": count_parameters(*sizes, small.policy),
    }
    assert counts["ppo"] < seq2seq_ppo_config(None, {"task": "translate"})[1]["ppo"]
    seq2seq = PPOConfig(policy={"architecture": "seq2seq"})
    with pytest.raises(ValueError, match="architecture must be 'decoder', got 'seq2seq'"):
        seq2seq_ppo_config(seq2seq, {"task": "translate"})
    problem = agents_error(["ppo-seq2seq"], {"task": "translate"}, 4, "cpu", seq2seq)
    assert problem.startswith("--ppo-config: ppo-seq2seq cannot be built")


def test_results_markdown_greedy_and_sampled_columns():
    """Sampled beside greedy, on the training and the held-out prompts; the random row shows the
    same figure in both, and a note says why; a beam column with dashes for the agents without it."""
    runs = [
        dataclasses.replace(
            summary("ppo", 0, eval_reward=0.1),
            sampled_eval_reward=0.3,
            test_eval_reward=0.2,
            test_sampled_eval_reward=0.4,
            beam_reward=0.25,
            beam_greedy_reward=0.2,
            num_beams=4,
        ),
        dataclasses.replace(
            summary("sb3-ppo", 0, eval_reward=0.05),
            sampled_eval_reward=0.3,
            test_eval_reward=0.06,
            test_sampled_eval_reward=0.31,
        ),
        dataclasses.replace(
            summary("random", 0, eval_reward=0.17),
            sampled_eval_reward=0.17,
            test_eval_reward=0.18,
            test_sampled_eval_reward=0.18,
        ),
    ]
    rows = aggregate(runs)
    md = results_markdown(rows, threshold=0.8)
    lines = md.split("\n")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[3:9] == [
        "greedy eval reward (mean ± std)",
        "sampled eval reward (mean ± std)",
        "held-out greedy eval (mean ± std)",
        "held-out sampled eval (mean ± std)",
        "beam 4, held-out prompts (mean ± std)",
        "greedy, same held-out prompts (mean ± std)",
    ]
    ppo, sb3, rnd = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:5])
    assert ppo[3:9] == [
        "0.100 ± 0.000",
        "0.300 ± 0.000",
        "0.200 ± 0.000",
        "0.400 ± 0.000",
        "0.250 ± 0.000",
        "0.200 ± 0.000",
    ]
    assert sb3[7:9] == ["–", "–"]
    assert (
        rnd[3] == rnd[4] == "0.170 ± 0.000" and rnd[5] == rnd[6] == "0.180 ± 0.000" and rnd[7:9] == ["–", "–"]
    )
    assert "its greedy and sampled columns are one evaluation" in md
    assert rows[0]["num_beams"] == 4 and "num_beams" not in rows[1]


def test_a_tiny_comparison_with_ppo_seq2seq_and_beam_search(tmp_path):
    """ppo, ppo-seq2seq and sb3-ppo on translate with num_beams=2: every agent has a greedy and a
    sampled evaluation on the training and the held-out prompts, the random policy the same figure
    in both; only the custom agents have the beam columns, as read back from TensorBoard."""
    run_comparison(
        tmp_path,
        ["ppo", "ppo-seq2seq", "sb3-ppo"],
        [0],
        task="translate",
        ppo_config=tiny_ppo_config(),
        sb3_hyperparams=TINY_SB3,
        num_beams=2,
        **{**TINY_RUN, "total_timesteps": 96},
    )
    _, results = read_csv(tmp_path / "results.csv")
    assert [r["agent"] for r in results] == ["ppo", "ppo-seq2seq", "sb3-ppo", "random"]
    for key in ("eval_reward", "sampled_eval_reward", "test_eval_reward", "test_sampled_eval_reward"):
        assert all(0.0 <= float(r[f"{key}_mean"]) <= 1.0 for r in results), key
    for row in results:
        custom = row["agent"] in ("ppo", "ppo-seq2seq")
        assert (row["beam_reward_mean"] != "") == custom and (row["beam_greedy_reward_mean"] != "") == custom
        assert row["num_beams"] == ("2" if custom else "")
    rnd = results[-1]
    assert rnd["eval_reward_mean"] == rnd["sampled_eval_reward_mean"]
    assert rnd["test_eval_reward_mean"] == rnd["test_sampled_eval_reward_mean"]
    _, runs = read_csv(tmp_path / "runs.csv")
    ppo = next(r for r in runs if r["agent"] == "ppo")
    scalars = read_scalars(tmp_path / "tb" / "ppo_s0_1")
    for column, tag in (
        ("sampled_eval_reward", SAMPLED_TAG),
        ("test_sampled_eval_reward", TEST_SAMPLED_TAG),
        ("beam_reward", BEAM_TAG),
        ("beam_greedy_reward", BEAM_GREEDY_TAG),
    ):
        assert float(ppo[column]) == approx(scalars[tag][1][-1])
    params = json.loads((tmp_path / "hyperparams" / "ppo-seq2seq.json").read_text())
    assert params["policy"]["architecture"] == "seq2seq" and params["policy_parameters"] > 0
    assert "beam 2, held-out prompts (mean ± std)" in (tmp_path / "results.md").read_text()


def test_beam_evaluation_scores_the_top_beam_of_generate():
    """The beam figure is the reward model's mean score of generate(strategy="beam") on every
    prompt of the env (in batches that need not divide them), and the greedy figure that of
    generate(strategy="greedy") on the same prompts."""
    from agents.generation import generate
    from agents.ppo import PPO
    from textgym.tasks import make_env_config

    env = {"task": "translate", "split": "test"}
    model = PPO("TextGen-v0", tiny_ppo_config(), 4, {"task": "translate"}, "cpu", seed=0)
    found = beam_evaluation(model, env, num_beams=3, batch_size=300)
    config = make_env_config(**env)
    prompts = list(config.prompts)
    assert len(prompts) == 1000
    expected = {}
    for strategy in ("beam", "greedy"):
        completions = generate(
            model.policy, config.tokenizer, prompts, config.max_prompt_tokens, config.max_new_tokens,
            strategy=strategy, num_beams=3,
        )  # fmt: skip
        expected[strategy] = float(np.mean(config.reward(prompts, completions)))
    assert found == {
        BEAM_TAG: pytest.approx(expected["beam"], abs=1e-12),
        BEAM_GREEDY_TAG: pytest.approx(expected["greedy"], abs=1e-12),
        "compare/num_beams": 3.0,
    }
    assert found[BEAM_TAG] != found[BEAM_GREEDY_TAG]  # the two decodings differ
    with pytest.raises(ValueError, match="num_beams must be None"):
        run_comparison("unused", ["ppo"], [0], 32, num_beams=0)
