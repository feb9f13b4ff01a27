"""The command-line scripts run end to end with tiny budgets (as subprocesses, as a user runs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("script", ["scripts/train.py", "scripts/benchmark.py"])
def test_help(script):
    out = run(script, "--help").stdout
    assert "usage:" in out and "--" in out


@pytest.mark.parametrize("agent", ["sb3-ppo", "sb3-a2c"])
def test_train_writes_a_run(tmp_path, agent):
    out = run(
        "scripts/train.py",
        "--agent",
        agent,
        "--total-timesteps",
        "512",
        "--num-envs",
        "16",
        "--eval-episodes",
        "32",
        "--logdir",
        str(tmp_path),
        "--no-progress",
        "--device",
        "cpu",
    ).stdout
    assert "random policy: mean episode reward" in out and "sample generations" in out
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == agent and config["total_timesteps"] == 512
    assert (run_dir / "model.zip").is_file()
    assert not list(run_dir.glob("*.tmp*"))
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_train_refuses_bad_arguments(tmp_path):
    proc = run("scripts/train.py", "--total-timesteps", "0", "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--total-timesteps must be >= 1" in proc.stderr
    proc = run("scripts/train.py", "--env-kwargs", "[1]", "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "JSON object" in proc.stderr
    proc = run("scripts/train.py", "--agent", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_benchmark_env_reports_every_face(tmp_path):
    out_file = tmp_path / "env.json"
    out = run(
        "scripts/benchmark.py",
        "env",
        "--sizes",
        "4",
        "--seconds",
        "0.2",
        "--async-max",
        "0",
        "--out",
        str(out_file),
    ).stdout
    report = json.loads(out_file.read_text())
    faces = {(r["face"], r["num_envs"]) for r in report["results"]}
    assert faces == {("single", 1), ("sync", 4), ("batched", 4)}
    assert all(r["env_steps_per_second"] > 0 for r in report["results"])
    assert report["ratios"]["4"]["batched_over_sync"] > 0
    assert "| batched | 4 |" in out


def test_benchmark_rollout_and_train(tmp_path):
    run(
        "scripts/benchmark.py",
        "rollout",
        "--num-envs",
        "4",
        "--max-new-tokens",
        "8",
        "--episodes",
        "1",
        "--out",
        str(tmp_path / "rollout.json"),
    )
    rollout = json.loads((tmp_path / "rollout.json").read_text())
    assert rollout["kv_cache"] > 0 and rollout["recompute"] > 0
    assert rollout["speedup"] == pytest.approx(rollout["kv_cache"] / rollout["recompute"])
    run(
        "scripts/benchmark.py",
        "train",
        "--total-timesteps",
        "512",
        "--num-envs",
        "8",
        "--out",
        str(tmp_path / "train.json"),
    )
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["env_steps"] >= 512 and 0 < train["rollout_share"] + train["update_share"] <= 1
