"""The verifiable-reward recipe on a pretrained language model: SmolLM2-135M on 2-digit addition.

``scripts/arithmetic.py --model smollm2-135m`` is its command line. One run, in this process:

1. **Pretrained.** The model as fetched (``scripts/get_model.py``), asked ``"37+45="``: exact
   match on held-out prompts of ``arithmetic2`` (operand pairs whose equations the warm-up never
   sees). It knows sums but not the format: it goes on writing after the answer (``"82\\n\\nThe"``)
   where the task wants the answer and then the end of text.
2. **Warm-up.** ``warmup_steps`` steps of supervised next-token prediction (the loop of pretraining) on the training
   equations (``"12+7=19"`` then the end of text): enough to learn the format, far too few to
   learn the sums. The warm-up is saved as a model folder (``<out>/warm-up``).
3. **RL.** Each of ``agents`` (GRPO by default) starts from that folder and trains on the training
   prompts with the exact-match reward for ``total_timesteps`` env steps.
4. **Evaluation.** Greedy exact match on ``eval_prompts`` held-out prompts (a fixed random draw,
   the same for every stage; None: all 2,000) and as many training prompts.

Settings were chosen by measurement on the 2-core CPU; see the README's arithmetic section.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.grpo import GRPOConfig, RLOOConfig
from agents.ppo import PPOConfig
from agents.recipes import AGENTS, agent_setup, answered, check_counts, check_groups
from textgym.io import atomic_write
from textgym.tasks import get_task, make_env_config

PRETRAINED = "pretrained"
WARMUP = "warm-up"


def _group_default(cls: type) -> Callable[[], Any]:
    return lambda: cls(group_size=8, n_epochs=1, num_minibatches=2, learning_rate=1e-5, anneal_lr=False)


@dataclass(frozen=True)
class PretrainedRecipeConfig:
    """Everything :func:`run_pretrained_recipe` does; saved with the results."""

    model: str = "smollm2-135m"
    """A registered model (:data:`textgym.models.MODELS`, fetched by ``scripts/get_model.py``) or a
    folder written by ``save_pretrained``."""
    task: str = "arithmetic2"
    """A built-in task with a train/test split and an exact-match reward."""
    warmup_steps: int = 20
    """Supervised steps of the warm-up (AdamW, constant learning rate, gradient norm clipped at 1)."""
    warmup_batch_size: int = 16
    warmup_learning_rate: float = 3e-5
    agents: tuple[str, ...] = ("grpo",)
    """The RL agents, each from the warm-up."""
    total_timesteps: int = 8192
    """Env steps of every RL run (one step = one token of one row)."""
    group_num_envs: int = 128
    """GRPO's and RLOO's env rows: ``group_num_envs / group_size`` prompts per rollout."""
    ppo_num_envs: int = 32
    grpo: GRPOConfig = field(default_factory=_group_default(GRPOConfig))
    rloo: RLOOConfig = field(default_factory=_group_default(RLOOConfig))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig.pretrained(kl=False, n_steps=8))
    eval_prompts: int | None = 300
    """Held-out (and training) prompts evaluated, a fixed random draw; None: every prompt."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [a for a in self.agents if a not in AGENTS]
        if unknown:
            raise ValueError(f"agents must be some of {', '.join(AGENTS)}, got {list(self.agents)}")
        if not get_task(self.task).test_indices:
            raise ValueError(f"task {self.task!r} has no held-out test split")
        check_counts(
            self,
            ("warmup_batch_size", "total_timesteps", "group_num_envs", "ppo_num_envs"),
            ("warmup_steps",),
        )
        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise ValueError(
                f"PretrainedRecipeConfig.eval_prompts must be >= 1 or None, got {self.eval_prompts}"
            )
        if not self.warmup_learning_rate > 0:
            raise ValueError(
                f"PretrainedRecipeConfig.warmup_learning_rate must be > 0, got {self.warmup_learning_rate}"
            )
        check_groups(self, [a for a in ("grpo", "rloo") if a in self.agents])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = {
    "warmup_steps": 2,
    "warmup_batch_size": 4,
    "total_timesteps": 64,
    "group_num_envs": 16,
    "ppo_num_envs": 8,
    "eval_prompts": 16,
    "grpo": GRPOConfig(group_size=4, n_epochs=1, learning_rate=1e-5),
    "rloo": RLOOConfig(group_size=4, n_epochs=1, learning_rate=1e-5),
    "ppo": PPOConfig.pretrained(kl=False, n_steps=4),
}
"""What ``--quick`` changes: a smoke run that exercises every stage and measures nothing."""


def model_folder(model: str) -> Path:
    """The folder of ``model``: a registered name, fetched already, or a folder; a clear error
    saying how to fetch it otherwise."""
    from textgym.models import MODELS, model_path

    path = model_path(model) if model in MODELS else Path(model)
    if not (path / "config.json").is_file():
        hint = f": python scripts/get_model.py {model}" if model in MODELS else ""
        raise FileNotFoundError(
            f"model: no model folder (config.json) at {str(path)!r}{hint}; give one of "
            f"{', '.join(MODELS)} or a folder written by save_pretrained"
        )
    return path


def eval_draw(config: PretrainedRecipeConfig, split: str) -> list[str]:
    """The prompts of ``split`` every stage is evaluated on: a fixed random draw (seed 0)."""
    prompts = list(make_env_config(config.task, split=split).prompts)
    if config.eval_prompts is None or config.eval_prompts >= len(prompts):
        return prompts
    rows = np.random.default_rng(0).choice(len(prompts), config.eval_prompts, replace=False)
    return [prompts[i] for i in sorted(rows)]


