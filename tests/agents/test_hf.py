"""Tests of agents.hf: a Hugging Face causal LM as the PPO policy (GPT-2 and Llama with random
weights, built offline), its KV cache against recomputation, PPO, generation and save_pretrained,
against the transformers models' own forward passes."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from agents.generation import beam_search, encode_prompts
from agents.hf import HFConfig, HFKVCache, HFPolicy, RecomputeCache, cache_argument
from agents.policy import distinct_rows, hidden_from, last_real_column
from agents.ppo import PPO, PPOConfig
from textgym.hf import HFTokenizer, train_bpe_tokenizer
from textgym.tasks import get_task
from textgym.tokenizers import EOS_ID, NUM_SPECIAL, WordTokenizer
from textgym.vector import TextGenVectorEnv

TASK = get_task("sentiment")
M = 6  # max_new_tokens of every env here
ENV_KWARGS = {"task": "sentiment", "max_new_tokens": M}
ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(list(TASK.corpus + TASK.prompts), vocab_size=400)


def gpt2_config(bpe, **kwargs) -> transformers.GPT2Config:
    end = bpe.eos_token_id
    args = {
        "vocab_size": len(bpe),
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 64,
        "initializer_range": 0.2,  # next-token distributions far from uniform
        "bos_token_id": end,
        "eos_token_id": end,
        "pad_token_id": end,
    }
    return transformers.GPT2Config(**{**args, **kwargs})


def llama_config(bpe, **kwargs) -> transformers.LlamaConfig:
    end = bpe.eos_token_id
    args = {
        "vocab_size": len(bpe),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
        "bos_token_id": end,
        "eos_token_id": end,
        "pad_token_id": end,
    }
    return transformers.LlamaConfig(**{**args, **kwargs})


@pytest.fixture(scope="module")
def model_dirs(bpe, tmp_path_factory) -> dict[str, Path]:
    """A directory per architecture holding the tokenizer and a random causal LM (GPT-2 keeps its
    default dropout of 0.1, as real GPT-2 checkpoints do)."""
    dirs = {}
    for seed, arch in enumerate(ARCHS):
        torch.manual_seed(seed)
        if arch == "gpt2":
            model = transformers.GPT2LMHeadModel(gpt2_config(bpe))
        else:
            model = transformers.LlamaForCausalLM(llama_config(bpe))
        path = tmp_path_factory.mktemp(arch)
        bpe.save_pretrained(path)
        model.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def reference_model(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def vector_env(path: Path, num_envs: int = 8) -> TextGenVectorEnv:
    return TextGenVectorEnv(
        num_envs,
        autoreset_mode="same_step",
        array_type="torch",
        tokenizer=str(path),
        task="sentiment",
        max_new_tokens=M,
    )


def load_policy(path: Path, env: TextGenVectorEnv, cache: str = "kv", seed: int = 0) -> HFPolicy:
    """The policy, in eval mode, with a random value head (it starts at zero)."""
    policy = HFPolicy.from_pretrained(path, env.tokenizer, env.config.seq_len, cache=cache).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape, generator=gen))
        policy.value_head.bias.copy_(torch.randn(policy.value_head.bias.shape, generator=gen))
    return policy


def random_actions(gen: torch.Generator, env: TextGenVectorEnv) -> torch.Tensor:
    """Allowed tokens, with extra <eos> so that episodes end at many different lengths."""
    allowed = torch.as_tensor(np.array(env.config.action_mask)).nonzero().squeeze(1)
    n = env.num_envs
    actions = allowed[torch.randint(len(allowed), (n,), generator=gen)]
    actions[torch.rand(n, generator=gen) < 0.2] = EOS_ID
    return actions


def observations(env: TextGenVectorEnv, steps: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Observations at many stages of their episodes: left-padded prompts, 0 to M - 1 tokens."""
    gen = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    ids, masks = [obs["input_ids"]], [obs["attention_mask"]]
    for _ in range(steps):
        obs = env.step(random_actions(gen, env))[0]
        ids.append(obs["input_ids"])
        masks.append(obs["attention_mask"])
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


def reserved(tokenizer: HFTokenizer) -> torch.Tensor:
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    out[list(tokenizer.reserved_ids())] = True
    return out


