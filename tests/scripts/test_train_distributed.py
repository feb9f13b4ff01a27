"""scripts/train.py launched by torchrun (2 CPU processes, gloo): one run directory written by rank 0,
a resume with the same number of processes, and the refusals of what cannot work."""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}
GRPO_RUN = (
    "--agent", "grpo", "--agent-config", '{"group_size": 2}', "--num-envs", "8",
    "--env-kwargs", '{"max_new_tokens": 3}', "--no-progress", "--device", "cpu", "--eval-episodes", "8",
)  # fmt: skip


def launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # The time-out only stops a hung launch; nothing here depends on wall-clock time.
    return subprocess.run(
        [*command, "scripts/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=1800, env=ENV
    )


def test_torchrun_grpo_run_is_written_once_and_resumes_with_every_rank(tmp_path):
    done = launch(*GRPO_RUN, "--total-timesteps", "40", "--logdir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["num_envs"] == 8
    assert done.stdout.count("trained grpo:") == 1  # rank 0 alone evaluates and prints
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2 and ckpt["num_envs"] == 8
    first = ckpt["num_timesteps"]
    assert first >= 40

    refused = subprocess.run(
        [sys.executable, "scripts/train.py", "--resume", str(run_dir / "checkpoint.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env=ENV,
    )
    assert refused.returncode == 2
    assert "trained by 2 process(es) and this launch has 1" in refused.stderr

    resumed = launch(
        "--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", str(first + 1), "--no-progress"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert resumed.stdout.count(f"resuming at {first} env steps") == 1
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["num_timesteps"] > first
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.name]  # the same run directory


def test_ctrl_c_to_torchrun_stops_every_rank_after_the_same_update_and_saves_it(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [
        "--num-envs", "8", "--ppo-config", '{"n_steps": 4}', "--env-kwargs", '{"max_new_tokens": 3}',
        "--total-timesteps", "100000000", "--checkpoint-interval", "1", "--no-progress", "--device", "cpu",
        "--eval-episodes", "8", "--logdir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*command, "scripts/train.py", *args], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    # Ctrl-C once the first checkpoint is there: both ranks are training. The deadline only stops
    # a hung launch.
    deadline = time.monotonic() + 1800
    while not list(tmp_path.glob("*/checkpoint.pt")):
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to every worker
    out = proc.communicate(timeout=1800)[0]
    assert out.count("interrupt: finishing this update, then saving") == 2, out[-6000:]  # each rank held it
    assert out.count("is the run's last checkpoint") == 1  # rank 0 reports
    assert "--resume" in out and "torchrun with 2 processes" in out
    ckpt = torch.load(next(tmp_path.glob("*/checkpoint.pt")), weights_only=True)
    assert ckpt["num_timesteps"] == ckpt["n_updates"] * 4 * 8  # the end of an update, on both ranks
    assert [state["n_updates"] for state in ckpt["ranks"]] == [ckpt["n_updates"]] * 2


@pytest.mark.slow
def test_torchrun_trains_a_hugging_face_policy_through_lora_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from agents.benchmark import _benchmark_model

    model_dir, _ = _benchmark_model("tiny", 8, tmp_path / "model")  # a random GPT-2 built offline
    logdir = tmp_path / "runs"
    done = launch(
        "--agent", "grpo", "--task", "reviews", "--policy-model", str(model_dir), "--hf-config",
        '{"lora_rank": 4}', "--agent-config", '{"group_size": 2, "beta": 0.05}', "--num-envs", "8",
        "--env-kwargs", '{"max_new_tokens": 8, "reward": {"name": "length"}}', "--total-timesteps", "100",
        "--threads", "1", "--no-progress", "--eval-episodes", "8", "--logdir", str(logdir),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (checkpoint,) = logdir.glob("*/checkpoint.pt")
    ckpt = torch.load(checkpoint, weights_only=True)
    assert len(ckpt["ranks"]) == 2 and all("lora_" in k or "value_head" in k for k in ckpt["model"])
    resumed = launch(
        "--resume", str(checkpoint), "--total-timesteps", str(ckpt["num_timesteps"] + 1), "--no-progress"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert torch.load(checkpoint, weights_only=True)["num_timesteps"] > ckpt["num_timesteps"]


@pytest.fixture(scope="module")
def parse_args():
    """scripts/train.py's ``parse_args`` (its ``__main__`` block does not run)."""
    return runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="_textgym_script_train_ddp")[
        "parse_args"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--agent", "grpo", "--agent-config", '{"group_size": 2}', "--num-envs", "6"],
            r"--num-envs 6 counts the envs of all 2 processes \(WORLD_SIZE\) together and must be a multiple "
            r"of 2 x group_size 2 = 4",
        ),
        (["--num-envs", "7"], r"--num-envs 7 counts the envs of all 2 processes .* multiple of 2 = 2"),
        (["--agent", "sb3-ppo"], r"--agent sb3-ppo trains in one process; torchrun runs ppo, grpo and rloo"),
    ],
)
def test_torchrun_settings_that_cannot_be_shared_are_refused_by_name(
    parse_args, monkeypatch, capsys, tmp_path, args, message
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parse_args([*args, "--logdir", str(tmp_path)])
    assert re.search(message, capsys.readouterr().err)
