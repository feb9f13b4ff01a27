"""The Transformer policy: configuration, shapes, causality, padding, positions and the KV cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.policy import (
    KVCache,
    PolicyConfig,
    TransformerPolicy,
    distinct_rows,
    hidden_from,
    last_real_column,
    sample_tokens,
    sinusoidal_encoding,
)
from textgym.tasks import TASKS
from textgym.vector import TextGenVectorEnv


def randomise(policy: TransformerPolicy, seed: int = 0, std: float = 0.3) -> TransformerPolicy:
    """Large random weights everywhere, so that any difference in what a column sees shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return policy.eval()


def make_policy(vocab=20, max_len=16, seed=0, **cfg) -> TransformerPolicy:
    torch.manual_seed(seed)
    return randomise(TransformerPolicy(vocab, max_len, PolicyConfig(d_model=32, n_heads=4, **cfg)), seed)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"d_model": 64.0}, "d_model must be a positive integer"),
        ({"n_layers": -1}, "n_layers must be a positive integer"),
        ({"n_layers": True}, "n_layers must be a positive integer"),
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"mlp_ratio": 1.5}, "mlp_ratio must be a positive integer"),
        ({"d_model": 10, "n_heads": 4}, "n_heads=4 must divide d_model=10"),
        ({"positional": "rope"}, "positional must be 'learned' or 'sinusoidal'"),
    ],
)
def test_policy_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


def test_policy_config_is_frozen():
    cfg = PolicyConfig()
    with pytest.raises(AttributeError):
        cfg.d_model = 8  # type: ignore[misc]


# ------------------------------------------------------------------------------ forward pass
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_forward_shapes(positional):
    policy = make_policy(vocab=23, max_len=16, positional=positional)
    ids = torch.randint(0, 23, (3, 16))
    mask = torch.ones_like(ids)
    logits, values = policy(ids, mask)
    assert logits.shape == (3, 16, 23) and values.shape == (3, 16)
    assert policy.hidden(ids, mask).shape == (3, 16, 32)
    logits, values = policy(ids[:, :5], mask[:, :5])  # shorter than max_len
    assert logits.shape == (3, 5, 23) and values.shape == (3, 5)
    assert torch.isfinite(logits).all() and torch.isfinite(values).all()
    state = policy.state_dict()
    assert ("pos_emb.weight" in state) == (positional == "learned")
    assert "pos_table" not in state  # a fixed buffer, not a parameter to save


