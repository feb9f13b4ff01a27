"""Agent benchmarks, each against its baseline in the same run.

- :func:`rollout_speed`: acting through the KV cache versus recomputing the whole sequence at every
  step, on the batched env with ``max_new_tokens`` generated tokens per episode (``<eos>`` is
  masked out so every episode runs to full length).
- :func:`training_speed`: env steps per second of :class:`agents.ppo.PPO` training, with the split
  between collecting rollouts and updating.
- :func:`sb3_ratio`, :func:`hf_speed`: the custom PPO against SB3 PPO, and a Hugging Face policy
  against the built-in one.
- :func:`busy_speed`: the main job's training speed on an idle machine and beside one busy
  process per core, for each torch thread setting: whether threads that spin-wait for cores held
  by other processes slow it down (see :mod:`agents.runtime`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from agents.policy import KVCache, PolicyConfig, TransformerPolicy, last_real_column
from agents.ppo import PPO, PPOConfig
from textgym.core import resolve_device
from textgym.vector import TextGenVectorEnv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def rollout_speed(
    num_envs: int = 64,
    max_new_tokens: int = 64,
    episodes: int = 2,
    device: str = "cpu",
    task: str = "default",
) -> dict[str, Any]:
    """Env steps per second of sampling rollouts with the KV cache and with full recompute."""
    dev = resolve_device(device)
    env_kwargs = {"task": task, "max_new_tokens": max_new_tokens, "reward": {"name": "length"}}
    results: dict[str, Any] = {"num_envs": num_envs, "max_new_tokens": max_new_tokens, "device": str(dev)}
    for mode in ("recompute", "kv_cache"):
        env = TextGenVectorEnv(
            num_envs, device=dev, autoreset_mode="same_step", array_type="torch", **env_kwargs
        )
        torch.manual_seed(0)
        policy = (
            TransformerPolicy(env.single_action_space.n, env.config.seq_len, PolicyConfig()).to(dev).eval()
        )
        cache = KVCache(policy, num_envs, dev)
        eos, P = env.tokenizer.eos_id, env.prompt_window
        obs, _ = env.reset(seed=0)
        rows = torch.arange(num_envs, device=dev)
        steps = episodes * max_new_tokens
        _sync(dev)
        start = time.perf_counter()
        for _ in range(steps):
            if mode == "kv_cache":
                logits, _ = cache.step(obs["input_ids"], obs["attention_mask"], P)
            else:
                full, _ = policy(obs["input_ids"], obs["attention_mask"])  # (N, L, V)
                logits = full[rows, last_real_column(obs["attention_mask"])]
            logits[:, eos] = float("-inf")  # every episode runs its full max_new_tokens
            action = torch.distributions.Categorical(logits=logits).sample()
            obs, *_ = env.step(action)
        _sync(dev)
        results[mode] = steps * num_envs / (time.perf_counter() - start)
    results["speedup"] = results["kv_cache"] / results["recompute"]
    return results


def training_speed(
    total_timesteps: int = 16_384,
    num_envs: int = 64,
    device: str = "cpu",
    task: str = "default",
    config: PPOConfig | None = None,
) -> dict[str, Any]:
    """Env steps per second of PPO training (rollouts and updates) on ``task``."""
    model = PPO("TextGen-v0", config or PPOConfig(), num_envs, {"task": task}, device, seed=0)
    rollout_s = update_s = 0.0
    collect, update = model.collect_rollout, model.update

    def timed_collect() -> Any:
        nonlocal rollout_s
        start = time.perf_counter()
        out = collect()
        _sync(model.device)
        rollout_s += time.perf_counter() - start
        return out

    def timed_update(*args: Any) -> Any:
        nonlocal update_s
        start = time.perf_counter()
        out = update(*args)
        _sync(model.device)
        update_s += time.perf_counter() - start
        return out

    model.collect_rollout, model.update = timed_collect, timed_update  # type: ignore[method-assign]
    start = time.perf_counter()
    model.learn(total_timesteps)
    seconds = time.perf_counter() - start
    return {
        "num_envs": num_envs,
        "device": str(model.device),
        "env_steps": model.num_timesteps,
        "seconds": seconds,
        "env_steps_per_second": model.num_timesteps / seconds,
        "rollout_share": rollout_s / seconds,
        "update_share": update_s / seconds,
        "final_ep_rew_mean": model.last_stats.get("rollout/ep_rew_mean"),
    }


def sb3_ratio(
    total_timesteps: int = 8192,
    num_envs: int = 64,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    task: str = "default",
    profile: str | None = None,
) -> dict[str, Any]:
    """Env steps per second of the custom PPO and of SB3 PPO at matched settings.

    Both train the same Transformer (:class:`~agents.policy.PolicyConfig` defaults; SB3 through
    :class:`~agents.extractor.TransformerExtractor`) on the same env with ``num_envs`` envs, 32
    steps per rollout, 4 epochs and 4 minibatches of 512 transitions (at 64 envs), for
    ``total_timesteps`` env steps each. ``profile`` names a file for a cProfile report (sorted by
    cumulative time) of the SB3 run, to see where its time goes.
    """
    from agents.baselines import make_sb3_model

    env_kwargs: dict[str, Any] = {"task": task}
    if max_new_tokens is not None:
        env_kwargs["max_new_tokens"] = max_new_tokens
    batch = 32 * num_envs // 4
    config = PPOConfig(n_steps=32, n_epochs=4, num_minibatches=4)
    model = PPO("TextGen-v0", config, num_envs, env_kwargs, device, seed=0)
    start = time.perf_counter()
    model.learn(total_timesteps)
    _sync(model.device)
    custom_s = time.perf_counter() - start
    custom = model.num_timesteps / custom_s

    sb3 = make_sb3_model(
        "sb3-ppo",
        env_kwargs,
        num_envs,
        seed=0,
        device=device,
        hyperparams={"n_steps": 32, "batch_size": batch, "n_epochs": 4},
    )
    profiler = None
    if profile is not None:
        import cProfile

        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    sb3.learn(total_timesteps)
    _sync(model.device)
    sb3_s = time.perf_counter() - start
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
        with open(profile, "w") as f:
            f.write(out.getvalue())
    return {
        "num_envs": num_envs,
        "seq_len": model.seq_len,
        "max_new_tokens": model.env.config.max_new_tokens,
        "device": str(model.device),
        "settings": {"n_steps": 32, "n_epochs": 4, "minibatch_transitions": batch, **config.policy.__dict__},
        "custom_ppo": custom,
        "custom_env_steps": model.num_timesteps,
        "sb3_ppo": sb3.num_timesteps / sb3_s,
        "sb3_env_steps": sb3.num_timesteps,
        "ratio": custom / (sb3.num_timesteps / sb3_s),
    }


def hf_speed(
    total_timesteps: int = 8192,
    num_envs: int = 64,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    task: str = "sentiment",
) -> dict[str, Any]:
    """PPO training env steps per second with a Hugging Face policy, against the built-in one.

    A byte-level BPE tokenizer (1024 tokens) is trained on the task's corpus and a randomly
    initialised ``transformers`` GPT-2 of the built-in policy's size (64 wide, 2 layers, 4 heads,
    MLP 4x) is saved in a temporary directory. Three PPO runs of ``total_timesteps`` on the same
    env and tokens: the built-in :class:`~agents.policy.TransformerPolicy`, the GPT-2 as
    :class:`~agents.hf.HFPolicy` acting through :class:`~agents.hf.HFKVCache`, and the GPT-2
    recomputing the whole observation at every step (:class:`~agents.hf.RecomputeCache`).
    """
    import tempfile

    from agents.hf import RecomputeCache, tiny_causal_lm
    from textgym.hf import train_bpe_tokenizer
    from textgym.tasks import get_task

    base = get_task(task)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer([*base.corpus, *base.prompts], 1024)
        tokenizer.save_pretrained(tmp)
        tiny_causal_lm(tokenizer, max_positions=128).save_pretrained(tmp)
        env_kwargs: dict[str, Any] = {"task": task, "tokenizer": tmp}
        if max_new_tokens is not None:
            env_kwargs["max_new_tokens"] = max_new_tokens
        for name in ("builtin", "hf_kv_cache", "hf_recompute"):
            torch.manual_seed(0)
            model = PPO(
                "TextGen-v0",
                PPOConfig(),
                num_envs,
                env_kwargs,
                device,
                seed=0,
                policy_model=None if name == "builtin" else tmp,
            )
            if name == "hf_recompute":
                model._cache = RecomputeCache(model.policy)
            start = time.perf_counter()
            model.learn(total_timesteps)
            _sync(model.device)
            results[name] = model.num_timesteps / (time.perf_counter() - start)
        seq_len, new_tokens = model.seq_len, model.env.config.max_new_tokens
    return {
        "num_envs": num_envs,
        "seq_len": seq_len,
        "max_new_tokens": new_tokens,
        "device": str(model.device),
        **results,
        "kv_cache_vs_recompute": results["hf_kv_cache"] / results["hf_recompute"],
        "hf_vs_builtin": results["hf_kv_cache"] / results["builtin"],
    }


# ------------------------------------------------------------------------------ busy machine
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _train_in_process(
    results: Any, threads: int, updates: int, num_envs: int, task: str, device: str
) -> None:
    """Child process of :func:`busy_speed`: time ``updates`` PPO updates after one warm-up."""
    from agents.runtime import set_threads

    in_effect = set_threads(threads)
    model = PPO("TextGen-v0", PPOConfig(), num_envs, {"task": task}, device, seed=0)
    per_update = model.config.n_steps * num_envs
    model.learn(per_update)  # warm-up: first-call costs (allocation, lazy initialisation)
    start = time.perf_counter()
    model.learn(updates * per_update, reset_num_timesteps=False)
    _sync(model.device)
    seconds = time.perf_counter() - start
    results.put({"threads": in_effect, "env_steps": updates * per_update, "seconds": seconds})


def _spin(deadline: float, ready: Any) -> None:
    """Keep one core busy in pure Python until ``deadline`` (time.time()), as another job would."""
    ready.release()
    x = 0
    while True:
        for _ in range(100_000):
            x += 1
        if time.time() > deadline:
            return


@contextmanager
def _without_thread_env() -> Iterator[None]:
    """Children started inside get torch's own default thread count, whatever OMP_NUM_THREADS says here."""
    saved = {k: os.environ.pop(k) for k in _THREAD_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def busy_speed(
    thread_settings: Sequence[int] = (1, 0),
    updates: int = 3,
    num_envs: int = 64,
    task: str = "default",
    device: str = "cpu",
    busy_processes: int | None = None,
    timeout: float = 600.0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Env steps per second of the main job (custom PPO, ``PPOConfig`` defaults, ``num_envs`` envs,
    ``task``) on an idle machine and beside ``busy_processes`` (default: one per core) processes
    spinning in pure Python, for each torch thread setting (0: torch's default, one per core).

    Every measurement runs in a fresh process (thread counts cannot be lowered reliably once
    torch has started its pools) with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` removed from its
    environment, times ``updates`` updates after one warm-up update, and is stopped after
    ``timeout`` seconds (its figure is then None). The busy processes stop themselves after
    ``timeout`` seconds at the latest and are terminated when each measurement ends. The
    ``slowdown`` of a setting is idle env steps/s over busy ones.
    """
    spawn = mp.get_context("spawn")
    fork = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else spawn
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy_processes = cores if busy_processes is None else busy_processes
    rows = []
    for threads in thread_settings:
        row: dict[str, Any] = {"threads_setting": threads}
        for load in ("idle", "busy"):
            spinners = []
            if load == "busy":
                ready = fork.Semaphore(0)
                deadline = time.time() + timeout
                spinners = [
                    fork.Process(target=_spin, args=(deadline, ready), daemon=True)
                    for _ in range(busy_processes)
                ]
                for p in spinners:
                    p.start()
                for _ in spinners:
                    ready.acquire(timeout=60)
            results = spawn.Queue()
            with _without_thread_env():
                child = spawn.Process(
                    target=_train_in_process, args=(results, threads, updates, num_envs, task, device)
                )
                child.start()
            try:
                result = results.get(timeout=timeout)
            except queue.Empty:
                result = None
            finally:
                if child.is_alive():
                    child.join(5)
                if child.is_alive():
                    child.terminate()
                    child.join()
                for p in spinners:
                    p.terminate()
                for p in spinners:
                    p.join()
            speed = None if result is None else result["env_steps"] / result["seconds"]
            row[f"{load}_env_steps_per_second"] = speed
            if result is not None:
                row["threads"] = result["threads"]
                row["env_steps"] = result["env_steps"]
            progress(
                f"threads {threads or 'torch default'}: {load:>4} "
                + ("timed out" if speed is None else f"{speed:,.0f} env steps/s")
            )
        idle, busy = row["idle_env_steps_per_second"], row["busy_env_steps_per_second"]
        row["slowdown"] = idle / busy if idle and busy else None
        rows.append(row)
    return {
        "benchmark": "busy",
        "cores": cores,
        "busy_processes": busy_processes,
        "settings": {"updates": updates, "num_envs": num_envs, "task": task, "device": device},
        "runs": rows,
    }