# --------------------------------------------------------------------------------- the policy
def test_logits_equal_the_models_own_on_unpadded_ids(model_dirs, arch):
    env = vector_env(model_dirs[arch])
    tok = env.tokenizer
    policy = load_policy(model_dirs[arch], env)
    model = reference_model(model_dirs[arch])
    obs = observations(env)
    ids, mask = obs["input_ids"], obs["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 0).any()  # left- and right-padded rows
    table = torch.as_tensor(tok.model_ids())
    off = reserved(tok)
    with torch.no_grad():
        logits, values = policy(ids, mask)
    last = last_real_column(mask)
    for i in range(len(ids)):
        real = ids[i][mask[i].bool()]
        hf_ids = table[real].unsqueeze(0)  # (1, n) unpadded
        assert hf_ids[0, 0] == tok.hf_special_ids["eos"]  # <bos> reads as GPT-2's end-of-text
        with torch.no_grad():
            ref = model(input_ids=hf_ids).logits[0]  # (n, HF vocab)
        mine = logits[i][mask[i].bool()]  # (n, V) at the real columns
        torch.testing.assert_close(mine[:, ~off], ref[:, table[~off]], atol=1e-4, rtol=1e-4)
        # ... and in particular at the last real token, where the next action is drawn
        torch.testing.assert_close(logits[i, last[i]][~off], ref[-1, table[~off]], atol=1e-4, rtol=1e-4)
        assert (mine[:, off] == torch.finfo(mine.dtype).min).all()
        # <eos> carries the model's own end-of-text logit
        torch.testing.assert_close(mine[:, EOS_ID], ref[:, tok.hf_special_ids["eos"]], atol=1e-4, rtol=1e-4)
    assert values.shape == ids.shape


def test_heads_copy_the_lm_heads_columns_as_the_gather_does(model_dirs):
    """HFTokenizer's layout (textgym id = Hugging Face id + 4 past the specials) lets the heads
    copy the LM head's columns in one piece; the general gather through model_ids gives the same
    logits bit for bit."""
    env = vector_env(model_dirs["llama"])
    policy = load_policy(model_dirs["llama"], env)
    assert policy._shifted
    obs = observations(env, steps=2)
    with torch.no_grad():
        hidden = policy.hidden(obs["input_ids"], obs["attention_mask"])
        copied, values = policy.heads(hidden)
        policy._shifted = False
        gathered, gathered_values = policy.heads(hidden)
    assert torch.equal(copied, gathered) and torch.equal(values, gathered_values)


def test_left_padding_does_not_change_the_logits(model_dirs, arch):
    env = vector_env(model_dirs[arch])
    policy = load_policy(model_dirs[arch], env)
    obs = observations(env, steps=2)
    ids, mask = obs["input_ids"], obs["attention_mask"]
    # The same rows with three more columns of padding on the left.
    pad = torch.zeros(len(ids), 3, dtype=ids.dtype)
    with torch.no_grad():
        logits, values = policy(ids, mask)
        more_logits, more_values = policy(torch.cat([pad, ids], 1), torch.cat([pad, mask], 1))
    real = mask.bool()
    torch.testing.assert_close(more_logits[:, 3:][real], logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(more_values[:, 3:][real], values[real], atol=1e-4, rtol=1e-4)


def test_gradients_are_finite_with_left_padding(model_dirs, arch):
    env = vector_env(model_dirs[arch])
    policy = load_policy(model_dirs[arch], env).train()
    obs = observations(env, steps=2)
    ids, mask = obs["input_ids"], obs["attention_mask"]
    assert (mask[:, 0] == 0).any()  # left-padded rows
    torch.manual_seed(0)
    hidden = policy.hidden(ids, mask)
    rows = torch.arange(len(ids))
    logits, values = policy.heads(hidden[rows, last_real_column(mask)])
    loss = -F.log_softmax(logits, -1)[:, NUM_SPECIAL + 10].mean() + values.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert policy.value_head.weight.grad.abs().sum() > 0
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("cache", ["kv", "recompute"])
def test_make_cache(model_dirs, cache):
    env = vector_env(model_dirs["gpt2"], 4)
    policy = load_policy(model_dirs["gpt2"], env, cache=cache)
    made = policy.make_cache(4, "cpu")
    assert isinstance(made, HFKVCache if cache == "kv" else RecomputeCache)


@pytest.mark.parametrize("host", [False, True], ids=["read", "host-view"])
def test_kv_cache_equals_recompute_along_a_rollout(model_dirs, arch, host):
    env = vector_env(model_dirs[arch])
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env)
    cache, reference = HFKVCache(policy, 8, "cpu"), RecomputeCache(policy)
    gen = torch.Generator().manual_seed(1)
    obs, _ = env.reset(seed=3)
    starts = ends = 0
    for _ in range(4 * M):
        logits, values = cache.step(
            obs["input_ids"], obs["attention_mask"], P, env.host_view if host else None
        )
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)
        starts += int((obs["attention_mask"][:, P:].sum(1) == 0).sum())
        obs, _, terminated, truncated, _ = env.step(random_actions(gen, env))
        ends += int((terminated | truncated).sum())
    assert ends > 16 and starts > 16  # many autoresets, at many different lengths
    if arch == "llama":
        heads = policy.model.config.num_key_value_heads
        N, kv_heads, width, head_size = cache.keys[0].shape  # slots up to the rightmost column reached
        assert (N, kv_heads, head_size) == (8, heads, 32 // 4) and P <= width <= env.config.seq_len


def test_kv_cache_prefills_a_groups_prompt_once(model_dirs, arch):
    """The rows of a group start together on one prompt: it is prefilled once and copied into
    the others' slots, with the logits of a full recompute."""
    env = TextGenVectorEnv(
        8,
        autoreset_mode="same_step",
        array_type="torch",
        tokenizer=str(model_dirs[arch]),
        task="sentiment",
        max_new_tokens=M,
        group_size=4,
    )
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env)
    cache, reference = HFKVCache(policy, 8, "cpu"), RecomputeCache(policy)
    prefilled = []
    prefill = cache._prefill
    cache._prefill = lambda rows, *args: prefilled.append(len(rows)) or prefill(rows, *args)
    gen = torch.Generator().manual_seed(1)
    obs, _ = env.reset(seed=3)
    for _ in range(3 * M):
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P, env.host_view)
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)
        obs = env.step(random_actions(gen, env))[0]
    assert prefilled and all(n <= 2 for n in prefilled)  # one row per group, not four


