"""The language-model scripts (pretrain, train_reward, train --init-policy / --policy-model, pipeline,
benchmark hf) end to end.

The main runs are subprocesses, as a user runs them, with tiny budgets; argument errors and
variants are checked in-process through each script's ``parse_args`` / ``main`` (same code, no
interpreter start-up).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from script_runs import exit_code, run, script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.lm import load_lm
from agents.ppo import PPO
from agents.reward_model import LearnedReward
from textgym.tasks import get_task, make_env_config

TINY_POLICY = '{"d_model": 16, "n_layers": 1, "n_heads": 2}'


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One pretraining run of scripts/pretrain.py, shared by the tests that need an lm.pt."""
    logdir = tmp_path_factory.mktemp("pretrain")
    proc = run(
        "scripts/pretrain.py", "--steps", "20", "--no-progress", "--logdir", str(logdir), "--device", "cpu",
        "--policy", TINY_POLICY, "--batch-size", "32", "--max-len", "32", "--learning-rate", "1e-2",
    )  # fmt: skip
    (run_dir,) = logdir.iterdir()
    return run_dir, proc


# --------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("name", ["pretrain", "train_reward", "pipeline", "train"])
def test_help_exits_0(name, capsys):
    assert exit_code(script(name).parse_args, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--device" in out


# ----------------------------------------------------------------------------------- pretrain
def test_pretrain_writes_a_checkpoint_and_a_report(pretrained):
    run_dir, proc = pretrained
    assert run_dir.name.startswith("pretrain_sentiment_s0_")
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == [
        "config.json",
        "lm.pt",
        "report.json",
    ]
    assert list(run_dir.glob("events.out.tfevents.*"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final_val_loss"] < report["initial_val_loss"]
    assert report["train_texts"] + report["val_texts"] == len(get_task("sentiment").corpus)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["steps"] == 20 and config["pretrain_config"]["max_len"] == 32
    env = make_env_config("sentiment")
    policy = load_lm(run_dir / "lm.pt", env.tokenizer, env.seq_len)
    assert policy.cfg.d_model == 16 and policy.max_len == env.seq_len
    assert "held-out loss" in proc.stdout and str(run_dir / "lm.pt") in proc.stdout


def test_pretrain_refuses_a_max_len_shorter_than_the_observations(tmp_path, capsys):
    assert exit_code(script("pretrain").parse_args, ["--max-len", "10", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--max-len 10" in err and "17 tokens" in err
    assert not list(tmp_path.iterdir())


def test_pretrain_refuses_a_missing_text_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert exit_code(script("pretrain").parse_args, ["--text", str(missing)]) == 2
    assert "--text: no file at" in capsys.readouterr().err


def test_pretrain_reads_text_files(tmp_path, capsys):
    texts = tmp_path / "reviews.txt"
    texts.write_text("\n".join(get_task("sentiment").corpus[:50]) + "\n\n", encoding="utf-8")
    logdir = tmp_path / "runs"
    argv = ["--text", str(texts), "--steps", "5", "--no-progress", "--logdir", str(logdir), "--device", "cpu",
            "--policy", TINY_POLICY, "--batch-size", "8", "--max-len", "32"]  # fmt: skip
    assert script("pretrain").main(argv) == 0
    assert "pretraining on 51 texts" in capsys.readouterr().out  # the empty line is dropped later
    (run_dir,) = logdir.iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["train_texts"] + report["val_texts"] == 50
    assert json.loads((run_dir / "config.json").read_text())["text"] == [str(texts)]
    assert (run_dir / "lm.pt").is_file()


# ---------------------------------------------------------------------- train --init-policy
def test_train_from_a_pretrained_policy_with_the_kl_penalty(pretrained, tmp_path):
    lm = pretrained[0] / "lm.pt"
    run(
        "scripts/train.py", "--init-policy", str(lm), "--ppo-config",
        '{"kl_coef": 0.1, "kl_target": 1.0, "n_steps": 8}', "--total-timesteps", "64", "--num-envs", "4",
        "--eval-episodes", "4", "--no-progress", "--device", "cpu", "--logdir", str(tmp_path),
    )  # fmt: skip
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["init_policy"] == str(lm)
    resolved = config["ppo_config_resolved"]
    assert resolved["kl_coef"] == 0.1 and resolved["kl_target"] == 1.0
    assert resolved["policy"]["d_model"] == 16 and resolved["policy"]["n_layers"] == 1  # the LM's
    model = PPO.load(run_dir / "checkpoint.pt", device="cpu")
    assert model.num_timesteps == 64 and model.init_policy == str(lm)
    reference = load_lm(lm, model.tokenizer, model.seq_len)
    for (name, a), (_, b) in zip(
        model.reference.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    acc = EventAccumulator(str(run_dir / "ppo_1"))
    acc.Reload()
    assert {"train/kl_ref", "train/kl_ref_sampled", "train/kl_coef"} <= set(acc.Tags()["scalars"])


def test_train_refuses_a_missing_init_policy(tmp_path, capsys):
    argv = ["--init-policy", str(tmp_path / "nope.pt"), "--total-timesteps", "32", "--num-envs", "4",
            "--eval-episodes", "4", "--no-progress", "--device", "cpu", "--logdir", str(tmp_path / "runs")]  # fmt: skip
    assert exit_code(script("train").main, argv) == 2  # refused while parsing, before any run directory
    assert "--init-policy: no checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_train_refuses_an_init_policy_of_another_vocabulary(pretrained, tmp_path):
    argv = ["--task", "keyword", "--init-policy", str(pretrained[0] / "lm.pt"), "--total-timesteps", "32",
            "--num-envs", "4", "--eval-episodes", "4", "--no-progress", "--device", "cpu",
            "--logdir", str(tmp_path)]  # fmt: skip
    code = exit_code(script("train").main, argv)
    assert isinstance(code, str) and "vocabulary differs" in code


def test_train_refuses_init_policy_for_sb3_agents(tmp_path, capsys):
    argv = ["--agent", "sb3-ppo", "--init-policy", str(tmp_path / "lm.pt"), "--logdir", str(tmp_path)]
    assert exit_code(script("train").parse_args, argv) == 2
    assert "--init-policy" in capsys.readouterr().err


def test_train_refuses_kl_target_without_kl_coef(tmp_path, capsys):
    argv = ["--ppo-config", '{"kl_target": 1.0}', "--logdir", str(tmp_path)]
    assert exit_code(script("train").parse_args, argv) == 2
    err = capsys.readouterr().err
    assert "--ppo-config" in err and "kl_target needs kl_coef > 0" in err


# ------------------------------------------------------------------------------- train_reward
def test_train_reward_writes_a_reward_model(tmp_path):
    proc = run(
        "scripts/train_reward.py", "--examples", "200", "--steps", "20", "--no-progress", "--device", "cpu",
        "--policy", TINY_POLICY, "--logdir", str(tmp_path),
    )  # fmt: skip
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("reward_sentiment_s0_")
    assert (run_dir / "reward.pt").is_file() and not list(run_dir.glob("*.tmp"))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["kind"] == "pairs" and 0 <= report["final_val_accuracy"] <= 1
    assert "held-out accuracy (pairs)" in proc.stdout
    model = LearnedReward(run_dir / "reward.pt")
    assert model(["review of the movie : the acting was"], ["great ."]).shape == (1,)


def test_train_reward_reads_a_jsonl_of_pairs(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "the food was", "chosen": f"good {w}", "rejected": f"bad {w}"}
        for w in ("fine", "ok", "so")
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n\n", encoding="utf-8")
    argv = ["--data", str(data), "--steps", "5", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--policy", TINY_POLICY, "--logdir", str(tmp_path / "runs")]  # fmt: skip
    assert script("train_reward").main(argv) == 0
    assert f"training a reward model on 12 examples ({data})" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["kind"] == "pairs" and report["train_examples"] + report["val_examples"] == 12
    assert LearnedReward(run_dir / "reward.pt").meta["source"] == str(data)


def test_train_reward_names_the_malformed_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": oops}\n', encoding="utf-8")
    argv = ["--data", str(data), "--logdir", str(tmp_path / "runs")]
    assert script("train_reward").main(argv) == 2
    assert f"{data}:3: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "completion": "b"}\n')
    assert script("train_reward").main(["--data", str(mixed), "--logdir", str(tmp_path / "runs")]) == 2
    assert "example 1 is not like example 0" in capsys.readouterr().err


def test_train_reward_refuses_bad_arguments(tmp_path, capsys):
    assert exit_code(script("train_reward").parse_args, ["--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "--data: no file at" in capsys.readouterr().err
    assert exit_code(script("train_reward").parse_args, ["--examples", "3"]) == 2
    assert "--examples must be >= 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- pipeline
def test_pipeline_end_to_end(tmp_path):
    out = tmp_path / "pipe"
    proc = run(
        "scripts/pipeline.py", "--pretrain-steps", "10", "--total-timesteps", "256", "--num-envs", "4",
        "--eval-episodes", "8", "--no-progress", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    table = (out / "results.md").read_text()
    for row in ("pretrained", "ppo_kl", "ppo_no_kl"):
        assert f"| {row} |" in table
    assert "train/kl_coef" in table and table in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["evaluation"]) == {"pretrained", "ppo_kl", "ppo_no_kl"}
    assert results["evaluation"]["pretrained"]["kl_mean"] == 0.0  # the reference against itself
    assert all(r["episodes"] == 8 for r in results["evaluation"].values())
    assert results["kl_coef_final"] > 0
    assert (out / "lm.pt").is_file() and (out / "pretrain").is_dir()
    kl_model = PPO.load(out / "ppo_kl" / "checkpoint.pt", device="cpu")
    no_kl = PPO.load(out / "ppo_no_kl" / "checkpoint.pt", device="cpu")
    assert kl_model.config.kl_coef == 0.1 and kl_model.config.kl_target == 2.0
    assert kl_model.reference is not None and no_kl.reference is None
    assert kl_model.num_timesteps == no_kl.num_timesteps == 256


def test_pipeline_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert exit_code(script("pipeline").parse_args, ["--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert exit_code(script("pipeline").parse_args, ["--num-envs", "0"]) == 2
    assert exit_code(script("pipeline").parse_args, ["--kl-coef", "0"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script("pipeline").parse_args(["--out", str(empty)]).out == empty


# ------------------------------------------------------------- Hugging Face models (the hf extra)
requires_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs textgym[hf]")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 of width 32 with a BPE tokenizer trained on the sentiment corpus."""
    from agents.hf import tiny_causal_lm
    from textgym.hf import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("gpt2")
    task = get_task("sentiment")
    tokenizer = train_bpe_tokenizer([*task.corpus, *task.prompts], 400)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    tiny_causal_lm(tokenizer, d_model=32, n_layers=2, n_heads=2, max_positions=64).save_pretrained(path)
    return path


@requires_hf
def test_train_with_a_policy_model(gpt2_dir, tmp_path):
    common = ["--eval-episodes", "4", "--no-progress", "--device", "cpu"]
    run(
        "scripts/train.py", "--task", "sentiment", "--policy-model", str(gpt2_dir), "--total-timesteps", "64",
        "--num-envs", "4", "--ppo-config", '{"n_steps": 8, "kl_coef": 0.05}', "--logdir", str(tmp_path), *common,
    )  # fmt: skip
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["policy_model"] == str(gpt2_dir)
    assert config["env_kwargs"]["tokenizer"] == str(gpt2_dir)  # the model's tokenizer became the env's
    model = PPO.load(run_dir / "checkpoint.pt", device="cpu")
    from agents.hf import HFPolicy
    from textgym.hf import HFTokenizer

    assert isinstance(model.policy, HFPolicy) and isinstance(model.reference, HFPolicy)
    assert isinstance(model.tokenizer, HFTokenizer) and model.num_timesteps == 64
    # The fine-tuned weights, not the directory's, are what the checkpoint restores.
    fresh = HFPolicy.from_pretrained(gpt2_dir, model.tokenizer, model.seq_len)
    changed = [
        name
        for (name, a), (_, b) in zip(
            model.policy.state_dict().items(), fresh.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed
    # The reference stays the directory's model.
    for (name, a), (_, b) in zip(
        model.reference.model.state_dict().items(), fresh.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@requires_hf
def test_train_threads_default_to_torch_s_with_a_policy_model(gpt2_dir, tmp_path):
    """A Hugging Face policy gains from more threads: --threads defaults to 0 (torch's default)."""
    argv = ["--task", "sentiment", "--policy-model", str(gpt2_dir), "--logdir", str(tmp_path)]
    assert script("train").parse_args(argv).threads == 0
    assert script("train").parse_args([*argv, "--threads", "2"]).threads == 2


@requires_hf
def test_train_refuses_a_missing_policy_model(tmp_path, capsys):
    argv = ["--policy-model", str(tmp_path / "nope"), "--logdir", str(tmp_path / "runs")]
    assert exit_code(script("train").parse_args, argv) == 2
    assert "--policy-model: no directory" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra", [["--agent", "sb3-ppo"], ["--init-policy", "lm.pt"]], ids=["sb3-agent", "with-init-policy"]
)
@requires_hf
def test_train_refuses_policy_model_with(extra, gpt2_dir, tmp_path, capsys):
    argv = ["--policy-model", str(gpt2_dir), *extra, "--logdir", str(tmp_path)]
    assert exit_code(script("train").parse_args, argv) == 2
    assert "--policy-model applies to a new --agent ppo, grpo or rloo run" in capsys.readouterr().err


@requires_hf
def test_pipeline_with_the_hf_backbone(tmp_path):
    out = tmp_path / "pipe"
    proc = run(
        "scripts/pipeline.py", "--backbone", "hf", "--hf-vocab-size", "300", "--pretrain-steps", "5",
        "--total-timesteps", "128", "--num-envs", "4", "--eval-episodes", "4", "--no-progress",
        "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert "hf backbone" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["evaluation"]) == {"pretrained", "ppo_kl", "ppo_no_kl"}
    assert results["evaluation"]["pretrained"]["kl_mean"] == 0.0
    # lm/ is a transformers directory that PPO fine-tunes and HFTokenizer reads.
    assert {"config.json", "model.safetensors", "tokenizer.json", "value_head.pt"} <= {
        p.name for p in (out / "lm").iterdir()
    }
    from agents.hf import HFPolicy
    from textgym.hf import HFTokenizer

    model = PPO.load(out / "ppo_kl" / "checkpoint.pt", device="cpu")
    assert model.policy_model == str(out / "lm") and isinstance(model.policy, HFPolicy)
    assert model.tokenizer == HFTokenizer(out / "lm")


@pytest.mark.parametrize("size", ["0", "257"])
def test_pipeline_refuses_a_tiny_hf_vocabulary(size, capsys):
    assert exit_code(script("pipeline").parse_args, ["--backbone", "hf", "--hf-vocab-size", size]) == 2
    assert "--hf-vocab-size must be above 257" in capsys.readouterr().err


@requires_hf
def test_benchmark_hf(tmp_path):
    out = tmp_path / "hf.json"
    proc = run(
        "scripts/benchmark.py", "hf", "--total-timesteps", "256", "--num-envs", "4", "--max-new-tokens", "4",
        "--out", str(out),
    )  # fmt: skip
    (row,) = json.loads(out.read_text())["runs"]
    assert row["max_new_tokens"] == 4
    for key in ("builtin", "hf_kv_cache", "hf_recompute"):
        assert row[key] > 0
    assert row["kv_cache_vs_recompute"] == pytest.approx(row["hf_kv_cache"] / row["hf_recompute"])
    assert "cache gain" in proc.stdout
