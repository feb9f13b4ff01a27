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
from script_runs import ENV, ROOT, TIMEOUT, run_script, script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.ppo import PPO

COMMON = ("--no-progress", "--device", "cpu", "--eval-episodes", "32")


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script("train", *args, check=check)


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
    assert re.search(r"trained ppo: 2,048 env steps in [\d.]+ s", out), out
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
        env=ENV,
        # Python turns SIGINT into KeyboardInterrupt only if SIGINT is not ignored when it starts.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        checkpoints: list[Path] = []
        while not checkpoints and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            checkpoints = list(tmp_path.glob("*/checkpoint.pt"))
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert checkpoints, "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "interrupted: " in stdout and "checkpoint.pt is the run's last checkpoint" in stdout
    assert "python scripts/train.py --resume " in stdout
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
    assert f"trained ppo: {end:,} env steps" in out
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


# ------------------------------------------------------------- in-process: resume, summary, TB
TINY = ["--num-envs", "4", "--ppo-config", '{"n_steps": 8}', *COMMON[:3], "--eval-episodes", "4"]


def exit_code(fn, argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as info:
        fn(argv)
    return info.value.code


@pytest.fixture(autouse=True)
def restore_threads():
    """train.py's main sets torch's thread count (--threads): give the test process its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_run(tmp_path, capsys) -> tuple[Path, str]:
    """train.py --total-timesteps 50 with rollouts of 8 x 4 = 32 env steps: (run directory, stdout)."""
    assert script("train").main(["--total-timesteps", "50", "--logdir", str(tmp_path / "runs"), *TINY]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir, capsys.readouterr().out


def tb_run(run_dir: Path) -> EventAccumulator:
    (tb_dir,) = (p for p in run_dir.iterdir() if p.is_dir())
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc


def test_summary_says_the_target_was_rounded_up_to_whole_rollouts(small_run):
    _, out = small_run
    assert "trained ppo: 64 env steps (50 asked, rounded up to whole rollouts of 32) in " in out


def test_evaluation_config_samples_and_hparams_in_tensorboard(small_run):
    """eval/mean_reward (after training, at the last step) and eval/mean_reward_random (step 0),
    the samples and run config as text, and an HParams entry of the run settings."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, out = small_run
    acc = tb_run(run_dir)
    (trained,) = acc.Scalars("eval/mean_reward")
    (random,) = acc.Scalars("eval/mean_reward_random")
    assert trained.step == 64 and random.step == 0
    assert f"random {random.value:.3f} -> trained {trained.value:.3f}" in out
    assert {"eval/samples/text_summary", "run/config/text_summary", "config/text_summary"} <= set(
        acc.Tags()["tensors"]
    )
    config_text = acc.Tensors("run/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"total_timesteps": 50' in config_text
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["agent"].string_value == "ppo" and hparams["task"].string_value == "default"
    assert hparams["seed"].number_value == 0 and hparams["num_envs"].number_value == 4
    assert hparams["total_timesteps"].number_value == 50
    assert json.loads(hparams["env_kwargs"].string_value) == {}
    experiment = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    metrics = plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos
    assert [m.name.tag for m in metrics] == ["eval/mean_reward"]


def test_sb3_run_logs_config_samples_and_evaluation(tmp_path, capsys):
    argv = ["--agent", "sb3-a2c", "--hyperparams", '{"n_steps": 8}', "--total-timesteps", "64",
            "--num-envs", "4", "--eval-episodes", "4", "--no-progress", "--device", "cpu",
            "--logdir", str(tmp_path)]  # fmt: skip
    assert script("train").main(argv) == 0
    (run_dir,) = tmp_path.iterdir()
    acc = tb_run(run_dir)
    assert {"eval/mean_reward", "eval/mean_reward_random", "rollout/ep_rew_mean"} <= set(
        acc.Tags()["scalars"]
    )
    assert {"eval/samples/text_summary", "run/config/text_summary", "config/text_summary"} <= set(
        acc.Tags()["tensors"]
    )
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"n_steps": 8' in config_text and '"learning_rate": "lin_1e-3"' in config_text
    samples = acc.Tensors("eval/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert samples.startswith("| prompt | completion | return |")
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_resume_with_a_new_total(small_run, capsys):
    """--total-timesteps on --resume is the run's new total, counted from its start; the run's
    repeated own options are accepted; config.json records the new total."""
    run_dir, _ = small_run
    checkpoint = run_dir / "checkpoint.pt"
    argv = ["--resume", str(checkpoint), "--total-timesteps", "128", "--seed", "0", "--num-envs", "4",
            "--ppo-config", '{"n_steps": 8}', *COMMON[:3], "--eval-episodes", "4"]  # fmt: skip
    assert script("train").main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming at 64 env steps; 64 to go" in out
    assert "trained ppo: 128 env steps; 64 in this session in " in out
    assert PPO.load(checkpoint, device="cpu").num_timesteps == 128
    assert json.loads((run_dir / "config.json").read_text())["total_timesteps"] == 128
    steps = sorted(e.step for e in tb_run(run_dir).Scalars("eval/mean_reward"))
    assert steps == [64, 128]  # the same TensorBoard run, continued

    # At its total: nothing to train, only the evaluation.
    assert script("train").main(["--resume", str(checkpoint), *COMMON[:3], "--eval-episodes", "4"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "trained ppo: 128 env steps, none in this session" in out
    assert PPO.load(checkpoint, device="cpu").num_timesteps == 128


def test_resume_refuses_a_total_below_the_steps_done(small_run):
    run_dir, _ = small_run
    code = exit_code(
        script("train").main, ["--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "40"]
    )
    assert isinstance(code, str) and "--total-timesteps 40 is below the 64 env steps" in code
    assert PPO.load(run_dir / "checkpoint.pt", device="cpu").num_timesteps == 64


@pytest.mark.parametrize(
    "option",
    [
        ["--agent", "sb3-ppo"],
        ["--task", "keyword"],
        ["--env-kwargs", '{"max_new_tokens": 4}'],
        ["--ppo-config", '{"n_steps": 16}'],
        ["--num-envs", "8"],
        ["--seed", "1"],
        ["--logdir", "elsewhere"],
        ["--init-policy", "lm.pt"],
        ["--hyperparams", '{"n_steps": 4}'],
    ],
    ids=lambda option: option[0],
)
def test_resume_refuses_options_that_would_change_the_run(small_run, option, capsys):
    """Options that make the run what it is come from its config.json: given with --resume and
    different, they are refused (they were silently ignored), naming the option and both values."""
    run_dir, _ = small_run
    before = (run_dir / "config.json").read_text()
    assert exit_code(script("train").parse_args, ["--resume", str(run_dir / "checkpoint.pt"), *option]) == 2
    err = capsys.readouterr().err
    assert "--resume continues the run with its own settings" in err and f"{option[0]} " in err
    assert "(the run has " in err
    assert (run_dir / "config.json").read_text() == before


def test_resume_takes_the_run_settings(small_run):
    run_dir, _ = small_run
    args = script("train").parse_args(["--resume", str(run_dir / "checkpoint.pt")])
    assert (args.agent, args.num_envs, args.ppo_config, args.seed) == ("ppo", 4, {"n_steps": 8}, 0)
    assert args.total_timesteps is None  # the checkpoint's own total, read when it is loaded


REPEATED = [("review of the hotel : the room", "best best best best best best best best", 0.989)] * 8
VARIED = [("review of the hotel : the room", "the room was clean and the view was great", 0.6)] * 8


@pytest.mark.parametrize(
    ("samples", "reward_name", "mean", "noted"),
    [
        (REPEATED, "sentiment", 0.98, True),
        (VARIED, "sentiment", 0.98, False),
        (REPEATED, "keyword", 0.98, False),
        (REPEATED, "sentiment", 0.3, False),
    ],
    ids=["repeated-lexicon", "varied", "other-reward", "low-reward"],
)
def test_reward_hacking_note(samples, reward_name, mean, noted, tmp_path, capsys, monkeypatch):
    """Repetitive samples under the lexicon reward get a note naming reward hacking and the
    pipeline that fixes it (the main job printed eight "best best ..." with no word on why)."""
    train_module = script("train")

    def fake_evaluate(policy, env_kwargs, episodes, num_envs):
        return {
            "mean": 0.2 if policy is None else mean,
            "std": 0.0,
            "episodes": episodes,
            "samples": samples,
            "reward_name": reward_name,
        }

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    assert train_module.main(["--total-timesteps", "32", "--logdir", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert ("reward hacking" in out and "scripts/pipeline.py" in out and "'best'" in out) == noted


# ------------------------------------------------------------------------- group agents: grpo, rloo
GROUP_TINY = ["--num-envs", "8", "--agent-config", '{"group_size": 4}', *COMMON[:3], "--eval-episodes", "4"]


@pytest.mark.parametrize("agent", ["grpo", "rloo"])
def test_group_agent_run_writes_config_checkpoint_and_events_and_resumes(agent, tmp_path, capsys):
    from agents import GRPO, RLOO

    cls = {"grpo": GRPO, "rloo": RLOO}[agent]
    logdir = tmp_path / "runs"
    assert (
        script("train").main(
            ["--agent", agent, "--total-timesteps", "100", "--logdir", str(logdir), *GROUP_TINY]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{cls.config_class.__name__}: " in out
    # Rollouts of one episode per row: 8 rows x up to 8 steps (the default task's max_new_tokens).
    assert re.search(rf"trained {agent}: [\d,]+ env steps \(100 asked; a rollout ends when every group", out)
    (run_dir,) = logdir.iterdir()
    assert run_dir.name.startswith(f"{agent}_default_s0_")
    config = json.loads((run_dir / "config.json").read_text())
    model = cls.load(run_dir / "checkpoint.pt", device="cpu")
    assert config["agent"] == agent and config["agent_config"] == {"group_size": 4}
    assert config["agent_config_resolved"] == model.config.to_dict() and model.config.group_size == 4
    assert "ppo_config_resolved" not in config
    done = model.num_timesteps
    assert done >= 100 and model.n_updates >= 1
    acc = tb_run(run_dir)
    assert {"rollout/ep_rew_mean", "train/group_reward_std", "eval/mean_reward"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("rollout/ep_rew_mean")[-1].step == done

    # --resume continues it; options that would change the run are refused.
    checkpoint = run_dir / "checkpoint.pt"
    assert (
        exit_code(
            script("train").parse_args, ["--resume", str(checkpoint), "--agent-config", '{"group_size": 2}']
        )
        == 2
    )
    err = capsys.readouterr().err
    assert '--agent-config {"group_size": 2} (the run has {"group_size": 4})' in err
    argv = [
        "--resume",
        str(checkpoint),
        "--total-timesteps",
        str(done + 64),
        *COMMON[:3],
        "--eval-episodes",
        "4",
    ]
    assert script("train").main(argv) == 0
    assert f"resuming at {done} env steps; 64 to go" in capsys.readouterr().out
    resumed = cls.load(checkpoint, device="cpu")
    assert resumed.num_timesteps >= done + 64 and resumed.n_updates > model.n_updates
    assert list(logdir.iterdir()) == [run_dir]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--agent", "ppo", "--agent-config", '{"group_size": 2}'],
            "--agent-config applies to --agent grpo and rloo only",
        ),
        (
            ["--agent", "sb3-ppo", "--agent-config", '{"beta": 1}'],
            "--agent-config applies to --agent grpo and rloo only",
        ),
        (["--agent", "grpo", "--ppo-config", '{"n_steps": 8}'], "--ppo-config applies to --agent ppo only"),
        (
            ["--agent", "rloo", "--hyperparams", '{"n_steps": 8}'],
            "--hyperparams, --extractor and --vec-env apply to sb3-*",
        ),
        (["--agent", "grpo", "--num-envs", "12"], "--num-envs 12 is not a multiple of group_size 8"),
        (["--agent", "grpo", "--agent-config", '{"group_size": 1}'], "GRPOConfig.group_size must be >= 2"),
        (
            ["--agent", "rloo", "--agent-config", '{"scale_rewards": false}'],
            "unknown RLOOConfig fields ['scale_rewards']",
        ),
        (["--agent", "grpo", "--agent-config", "[1]"], "--agent-config must be a JSON object"),
        (
            ["--agent", "grpo", "--agent-config", '{"loss_aggregation": "mean"}'],
            "GRPOConfig.loss_aggregation must be one of",
        ),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_group_agent_options_are_checked_before_any_work(argv, message, tmp_path, capsys):
    logdir = tmp_path / "runs"
    assert exit_code(script("train").parse_args, [*argv, "--logdir", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert not logdir.exists()