def test_kv_cache_prompts_of_bos_alone_and_restarts_mid_rollout(model_dirs, arch, hand_rollout):
    """New episodes are prefilled over the prompt window but its last column, which is decoded
    with every other row's newest token; a <bos>-only prompt has nothing to prefill. The slots
    grow by a column when a row reaches a new rightmost one; otherwise a step writes in place."""
    env = vector_env(model_dirs[arch], 3)
    P, L = env.prompt_window, env.config.seq_len
    policy = load_policy(model_dirs[arch], env)
    cache, reference = HFKVCache(policy, 3, "cpu"), RecomputeCache(policy)
    width, in_place = 0, 0
    for obs in hand_rollout(env.tokenizer.vocab_size, P, L):
        before = [k.data_ptr() for k in (*cache.keys, *cache.values)]
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)
        rightmost = int(last_real_column(obs["attention_mask"]).max())
        if width and rightmost < width:  # no row reached a new column: written in place
            assert [k.data_ptr() for k in (*cache.keys, *cache.values)] == before
            in_place += 1
        width = max(width, rightmost + 1)
        assert cache.keys[0].shape[2] == width == cache.values[0].shape[2]
    assert in_place >= 3


def test_kv_cache_rebuild_after_new_weights(model_dirs, arch):
    env = vector_env(model_dirs[arch])
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env)
    cache, reference = HFKVCache(policy, 8, "cpu"), RecomputeCache(policy)
    gen = torch.Generator().manual_seed(2)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        cache.step(obs["input_ids"], obs["attention_mask"], P)
        obs = env.step(random_actions(gen, env))[0]
    with torch.no_grad():  # new weights, as after a PPO update
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    stale, _ = cache.step(obs["input_ids"], obs["attention_mask"], P)
    ref, _ = reference.step(obs["input_ids"], obs["attention_mask"], P)
    assert (stale - ref).abs().max() > 1e-3  # the comparison below can fail
    logits, values = cache.rebuild(obs["input_ids"], obs["attention_mask"])
    ref_logits, ref_values = reference.rebuild(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)
    for _ in range(2 * M):
        obs = env.step(random_actions(gen, env))[0]
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)


