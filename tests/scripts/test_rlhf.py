"""scripts/rlhf.py: the RLHF demonstration on a pretrained LM. Fast tests only: --help,
refusals before any work, and --quick (a tiny GPT-2 built offline); one small test of the real
model, skipped when it is not on disk."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

from script_runs import exit_code, script


def rlhf_exit_code(argv: list[str]) -> int | str | None:
    return exit_code(script("rlhf").main, argv)


def test_help_names_the_runs_and_the_model_step(capsys):
    assert rlhf_exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(run in out for run in ("full_kl", "full_no_kl", "lora_kl", "lora_no_kl"))
    assert "python scripts/get_model.py smollm2-135m" in out and "--quick" in out and "--threads" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--runs", "full_kl,bogus"], "--runs: a comma-separated list of distinct runs"),
        (["--quick", "--runs", "full_kl,full_kl"], "--runs: a comma-separated list of distinct runs"),
        (["--quick", "--ppo-config", '{"no_such_field": 1}'], "--ppo-config:"),
        (["--quick", "--ppo-config", '{"learning_rate": -1}'], "learning_rate"),
        (["--quick", "--ppo-config", "[1, 2]"], "--ppo-config must be a JSON object"),
        (["--quick", "--device", "tpu"], "--device"),
        (["--quick", "--total-timesteps", "0"], "--total-timesteps"),
        (["--model", "/no/such/folder"], "neither a folder written by save_pretrained"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert rlhf_exit_code([*argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_model_names_the_command_that_fetches_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEXTGYM_CACHE", str(tmp_path / "empty_cache"))
    assert rlhf_exit_code(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "python scripts/get_model.py smollm2-135m" in err and "not on disk" in err
    assert not (tmp_path / "out").exists()


def test_quick_trains_evaluates_and_writes_the_results(tmp_path, capsys):
    """The pretrained model, then full fine-tuning with KL (in this process under --quick), on the
    same held-out episodes; the results are written only at the end."""
    out = tmp_path / "out"
    assert script("rlhf").main(["--quick", "--runs", "full_kl", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    base, run = results["pretrained"], results["runs"]["full_kl"]
    assert list(results["runs"]) == ["full_kl"] and results["isolated"] is False
    assert base["kl_mean"] == 0.0 and base["episodes"] == 8 and base["peak_rss_mib"] > 50
    test_openings = set(importlib.import_module("textgym").get_task("reviews").split_prompts("test"))
    prompts = [p for p, _, _ in base["samples"]]
    assert prompts and set(prompts) <= test_openings  # held-out openings only
    assert run["episodes"] == 8 and -1 <= run["reward_mean"] <= 1 and run["kl_mean"] >= 0
    assert [p for p, _, _ in run["samples"]] == prompts  # the same episodes as the pretrained model
    assert run["peak_rss_mib"] > 50 and run["train_seconds"] > 0 and run["updates"] == 1
    assert len(run["curve"]) == 1 and "train/approx_kl" in run["curve"][0]
    assert run["config"]["kl_target"] == 3.0 and run["lora_rank"] is None
    table = (out / "results.md").read_text()
    assert "| full_kl |" in table and "| pretrained |" in table and "→ **" in table
    assert table in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))


def test_a_lora_run_without_kl_is_measured_against_the_base_model(tmp_path):
    """In this process (the command runs each in a fresh one): LoRA without the penalty trains the
    adapters only, and its KL is measured against the model with its adapters off."""
    pytest.importorskip("peft")
    from agents.rlhf import RLHFSettings, quick_model, train_and_evaluate

    quick = {"total_timesteps": 64, "num_envs": 4, "max_new_tokens": 8, "eval_episodes": 8, "eval_envs": 4}
    settings = RLHFSettings(str(quick_model(tmp_path)), progress=False, lora_rank=4, **quick)
    result = train_and_evaluate(settings, "lora_no_kl")
    assert result["lora_rank"] == 4 and result["config"]["kl_coef"] == 0.0
    assert result["config"]["learning_rate"] == 1e-3 and result["final_kl_coef"] == 0.0
    assert result["episodes"] == 8 and result["kl_mean"] >= 0 and result["updates"] == 1


def test_jobs_run_in_a_fresh_process_and_their_errors_come_back():
    from agents.runtime import in_fresh_process

    # dict: a job the child can import without this module (which imports transformers)
    assert in_fresh_process(dict, [("episodes", 4)]) == {"episodes": 4}
    with pytest.raises(RuntimeError, match=r"dict failed in its process:(?s:.)*TypeError"):
        in_fresh_process(dict, 3)


@pytest.mark.skipif(
    not (importlib.import_module("textgym.models").model_path("smollm2-135m") / "config.json").is_file(),
    reason="needs the converted model: python scripts/get_model.py smollm2-135m",
)
def test_the_real_model_writes_sentences_about_the_held_out_openings():
    """SmolLM2 on 4 held-out episodes: the pretrained measurement, KL 0 to itself."""
    from agents.rlhf import RLHFSettings, evaluate_pretrained
    from textgym.models import model_path

    settings = RLHFSettings(str(model_path("smollm2-135m")), max_new_tokens=6, eval_episodes=4, eval_envs=4)
    stats = evaluate_pretrained(settings)
    assert stats["episodes"] == 4 and stats["kl_mean"] == 0.0 and -1 <= stats["reward_mean"] <= 1
    assert all(completion.strip() for _, completion, _ in stats["samples"])


def test_cached_evaluation_matches_the_full_recompute(tmp_path):
    """agents.lm.sample_with_kl through the KV caches (cache=True, as the RLHF evaluation runs it)
    gives the full recompute's episodes, rewards and KL, against a perturbed reference."""
    import copy

    import torch

    from agents.hf import HFPolicy
    from agents.lm import sample_with_kl
    from agents.rlhf import RLHFSettings, quick_model
    from textgym.hf import HFTokenizer
    from textgym.tasks import make_env_config

    path = str(quick_model(tmp_path))
    env_kwargs = RLHFSettings(path, max_new_tokens=8).env_kwargs("test")
    tokenizer = HFTokenizer(path)
    max_len = make_env_config(**{**env_kwargs, "tokenizer": tokenizer}).seq_len
    torch.manual_seed(0)
    policy = HFPolicy.from_pretrained(path, tokenizer, max_len)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full = sample_with_kl(policy, reference, env_kwargs, episodes=12, num_envs=4, seed=3)
    cached = sample_with_kl(policy, reference, env_kwargs, episodes=12, num_envs=4, seed=3, cache=True)
    assert cached["episodes"] == full["episodes"] == 12
    assert cached["samples"] == full["samples"]
    assert cached["reward_mean"] == pytest.approx(full["reward_mean"])
    assert cached["kl_mean"] == pytest.approx(full["kl_mean"], rel=1e-4) and cached["kl_mean"] > 0.01
    itself = sample_with_kl(policy, policy, env_kwargs, episodes=4, num_envs=4, seed=3, cache=True)
    assert itself["kl_mean"] == 0.0 and itself["samples"] == full["samples"][:4]
