"""Agent benchmarks, each against its baseline in the same run.

- :func:`rollout_speed`: acting through the KV cache versus recomputing the whole sequence at every
  step, on the batched env with ``max_new_tokens`` generated tokens per episode (``<eos>`` is
  masked out so every episode runs to full length).
- :func:`training_speed`: env steps per second of :class:`agents.ppo.PPO` training, with the split
  between collecting rollouts and updating.
- :func:`sb3_ratio`, :func:`hf_speed`: the custom PPO against SB3 PPO, and a Hugging Face policy
  against the built-in one.
- :func:`seq2seq_speed`: PPO training with the decoder-only policy and with the encoder-decoder
  policy of about the same parameter count.
- :func:`busy_speed`: the main job's training speed on an idle machine and beside one busy
  process per core, for each torch thread setting: whether threads that spin-wait for cores held
  by other processes slow it down (see :mod:`agents.runtime`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.policy import KVCache, Lengths, PolicyConfig, TransformerPolicy, last_real_column, sample_tokens
from agents.ppo import PPO, PPOConfig
from agents.runtime import in_fresh_process, peak_rss_mib
from textgym.benchmark import measure
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
            if mode == "kv_cache":  # as the agents act: the rows' lengths from the host
                logits, _ = cache.step(obs["input_ids"], obs["attention_mask"], P, env.host_view)
            else:
                full, _ = policy(obs["input_ids"], obs["attention_mask"])  # (N, L, V)
                logits = full[rows, last_real_column(obs["attention_mask"])]
            logits[:, eos] = float("-inf")  # every episode runs its full max_new_tokens
            action = sample_tokens(logits.softmax(-1))
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
    warmup_timesteps: int = 0,
) -> dict[str, Any]:
    """Env steps per second of PPO training (rollouts and updates) on ``task``, with ``config``
    (default: ``PPOConfig()``). ``warmup_timesteps``: env steps trained first, untimed, by the
    same agent (first-call costs: a GPU's context and kernels, ``compile_decode``'s compilation)."""
    config = config or PPOConfig()
    model = PPO("TextGen-v0", config, num_envs, {"task": task}, device, seed=0)
    if warmup_timesteps:
        model.learn(warmup_timesteps)
        _sync(model.device)
    before = model.num_timesteps
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
    model.learn(total_timesteps, reset_num_timesteps=not warmup_timesteps)
    seconds = time.perf_counter() - start
    steps = model.num_timesteps - before
    return {
        "num_envs": num_envs,
        "device": str(model.device),
        "env_steps": steps,
        "seconds": seconds,
        "env_steps_per_second": steps / seconds,
        "rollout_share": rollout_s / seconds,
        "update_share": update_s / seconds,
        "final_ep_rew_mean": model.last_stats.get("rollout/ep_rew_mean"),
        "config": config.to_dict(),
    }


def seq2seq_speed(
    total_timesteps: int = 16_384,
    num_envs: int = 64,
    device: str = "cpu",
    task: str = "default",
    rounds: int = 2,
) -> dict[str, Any]:
    """Env steps per second of PPO training (:func:`training_speed`, ``PPOConfig`` defaults) with the
    decoder-only policy (``PolicyConfig()``) and with the encoder-decoder policy of about its
    parameter count (:func:`agents.seq2seq.seq2seq_config_like`). The two alternate for ``rounds``
    rounds and the fastest run of each is kept: other load on the machine only slows a run down."""
    from agents.policy import count_parameters
    from agents.seq2seq import seq2seq_config_like
    from textgym.tasks import make_env_config

    env = make_env_config(task)
    shape = (env.tokenizer.vocab_size, env.seq_len, env.max_prompt_tokens)
    decoder = PolicyConfig()
    policies = {"decoder": decoder, "seq2seq": seq2seq_config_like(decoder, *shape)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in policies}
    for _ in range(rounds):
        for name, policy in policies.items():
            runs[name].append(
                training_speed(total_timesteps, num_envs, device, task, PPOConfig(policy=policy))
            )
    report: dict[str, Any] = {"task": task, "num_envs": num_envs, "total_timesteps": total_timesteps}
    for name, policy in policies.items():
        best = max(runs[name], key=lambda r: r["env_steps_per_second"])
        report[name] = {
            "policy": dataclasses.asdict(policy),
            "parameters": count_parameters(*shape, policy),
            **best,
            "all_env_steps_per_second": [r["env_steps_per_second"] for r in runs[name]],
        }
    report["ratio"] = report["seq2seq"]["env_steps_per_second"] / report["decoder"]["env_steps_per_second"]
    return report


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


# ------------------------------------------------------------------ generation against transformers
GENERATE_PATHS = ("hf_generate", "textgym_generate", "hf_sample", "ppo_acting")


def _benchmark_model(model: str, new_tokens: int, folder: Path) -> tuple[Path, str]:
    """The model folder :func:`generate_speed` loads, and how to describe it.

    ``model`` is a registered name (:data:`textgym.models.MODELS`), a folder, or ``"tiny"``: a
    random GPT-2 built offline in ``folder`` (2 layers, 64 wide, a BPE tokenizer of 1,024 tokens
    trained on the ``reviews`` corpus). A registered model that is not on disk falls back to it.
    """
    from agents.hf import tiny_causal_lm
    from textgym.hf import HFTokenizer, train_bpe_tokenizer
    from textgym.models import MODELS, model_path
    from textgym.tasks import get_task

    if model in MODELS:
        path = model_path(model)
        if (path / "config.json").is_file():
            return path, model
        note = f"tiny GPT-2 built offline ({model} is not at {path}: python scripts/get_model.py {model})"
    elif model == "tiny":
        note = "tiny GPT-2 built offline (random weights)"
    else:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model: {model!r} is neither a folder written by save_pretrained nor one of "
                f"{', '.join([*MODELS, 'tiny'])}"
            )
        return path, str(path)
    task = get_task("reviews")
    tokenizer = train_bpe_tokenizer([*task.corpus, *task.prompts], 1024)
    tokenizer.save_pretrained(folder)
    longest = max(len(HFTokenizer(folder).encode(p)) for p in task.prompts)
    tiny_causal_lm(tokenizer, max_positions=longest + 1 + new_tokens).save_pretrained(folder)
    return folder, note


def _alternating_rounds(
    paths: Mapping[str, Callable[[], Any]], tokens: int, repeats: int, warmup: int, device: torch.device
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Tokens per second of each path, each producing ``tokens`` tokens a call: ``warmup`` untimed
    rounds, then ``repeats`` timed ones, the paths in turn, in order and then in reverse (ABC,
    CBA, ...: a load drifting over the run hits them alike), torch's seed set to 0 before each
    round. Returns, per path, the median, min, max and every run, and each path's last output
    that was not None."""
    import statistics

    outputs: dict[str, Any] = {}
    for _ in range(warmup):
        for name, run in paths.items():
            if (out := run()) is not None:
                outputs[name] = out
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(repeats):
        torch.manual_seed(0)
        order = list(paths.items())
        for name, run in order[::-1] if repeat % 2 else order:
            _sync(device)
            start = time.perf_counter()
            out = run()
            _sync(device)
            speeds[name].append(tokens / (time.perf_counter() - start))
            if out is not None:
                outputs[name] = out
    summary = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
        for name, v in speeds.items()
    }
    return summary, outputs


