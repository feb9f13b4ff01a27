"""Data-parallel scaling of PPO training (:mod:`agents.distributed`): env steps per second of one
process against several, one torch thread each, on this machine's CPU (gloo).

Each configuration runs in fresh processes started by ``torch.multiprocessing`` (as ``torchrun``
would: ``RANK``, ``WORLD_SIZE`` and a free port on localhost), trains one warm-up update, then
times ``updates`` more between two barriers. The figure is all ranks' env steps over the wall
time of the slowest. Rows: one process with ``num_envs`` envs; one process with ``processes`` x
``num_envs`` (the same total as the distributed run: what one process does with the whole
batch); ``processes`` processes with ``num_envs`` each (``--num-envs`` of all of them together:
``processes`` x ``num_envs``). The ideal of the last against the first is ``processes`` x. The
three run in turn, several rounds, and each row reports its median round. Env steps per
CPU-second (all ranks' CPU time) tell the cost of the distribution itself apart from how many
cores a shared machine gave the run: with c free cores the run can reach about
``min(processes, c)`` x that figure.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from agents import distributed as dist
from agents.ppo import PPO, PPOConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_rank(
    rank: int, world: int, port: int, total_envs: int, updates: int, task: str, results: Any
) -> None:
    """One rank of a timed run; puts ``(env steps, wall seconds, CPU seconds)`` on ``results``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        model = PPO(
            "TextGen-v0", PPOConfig(), num_envs=total_envs, env_kwargs={"task": task}, device="cpu", seed=0
        )
        rollout = model._rollout_size()
        assert rollout is not None
        model.learn(rollout)  # warm-up: first-call costs, the env's first episodes
        dist.barrier()
        start, cpu, steps = time.perf_counter(), time.process_time(), model.num_timesteps
        model.learn(rollout * updates, reset_num_timesteps=False)
        cpu = time.process_time() - cpu  # before the barrier: this rank's own work
        dist.barrier()
        results.put((model.num_timesteps - steps, time.perf_counter() - start, cpu))
    finally:
        dist.close()


def _timed_run(processes: int, total_envs: int, updates: int, task: str) -> dict[str, Any]:
    context = torch_mp.get_context("spawn")
    results = context.SimpleQueue()
    torch_mp.spawn(
        _train_rank,
        args=(processes, _free_port(), total_envs, updates, task, results),
        nprocs=processes,
        join=True,
    )
    ranks = [results.get() for _ in range(processes)]
    steps, seconds, cpu = ranks[0][0], max(r[1] for r in ranks), sum(r[2] for r in ranks)
    return {
        "processes": processes,
        "num_envs": total_envs,
        "envs_per_process": total_envs // processes,
        "env_steps": steps,  # of all ranks
        "seconds": seconds,
        "env_steps_per_second": steps / seconds,
        "cpu_seconds": cpu,  # of all ranks together
        "env_steps_per_cpu_second": steps / cpu,
    }


def ddp_speed(
    processes: int = 2, num_envs: int = 64, updates: int = 8, task: str = "default", rounds: int = 3
) -> dict[str, Any]:
    """PPO training env steps/s: 1 process x ``num_envs``, 1 process x ``processes * num_envs``,
    and ``processes`` processes x ``num_envs`` each; one torch thread per process. The three run
    in turn, ``rounds`` times (a shared machine's load changes while they run); each row keeps its
    median round."""
    configurations = [(1, num_envs), (1, processes * num_envs), (processes, processes * num_envs)]
    measured = [[_timed_run(p, n, updates, task) for p, n in configurations] for _ in range(rounds)]
    runs = []
    for k in range(len(configurations)):
        by_speed = sorted((m[k] for m in measured), key=lambda r: r["env_steps_per_second"])
        median = dict(by_speed[len(by_speed) // 2])
        median["rounds"] = [r["env_steps_per_second"] for r in (m[k] for m in measured)]
        runs.append(median)
    base = runs[0]["env_steps_per_second"]
    for run in runs:
        run["speedup"] = run["env_steps_per_second"] / base
    return {"task": task, "updates": updates, "rounds": rounds, "cores": os.cpu_count(), "runs": runs}


def format_ddp_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'processes':>9} {'envs (all)':>10} {'envs each':>9} {'env steps/s':>12} {'x 1 process':>11} "
        f"{'per CPU-second':>14}",
    ]
    for r in report["runs"]:
        lines.append(
            f"{r['processes']:>9} {r['num_envs']:>10} {r['envs_per_process']:>9} "
            f"{r['env_steps_per_second']:>12,.0f} {r['speedup']:>10.2f}x {r['env_steps_per_cpu_second']:>14,.0f}"
        )
    lines.append(
        f"(PPO training, one torch thread per process, {report['cores']} cores, gloo; median of "
        f"{report['rounds']} rounds)"
    )
    return "\n".join(lines)
