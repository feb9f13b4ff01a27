"""agents.sweep: reading curves at marks and at a threshold, settings, the summary and its table,
and one tiny real run end to end."""

from __future__ import annotations

import math

import pytest

from agents.ppo import PPOConfig
from agents.sweep import (
    PLAIN_TASKS,
    RunResult,
    Setting,
    alliteration,
    get_sweep_task,
    markdown_table,
    parse_setting,
    run_grid,
    steps_to_threshold,
    summarize,
    train_run,
    value_at,
)
from textgym.tasks import TASKS

CURVE = ((2048, 0.1), (4096, 0.5), (6144, 0.8), (8192, 0.7), (10240, 0.9))


# ---------------------------------------------------------------------------------- curves
@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, None), (2047, None), (2048, 0.1), (4095, 0.1), (4096, 0.5), (7000, 0.8), (10**6, 0.9)],
)
def test_value_at_is_the_last_value_at_or_before_the_mark(step, expected):
    assert value_at(CURVE, step) == expected


def test_steps_to_threshold_is_the_first_step_at_or_above():
    assert steps_to_threshold(CURVE, 0.5) == 4096  # equal counts
    assert steps_to_threshold(CURVE, 0.75) == 6144  # the later dip below does not undo it
    assert steps_to_threshold(CURVE, 0.85) == 10240
    assert steps_to_threshold(CURVE, 0.95) is None
    assert steps_to_threshold((), 0.0) is None


# -------------------------------------------------------------------------------- settings
def test_parse_setting_reads_fields_and_keeps_the_rest_at_defaults():
    s = parse_setting(" num_envs=16, n_steps=64 ,learning_rate=3e-4,n_epochs=4")
    assert s.num_envs == 16
    assert s.overrides == {"n_steps": 64, "learning_rate": 3e-4}  # n_epochs=4 is the default
    assert s.config() == PPOConfig(n_steps=64, learning_rate=3e-4)
    assert s.rollout_size == 16 * 64
    assert s.label == "num_envs=16,n_steps=64,n_epochs=4,num_minibatches=4,learning_rate=0.0003"
    assert parse_setting(s.label) == s
    assert parse_setting("") == Setting() == parse_setting("num_envs=16,n_steps=32")  # PPO's defaults
    assert parse_setting("learning_rate=1").overrides == {"learning_rate": 1.0}
    assert isinstance(parse_setting("learning_rate=1").config().learning_rate, float)
    assert parse_setting("target_kl=0.02,anneal_lr=false").label.endswith(",target_kl=0.02,anneal_lr=False")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_step=32", "unknown PPOConfig field 'n_step'"),
        ("policy=1", "unknown PPOConfig field 'policy'"),
        ("n_steps", "is not field=value"),
        ("n_steps=", "is not field=value"),
        ("n_steps=abc", "not a number"),
        ("n_steps=0", "PPOConfig.n_steps must be a positive integer"),
        ("n_steps=1.5", "PPOConfig.n_steps must be a positive integer"),
        ("learning_rate=-1", "PPOConfig.learning_rate must be a positive number"),
        ("num_envs=0", "num_envs must be a positive integer"),
        ("anneal_lr=1", "must be true or false"),
        ("n_steps=8,n_steps=16", "given twice"),
    ],
)
def test_parse_setting_refuses_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(text)


def test_tasks():
    assert get_sweep_task("default").name == "sentiment"
    assert get_sweep_task("keyword").reward_threshold == 0.6
    assert get_sweep_task("alliteration").env_kwargs["reward"] is alliteration
    assert set(TASKS) | set(PLAIN_TASKS) >= {"sentiment", "translate", "alliteration"}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_sweep_task("nope")


def test_alliteration():
    assert alliteration("p", "") == 0
    assert alliteration("p", " good good good") == 1 / 8
    assert alliteration("p", "a b c d e f g h") == 1 / 8  # distinct, but one word starts with a
    assert alliteration("p", "soup staff bread soup service") == 3 / 8  # soup once; bread is not an s
    assert alliteration("p", "soup staff short small simple slow sad salad") == 1.0


