"""The KL penalty to a reference policy: its coefficient (fixed or adaptive), its reward term, logs
and checkpoints."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.kl import KLController
from agents.lm import load_lm, save_lm
from agents.policy import PolicyConfig, TransformerPolicy, last_real_column
from agents.ppo import PPO, PPOConfig
from textgym.tasks import make_env_config

TINY = PolicyConfig(d_model=16, n_layers=1, n_heads=2)
KL_TAGS = {"train/kl_ref", "train/kl_ref_sampled", "train/kl_coef"}


def tiny(num_envs: int = 4, seed: int = 0, env_kwargs=None, **config) -> PPO:
    config = {"n_steps": 8, "policy": TINY, **config}
    return PPO(
        "TextGen-v0", PPOConfig(**config), num_envs=num_envs, env_kwargs=env_kwargs, device="cpu", seed=seed
    )


def rollout_with_env_rewards(model: PPO, seed: int = 0):
    """One collect_rollout from a fresh reset (as learn() starts), with the env's own rewards."""
    model._obs = model.env.reset(seed=seed)[0]
    model._episode_kl.zero_()
    env_rewards = []
    step = model.env.step

    def recording_step(action):
        out = step(action)
        env_rewards.append(out[1].clone())
        return out

    model.env.step = recording_step
    try:
        rollout, _, _ = model.collect_rollout()
    finally:
        del model.env.step
    return rollout, torch.stack(env_rewards)  # (T, N) float64


def perturb(policy: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def full_forward_log_probs(policy, rollout, mask_fn=lambda x: x) -> torch.Tensor:
    """Next-token log-probs (T, N, V) of every rollout observation by one full causal pass each."""
    T, N, L = rollout.input_ids.shape
    ids, mask = rollout.input_ids.reshape(T * N, L), rollout.attention_mask.reshape(T * N, L)
    with torch.no_grad():
        logits = policy(ids, mask)[0][torch.arange(T * N), last_real_column(mask)]
    return F.log_softmax(mask_fn(logits).double(), -1).reshape(T, N, -1)


# ------------------------------------------------------------------------------ KLController
def test_fixed_coefficient_never_moves():
    kl = KLController(0.3)
    assert kl.target is None and kl.value == 0.3
    for value in (0.0, 5.0, 1e9, float("nan"), -1.0):
        assert kl.update(value, 10_000) == 0.3
    assert kl.value == 0.3
    assert KLController(0.0).update(100.0, 100) == 0.0


@pytest.mark.parametrize(
    ("kl", "n_steps", "factor"),
    [
        (2.2, 100, 1 + 0.1 * 100 / 1000),  # 10% above target
        (1.9, 50, 1 - 0.05 * 50 / 1000),  # 5% below
        (2.0, 100, 1.0),  # on target
        (2.4, 100, 1 + 0.2 * 100 / 1000),  # exactly at the clip
        (10.0, 100, 1 + 0.2 * 100 / 1000),  # clipped at +0.2
        (0.0, 100, 1 - 0.2 * 100 / 1000),  # clipped at -0.2
        (-3.0, 300, 1 - 0.2 * 300 / 1000),  # a negative estimate: clipped too
    ],
)
def test_adaptive_coefficient_follows_the_formula(kl, n_steps, factor):
    ctl = KLController(0.1, target=2.0, horizon=1000)
    assert ctl.update(kl, n_steps) == pytest.approx(0.1 * factor, rel=1e-12)
    assert ctl.value == pytest.approx(0.1 * factor, rel=1e-12)


def test_adaptive_coefficient_direction_and_compounding():
    up, down = KLController(0.2, 1.0, 500), KLController(0.2, 1.0, 500)
    for _ in range(5):
        up.update(3.0, 100)
        down.update(0.1, 100)
    assert up.value == pytest.approx(0.2 * 1.04**5) and down.value == pytest.approx(0.2 * 0.96**5)
    assert "target=1.0" in repr(up)


@pytest.mark.parametrize("kl", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_kl_leaves_the_coefficient(kl):
    ctl = KLController(0.1, target=2.0, horizon=100)
    assert ctl.update(kl, 64) == 0.1 and ctl.value == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init": -0.1},
        {"init": float("nan")},
        {"init": float("inf")},
        {"init": True},
        {"init": "0.1"},
        {"init": 0.1, "target": 0.0},
        {"init": 0.1, "target": -1.0},
        {"init": 0.1, "target": float("nan")},
        {"init": 0.1, "target": float("inf")},
        {"init": 0.1, "horizon": 0},
        {"init": 0.1, "horizon": 10.5},
        {"init": 0.1, "horizon": True},
    ],
)
def test_controller_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="KL"):
        KLController(**kwargs)


