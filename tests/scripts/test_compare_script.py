"""scripts/compare.py end to end with tiny budgets, as subprocesses: its outputs, their agreement
with the TensorBoard scalars they come from (read here without agents.compare), --summarize, and
its refusals of bad arguments."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from script_runs import run_script, script

AGENTS = ["ppo", "ppo-seq2seq", "sb3-ppo", "sb3-a2c", "sb3-maskable-ppo"]
CUSTOM = ("ppo", "ppo-seq2seq")
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
SAMPLED_COLUMNS = ["sampled_eval_reward_mean", "sampled_eval_reward_std"]
BEAM_COLUMNS = [
    "beam_reward_mean",
    "beam_reward_std",
    "beam_greedy_reward_mean",
    "beam_greedy_reward_std",
    "num_beams",
]
IQM_COLUMNS = [
    f"{key}_iqm{suffix}" for key in ("final_reward", "eval_reward") for suffix in ("", "_ci_low", "_ci_high")
]
SB3_HYPERPARAMS = {
    "sb3-ppo": {"n_steps": 16, "batch_size": 32},
    "sb3-maskable-ppo": {"n_steps": 16, "batch_size": 32},
}
OUTPUTS = ("results.csv", "results.md", "runs.csv", "curves.png", "config.json")


def compare(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script("compare", *args, check=check)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard run, ``{tag: {step: value}}``, read event by event from every
    event file of the directory (not through agents.compare, nor EventAccumulator)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    files = list(run_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {run_dir}"
    out: dict[str, dict[int, float]] = {}
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(make_ndarray(value.tensor).item())
                else:
                    continue
                series = out.setdefault(value.tag, {})
                assert series.get(event.step, number) == number, f"{run_dir}: two values of {value.tag}"
                series[event.step] = number
    return out


def last(series: dict[int, float]) -> float:
    return series[max(series)]


def first_step_reaching(series: dict[int, float], threshold: float) -> int | None:
    return next((step for step in sorted(series) if series[step] >= threshold), None)


def check_tables_against_tensorboard(out: Path, threshold: float) -> None:
    """Per run: runs.csv's figures are the scalars of tb/<agent>_s<seed>_1; per agent: results.csv's
    means and stds are those over the runs (IQM, when present, the mean of the middle scores)."""
    _, runs = read_csv(out / "runs.csv")
    assert runs
    for row in runs:
        scalars = tb_scalars(out / "tb" / f"{row['agent']}_s{row['seed']}_1")
        rollout = scalars["rollout/ep_rew_mean"]
        assert float(row["final_reward"]) == last(rollout)
        assert float(row["eval_reward"]) == last(scalars["eval/mean_reward"])
        assert float(row["wall_seconds"]) == last(scalars["compare/wall_seconds"])
        assert float(row["env_steps_per_second"]) == last(scalars["compare/env_steps_per_second"])
        assert int(row["env_steps"]) == max(scalars["compare/wall_seconds"])
        reached = first_step_reaching(rollout, threshold)
        assert row["steps_to_threshold"] == ("" if reached is None else str(reached))
        # sampled beside greedy for every agent (random: the same evaluation); beam for custom ones
        assert float(row["sampled_eval_reward"]) == last(scalars["eval/mean_reward_sampled"])
        if row["agent"] == "random":
            assert row["sampled_eval_reward"] == row["eval_reward"]
        if "eval/beam_mean_reward" in scalars:
            assert row["agent"] in CUSTOM
            assert float(row["beam_reward"]) == last(scalars["eval/beam_mean_reward"])
            assert float(row["beam_greedy_reward"]) == last(scalars["eval/beam_greedy_mean_reward"])
            assert int(row["num_beams"]) == last(scalars["compare/num_beams"])
        else:
            assert row.get("beam_reward", "") == "" and row.get("num_beams", "") == ""

    _, results = read_csv(out / "results.csv")
    assert {r["agent"] for r in results} == {r["agent"] for r in runs}
    for agg in results:
        group = [r for r in runs if r["agent"] == agg["agent"]]
        assert int(agg["seeds"]) == len(group)
        assert int(agg["env_steps"]) == max(int(r["env_steps"]) for r in group)
        for key in ("final_reward", "eval_reward", "sampled_eval_reward"):
            values = np.array([float(r[key]) for r in group])
            assert float(agg[f"{key}_mean"]) == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            assert float(agg[f"{key}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
            if f"{key}_iqm" in agg:
                cut = len(values) // 4
                middle = np.sort(values)[cut : len(values) - cut]
                assert float(agg[f"{key}_iqm"]) == pytest.approx(middle.mean(), rel=1e-12, abs=1e-12)
        if agg["agent"] == "random":
            continue
        reached = [int(r["steps_to_threshold"]) for r in group if r["steps_to_threshold"]]
        assert int(agg["seeds_reaching_threshold"]) == len(reached)
        if reached:
            assert float(agg["steps_to_threshold_mean"]) == pytest.approx(np.mean(reached))
        else:
            assert agg["steps_to_threshold_mean"] == ""
        walls = [float(r["wall_seconds"]) for r in group]
        assert float(agg["wall_seconds_mean"]) == pytest.approx(np.mean(walls), rel=1e-12)
        speeds = [float(r["env_steps_per_second"]) for r in group]
        assert float(agg["env_steps_per_second_mean"]) == pytest.approx(np.mean(speeds), rel=1e-12)
        ppo_speed = np.mean([float(r["env_steps_per_second"]) for r in runs if r["agent"] == "ppo"])
        assert float(agg["speed_vs_ppo"]) == pytest.approx(np.mean(speeds) / ppo_speed, rel=1e-9)


@pytest.fixture(scope="module")
def four_agents(tmp_path_factory) -> tuple[Path, str]:
    """One comparison of the agents of AGENTS, seed 0, 256 env steps, beam search with 2 beams (the
    comparison's output, stdout)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    proc = compare(
        "--agents", *AGENTS, "--seeds", "0", "--total-timesteps", "256", "--num-envs", "8",
        "--eval-episodes", "8", "--out", str(out), "--no-progress", "--device", "cpu",
        "--sb3-hyperparams", json.dumps(SB3_HYPERPARAMS), "--ppo-config", '{"n_steps": 16}', "--beam", "2",
    )  # fmt: skip
    return out, proc.stdout