def test_fresh_policy_starts_near_uniform_with_zero_values():
    torch.manual_seed(0)
    policy = TransformerPolicy(50, 12)
    ids = torch.randint(0, 50, (4, 12))
    logits, values = policy(ids, torch.ones_like(ids))
    assert logits.abs().max() < 0.05
    assert torch.all(values == 0)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_causality(positional):
    policy = make_policy(positional=positional, seed=1)
    ids = torch.randint(4, 20, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row too
    logits, values = policy(ids, mask)
    for j in (5, 10, 15):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1 - 4) % 16 + 4
        logits2, values2 = policy(changed, mask)
        torch.testing.assert_close(logits2[:, :j], logits[:, :j], atol=1e-6, rtol=0)
        torch.testing.assert_close(values2[:, :j], values[:, :j], atol=1e-6, rtol=0)
        assert (logits2[:, j] - logits[:, j]).abs().max() > 1e-3  # the changed column does see it


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_padding_invariance(positional):
    """One prompt and continuation, laid out with 2 or 4 columns of left padding (prompt windows
    of 6 and 8), with garbage ids under the padding: identical outputs at every real column."""
    policy = make_policy(vocab=20, max_len=12, positional=positional, seed=2)
    text = [1, 7, 8, 9, 10, 11]  # <bos>, a 3-token prompt, 2 generated tokens
    ids = torch.tensor(
        [
            [0, 0, *text, 0, 0, 0, 0],  # P = 6: prompt in columns 2..5, generated from 6
            [13, 17, 5, 19, *text, 0, 0],  # P = 8: garbage under the padding
            [0, 0, 0, 0, *text, 4, 12],  # P = 8, garbage after the end
        ]
    )
    mask = torch.zeros_like(ids)
    mask[0, 2:8] = 1
    mask[1:, 4:10] = 1
    logits, values = policy(ids, mask)
    for row in (1, 2):
        torch.testing.assert_close(logits[row, 4:10], logits[0, 2:8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[row, 4:10], values[0, 2:8], atol=1e-5, rtol=1e-5)
    # Without padding at all, as a row of exactly the text.
    t = torch.tensor([text])
    logits_t, values_t = policy(t, torch.ones_like(t))
    torch.testing.assert_close(logits_t[0], logits[0, 2:8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values_t[0], values[0, 2:8], atol=1e-5, rtol=1e-5)
    # A different prompt gives different outputs (the test can see a difference).
    other = ids.clone()
    other[0, 3] = 15
    assert (policy(other, mask)[0][0, 7] - logits[0, 7]).abs().max() > 1e-3


def test_last_real_column():
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert last_real_column(mask).tolist() == [3, 4, 4, 1, -1]
    assert last_real_column(mask.bool()).tolist() == [3, 4, 4, 1, -1]


def test_sinusoidal_encoding_by_hand():
    enc = sinusoidal_encoding(6, 8)
    assert enc.shape == (6, 8)
    assert enc[0].tolist() == [0.0, 1.0] * 4
    for p in (1, 5):
        for i in range(4):
            angle = p / 10_000 ** (2 * i / 8)
            assert enc[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert enc[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert enc[3, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert enc[3, 1].item() == pytest.approx(math.cos(3.0), abs=1e-6)
    odd = sinusoidal_encoding(4, 5)  # an odd width: 3 sines, 2 cosines
    assert odd.shape == (4, 5)
    assert odd[2, 4].item() == pytest.approx(math.sin(2 / 10_000 ** (4 / 5)), abs=1e-6)
    assert odd[2, 3].item() == pytest.approx(math.cos(2 / 10_000 ** (2 / 5)), abs=1e-6)


def test_sinusoidal_policy_uses_the_table():
    policy = make_policy(positional="sinusoidal")
    torch.testing.assert_close(policy.pos_table, sinusoidal_encoding(16, 32))


@pytest.mark.parametrize("start", [0, 3, 7])
def test_hidden_from_a_start_column_equals_the_full_pass_cut(start):
    """The last block runs on columns [start, T) alone: the same hidden states there, and the same
    gradients for every weight, as the full pass cut afterwards (prompt columns still feed
    attention, through their keys and values)."""
    policy = make_policy(vocab=20, max_len=10, n_layers=3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (4, 10), generator=gen)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 8:] = 0  # an early end
    outputs, grads = [], []
    for cut in (False, True):
        policy.zero_grad()
        hidden = hidden_from(policy, ids, mask, start) if cut else policy.hidden(ids, mask)[:, start:]
        assert hidden.shape == (4, 10 - start, 32)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        outputs.append(hidden.detach())
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert grads[1].keys() == grads[0].keys() and "blocks.2.mlp.0.weight" in grads[0]
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-5)


def test_hidden_from_cuts_the_outputs_of_other_models():
    """A model without the start option (here the encoder-decoder policy) gives every column; the
    columns before ``start`` are cut."""
    from agents.policy import build_policy

    torch.manual_seed(0)
    policy = build_policy(20, 10, 4, PolicyConfig(d_model=32, architecture="seq2seq")).eval()
    ids = torch.randint(0, 20, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(hidden_from(policy, ids, mask, 3), policy.hidden(ids, mask)[:, 3:])


# --------------------------------------------------------------------------------- KV cache
def full_pass(policy: TransformerPolicy, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and values at each row's last real column, by one full forward pass."""
    with torch.no_grad():
        logits, values = policy(obs["input_ids"], obs["attention_mask"])
    mask = obs["attention_mask"]
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    rows = torch.arange(len(mask))
    return logits[rows, last], values[rows, last]


def random_actions(gen: torch.Generator, n: int, vocab: int, eos: int) -> torch.Tensor:
    """Uniform token ids, with extra <eos> so that episodes end at many different lengths."""
    actions = torch.randint(0, vocab, (n,), generator=gen)
    actions[torch.rand(n, generator=gen) < 0.15] = eos
    return actions


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
@pytest.mark.parametrize("host", [False, True], ids=["read", "host-view"])
def test_kv_cache_equals_full_recompute(task, autoreset_mode, positional, host, random_rollout):
    """Stepped as agents step it (the env's host view says which rows start and how far the
    furthest has got) and without it (read from the observations on the device): the same."""
    env = TextGenVectorEnv(8, task=task, autoreset_mode=autoreset_mode, array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    torch.manual_seed(0)
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32, positional=positional)))
    cache = KVCache(policy, 8, "cpu")
    starts = 0
    for obs in random_rollout(env, 3 * env.config.max_new_tokens + 2):
        logits, values = cache.step(
            obs["input_ids"], obs["attention_mask"], P, env.host_view if host else None
        )
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
        starts += int((obs["attention_mask"][:, P:].sum(1) == 0).sum())
    assert starts > 16  # the rollout crossed many episode boundaries (8 rows start at the reset)


@pytest.mark.parametrize("group_size", [1, 4])
def test_rows_starting_on_one_prompt_are_prefilled_once(group_size, random_rollout):
    """Rows that start on the same prompt in one step (the rows of a group, or a chance repeat)
    are prefilled once, and the others get a copy of those slots: the same logits as a full pass."""
    env = TextGenVectorEnv(8, autoreset_mode="same_step", array_type="torch", group_size=group_size)
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    policy = make_policy(vocab=vocab, max_len=L)
    cache = KVCache(policy, 8, "cpu")
    prefilled, started = [], []
    prefill = cache._prefill
    cache._prefill = lambda rows, *args: prefilled.append(len(rows)) or prefill(rows, *args)
    for obs in random_rollout(env, 3 * env.config.max_new_tokens):
        starting = (env.host_view.generated == 0) & (env.host_view.prompt_length > 1)
        started.append(len(np.unique(env.host_view.prompt_index[starting])))
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P, env.host_view)
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    assert sum(prefilled) == sum(started)  # one prefilled row per prompt starting in a step
    if group_size > 1:
        assert sum(prefilled) <= 8 * len(prefilled) // group_size  # a group's rows start together


def test_autocast_runs_the_policy_and_its_cache_in_bfloat16(random_rollout):
    """TransformerPolicy.autocast: products and the KV cache in bfloat16, logits and values in
    float32. Acting through the cache gives the full pass's logits within bfloat16's precision,
    and both stay near the float32 policy's; the weights' gradients are float32."""
    env = TextGenVectorEnv(6, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32)), std=0.1)
    policy.autocast = True
    cache = KVCache(policy, 6, "cpu")
    assert all(t.dtype == torch.bfloat16 for t in (*cache.keys, *cache.values))
    for obs in random_rollout(env, 2 * env.config.max_new_tokens):
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P, env.host_view)
        assert logits.dtype == values.dtype == torch.float32
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.05)
        torch.testing.assert_close(values, ref_values, atol=0.05, rtol=0.05)
        policy.autocast = False
        float_logits, _ = full_pass(policy, obs)
        policy.autocast = True
        torch.testing.assert_close(logits, float_logits, atol=0.05, rtol=0.05)
        assert not torch.equal(logits, float_logits)  # bfloat16 products, not float32 ones
    ids, mask = obs["input_ids"], obs["attention_mask"]
    shared = distinct_rows(ids[:, :P], mask[:, :P]) or (torch.arange(6), torch.arange(6))
    whole = hidden_from(policy, ids, mask, P - 1)
    prefix = hidden_from(policy, ids, mask, P - 1, shared)  # bfloat16 slots for the shared keys
    torch.testing.assert_close(prefix, whole, atol=0.05, rtol=0.05)
    policy.train()
    logits, values = policy.heads(hidden_from(policy, ids, mask, P - 1))
    (logits.logsumexp(-1).sum() + values.sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.parameters())