def test_a_one_rollout_horizon_on_a_known_kl_sequence():
    # target 1, β0 = 0.1, horizon None (one rollout): β ← β·(1 + clip(KL - 1, ±0.2)), by hand:
    #   KL 0.0 -> e -0.2 -> 0.08;  0.5 -> -0.2 (clipped) -> 0.064;  2.1 -> +0.2 -> 0.0768;
    #   2.1 -> 0.09216;  1.1 -> +0.1 -> 0.101376;  NaN (no episode ended) -> stays;  3.0 -> 0.1216512
    ctl = KLController(0.1, target=1.0)
    assert ctl.horizon is None and ctl.gain(256) == ctl.gain(10**9) == 1.0
    seen = [ctl.update(kl, 256) for kl in (0.0, 0.5, 2.1, 2.1, 1.1, float("nan"), 3.0)]
    assert seen == pytest.approx([0.08, 0.064, 0.0768, 0.09216, 0.101376, 0.101376, 0.1216512], rel=1e-12)


def test_the_reported_run_and_its_fix():
    # The report: kl_horizon=10000, 256 env steps per rollout, β 0.100 -> 0.087 while KL rose from
    # 0 to 2.1 (target 1). The gain is 256/10000 = 0.0256: at most ±0.512% per update. The run
    # starts at π = π_ref (KL 0, below target), and 27 updates at the lower clip are exactly
    # 0.1 · (1 - 0.00512)^27 = 0.08706.
    slow = KLController(0.1, target=1.0, horizon=10_000)
    with pytest.warns(UserWarning, match="KL horizon"):
        for _ in range(27):
            slow.update(0.0, 256)
    assert slow.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000) ** 27, rel=1e-12)
    assert round(slow.value, 3) == 0.087
    for _ in range(3):  # now KL is twice its target ...
        slow.update(2.1, 256)
    assert slow.value == pytest.approx(0.1 * 0.99488**27 * 1.00512**3, rel=1e-12)
    assert slow.value < 0.0885  # ... and β has barely moved: +1.5% in three updates

    fast = KLController(0.1, target=1.0)  # one rollout: β responds within a few updates
    for _ in range(3):
        fast.update(2.1, 256)
    assert fast.value == pytest.approx(0.1 * 1.2**3, rel=1e-12)  # 0.1728: +73%
    fast.update(2.1, 256)
    assert fast.value > 2 * 0.1  # doubled in four updates (1.2^4 = 2.0736)


def test_rollouts_without_an_ended_episode_carry_their_steps_over():
    # horizon 1000, rollouts of 100 env steps, target 1: two rollouts measure nothing (NaN), then
    # KL 2.0 is measured over episodes that span all three: n = 300, β · (1 + 0.2 · 0.3) = 0.106.
    ctl = KLController(0.1, target=1.0, horizon=1000)
    assert ctl.update(float("nan"), 100) == 0.1 and ctl.pending_steps == 100
    assert ctl.update(float("nan"), 100) == 0.1 and ctl.pending_steps == 200
    assert ctl.update(2.0, 100) == pytest.approx(0.106, rel=1e-12)
    assert ctl.pending_steps == 0
    assert ctl.update(2.0, 100) == pytest.approx(0.106 * 1.02, rel=1e-12)  # n = 100 again
    fixed = KLController(0.1)
    fixed.update(float("nan"), 100)
    assert fixed.pending_steps == 0  # a fixed β has nothing to carry


