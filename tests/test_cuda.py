"""The GPU path: the agents, the KV caches and a Hugging Face policy on a CUDA device, against
the same computation on the CPU. Skipped where there is no CUDA device (CI has none); run on a
GPU machine with ``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from agents.grpo import GRPO, GRPOConfig  # noqa: E402
from agents.policy import KVCache, PolicyConfig, TransformerPolicy, last_real_column  # noqa: E402
from agents.ppo import PPO, PPOConfig  # noqa: E402
from textgym.vector import TextGenVectorEnv  # noqa: E402

CUDA = torch.device("cuda")


def _rollout_logits(
    device: torch.device, steps: int = 12, compile: bool = False, reorder_at: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits through the KV cache and by full recompute along one rollout with autoresets
    (random actions: episodes end at different steps, so rows start apart). ``reorder_at``: at
    that step the cache's rows are reversed, and the env's rows with them (through its
    observations: the recompute reads the reversed ones)."""
    env = TextGenVectorEnv(6, device=device, autoreset_mode="same_step", array_type="torch", max_new_tokens=5)
    torch.manual_seed(0)
    policy = (
        TransformerPolicy(env.single_action_space.n, env.config.seq_len, PolicyConfig()).to(device).eval()
    )
    cache = KVCache(policy, 6, device, compile=compile)
    obs, _ = env.reset(seed=0)
    rows = torch.arange(6, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    cached, full = [], []
    with torch.no_grad():
        for step in range(steps):
            if step == reorder_at:
                reverse = torch.arange(5, -1, -1, device=device)
                cache.reorder(reverse)
                obs = {name: x[reverse] for name, x in obs.items()}
            logits, _ = cache.step(obs["input_ids"], obs["attention_mask"], env.prompt_window)
            whole, _ = policy(obs["input_ids"], obs["attention_mask"])
            cached.append(logits)
            full.append(whole[rows, last_real_column(obs["attention_mask"])])
            if step == reorder_at:
                break  # the env's rows are no longer those of the observations
            action = torch.randint(0, env.single_action_space.n, (6,), device=device, generator=generator)
            obs, *_ = env.step(action)
    return torch.stack(cached), torch.stack(full)


def test_kv_cache_equals_recompute_on_cuda():
    cached, full = _rollout_logits(CUDA)
    assert cached.device.type == "cuda"
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_compiled_decoding_replays_one_cuda_graph_and_equals_recompute():
    """KVCache(compile=True) on CUDA: the compiled step is captured once and replayed, rows
    prefilled eagerly between replays (episodes end apart), with the same logits as recompute;
    no fallback warning."""
    captures = []
    capture = KVCache._replay

    def counted(cache, col, input_ids, attention_mask):
        captures.append(cache._graph is None)
        return capture(cache, col, input_ids, attention_mask)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager decoding fails the test
        KVCache._replay = counted
        try:
            cached, full = _rollout_logits(CUDA, steps=16, compile=True)
        finally:
            KVCache._replay = capture
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert captures.count(True) == 1 and len(captures) >= 10, captures


def test_a_graphed_cache_reorders_its_rows_in_place():
    """reorder on a cache whose step is a captured graph moves the rows within the tensors the
    graph reads: the next replay sees them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cached, full = _rollout_logits(CUDA, steps=16, compile=True, reorder_at=7)
    assert len(cached) == 8
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def _grpo(**config) -> GRPO:
    """GRPO on CUDA, 4 groups of 4 rows on the arithmetic task."""
    return GRPO(
        num_envs=16,
        config=GRPOConfig(group_size=4, **config),
        env_kwargs={"task": "arithmetic"},
        device="cuda",
        seed=0,
    )


@pytest.mark.parametrize("agent", ["ppo", "ppo-seq2seq", "grpo"])
def test_agents_train_on_cuda_and_load_on_the_cpu(agent, tmp_path):
    if agent == "ppo":
        model = PPO(num_envs=16, config=PPOConfig(n_steps=8), device="cuda", seed=0)
    elif agent == "ppo-seq2seq":
        config = PPOConfig(n_steps=8, policy=PolicyConfig(architecture="seq2seq"))
        model = PPO(num_envs=16, config=config, device="cuda", seed=0)
    else:
        model = _grpo()
    model.learn(256)
    assert model.num_timesteps >= 256
    assert all(p.device.type == "cuda" for p in model.policy.parameters())
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    path = model.save(tmp_path / "model.pt")
    cls = GRPO if agent == "grpo" else PPO
    loaded = cls.load(path, device="cpu")
    for (name, a), b in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a.cpu(), b, msg=name)


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_the_built_in_policy_trains_under_bfloat16_autocast_on_cuda(agent):
    """autocast=True on the GPU, with the decoding step compiled and graphed for PPO: the cache
    is bfloat16, the weights stay float32 and finite."""
    if agent == "ppo":
        config = PPOConfig(n_steps=8, autocast=True, compile_decode=True)
        model = PPO(num_envs=16, config=config, device="cuda", seed=0)
    else:
        model = _grpo(autocast=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager decoding
        model.learn(256)
    assert model._cache.keys[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.policy.parameters())


@pytest.mark.parametrize(("agent", "most"), [("ppo", 3), ("grpo", 2)])
def test_an_update_waits_for_the_gpu_a_fixed_number_of_times(agent, most):
    """Not once per minibatch (four epochs of four here for PPO, two of two for GRPO): torch's
    sync debug mode warns at every host sync of the update, as counted on the CPU by
    tests/agents/test_update_syncs.py."""
    if agent == "ppo":
        model = PPO(num_envs=16, config=PPOConfig(n_steps=8), device="cuda", seed=0)
    else:
        model = _grpo(n_epochs=2, num_minibatches=2, micro_batch_size=3)
    model._obs = model.env.reset(seed=0)[0]
    batch = model._collect()
    model._train(batch)  # Adam's state and the kernels' first launches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model._train(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= most, syncs


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_a_rollout_waits_for_the_gpu_once_per_env_step(agent):
    """The env's one read of its flags per step, one more where episodes end, and a few reads at
    the rollout's start and end (as counted on the CPU by tests/agents/test_update_syncs.py):
    torch's sync debug mode warns at each. A text reward: the finished rows' ids go to the host."""
    if agent == "ppo":
        model = PPO(num_envs=16, config=PPOConfig(n_steps=16), device="cuda", seed=0)
    else:
        model = _grpo()
    model._obs = model.env.reset(seed=0)[0]
    model._collect()  # the kernels' first launches
    torch.cuda.synchronize()
    step, steps = model.env.step, []
    model.env.step = lambda action: steps.append(1) or step(action)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model._collect()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2 * len(steps) + 6, syncs


def test_a_hugging_face_policy_acts_and_trains_on_cuda_in_bfloat16(tmp_path):
    pytest.importorskip("transformers")
    from agents.hf import HFConfig, tiny_causal_lm
    from textgym.hf import train_bpe_tokenizer
    from textgym.tasks import get_task

    task = get_task("sentiment")
    tokenizer = train_bpe_tokenizer([*task.corpus, *task.prompts], 512)
    tokenizer.save_pretrained(tmp_path)
    tiny_causal_lm(tokenizer, max_positions=64).save_pretrained(tmp_path)
    model = PPO(
        "TextGen-v0",
        PPOConfig(n_steps=4),
        8,
        {"task": "sentiment", "max_new_tokens": 6},
        "cuda",
        seed=0,
        policy_model=tmp_path,
        hf_config=HFConfig(dtype="bfloat16"),
    )
    model.learn(64)
    weights = [p for p in model.policy.parameters() if p.requires_grad]
    assert weights and all(p.device.type == "cuda" for p in weights)
    assert all(torch.isfinite(p.float()).all() for p in weights)