def generate_speed(
    model: str = "smollm2-135m",
    batch: int = 8,
    new_tokens: int = 64,
    dtype: str = "float32",
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Tokens per second of greedy generation by ``transformers`` and through the project's cache,
    on the same model, prompts and batch, in one run.

    Four paths, each producing ``new_tokens`` tokens for each of ``batch`` prompts (the first
    prompts of the ``reviews`` task, repeated if ``batch`` is larger), end of text forbidden so every
    row runs to full length:

    - ``hf_generate``: ``model.generate`` (greedy, ``use_cache=True``, ``min_new_tokens=new_tokens``)
      on the prompts as the policy reads them (``<bos>`` + prompt, left-padded), with its own
      ``DynamicCache``.
    - ``textgym_generate``: :func:`agents.generation.generate` (greedy) with the
      :class:`~agents.hf.HFPolicy` of the same weights, through :class:`~agents.hf.HFKVCache`.
    - ``hf_sample``: ``model.generate`` sampling at temperature 1 from the whole distribution
      (``do_sample=True``, ``top_k=0``, ``top_p=1``): what PPO's acting does, by ``transformers``.
    - ``ppo_acting``: what :meth:`agents.ppo.PPO.collect_rollout` does per token, without the env:
      ``policy.make_cache(batch)``, ``rebuild`` on the prompts, then per token the finiteness
      check, the log-softmax, a sample (:func:`agents.policy.sample_tokens`), the log-probability
      of the sampled token, and ``step``.

    After ``warmup`` untimed rounds, each repeat runs the four in turn, in that order and then
    in reverse, so that a load changing over the run hits them alike; the report gives every repeat, the median, and the
    ratio of medians to ``hf_generate``. ``same_tokens`` is the share of prompts whose two greedy
    completions are identical (float rounding can flip a near tie; the policy also never emits the
    model's special tokens, which ``generate`` may).
    """
    import tempfile

    import torch.nn.functional as F

    from agents.generation import encode_prompts, generate
    from agents.hf import HFConfig, HFPolicy
    from textgym.hf import HFTokenizer
    from textgym.tasks import get_task
    from textgym.tokenizers import NUM_SPECIAL

    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        path, described = _benchmark_model(model, new_tokens, Path(tmp))
        tokenizer = HFTokenizer(path)
        task_prompts = get_task("reviews").prompts
        prompts = [task_prompts[i % len(task_prompts)] for i in range(batch)]
        P = max(len(tokenizer.encode(p)) + 1 for p in prompts)  # <bos> + the longest prompt
        M = new_tokens
        policy = (
            HFPolicy.from_pretrained(path, tokenizer, P + M, options=HFConfig(dtype=dtype)).to(dev).eval()
        )
    causal_lm, eos = policy.causal_lm, tokenizer.eos_id
    hf_eos = tokenizer.hf_special_ids["eos"]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, P, M, dev)
    prompt_length = prompt_mask[:, :P].sum(1).cpu().numpy()  # (batch,)
    hf_ids, hf_mask = policy.model_ids[prompt_ids[:, :P]], prompt_mask[:, :P]  # (B, P) each

    @torch.no_grad()
    def hf_run(**sampling: Any) -> torch.Tensor:
        out = causal_lm.generate(
            input_ids=hf_ids,
            attention_mask=hf_mask,
            max_new_tokens=M,
            min_new_tokens=M,
            use_cache=True,
            eos_token_id=hf_eos,
            pad_token_id=hf_eos,
            **sampling,
        )
        assert out.shape == (batch, P + M), out.shape
        return out

    def hf_generate() -> list[str]:
        return tokenizer.decode_batch((hf_run(do_sample=False)[:, P:] + NUM_SPECIAL).cpu().numpy())

    def hf_sample() -> None:
        hf_run(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    def textgym_generate() -> list[str]:
        return generate(policy, tokenizer, prompts, P, M, "greedy", min_new_tokens=M)

    @torch.no_grad()
    def ppo_acting() -> None:
        ids, mask = prompt_ids.clone(), prompt_mask.clone()
        cache = policy.make_cache(batch, dev)
        logits, _ = cache.rebuild(ids, mask)
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        for t in range(M):
            logits[:, eos] = torch.finfo(logits.dtype).min  # every row runs its full length, as the others
            nonfinite |= ~torch.isfinite(logits).all()  # flagged on the device, read at the end
            log_probs = F.log_softmax(logits, dim=-1)
            action = sample_tokens(log_probs.exp())
            log_probs.gather(1, action.unsqueeze(1))
            ids[:, P + t], mask[:, P + t] = action, 1
            if t + 1 < M:  # the rows' lengths from the host, as the env's host_view gives them
                logits, _ = cache.step(ids, mask, P, Lengths(np.full(batch, t + 1), prompt_length))
        if bool(nonfinite):
            raise RuntimeError("the policy's logits contain NaN or infinity")

    paths: dict[str, Callable[[], Any]] = {
        "hf_generate": hf_generate,
        "textgym_generate": textgym_generate,
        "hf_sample": hf_sample,
        "ppo_acting": ppo_acting,
    }
    speeds, texts = _alternating_rounds(paths, batch * M, repeats, warmup, dev)
    median = {name: speed["median"] for name, speed in speeds.items()}
    same = [a == b for a, b in zip(texts["hf_generate"], texts["textgym_generate"], strict=True)]
    return {
        "benchmark": "generate",
        "model": described,
        "settings": {
            "batch": batch,
            "new_tokens": M,
            "prompt_window": P,
            "dtype": dtype,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
        },
        "tokens_per_second": speeds,
        "ratio_to_hf_generate": {name: median[name] / median["hf_generate"] for name in paths},
        "same_tokens": sum(same) / len(same),
    }


@torch.no_grad()
def hf_decode_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by hand with a ``transformers`` causal LM and a ``DynamicCache``: one
    forward pass over the left-padded prompts ``ids``/``mask`` (B, P), then one pass per token
    with the grown attention mask and each row's next position, the cache filled in place. No
    early end. Returns the tokens (B, ``new_tokens``): the plain decode loop that
    :func:`decode_speed` measures the project's cache against (equal to ``model.generate``'s greedy
    tokens, as its test checks)."""
    from agents.hf import cache_argument
    from textgym.hf import require

    past = require("transformers").DynamicCache(config=model.config)
    cache = {cache_argument(model.base_model): past}
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, P) real tokens before each column
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    next_position = positions[:, -1:] + 1  # (B, 1)
    tokens = torch.empty(ids.shape[0], new_tokens, dtype=torch.long, device=ids.device)
    for t in range(new_tokens):
        tokens[:, t] = out.logits[:, -1].argmax(-1)
        if t + 1 == new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=tokens[:, t : t + 1],
            attention_mask=mask,
            position_ids=next_position,
            use_cache=True,
            **cache,
        )
        next_position = next_position + 1
    return tokens