def test_compare_writes_every_output(four_agents):
    """results.csv (documented columns, one row per agent, random last), results.md, runs.csv,
    curves.png, config.json, hyperparams/<agent>.json and tb/<agent>_s0_1 for every agent and random."""
    out, stdout = four_agents
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp*"))
    assert sorted(p.name for p in (out / "hyperparams").iterdir()) == sorted(
        f"{a}.json" for a in [*AGENTS, "random"]
    )
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted(f"{a}_s0_1" for a in [*AGENTS, "random"])

    columns, results = read_csv(out / "results.csv")
    # one seed: no IQM columns; the default task holds nothing out: no held-out columns
    assert columns == [*RESULT_COLUMNS[:7], *SAMPLED_COLUMNS, *BEAM_COLUMNS, *RESULT_COLUMNS[7:]]
    assert [r["agent"] for r in results] == [*AGENTS, "random"]
    for r in results:  # the beam columns: the custom agents only
        assert (r["beam_reward_mean"] != "") == (r["agent"] in CUSTOM)
        assert r["num_beams"] == ("2" if r["agent"] in CUSTOM else "")
    for r in results:
        assert r["seeds"] == "1" and r["env_steps"] == "256"
        assert -1.0 <= float(r["final_reward_mean"]) <= 1.0
    trained = [r for r in results if r["agent"] != "random"]
    assert all(
        float(r["wall_seconds_mean"]) > 0 and float(r["env_steps_per_second_mean"]) > 0 for r in trained
    )
    assert float(results[0]["speed_vs_ppo"]) == 1.0
    assert results[-1]["speed_vs_ppo"] == "" and results[-1]["wall_seconds_mean"] == ""

    columns, runs = read_csv(out / "runs.csv")
    assert {(r["agent"], r["seed"]) for r in runs} == {(a, "0") for a in [*AGENTS, "random"]}

    md = (out / "results.md").read_text()
    assert md.startswith("| agent | seeds |")
    assert len([line for line in md.splitlines() if line.startswith("|")]) == 2 + len(AGENTS) + 1
    assert "beam 2, training prompts (mean ± std)" in md and "sampled eval reward (mean ± std)" in md
    assert md in stdout  # the table is also printed

    config = json.loads((out / "config.json").read_text())
    assert config["agents"] == AGENTS and config["seeds"] == [0] and config["total_timesteps"] == 256
    assert config["num_envs"] == 8 and config["threshold"] == 0.8  # the default task's threshold
    assert config["sb3_hyperparams"] == SB3_HYPERPARAMS
    assert config["ppo_config_resolved"]["n_steps"] == 16 and config["beam"] == 2
    assert config["ppo-seq2seq_config_resolved"]["policy"]["architecture"] == "seq2seq"


