"""GRPO against TRL's ``GRPOTrainer``: the same model, prompts, reward and batch, side by side.

``python scripts/benchmark.py trl`` runs both on SmolLM2-135M (once ``scripts/get_model.py`` has
fetched it; else a tiny GPT-2 built offline) at matched settings: ``prompts_per_step`` prompts ×
``group_size`` completions of at most ``new_tokens`` tokens per optimizer step, VADER reward,
``beta`` times the KL to a frozen reference, one gradient step per batch, full fine-tune in float32,
the same learning rate and temperature 1. Each side runs in a fresh process (so that its peak
resident memory is its own), ``rounds`` times in alternating order (a load that changes over the
run hits both alike), and times ``steps`` optimizer steps after ``warmup`` untimed ones. A step is
everything: generation, reward, reference, forward, backward and the optimizer.

TRL is an optional dependency of this benchmark only (``pip install trl``); it is imported in the
child process that runs it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.runtime import in_fresh_process, peak_rss_mib

SIDES = ("textgym", "trl")


def _textgym_worker(settings: dict[str, Any]) -> dict[str, Any]:
    """The project's GRPO for ``warmup + steps`` rollouts, one optimizer step each."""
    from agents import GRPO, GRPOConfig
    from agents.runtime import set_threads

    set_threads(settings["threads"])
    n = settings["prompts_per_step"] * settings["group_size"]
    model = GRPO(
        "TextGen-v0",
        GRPOConfig(
            group_size=settings["group_size"],
            beta=settings["beta"],
            learning_rate=settings["learning_rate"],
            anneal_lr=False,
        ),
        num_envs=n,
        env_kwargs={"task": "reviews", "reward": "vader", "max_new_tokens": settings["new_tokens"]},
        policy_model=settings["model"],
        device=settings["device"],
        seed=0,
    )
    seconds, tokens, rollouts, updates = [], [], [], []
    for step in range(settings["warmup"] + settings["steps"]):
        start = time.perf_counter()
        model.learn(1, reset_num_timesteps=step == 0, progress_bar=False)  # one rollout, one step
        elapsed = time.perf_counter() - start
        if step >= settings["warmup"]:
            seconds.append(elapsed)
            tokens.append(sum(e["l"] for e in list(model.ep_info_buffer)[-n:]))
            rollouts.append(model.last_stats["time/rollout_seconds"])  # the reference's pass included
            updates.append(model.last_stats["time/update_seconds"])
    return {
        "step_seconds": seconds,
        "tokens": tokens,
        "rollout_seconds": rollouts,
        "update_seconds": updates,
        "peak_rss_gib": peak_rss_mib() / 1024,
    }