# ----------------------------------------------------------------------- summary and table
def _result(task, setting, seed, curve, marks=(4096, 10240), threshold=0.75, seconds=2.0):
    return RunResult(
        task=task,
        setting=setting,
        seed=seed,
        total_timesteps=10240,
        curve=tuple(curve),
        at_marks={m: value_at(curve, m) for m in marks},
        reward_threshold=threshold,
        steps_to_threshold=steps_to_threshold(curve, threshold),
        wall_seconds=seconds,
        env_steps=curve[-1][0] if curve else 0,
    )


def test_summarize_and_markdown_table():
    small, large = parse_setting("num_envs=16"), parse_setting("num_envs=64")
    runs = [
        _result("keyword", large, 0, CURVE, seconds=2.0),
        _result("keyword", large, 1, [(2048, 0.3), (4096, 0.3), (10240, 0.5)], seconds=4.0),
        _result("keyword", small, 0, [(512, 0.8), (10240, 1.0)]),
    ]
    rows = summarize(runs)
    assert [(r["task"], r["num_envs"], r["seeds"]) for r in rows] == [
        ("keyword", 64, [0, 1]),
        ("keyword", 16, [0]),
    ]
    mean, std = rows[0]["reward_at_4096"]
    assert mean == pytest.approx(0.4) and std == pytest.approx(math.sqrt(0.02))  # 0.5, 0.3; ddof=1
    assert rows[0]["reward_at_10240"][0] == pytest.approx(0.7)
    assert rows[0]["steps_to_threshold_mean"] == 6144 and rows[0]["seeds_reaching"] == 1
    assert rows[0]["wall_seconds_mean"] == 3.0
    assert rows[1]["reward_at_4096"] == (0.8, 0.0) and rows[1]["steps_to_threshold_mean"] == 512

    table = markdown_table(rows).splitlines()
    assert table[0] == (
        "| task | num_envs | n_steps | n_epochs | num_minibatches | learning_rate | seeds "
        "| reward @ 4.1k | reward @ 10.2k | steps to threshold | s/run |"
    )
    assert (
        table[2]
        == "| keyword (≥0.75) | 64 | 32 | 4 | 4 | 0.001 | 2 | 0.400 ± 0.141 | 0.700 ± 0.283 | 6.1k (1/2) | 3 |"
    )
    assert table[3] == "| keyword (≥0.75) | 16 | 32 | 4 | 4 | 0.001 | 1 | 0.800 | 1.000 | 0.5k (1/1) | 2 |"
    never = summarize([_result("keyword", Setting(), 0, [(8192, 0.1)])])
    assert "| – | 0.100 | never (0/1) |" in markdown_table(never)
    assert markdown_table([]) == ""


def test_markdown_table_shows_fields_outside_the_sweep_space():
    rows = summarize([_result("keyword", parse_setting("target_kl=0.02"), 0, CURVE)])
    header, _, row = markdown_table(rows).splitlines()
    assert header.split(" | ")[6] == "target_kl" and row.split(" | ")[6] == "0.02"


# ------------------------------------------------------------------------------ a real run
def test_tiny_run_end_to_end():
    setting = parse_setting("num_envs=2,n_steps=16,num_minibatches=2,n_epochs=1")
    seen = []
    results = run_grid(
        ["keyword", "alliteration"],
        [setting],
        seeds=[0],
        total_timesteps=250,  # rounded up to whole rollouts of 32 env steps: 256
        marks=(100, 250),
        on_result=lambda r, i, n: seen.append((r.task, i, n)),
    )
    assert seen == [("keyword", 1, 2), ("alliteration", 2, 2)]
    keyword = results[0]
    assert keyword.env_steps == 256
    steps = [s for s, _ in keyword.curve]
    assert steps == list(range(256 - 32 * (len(steps) - 1), 257, 32)) and len(steps) >= 6
    assert keyword.at_marks == {100: value_at(keyword.curve, 100), 250: keyword.curve[-2][1]}
    assert keyword.at_marks[100] == dict(keyword.curve)[96]
    assert keyword.steps_to_threshold == steps_to_threshold(keyword.curve, 0.6)
    assert all(0 <= r <= 1 for _, r in keyword.curve) and keyword.wall_seconds > 0
    # the same seed gives the same curve
    again = train_run("keyword", setting, 0, total_timesteps=250, marks=(100, 250))
    assert again.curve == keyword.curve
    data = results[1].to_dict()
    assert data["setting"]["num_envs"] == 2 and data["at_marks"].keys() == {"100", "250"}