def test_hyperparams_files_record_what_ran(four_agents):
    """hyperparams/<agent>.json holds the overrides and the defaults, and the TensorBoard x axis
    shows they were used: one rollout/ep_rew_mean point per n_steps x 8 envs."""
    out, _ = four_agents
    params = {a: json.loads((out / "hyperparams" / f"{a}.json").read_text()) for a in [*AGENTS, "random"]}
    config = json.loads((out / "config.json").read_text())
    assert params["ppo"] == config["ppo_config_resolved"]
    seq2seq = params.pop("ppo-seq2seq")
    counts = seq2seq.pop("policy_parameters"), seq2seq.pop("decoder_only_policy_parameters")
    assert seq2seq == config["ppo-seq2seq_config_resolved"] and seq2seq["n_steps"] == 16
    assert abs(counts[0] - counts[1]) <= 0.1 * counts[1]
    for agent in ("sb3-ppo", "sb3-maskable-ppo"):
        assert params[agent]["n_steps"] == 16 and params[agent]["batch_size"] == 32
        assert params[agent]["n_epochs"] == 4 and params[agent]["learning_rate"] == "lin_1e-3"
    assert params["sb3-a2c"]["n_steps"] == 8  # agents.baselines' default
    assert "batch_size" not in params["sb3-a2c"]
    assert params["random"] == {"policy": "uniform over the vocabulary"}
    steps = {a: sorted(tb_scalars(out / "tb" / f"{a}_s0_1")["rollout/ep_rew_mean"]) for a in AGENTS}
    assert steps == {
        "ppo": [128, 256],
        "ppo-seq2seq": [128, 256],
        "sb3-ppo": [128, 256],
        "sb3-maskable-ppo": [128, 256],
        "sb3-a2c": [64, 128, 192, 256],
    }
    assert sorted(tb_scalars(out / "tb" / "random_s0_1")["rollout/ep_rew_mean"]) == [0, 256]


def test_tables_agree_with_tensorboard(four_agents):
    """Every figure of runs.csv and results.csv is the TensorBoard scalars', read independently."""
    out, _ = four_agents
    check_tables_against_tensorboard(out, threshold=0.8)
    # The random policy's level is its evaluation, logged as a flat curve.
    random = tb_scalars(out / "tb" / "random_s0_1")
    assert set(random["rollout/ep_rew_mean"].values()) == {last(random["eval/mean_reward"])}


def test_five_seeds_report_iqm(tmp_path):
    """With five seeds results.csv adds the IQM and its interval, low <= IQM <= high, for the
    agent and the random policy; every figure still agrees with TensorBoard."""
    out = tmp_path / "out"
    compare(
        "--agents", "ppo", "--seeds", "0", "1", "2", "3", "4", "--total-timesteps", "128",
        "--num-envs", "4", "--eval-episodes", "4", "--ppo-config", '{"n_steps": 8}', "--out", str(out),
        "--no-progress", "--device", "cpu",
    )  # fmt: skip
    columns, results = read_csv(out / "results.csv")
    assert columns == [*RESULT_COLUMNS[:7], *SAMPLED_COLUMNS, *RESULT_COLUMNS[7:], *IQM_COLUMNS]
    assert [r["agent"] for r in results] == ["ppo", "random"]
    for row in results:
        assert row["seeds"] == "5"
        for key in ("final_reward", "eval_reward"):
            low, mid, high = (float(row[f"{key}_iqm{s}"]) for s in ("_ci_low", "", "_ci_high"))
            assert low <= mid <= high
    assert "IQM [95% CI]" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted(
        f"{a}_s{s}_1" for a in ("ppo", "random") for s in range(5)
    )
    check_tables_against_tensorboard(out, threshold=0.8)


def test_summarize_recomputes_the_tables(four_agents, tmp_path):
    """--summarize rewrites byte-identical CSV and Markdown tables from tb/ alone, with the saved
    threshold; with --threshold the steps to it follow the curves."""
    original, _ = four_agents
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    for name in ("results.csv", "results.md", "runs.csv", "curves.png"):
        (out / name).unlink()
    proc = compare("--summarize", str(out))
    for name in ("results.csv", "results.md", "runs.csv"):
        assert (out / name).read_bytes() == (original / name).read_bytes(), name
    assert (out / "curves.png").is_file()
    assert (original / "results.md").read_text() in proc.stdout

    # The threshold at the highest point of the custom PPO's curve: reached there, and not before.
    rollout = tb_scalars(out / "tb" / "ppo_s0_1")["rollout/ep_rew_mean"]
    threshold = max(rollout.values())
    compare("--summarize", str(out), f"--threshold={threshold!r}")
    _, runs = read_csv(out / "runs.csv")
    ppo = next(r for r in runs if r["agent"] == "ppo")
    assert ppo["steps_to_threshold"] == str(max(rollout, key=lambda step: (rollout[step], -step)))
    check_tables_against_tensorboard(out, threshold)