def _trl_worker(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``GRPOTrainer`` for ``warmup + steps`` optimizer steps, timed by a callback."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agents.runtime import set_threads
    from textgym.rewards import VaderReward
    from textgym.tasks import get_task

    set_threads(settings["threads"])
    vader = VaderReward()

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(r) for r in vader.score([""] * len(completions), completions)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    causal_lm = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    task = get_task("reviews")
    prompts = [task.prompts[i] for i in task.split_indices("train")]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=settings["prompts_per_step"] * settings["group_size"],
            num_generations=settings["group_size"],
            max_completion_length=settings["new_tokens"],
            beta=settings["beta"],
            learning_rate=settings["learning_rate"],
            lr_scheduler_type="constant",
            max_steps=settings["warmup"] + settings["steps"],
            temperature=1.0,
            use_cpu=settings["device"] == "cpu",
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=causal_lm,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        trainer.remove_callback(PrinterCallback)  # its per-step log dicts; the parent reports
        trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    n = settings["prompts_per_step"] * settings["group_size"]
    w = settings["warmup"]
    return {
        "step_seconds": times[w:],
        "tokens": [round(length * n) for length in lengths[w:]],
        "peak_rss_gib": peak_rss_mib() / 1024,
    }


def run_side(side: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One side's measurement in a fresh process; raises RuntimeError naming the side on failure."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    worker = _textgym_worker if side == "textgym" else _trl_worker
    try:
        return in_fresh_process(worker, settings, timeout=timeout)
    except RuntimeError as error:
        raise RuntimeError(f"the {side} run failed: {error}") from None


def grpo_vs_trl(
    model: str = "smollm2-135m",
    prompts_per_step: int = 2,
    group_size: int = 8,
    new_tokens: int = 16,
    beta: float = 0.04,
    learning_rate: float = 1e-5,
    steps: int = 3,
    warmup: int = 1,
    rounds: int = 2,
    threads: int = 1,
    device: str = "cpu",
    timeout: float = 1800.0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Seconds per optimizer step, generated tokens per second and peak memory of the project's
    GRPO and of TRL's ``GRPOTrainer`` at matched settings (see the module docstring)."""
    import importlib.util

    from agents.benchmark import _benchmark_model

    if importlib.util.find_spec("trl") is None:
        raise ImportError("benchmark.py trl needs TRL: pip install trl (an optional benchmark dependency)")
    with tempfile.TemporaryDirectory() as tmp:
        path, described = _benchmark_model(model, new_tokens, Path(tmp))
        settings = {
            "model": str(path),
            "prompts_per_step": prompts_per_step,
            "group_size": group_size,
            "new_tokens": new_tokens,
            "beta": beta,
            "learning_rate": learning_rate,
            "steps": steps,
            "warmup": warmup,
            "threads": threads,
            "device": device,
        }
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r in range(rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                result = run_side(side, settings, timeout)
                runs[side].append(result)
                progress(
                    f"round {r + 1}/{rounds} {side:>7}: {statistics.median(result['step_seconds']):.2f} s per step, "
                    f"peak {result['peak_rss_gib']:.2f} GiB"
                )
    summary = {}
    for side, results in runs.items():
        seconds = [s for result in results for s in result["step_seconds"]]
        tokens = [t for result in results for t in result["tokens"]]
        summary[side] = {
            "seconds_per_step": statistics.median(seconds),
            "tokens_per_second": sum(tokens) / sum(seconds),
            "mean_completion_tokens": sum(tokens) / len(tokens) / (prompts_per_step * group_size),
            "peak_rss_gib": max(result["peak_rss_gib"] for result in results),
        }
    return {
        "benchmark": "trl",
        "model": described,
        "settings": {k: v for k, v in settings.items() if k != "model"} | {"rounds": rounds},
        "runs": runs,
        "summary": summary,
        "speedup": summary["textgym"]["tokens_per_second"] / summary["trl"]["tokens_per_second"],
        "memory_ratio": summary["textgym"]["peak_rss_gib"] / summary["trl"]["peak_rss_gib"],
    }


def format_trl_table(report: dict[str, Any]) -> str:
    """The report of :func:`grpo_vs_trl` as a Markdown table."""
    s = report["settings"]
    lines = [
        f"{report['model']}: {s['prompts_per_step']} prompts x {s['group_size']} completions of at most "
        f"{s['new_tokens']} tokens per step, beta {s['beta']}, {s['threads']} thread(s) on {s['device']}, "
        f"{s['steps']} timed steps after {s['warmup']} per run, {s['rounds']} runs each:",
        "",
        "| trainer | s per step (median) | generated tokens/s | tokens per completion | peak memory |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"textgym": "textgym GRPO", "trl": "TRL GRPOTrainer"}
    for side in SIDES:
        x = report["summary"][side]
        lines.append(
            f"| {names[side]} | {x['seconds_per_step']:.2f} | {x['tokens_per_second']:.1f} | "
            f"{x['mean_completion_tokens']:.1f} | {x['peak_rss_gib']:.2f} GiB |"
        )
    lines.append("")
    lines.append(
        f"textgym / TRL: {report['speedup']:.2f}x generated tokens per second, "
        f"{report['memory_ratio']:.2f}x peak memory"
    )
    mine = report.get("runs", {}).get("textgym", [])
    if mine and all("rollout_seconds" in run for run in mine):  # reports from before lack the split
        rollout = statistics.median(s for run in mine for s in run["rollout_seconds"])
        update = statistics.median(s for run in mine for s in run["update_seconds"])
        lines.append(
            f"textgym's step (medians): rollout {rollout:.2f} s (the reference's pass included), "
            f"update {update:.2f} s"
        )
    return "\n".join(lines)