@torch.no_grad()
def exact_match(policy: Any, config: PretrainedRecipeConfig, split: str, batch: int = 256) -> float:
    """Greedy exact match of ``policy`` on :func:`eval_draw`'s prompts of ``split``."""
    env = make_env_config(config.task, split=split, tokenizer=policy.tokenizer)
    return answered(policy, env, eval_draw(config, split), batch=batch)


def evaluate(policy: Any, config: PretrainedRecipeConfig) -> dict[str, float]:
    return {
        "test_greedy": exact_match(policy, config, "test"),
        "train_greedy": exact_match(policy, config, "train"),
    }


def warm_up(policy: Any, config: PretrainedRecipeConfig, seed: int) -> float:
    """``warmup_steps`` supervised steps on the task's training equations, by the loop of
    pretraining (:func:`agents.lm.fit`: rows drawn with replacement, gradient norm clipped at 1)
    at a constant learning rate; the last step's loss (NaN without steps)."""
    from agents.lm import encode_texts, fit, lm_loss

    env = make_env_config(config.task, split="train", tokenizer=policy.tokenizer)
    ids, mask, _ = encode_texts(get_task(config.task).corpus, env.tokenizer, env.seq_len)
    dev = next(policy.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.warmup_learning_rate, weight_decay=0.0)
    last = [float("nan")]

    def minibatch_loss(rows: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(policy, ids[rows], mask[rows])
        last[0] = float(loss.detach())
        return loss

    fit(
        policy,
        optimizer,
        minibatch_loss,
        lambda step: {},
        n_train=len(ids),
        steps=config.warmup_steps,
        batch_size=config.warmup_batch_size,
        eval_interval=max(1, config.warmup_steps),
        max_grad_norm=1.0,
        lr_at=lambda step: config.warmup_learning_rate,
        seed=seed,
        prefix="warmup",
    )
    return last[0]


def rl_stage(
    config: PretrainedRecipeConfig, agent: str, start: Path, out: Path, seed: int, progress: bool
) -> dict[str, Any]:
    """``agent`` from the model folder ``start`` for ``total_timesteps`` on the training prompts."""
    cls, agent_config, num_envs = agent_setup(config, agent)
    began = time.perf_counter()
    model = cls(
        "TextGen-v0",
        agent_config,
        num_envs,
        {"task": config.task, "split": "train"},
        config.device,
        seed,
        out / "tb",
        policy_model=start,
    )
    model.learn(config.total_timesteps, tb_log_name=agent, progress_bar=progress)
    seconds = time.perf_counter() - began
    model.policy.eval()
    figures = {**evaluate(model.policy, config), "env_steps": int(model.num_timesteps), "seconds": seconds}
    model.env.close()
    return figures


def run_pretrained_recipe(
    config: PretrainedRecipeConfig, out: str | Path, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Every stage of the module docstring for one ``seed``; writes ``results.md`` and
    ``results.json`` into ``out`` (atomically, at the end) and returns the results."""
    from agents.hf import HFPolicy
    from textgym.core import resolve_device
    from textgym.hf import HFTokenizer

    out = Path(out)
    path = model_folder(config.model)
    tokenizer = HFTokenizer(path)
    env = make_env_config(config.task, split="test", tokenizer=tokenizer)
    torch.manual_seed(seed)
    began = time.perf_counter()
    policy = HFPolicy.from_pretrained(path, tokenizer, env.seq_len).to(resolve_device(config.device)).eval()
    stages: dict[str, Any] = {
        PRETRAINED: {**evaluate(policy, config), "seconds": time.perf_counter() - began}
    }
    began = time.perf_counter()
    loss = warm_up(policy, config, seed)
    warm = policy.save_pretrained(out / WARMUP)
    stages[WARMUP] = {**evaluate(policy, config), "final_loss": loss, "seconds": time.perf_counter() - began}
    del policy
    for agent in config.agents:
        stages[agent] = rl_stage(config, agent, warm, out, seed, progress)
    results = {
        "config": config.to_dict(),
        "seed": seed,
        "device": str(resolve_device(config.device)),
        "threads": torch.get_num_threads(),
        "stages": stages,
    }
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    atomic_write(out / "results.md", lambda p: p.write_text(results_markdown(results)))
    return results


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown table: each stage's held-out and training exact match."""
    cfg = results["config"]
    n = "every" if cfg["eval_prompts"] is None else f"{cfg['eval_prompts']}"
    lines = [
        f"{cfg['model']} on `{cfg['task']}`, seed {results['seed']}, {results['device']} "
        f"({results['threads']} thread(s)); greedy exact match on {n} held-out and training prompts:",
        "",
        "| stage | budget | held-out | train | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for stage, row in results["stages"].items():
        if stage == PRETRAINED:
            budget = "–"
        elif stage == WARMUP:
            budget = f"{cfg['warmup_steps']} supervised steps × {cfg['warmup_batch_size']}"
        else:
            budget = f"{row['env_steps']:,} env steps"
        lines.append(
            f"| {stage} | {budget} | {row['test_greedy']:.3f} | {row['train_greedy']:.3f} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def quick_config(config: PretrainedRecipeConfig) -> PretrainedRecipeConfig:
    """``config`` with :data:`QUICK`'s tiny budgets."""
    return dataclasses.replace(config, **QUICK)


__all__: Sequence[str] = (
    "PretrainedRecipeConfig",
    "evaluate",
    "model_folder",
    "quick_config",
    "results_markdown",
    "run_pretrained_recipe",
    "warm_up",
)