def test_kv_cache_rebuild_of_groups_computes_each_prompt_once(model_dirs, arch, monkeypatch):
    """The rows of a group share a prompt: the rebuild runs the model on each distinct row once
    and every row then decodes its own tokens as a full recompute does."""
    env = TextGenVectorEnv(
        8,
        group_size=4,
        autoreset_mode="same_step",
        array_type="torch",
        tokenizer=str(model_dirs[arch]),
        **ENV_KWARGS,
    )
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env)
    cache, reference = HFKVCache(policy, 8, "cpu"), RecomputeCache(policy)
    fed = []
    trunk = policy.trunk
    monkeypatch.setattr(policy, "trunk", lambda ids, *a, **k: fed.append(len(ids)) or trunk(ids, *a, **k))
    obs, _ = env.reset(seed=0)
    logits, values = cache.rebuild(obs["input_ids"], obs["attention_mask"])
    assert fed == [2]  # two groups
    ref_logits, ref_values = reference.rebuild(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)
    assert all(k.shape[0] == 8 for k in (*cache.keys, *cache.values))
    gen = torch.Generator().manual_seed(4)
    for _ in range(M):
        obs = env.step(random_actions(gen, env))[0]
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = reference.step(obs["input_ids"], obs["attention_mask"], P)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values, atol=1e-4, rtol=1e-4)


def test_shared_prompts_run_once_and_give_the_whole_pass(
    model_dirs, arch, monkeypatch, assert_same_pass, grouped_sequences
):
    """hidden_from with the rows' shared prompts: each prompt's columns run once, and the hidden
    states of the real columns from the prompt's last on, and every weight's gradient through
    them, are those of the whole pass."""
    env = TextGenVectorEnv(8, group_size=4, array_type="torch", tokenizer=str(model_dirs[arch]), **ENV_KWARGS)
    P = env.prompt_window
    policy = load_policy(model_dirs[arch], env).train()
    ids, mask = grouped_sequences(env, [1, 6, 3, 5, 2, 6, 4, 1])
    shared = distinct_rows(ids[:, :P], mask[:, :P])
    assert shared is not None and len(shared[0]) == 2  # two groups, two prompts
    fed = []
    trunk = policy.trunk
    monkeypatch.setattr(
        policy, "trunk", lambda ids, *a, **k: fed.append(tuple(ids.shape)) or trunk(ids, *a, **k)
    )
    got = hidden_from(policy, ids, mask, P - 1, shared)  # (8, L - P + 1, C)
    assert fed == [(2, P), (8, ids.shape[1] - P)]  # the prompts once, then every row's completion
    fed.clear()
    expected = hidden_from(policy, ids, mask, P - 1)
    assert fed == [(8, ids.shape[1])]
    weights = [p for p in policy.parameters() if p.requires_grad]
    compared = assert_same_pass(got, expected, mask[:, P - 1 :].bool(), weights, rtol=1e-4)
    assert compared > 10  # embeddings, attention and MLP weights of every layer


@pytest.mark.parametrize("tied", ["gpt2", "llama-tied", "llama"])
@pytest.mark.parametrize("share", [False, True], ids=["whole-pass", "shared-prompts"])
def test_in_place_gradients_equal_autograds(bpe, model_dirs, tied, share, grouped_sequences, tmp_path):
    """Inside in_place_gradients every trunk pass runs on stand-ins of the trained weights whose
    gradients are added into the weights' own (the embedding's as the rows it read): every
    weight's gradient is autograd's, dense and laid out as the weight, also when a second
    backward adds onto it (in place: the same buffer). The embedding's setting is restored."""
    if tied == "llama-tied":  # as SmolLM2: a Llama whose LM head is its input embedding
        torch.manual_seed(3)
        transformers.LlamaForCausalLM(llama_config(bpe, tie_word_embeddings=True)).save_pretrained(tmp_path)
        bpe.save_pretrained(tmp_path)
        path = tmp_path
    else:
        path = model_dirs[tied]
    env = TextGenVectorEnv(8, group_size=4, array_type="torch", tokenizer=str(path), **ENV_KWARGS)
    P = env.prompt_window
    policy = load_policy(path, env)  # eval: GPT-2's dropout off, so that the two passes agree
    embedding = policy.causal_lm.get_input_embeddings()
    is_tied = embedding.weight is policy.causal_lm.get_output_embeddings().weight
    assert is_tied == (tied != "llama")
    ids, mask = grouped_sequences(env, [1, 6, 3, 5, 2, 6, 4, 1])
    shared = distinct_rows(ids[:, :P], mask[:, :P]) if share else None
    probe = torch.randn(8, ids.shape[1] - P + 1, generator=torch.Generator().manual_seed(0))
    seen = []
    embedding.register_forward_hook(lambda module, args, out: seen.append(module.sparse))
    weights = [p for p in policy.parameters() if p.requires_grad]

    def backward(in_place: bool) -> None:
        with policy.in_place_gradients() if in_place else contextlib.nullcontext():
            logits, values = policy.heads(hidden_from(policy, ids, mask, P - 1, shared))
        (logits.log_softmax(-1).amax(-1) * probe + values).sum().backward()

    def gradients(in_place: bool, passes: int) -> list[torch.Tensor]:
        for w in weights:
            w.grad = None
        backward(in_place)
        buffers = [w.grad.data_ptr() for w in weights]
        for _ in range(passes - 1):
            backward(in_place)
        assert [w.grad.data_ptr() for w in weights] == buffers  # added in place
        return [w.grad.clone() for w in weights]

    for passes in (1, 2):
        seen.clear()
        dense, in_place = gradients(False, passes), gradients(True, passes)
        assert seen == [False] * passes * (1 + share) + [is_tied] * passes * (1 + share)  # trunk passes
        assert not embedding.sparse and policy._in_place is None  # restored
        for w, a, b in zip(weights, in_place, dense, strict=True):
            assert w.grad.layout == torch.strided and w.grad.stride() == w.stride()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # sums in another order


