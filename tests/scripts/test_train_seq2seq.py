"""scripts/train.py --policy: the encoder-decoder policy from the command line."""

from __future__ import annotations

import json
import subprocess
from types import ModuleType

import pytest
from script_runs import load_script, run_script

from agents.policy import PolicyConfig, count_parameters
from agents.ppo import PPO
from agents.seq2seq import Seq2SeqPolicy

SMALL = ["--num-envs", "8", "--no-progress", "--device", "cpu", "--eval-episodes", "8"]


def script() -> ModuleType:
    return load_script("train")


def train(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("train", *args, check=False)


def test_a_seq2seq_run_trains_saves_and_resumes_with_its_policy(tmp_path):
    proc = train("--policy", "seq2seq", "--total-timesteps", "256", "--ppo-config", '{"n_steps": 16}', "--logdir", str(tmp_path), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["policy"] == "seq2seq"
    assert config["ppo_config_resolved"]["policy"]["architecture"] == "seq2seq"
    model = PPO.load(run_dir / "checkpoint.pt", device="cpu")
    assert isinstance(model.policy, Seq2SeqPolicy) and model.num_timesteps == 256
    # About the decoder-only policy's size (the default task: 131 tokens, 17 columns, window 9).
    decoder = count_parameters(131, 17, 9, PolicyConfig())
    assert abs(sum(p.numel() for p in model.policy.parameters()) / decoder - 1) < 0.1
    refused = train("--resume", str(run_dir / "checkpoint.pt"), "--policy", "decoder", "--no-progress")
    assert refused.returncode == 2 and '--policy "decoder" (the run has "seq2seq")' in refused.stderr
    resumed = train("--resume", str(run_dir / "checkpoint.pt"), "--total-timesteps", "384", *SMALL[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert PPO.load(run_dir / "checkpoint.pt", device="cpu").num_timesteps == 384


def test_the_group_agents_take_the_option(tmp_path):
    args = script().parse_args(["--agent", "rloo", "--policy", "seq2seq", "--logdir", str(tmp_path)])
    assert args.group.policy.architecture == "seq2seq" and args.group.policy.encoder_layers == 1
    # Sizes given in the config are kept.
    exact = '{"policy": {"architecture": "seq2seq", "d_model": 32}}'
    args = script().parse_args(["--policy", "seq2seq", "--ppo-config", exact, "--logdir", str(tmp_path)])
    assert args.ppo.policy == PolicyConfig(d_model=32, architecture="seq2seq")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--agent", "sb3-ppo", "--policy", "seq2seq"],
            "--policy applies to a new --agent ppo, grpo or rloo run",
        ),
        (["--policy", "seq2seq", "--init-policy", __file__], "without --policy-model or --init-policy"),
        (
            ["--policy", "decoder", "--ppo-config", '{"policy": {"architecture": "seq2seq"}}'],
            "--policy decoder contradicts --ppo-config, whose policy has architecture 'seq2seq'",
        ),
        (["--policy", "rnn"], "argument --policy: invalid choice: 'rnn'"),
        (
            ["--ppo-config", '{"policy": {"architecture": "seq2seq", "encoder_layers": 0}}'],
            "encoder_layers must be None or a positive integer",
        ),
    ],
)
def test_bad_policy_options_are_refused_before_any_work(argv, message, tmp_path, capsys):
    logdir = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        script().parse_args([*argv, "--logdir", str(logdir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not logdir.exists()
