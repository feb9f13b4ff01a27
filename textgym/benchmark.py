"""Throughput of the environment's faces, measured side by side in one run.

Every face is driven the same way: a random policy whose actions come from one pre-drawn pool
(so drawing actions costs the same everywhere), the same task and reward, a warm-up, then as
many steps as fit in a fixed wall-clock budget. The figure is env steps per second (one env step
= one token for one episode). The vector faces are measured at each batch size N:

- ``single``:  ``gym.make("TextGen-v0")``, one env, N = 1
- ``sync``:    ``gym.make_vec(..., vectorization_mode="sync")``: N single envs stepped in Python
- ``async``:   ``gym.make_vec(..., vectorization_mode="async")``: N single envs in N processes
- ``batched``: ``gym.make_vec("TextGen-v0", num_envs=N)``: one batch of tensor operations

Each measurement also reports the share of its time spent decoding finished episodes to text
and in the reward model (both summed over sub-envs for ``sync``; not visible inside ``async``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

FACES = ("single", "sync", "async", "batched")


def _make(face: str, num_envs: int, env_kwargs: Mapping[str, Any], device: str) -> Any:
    if face == "single":
        return gym.make("TextGen-v0", **env_kwargs)
    if face in ("sync", "async"):
        return gym.make_vec("TextGen-v0", num_envs=num_envs, vectorization_mode=face, **env_kwargs)
    return gym.make_vec("TextGen-v0", num_envs=num_envs, device=device, **env_kwargs)


def _core_timings(env: Any, face: str) -> dict[str, float] | None:
    if face == "single":
        return dict(env.unwrapped._core.timings)
    if face == "sync":
        total = {"decode": 0.0, "reward": 0.0}
        for sub in env.envs:
            for key, value in sub.unwrapped._core.timings.items():
                total[key] += value
        return total
    if face == "batched":
        return dict(env._core.timings)
    return None  # inside other processes


def measure(
    face: str,
    num_envs: int = 1,
    seconds: float = 3.0,
    env_kwargs: Mapping[str, Any] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Env steps per second of one face at one batch size, with its time split.

    :param face: one of ``single``, ``sync``, ``async``, ``batched``.
    :param num_envs: episodes stepped together (ignored for ``single``).
    :param seconds: wall-clock budget of the timed part.
    """
    if face not in FACES:
        raise ValueError(f"face must be one of {', '.join(FACES)}, got {face!r}")
    env_kwargs = dict(env_kwargs or {})
    n = 1 if face == "single" else num_envs
    env = _make(face, n, env_kwargs, device)
    try:
        vocab = env.action_space.n if face == "single" else env.single_action_space.n
        pool = np.random.default_rng(seed).integers(0, vocab, size=(64, n))  # (64, n) actions
        if getattr(env, "array_type", "numpy") == "torch":  # drawn where the env steps: no transfer per step
            pool = torch.as_tensor(pool, device=env.device)
        if face == "single":
            env.reset(seed=seed)

            def step(actions: np.ndarray) -> None:
                _, _, terminated, truncated, _ = env.step(actions[0])
                if terminated or truncated:
                    env.reset()
        else:
            env.reset(seed=seed)

            def step(actions: np.ndarray) -> None:
                env.step(actions)

        for i in range(20):  # warm-up
            step(pool[i % 64])
        before = _core_timings(env, face)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(8):
                step(pool[steps % 64])
                steps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        after = _core_timings(env, face)
    finally:
        env.close()
    result: dict[str, Any] = {
        "face": face,
        "num_envs": n,
        "steps": steps,
        "seconds": elapsed,
        "env_steps_per_second": steps * n / elapsed,
    }
    if before is not None and after is not None:
        for key in ("decode", "reward"):
            result[f"{key}_share"] = (after[key] - before[key]) / elapsed
    return result


def run_env_benchmark(
    sizes: Iterable[int] = (16, 256, 1024),
    seconds: float = 3.0,
    async_max: int = 16,
    device: str = "cpu",
    env_kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every face at every size; ``async`` only up to ``async_max`` processes.

    Returns a JSON-ready dict with the machine, the settings, every measurement and the ratios
    batched/sync and batched/single at each size.
    """
    env_kwargs = dict(env_kwargs or {"reward": {"name": "length"}})
    rows = [measure("single", 1, seconds, env_kwargs, device)]
    progress(_row_text(rows[-1]))
    for n in sizes:
        for face in ("sync", "async", "batched"):
            if face == "async" and n > async_max:
                continue
            rows.append(measure(face, n, seconds, env_kwargs, device))
            progress(_row_text(rows[-1]))
    single = rows[0]["env_steps_per_second"]
    by = {(r["face"], r["num_envs"]): r["env_steps_per_second"] for r in rows}
    ratios = {
        str(n): {
            "batched_over_sync": by[("batched", n)] / by[("sync", n)],
            "batched_over_single": by[("batched", n)] / single,
        }
        for n in sizes
    }
    return {
        "benchmark": "env",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        },
        "settings": {"seconds": seconds, "env_kwargs": _jsonable(env_kwargs), "async_max": async_max},
        "results": rows,
        "ratios": ratios,
    }


def _row_text(row: Mapping[str, Any]) -> str:
    split = ""
    if "decode_share" in row:
        split = f"  decode {row['decode_share']:5.1%}  reward {row['reward_share']:5.1%}"
    return f"{row['face']:>8} N={row['num_envs']:<6} {row['env_steps_per_second']:>12,.0f} env steps/s{split}"


def format_env_table(report: Mapping[str, Any]) -> str:
    """A Markdown table of an env benchmark report."""
    rows = report["results"]
    by = {(r["face"], r["num_envs"]): r for r in rows}
    single = by[("single", 1)]["env_steps_per_second"]
    lines = [
        "| face | N | env steps/s | × sync (same N) | decode | reward model |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sync = by.get(("sync", r["num_envs"]))
        ratio = f"{r['env_steps_per_second'] / sync['env_steps_per_second']:.1f}×" if sync else "—"
        if r["face"] == "single":
            ratio = "—"
        dec = f"{r['decode_share']:.0%}" if "decode_share" in r else "n/a"
        rew = f"{r['reward_share']:.0%}" if "reward_share" in r else "n/a"
        lines.append(
            f"| {r['face']} | {r['num_envs']} | {r['env_steps_per_second']:,.0f} | {ratio} | {dec} | {rew} |"
        )
    lines.append(f"\nsingle env: {single:,.0f} env steps/s")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))