def test_warns_once_only_when_the_horizon_makes_beta_crawl():
    ctl = KLController(0.1, target=1.0, horizon=10_000)
    with pytest.warns(UserWarning, match=r"at most ±0\.51% per update, about 136 updates to double") as rec:
        ctl.update(3.0, 256)
        ctl.update(3.0, 256)
    assert len(rec) == 1
    assert "None (one rollout)" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KLController(0.1, target=1.0).update(3.0, 256)  # one rollout
        KLController(0.1, target=1.0, horizon=1000).update(3.0, 256)  # ±5.1% per update
        KLController(0.1, horizon=10_000).update(3.0, 256)  # fixed β


@pytest.mark.parametrize("n_steps", [-1, 2.5, True, "256"])
def test_update_refuses_a_bad_step_count(n_steps):
    with pytest.raises(ValueError, match=r"n_steps must be an integer >= 0"):
        KLController(0.1, target=1.0).update(1.0, n_steps)


def test_ppo_beta_responds_within_a_few_updates_with_a_one_rollout_horizon():
    n = 8 * 4  # n_steps x num_envs
    model = tiny(kl_coef=0.1, kl_target=1e-4, kl_horizon=n, learning_rate=1e-2)
    record = []
    model.learn(n * 5, callback=lambda m: record.append((m.last_stats["train/kl_ref"], m.kl.value)))
    # First rollout: π == π_ref, KL 0 -> ×0.8; then KL far above its tiny target -> ×1.2 each.
    assert all(kl > 1.2e-4 for kl, _ in record[1:])
    assert [b for _, b in record] == pytest.approx([0.1 * 0.8 * 1.2**k for k in range(5)], rel=1e-12)


def test_default_kl_horizon_is_one_rollout():
    config = PPOConfig(kl_coef=0.1, kl_target=1.0)
    assert config.kl_horizon is None and PPOConfig.from_dict(config.to_dict()) == config
    assert tiny(kl_coef=0.1, kl_target=1.0).kl.horizon is None


def test_carried_over_kl_steps_survive_save_and_load(tmp_path):
    model = tiny(kl_coef=0.1, kl_target=1.0, kl_horizon=64)
    model.learn(32)
    model.kl.pending_steps = 96
    loaded = PPO.load(model.save(tmp_path / "ckpt.pt"), device="cpu")
    assert loaded.kl.pending_steps == 96 and loaded.kl.horizon == 64


def test_coefficient_stays_non_negative_when_a_rollout_is_longer_than_the_horizon():
    ctl = KLController(1.0, target=1.0, horizon=100)
    ctl.update(0.0, 1000)
    assert ctl.value >= 0


def test_ppo_kl_coefficient_stays_non_negative_with_a_short_horizon():
    model = tiny(kl_coef=0.1, kl_target=1.0, kl_horizon=1)
    model.learn(32)
    assert model.kl.value >= 0


