"""scripts/arithmetic.py --model and agents.pretrained_recipe: the recipe on a pretrained causal LM.

On a tiny random Llama built offline (``agents.rlhf.quick_model``), tiny budgets: ``--quick`` end to
end as a subprocess, the warm-up's effect, the evaluation draw, and the argument checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from script_runs import run_script, script

from agents.hf import HFPolicy
from agents.lm import encode_texts, lm_loss
from agents.pretrained_recipe import (
    PRETRAINED,
    WARMUP,
    PretrainedRecipeConfig,
    eval_draw,
    model_folder,
    results_markdown,
    warm_up,
)
from agents.rlhf import quick_model
from textgym.hf import HFTokenizer
from textgym.tasks import get_task, make_env_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return quick_model(tmp_path_factory.mktemp("tiny"))


def test_quick_run_on_a_model_folder_writes_every_stage(tiny, tmp_path):
    out = tmp_path / "run"
    proc = run_script("arithmetic", "--model", str(tiny), "--quick", "--seeds", "2", "--agents", "grpo", "ppo",
               "--out", str(out), "--no-progress")  # fmt: skip
    results = json.loads((out / "seed2" / "results.json").read_text())
    assert results["seed"] == 2 and results["config"]["model"] == str(tiny)
    assert list(results["stages"]) == [PRETRAINED, WARMUP, "grpo", "ppo"]
    for name, stage in results["stages"].items():
        assert 0 <= stage["test_greedy"] <= 1 and 0 <= stage["train_greedy"] <= 1, name
    assert results["stages"]["grpo"]["env_steps"] >= results["config"]["total_timesteps"]
    # The warm-up is a model folder the agents start from.
    assert (out / "seed2" / WARMUP / "config.json").is_file()
    assert "| warm-up | 2 supervised steps × 4 |" in (out / "seed2" / "results.md").read_text()
    assert "| pretrained | – |" in proc.stdout


def test_warm_up_lowers_the_loss_on_the_training_equations(tiny):
    tokenizer = HFTokenizer(tiny)
    env = make_env_config("arithmetic2", split="train", tokenizer=tokenizer)
    torch.manual_seed(0)
    policy = HFPolicy.from_pretrained(tiny, tokenizer, env.seq_len)
    ids, mask, _ = encode_texts(get_task("arithmetic2").corpus[:256], tokenizer, env.seq_len)

    def loss() -> float:
        with torch.no_grad():
            return float(lm_loss(policy, ids, mask))

    before = loss()
    config = PretrainedRecipeConfig(model=str(tiny), warmup_steps=30, warmup_learning_rate=3e-3)
    last = warm_up(policy, config, seed=0)
    assert not policy.training  # left ready to evaluate
    assert math.isfinite(last) and loss() < 0.8 * before


def test_every_stage_is_evaluated_on_one_fixed_draw_per_split():
    config = PretrainedRecipeConfig(eval_prompts=50)
    test, train = eval_draw(config, "test"), eval_draw(config, "train")
    assert len(test) == len(set(test)) == 50 and len(train) == 50
    assert test == eval_draw(config, "test")  # the same prompts for every stage
    assert not set(test) & set(make_env_config("arithmetic2", split="train").prompts)
    everything = eval_draw(PretrainedRecipeConfig(eval_prompts=None), "test")
    assert everything == list(make_env_config("arithmetic2", split="test").prompts)


def test_results_table_by_hand():
    results = {
        "config": {**PretrainedRecipeConfig().to_dict(), "eval_prompts": None},
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "stages": {
            PRETRAINED: {"test_greedy": 0.0, "train_greedy": 0.01, "seconds": 3.0},
            WARMUP: {"test_greedy": 0.45, "train_greedy": 0.5, "seconds": 40.0},
            "grpo": {"test_greedy": 0.6, "train_greedy": 0.625, "seconds": 300.4, "env_steps": 8192},
        },
    }
    text = results_markdown(results)
    assert "greedy exact match on every held-out and training prompts" in text
    assert "| warm-up | 20 supervised steps × 16 | 0.450 | 0.500 | 40 |" in text
    assert "| grpo | 8,192 env steps | 0.600 | 0.625 | 300 |" in text


def test_config_and_model_folder_are_checked(tmp_path):
    with pytest.raises(ValueError, match="agents must be some of"):
        PretrainedRecipeConfig(agents=("a2c",))
    with pytest.raises(
        ValueError, match=r"group_num_envs \(12\) must be a multiple of grpo.group_size \(8\)"
    ):
        PretrainedRecipeConfig(group_num_envs=12)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        PretrainedRecipeConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="eval_prompts must be >= 1 or None"):
        PretrainedRecipeConfig(eval_prompts=0)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        model_folder(str(tmp_path))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "2"], "--processes: the small Transformer's recipe only; not with --model"),
        (["--warmup-target", "0.2"], "--warmup-target: the small Transformer's recipe only"),
        (["--eval-prompts", "0"], "--eval-prompts must be a positive integer or 'all', got '0'"),
        (["--eval-prompts", "some"], "--eval-prompts must be a positive integer or 'all'"),
        (["--warmup-steps", "-2"], "--warmup-steps must be >= 0, got -2"),
        (["--device", "tpu"], "--device: unknown device"),
    ],
)
def test_bad_arguments_with_a_model_are_refused(tiny, argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        script("arithmetic").parse_args(["--model", str(tiny), *argv, "--out", str(out)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_model_that_is_not_there_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        script("arithmetic").parse_args(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--model: no model folder (config.json) at" in err and "nothing" in err