def test_kv_cache_rebuild_equals_full_pass():
    env = TextGenVectorEnv(8, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    torch.manual_seed(0)
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32)))
    cache = KVCache(policy, 8, "cpu")
    gen = torch.Generator().manual_seed(2)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        cache.step(obs["input_ids"], obs["attention_mask"], P)
        obs = env.step(random_actions(gen, 8, vocab, env.tokenizer.eos_id))[0]
    # New weights, as after a PPO update: the stale cache is rebuilt from the observations.
    randomise(policy, seed=7)
    logits, values = cache.rebuild(obs["input_ids"], obs["attention_mask"])
    ref_logits, ref_values = full_pass(policy, obs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    # ... and decoding continues from the rebuilt keys and values.
    for _ in range(6):
        obs = env.step(random_actions(gen, 8, vocab, env.tokenizer.eos_id))[0]
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


def test_distinct_rows():
    # rows 0, 2 and 3 hold the same real tokens; row 3's padding columns hold other ids
    ids = torch.tensor([[0, 5, 6], [0, 5, 7], [0, 5, 6], [9, 5, 6], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    first, inverse = distinct_rows(ids, mask)
    assert sorted(first.tolist()) == [0, 1, 4]
    assert first[inverse].tolist() == [0, 1, 0, 0, 4]  # every row's first twin
    assert distinct_rows(ids[:2], mask[:2]) is None  # all distinct
    assert distinct_rows(ids[:1], mask[:1]) is None


def test_kv_cache_rebuild_of_groups_computes_each_prompt_once(monkeypatch):
    """Rows of a group start on one prompt: the rebuild runs each distinct row once, copies its
    keys and values to its twins, and every row then decodes its own tokens as a full pass does."""
    env = TextGenVectorEnv(8, group_size=4, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32)))
    cache = KVCache(policy, 8, "cpu")
    obs, _ = env.reset(seed=0)
    fed = []
    run = cache._run
    monkeypatch.setattr(
        cache, "_run", lambda rows, ids, *a, **k: fed.append(len(ids)) or run(rows, ids, *a, **k)
    )
    logits, values = cache.rebuild(obs["input_ids"], obs["attention_mask"])
    assert fed == [2]  # two groups, two prompts
    ref_logits, ref_values = full_pass(policy, obs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(3)
    for _ in range(env.config.max_new_tokens):
        obs = env.step(random_actions(gen, 8, vocab, env.tokenizer.eos_id))[0]
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_hidden_with_shared_prompts_equals_the_whole_pass(
    n_layers, monkeypatch, assert_same_pass, grouped_sequences
):
    """The built-in decoder runs each shared prompt once: the hidden states of every row's
    columns from its prompt's last on, and every weight's gradient through them, are those of
    the whole pass; an unshared prompt (a group of one) too."""
    env = TextGenVectorEnv(6, group_size=3, array_type="torch", max_new_tokens=5)
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    torch.manual_seed(0)
    policy = randomise(
        TransformerPolicy(vocab, L, PolicyConfig(d_model=32, n_layers=n_layers)), std=0.2
    ).train()
    ids, mask = grouped_sequences(env, [5, 1, 3, 4, 2, 5])
    ids[5, :P], mask[5, :P] = ids[0, :P], mask[0, :P]  # group 1's last row on group 0's prompt
    shared = distinct_rows(ids[:, :P], mask[:, :P])
    assert shared is not None and len(shared[0]) == 2  # rows 0-2 and 5, rows 3-4
    blocks = []
    run = policy.blocks[0].forward
    monkeypatch.setattr(
        policy.blocks[0], "forward", lambda x, *a, **k: blocks.append(x.shape[:2]) or run(x, *a, **k)
    )
    got = hidden_from(policy, ids, mask, P - 1, shared)  # (6, L - P + 1, C)
    assert blocks == [(2, P), (6, L - P)]  # each prompt once, then every row's completion columns
    expected = hidden_from(policy, ids, mask, P - 1)
    compared = assert_same_pass(got, expected, mask[:, P - 1 :].bool(), list(policy.parameters()))
    assert compared >= 6 * n_layers  # embeddings, attention and MLP weights of every block


def test_kv_cache_without_rebuild_is_stale():
    """The check above can fail: after a weight change the un-rebuilt cache disagrees."""
    env = TextGenVectorEnv(4, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    torch.manual_seed(0)
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32)))
    cache = KVCache(policy, 4, "cpu")
    obs, _ = env.reset(seed=0)
    cache.step(obs["input_ids"], obs["attention_mask"], P)
    obs = env.step(torch.full((4,), 10))[0]
    randomise(policy, seed=5)
    logits, _ = cache.step(obs["input_ids"], obs["attention_mask"], P)
    ref_logits, _ = full_pass(policy, obs)
    assert (logits - ref_logits).abs().max() > 1e-3


