"""What every script shares: --help shows every default, bad input is refused before any work with
a message naming the option (never a traceback), and --threads (agents.runtime).

In-process through each script's ``build_parser`` / ``parse_args`` / ``main`` (same code as the
command line, no interpreter start-up).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from script_runs import ROOT, exit_code, script

from agents.runtime import (
    SEED_MAX,
    HelpFormatter,
    default_threads,
    explicit_options,
    output_dir_error,
    set_threads,
)

SCRIPTS = ["train", "compare", "pipeline", "pretrain", "train_reward", "benchmark"]


# --------------------------------------------------------------------------------------- help
def parsers(module: ModuleType) -> list[tuple[list[str], argparse.ArgumentParser]]:
    """The script's parser and, for a script with subcommands, each subcommand's: (argv prefix, parser)."""
    parser = module.build_parser()
    found = [([], parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [([name], sub) for name, sub in action.choices.items()]
    return found


def option_help(help_text: str, option: str) -> str:
    """The help of ``option`` in ``help_text``, on one line."""
    match = re.search(rf"^  (?:-\w, )?{re.escape(option)}\b.*?(?=^  -|\Z)", help_text, re.M | re.S)
    assert match is not None, f"{option} not in the help:\n{help_text}"
    return " ".join(match[0].split())


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_every_default(name, capsys):
    """--help of every script (and subcommand) gives every option a help text that states its
    default: the value itself where there is one, in words where it is None (resolved later)."""
    module = script(name)
    for prefix, parser in parsers(module):
        entry = module.main if prefix or not hasattr(module, "parse_args") else module.parse_args
        assert exit_code(entry, [*prefix, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:")
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = option_help(out, action.option_strings[-1])
            option = f"{name} {' '.join(prefix)} {action.option_strings[-1]}"
            assert len(text) > len(action.option_strings[-1]) + 10, f"{option} has no help text"
            if isinstance(action, argparse._StoreTrueAction):
                continue  # a flag: off unless given
            assert "default" in text, f"{option}: no default in {text!r}"
            if action.default is not None:
                assert str(action.default) in text, f"{option}: default {action.default!r} not in {text!r}"


def test_help_formatter_adds_the_default_once():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--a", type=int, default=3, help="a number")
    parser.add_argument("--b", default=None, help="b (default: computed)")
    parser.add_argument("--c", default="x", help="c (default: x, the usual)")
    parser.add_argument("--flag", action="store_true", help="a flag")
    out = " ".join(parser.format_help().split())
    assert "a number (default: 3)" in out
    assert "b (default: computed)" in out and "None" not in out
    assert out.count("(default: x") == 1
    assert "a flag (default" not in out


def test_time_claims_of_compare_quick_agree():
    """compare.py states one time for --quick, in its docstring and in its --help."""
    compare = script("compare")
    quick = next(a for a in compare.build_parser()._actions if "--quick" in a.option_strings)
    (claim,) = re.findall(r"about [\d.]+ (?:s|min\w*)", quick.help)
    assert claim in compare.__doc__


# ------------------------------------------------------------------------------ train: refusals
def _empty_model_dir(tmp_path: Path) -> str:
    (tmp_path / "model").mkdir()
    return str(tmp_path / "model")


def _model_without_tokenizer(tmp_path: Path) -> str:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(tmp_path / "model")


BAD_TRAIN_ARGS = [
    (["--seed", "-1"], f"--seed: must be an integer from 0 to {SEED_MAX}"),
    (["--seed", str(2**64)], f"--seed: must be an integer from 0 to {SEED_MAX}"),
    (["--seed", "1.5"], "--seed: not an integer"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval must be >= 0"),
    (["--total-timesteps", "0"], "--total-timesteps must be >= 1"),
    (["--env-kwargs", "{bad"], "--env-kwargs: not valid JSON: Expecting property name"),
    (["--ppo-config", "{bad"], "--ppo-config: not valid JSON"),
    (["--agent", "sb3-ppo", "--hyperparams", "{bad"], "--hyperparams: not valid JSON"),
    (
        ["--agent", "sb3-ppo", "--hyperparams", '{"n_steps": -1}'],
        "n_steps must be a positive integer, got -1",
    ),
    (["--agent", "sb3-ppo", "--hyperparams", '{"batch_size": 1}'], "batch_size must be >= 2"),
    (["--agent", "sb3-a2c", "--hyperparams", '{"gamma": 2}'], "gamma must be a number in [0, 1]"),
    (["--agent", "sb3-ppo", "--hyperparams", '{"seed": 3}'], "seed (--seed)"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--threads", "-1"], "--threads: must be >= 0"),
]
if not torch.cuda.is_available():
    BAD_TRAIN_ARGS.append(
        (["--device", "cuda"], "--device: device 'cuda' was asked for, but CUDA is not available")
    )


@pytest.mark.parametrize(("argv", "message"), BAD_TRAIN_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGS])
def test_train_refuses_bad_input_before_any_work(argv, message, tmp_path, capsys):
    """Exit 2 with a usage error naming the option and what is accepted, before any run directory
    (--device once was refused only after the random-policy evaluation, leaving a config.json)."""
    logdir = tmp_path / "runs"
    assert exit_code(script("train").main, [*argv, "--logdir", str(logdir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert not logdir.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "afile"), "is a file, not a directory"),
        (lambda tmp: str(tmp / "afile" / "runs"), "lies under the file"),
    ],
    ids=["file", "under-a-file"],
)
def test_train_refuses_a_logdir_it_cannot_create(make, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert exit_code(script("train").main, ["--logdir", make(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--logdir" in err and message in err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_empty_model_dir, "holds no Hugging Face model (no config.json)"),
        (_model_without_tokenizer, "holds no tokenizer"),
    ],
    ids=["empty", "no-tokenizer"],
)
def test_train_names_what_a_policy_model_folder_lacks(make, message, tmp_path, capsys):
    """An empty --policy-model folder is named as such, not blamed on --task/--env-kwargs."""
    argv = ["--policy-model", make(tmp_path), "--logdir", str(tmp_path / "runs")]
    assert exit_code(script("train").parse_args, argv) == 2
    err = capsys.readouterr().err
    assert f"--policy-model: {str(tmp_path / 'model')!r} {message}" in err
    assert "--task/--env-kwargs" not in err


# ------------------------------------------------------------------- the other scripts: refusals
@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("pretrain", ["--seed", "-1"], "--seed: must be an integer from 0"),
        ("pretrain", ["--device", "tpu"], "--device: unknown device"),
        ("pretrain", ["--policy", "{bad"], "--policy: not valid JSON"),
        ("pretrain", ["--env-kwargs", "{bad"], "--env-kwargs: not valid JSON"),
        ("train_reward", ["--seed", str(2**40)], "--seed: must be an integer from 0"),
        ("train_reward", ["--device", "tpu"], "--device: unknown device"),
        ("train_reward", ["--policy", "{bad"], "--policy: not valid JSON"),
        ("pipeline", ["--seed", "-3"], "--seed: must be an integer from 0"),
        ("pipeline", ["--device", "tpu"], "--device: unknown device"),
        ("pipeline", ["--kl-coef", "inf"], "--kl-coef must be a finite number > 0"),
        ("pipeline", ["--kl-target", "nan"], "--kl-target"),
        ("benchmark", ["train", "--device", "tpu"], "--device: unknown device"),
        ("benchmark", ["env", "--env-kwargs", "{bad"], "--env-kwargs: not valid JSON"),
        ("benchmark", ["busy", "--updates", "0"], "--updates must be >= 1"),
        ("benchmark", ["gpu", "--devices", "cpu", "tpu"], "--devices: unknown device"),
        ("benchmark", ["gpu", "--train-updates", "0"], "--train-updates must be >= 1"),
        (
            "benchmark",
            ["gpu", "--devices", "cpu", "--train-configs", '{"n_steps": 0}'],
            '--train-configs: {"n_steps": 0}: PPOConfig.n_steps must be',
        ),
        (
            "benchmark",
            ["gpu", "--devices", "cpu", "--train-configs", "[1]"],
            "--train-configs takes JSON objects",
        ),
        ("benchmark", ["gpu", "--devices", "cpu", "--env-sizes", "0"], "--env-sizes and --train-envs"),
    ],
)
def test_scripts_refuse_bad_input_naming_the_option(name, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    entry = script(name).main if name == "benchmark" else script(name).parse_args
    assert exit_code(entry, argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["pretrain", "train_reward"])
def test_logdir_that_is_a_file_is_refused(name, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert exit_code(script(name).parse_args, ["--logdir", str(tmp_path / "afile")]) == 2
    assert "--logdir" in capsys.readouterr().err


def test_pipeline_refuses_an_out_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert exit_code(script("pipeline").parse_args, ["--out", str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "lies under the file" in err


# ----------------------------------------------------------------------------- agents.runtime
def test_output_dir_error():
    assert output_dir_error(ROOT / "no" / "such" / "dir", "--x") is None
    assert "is a file" in output_dir_error(ROOT / "pyproject.toml", "--x")
    assert "lies under the file" in output_dir_error(ROOT / "pyproject.toml" / "sub", "--x")


def test_explicit_options_tells_given_from_default():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=int, default=1)
    parser.add_argument("--b", default="x")
    parser.add_argument("--flag", action="store_true")
    assert explicit_options(parser, ["--a", "1"]) == {"a"}  # given, even at its default value
    assert explicit_options(parser, ["--flag", "--b", "y"]) == {"b", "flag"}
    assert explicit_options(parser, []) == set()
    assert parser.parse_args([]).a == 1  # the defaults are restored


def test_set_threads_and_the_defaults():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(0) == 1  # 0 leaves torch as it is
        assert set_threads(2) == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
        set_threads(-1)
    assert default_threads(None) == 1 and default_threads("some/model") == 0


@pytest.mark.parametrize("name", ["train", "compare", "pipeline", "pretrain", "train_reward"])
def test_threads_default_to_one_for_the_built_in_policy(name, tmp_path):
    argv = {"compare": ["--out", str(tmp_path / "c"), "--agents", "ppo", "--num-envs", "4"]}.get(name, [])
    assert script(name).parse_args(argv).threads == 1
    assert script(name).parse_args([*argv, "--threads", "0"]).threads == 0


def test_train_sets_the_thread_count(tmp_path):
    torch.set_num_threads(2)
    argv = ["--total-timesteps", "32", "--num-envs", "4", "--ppo-config", '{"n_steps": 8}', "--eval-episodes", "4",
            "--no-progress", "--device", "cpu", "--logdir", str(tmp_path)]  # fmt: skip
    assert script("train").main(argv) == 0
    assert torch.get_num_threads() == 1
    config = json.loads(next(tmp_path.iterdir()).joinpath("config.json").read_text())
    assert config["threads"] == 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], 16),  # ppo: the sweep's choice
        (["--agent", "grpo"], 64),
        (["--agent", "rloo"], 64),
        (["--agent", "sb3-ppo"], 64),
        (["--agent", "ppo", "--num-envs", "32"], 32),
    ],
)
def test_train_num_envs_default_depends_on_the_agent(argv, expected, tmp_path):
    args = script("train").parse_args([*argv, "--logdir", str(tmp_path)])
    assert args.num_envs == expected


def test_agents_default_num_envs():
    """PPO's default is its own (16); the group agents keep 8 groups of 8."""
    from agents import GRPO, PPO

    assert PPO("TextGen-v0", device="cpu").num_envs == 16 == PPO.default_num_envs
    assert GRPO("TextGen-v0", device="cpu").num_envs == 64 == GRPO.default_num_envs