def decode_speed(
    batch: int = 64,
    new_tokens: int = 64,
    repeats: int = 25,
    warmup: int = 1,
    device: str = "cpu",
    task: str = "default",
    compile: bool = False,
) -> dict[str, Any]:
    """Tokens per second of greedy decoding by the built-in policy through its
    :class:`~agents.policy.KVCache` and by a ``transformers`` GPT-2 of the same shape through a
    plain decode loop (:func:`hf_decode_loop`), on the same prompts, in one run.

    Both models are randomly initialised with the :class:`~agents.policy.PolicyConfig` defaults'
    shape (64 wide, 2 blocks, 4 heads, MLP 4x, exact GELU, the env's vocabulary and observation
    length); the prompts are the ``task``'s first observations from a reset of ``batch`` envs
    (left-padded into the prompt window). ``textgym`` runs what acting runs per token:
    ``cache.step`` on the observation arrays, then the chosen token written into them; ``hf_loop``
    feeds ``past_key_values`` back. Each produces ``new_tokens`` tokens per row. After ``warmup``
    untimed rounds, each repeat runs the two in turn, alternating which goes first; the medians
    and their ratio are reported. ``compile``: a third path, ``textgym_compiled``, the same cache
    with its decoding step compiled (``KVCache(compile=True)``; one cache for every round, compiled
    in the first, which ``warmup`` keeps out of the timing).
    """

    from textgym.hf import require

    transformers = require("transformers")
    dev = resolve_device(device)
    env = TextGenVectorEnv(batch, task=task, max_new_tokens=new_tokens, array_type="torch", device=dev)
    obs, _ = env.reset(seed=0)
    P, L, V = env.prompt_window, env.config.seq_len, int(env.single_action_space.n)
    cfg = PolicyConfig()
    torch.manual_seed(0)
    policy = TransformerPolicy(V, L, cfg).to(dev).eval()
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=V,
            n_positions=L,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.mlp_ratio * cfg.d_model,
            activation_function="gelu",
            bos_token_id=env.tokenizer.bos_id,
            eos_token_id=env.tokenizer.eos_id,
            pad_token_id=env.tokenizer.pad_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    gpt2 = gpt2.to(dev).eval()
    prompt_ids, prompt_mask = obs["input_ids"], obs["attention_mask"]
    prompt_length = prompt_mask[:, :P].sum(1).cpu().numpy()  # (N,)

    @torch.no_grad()
    def decode(cache: KVCache) -> None:
        ids, mask = prompt_ids.clone(), prompt_mask.clone()  # every row starts: the cache refills
        for t in range(new_tokens):  # the rows' lengths from the host, as the agents act
            logits, _ = cache.step(ids, mask, P, Lengths(np.full(len(ids), t), prompt_length))
            ids[:, P + t], mask[:, P + t] = logits.argmax(-1), 1

    def hf_loop() -> None:
        hf_decode_loop(gpt2, prompt_ids[:, :P], prompt_mask[:, :P], new_tokens)

    paths: dict[str, Callable[[], None]] = {
        "textgym": lambda: decode(KVCache(policy, batch, dev)),
        "hf_loop": hf_loop,
    }
    if compile:
        compiled = KVCache(policy, batch, dev, compile=True)
        paths["textgym_compiled"] = lambda: decode(compiled)
    speeds, _ = _alternating_rounds(paths, batch * new_tokens, repeats, warmup, dev)
    median = {name: speed["median"] for name, speed in speeds.items()}
    return {
        "benchmark": "decode",
        "settings": {
            "batch": batch,
            "new_tokens": new_tokens,
            "prompt_window": P,
            "task": task,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
        },
        "parameters": {
            "textgym": sum(p.numel() for p in policy.parameters()),
            "hf_loop": sum(p.numel() for p in gpt2.parameters()),
            **({"textgym_compiled": sum(p.numel() for p in policy.parameters())} if compile else {}),
        },
        "tokens_per_second": speeds,
        "ratio": median["textgym"] / median["hf_loop"],
        **({"ratio_compiled": median["textgym_compiled"] / median["hf_loop"]} if compile else {}),
    }


