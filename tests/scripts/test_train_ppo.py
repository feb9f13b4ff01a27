"""scripts/train.py with the custom PPO agent, end to end as subprocesses: a run, Ctrl-C, resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.ppo import PPO

ROOT = Path(__file__).resolve().parents[2]
COMMON = ("--no-progress", "--device", "cpu", "--eval-episodes", "32")


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def scalar_steps(tb_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_ppo_run_writes_config_checkpoint_and_events(tmp_path):
    out = train(
        "--agent", "ppo", "--total-timesteps", "2048", "--num-envs", "16", "--logdir", str(tmp_path), *COMMON
    ).stdout  # fmt: skip
    assert "random policy: mean episode reward" in out
    assert "sample generations" in out
    assert "PPOConfig: " in out
    assert re.search(r"trained ppo: 2048 env steps", out), out
    assert re.search(r"mean episode reward \(greedy\): random [\d.]+ -> trained [\d.]+", out), out
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("ppo_default_s0_")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == "ppo" and config["total_timesteps"] == 2048 and config["num_envs"] == 16
    assert config["run_dir"] == str(run_dir)
    model = PPO.load(run_dir / "checkpoint.pt", device="cpu")
    assert config["ppo_config_resolved"] == model.config.to_dict()  # every field, defaults included
    assert model.num_timesteps == 2048 and model.num_envs == 16
    assert not list(run_dir.rglob("*.tmp"))
    events = list(run_dir.rglob("events.out.tfevents.*"))
    assert events
    steps = scalar_steps(events[0].parent, "rollout/ep_rew_mean")
    assert steps == [512, 1024, 1536, 2048]  # x axis: env steps (32 steps x 16 envs per update)


def test_interrupt_then_resume(tmp_path):
    """Ctrl-C saves a checkpoint short of the target; --resume continues from it to the target."""
    total, per_update = 8192, 16 * 8
    args = [
        sys.executable, "scripts/train.py", "--agent", "ppo", "--total-timesteps", str(total),
        "--num-envs", "16", "--ppo-config", '{"n_steps": 8}', "--checkpoint-interval", "1",
        "--logdir", str(tmp_path), *COMMON,
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only if SIGINT is not ignored when it starts.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        checkpoints: list[Path] = []
        while not checkpoints and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            checkpoints = list(tmp_path.glob("*/checkpoint.pt"))
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert checkpoints, "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "interrupted: saved" in stdout and "checkpoint.pt" in stdout
    (checkpoint,) = checkpoints
    run_dir = checkpoint.parent
    assert not list(run_dir.glob("*.tmp"))
    saved = PPO.load(checkpoint, device="cpu")
    done = saved.num_timesteps
    # Steps are counted as they happen: a Ctrl-C within a rollout saves a count between updates.
    assert 0 < done < total and done % 16 == 0
    assert saved._target_timesteps == total
    updates_done = saved.n_updates
    assert updates_done * per_update <= done < (updates_done + 1) * per_update

    out = train("--resume", str(checkpoint), *COMMON).stdout
    assert f"resuming at {done} env steps; {total - done} to go" in out
    # Whole rollouts from there on: the target is reached, overshooting by less than one rollout.
    updates_left = -(-(total - done) // per_update)
    end = done + updates_left * per_update
    assert total <= end < total + per_update
    assert f"trained ppo: {end} env steps" in out
    assert "sample generations" in out
    final = PPO.load(checkpoint, device="cpu")
    assert final.num_timesteps == end
    assert final.n_updates == updates_done + updates_left
    # Same run directory, same TensorBoard run, continued up to the target.
    assert list(tmp_path.iterdir()) == [run_dir]
    (tb_dir,) = run_dir.glob("ppo_*")
    steps = scalar_steps(tb_dir, "train/loss")
    assert steps[-1] == end
    assert set(range(done + per_update, end + 1, per_update)) <= set(steps)


def test_bad_ppo_config(tmp_path):
    proc = train(
        "--ppo-config", '{"n_steps": 8, "bogus": 1}', "--logdir", str(tmp_path), *COMMON, check=False
    )
    assert proc.returncode != 0
    assert "--ppo-config: unknown PPOConfig fields ['bogus']" in proc.stderr
    proc = train("--ppo-config", '{"n_steps": 0}', "--logdir", str(tmp_path), *COMMON, check=False)
    assert proc.returncode != 0
    assert "PPOConfig.n_steps must be a positive integer" in proc.stderr
    proc = train("--ppo-config", "[8]", "--logdir", str(tmp_path), *COMMON, check=False)
    assert proc.returncode == 2 and "--ppo-config must be a JSON object" in proc.stderr
    proc = train(
        "--agent", "sb3-ppo", "--ppo-config", '{"n_steps": 8}', "--logdir", str(tmp_path), check=False
    )
    assert proc.returncode == 2 and "--ppo-config applies to --agent ppo only" in proc.stderr
    assert not list(tmp_path.rglob("checkpoint.pt"))


@pytest.mark.parametrize("where", ["missing.pt", "missing_dir/checkpoint.pt"])
def test_resume_missing_file(tmp_path, where):
    proc = train("--resume", str(tmp_path / where), *COMMON, check=False)
    assert proc.returncode == 2
    assert "--resume: no checkpoint file at" in proc.stderr