def test_kv_cache_shapes_and_dtype():
    policy = make_policy(vocab=20, max_len=16)
    cache = KVCache(policy, 5, "cpu")
    assert len(cache.keys) == len(cache.values) == policy.cfg.n_layers
    for k in (*cache.keys, *cache.values):
        assert k.shape == (5, 4, 16, 8) and k.dtype == torch.float32


def test_kv_cache_prompts_of_bos_alone_and_restarts_mid_rollout(hand_rollout):
    """The step prefills new rows over the prompt window but its last column, then decodes every
    row's newest token together: a <bos>-only prompt has nothing to prefill."""
    policy = make_policy(vocab=20, max_len=16)
    cache = KVCache(policy, 3, "cpu")
    for obs in hand_rollout(20, P=5, L=16):
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], 5)
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


def test_compiled_decoding_equals_eager_and_full_recompute(random_rollout):
    """KVCache(compile=True): the step compiled with fixed shapes (attention over every slot, the
    unfilled ones masked) gives the eager step's logits and values and the full pass's, and fills
    the same keys and values, across many autoresets; it compiles once (no recompilation as the
    filled width grows)."""
    env = TextGenVectorEnv(6, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    torch.manual_seed(0)
    policy = randomise(TransformerPolicy(vocab, L, PolicyConfig(d_model=32)))
    eager, compiled = KVCache(policy, 6, "cpu"), policy.make_cache(6, "cpu", compile=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for obs in random_rollout(env, 2 * env.config.max_new_tokens + 3):
            want = eager.step(obs["input_ids"], obs["attention_mask"], P)
            got = compiled.step(obs["input_ids"], obs["attention_mask"], P)
            ref_logits, ref_values = full_pass(policy, obs)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[0], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], ref_values, atol=1e-5, rtol=1e-5)
    assert compiled._compiled is not None  # it stayed compiled: no fallback happened
    for a, b in zip([*compiled.keys, *compiled.values], [*eager.keys, *eager.values], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_decoding_falls_back_to_eager_with_a_warning(monkeypatch, random_rollout):
    def failing(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    env = TextGenVectorEnv(4, autoreset_mode="same_step", array_type="torch")
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    policy = make_policy(vocab=vocab, max_len=L)
    cache = KVCache(policy, 4, "cpu", compile=True)
    cache._compiled = failing
    observations = list(random_rollout(env, 4))
    with pytest.warns(RuntimeWarning, match="decoding eagerly.*|.*no C.. compiler"):
        cache.step(observations[0]["input_ids"], observations[0]["attention_mask"], P)
    assert cache._compiled is None
    for obs in observations[1:]:
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], P)
        ref_logits, ref_values = full_pass(policy, obs)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


