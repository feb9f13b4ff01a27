"""Memory options of the Hugging Face policy (agents.hf.HFConfig) and of the PPO update: bfloat16
weights and autocast, LoRA adapters through peft with the KL reference as the same model with its
adapters off, activation checkpointing, and micro-batches with gradient accumulation; on GPT-2 and
Llama with random weights, built offline."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import numpy as np
import torch
import transformers

from agents.hf import AdaptersDisabled, HFConfig, HFKVCache, HFPolicy, RecomputeCache
from agents.policy import hidden_from
from agents.ppo import PPO, PPOConfig
from textgym.hf import train_bpe_tokenizer
from textgym.tasks import get_task
from textgym.tokenizers import EOS_ID
from textgym.vector import TextGenVectorEnv

TASK = get_task("sentiment")
M = 6
ENV_KWARGS = {"task": "sentiment", "max_new_tokens": M}
ARCHS = ["gpt2", "llama"]
LORA = HFConfig(lora_rank=4, lora_alpha=8.0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(list(TASK.corpus + TASK.prompts), vocab_size=400)


def make_model(arch: str, bpe, seed: int = 0) -> torch.nn.Module:
    end = bpe.eos_token_id
    special = {"bos_token_id": end, "eos_token_id": end, "pad_token_id": end, "initializer_range": 0.2}
    torch.manual_seed(seed)
    if arch == "gpt2":  # keeps GPT-2's dropout of 0.1: the policy must switch it off
        config = transformers.GPT2Config(
            vocab_size=len(bpe), n_embd=32, n_layer=2, n_head=2, n_positions=64, **special
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=len(bpe),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **special,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dirs(bpe, tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for seed, arch in enumerate(ARCHS):
        path = tmp_path_factory.mktemp(arch)
        bpe.save_pretrained(path)
        make_model(arch, bpe, seed).save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def vector_env(path: Path, num_envs: int = 8) -> TextGenVectorEnv:
    return TextGenVectorEnv(
        num_envs, autoreset_mode="same_step", array_type="torch", tokenizer=str(path), **ENV_KWARGS
    )


def load_policy(path: Path, env: TextGenVectorEnv, options: HFConfig | None = None) -> HFPolicy:
    """The policy in eval mode, with a random value head (it starts at zero)."""
    policy = HFPolicy.from_pretrained(path, env.tokenizer, env.config.seq_len, options=options).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape, generator=gen))
    return policy


def random_actions(gen: torch.Generator, env: TextGenVectorEnv) -> torch.Tensor:
    allowed = torch.as_tensor(np.array(env.config.action_mask)).nonzero().squeeze(1)
    actions = allowed[torch.randint(len(allowed), (env.num_envs,), generator=gen)]
    actions[torch.rand(env.num_envs, generator=gen) < 0.2] = EOS_ID
    return actions


def observations(env: TextGenVectorEnv, steps: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Observations at many stages of their episodes (left-padded prompts, 0 to M - 1 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    ids, masks = [obs["input_ids"]], [obs["attention_mask"]]
    for _ in range(steps):
        obs = env.step(random_actions(gen, env))[0]
        ids.append(obs["input_ids"])
        masks.append(obs["attention_mask"])
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


def hf_ppo(path: Path, config: PPOConfig | None = None, hf_config=None, seed: int = 0, **kwargs) -> PPO:
    return PPO(
        env_kwargs=ENV_KWARGS,
        policy_model=path,
        hf_config=hf_config,
        num_envs=8,
        config=config or PPOConfig(n_steps=8, anneal_lr=False),
        device="cpu",
        seed=seed,
        **kwargs,
    )


def nudge_adapters(policy: HFPolicy, seed: int = 0) -> None:
    """Random LoRA B matrices (they start at zero, where the adapters change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def allowed_logits(policy: HFPolicy, logits: torch.Tensor) -> torch.Tensor:
    return logits[..., ~policy.impossible]


# ------------------------------------------------------------------------------------- HFConfig
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"dtype": torch.bfloat16}, "dtype"),
        ({"autocast": "true"}, "autocast"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_rank": 2.0}, "lora_rank"),
        ({"lora_rank": 4, "lora_alpha": 0}, "lora_alpha"),
        ({"lora_rank": 4, "lora_target_modules": []}, "lora_target_modules"),
        ({"lora_rank": 4, "lora_target_modules": ["q_proj", ""]}, "lora_target_modules"),
        ({"lora_alpha": 32}, "lora_alpha"),  # a LoRA setting without a rank
        ({"lora_target_modules": "all-linear"}, "lora_target_modules"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"HFConfig\.{field}"):
        HFConfig(**kwargs)


def test_config_round_trip_through_json():
    cfg = HFConfig(dtype="bfloat16", gradient_checkpointing=True, lora_rank=8, lora_target_modules=["q_proj"])
    assert cfg.lora_target_modules == ("q_proj",) and cfg.torch_dtype == torch.bfloat16 and cfg.lora
    assert HFConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert HFConfig.from_dict({}) == HFConfig() and not HFConfig().lora
    with pytest.raises(ValueError, match=r"unknown HFConfig fields \['rank'\]"):
        HFConfig.from_dict({"rank": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora_rank = 2  # type: ignore[misc]


def test_hf_config_needs_a_policy_model():
    with pytest.raises(ValueError, match=r"hf_config sets up a Hugging Face policy.*give policy_model too"):
        PPO(hf_config=HFConfig(lora_rank=4), num_envs=2, device="cpu")


# ------------------------------------------------------------------------------------ bfloat16
BF16 = {"bfloat16": HFConfig(dtype="bfloat16"), "autocast": HFConfig(autocast=True)}


@pytest.mark.parametrize("setting", list(BF16))
def test_bfloat16_kv_cache_equals_recompute_in_the_same_dtype(model_dirs, arch, setting):
    """Acting in bfloat16 (the reported failure: float32 buffers in RowCache.step), with cached
    logits equal to a full recompute in the same precision, and close to float32's."""
    env = vector_env(model_dirs[arch])
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env, BF16[setting])
    exact = load_policy(model_dirs[arch], env)  # float32
    if setting == "bfloat16":
        assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    assert policy.value_head.weight.dtype == torch.float32
    cache, reference = HFKVCache(policy, 8, "cpu"), RecomputeCache(policy)
    gen = torch.Generator().manual_seed(1)
    obs, _ = env.reset(seed=3)
    for _ in range(3 * M):
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        assert logits.dtype == torch.float32 and values.dtype == torch.float32  # PPO's maths in float32
        scale = float(allowed_logits(policy, ref_logits).abs().max())
        # bfloat16 keeps 8 bits of mantissa: differences of a few units in the last place of the logits
        tol = 0.03 * scale
        torch.testing.assert_close(
            allowed_logits(policy, logits), allowed_logits(policy, ref_logits), atol=tol, rtol=0
        )
        torch.testing.assert_close(values, ref_values, atol=0.03 * float(ref_values.abs().max()), rtol=0)
        with torch.no_grad():
            full, _ = RecomputeCache(exact).step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(
            allowed_logits(policy, logits), allowed_logits(policy, full), atol=tol, rtol=0
        )
        obs = env.step(random_actions(gen, env))[0]
    if setting == "bfloat16":
        assert cache.keys[0].dtype == torch.bfloat16  # the cache follows the model's dtype


def test_from_pretrained_in_bfloat16_acts(model_dirs):
    """The reported failure: from_pretrained(dtype=torch.bfloat16) loaded, then acting raised
    "Index put requires the source and destination dtypes match"."""
    env = vector_env(model_dirs["gpt2"])
    policy = HFPolicy.from_pretrained(
        model_dirs["gpt2"], env.tokenizer, env.config.seq_len, dtype=torch.bfloat16
    )
    assert policy.options == HFConfig(dtype="bfloat16")
    obs = observations(env, steps=2)
    cache = policy.make_cache(len(obs["input_ids"]), "cpu")
    logits, values = cache.step(obs["input_ids"], obs["attention_mask"], env.prompt_window)
    assert logits.dtype == values.dtype == torch.float32 and torch.isfinite(values).all()
    with pytest.raises(ValueError, match="dtype must be one of"):
        HFPolicy.from_pretrained(model_dirs["gpt2"], env.tokenizer, env.config.seq_len, dtype=torch.float16)


@pytest.mark.parametrize("setting", list(BF16))
def test_ppo_learns_in_bfloat16(model_dirs, setting):
    config = PPOConfig(n_steps=8, n_epochs=1, num_minibatches=1, kl_coef=0.1)
    model = hf_ppo(model_dirs["llama"], config, hf_config=BF16[setting])
    initial = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model._obs = model.env.reset(seed=0)[0]
    rollout, last_values, last_dones = model.collect_rollout()
    assert rollout.logprobs.dtype == torch.float32
    stats = model.update(rollout, last_values, last_dones)
    # Statistics from before the only optimizer step: the rollout decoded through the cache and the
    # update recomputed whole sequences, which in bfloat16 agree to its precision, not bit for bit.
    assert stats["train/approx_kl"] < 1e-3
    model.learn(128, reset_num_timesteps=False)
    assert all(np.isfinite(v) for k, v in model.last_stats.items() if k != "train/explained_variance")
    trained = model.policy.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in initial.items())
    if setting == "bfloat16":
        assert next(model.policy.model.parameters()).dtype == torch.bfloat16
        assert model.reference.model.dtype == torch.bfloat16  # the frozen copy keeps the precision


# ---------------------------------------------------------------------------------------- LoRA
# peft itself asks transformers for an attribute under its deprecated name
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_a_peft_model_is_accepted_as_the_policy_model(model_dirs, arch):
    """The reported failure: HFPolicy(PeftModel) read last_hidden_state off the whole causal LM."""
    peft = pytest.importorskip("peft")
    env = vector_env(model_dirs[arch])
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    wrapped = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    )
    policy = HFPolicy(wrapped, env.tokenizer, env.config.seq_len).eval()
    assert policy.lora and policy.causal_lm is base
    nudge_adapters(policy)
    obs = observations(env)
    ids, mask = obs["input_ids"], obs["attention_mask"]
    with torch.no_grad():
        logits, _ = policy(ids, mask)
        for i in range(0, len(ids), 5):  # each row's real tokens through the PeftModel's own forward
            real = policy.model_ids[ids[i][mask[i].bool()]].unsqueeze(0)  # (1, n) unpadded
            own = wrapped(input_ids=real).logits[0].index_select(-1, policy.model_ids)  # (n, V)
            torch.testing.assert_close(
                allowed_logits(policy, logits[i][mask[i].bool()]),
                allowed_logits(policy, own),
                atol=1e-4,
                rtol=1e-4,
            )
    cache, reference = HFKVCache(policy, len(ids), "cpu"), RecomputeCache(policy)
    a, _ = cache.rebuild(ids, mask)
    b, _ = reference.rebuild(ids, mask)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_only_adapters_and_value_head_are_trained(model_dirs, arch):
    model = hf_ppo(model_dirs[arch], hf_config=LORA)
    policy = model.policy
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("value_head.") for n in trained)
    assert {"value_head.weight", "value_head.bias"} <= trained
    optimized = {id(p) for group in model.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in policy.named_parameters() if n in trained}
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    model.learn(128)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the base never moves
    assert any("lora_B" in n and after[n].abs().sum() > 0 for n in trained)  # the adapters did