# ------------------------------------------------------------------------------------ config
def test_config_kl_validation():
    with pytest.raises(ValueError, match="kl_target needs kl_coef > 0"):
        PPOConfig(kl_target=1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        PPOConfig(kl_coef=-0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        PPOConfig(kl_coef=float("nan"))
    with pytest.raises(ValueError, match="kl_target"):
        PPOConfig(kl_coef=0.1, kl_target=0.0)
    with pytest.raises(ValueError, match="kl_target"):
        PPOConfig(kl_coef=0.1, kl_target=-2.0)
    with pytest.raises(ValueError, match="kl_horizon"):
        PPOConfig(kl_horizon=0)
    config = PPOConfig(kl_coef=0.1, kl_target=2.0, kl_horizon=500, mask_actions=True)
    assert PPOConfig.from_dict(config.to_dict()) == config


def test_no_reference_without_a_penalty():
    model = tiny()
    assert model.reference is None
    rollout, env_rewards = rollout_with_env_rewards(model)
    assert torch.equal(rollout.rewards, env_rewards.float())
    model.learn(32)
    assert not KL_TAGS & set(model.last_stats)


# ------------------------------------------------------------------------ the penalty itself
def test_kl_term_is_zero_when_the_policy_equals_the_reference():
    model = tiny(kl_coef=0.5, n_steps=12, num_envs=6)
    for (name, p), (_, r) in zip(
        model.policy.state_dict().items(), model.reference.state_dict().items(), strict=True
    ):
        assert torch.equal(p, r), name
    rollout, env_rewards = rollout_with_env_rewards(model)
    assert env_rewards.abs().sum() > 0  # episodes ended and were scored
    stats = model._kl_stats()
    assert len(model._rollout_kl) > 0 and stats["train/kl_coef"] == 0.5
    # Up to float rounding (see the exact test below).
    torch.testing.assert_close(rollout.rewards, env_rewards.float(), rtol=0, atol=1e-5)
    assert abs(stats["train/kl_ref"]) < 1e-5 and abs(stats["train/kl_ref_sampled"]) < 1e-5


def test_kl_term_is_exactly_zero_when_the_policy_equals_the_reference():
    model = tiny(kl_coef=0.5, n_steps=12, num_envs=6)
    rollout, env_rewards = rollout_with_env_rewards(model)
    stats = model._kl_stats()
    assert stats["train/kl_ref"] == 0.0 and stats["train/kl_ref_sampled"] == 0.0
    assert torch.equal(rollout.rewards, env_rewards.float())


def test_kl_term_of_a_different_policy_is_the_sampled_log_ratio():
    beta = 0.5
    model = tiny(kl_coef=beta, n_steps=12, num_envs=6, seed=2)
    perturb(model.policy)  # the reference stays the initial policy
    rollout, env_rewards = rollout_with_env_rewards(model, seed=2)
    logp = full_forward_log_probs(model.policy, rollout)  # (T, N, V)
    logq = full_forward_log_probs(model.reference, rollout)
    actions = rollout.actions.unsqueeze(-1)
    sampled = (logp.gather(2, actions) - logq.gather(2, actions)).squeeze(-1)  # (T, N)
    exact = (logp.exp() * (logp - logq)).sum(-1)  # (T, N)
    assert (exact > 0).all()
    torch.testing.assert_close(
        rollout.logprobs.double(), logp.gather(2, actions).squeeze(-1), atol=1e-4, rtol=0
    )
    expected = env_rewards - beta * sampled
    torch.testing.assert_close(rollout.rewards.double(), expected, atol=1e-4, rtol=0)
    assert (rollout.rewards.double() - env_rewards).abs().min() > 1e-3  # every token pays

    # Per ended episode: the sums of both KLs, in the order the episodes ended.
    T, N = rollout.actions.shape
    running, ended = torch.zeros(N, 2, dtype=torch.float64), []
    for t in range(T):
        running += torch.stack([exact[t], sampled[t]], 1)
        for i in rollout.dones[t].nonzero().squeeze(1).tolist():
            ended.append(running[i].tolist())
            running[i] = 0.0
    assert len(ended) == len(model._rollout_kl) > 0
    np.testing.assert_allclose(np.array(model._rollout_kl), np.array(ended), atol=1e-4)
    stats = model._kl_stats()
    assert stats["train/kl_ref"] > 0.1
    assert stats["train/kl_ref"] == pytest.approx(np.mean([e[0] for e in ended]), abs=1e-4)
    assert stats["train/kl_ref_sampled"] == pytest.approx(np.mean([e[1] for e in ended]), abs=1e-4)


def test_kl_stats_are_nan_when_no_episode_ended():
    model = tiny(kl_coef=0.1, n_steps=1)  # one token: no episode ends (unless <eos>, not this seed)
    rollout_with_env_rewards(model)
    assert model._rollout_kl == []
    stats = model._kl_stats()
    assert math.isnan(stats["train/kl_ref"]) and math.isnan(stats["train/kl_ref_sampled"])
    assert stats["train/kl_coef"] == 0.1


# ------------------------------------------------------------------------- learn and logging
def test_learn_logs_the_kl_to_last_stats_and_tensorboard(tmp_path):
    model = PPO(
        "TextGen-v0",
        PPOConfig(n_steps=8, kl_coef=0.2, policy=TINY, learning_rate=1e-2),
        num_envs=4,
        device="cpu",
        seed=0,
        tensorboard_log=tmp_path,
    )
    seen = []
    model.learn(32 * 3, callback=lambda m: seen.append({k: m.last_stats[k] for k in KL_TAGS}))
    assert set(model.last_stats) >= KL_TAGS
    assert all(math.isfinite(s["train/kl_ref"]) for s in seen)
    assert all(s["train/kl_coef"] == 0.2 for s in seen) and model.kl.value == 0.2  # fixed β
    assert seen[-1]["train/kl_ref"] > seen[0]["train/kl_ref"]  # training leaves the reference
    acc = EventAccumulator(str(tmp_path / "ppo_1"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) >= KL_TAGS
    for tag in KL_TAGS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [32, 64, 96]
        assert [e.value for e in events] == pytest.approx([s[tag] for s in seen], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("target", "direction"), [(1e-4, "up"), (1e6, "down")])
def test_adaptive_coefficient_moves_the_right_way_during_learn(target, direction):
    horizon, n = 64, 8 * 4
    model = tiny(kl_coef=0.1, kl_target=target, kl_horizon=horizon, learning_rate=1e-2)
    record = []
    model.learn(
        n * 5,
        callback=lambda m: record.append(
            (m.last_stats["train/kl_ref"], m.last_stats["train/kl_coef"], m.kl.value)
        ),
    )
    assert len(record) == 5
    before = 0.1
    for kl, logged, after in record:
        assert logged == before  # the β that shaped this rollout's rewards
        error = min(max(kl / target - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error * n / horizon), rel=1e-12)
        before = after
    if direction == "up":
        # The first rollout has π == π_ref (KL ~ 0, below any target); after that KL > target.
        assert all(kl > target for kl, _, _ in record[1:])
        assert model.kl.value > 0.1
    else:
        assert [round(v, 12) for _, _, v in record] == [round(0.1 * 0.9**k, 12) for k in range(1, 6)]


def test_masked_actions_stay_in_the_mask_and_the_kl_stays_finite():
    allowed = {"allowed_tokens": ["great", "good", "bad", "terrible", "."]}
    model = tiny(env_kwargs=allowed, kl_coef=0.1, mask_actions=True, learning_rate=1e-2)
    mask = torch.as_tensor(model.env.config.action_mask)
    assert int(mask.sum()) == 6  # the five tokens and <eos>
    actions, kls = [], []
    collect = model.collect_rollout

    def recording_collect():
        out = collect()
        actions.append(out[0].actions.clone())
        kls.extend(model._rollout_kl)
        return out

    model.collect_rollout = recording_collect
    model.learn(32 * 3)
    del model.collect_rollout
    acted = torch.cat([a.reshape(-1) for a in actions])
    assert len(acted) == 96 and mask[acted].all()
    assert len(torch.unique(acted)) > 1
    assert kls and all(math.isfinite(e) and math.isfinite(s) for e, s in kls)
    assert all(e > -1e-5 for e, _ in kls)  # exact KL: non-negative up to rounding
    assert math.isfinite(model.last_stats["train/kl_ref"])
    # The reference is masked the same way: with π == π_ref the masked KL is ~0, not the mass
    # the mask removed.
    fresh = tiny(env_kwargs=allowed, kl_coef=0.1, mask_actions=True)
    rollout_with_env_rewards(fresh)
    assert abs(fresh._kl_stats()["train/kl_ref_sampled"]) < 1e-5
    # Without the mask the same policy picks tokens outside it: the check above is not vacuous.
    free = tiny(env_kwargs=allowed)
    rollout, _ = rollout_with_env_rewards(free)
    assert not mask[rollout.actions.reshape(-1)].all()


# ------------------------------------------------------------------------------ checkpoints
def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_save_load_keeps_the_reference_and_the_coefficient(tmp_path):
    config = {"kl_coef": 0.1, "kl_target": 0.05, "kl_horizon": 64, "learning_rate": 1e-2}
    model = tiny(seed=4, **config)
    model.learn(32 * 2)
    assert model.kl.value != 0.1
    path = model.save(tmp_path / "ckpt.pt")
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kl_coef"] == model.kl.value
    loaded = PPO.load(path, device="cpu")
    assert loaded.kl.value == model.kl.value  # bit-exact
    assert loaded.kl.target == 0.05 and loaded.kl.horizon == 64
    assert_same_weights(loaded.reference, model.reference)
    assert_same_weights(loaded.policy, model.policy)
    assert not torch.equal(loaded.policy.policy_head.weight, loaded.reference.policy_head.weight)
    assert not loaded.reference.training
    assert not any(p.requires_grad for p in loaded.reference.parameters())
    assert torch.equal(loaded._episode_kl, model._episode_kl)


def test_save_load_of_a_run_from_a_pretrained_policy(tmp_path):
    torch.manual_seed(0)
    env_tok = make_env_config("default").tokenizer
    lm = TransformerPolicy(env_tok.vocab_size, 32, TINY)
    with torch.no_grad():
        lm.policy_head.weight.normal_(0, 0.5)
    lm_path = save_lm(tmp_path / "lm.pt", lm, env_tok)
    model = PPO(
        "TextGen-v0", PPOConfig(n_steps=8, kl_coef=0.1), num_envs=4, device="cpu", seed=0, init_policy=lm_path
    )
    model.learn(32)
    path = model.save(tmp_path / "ckpt.pt")
    loaded = PPO.load(path, device="cpu")
    assert loaded.init_policy == str(lm_path) and loaded.config.policy == TINY
    assert_same_weights(loaded.reference, load_lm(lm_path, env_tok, model.seq_len))
    assert_same_weights(loaded.policy, model.policy)


def test_resume_with_the_kl_penalty_is_exactly_equivalent(tmp_path):
    config = {"anneal_lr": False, "kl_coef": 0.1, "kl_target": 0.05, "kl_horizon": 64, "learning_rate": 1e-2}
    steps = 32
    a = tiny(seed=3, **config)
    a.learn(steps * 4)
    b = tiny(seed=3, **config)
    b.learn(steps * 2)
    path = b.save(tmp_path / "ckpt.pt")
    del b
    torch.manual_seed(12345)  # the RNG state must come from the checkpoint
    np.random.seed(12345)
    c = PPO.load(path, device="cpu")
    c.learn(steps * 2, reset_num_timesteps=False)
    assert c.num_timesteps == a.num_timesteps == steps * 4
    assert c.kl.value == a.kl.value != 0.1
    assert_same_weights(a.policy, c.policy)
    assert_same_weights(a.reference, c.reference)
    for tag in KL_TAGS:
        assert c.last_stats[tag] == a.last_stats[tag], tag
    assert [e["r"] for e in a.ep_info_buffer] == [e["r"] for e in c.ep_info_buffer]
