"""The encoder-decoder policy: its cache against full recompute, padding, sizes, and the agents on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.baselines import evaluate
from agents.buffer import segments
from agents.grpo import GRPO, RLOO
from agents.policy import (
    PolicyConfig,
    TransformerPolicy,
    build_policy,
    count_parameters,
    distinct_rows,
    hidden_from,
)
from agents.ppo import PPO, PPOConfig
from agents.seq2seq import Seq2SeqCache, Seq2SeqPolicy, seq2seq_config_like
from textgym.nn import TransformerDecoder
from textgym.tasks import TASKS
from textgym.vector import TextGenVectorEnv

SEQ2SEQ = PolicyConfig(d_model=32, n_layers=1, encoder_layers=1, architecture="seq2seq")


def randomise(policy: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Large random weights everywhere, so that any difference in what a position sees shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return policy.eval()


def make_policy(vocab: int, max_len: int, prompt_window: int, seed: int = 0, **cfg) -> Seq2SeqPolicy:
    torch.manual_seed(seed)
    config = PolicyConfig(**{"d_model": 32, "n_layers": 2, "architecture": "seq2seq", **cfg})
    return randomise(Seq2SeqPolicy(vocab, max_len, prompt_window, config), seed)


def full_pass(policy: Seq2SeqPolicy, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and values at each row's last real column, by one full forward pass."""
    with torch.no_grad():
        logits, values = policy(obs["input_ids"], obs["attention_mask"])
    last = torch.tensor([int(row.nonzero().max()) for row in obs["attention_mask"]])
    rows = torch.arange(len(last))
    return logits[rows, last], values[rows, last]


def test_shared_prompt_windows_run_the_encoder_once(monkeypatch, assert_same_pass, grouped_sequences):
    """Rows of a group share their prompt window: the encoder runs once per prompt, and the
    decoder's states from the prompt's last column on, and every weight's gradient through them,
    are those of the whole pass."""
    env = TextGenVectorEnv(6, group_size=3, array_type="torch", max_new_tokens=5)
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    policy = make_policy(vocab, L, P).train()
    ids, mask = grouped_sequences(env, [5, 1, 3, 4, 2, 5])
    shared = distinct_rows(ids[:, :P], mask[:, :P])
    assert shared is not None and len(shared[0]) == 2
    encoded = []
    encode = policy.encode
    monkeypatch.setattr(policy, "encode", lambda ids, *a: encoded.append(len(ids)) or encode(ids, *a))
    got = hidden_from(policy, ids, mask, P - 1, shared)  # (6, L - P + 1, C)
    expected = hidden_from(policy, ids, mask, P - 1)
    assert encoded == [2, 6]  # the shared pass, then the whole one
    assert policy.hidden_shared_prefix(ids, mask, P - 1, shared) is None  # the encoder reads the window only
    compared = assert_same_pass(got, expected, mask[:, P - 1 :].bool(), list(policy.parameters()))
    assert compared > 10  # the encoder's weights included


def assert_matches_full_pass(policy, obs, logits, values) -> None:
    ref_logits, ref_values = full_pass(policy, obs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- configuration
def test_config_names_what_is_wrong():
    with pytest.raises(ValueError, match="architecture must be one of 'decoder', 'seq2seq', got 'rnn'"):
        PolicyConfig(architecture="rnn")
    with pytest.raises(ValueError, match="encoder_layers=2 applies to architecture='seq2seq' only"):
        PolicyConfig(encoder_layers=2)
    with pytest.raises(ValueError, match="encoder_layers must be None or a positive integer, got 0"):
        PolicyConfig(architecture="seq2seq", encoder_layers=0)
    with pytest.raises(ValueError, match="TransformerDecoder is decoder-only"):
        TransformerDecoder(20, 16, SEQ2SEQ)
    with pytest.raises(ValueError, match=r"needs PolicyConfig\.architecture='seq2seq'"):
        Seq2SeqPolicy(20, 16, 8, PolicyConfig())
    with pytest.raises(ValueError, match="prompt_window must be in"):
        Seq2SeqPolicy(20, 16, 16, SEQ2SEQ)
    assert isinstance(build_policy(20, 16, 8, SEQ2SEQ), Seq2SeqPolicy)
    assert isinstance(build_policy(20, 16, 8, PolicyConfig()), TransformerPolicy)
    assert PPOConfig.from_dict({"policy": {"architecture": "seq2seq"}}).policy.architecture == "seq2seq"


def test_agents_refuse_seq2seq_with_a_pretrained_decoder(tmp_path):
    with pytest.raises(ValueError, match="init_policy and policy_model give decoder-only language models"):
        PPO(config=PPOConfig(policy=SEQ2SEQ), num_envs=2, device="cpu", init_policy=tmp_path / "lm.pt")


def test_hidden_refuses_a_cut_prompt_window():
    policy = make_policy(20, 16, 8)
    with pytest.raises(ValueError, match="reads observations of 8 to 16 columns"):
        policy.hidden(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long))