def test_summarize_refuses_a_directory_without_tb(tmp_path):
    (tmp_path / "results.csv").write_text("agent\n")
    proc = compare("--summarize", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "--summarize" in proc.stderr and "tb/" in proc.stderr
    assert (tmp_path / "results.csv").read_text() == "agent\n"


def compare_script():
    return script("compare")


BAD_ARGUMENTS = [
    (["--agents", "ppo", "dqn"], "--agents: invalid choice: 'dqn'"),
    (["--agents", "ppo", "ppo"], "--agents and --seeds must not repeat"),
    (["--seeds", "0", "1", "0"], "--agents and --seeds must not repeat"),
    (["--seeds", "0", "-1"], "--seeds: must be an integer from 0 to 4294967295"),
    (["--seeds", str(2**64)], "--seeds: must be an integer from 0 to 4294967295"),
    (["--total-timesteps", "0"], "--total-timesteps must be >= 1"),
    (["--sb3-hyperparams", '{"ppo": {"n_steps": 8}}'], "--sb3-hyperparams must map SB3 agents"),
    (["--sb3-hyperparams", '{"sb3-ppo": 16}'], "--sb3-hyperparams must map SB3 agents"),
    (["--sb3-hyperparams", "[1, 2]"], "--sb3-hyperparams must be a JSON object"),
    (["--sb3-hyperparams", "{not json"], "--sb3-hyperparams: not valid JSON"),
    (["--sb3-hyperparams", '{"sb3-ppo": {"n_steps": -1}}'], "n_steps must be a positive integer, got -1"),
    (["--sb3-hyperparams", '{"sb3-ppo": {"batch_size": 1}}'], "batch_size must be >= 2"),
    (
        ["--sb3-hyperparams", '{"sb3-ppo": {"batch_size": 32, "policy_kwargs": {"d_modle": 8}}}'],
        "--sb3-hyperparams: sb3-ppo cannot be built",
    ),
    (["--env-kwargs", '{"task": "keyword"}'], "--env-kwargs"),
    (["--env-kwargs", "{bad"], "--env-kwargs: not valid JSON"),
    (["--ppo-config", '{"n_stepz": 16}'], "--ppo-config: unknown PPOConfig fields ['n_stepz']"),
    (["--ppo-config", '{"n_steps": 0}'], "--ppo-config"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threads", "-2"], "--threads: must be >= 0"),
    (["--beam", "0"], "--beam must be >= 1 (beams per prompt), got 0"),
    (["--beam", "2", "--env-kwargs", '{"chat_template": true}'], "--beam does not support"),
    (
        ["--agents", "ppo-seq2seq", "--ppo-config", '{"policy": {"architecture": "seq2seq"}}'],
        "--ppo-config: ppo-seq2seq cannot be built",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_naming_the_option(tmp_path, args, message, capsys):
    """Mistakes are refused at once (exit 2, usage error naming the option), before any output;
    settings that only building an agent can check are checked by building each agent once."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        compare_script().main([*args, "--out", str(out), "--no-progress", "--num-envs", "4"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "usage:" in err and message in err, err
    assert not out.exists()


def test_bad_arguments_give_no_traceback(tmp_path):
    """As a subprocess, as a user runs it: the usage error alone, no traceback."""
    out = tmp_path / "out"
    proc = compare("--seeds", "-1", "--out", str(out), check=False)
    assert proc.returncode == 2 and "--seeds" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("where", ["afile", "afile/out"])
def test_out_that_cannot_be_a_directory_is_refused(tmp_path, where, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as info:
        compare_script().parse_args(["--out", str(tmp_path / where)])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def test_out_holding_a_comparison_is_refused(tmp_path):
    """--out pointing at an earlier comparison (a non-empty tb/) exits 2 and leaves it untouched."""
    (tmp_path / "tb" / "ppo_s0_1").mkdir(parents=True)
    proc = compare("--out", str(tmp_path), "--no-progress", check=False)
    assert proc.returncode == 2
    assert "--out" in proc.stderr and "already holds a comparison" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_help_mentions_quick():
    proc = compare("--help")
    assert "usage:" in proc.stdout and "--quick" in proc.stdout and "--summarize" in proc.stdout


def test_unknown_sb3_hyperparameter_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    proc = compare(
        "--agents", "sb3-ppo", "--seeds", "0", "--total-timesteps", "64", "--num-envs", "4",
        "--eval-episodes", "4", "--out", str(out), "--no-progress", "--device", "cpu",
        "--sb3-hyperparams", '{"sb3-ppo": {"n_stepz": 16}}',
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "n_stepz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "tb").exists()