def test_lora_reference_is_the_base_model_without_a_copy(model_dirs, arch):
    model = hf_ppo(model_dirs[arch], PPOConfig(n_steps=8, kl_coef=0.1), hf_config=LORA)
    assert isinstance(model.reference, AdaptersDisabled) and model.reference.model is model.policy.model
    model.learn(64)  # one rollout, then one update: the KL statistics are the rollout's
    assert model.n_updates == 1 and model._rollout_kl
    # LoRA's B starts at zero: before the first update the policy *is* its reference, bit for bit.
    assert np.array_equal(np.array(model._rollout_kl), np.zeros((len(model._rollout_kl), 2)))
    assert model.last_stats["train/kl_ref"] == 0.0 and model.last_stats["train/kl_ref_sampled"] == 0.0
    model.learn(128, reset_num_timesteps=False)
    assert model.last_stats["train/kl_ref"] > 1e-6  # the adapters moved the policy away
    # ... and the reference is still the model in the directory.
    env = vector_env(model_dirs[arch])
    obs = observations(env)
    original = load_policy(model_dirs[arch], env)
    with torch.no_grad():
        ref_logits, _ = model.reference(obs["input_ids"], obs["attention_mask"])
        base_logits, _ = original(obs["input_ids"], obs["attention_mask"])
        policy_logits, _ = model.policy(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-5, rtol=1e-5)
    assert (policy_logits - ref_logits).abs().max() > 1e-4
    with torch.no_grad(), model.policy.model.disable_adapter():  # peft's own way of switching them off
        peft_logits, _ = model.policy(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(ref_logits, peft_logits, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inside"), model.reference.off():
        raise RuntimeError("inside")  # the adapters come back on after an error too
    # The reference acts through a cache of its own, equal to recomputing without adapters.
    cache = model.reference.make_cache(len(obs["input_ids"]), "cpu")
    torch.testing.assert_close(
        cache.rebuild(obs["input_ids"], obs["attention_mask"])[0],
        RecomputeCache(model.reference).rebuild(obs["input_ids"], obs["attention_mask"])[0],
        atol=1e-4,
        rtol=1e-4,
    )
    with torch.no_grad():  # the adapters are on again afterwards
        again, _ = model.policy(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(again, policy_logits, atol=0, rtol=0)


def test_merged_adapters_give_the_same_logits(model_dirs, arch, tmp_path):
    env = vector_env(model_dirs[arch])
    policy = load_policy(model_dirs[arch], env, LORA)
    nudge_adapters(policy)
    out = policy.save_pretrained(tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()  # a plain causal LM
    merged = HFPolicy.from_pretrained(out, env.tokenizer, env.config.seq_len).eval()
    assert not merged.lora
    obs = observations(env)
    with torch.no_grad():
        logits, values = policy(obs["input_ids"], obs["attention_mask"])
        logits2, values2 = merged(obs["input_ids"], obs["attention_mask"])
    assert (
        allowed_logits(policy, logits)
        - allowed_logits(
            policy, load_policy(model_dirs[arch], env)(obs["input_ids"], obs["attention_mask"])[0]
        )
    ).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(logits2, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values2, values, atol=1e-5, rtol=1e-5)
    assert policy.lora and any("lora_" in n for n, _ in policy.named_parameters())  # merged a copy only


def lora_agent(path: Path) -> PPO:
    return hf_ppo(
        path, PPOConfig(n_steps=4, kl_coef=0.05, n_epochs=2, anneal_lr=False), hf_config=LORA, seed=1
    )


def assert_same_weights(a: PPO, b: PPO) -> None:
    for (name, pa), (_, pb) in zip(a.policy.state_dict().items(), b.policy.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_lora_checkpoint_round_trip_and_exact_resume(model_dirs, tmp_path):
    path = tmp_path / "ckpt.pt"
    model = lora_agent(model_dirs["llama"])
    model.learn(64, checkpoint_path=path)
    saved = torch.load(path, weights_only=True)
    assert saved["hf_config"] == LORA.to_dict() and saved["reference"] is None
    trained = {n for n, p in model.policy.named_parameters() if p.requires_grad}
    assert set(saved["model"]) == trained  # adapters and value head: the base is in policy_model
    assert isinstance(saved["base_digest"], str)

    loaded = PPO.load(path, device="cpu")
    assert loaded.hf_config == LORA and loaded.policy.lora
    assert isinstance(loaded.reference, AdaptersDisabled)
    assert_same_weights(loaded, model)
    obs = observations(vector_env(model_dirs["llama"]), steps=3, seed=5)
    assert np.array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )

    loaded.learn(64, reset_num_timesteps=False)
    uninterrupted = lora_agent(model_dirs["llama"])
    uninterrupted.learn(128)
    assert loaded.num_timesteps == uninterrupted.num_timesteps == 128
    assert_same_weights(loaded, uninterrupted)
    assert loaded.kl.value == uninterrupted.kl.value


def test_lora_checkpoint_refuses_another_base_model(model_dirs, bpe, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model_dirs["llama"], base)
    model = lora_agent(base)
    model.learn(16)
    path = model.save(tmp_path / "ckpt.pt")
    make_model("llama", bpe, seed=7).save_pretrained(base)  # the directory now holds another model
    with pytest.raises(ValueError, match="LoRA adapters trained on another base model"):
        PPO.load(path, device="cpu")


def test_lora_needs_peft_and_names_the_extra(model_dirs, monkeypatch):
    env = vector_env(model_dirs["gpt2"], 2)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(ImportError, match=r'need peft, of the optional extra lm: pip install -e "\.\[lm\]"'):
        HFPolicy.from_pretrained(model_dirs["gpt2"], env.tokenizer, env.config.seq_len, options=LORA)
    with pytest.raises(ImportError, match="optional extra lm"):
        hf_ppo(model_dirs["gpt2"], hf_config={"lora_rank": 4})
    HFPolicy.from_pretrained(model_dirs["gpt2"], env.tokenizer, env.config.seq_len)  # no LoRA: no peft


def test_lora_target_modules(model_dirs):
    env = vector_env(model_dirs["llama"], 2)
    L = env.config.seq_len
    everything = HFPolicy.from_pretrained(
        model_dirs["llama"], env.tokenizer, L, options=HFConfig(lora_rank=2, lora_target_modules="all-linear")
    )
    wrapped = {
        n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1]
        for n, _ in everything.named_parameters()
        if ".lora_A" in n
    }
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    some = HFPolicy.from_pretrained(
        model_dirs["llama"], env.tokenizer, L, options=HFConfig(lora_rank=2, lora_target_modules=["o_proj"])
    )
    assert {n for n, _ in some.named_parameters() if ".lora_A" in n} == {
        f"model.base_model.model.model.layers.{i}.self_attn.o_proj.lora_A.default.weight" for i in range(2)
    }


# --------------------------------------------------------------------------- gradient checkpointing
def attention_calls(policy: HFPolicy) -> list[int]:
    """Counts the calls of every attention module (they run inside the checkpointed layers)."""
    calls = [0]
    for name, module in policy.causal_lm.named_modules():
        if name.endswith(("self_attn", ".attn")):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradient(model_dirs, arch, lora):
    env = vector_env(model_dirs[arch])
    obs = observations(env, steps=2)
    grads, counts = {}, {}
    for checkpointing in (False, True):
        options = HFConfig(gradient_checkpointing=checkpointing, **({"lora_rank": 4} if lora else {}))
        torch.manual_seed(0)  # peft draws LoRA's A matrices from the global generator
        policy = load_policy(model_dirs[arch], env, options)
        if lora:
            nudge_adapters(policy)
        calls = attention_calls(policy)
        policy.train()
        logits, values = policy(obs["input_ids"], obs["attention_mask"])
        (torch.log_softmax(logits, -1)[..., 10].mean() + values.pow(2).mean()).backward()
        counts[checkpointing] = calls[0]
        grads[checkpointing] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
        policy.eval()
        calls[0] = 0
        with torch.no_grad():
            policy(obs["input_ids"], obs["attention_mask"])
        assert calls[0] == 2  # acting: no recomputation
    assert counts == {False: 2, True: 4}  # two layers, each run again in the backward pass
    for name, g in grads[False].items():
        assert grads[True][name] is not None, name
        torch.testing.assert_close(grads[True][name], g, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_keeps_dropout_off(model_dirs):
    """GPT-2 has dropout 0.1: with the decoder layers in training mode for checkpointing, the
    modules inside them must stay in eval mode, or the first ratio would not be 1."""
    options = HFConfig(gradient_checkpointing=True, lora_rank=4)
    model = hf_ppo(model_dirs["gpt2"], PPOConfig(n_steps=8, n_epochs=1, num_minibatches=1), hf_config=options)
    model._obs = model.env.reset(seed=0)[0]
    stats = model.update(*model.collect_rollout())
    assert stats["train/clip_fraction"] == 0.0 and abs(stats["train/approx_kl"]) < 1e-6
    model.policy.train()
    assert all(layer.training for layer in model.policy._checkpointed)
    assert not any(m.training for m in model.policy.causal_lm.modules() if isinstance(m, torch.nn.Dropout))


def test_everything_at_once_trains(model_dirs):
    """bfloat16 base, LoRA, checkpointing, micro-batches and a KL penalty, as for SmolLM2."""
    options = HFConfig(dtype="bfloat16", gradient_checkpointing=True, lora_rank=4)
    config = PPOConfig(n_steps=8, kl_coef=0.05, kl_target=1.0, kl_horizon=64, micro_batch_size=2)
    model = hf_ppo(model_dirs["llama"], config, hf_config=options)
    model.learn(256)
    assert model.n_updates == 4
    assert all(np.isfinite(v) for k, v in model.last_stats.items() if k != "train/explained_variance")
    assert {p.dtype for p in model.optimizer.param_groups[0]["params"]} == {torch.float32}


# ---------------------------------------------------------------------------------- micro-batches
def optimizer_gradients(model: PPO) -> list[list[torch.Tensor]]:
    """Record the gradients each optimizer step is given."""
    recorded: list[list[torch.Tensor]] = []
    step = model.optimizer.step

    def recording_step(*args, **kwargs):
        recorded.append([p.grad.clone() for p in model._trainable])
        return step(*args, **kwargs)

    model.optimizer.step = recording_step
    return recorded


def count_calls(obj, name: str) -> list[int]:
    """Count the calls of ``obj.name`` (a method), in the list returned."""
    calls, method = [0], getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("options", [None, LORA], ids=["full", "lora"])
def test_micro_batches_give_the_minibatch_gradient(model_dirs, arch, options):
    config = PPOConfig(n_steps=8, n_epochs=1, num_minibatches=2, max_grad_norm=1e9, clip_range_vf=0.2)
    grads, stats = {}, {}
    for micro in (None, 1, 3):
        model = hf_ppo(
            model_dirs[arch], dataclasses.replace(config, micro_batch_size=micro), hf_config=options
        )
        with torch.no_grad():  # values, hence advantages, of every size (the rewards are mostly 0 here)
            gen = torch.Generator().manual_seed(0)
            model.policy.value_head.weight.copy_(
                torch.randn(model.policy.value_head.weight.shape, generator=gen)
            )
        model._obs = model.env.reset(seed=0)[0]
        rollout = model.collect_rollout()
        recorded = optimizer_gradients(model)
        forwards = count_calls(model.policy, "hidden")
        torch.manual_seed(5)  # the same minibatches
        stats[micro] = model.update(*rollout)
        grads[micro] = recorded
        sequences = stats[micro]["train/sequences"]
        if micro is not None:
            assert forwards[0] >= sequences // micro  # the minibatches were cut up
    for micro in (1, 3):
        assert len(grads[micro]) == len(grads[None]) == 2
        for step_grads, full_grads in zip(grads[micro], grads[None], strict=True):
            for g, full in zip(step_grads, full_grads, strict=True):
                torch.testing.assert_close(g, full, atol=1e-4 * float(full.abs().max()), rtol=1e-3)
        for key in ("train/policy_gradient_loss", "train/value_loss", "train/entropy_loss", "train/loss"):
            assert stats[micro][key] == pytest.approx(stats[None][key], rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ train.py
def train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_takes_hf_config_with_a_policy_model_only(model_dirs, tmp_path, capsys):
    train = train_script()
    with pytest.raises(SystemExit):
        train.parse_args(["--hf-config", '{"lora_rank": 4}', "--logdir", str(tmp_path)])
    assert "--hf-config sets up the Hugging Face policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--policy-model", str(model_dirs["gpt2"]), "--hf-config", '{"rank": 4}'])
    assert "--hf-config: unknown HFConfig fields ['rank']" in capsys.readouterr().err
    args = train.parse_args(
        [
            "--policy-model",
            str(model_dirs["gpt2"]),
            "--hf-config",
            '{"lora_rank": 4}',
            "--logdir",
            str(tmp_path),
        ]
    )
    assert args.hf == HFConfig(lora_rank=4)
    assert "--hf-config" in train.build_parser().format_help()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_adapters_gradients_in_place_equal_autograds(model_dirs, arch, checkpointing):
    """Under LoRA the trained weights are the adapters (the embedding is frozen): inside
    in_place_gradients, with each prompt's columns run once for the rows that share it (the
    whole pass under activation checkpointing, whose layers run again in the backward pass),
    every adapter's gradient is autograd's."""
    env = vector_env(model_dirs[arch])
    obs = observations(env, steps=3)
    ids, mask = obs["input_ids"][:8], obs["attention_mask"][:8]
    P = env.prompt_window
    torch.manual_seed(0)  # peft draws LoRA's A matrices from the global generator
    policy = load_policy(model_dirs[arch], env, HFConfig(lora_rank=4, gradient_checkpointing=checkpointing))
    nudge_adapters(policy)
    policy.train()
    shared = (torch.tensor([0]), torch.zeros(8, dtype=torch.long))  # every row holds row 0's prompt
    ids[:, :P], mask[:, :P] = ids[:1, :P], mask[:1, :P]
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "value_head" in n for n in trained)

    def gradients(in_place: bool) -> dict[str, torch.Tensor]:
        for p in trained.values():
            p.grad = None
        with policy.in_place_gradients() if in_place else contextlib.nullcontext():
            logits, values = policy.heads(hidden_from(policy, ids, mask, P - 1, shared))
        (torch.log_softmax(logits, -1)[..., 10].mean() + values.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in trained.items()}

    dense, in_place = gradients(False), gradients(True)
    for name, g in dense.items():
        torch.testing.assert_close(in_place[name], g, atol=1e-5, rtol=1e-4, msg=name)
