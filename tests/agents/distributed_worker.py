"""The rank side of tests/agents/test_distributed.py, launched by
``torchrun --standalone --nproc_per_node=2 tests/agents/distributed_worker.py OUT [fail]``.

Every rank runs the same scenarios in order and writes what the test compares to
``OUT/results/rank<r>.pt``; the agents' own files (TensorBoard, checkpoints) go under ``OUT/run``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import textgym  # noqa: F401
from agents import GRPO, PPO, GRPOConfig, PPOConfig
from agents import distributed as dist
from agents.grpo import GroupRollout

ENV = {"max_new_tokens": 3}
RESUME_CFG = PPOConfig(n_steps=4, anneal_lr=False)
RESUME_UPDATES = 4


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.policy.parameters()])


def identical_weights() -> dict:
    """PPO (KL penalty with adaptive β, early stopping) and GRPO (adaptive β, 2 x 2 minibatch steps)
    trained for a few updates; what must agree across ranks, and each rank's first prompts."""
    ppo_cfg = PPOConfig(n_steps=4, kl_coef=0.05, kl_target=0.5, target_kl=0.02)
    ppo = PPO("TextGen-v0", ppo_cfg, num_envs=8, env_kwargs=ENV, device="cpu", seed=3)
    ppo.learn(3 * 4 * 8)
    grpo_cfg = GRPOConfig(group_size=2, beta=0.05, kl_target=0.5, n_epochs=2, num_minibatches=2)
    grpo = GRPO("TextGen-v0", grpo_cfg, num_envs=8, env_kwargs=ENV, device="cpu", seed=3)
    grpo.learn(3 * 3 * 8)
    return {
        name: {
            "weights": flat_weights(model),
            "kl_coef": model.kl.value,
            "num_timesteps": model.num_timesteps,
            "n_updates": model.n_updates,
            "stats": {k: v for k, v in model.last_stats.items() if not k.startswith("time/")},  # wall times
            "prompt_index": model.env._core.prompt_index.clone(),
            # GRPO's loss leaves the value head out: Adam must keep no state for it, as in one process
            "value_head_stepped": any(
                p in model.optimizer.state for p in model.policy.value_head.parameters()
            ),
        }
        for name, model in (("ppo", ppo), ("grpo", grpo))
    }


def half_gradients(out: Path) -> dict:
    """The SGD step (lr 1, so the gradient itself) of each agent on this rank's half of the rollout
    the test collected in one process, with the same initial weights."""
    results = {}
    for name in ("ppo", "grpo"):
        saved = torch.load(out / f"{name}_batch.pt", weights_only=False)
        cls = PPO if name == "ppo" else GRPO
        model = cls("TextGen-v0", saved["config"], num_envs=saved["num_envs"], env_kwargs=ENV, device="cpu")
        model.policy.load_state_dict(saved["weights"])
        model.optimizer = torch.optim.SGD(model._trainable, lr=1.0)
        before = flat_weights(model)
        r = dist.rank()
        if name == "ppo":
            rollout, last_values, last_dones = saved["batch"]
            half = rollout.actions.shape[1] // 2
            cols = slice(r * half, (r + 1) * half)  # envs are the second axis: (T, N, ...)
            stats = model.update(
                type(rollout)(*(x[:, cols] for x in rollout)), last_values[cols], last_dones[cols]
            )
        else:
            rollout: GroupRollout = saved["batch"]
            half = rollout.lengths.shape[0] // 2
            rows = slice(r * half, (r + 1) * half)  # whole groups: half is a multiple of group_size
            part = [x[rows] if isinstance(x, torch.Tensor) else x for x in rollout]
            part[-1] = rollout.env_steps // 2
            stats = model.update(GroupRollout(*part))
        results[name] = {"gradient": before - flat_weights(model), "stats": stats}
    return results


def interrupt_and_resume(run: Path) -> dict:
    """An uninterrupted PPO run; the same run with Ctrl-C on rank 1 alone after its second update,
    then resumed from the checkpoint to the same total."""
    total = RESUME_UPDATES * RESUME_CFG.n_steps * 8

    def make(**kwargs) -> PPO:
        return PPO("TextGen-v0", RESUME_CFG, num_envs=8, env_kwargs=ENV, device="cpu", seed=5, **kwargs)

    straight = make().learn(total)

    def ctrl_c_on_rank_1(model: PPO) -> None:
        if dist.rank() == 1 and model.n_updates == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped_at = None
    interrupted = make(tensorboard_log=run / "tb")
    try:
        interrupted.learn(total, checkpoint_path=run / "checkpoint.pt", callback=ctrl_c_on_rank_1)
    except KeyboardInterrupt:
        stopped_at = interrupted.n_updates
    resumed = PPO.load(run / "checkpoint.pt", device="cpu", tensorboard_log=run / "tb")
    loaded_at = resumed.num_timesteps
    resumed.learn(total - resumed.num_timesteps, reset_num_timesteps=False)
    return {
        "straight": flat_weights(straight),
        "resumed": flat_weights(resumed),
        "stopped_at": stopped_at,
        "loaded_at": loaded_at,
        "num_timesteps": resumed.num_timesteps,
    }


class FailsOnRank1:
    """A reward function that raises on rank 1 once it has scored ``after`` episodes."""

    def __init__(self, after: int):
        self.calls, self.after = 0, after

    def __call__(self, prompt: str, completion: str) -> float:
        self.calls += 1
        if dist.rank() == 1 and self.calls > self.after:
            raise RuntimeError("the reward model failed on rank 1")
        return len(completion.split()) / 3


def fail_on_rank_1(run: Path) -> None:
    """PPO saving after every update until rank 1's reward function raises mid-rollout."""
    model = PPO(
        "TextGen-v0",
        RESUME_CFG,
        num_envs=8,
        env_kwargs={**ENV, "reward": FailsOnRank1(20)},
        device="cpu",
        seed=5,
    )
    model.learn(100 * RESUME_CFG.n_steps * 8, checkpoint_path=run / "checkpoint.pt", checkpoint_interval=1)


def main(out: Path) -> None:
    device = dist.init("cpu")
    if len(sys.argv) > 2 and sys.argv[2] == "fail":
        fail_on_rank_1(out)
        return
    assert device.type == "cpu" and dist.world_size() == 2
    results = {
        "world_size": dist.world_size(),
        "pid": os.getpid(),
        "identical": identical_weights(),
        "gradients": half_gradients(out),
        "resume": interrupt_and_resume(out / "run"),
    }
    (out / "results").mkdir(exist_ok=True)
    torch.save(results, out / "results" / f"rank{dist.rank()}.pt")
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