def test_a_graphed_caches_reorder_keeps_its_storage(random_rollout):
    """A cache whose decoding step is a CUDA graph (compile=True on a CUDA device) must reorder
    its rows inside the tensors the graph was captured on; the rows end up where the copying
    reorder of an ordinary cache puts them. (Replays themselves need a GPU: tests/test_cuda.py.)"""
    env = TextGenVectorEnv(5, autoreset_mode="same_step", array_type="torch")
    policy = make_policy(vocab=env.single_action_space.n, max_len=env.config.seq_len)
    copying, graphed = KVCache(policy, 5, "cpu"), KVCache(policy, 5, "cpu")
    graphed._graphed = True  # what compile=True sets on a CUDA device
    for obs in random_rollout(env, 4):
        for cache in (copying, graphed):
            cache.step(obs["input_ids"], obs["attention_mask"], env.prompt_window)
    storage = [t.data_ptr() for t in (*graphed.keys, *graphed.values)]
    rows = torch.tensor([4, 4, 0, 2, 1])
    copying.reorder(rows)
    graphed.reorder(rows)
    assert [t.data_ptr() for t in (*graphed.keys, *graphed.values)] == storage
    for a, b in zip([*graphed.keys, *graphed.values], [*copying.keys, *copying.values], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ sample_tokens
def test_sample_tokens_draws_each_token_at_its_probability():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [2.0, 1.0, 0.0, 1.0]])  # the second row unnormalised
    n = 40_000
    draws = sample_tokens(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(2, n)
    for row, p in zip(draws, probs / probs.sum(1, keepdim=True), strict=True):
        freq = torch.bincount(row, minlength=4).double() / n
        sigma = (p.double() * (1 - p.double()) / n).sqrt()
        assert torch.all((freq - p.double()).abs() <= 4 * sigma + 1e-12), (freq, p)
        assert freq[p == 0].sum() == 0  # probability 0: never drawn


def test_sample_tokens_inverts_the_cumulative_distribution_at_its_uniform_draw():
    probs = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(3)), -1)
    probs[:, 0] = 0.0  # a masked first token, a masked last one
    probs[:, -1] = 0.0
    got = sample_tokens(probs, torch.Generator().manual_seed(11))
    u = torch.rand(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    for row in range(5):
        running, target = 0.0, float(u[row]) * float(probs[row].double().sum())
        expected = None
        for token, p in enumerate(probs[row].double().tolist()):  # the first token past the draw
            running += p
            if expected is None and running > target:
                expected = token
        assert int(got[row]) == expected and 0 < expected < 6
    one_hot = torch.zeros(3, 9)
    one_hot[torch.arange(3), torch.tensor([0, 4, 8])] = 1.0
    assert sample_tokens(one_hot).tolist() == [0, 4, 8]  # whatever the draw, the only possible token
