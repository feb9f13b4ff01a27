"""scripts/sweep.py: --help, bad input refused before any work (in-process through ``main``), and a
tiny sweep that writes its three files."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from script_runs import load_script, run_script


def sweep_script() -> ModuleType:
    return load_script("sweep")


def test_help_as_a_user_runs_it():
    proc = run_script("sweep", "--help")
    for option in ("--tasks", "--config", "--seeds", "--total-timesteps", "--marks", "--out", "--threads"):
        assert option in proc.stdout
    assert "(default: 100000)" in proc.stdout and "alliteration" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "nope"], "--tasks: unknown task 'nope'"),
        (["--config", "n_step=32"], "--config 'n_step=32': unknown PPOConfig field 'n_step'"),
        (["--config", "n_steps=0"], "PPOConfig.n_steps must be a positive integer, got 0"),
        (["--config", "learning_rate=fast"], "not a number"),
        (["--config", "num_envs=16", "--config", "num_envs=16,n_steps=32"], "the same setting"),
        (["--seeds", "0", "0"], "--seeds: each seed once"),
        (["--seeds", "-1"], "--seeds"),
        (["--total-timesteps", "0"], "--total-timesteps"),
        (["--marks", "0"], "--marks"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        sweep_script().main([*argv, "--out", str(out)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_out_must_be_empty(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit):
        sweep_script().main(["--out", str(tmp_path)])
    assert "is not empty" in capsys.readouterr().err


def test_tiny_sweep_writes_its_files(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = sweep_script().main(
        ["--tasks", "keyword", "--config", "num_envs=2,n_steps=16,n_epochs=1", "--config", "num_envs=4,n_steps=8,n_epochs=1",
         "--total-timesteps", "128", "--marks", "64", "128", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "[1/2] keyword seed 0 num_envs=2," in printed and "[2/2] keyword seed 0 num_envs=4," in printed
    runs = json.loads((out / "runs.json").read_text())
    assert [r["setting"]["num_envs"] for r in runs] == [2, 4]
    assert all(r["env_steps"] == 128 and r["curve"] for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and summary[0]["seeds"] == [0]
    table = (out / "results.md").read_text()
    assert table.startswith("| task | num_envs |") and table.count("| keyword (≥0.6) |") == 2
    assert sorted(p.name for p in out.iterdir()) == ["results.md", "runs.json", "summary.json"]