def format_decode_table(report: dict[str, Any]) -> str:
    """The report of :func:`decode_speed` as a Markdown table."""
    s, speeds = report["settings"], report["tokens_per_second"]
    lines = [
        f"Greedy decoding, batch {s['batch']}, {s['new_tokens']} new tokens, {s['device']}, "
        f"{s['threads']} thread(s), median of {s['repeats']}:",
        "",
        "| path | weights | tokens/s | × hf_loop |",
        "|---|---:|---:|---:|",
    ]
    for name in speeds:
        ratio = speeds[name]["median"] / speeds["hf_loop"]["median"]
        lines.append(
            f"| {name} | {report['parameters'][name]:,} | {speeds[name]['median']:,.0f} | {ratio:.2f}× |"
        )
    return "\n".join(lines)


def shared_prompt_speed(
    task: str = "default",
    policy: Mapping[str, Any] | None = None,
    num_envs: int = 64,
    group_size: int = 8,
    repeats: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Seconds of one GRPO update on one rollout with each group's prompt run once (the shared
    passes of :func:`agents.policy.hidden_from`) and with whole passes, alternating, from the
    same weights each time (restored after every update), after one untimed update of each.

    :param policy: :class:`~agents.policy.PolicyConfig` fields of the built-in policy (default:
        its defaults).
    """
    import statistics

    from agents.grpo import GRPO, GRPOConfig

    dev = resolve_device(device)
    config = GRPOConfig(group_size=group_size, policy=PolicyConfig(**(policy or {})))
    model = GRPO("TextGen-v0", config, num_envs=num_envs, env_kwargs={"task": task}, device=str(dev), seed=0)
    model.learn(num_envs * 8, progress_bar=False)  # a few updates: a policy that has moved
    rollout = model.collect_rollout()
    shared_prompts = model._shared_prompts
    paths = {"shared": shared_prompts, "whole": lambda *args: None}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    state = model.optimizer.state_dict()
    for repeat in range(repeats + 1):
        order = list(paths.items())
        for name, path in order[::-1] if repeat % 2 else order:
            model._shared_prompts = path  # type: ignore[method-assign]
            _sync(dev)
            start = time.perf_counter()
            model.update(rollout)
            _sync(dev)
            if repeat:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
            model.policy.load_state_dict(weights)
            model.optimizer.load_state_dict(state)
    model._shared_prompts = shared_prompts  # type: ignore[method-assign]
    P = model.prompt_window
    median = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "benchmark": "shared-prompts",
        "settings": {
            "task": task,
            "policy": dataclasses.asdict(config.policy),
            "num_envs": num_envs,
            "group_size": group_size,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
        },
        "mean_prompt_tokens": float(rollout.attention_mask[:, :P].sum(1).float().mean()),
        "mean_completion_tokens": float(rollout.lengths.float().mean()),
        "update_seconds": {
            name: {"median": median[name], "min": min(v), "max": max(v), "runs": v}
            for name, v in seconds.items()
        },
        "speedup": median["whole"] / median["shared"],
    }


REWARD_PATHS = ("text", "ids", "ids_no_text")


def reward_path_speed(
    num_envs: int = 64,
    max_new_tokens: int = 8,
    steps: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    task: str = "default",
) -> dict[str, Any]:
    """Env steps per second of the batched env scoring every episode with a learned reward model
    by three paths, on the same random actions, in one run:

    - ``text``: the finished episodes decoded to text and the model's text form called, which
      encodes them again (what every learned reward did before it scored ids);
    - ``ids``: the model scores the episodes' ids where they are (:class:`~textgym.rewards.TokenRewardModel`),
      the infos still carry the text (``text_infos=True``, the default);
    - ``ids_no_text``: the same with ``text_infos=False``: no text decoded at all.

    The reward network is a randomly initialised :class:`~textgym.learned.RewardNet` of the
    :class:`~agents.policy.PolicyConfig` defaults' shape (its scores do not change the speed).
    No policy runs: actions are uniform draws of allowed tokens (``<eos>`` among them), so the
    figures are the env's own. Each path runs ``steps`` steps of ``num_envs`` rows per round;
    rounds alternate the paths' order (:func:`_alternating_rounds`).
    """
    import tempfile

    from agents.reward_model import save_reward_model
    from textgym.learned import LearnedReward, RewardNet
    from textgym.rewards import FunctionReward

    dev = resolve_device(device)
    probe = TextGenVectorEnv(1, task=task, max_new_tokens=max_new_tokens)
    tok, L = probe.tokenizer, probe.config.seq_len
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reward_model(
            Path(tmp) / "reward.pt", RewardNet(tok.vocab_size, L), {"task": task, "tokenizer": None}, tok
        )
        learned = LearnedReward(path, device=str(dev))
    text_form = FunctionReward(learned.score, batched=True, name="learned, as text")
    envs = {
        "text": TextGenVectorEnv(
            num_envs, task=task, max_new_tokens=max_new_tokens, reward=text_form, device=dev
        ),
        "ids": TextGenVectorEnv(
            num_envs, task=task, max_new_tokens=max_new_tokens, reward=learned, device=dev
        ),
        "ids_no_text": TextGenVectorEnv(
            num_envs, task=task, max_new_tokens=max_new_tokens, reward=learned, device=dev, text_infos=False
        ),
    }
    assert not envs["text"]._core.ids_reward and envs["ids"]._core.ids_reward
    allowed = torch.tensor(probe.config.action_mask).nonzero().squeeze(1).to(dev)  # (A,)
    gen = torch.Generator(device=dev)

    def run(env: TextGenVectorEnv) -> float:
        gen.manual_seed(0)
        env.reset(seed=0)
        total = 0.0
        for _ in range(steps):
            actions = allowed[torch.randint(len(allowed), (num_envs,), generator=gen, device=dev)]
            total += float(env.step(actions)[1].sum())
        return total

    paths = {name: (lambda env=env: run(env)) for name, env in envs.items()}
    speeds, totals = _alternating_rounds(paths, steps * num_envs, repeats, warmup, dev)
    median = {name: speed["median"] for name, speed in speeds.items()}
    return {
        "benchmark": "reward-ids",
        "settings": {
            "num_envs": num_envs,
            "max_new_tokens": max_new_tokens,
            "steps": steps,
            "task": task,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
        },
        "env_steps_per_second": speeds,
        "reward_totals": totals,  # the same actions score the same by every path
        "ratio": {name: median[name] / median["text"] for name in REWARD_PATHS},
    }


def format_reward_path_table(report: dict[str, Any]) -> str:
    """The report of :func:`reward_path_speed` as a Markdown table."""
    s, speeds = report["settings"], report["env_steps_per_second"]
    lines = [
        f"Learned reward, {s['num_envs']} envs, {s['max_new_tokens']} new tokens, task {s['task']}, "
        f"{s['device']}, {s['threads']} thread(s), median of {s['repeats']}:",
        "",
        "| path | env steps/s | min – max | × text |",
        "|---|---:|---:|---:|",
    ]
    for name in REWARD_PATHS:
        v = speeds[name]
        lines.append(
            f"| {name} | {v['median']:,.0f} | {v['min']:,.0f} – {v['max']:,.0f} | {report['ratio'][name]:.2f}× |"
        )
    return "\n".join(lines)


def format_generate_table(report: dict[str, Any]) -> str:
    """The report of :func:`generate_speed` as a Markdown table."""
    s = report["settings"]
    lines = [
        f"{report['model']}, batch {s['batch']}, {s['new_tokens']} new tokens, {s['dtype']}, "
        f"{s['threads']} thread(s) on {s['device']}; median of {s['repeats']} repeats:",
        "",
        "| path | tokens/s (median) | min – max | vs generate |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "hf_generate": "transformers `generate`",
        "textgym_generate": "`agents.generation.generate`",
        "hf_sample": "transformers `generate`, sampled",
        "ppo_acting": "PPO acting (`make_cache`, sampled)",
    }
    for name, label in names.items():
        t = report["tokens_per_second"][name]
        ratio = report["ratio_to_hf_generate"][name]
        lines.append(f"| {label} | {t['median']:,.1f} | {t['min']:,.1f} – {t['max']:,.1f} | {ratio:.2f}× |")
    lines.append("")
    lines.append(f"greedy completions identical to generate's: {report['same_tokens']:.0%} of prompts")
    return "\n".join(lines)


# ------------------------------------------------------------------ memory of PPO on a causal LM
MEMORY_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "float32": ({}, {}),
    "bf16_autocast": ({"autocast": True}, {}),
    "checkpointing": ({"gradient_checkpointing": True}, {}),
    "micro_batches": ({}, {"micro_batch_size": 2}),
    "lora": ({"lora_rank": 16}, {}),
    "lora_checkpointing": ({"lora_rank": 16, "gradient_checkpointing": True}, {}),
    "lora_bf16": ({"lora_rank": 16, "dtype": "bfloat16"}, {}),
    "lora_bf16_checkpointing_micro": (
        {"lora_rank": 16, "dtype": "bfloat16", "gradient_checkpointing": True},
        {"micro_batch_size": 2},
    ),
}
""":func:`memory_benchmark`'s configurations: (:class:`agents.hf.HFConfig` fields, PPOConfig fields
replaced in :meth:`PPOConfig.pretrained`). Full fine-tuning unless ``lora_rank`` is given."""


def _memory_in_process(
    path: str,
    hf_fields: dict[str, Any],
    ppo_fields: dict[str, Any],
    num_envs: int,
    n_steps: int,
    max_new_tokens: int,
    iterations: int,
    warmup: int,
    device: str,
    threads: int,
) -> dict[str, Any]:
    """Child process of :func:`memory_benchmark`: one configuration, ``warmup`` + ``iterations``
    PPO iterations, its own memory high-water mark."""
    from agents.hf import HFConfig
    from agents.runtime import set_threads

    in_effect = set_threads(threads)
    dev = resolve_device(device)
    env_kwargs = {
        "task": "reviews",
        "tokenizer": path,
        "reward": "vader",
        "max_new_tokens": max_new_tokens,
    }
    config = PPOConfig.pretrained(lora="lora_rank" in hf_fields, n_steps=n_steps, **ppo_fields)
    model = PPO(
        "TextGen-v0",
        config,
        num_envs,
        env_kwargs,
        device,
        0,
        policy_model=path,
        hf_config=HFConfig(**hf_fields),
    )
    loaded = peak_rss_mib()
    per_iteration = n_steps * num_envs
    if warmup:
        model.learn(warmup * per_iteration)  # first-call costs: allocation, lazy initialisation
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    start = time.perf_counter()
    model.learn(iterations * per_iteration, reset_num_timesteps=not warmup)
    _sync(dev)
    seconds = (time.perf_counter() - start) / iterations
    trainable = sum(p.numel() for p in model.policy.parameters() if p.requires_grad)
    return {
        "threads": in_effect,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": loaded,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "seconds_per_iteration": seconds,
        "trainable_parameters": trainable,
        "approx_kl": model.last_stats.get("train/approx_kl"),
    }


def memory_benchmark(
    model: str = "smollm2-135m",
    configs: Sequence[str] = tuple(MEMORY_CONFIGS),
    num_envs: int = 16,
    n_steps: int = 16,
    max_new_tokens: int = 16,
    iterations: int = 1,
    warmup: int = 1,
    device: str = "cpu",
    threads: int = 1,
) -> dict[str, Any]:
    """Peak memory and seconds per PPO iteration of fine-tuning a causal LM, per configuration
    (:data:`MEMORY_CONFIGS`): full fine-tuning in float32, under bfloat16 autocast, with activation
    checkpointing, with micro-batches; LoRA alone, with checkpointing, with a bfloat16 base, and
    all of them at once.

    The workload is fixed: task ``reviews`` with the VADER reward, ``num_envs`` envs ×
    ``n_steps`` steps per rollout, ``max_new_tokens`` per completion, :meth:`PPOConfig.pretrained`
    with the KL penalty on (a frozen copy of the model as the reference, or under LoRA the model
    with its adapters off). Each configuration runs in a fresh process (``spawn``): ``warmup``
    untimed iterations, then ``iterations`` timed ones; its peak is that process's RSS high-water
    mark (loading included; ``rss_after_load_mib`` is the mark before the first rollout) and, on
    a GPU, ``torch.cuda.max_memory_allocated`` over the timed iterations. ``model`` as in
    :func:`generate_speed`: a registered model not on disk falls back to a tiny GPT-2 built offline.
    """
    import tempfile

    unknown = [c for c in configs if c not in MEMORY_CONFIGS]
    if unknown or not configs:
        raise ValueError(
            f"configs must be a non-empty subset of {', '.join(MEMORY_CONFIGS)}; got {list(configs)}"
        )
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, described = _benchmark_model(model, max_new_tokens, Path(tmp))
        for name in configs:
            hf_fields, ppo_fields = MEMORY_CONFIGS[name]
            args = (str(path), hf_fields, ppo_fields, num_envs, n_steps, max_new_tokens)
            try:  # a child killed outright (out of memory) is reported, not waited for
                row = in_fresh_process(_memory_in_process, *args, iterations, warmup, device, threads)
            except RuntimeError as error:
                raise RuntimeError(f"memory benchmark {name!r} failed: {error}") from None
            rows[name] = {"hf_config": hf_fields, "ppo_config": ppo_fields, **row}
    return {
        "benchmark": "memory",
        "model": described,
        "settings": {
            "task": "reviews",
            "reward": "vader",
            "num_envs": num_envs,
            "n_steps": n_steps,
            "max_new_tokens": max_new_tokens,
            "iterations": iterations,
            "warmup": warmup,
            "device": str(resolve_device(device)),
            "threads": threads,
        },
        "configs": rows,
    }


def format_memory_table(report: dict[str, Any]) -> str:
    """The report of :func:`memory_benchmark` as a Markdown table."""
    s = report["settings"]
    gpu = any(r["cuda_peak_mib"] is not None for r in report["configs"].values())
    lines = [
        f"{report['model']}, PPO on `reviews` (VADER, KL reference on), {s['num_envs']} envs × "
        f"{s['n_steps']} steps, {s['max_new_tokens']} new tokens, {s['threads']} thread(s) on "
        f"{s['device']}; one fresh process per configuration, {s['iterations']} timed iteration(s) "
        f"after {s['warmup']} warm-up:",
        "",
        "| configuration | trainable parameters | peak RSS | RSS after loading |"
        + (" CUDA peak |" if gpu else "")
        + " s / iteration |",
        "|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|",
    ]
    for name, r in report["configs"].items():
        cuda = f" {r['cuda_peak_mib']:,.0f} MiB |" if gpu else ""
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {r['peak_rss_mib']:,.0f} MiB | "
            f"{r['rss_after_load_mib']:,.0f} MiB |{cuda} {r['seconds_per_iteration']:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the GPU against the CPU
def env_speed(num_envs: int, device: str = "cpu", seconds: float = 2.0, max_new_tokens: int = 16) -> float:
    """Env steps per second of the batched env alone, its actions drawn on its own device.

    :func:`textgym.benchmark.measure` of :class:`~textgym.vector.TextGenVectorEnv` with torch
    arrays and same-step autoreset on the ``default`` task with the ``length`` reward (computed on
    the device): random actions from a pool drawn in advance on ``device`` (no host transfer per
    step), for ``seconds`` after 20 untimed steps.
    """
    env_kwargs = {
        "max_new_tokens": max_new_tokens,
        "reward": {"name": "length"},
        "array_type": "torch",
        "autoreset_mode": "same_step",
    }
    return measure("batched", num_envs, seconds, env_kwargs, str(resolve_device(device)))[
        "env_steps_per_second"
    ]


def gpu_benchmark(
    devices: Sequence[str] = ("cpu", "cuda"),
    env_sizes: Sequence[int] = (1024, 4096, 16_384),
    train_envs: Sequence[int] = (64, 1024),
    train_updates: int = 2,
    train_configs: Sequence[Mapping[str, Any]] = ({}, {"compile_decode": True}, {"autocast": True}),
    model: str = "smollm2-135m",
    lm_batch: int = 32,
    lm_new_tokens: int = 64,
    lm_dtypes: Sequence[str] = ("float32", "bfloat16"),
    repeats: int = 2,
    seconds: float = 2.0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The same measurements on each of ``devices`` in one run, and their ratios to the first.

    - ``env``: :func:`env_speed` at each of ``env_sizes``.
    - ``train``: :func:`training_speed` of PPO (``default`` task, built-in policy) with each of
      ``train_envs`` envs, for ``train_updates`` updates after one untimed update of the same
      agent (first-call costs: CUDA context, kernel selection, allocator, compilation), once per
      entry of ``train_configs``: :class:`PPOConfig` fields over its defaults (``{}``: the
      defaults; by default also the compiled, on a GPU graphed, decoding step and bfloat16
      autocast).
    - ``lm``: tokens per second of a causal LM (``model`` as in :func:`generate_speed`) in PPO's
      acting loop (sampled, through the project's KV cache) and in ``transformers`` ``generate``
      (sampled and greedy), ``lm_batch`` prompts × ``lm_new_tokens`` tokens, median of ``repeats`` after one
      warm-up, for each of ``lm_dtypes`` (weights in that precision).

    Each row holds env steps (or tokens) per second per device; ``ratio`` divides each device's
    figure by the first device's.
    """
    devs = list(dict.fromkeys(str(resolve_device(d)) for d in devices))  # each device once, in order
    if not devs:
        raise ValueError("devices: give at least one, for example ['cpu', 'cuda']")
    rows: list[dict[str, Any]] = []

    def add(kind: str, setting: str, speeds: dict[str, float], unit: str) -> None:
        base = speeds[devs[0]]
        row = {"kind": kind, "setting": setting, "unit": unit, "per_device": speeds}
        row["ratio"] = {d: s / base for d, s in speeds.items()}
        rows.append(row)
        cells = "  ".join(f"{d} {s:,.0f}" for d, s in speeds.items())
        progress(f"{kind:>5}  {setting:<28} {cells}  ({unit})")

    configs = [PPOConfig.from_dict(fields) for fields in train_configs]  # refused before any work
    for n in env_sizes:
        add("env", f"N={n:,}", {d: env_speed(n, d, seconds) for d in devs}, "env steps/s")
    for n in train_envs:
        for fields, config in zip(train_configs, configs, strict=True):
            speeds = {}
            for d in devs:
                per_update = config.n_steps * n
                timed = training_speed(train_updates * per_update, n, d, "default", config, per_update)
                speeds[d] = timed["env_steps_per_second"]
            setting = ", ".join([f"PPO, {n:,} envs", *(f"{k}={v}" for k, v in fields.items())])
            add("train", setting, speeds, "env steps/s")
    for dtype in lm_dtypes:
        reports = {d: generate_speed(model, lm_batch, lm_new_tokens, dtype, repeats, 1, d) for d in devs}
        described = next(iter(reports.values()))["model"]
        paths = (
            ("ppo_acting", "PPO acting"),
            ("hf_sample", "generate, sampled"),
            ("hf_generate", "generate"),
        )
        for path, label in paths:
            speeds = {d: r["tokens_per_second"][path]["median"] for d, r in reports.items()}
            add("lm", f"{label}, {dtype}, batch {lm_batch}", speeds, "tokens/s")
    names = {d: torch.cuda.get_device_name(torch.device(d)) if d.startswith("cuda") else "cpu" for d in devs}
    return {
        "benchmark": "gpu",
        "model": described if lm_dtypes else None,
        "devices": names,
        "settings": {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "env_sizes": list(env_sizes),
            "train_envs": list(train_envs),
            "train_updates": train_updates,
            "train_configs": [dict(fields) for fields in train_configs],
            "lm_batch": lm_batch,
            "lm_new_tokens": lm_new_tokens,
            "repeats": repeats,
            "seconds": seconds,
        },
        "rows": rows,
    }


def format_gpu_table(report: dict[str, Any]) -> str:
    """The report of :func:`gpu_benchmark` as a Markdown table."""
    s, devs = report["settings"], list(report["devices"])
    first = devs[0]
    columns = ["measurement", "unit", *(f"{d} ({report['devices'][d]})" for d in devs)]
    columns += [f"{d} / {first}" for d in devs[1:]]
    lines = [
        f"torch {s['torch']}, {s['torch_threads']} CPU thread(s) of {s['cpu_count']} cores"
        + (f"; causal LM: {report['model']}" if report["model"] else ""),
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * (len(columns) - 2),
    ]
    for r in report["rows"]:
        cells = [f"{r['kind']}: {r['setting']}", r["unit"], *(f"{r['per_device'][d]:,.0f}" for d in devs)]
        cells += [f"{r['ratio'][d]:.1f}×" for d in devs[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