# --------------------------------------------------------------------------------- forward pass
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_padding_in_the_prompt_changes_nothing(positional):
    """One prompt in a window of 8 columns: left-padded (the env's layout) with zeros or with
    garbage ids under the padding, padded on both sides, right-padded; garbage after the end too:
    identical outputs at every column from the window's last on; a different prompt token changes
    them."""
    P, L = 8, 12
    policy = make_policy(20, L, P, positional=positional, seed=2)
    prompt, generated = [1, 7, 8, 9], [10, 11]
    starts = [4, 4, 2, 0]  # the prompt's first column in each row
    ids, mask = torch.zeros(4, L, dtype=torch.long), torch.zeros(4, L, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for row, start in enumerate(starts):
        if row:
            ids[row] = torch.randint(4, 20, (L,), generator=gen)  # garbage under all padding
        ids[row, start : start + 4], mask[row, start : start + 4] = torch.tensor(prompt), 1
    ids[:, P : P + 2], mask[:, P : P + 2] = torch.tensor(generated), 1
    with torch.no_grad():
        logits, values = policy(ids, mask)
    for row in (1, 2, 3):
        torch.testing.assert_close(logits[row, P - 1 : P + 2], logits[0, P - 1 : P + 2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[row, P - 1 : P + 2], values[0, P - 1 : P + 2], atol=1e-5, rtol=1e-5)
    # Every column of the prompt window reads the state after the prompt (the decoder's start).
    torch.testing.assert_close(logits[3, 3], logits[0, P - 1], atol=1e-5, rtol=1e-5)
    other = ids.clone()
    other[0, 4] = 15  # the prompt's first token: the encoder is bidirectional, the start state sees it
    with torch.no_grad():
        changed, _ = policy(other, mask)
    assert (changed[0, P - 1] - logits[0, P - 1]).abs().max() > 1e-3


def test_decoder_is_causal():
    policy = make_policy(20, 12, 8)
    ids = torch.randint(4, 20, (1, 12))
    mask = torch.ones_like(ids)
    later = ids.clone()
    later[0, 10] = (later[0, 10] + 1 - 4) % 16 + 4
    with torch.no_grad():
        a, b = policy(ids, mask)[0], policy(later, mask)[0]
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert (a[0, 10:] - b[0, 10:]).abs().max() > 1e-3


# -------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
@pytest.mark.parametrize("host", [False, True], ids=["read", "host-view"])
def test_cache_equals_full_recompute_across_autoresets(
    task, autoreset_mode, positional, host, random_rollout
):
    env = TextGenVectorEnv(8, task=task, autoreset_mode=autoreset_mode, array_type="torch")
    P = env.prompt_window
    policy = make_policy(env.single_action_space.n, env.config.seq_len, P, positional=positional)
    cache = policy.make_cache(8, "cpu")
    new_rows = []  # per step, the rows that start an episode
    for obs in random_rollout(env, 3 * env.config.max_new_tokens + 2):
        host_view = env.host_view if host else None
        assert_matches_full_pass(
            policy, obs, *cache.step(obs["input_ids"], obs["attention_mask"], P, host_view)
        )
        new_rows.append(int((obs["attention_mask"][:, P:].sum(1) == 0).sum()))
    # Many rows restarted, at steps where other rows kept decoding.
    assert sum(new_rows[1:]) > 8 and sum(0 < n < 8 for n in new_rows) > 3


def test_cache_rows_restart_mid_rollout_and_wait(hand_rollout):
    """Prompts of <bos> alone, short and full windows; rows restarting while others decode; rows
    that stay at the last column (as a group's waiting rows do)."""
    policy = make_policy(20, 16, 5)
    cache = policy.make_cache(3, "cpu")
    for obs in hand_rollout(20, P=5, L=16):
        logits, values = cache.step(obs["input_ids"], obs["attention_mask"], 5)
        assert_matches_full_pass(policy, obs, logits, values)


def test_rebuild_after_new_weights_then_decoding_continues(random_rollout):
    env = TextGenVectorEnv(8, autoreset_mode="same_step", array_type="torch")
    P = env.prompt_window
    policy = make_policy(env.single_action_space.n, env.config.seq_len, P)
    cache = policy.make_cache(8, "cpu")
    for t, obs in enumerate(random_rollout(env, 12, seed=2, reset_seed=0)):
        ids, mask = obs["input_ids"], obs["attention_mask"]
        if t < 5:
            cache.step(ids, mask, P)
        elif t == 5:
            randomise(policy, seed=7)  # as after an update
            stale, _ = cache.step(ids, mask, P)
            assert (stale - full_pass(policy, obs)[0]).abs().max() > 1e-3  # the check below can fail
            assert_matches_full_pass(policy, obs, *cache.rebuild(ids, mask))
        else:
            assert_matches_full_pass(policy, obs, *cache.step(ids, mask, P))


def test_cache_shapes_reorder_and_a_wrong_window():
    policy = make_policy(20, 16, 6, encoder_layers=1)
    cache = policy.make_cache(5, "cpu")
    assert len(cache.keys) == len(cache.cross_keys) == 2 and len(policy.encoder) == 1
    assert cache.keys[0].shape == (5, 4, 11, 8) and cache.cross_values[1].shape == (5, 4, 6, 8)
    ids = torch.randint(4, 20, (5, 16))
    mask = torch.zeros_like(ids)
    mask[:, 2:6] = 1
    cache.step(ids, mask, 6)
    order = torch.tensor([4, 4, 0, 1, 2])
    cache.reorder(order)
    mask[:, 6] = 1
    ids, mask = ids[order], mask[order]
    assert_matches_full_pass(policy, {"input_ids": ids, "attention_mask": mask}, *cache.step(ids, mask, 6))
    with pytest.raises(ValueError, match="built for a prompt window of 6 columns, got prompt_window=5"):
        cache.step(ids, mask, 5)


def test_generate_greedy_and_beams_through_the_cache():
    model = PPO(config=PPOConfig(policy=SEQ2SEQ), num_envs=2, device="cpu", seed=0)
    randomise(model.policy, seed=3, std=0.2)
    assert isinstance(model._cache, Seq2SeqCache)
    prompts = ["the cat", "a dog"]
    greedy = model.generate(prompts)
    assert greedy == model.generate(prompts, strategy="beam", num_beams=1)
    assert len(model.generate(prompts, strategy="beam", num_beams=3)) == 2


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("task", ["default", *sorted(TASKS)])
def test_seq2seq_config_like_is_within_ten_percent(task):
    env = TextGenVectorEnv(1, task=task)
    vocab, L, P = env.single_action_space.n, env.config.seq_len, env.prompt_window
    decoder = PolicyConfig()
    seq2seq = seq2seq_config_like(decoder, vocab, L, P)
    assert (seq2seq.architecture, seq2seq.encoder_layers, seq2seq.n_layers) == ("seq2seq", 1, 1)
    target, got = count_parameters(vocab, L, P, decoder), count_parameters(vocab, L, P, seq2seq)
    assert abs(got / target - 1) < 0.1, (target, got)
    # The count is that of the policy the agents build.
    assert got == sum(p.numel() for p in build_policy(vocab, L, P, seq2seq).parameters())


def test_the_documented_pair_of_equal_size_configs():
    """The pair README.md gives for the default task."""
    env = TextGenVectorEnv(1)
    shape = (env.single_action_space.n, env.config.seq_len, env.prompt_window)
    decoder = count_parameters(*shape, PolicyConfig())
    seq2seq = count_parameters(
        *shape, PolicyConfig(d_model=60, n_layers=1, encoder_layers=1, architecture="seq2seq")
    )
    assert (decoder, seq2seq) == (118_148, 120_012)


# ----------------------------------------------------------------------------------------- agents
def small_ppo(n_steps: int = 16) -> PPO:
    model = PPO(config=PPOConfig(n_steps=n_steps, policy=SEQ2SEQ), num_envs=8, device="cpu", seed=0)
    with torch.no_grad():
        torch.nn.init.normal_(model.policy.value_head.weight, std=0.5)
    model._obs = model.env.reset(seed=0)[0]
    return model


def test_first_epoch_ppo_ratio_is_one():
    """The rollout's log-probs and values (through the cache) are those of the update's passes over
    whole sequences, on rollouts that start mid-episode too; so the first minibatch clips nothing."""
    model = small_ppo()
    assert isinstance(model.policy, Seq2SeqPolicy)
    for _ in range(2):
        rollout, last_values, last_dones = model.collect_rollout()
        seg = segments(rollout, model.prompt_window)
        with torch.no_grad():
            logits, values = model.policy.heads(
                model.policy.hidden(seg.input_ids, seg.attention_mask)[seg.segment, seg.column]
            )
        logp = F.log_softmax(logits, -1).gather(1, rollout.actions.reshape(-1, 1)).squeeze(1)
        torch.testing.assert_close(logp, rollout.logprobs.reshape(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(values, rollout.values.reshape(-1), atol=1e-5, rtol=0)
        stats = model.update(rollout, last_values, last_dones)
        # The first of 4 x 4 minibatch steps is reported with the others; one step alone:
    model = small_ppo()
    model.config = PPOConfig(n_steps=16, n_epochs=1, num_minibatches=1, policy=SEQ2SEQ)
    rollout, last_values, last_dones = model.collect_rollout()
    stats = model.update(rollout, last_values, last_dones)
    assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-6
    assert abs(stats["train/policy_gradient_loss"]) < 1e-5  # ratio 1, normalised advantages


def test_save_load_round_trip_and_exact_resume(tmp_path):
    cfg = PPOConfig(n_steps=8, anneal_lr=False, policy=SEQ2SEQ)
    a = PPO(config=cfg, num_envs=8, device="cpu", seed=3)
    a.learn(8 * 8 * 4)
    b = PPO(config=cfg, num_envs=8, device="cpu", seed=3)
    b.learn(8 * 8 * 2)
    path = b.save(tmp_path / "ckpt.pt")
    loaded = PPO.load(path, device="cpu")
    assert loaded.config == b.config and isinstance(loaded.policy, Seq2SeqPolicy)
    assert loaded.num_timesteps == 128
    for (name, x), (_, y) in zip(
        b.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    env = TextGenVectorEnv(16, autoreset_mode="same_step")
    obs, _ = env.reset(seed=1)
    obs = env.step(np.full(16, 5))[0]
    x, _ = b.predict(obs, deterministic=True)
    y, _ = loaded.predict(obs, deterministic=True)
    assert x.shape == (16,) and np.array_equal(x, y)
    # Resuming gives the weights of the uninterrupted run.
    torch.manual_seed(12345)  # the global RNG state must come from the checkpoint, not from here
    loaded = PPO.load(path, device="cpu")
    loaded.learn(8 * 8 * 2, reset_num_timesteps=False)
    for (name, x), (_, y) in zip(
        a.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name


def test_short_ppo_training_beats_the_random_policy():
    cfg = seq2seq_config_like(PolicyConfig(), 131, 17, 9)  # the default task's sizes
    model = PPO(config=PPOConfig(policy=cfg), num_envs=32, device="cpu", seed=0)
    model.learn(16_384)
    random_level = evaluate(None, {"task": "default"})["mean"]
    greedy = evaluate(lambda obs: model.predict(obs, deterministic=True)[0], {"task": "default"})["mean"]
    assert 0.15 < random_level < 0.3
    assert model.last_stats["rollout/ep_rew_mean"] >= random_level + 0.3, model.last_stats
    assert greedy >= random_level + 0.3, (random_level, greedy)


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_group_agents_ratio_is_one_and_they_train(cls):
    """The group agents take the seq2seq policy through the same interface: the rollout's
    log-probs are those of the update's pass (with a KL reference, a copy of the policy), and an
    update moves the weights."""
    config = cls.config_class(group_size=4, policy=SEQ2SEQ, n_epochs=1, num_minibatches=1, beta=0.05)
    model = cls("TextGen-v0", config, 8, {}, "cpu", 0)
    assert isinstance(model.policy, Seq2SeqPolicy) and isinstance(model.reference, Seq2SeqPolicy)
    model._obs = model.env.reset(seed=0)[0]
    rollout = model.collect_rollout()
    P, M = model.prompt_window, model.env.config.max_new_tokens
    with torch.no_grad():
        logits, _ = model.policy(rollout.input_ids, rollout.attention_mask)
    logp = F.log_softmax(logits[:, P - 1 : P - 1 + M], -1)
    logp = logp.gather(2, rollout.input_ids[:, P : P + M].unsqueeze(2)).squeeze(2)
    valid = torch.arange(M).unsqueeze(0) < rollout.lengths.unsqueeze(1)
    torch.testing.assert_close(logp[valid], rollout.logprobs[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.ref_logprobs[valid], rollout.logprobs[valid], atol=1e-5, rtol=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    stats = model.update(rollout)
    assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_the_speed_benchmark_compares_policies_of_equal_size():
    from agents.benchmark import seq2seq_speed

    report = seq2seq_speed(total_timesteps=256, num_envs=8, rounds=1)
    decoder, seq2seq = report["decoder"], report["seq2seq"]
    assert seq2seq["policy"]["architecture"] == "seq2seq" and decoder["policy"]["architecture"] == "decoder"
    assert (decoder["parameters"], seq2seq["parameters"]) == (118_148, 120_012)
    assert decoder["env_steps"] == seq2seq["env_steps"] == 256
    assert report["ratio"] == seq2seq["env_steps_per_second"] / decoder["env_steps_per_second"] > 0