def test_in_place_gradients_leave_passes_without_gradients_alone(model_dirs, arch):
    """Under no_grad (acting, the reference) a trunk pass inside in_place_gradients is a plain one."""
    env = TextGenVectorEnv(2, array_type="torch", tokenizer=str(model_dirs[arch]), **ENV_KWARGS)
    policy = load_policy(model_dirs[arch], env)
    obs = env.reset(seed=0)[0]
    with torch.no_grad():
        expected = policy.hidden(obs["input_ids"], obs["attention_mask"])
        with policy.in_place_gradients():
            assert policy._in_place is None
            hidden = policy.hidden(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(hidden, expected, atol=0, rtol=0)


def test_shared_prompts_fall_back_to_the_whole_pass_under_activation_checkpointing(
    model_dirs, arch, grouped_sequences
):
    """transformers turns the cache off in checkpointed layers: the whole pass runs instead."""
    env = TextGenVectorEnv(8, group_size=4, array_type="torch", tokenizer=str(model_dirs[arch]), **ENV_KWARGS)
    P = env.prompt_window
    policy = HFPolicy.from_pretrained(
        model_dirs[arch], env.tokenizer, env.config.seq_len, options=HFConfig(gradient_checkpointing=True)
    ).train()
    ids, mask = grouped_sequences(env, [1, 6, 3, 5, 2, 6, 4, 1])
    shared = distinct_rows(ids[:, :P], mask[:, :P])
    assert policy.hidden_shared_prefix(ids, mask, P, shared) is None
    real = mask[:, P - 1 :].bool()
    torch.testing.assert_close(
        hidden_from(policy, ids, mask, P - 1, shared)[real], hidden_from(policy, ids, mask, P - 1)[real]
    )


def test_acting_and_training_use_no_deprecated_transformers_api(model_dirs, arch, monkeypatch):
    """transformers announces a renamed argument (``past_key_values`` -> ``cache``) with a
    FutureWarning on every call, and deprecated attributes with ``logger.warning_once``; a policy
    step (prefill, decode, rebuild) and a training forward must meet neither."""
    logged: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)))
    env = vector_env(model_dirs[arch], 4)
    P = env.prompt_window
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        policy = load_policy(model_dirs[arch], env)
        cache = policy.make_cache(4, "cpu")
        obs, _ = env.reset(seed=0)
        for _ in range(3):  # the first step fills every row, later ones decode
            cache.step(obs["input_ids"], obs["attention_mask"], P)
            obs = env.step(random_actions(gen, env))[0]
        cache.rebuild(obs["input_ids"], obs["attention_mask"])
        logits, values = policy.train()(obs["input_ids"], obs["attention_mask"])
        (logits.logsumexp(-1).mean() + values.mean()).backward()
    assert not [m for m in logged if "deprecat" in m.lower()], logged


