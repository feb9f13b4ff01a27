"""scripts/arithmetic.py and agents.recipes: the warm-up-then-RL demonstration.

Tiny budgets only: ``--quick`` end to end (as a subprocess, as a user runs it), the argument
checks and ``--help`` in-process, and the summary's arithmetic on hand-made figures.
"""

from __future__ import annotations

import json

import pytest
from script_runs import run_script, script

from agents.recipes import CONTROL, WARMUP, RecipeConfig, exact_match, results_markdown, summarize, warm_up


def test_quick_run_writes_the_table_and_every_stage(tmp_path):
    out = tmp_path / "run"
    proc = run_script("arithmetic", "--quick", "--seeds", "3", "--out", str(out), "--no-progress")
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [3]
    assert [r["policy"] for r in summary["rows"]] == [WARMUP, CONTROL, "grpo", "rloo", "ppo"]
    stages = summary["runs"][0]["stages"]
    for name, stage in stages.items():
        for key in ("test_greedy", "test_sampled", "train_greedy"):
            assert 0.0 <= stage[key] <= 1.0, (name, key)
    for agent in ("grpo", "rloo", "ppo"):
        assert stages[agent]["env_steps"] >= summary["config"]["total_timesteps"]
    assert stages[WARMUP]["steps"] == summary["config"]["warmup_max_steps"]  # --quick: target 1.0
    assert summary["best"] in ("grpo", "rloo", "ppo")
    markdown = (out / "results.md").read_text()
    assert markdown == results_markdown(summary) and markdown in proc.stdout
    assert (out / "seed3" / "lm.pt").is_file()
    assert not list(out.glob("*.tmp"))


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        script("arithmetic").parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--seeds",
        "--agents",
        "--processes",
        "--threads",
        "--warmup-target",
        "--total-timesteps",
        "--quick",
        "--out",
    ):
        assert option in text
    assert "python scripts/arithmetic.py --quick" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--warmup-target", "1.5"], "--warmup-target must be in [0, 1], got 1.5"),
        (["--seeds", "0", "0"], "--seeds and --agents must not repeat a value"),
        (["--agents", "ppo", "a2c"], "argument --agents: invalid choice: 'a2c'"),
        (["--processes", "0"], "argument --processes: must be >= 1, got 0"),
        (["--total-timesteps", "-5"], "argument --total-timesteps: must be >= 1, got -5"),
        (["--seeds", "-1"], "argument --seeds: must be an integer from 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        script("arithmetic").parse_args([*argv, "--out", str(out)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_out_must_be_a_new_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        script("arithmetic").parse_args(["--out", str(tmp_path / "file")])
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        script("arithmetic").parse_args(["--out", str(tmp_path / "done")])
    assert "already holds results" in capsys.readouterr().err


def test_config_is_checked():
    with pytest.raises(ValueError, match="agents must be some of"):
        RecipeConfig(agents=())
    with pytest.raises(ValueError, match="agents must be some of"):
        RecipeConfig(agents=("a2c",))
    with pytest.raises(ValueError, match=r"group_num_envs \(30\) must be a multiple"):
        RecipeConfig(group_num_envs=30)
    with pytest.raises(ValueError, match="warmup_target must be in"):
        RecipeConfig(warmup_target=-0.1)
    with pytest.raises(ValueError, match="total_timesteps must be an integer >= 1, got 0"):
        RecipeConfig(total_timesteps=0)
    with pytest.raises(ValueError, match="control_steps must be an integer >= 0, got -1"):
        RecipeConfig(control_steps=-1)
    assert RecipeConfig(control_steps=0).control_steps == 0  # no control


def test_warm_up_stops_at_its_target_on_training_prompts():
    reached, _, steps = warm_up(RecipeConfig(warmup_target=0.0, warmup_max_steps=50), seed=0)
    assert steps == 0  # checked before the first step: 0 >= 0
    _, _, steps = warm_up(
        RecipeConfig(warmup_target=1.0, warmup_max_steps=5, warmup_check_interval=2), seed=0
    )
    assert steps == 5  # never reached: the longest warm-up
    accuracy = exact_match(reached, "arithmetic2", "test", limit=50)
    assert accuracy == 0.0  # an untrained model answers none of these


def _run(seed: int, warmup: float, control: float, grpo: float, ppo: float) -> dict:
    def stage(test: float, **extra: float) -> dict:
        return {"test_greedy": test, "test_sampled": test / 2, "train_greedy": test, "seconds": 1.0, **extra}

    return {
        "seed": seed,
        "stages": {
            WARMUP: stage(warmup, steps=100 + seed),
            CONTROL: stage(control, steps=300 + seed),
            "grpo": stage(grpo, env_steps=1000),
            "ppo": stage(ppo, env_steps=1000),
        },
    }


def test_summary_by_hand():
    config = RecipeConfig(agents=("grpo", "ppo"))
    runs = [_run(1, 0.2, 0.9, 0.6, 0.5), _run(0, 0.1, 0.8, 0.5, 0.5)]
    summary = summarize(config, runs)
    rows = {r["policy"]: r for r in summary["rows"]}
    assert summary["seeds"] == [0, 1]
    assert rows["grpo"]["test_greedy_mean"] == pytest.approx(0.55)
    assert rows["grpo"]["test_greedy_std"] == pytest.approx(0.0707107, abs=1e-6)  # ddof 1
    assert rows["grpo"]["lift_points_per_seed"] == pytest.approx([40.0, 40.0])
    assert rows["ppo"]["lift_points_per_seed"] == pytest.approx([40.0, 30.0])
    assert rows[WARMUP]["budget"] == "100 / 101 supervised steps"
    assert rows["ppo"]["budget"] == "1,000 env steps"
    assert summary["best"] == "grpo" and summary["min_lift_points"] == pytest.approx(30.0)
    assert summary["best_is_clear"] is False  # 0.55 - 0.5 is within grpo's std
    markdown = results_markdown(summary)
    assert "| **grpo** |" in markdown and "grpo 0.550 > ppo 0.500" in markdown
    assert "not by more than the seeds' spread" in markdown
