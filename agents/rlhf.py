"""RLHF on a real pretrained language model: PPO with and without the KL penalty, measured on
held-out prompts (the README's demonstration; ``scripts/rlhf.py`` is its command line).

For each run (:data:`RUNS`: full fine-tuning or LoRA, with or without the KL penalty) PPO fine-tunes
the model on the ``reviews`` task's training openings ("The movie was", ...) with the VADER
sentiment reward, then the fine-tuned policy is sampled at temperature 1 on the task's held-out
openings, and each episode's exact KL to the pretrained model (the sum over its steps of
KL(π(·|s) ‖ π_ref(·|s)), :func:`agents.lm.sample_with_kl` through the KV caches) is measured beside its reward. The
pretrained model is measured the same way, on the same episodes (same seed), first.

Every run, and the pretrained model's evaluation, runs in a fresh process (``spawn``), so that its
peak memory (the process's RSS high-water mark, taken when training ends and before the evaluation
loads anything else) and its wall time are its own.

Where it departs from the usual recipe: the reward is VADER's compound score of the completion
alone, a fixed lexicon rather than a learned reward model, so the no-KL runs show what maximising a
fixed scorer does to the text; and under LoRA the KL reference is the policy's own model with its
adapters switched off (no second copy of the weights).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.runtime import in_fresh_process, peak_rss_mib

RUNS = ("full_kl", "full_no_kl", "lora_kl", "lora_no_kl")
"""The runs :func:`rlhf` can do: full fine-tuning or LoRA, with the KL penalty or without."""
PRESETS = ("pretrained", "baseline")
"""``pretrained``: :meth:`agents.ppo.PPOConfig.pretrained`; ``baseline``: the first hand-picked
settings (:func:`baseline_config`), to measure the preset against on the same budget."""


def baseline_config(lora: bool = False, kl: bool = True) -> Any:
    """The first hand-picked settings that trained SmolLM2: the defaults with lr 1.41e-5, no annealing,
    ``vf_coef=0.1``, ``ent_coef=0``, rollouts of 16 steps, β 0.1 adapting towards 2 nats.
    ``lora`` changes nothing: they were tuned for full fine-tuning only."""
    from agents.ppo import PPOConfig

    kl_fields: dict[str, Any] = {"kl_coef": 0.1, "kl_target": 2.0} if kl else {}
    return PPOConfig(
        n_steps=16, learning_rate=1.41e-5, anneal_lr=False, vf_coef=0.1, ent_coef=0.0, **kl_fields
    )


def run_config(run: str, preset: str = "pretrained", overrides: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~agents.ppo.PPOConfig` of ``run`` (one of :data:`RUNS`) under ``preset``."""
    from agents.ppo import PPOConfig

    if run not in RUNS:
        raise ValueError(f"run must be one of {', '.join(RUNS)}; got {run!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    lora, kl = run.startswith("lora"), not run.endswith("no_kl")
    config = PPOConfig.pretrained(lora=lora, kl=kl) if preset == "pretrained" else baseline_config(lora, kl)
    return dataclasses.replace(config, **dict(overrides or {}))


@dataclass(frozen=True)
class RLHFSettings:
    """What every run of :func:`rlhf` shares."""

    model: str
    """The model folder (written by ``save_pretrained``; its tokenizer is the env's)."""
    total_timesteps: int = 8_448
    """Env steps of each PPO run (all envs together): the baseline's 33 rollouts of 16 envs × 16 steps."""
    num_envs: int = 16
    """Episodes in flight while training."""
    max_new_tokens: int = 16
    """Tokens per completion: about one sentence, what VADER reads best."""
    eval_episodes: int = 128
    """Held-out episodes of each evaluation (sampled at temperature 1)."""
    eval_envs: int = 32
    """Episodes in flight while evaluating."""
    preset: str = "pretrained"
    """:data:`PRESETS`."""
    ppo_overrides: tuple[tuple[str, Any], ...] = ()
    """PPOConfig fields to replace in every run, as (name, value) pairs."""
    lora_rank: int = 16
    """Rank of the LoRA runs' adapters."""
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    """torch threads of each run's process (0: torch's default)."""
    progress: bool = True
    out: str | None = None
    """Directory of the TensorBoard runs (one per run); None: none written."""

    def env_kwargs(self, split: str) -> dict[str, Any]:
        return {
            "task": "reviews",
            "tokenizer": self.model,
            "reward": "vader",
            "max_new_tokens": self.max_new_tokens,
            "split": split,
        }


def _evaluate(policy: Any, reference: Any, settings: RLHFSettings) -> dict[str, Any]:
    from agents.lm import sample_with_kl

    return sample_with_kl(
        policy,
        reference,
        settings.env_kwargs("test"),
        settings.eval_episodes,
        settings.eval_envs,
        seed=10_000 + settings.seed,
        cache=True,
    )


def _load_pretrained(settings: RLHFSettings, max_len: int | None = None) -> Any:
    from agents.hf import HFPolicy
    from textgym.hf import HFTokenizer
    from textgym.tasks import make_env_config

    tokenizer = HFTokenizer(settings.model)
    if max_len is None:
        max_len = make_env_config(**{**settings.env_kwargs("test"), "tokenizer": tokenizer}).seq_len
    return HFPolicy.from_pretrained(settings.model, tokenizer, max_len).eval()


def evaluate_pretrained(settings: RLHFSettings) -> dict[str, Any]:
    """The pretrained model's held-out reward (its KL to itself is 0 by construction)."""
    import torch

    from agents.runtime import set_threads
    from textgym.core import resolve_device

    set_threads(settings.threads)
    start = time.perf_counter()
    with torch.no_grad():
        policy = _load_pretrained(settings).to(resolve_device(settings.device))
        stats = _evaluate(policy, policy, settings)
    return {**stats, "eval_seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}


def train_and_evaluate(settings: RLHFSettings, run: str) -> dict[str, Any]:
    """Train ``run`` (one of :data:`RUNS`), then evaluate it on held-out prompts."""
    import torch

    from agents.hf import HFConfig
    from agents.ppo import PPO
    from agents.runtime import set_threads

    set_threads(settings.threads)
    config = run_config(run, settings.preset, dict(settings.ppo_overrides))
    lora = run.startswith("lora")
    start = time.perf_counter()
    model = PPO(
        "TextGen-v0",
        config,
        settings.num_envs,
        settings.env_kwargs("train"),
        settings.device,
        settings.seed,
        None if settings.out is None else str(Path(settings.out) / run),
        policy_model=settings.model,
        hf_config=HFConfig(lora_rank=settings.lora_rank) if lora else None,
    )
    curve: list[dict[str, float]] = []
    tags = (
        "rollout/ep_rew_mean",
        "train/approx_kl",
        "train/clip_fraction",
        "train/kl_ref",
        "train/kl_coef",
        "train/value_loss",
    )

    def record(m: Any) -> None:
        curve.append(
            {"timesteps": m.num_timesteps, **{t: m.last_stats[t] for t in tags if t in m.last_stats}}
        )

    model.learn(settings.total_timesteps, progress_bar=settings.progress, callback=record)
    train_seconds, train_peak = time.perf_counter() - start, peak_rss_mib()
    with torch.no_grad():
        if lora:
            reference = model.policy.adapters_disabled()
        elif model.reference is not None:
            reference = model.reference
        else:
            reference = _load_pretrained(settings, model.policy.max_len).to(model.device)
        stats = _evaluate(model.policy, reference, settings)
    return {
        **stats,
        "config": config.to_dict(),
        "lora_rank": settings.lora_rank if lora else None,
        "train_seconds": train_seconds,
        "peak_rss_mib": train_peak,
        "updates": len(curve),
        "final_kl_coef": model.kl.value if config.kl_coef else 0.0,
        "curve": curve,
    }


def rlhf(
    settings: RLHFSettings,
    runs: Sequence[str] = RUNS,
    say: Callable[[str], object] = print,
    isolate: bool = True,
) -> dict[str, Any]:
    """The pretrained model's evaluation, then each of ``runs`` trained and evaluated, each in its
    own process (``isolate=False``: all in this one, whose peak memory then only grows: for quick
    checks). Returns everything :func:`results_markdown` tabulates."""

    def call(job: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        return in_fresh_process(job, *args) if isolate else job(*args)

    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise ValueError(f"runs must be a non-empty subset of {', '.join(RUNS)}; got {list(runs)}")
    total = 1 + len(runs)
    say(f"1/{total} the pretrained model on {settings.eval_episodes} held-out episodes")
    results: dict[str, Any] = {"settings": dataclasses.asdict(settings), "isolated": isolate, "runs": {}}
    results["pretrained"] = call(evaluate_pretrained, settings)
    say(f"   held-out VADER {results['pretrained']['reward_mean']:.3f}")
    for i, run in enumerate(runs, 2):
        say(f"{i}/{total} PPO {run} ({settings.preset} preset), {settings.total_timesteps:,} env steps")
        stats = call(train_and_evaluate, settings, run)
        results["runs"][run] = stats
        say(
            f"   held-out VADER {stats['reward_mean']:.3f}, KL to pretrained {stats['kl_mean']:.2f} nats, "
            f"{stats['train_seconds']:.0f} s, peak {stats['peak_rss_mib']:,.0f} MiB"
        )
    return results


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def results_markdown(results: Mapping[str, Any]) -> str:
    """The table of :func:`rlhf`'s results, and the samples before and after."""
    s, base = results["settings"], results["pretrained"]
    lines = [
        f"Model `{s['model']}`, task `reviews` (VADER reward), {s['preset']} preset, "
        f"{s['total_timesteps']:,} env steps per run ({s['num_envs']} envs, {s['max_new_tokens']} new "
        f"tokens), {s['threads']} thread(s) on {s['device']}, seed {s['seed']}. Held-out: "
        f"{base['episodes']} episodes sampled at temperature 1."
        + ("" if results.get("isolated", True) else " All runs in one process: peak RSS is cumulative."),
        "",
        "| run | held-out VADER | change | KL to pretrained (nats/episode) | KL target | train time | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| pretrained | {base['reward_mean']:.3f} ± {base['reward_std']:.3f} | | 0.00 | | | "
        f"{base['peak_rss_mib']:,.0f} MiB |",
    ]
    for run, r in results["runs"].items():
        target = r["config"]["kl_target"]
        lines.append(
            f"| {run} | {r['reward_mean']:.3f} ± {r['reward_std']:.3f} | "
            f"{r['reward_mean'] - base['reward_mean']:+.3f} | {r['kl_mean']:.2f} | "
            f"{'' if target is None else target} | {r['train_seconds'] / 60:.1f} min | {r['peak_rss_mib']:,.0f} MiB |"
        )
    lines += [
        "",
        "Samples (prompt → **completion**, VADER), the same held-out episodes for every policy:",
        "",
    ]
    lines += ["| policy | samples |", "|---|---|"]
    for name, r in (("pretrained", base), *results["runs"].items()):
        cells = "<br>".join(f"{_cell(p)} → **{_cell(c)}** ({v:+.2f})" for p, c, v in r["samples"][:4])
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def quick_model(folder: str | Path | None = None) -> Path:
    """A tiny random GPT-2 and a BPE tokenizer of the ``reviews`` corpus, built offline in
    ``folder`` (a new temporary directory when None): the model of ``--quick``."""
    from agents.benchmark import _benchmark_model

    folder = Path(tempfile.mkdtemp(prefix="rlhf_quick_") if folder is None else folder)
    path, _ = _benchmark_model("tiny", 16, folder)
    return path