class _TrunkBefore(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        raise AssertionError("not called")


class _TrunkAfter(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        raise AssertionError("not called")


def test_cache_argument_follows_the_trunks_signature():
    """``cache`` where the model takes it, ``past_key_values`` on transformers releases before the rename."""
    assert cache_argument(_TrunkBefore()) == "past_key_values"
    assert cache_argument(_TrunkAfter()) == "cache"


# ---------------------------------------------------------------------------- errors of HFPolicy
def test_missing_directory_names_it(model_dirs, tmp_path):
    tok = HFTokenizer(model_dirs["gpt2"])
    with pytest.raises(FileNotFoundError, match=r"policy_model: no directory at .*no_model_here"):
        HFPolicy.from_pretrained(tmp_path / "no_model_here", tok, 20)
    kwargs = {**ENV_KWARGS, "tokenizer": str(model_dirs["gpt2"])}
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        PPO(env_kwargs=kwargs, policy_model=tmp_path / "no_model_here", num_envs=2, device="cpu")


def test_ppo_with_a_missing_policy_model_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        PPO(env_kwargs=ENV_KWARGS, policy_model=tmp_path / "no_model_here", num_envs=2, device="cpu")


def test_a_tokenizer_without_eos_is_refused(model_dirs):
    path = model_dirs["gpt2"]
    bare = HFTokenizer(path / "tokenizer.json")  # declares no eos
    with pytest.raises(ValueError, match="the tokenizer declares none"):
        HFPolicy.from_pretrained(path, bare, 20)
    kwargs = {**ENV_KWARGS, "tokenizer": str(path / "tokenizer.json")}
    with pytest.raises(ValueError, match="eos_token"):
        PPO(env_kwargs=kwargs, policy_model=path, num_envs=2, device="cpu")
    # Naming the eos token is the way out.
    named = {"name": "hf", "path": str(path / "tokenizer.json"), "eos_token": "<|endoftext|>"}
    model = PPO(env_kwargs={**ENV_KWARGS, "tokenizer": named}, policy_model=path, num_envs=2, device="cpu")
    assert isinstance(model.policy, HFPolicy)


def test_the_agents_autocast_is_refused_for_a_hugging_face_policy(model_dirs):
    with pytest.raises(ValueError, match=r"autocast applies to the built-in .*HFConfig\(autocast=True\)"):
        PPO(
            config=PPOConfig(autocast=True),
            env_kwargs=ENV_KWARGS,
            policy_model=model_dirs["gpt2"],
            num_envs=2,
            device="cpu",
        )


def test_init_policy_and_policy_model_are_exclusive(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        PPO(
            env_kwargs=ENV_KWARGS,
            policy_model=model_dirs["gpt2"],
            init_policy=tmp_path / "lm.pt",
            num_envs=2,
            device="cpu",
        )


def test_a_textgym_tokenizer_is_refused(model_dirs, bpe):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    with pytest.raises(TypeError, match="got a WordTokenizer"):
        HFPolicy(model, WordTokenizer(["the", "food"]), 20)
    with pytest.raises(TypeError, match="got a WordTokenizer"):
        PPO(env_kwargs={**ENV_KWARGS, "tokenizer": "word"}, policy_model=model_dirs["gpt2"], device="cpu")
    with pytest.raises(ValueError, match="cache must be one of"):
        HFPolicy(model, HFTokenizer(bpe), 20, cache="none")


def test_a_mismatched_vocabulary_is_refused(bpe):
    tok = HFTokenizer(bpe)
    small = transformers.GPT2LMHeadModel(gpt2_config(bpe, vocab_size=300))
    with pytest.raises(ValueError, match=f"tokenizer has {len(bpe)} tokens and the model's LM head only 300"):
        HFPolicy(small, tok, 20)


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_observations_longer_than_the_models_positions_are_refused(bpe, model_dirs, make):
    tok = HFTokenizer(bpe)
    if make == "gpt2":
        model = transformers.GPT2LMHeadModel(gpt2_config(bpe, n_positions=16))
    else:
        model = transformers.LlamaForCausalLM(llama_config(bpe, max_position_embeddings=16))
    with pytest.raises(ValueError, match="observations are 17 tokens long and the model reads at most 16"):
        HFPolicy(model, tok, 17)
    assert HFPolicy(model, tok, 16).max_len == 16
    # Through PPO: a generation window too long for the saved model (64 positions).
    with pytest.raises(ValueError, match="reads at most 64 positions"):
        PPO(env_kwargs={**ENV_KWARGS, "max_new_tokens": 64}, policy_model=model_dirs[make], device="cpu")


def test_models_that_transform_their_logits_are_refused(bpe):
    class ScaledLogits(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    with pytest.raises(ValueError, match="transforms its logits after the LM head"):
        HFPolicy(ScaledLogits(gpt2_config(bpe)), HFTokenizer(bpe), 20)


# ------------------------------------------------------------------------------------------ PPO
def hf_ppo(path: Path, config: PPOConfig | None = None, **kwargs) -> PPO:
    return PPO(
        env_kwargs=ENV_KWARGS,
        policy_model=path,
        num_envs=8,
        config=config or PPOConfig(n_steps=8),
        device="cpu",
        seed=0,
        **kwargs,
    )


def test_short_ppo_run(model_dirs, arch):
    path = model_dirs[arch]
    model = hf_ppo(path)
    assert isinstance(model.policy, HFPolicy)
    assert model.tokenizer == HFTokenizer(path)  # read from the model's directory
    initial = reference_model(path).state_dict()
    model.learn(512)
    assert model.num_timesteps == 512 and model.n_updates == 8
    assert all(math.isfinite(v) for k, v in model.last_stats.items() if k != "train/explained_variance")
    assert len(model.ep_info_buffer) > 0
    trained = model.policy.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in initial.items() if k in trained)


def test_kl_to_the_reference_is_zero_before_any_update(model_dirs, arch):
    model = hf_ppo(model_dirs[arch], PPOConfig(n_steps=8, kl_coef=0.1))
    assert isinstance(model.reference, HFPolicy)
    model.learn(64)  # one rollout, then one update: the statistics are the rollout's
    assert model.n_updates == 1 and model._rollout_kl  # episodes ended in it
    assert abs(model.last_stats["train/kl_ref"]) < 1e-6
    assert abs(model.last_stats["train/kl_ref_sampled"]) < 1e-6
    assert np.abs(np.array(model._rollout_kl)).max() < 1e-6
    model.learn(128, reset_num_timesteps=False)  # after updates, the policy has moved away
    assert model.last_stats["train/kl_ref"] > 1e-6


@pytest.mark.parametrize(
    "arch_name",
    [
        "gpt2",  # dropout 0.1 in its config: HFPolicy keeps the model in eval mode
        "llama",  # no dropout: the control
    ],
)
def test_first_minibatch_of_an_update_has_ratio_one(model_dirs, arch_name):
    """With one epoch of one minibatch, update() logs statistics computed before its only
    optimizer step, where the policy is still the one that collected the rollout."""
    model = hf_ppo(model_dirs[arch_name], PPOConfig(n_steps=8, n_epochs=1, num_minibatches=1))
    model._obs = model.env.reset(seed=0)[0]
    rollout, last_values, last_dones = model.collect_rollout()
    stats = model.update(rollout, last_values, last_dones)
    assert stats["train/clip_fraction"] == 0.0
    assert abs(stats["train/approx_kl"]) < 1e-6


def test_save_load_predicts_the_same(model_dirs, tmp_path):
    model = hf_ppo(model_dirs["gpt2"])
    model.learn(128)
    path = model.save(tmp_path / "ppo.pt")
    loaded = PPO.load(path, device="cpu")
    assert isinstance(loaded.policy, HFPolicy) and loaded.policy_model == str(model_dirs["gpt2"])
    for (name, a), (_, b) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    obs = observations(vector_env(model_dirs["gpt2"]), steps=3, seed=5)
    a, _ = model.predict(obs, deterministic=True)
    b, _ = loaded.predict(obs, deterministic=True)
    assert a.shape == (len(obs["input_ids"]),) and np.array_equal(a, b)
    # predict(deterministic) is the argmax of the policy's own full forward pass
    with torch.no_grad():
        logits, _ = loaded.policy(obs["input_ids"], obs["attention_mask"])
    rows = torch.arange(len(a))
    assert np.array_equal(logits[rows, last_real_column(obs["attention_mask"])].argmax(-1).numpy(), a)


# ----------------------------------------------------------------------------------- generation
def hf_greedy(model: torch.nn.Module, bpe, prompt: str) -> str:
    """The transformers model's own greedy decoding of ``<|endoftext|> + prompt``."""
    ids = torch.tensor([[bpe.eos_token_id, *bpe(prompt, add_special_tokens=False)["input_ids"]]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=M,
        do_sample=False,
        num_beams=1,
        eos_token_id=bpe.eos_token_id,
        pad_token_id=bpe.eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if bpe.eos_token_id in new:
        new = new[: new.index(bpe.eos_token_id)]
    return bpe.decode(new)


def test_greedy_generation_equals_the_models_own(model_dirs, bpe, arch):
    model = hf_ppo(model_dirs[arch])
    prompts = list(TASK.prompts[:8])
    reference = reference_model(model_dirs[arch])
    expected = [hf_greedy(reference, bpe, p) for p in prompts]
    assert len(set(expected)) > 1
    assert model.generate(prompts) == expected
    # the same through the recompute cache
    model.policy.cache = "recompute"
    assert model.generate(prompts) == expected


def test_sampling_and_beam_search(model_dirs):
    model = hf_ppo(model_dirs["gpt2"])
    prompts = list(TASK.prompts[:6])
    sampled = model.generate(prompts, strategy="sample", seed=0)
    assert sampled == model.generate(prompts, strategy="sample", seed=0)
    assert len(sampled) == len(prompts) and all(isinstance(s, str) for s in sampled)
    assert model.generate(prompts, strategy="beam", num_beams=1) == model.generate(prompts)
    beams = model.generate(prompts, strategy="beam", num_beams=3)
    tok = model.tokenizer
    for text in beams:
        assert len(tok.encode(text)) <= M


@pytest.mark.parametrize("num_beams", [2, 4])
def test_cached_beam_search_keeps_the_beams_of_recomputation(model_dirs, arch, num_beams):
    """Beam search through HFKVCache (rows reordered by beam origin each step) against the same
    search recomputing whole sequences every step (cache="recompute"): the same beams."""
    env = vector_env(model_dirs[arch])
    policy = load_policy(model_dirs[arch], env)
    P, tok = env.prompt_window, env.tokenizer
    ids, mask = encode_prompts(tok, list(TASK.prompts[:6]), P, M, torch.device("cpu"))
    cached = beam_search(policy, ids.clone(), mask.clone(), P, M, tok.eos_id, num_beams)
    policy.cache = "recompute"
    recomputed = beam_search(policy, ids.clone(), mask.clone(), P, M, tok.eos_id, num_beams)
    assert torch.equal(cached.tokens, recomputed.tokens) and torch.equal(cached.mask, recomputed.mask)
    torch.testing.assert_close(cached.scores, recomputed.scores, atol=1e-4, rtol=1e-4)
    assert len(set(cached.tokens[:, :, P:].flatten().tolist())) > 3  # not one token repeated


# ------------------------------------------------------------------------------ save_pretrained
def test_save_pretrained_round_trip(model_dirs, tmp_path, arch):
    env = vector_env(model_dirs[arch])
    policy = load_policy(model_dirs[arch], env, seed=3)
    with torch.no_grad():  # weights of its own, not the saved model's
        gen = torch.Generator().manual_seed(4)
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = policy.save_pretrained(tmp_path / "finetuned")
    assert out == tmp_path / "finetuned"
    assert {"config.json", "value_head.pt"} <= {p.name for p in out.iterdir()}
    assert HFTokenizer(out) == env.tokenizer  # the tokenizer is saved beside the model
    restored = HFPolicy.from_pretrained(out, env.tokenizer, env.config.seq_len).eval()
    for (name, a), (_, b) in zip(policy.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    obs = observations(env, steps=2)
    with torch.no_grad():
        logits, values = policy(obs["input_ids"], obs["attention_mask"])
        logits2, values2 = restored(obs["input_ids"], obs["attention_mask"])
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    torch.testing.assert_close(values2, values, atol=0, rtol=0)
    assert values.abs().max() > 0  # the value head was restored, not re-initialised at zero
    # transformers reads it as an ordinary causal LM
    with torch.no_grad():
        ids = torch.tensor([[0, 5, 6, 7]])
        torch.testing.assert_close(
            reference_model(out)(input_ids=ids).logits, policy.model(input_ids=ids).logits, atol=0, rtol=0
        )


def test_saved_policy_directory_trains_again_with_ppo(model_dirs, tmp_path):
    model = hf_ppo(model_dirs["gpt2"])
    model.learn(64)
    out = model.policy.save_pretrained(tmp_path / "finetuned")
    again = hf_ppo(out)  # its tokenizer is read from the same directory
    for (name, a), (_, b) in zip(
        model.policy.state_dict().items(), again.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_save_pretrained_replaces_an_existing_directory_whole(model_dirs, tmp_path):
    env = vector_env(model_dirs["gpt2"], 2)
    policy = load_policy(model_dirs["gpt2"], env)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier run")
    (target / "config.json").write_text("{}")
    policy.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left
    restored = HFPolicy.from_pretrained(target, env.tokenizer, env.config.seq_len)
    torch.testing.assert_close(restored.value_head.weight, policy.value_head.weight, atol=0, rtol=0)


def test_failed_save_pretrained_leaves_the_existing_directory(model_dirs, tmp_path, monkeypatch):
    env = vector_env(model_dirs["gpt2"], 2)
    policy = load_policy(model_dirs["gpt2"], env)
    target = tmp_path / "out"
    policy.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(policy.model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        policy.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
