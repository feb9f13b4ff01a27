"""benchmark.py trl: the project's GRPO against TRL's GRPOTrainer. The project's side runs in the
default suite on a tiny GPT-2 built offline; the side by side run needs TRL (optional) and is
skipped without it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

from agents.benchmark import _benchmark_model
from agents.benchmark_trl import _textgym_worker, format_trl_table, run_side

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "prompts_per_step": 2,
    "group_size": 2,
    "new_tokens": 3,
    "beta": 0.04,
    "learning_rate": 1e-5,
    "steps": 2,
    "warmup": 1,
    "threads": 1,
    "device": "cpu",
}


def test_the_textgym_side_times_each_step_and_counts_its_tokens(tmp_path):
    path, described = _benchmark_model("tiny", 3, tmp_path)
    assert described.startswith("tiny GPT-2")
    result = _textgym_worker({**SETTINGS, "model": str(path)})
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    # 2 prompts x 2 completions of 1..3 tokens each, per timed step
    assert len(result["tokens"]) == 2 and all(4 <= t <= 12 for t in result["tokens"])
    assert 0.05 < result["peak_rss_gib"] < 64
    for rollout, update, step in zip(
        result["rollout_seconds"], result["update_seconds"], result["step_seconds"], strict=True
    ):
        assert rollout > 0 and update > 0 and rollout + update <= step


def test_run_side_names_the_side_that_failed(tmp_path):
    with pytest.raises(ValueError, match="side must be one of textgym, trl"):
        run_side("sb3", {}, 1)
    with pytest.raises(RuntimeError, match="the textgym run failed: "):
        run_side("textgym", {**SETTINGS, "model": str(tmp_path / "missing")}, 600)


def test_the_table_reports_both_trainers_and_the_ratios():
    side = {
        "seconds_per_step": 2.0,
        "tokens_per_second": 8.0,
        "mean_completion_tokens": 1.0,
        "peak_rss_gib": 1.5,
    }
    report = {
        "model": "m",
        "settings": {**SETTINGS, "rounds": 2},
        "summary": {"textgym": side, "trl": {**side, "tokens_per_second": 4.0, "peak_rss_gib": 3.0}},
        "speedup": 2.0,
        "memory_ratio": 0.5,
    }
    table = format_trl_table(report)
    assert "| textgym GRPO | 2.00 | 8.0 | 1.0 | 1.50 GiB |" in table
    assert "| TRL GRPOTrainer | 2.00 | 4.0 | 1.0 | 3.00 GiB |" in table
    assert "2.00x generated tokens per second, 0.50x peak memory" in table
    assert "rollout" not in table  # a report without the project's split
    report["runs"] = {"textgym": [{"rollout_seconds": [0.5, 0.75], "update_seconds": [1.0, 1.25]}] * 2}
    assert "textgym's step (medians): rollout 0.62 s (the reference's pass included), update 1.12 s" in (
        format_trl_table(report)
    )


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is an optional benchmark dependency")
def test_side_by_side_with_trl(tmp_path):
    out = tmp_path / "trl.json"
    args = ["--model", "tiny", "--group-size", "2", "--new-tokens", "3", "--steps", "1", "--rounds", "1"]
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "trl", *args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for side in ("textgym", "trl"):
        summary = report["summary"][side]
        assert summary["seconds_per_step"] > 0 and 1 <= summary["mean_completion_tokens"] <= 3
    assert report["speedup"] == pytest.approx(
        report["summary"]["textgym"]["tokens_per_second"] / report["summary"]["trl"]["tokens_per_second"]
    )
    assert "| TRL GRPOTrainer |" in proc.stdout
