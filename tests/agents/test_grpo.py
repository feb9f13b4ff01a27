"""The group agents (GRPO, RLOO): configs, the maths against hand-computed values, rollouts of
whole groups without waiting rows, the update, checkpoints and exact resume, and learning."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import GRPO, PPO, RLOO, GRPOConfig, PPOConfig, RLOOConfig
from agents.baselines import evaluate
from agents.grpo import (
    STD_EPS,
    clipped_token_loss,
    group_advantages,
    group_loss,
    k3_kl,
    leave_one_out_baselines,
    token_weights,
)
from agents.policy import PolicyConfig
from textgym.vector import TextGenVectorEnv

TINY = PolicyConfig(d_model=32, n_layers=1, n_heads=2)
TINY_SEQ2SEQ = dataclasses.replace(TINY, architecture="seq2seq")


def small(cls=GRPO, num_envs: int = 8, seed: int = 0, env_kwargs=None, **config) -> GRPO | RLOO:
    config = {"group_size": 4, "policy": TINY, **config}
    return cls("TextGen-v0", cls.config_class(**config), num_envs, env_kwargs or {}, "cpu", seed)


def started(model, seed: int = 0):
    """Ready for collect_rollout() without learn(): the env is reset as learn() resets it."""
    model._obs = model.env.reset(seed=seed)[0]
    return model


def assert_same_weights(a, b) -> None:
    for (name, pa), (_, pb) in zip(a.policy.state_dict().items(), b.policy.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (GRPOConfig, "group_size", 1),
        (GRPOConfig, "group_size", 2.0),
        (RLOOConfig, "group_size", True),
        (GRPOConfig, "n_epochs", 0),
        (RLOOConfig, "num_minibatches", -1),
        (GRPOConfig, "micro_batch_size", 0),
        (GRPOConfig, "learning_rate", float("nan")),
        (RLOOConfig, "clip_range", 0),
        (GRPOConfig, "beta", -0.1),
        (RLOOConfig, "beta", float("inf")),
        (GRPOConfig, "anneal_lr", "false"),
        (GRPOConfig, "scale_rewards", 1),
        (GRPOConfig, "loss_aggregation", "mean"),
        (GRPOConfig, "kl_target", 0),
        (RLOOConfig, "kl_target", -1.0),
        (GRPOConfig, "kl_horizon", 0),
        (RLOOConfig, "autocast", "yes"),
    ],
)
def test_config_validation_names_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{field: value})


def test_configs_round_trip_through_json_and_refuse_unknown_fields():
    for cfg in (
        GRPOConfig(group_size=4, beta=0.04, scale_rewards=False, loss_aggregation="constant", policy=TINY),
        RLOOConfig(group_size=2, n_epochs=2, micro_batch_size=np.int64(3), learning_rate=np.float32(0.5)),
    ):
        back = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.policy, PolicyConfig)
    assert type(RLOOConfig(micro_batch_size=np.int64(3)).micro_batch_size) is int
    with pytest.raises(ValueError, match=r"unknown RLOOConfig fields \['loss_aggregation'\]"):
        RLOOConfig.from_dict({"loss_aggregation": "token"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        GRPOConfig().beta = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- maths
def test_grpo_advantages_of_known_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    # Group 0: mean 0.5, population std 0.5. Group 1: all equal, std 0. Group 2: mean 2, std sqrt(1/2).
    s0, s2 = 0.5 + STD_EPS, math.sqrt(0.5) + STD_EPS
    expected = [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0, 0, 0, 0, 1 / s2, -1 / s2, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))
    # Dr. GRPO: centred only.
    dr = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), torch.tensor(dr))
    with pytest.raises(RuntimeError):
        group_advantages(rewards, 5)  # 12 rewards are not groups of 5


def test_leave_one_out_baselines_of_a_known_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0])
    # Group [1, 2, 3, 6] (G=4, sum 12): (12 - r) / 3. Groups of 2: the other one's reward.
    torch.testing.assert_close(
        leave_one_out_baselines(rewards[:4], 4), torch.tensor([11 / 3, 10 / 3, 3.0, 2.0])
    )
    torch.testing.assert_close(
        leave_one_out_baselines(rewards, 2), torch.tensor([2.0, 1.0, 6.0, 3.0, 1.0, 0.0])
    )


def test_k3_kl():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.9]))
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))  # exactly 0 when policy == reference
    # π(a) = 0.5, π_ref(a) = 0.25: exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.693147 - 1
    value = k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert value.item() == pytest.approx(0.1931472, abs=1e-6)


def test_clipped_token_loss_of_known_ratios():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.55, 0.75, 0.25, 0.25]))  # ratios 1.1, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    # max(-A r, -A clip(r, 0.8, 1.2)): -1.1; max(-1.5, -1.2); max(0.5, 0.8); max(-0.5, -0.8)
    torch.testing.assert_close(clipped_token_loss(new, old, adv, 0.2), torch.tensor([-1.1, -1.2, 0.8, -0.5]))


def test_token_weights_of_each_aggregation():
    lengths = torch.tensor([2, 1])
    expected = {
        "sequence": [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]],  # 1 / (n * length)
        "token": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]],  # 1 / sum(lengths)
        "constant": [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]],  # 1 / (n * max_new_tokens)
        "sum": [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0]],  # 1 / n (RLOO)
    }
    for aggregation, weights in expected.items():
        torch.testing.assert_close(token_weights(lengths, 3, aggregation), torch.tensor(weights))


def test_the_loss_of_a_known_batch():
    """Two completions, of 2 and 1 tokens, advantages +1 and -1, the paper's aggregation."""
    new = torch.log(torch.tensor([0.5, 0.55, 0.2]))
    old = torch.log(torch.tensor([0.5, 0.5, 0.4]))  # ratios 1, 1.1, 0.5
    ref = torch.log(torch.tensor([0.25, 0.5, 0.2]))
    adv = torch.tensor([1.0, 1.0, -1.0])
    weights = torch.tensor([0.25, 0.25, 0.5])  # 1 / (2 completions * length)
    loss, pg, kl = group_loss(new, old, adv, weights, 0.2, ref, beta=0.1)
    # surrogate: 0.25 * -1 + 0.25 * -1.1 + 0.5 * max(0.5, 0.8) = -0.125
    # k3: 0.25 * (0.5 + ln 2 - 1) + 0.25 * (1/1.1 + ln 1.1 - 1) + 0.5 * 0 = 0.0493871
    assert pg.item() == pytest.approx(-0.125, abs=1e-6)
    assert kl.item() == pytest.approx(0.0493871, abs=1e-6)
    assert loss.item() == pytest.approx(-0.125 + 0.1 * 0.0493871, abs=1e-6)
    loss, _, kl = group_loss(new, old, adv, weights, 0.2)  # no reference: no k3 term
    assert loss.item() == pytest.approx(-0.125, abs=1e-6) and kl.item() == 0.0


# ------------------------------------------------------------------------------------ rollouts
class RecordingEnv(TextGenVectorEnv):
    """The group env, keeping every step's waiting flags and actions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(self, actions):
        out = super().step(actions)
        self.log.append((out[4]["waiting"].clone(), (out[2] | out[3]).clone()))
        return out


def recording(cls=GRPO, **config):
    """An agent on arithmetic (16 tokens, max_new_tokens 4): episodes of varied lengths, so rows wait."""
    config = {"group_size": 4, "policy": TINY, **config}
    env = RecordingEnv(
        8, task="arithmetic", group_size=4, autoreset_mode="same_step", array_type="torch", device="cpu"
    )
    return started(cls(env, cls.config_class(**config), device="cpu", seed=0))


def test_a_rollout_is_one_whole_episode_per_row_and_skips_waiting_rows():
    model = recording()
    P, M = model.prompt_window, model.env.config.max_new_tokens
    waited = 0
    for _ in range(4):
        model.env.log.clear()
        before = model.num_timesteps
        rollout = model.collect_rollout()
        waiting = torch.stack([w for w, _ in model.env.log])  # (T, N)
        done = torch.stack([d for _, d in model.env.log])  # (T, N)
        waited += int(waiting.sum())
        # A row's episode: the steps up to its first end; it never waits before that.
        first_end = done.int().argmax(0)  # (N,)
        assert torch.equal(rollout.lengths, first_end + 1)
        steps = torch.arange(len(done)).unsqueeze(1)
        assert not bool((waiting & (steps <= first_end)).any())
        assert rollout.env_steps == len(done) * 8 == model.num_timesteps - before
        # The episode's tokens are the final observation; nothing recorded past its end.
        assert torch.equal(rollout.attention_mask[:, P:].sum(1), rollout.lengths)
        past = torch.arange(M).unsqueeze(0) >= rollout.lengths.unsqueeze(1)
        assert bool((rollout.logprobs[past] == 0).all()) and bool((rollout.logprobs[~past] < 0).all())
        # Every group's rows share a prompt.
        prompts = rollout.input_ids[:, :P].view(2, 4, P)
        assert bool((prompts == prompts[:, :1]).all())
        # The logged episodes are the rollout's.
        logged = list(model.ep_info_buffer)[-8:]
        assert sorted(e["l"] for e in logged) == sorted(rollout.lengths.tolist())
        assert sorted(e["r"] for e in logged) == pytest.approx(sorted(rollout.rewards.tolist()))
        model.update(rollout)
    assert waited > 0  # the test saw waiting rows


def test_waiting_rows_and_steps_past_an_end_contribute_nothing():
    """Garbage where a completion has ended (old log-probs, tokens under a zero mask) changes
    nothing in the loss or the gradient."""
    model = recording()
    rollout = model.collect_rollout()
    while not bool((rollout.lengths < model.env.config.max_new_tokens).any()):  # one that ended early
        rollout = model.collect_rollout()
    P, M = model.prompt_window, model.env.config.max_new_tokens
    past = torch.arange(M).unsqueeze(0) >= rollout.lengths.unsqueeze(1)
    ids = rollout.input_ids.clone()
    ids[:, P:][~rollout.attention_mask[:, P:].bool()] = 7
    junk = rollout._replace(logprobs=rollout.logprobs.masked_fill(past, -50.0), input_ids=ids)
    part, adv = torch.arange(8), model.advantages(rollout)
    weights = token_weights(rollout.lengths, M, "sequence")
    results = []
    for r in (rollout, junk):
        model.optimizer.zero_grad()
        terms = model._loss_sums(r, part, weights, adv, 0.0)
        terms[0].backward()
        results.append((terms.detach(), [p.grad.clone() for p in model._trainable if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_the_ratio_is_one_at_the_first_minibatch(cls):
    """The rollout's log-probs (through the KV cache) are those of one causal pass over each
    finished completion, as the update computes them."""
    model = started(small(cls, env_kwargs={"task": "arithmetic"}))
    for _ in range(2):
        rollout = model.collect_rollout()
        P, M = model.prompt_window, model.env.config.max_new_tokens
        with torch.no_grad():
            logits, _ = model.policy(rollout.input_ids, rollout.attention_mask)  # (N, L, V)
        logp = F.log_softmax(logits[:, P - 1 : P - 1 + M], -1)  # (N, M, V)
        logp = logp.gather(2, rollout.input_ids[:, P : P + M].unsqueeze(2)).squeeze(2)
        valid = torch.arange(M).unsqueeze(0) < rollout.lengths.unsqueeze(1)
        torch.testing.assert_close(logp[valid], rollout.logprobs[valid], atol=1e-5, rtol=0)
        stats = model.update(rollout)
        assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-6


def test_the_update_leaves_out_columns_that_are_padding_in_every_row():
    """Prompts shorter than the window and completions shorter than max_new_tokens leave columns
    that are padding in every row: the update's forward pass skips them, and its log-probs still
    equal the rollout's (the ratio is 1 at the first minibatch)."""
    model = started(small(GRPO, env_kwargs={"task": "arithmetic"}))
    rollout = model.collect_rollout()
    filled = rollout.attention_mask.any(0).nonzero().squeeze(1)
    first, last = int(filled[0]), int(filled[-1])
    assert first > 0 or last < rollout.attention_mask.shape[1] - 1  # something to leave out
    widths = []

    def spying(forward):
        def spy(ids, mask, *args, **kwargs):
            widths.append(ids.shape[1])
            return forward(ids, mask, *args, **kwargs)

        return spy

    for name in ("hidden", "hidden_shared_prefix"):  # a whole pass, or one with the groups' prompts shared
        setattr(model.policy, name, spying(getattr(model.policy, name)))
    stats = model.update(rollout)
    assert widths == [last - first + 1]
    assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-6


@pytest.mark.parametrize(
    ("cls", "config", "expected"),
    [
        # ratio 1: the surrogate is -sum(w * A); per-group advantages sum to 0, so does the mean
        (GRPO, {}, lambda r, a: 0.0),
        (GRPO, {"loss_aggregation": "token"}, lambda r, a: -float((r.lengths * a).sum() / r.lengths.sum())),
        (
            GRPO,
            {"loss_aggregation": "constant", "scale_rewards": False},
            lambda r, a: -float((r.lengths * a).sum()) / (len(a) * 4),
        ),
        (RLOO, {}, lambda r, a: -float((r.lengths * a).mean())),
    ],
    ids=["grpo", "grpo-token", "dr-grpo", "rloo"],
)
def test_first_update_loss_and_statistics(cls, config, expected):
    model = started(
        small(cls, env_kwargs={"task": "arithmetic", "reward": lambda p, c: float(len(c))}, **config)
    )
    rollout = model.collect_rollout()
    # The reward is the completion's length in characters: groups differ, the loss is not trivially 0.
    assert float(rollout.rewards.std()) > 0
    if cls is GRPO:
        adv = group_advantages(rollout.rewards, 4, config.get("scale_rewards", True))
    else:
        adv = rollout.rewards - leave_one_out_baselines(rollout.rewards, 4)
    before = [p.detach().clone() for p in model.policy.parameters()]
    stats = model.update(rollout)
    assert stats["train/loss"] == pytest.approx(expected(rollout, adv), abs=1e-5)
    assert stats["train/policy_gradient_loss"] == pytest.approx(stats["train/loss"], abs=1e-7)
    assert stats["train/sequences"] == 8 and stats["train/epochs"] == 1
    groups = rollout.rewards.view(2, 4)
    assert stats["train/group_reward_std"] == pytest.approx(
        float(groups.std(1, correction=0).mean()), abs=1e-6
    )
    assert stats["train/zero_std_fraction"] == float((groups.std(1) == 0).float().mean())
    assert stats["rollout/trained_fraction"] == float(rollout.lengths.sum()) / rollout.env_steps
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_several_epochs_clip_and_report_means():
    model = started(small(GRPO, n_epochs=3, num_minibatches=2, learning_rate=1e-2))
    stats = model.update(model.collect_rollout())
    assert stats["train/epochs"] == 3 and stats["train/approx_kl"] > 0


def test_micro_batches_give_the_minibatch_gradient():
    grads = []
    for micro in (None, 3):
        model = started(
            small(GRPO, num_minibatches=2, micro_batch_size=micro, env_kwargs={"task": "arithmetic"})
        )
        rollout = model.collect_rollout()
        recorded, step = [], model.optimizer.step

        def record(*a, recorded=recorded, model=model, step=step, **k):
            recorded.append([p.grad.clone() for p in model._trainable if p.grad is not None])
            return step(*a, **k)

        model.optimizer.step = record
        torch.manual_seed(0)  # the same minibatches
        model.update(rollout)
        grads.append(recorded)
    for a, b in zip(*grads, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the KL reference
def test_k3_and_the_reference_kl_are_zero_while_the_policy_is_the_reference():
    model = started(small(GRPO, beta=0.1))
    assert model.reference is not None and model.kl.value == 0.1
    rollout = model.collect_rollout()
    # The reference scores the finished completions in one pass, the policy sampled them through
    # its KV cache: the same numbers to float rounding.
    torch.testing.assert_close(rollout.ref_logprobs, rollout.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.kl_sampled, torch.zeros(8), atol=1e-4, rtol=0)
    stats = model.update(rollout)
    assert 0 <= stats["train/kl_k3"] < 1e-9
    kl = model._kl_stats()
    assert abs(kl["train/kl_ref_sampled"]) < 1e-4 and kl["train/kl_coef"] == 0.1
    assert "train/kl_ref" not in kl  # the exact per-step KL needs the reference decoding beside the policy
    # After an update they differ, and RLOO's penalty moves its rewards.
    assert model.collect_rollout().kl_sampled.abs().sum() > 0
    rloo = started(small(RLOO, beta=0.5, learning_rate=1e-2))
    rloo.update(rloo.collect_rollout())
    rollout = rloo.collect_rollout()
    penalised = rollout.rewards - 0.5 * rollout.kl_sampled
    torch.testing.assert_close(rloo.advantages(rollout), penalised - leave_one_out_baselines(penalised, 4))
    assert not torch.equal(penalised, rollout.rewards)


def test_adaptive_beta_moves_towards_the_target_and_is_the_one_used():
    """With kl_target, β starts at beta and moves after every rollout by its clipped error (±20%,
    kl_horizon None) on the rollout's sampled KL per completion: down after the first rollout (KL 0
    to rounding: the policy is the reference). The loss (GRPO) and the reward penalty (RLOO) use
    the current β, not the config's."""
    with pytest.raises(ValueError, match=r"GRPOConfig\.kl_target needs beta > 0"):
        GRPOConfig(kl_target=1.0)
    target = 1e-3
    model = small(GRPO, beta=0.1, kl_target=target, learning_rate=1e-2, anneal_lr=False)
    beta = 0.1
    for i in range(4):
        model.learn(1, reset_num_timesteps=False, progress_bar=False)  # one rollout each
        kl = model.last_stats["train/kl_ref_sampled"]
        if i == 0:
            assert abs(kl) < 1e-4
        assert model.last_stats["train/kl_coef"] == pytest.approx(beta)  # the β of that rollout
        beta *= 1 + min(max((kl - target) / target, -0.2), 0.2)
        assert model.kl.value == pytest.approx(beta)
    assert beta != 0.1 * 0.8**4  # it went up at least once
    rollout = model.collect_rollout()
    model.kl.value = 0.3
    stats = model.update(rollout)  # one minibatch: the loss is the surrogate + β · k3
    assert stats["train/kl_k3"] > 0
    assert stats["train/loss"] == pytest.approx(
        stats["train/policy_gradient_loss"] + 0.3 * stats["train/kl_k3"]
    )
    rloo = started(small(RLOO, beta=0.5, kl_target=1.0, learning_rate=1e-2))
    rloo.update(rloo.collect_rollout())
    rollout = rloo.collect_rollout()
    rloo.kl.value = 0.7
    penalised = rollout.rewards - 0.7 * rollout.kl_sampled
    torch.testing.assert_close(rloo.advantages(rollout), penalised - leave_one_out_baselines(penalised, 4))


def test_no_reference_without_beta():
    model = small(GRPO)
    assert model.reference is None
    assert "train/kl_k3" not in started(model).update(model.collect_rollout())


# ---------------------------------------------------------------------------------- constructor
def test_constructor_refuses_mismatched_groups():
    with pytest.raises(ValueError, match=r"group_size is GRPOConfig\.group_size"):
        small(GRPO, env_kwargs={"group_size": 4})
    with pytest.raises(ValueError, match="num_envs=6 is not a multiple of group_size=4"):
        small(GRPO, num_envs=6)
    env = TextGenVectorEnv(8, group_size=2, autoreset_mode="same_step", array_type="torch")
    with pytest.raises(ValueError, match="needs an env with group_size=4"):
        RLOO(env, RLOOConfig(group_size=4), device="cpu")
    with pytest.raises(ValueError, match="PPO trains on every env step"):
        PPO(env, PPOConfig(n_steps=4), device="cpu")
    with pytest.raises(TypeError, match="config must be a GRPOConfig"):
        GRPO(config=RLOOConfig(), device="cpu")


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(("cls", "config"), [(GRPO, {}), (RLOO, {"beta": 0.05, "n_epochs": 2})])
def test_save_load_and_exact_resume(tmp_path, cls, config):
    config = {"anneal_lr": False, **config}
    a = small(cls, seed=3, **config)
    a.learn(8 * 8 * 4)
    b = small(cls, seed=3, **config)
    b.learn(8 * 8 * 2)
    path = b.save(tmp_path / "ckpt.pt")
    torch.manual_seed(12345)  # the RNG states must come from the checkpoint
    np.random.seed(12345)
    c = cls.load(path, device="cpu")
    assert c.config == b.config and (c.num_timesteps, c.n_updates) == (b.num_timesteps, b.n_updates)
    assert_same_weights(b, c)
    c.learn(a.num_timesteps - c.num_timesteps, reset_num_timesteps=False)
    assert (c.num_timesteps, c.n_updates) == (a.num_timesteps, a.n_updates)
    assert_same_weights(a, c)
    assert [e["r"] for e in a.ep_info_buffer] == [e["r"] for e in c.ep_info_buffer]
    other = PPO if cls is GRPO else GRPO
    with pytest.raises(ValueError, match=rf"is a checkpoint of the '{cls.algorithm}' agent"):
        other.load(path, device="cpu")
    ppo_path = PPO("TextGen-v0", PPOConfig(n_steps=2), 4, device="cpu").save(tmp_path / "ppo.pt")
    with pytest.raises(ValueError, match="is a checkpoint of the 'ppo' agent"):
        cls.load(ppo_path, device="cpu")


class InterruptingReward:
    """Counts calls; raises KeyboardInterrupt (a Ctrl-C inside the reward model) on the fail_at-th."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, prompt: str, completion: str) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return len(completion.split()) / 4


def interrupted_agent(reward: InterruptingReward) -> GRPO:
    config = GRPOConfig(group_size=2, anneal_lr=False, policy=TINY)
    return GRPO("TextGen-v0", config, 4, {"reward": reward, "max_new_tokens": 3}, "cpu", seed=1)


ROLLOUTS = 4 * 3 * 8  # 8 rollouts of 4 episodes: 32 reward-model calls


def test_an_interrupt_in_a_rollout_rolls_back_and_resumes_exactly(tmp_path):
    reference = interrupted_agent(InterruptingReward())
    reference.learn(ROLLOUTS)
    path = tmp_path / "ckpt.pt"
    model = interrupted_agent(InterruptingReward(fail_at=19))  # inside the fifth rollout
    with pytest.raises(KeyboardInterrupt):
        model.learn(ROLLOUTS, checkpoint_path=path)
    assert model.n_updates == 4 and torch.load(path, weights_only=True)["n_updates"] == 4
    resumed = GRPO.load(path, env_kwargs={"reward": InterruptingReward(), "max_new_tokens": 3}, device="cpu")
    resumed.learn(reference.num_timesteps - resumed.num_timesteps, reset_num_timesteps=False)
    assert resumed.n_updates == reference.n_updates
    assert_same_weights(resumed, reference)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_an_interrupt_in_an_update_finishes_it_and_resumes_exactly(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = interrupted_agent(InterruptingReward())
    original, count = model.optimizer.step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] == 3:  # inside the third update (one optimizer step per update)
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    model.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        model.learn(ROLLOUTS, checkpoint_path=path)
    assert model.n_updates == 3 and torch.load(path, weights_only=True)["n_updates"] == 3
    resumed = GRPO.load(path, env_kwargs={"reward": InterruptingReward(), "max_new_tokens": 3}, device="cpu")
    resumed.learn(ROLLOUTS - resumed.num_timesteps, reset_num_timesteps=False)
    reference = interrupted_agent(InterruptingReward())
    reference.learn(ROLLOUTS)
    assert_same_weights(resumed, reference)


# ------------------------------------------------------------------------------------- logging
def test_tensorboard_tags(tmp_path):
    model = small(GRPO, beta=0.1, sample_interval=1)
    model.tensorboard_log = tmp_path
    model.learn(8 * 8 * 2)
    (run,) = tmp_path.iterdir()
    assert run.name == "grpo_1"
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    shared = {"rollout/ep_rew_mean", "rollout/ep_len_mean", "train/approx_kl", "train/clip_fraction"}
    shared |= {"train/loss", "train/learning_rate", "train/kl_ref_sampled", "train/kl_coef", "time/fps"}
    shared |= {"time/rollout_seconds", "time/update_seconds", "time/time_elapsed"}
    new = {"train/group_reward_std", "train/zero_std_fraction", "train/kl_k3", "rollout/trained_fraction"}
    assert shared | new <= tags
    assert "train/value_loss" not in tags  # no critic
    assert "samples/text_summary" in acc.Tags()["tensors"]


# ------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_short_training_beats_the_random_policy(cls):
    model = cls("TextGen-v0", cls.config_class(), num_envs=32, device="cpu", seed=0)
    model.learn(8_192)
    random_level = evaluate(None, {"task": "default"})["mean"]
    greedy = evaluate(lambda obs: model.predict(obs, deterministic=True)[0], {"task": "default"})["mean"]
    assert 0.15 < random_level < 0.3
    assert greedy >= random_level + 0.4, (random_level, greedy)
    assert model.last_stats["rollout/ep_rew_mean"] >= random_level + 0.2


# ----------------------------------------------------------------------------- Hugging Face policy
@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny random GPT-2 with a BPE tokenizer of the sentiment task, saved offline."""
    pytest.importorskip("transformers")
    from agents.hf import tiny_causal_lm
    from textgym.hf import train_bpe_tokenizer
    from textgym.tasks import get_task

    task = get_task("sentiment")
    tokenizer = train_bpe_tokenizer([*task.corpus, *task.prompts], vocab_size=300)
    path = tmp_path_factory.mktemp("causal_lm")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    tiny_causal_lm(tokenizer, d_model=32, n_layers=1, n_heads=2).save_pretrained(path)
    return path


def test_shared_prompts_group_rows_by_their_group(causal_lm):
    model = GRPO(
        "TextGen-v0", GRPOConfig(group_size=4), 8, {"task": "sentiment", "max_new_tokens": 4}, "cpu",
        policy_model=causal_lm,
    )  # fmt: skip
    first, inverse = model._shared_prompts(model.policy, [3, 8, 1, 9, 2, 5])  # groups 0, 2, 0, 2, 0, 1
    assert first.tolist() == [0, 1, 5] and inverse.tolist() == [0, 1, 0, 1, 0, 2]
    assert model._shared_prompts(model.policy, [0, 4]) is None  # no two rows of one group
    assert model._shared_prompts(object(), [0, 1]) is None  # a model without the shared pass


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("policy", ["builtin", "seq2seq", "hf"])
def test_shared_prompt_passes_give_the_reference_and_the_loss_of_whole_passes(
    causal_lm, monkeypatch, beta, policy
):
    """The reference pass and the update run each group's prompt once; the reference's
    log-probabilities, the loss and its gradient are those of whole passes."""
    hf = {"policy_model": causal_lm} if policy == "hf" else {}
    model = started(
        GRPO(
            "TextGen-v0",
            GRPOConfig(group_size=4, beta=0.1, micro_batch_size=6, policy=TINY_SEQ2SEQ if policy == "seq2seq" else TINY),
            8, {"task": "sentiment", "max_new_tokens": 5}, "cpu", seed=0, **hf,
        )
    )  # fmt: skip
    with torch.no_grad():  # the policy a step away from its reference, so that the KL is not 0
        for p in model.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rollout = model.collect_rollout()
    calls = []
    shared_prompts = model._shared_prompts
    monkeypatch.setattr(
        model, "_shared_prompts", lambda m, rows: calls.append(list(rows)) or shared_prompts(m, rows)
    )
    shared_ref = model._reference_pass(rollout.input_ids, rollout.attention_mask, rollout.lengths)
    assert calls == [[0, 1, 2, 3, 4, 5], [6, 7]]  # micro-batches of 6 rows
    part = torch.tensor([5, 0, 6, 3, 2, 7, 4])
    weights = token_weights(rollout.lengths[part], 5, "sequence")
    advantages = model.advantages(rollout)

    def loss_and_grads(rows):
        model.optimizer.zero_grad(set_to_none=True)
        terms = model._loss_sums(rollout, part, weights, advantages, beta, None, rows)
        terms[0].backward()
        return terms.detach(), [None if p.grad is None else p.grad.clone() for p in model._trainable]

    shared_terms, shared_grads = loss_and_grads(part.tolist())
    assert calls[-1] == [5, 0, 6, 3, 2, 7, 4]  # groups 1 and 0: the update shares two prompts
    monkeypatch.setattr(model, "_shared_prompts", lambda m, rows: None)
    whole_ref = model._reference_pass(rollout.input_ids, rollout.attention_mask, rollout.lengths)
    whole_terms, whole_grads = loss_and_grads(None)
    torch.testing.assert_close(shared_ref, whole_ref, atol=1e-5, rtol=1e-5)
    assert shared_ref.abs().sum() > 0
    torch.testing.assert_close(shared_terms, whole_terms, atol=1e-5, rtol=1e-4)
    assert sum(g is not None for g in whole_grads) > 10  # every layer's weights (the value head has none)
    for a, b in zip(shared_grads, whole_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_a_hugging_face_policy_with_lora_trains_saves_and_loads(causal_lm, tmp_path, cls):
    pytest.importorskip("peft")
    from agents.hf import HFConfig

    config = cls.config_class(group_size=2, beta=0.1, micro_batch_size=3)
    model = cls(
        "TextGen-v0",
        config,
        4,
        {"task": "sentiment", "max_new_tokens": 4},
        "cpu",
        seed=0,
        policy_model=causal_lm,
        hf_config=HFConfig(lora_rank=4, lora_alpha=8.0),
    )
    started(model)
    rollout = model.collect_rollout()
    # LoRA's B starts at zero: the policy is its reference (the same model, adapters off).
    torch.testing.assert_close(rollout.ref_logprobs, rollout.logprobs, atol=1e-6, rtol=0)
    stats = model.update(rollout)
    assert stats["train/approx_kl"] < 1e-6 and stats["train/clip_fraction"] == 0.0
    if cls is GRPO:
        assert stats["train/kl_k3"] < 1e-8
    model.learn(4 * 4 * 2, reset_num_timesteps=False)
    path = model.save(tmp_path / "ckpt.pt")
    loaded = cls.load(path, device="cpu")
    obs = model.env.reset(seed=1)[0]
    assert np.array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    assert loaded.hf_config == model.hf_config and loaded.n_updates == model.n_updates


# -------------------------------------------------------------------------------- comparisons
def test_compare_runs_the_group_agents_beside_ppo(tmp_path):
    from agents.compare import agents_error, hyperparameters, run_comparison

    configs = {
        "grpo": {"group_size": 4, "policy": dataclasses.asdict(TINY)},
        "rloo": RLOOConfig(group_size=2),
    }
    assert hyperparameters("grpo", agent_configs=configs)["group_size"] == 4
    assert hyperparameters("rloo", agent_configs=configs) == RLOOConfig(group_size=2).to_dict()
    assert hyperparameters("grpo") == GRPOConfig().to_dict()
    assert agents_error(["grpo", "rloo"], {"task": "default"}, 8, "cpu", agent_configs=configs) is None
    problem = agents_error(["grpo"], {"task": "default"}, 6, "cpu", agent_configs=configs)
    assert problem.startswith("--agent-configs: grpo cannot be built") and "num_envs=6" in problem
    result = run_comparison(
        tmp_path, ["grpo", "rloo"], [0], 128, num_envs=8, device="cpu", eval_episodes=8, progress=False,
        agent_configs=configs,
    )  # fmt: skip
    assert [r["agent"] for r in result["rows"]] == ["grpo", "rloo", "random"]
    saved = json.loads((tmp_path / "hyperparams" / "grpo.json").read_text())
    assert saved["group_size"] == 4 and saved["policy"]["d_model"] == 32


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_autocast_trains_with_shared_prompts_and_a_reference(cls):
    """autocast=True: the group's shared prompt pass (bfloat16 key and value slots), the frozen
    reference's passes and the update all run; the weights stay float32 and finite."""
    model = small(cls, autocast=True, beta=0.04)
    assert model.policy.autocast and model.reference.autocast
    model.learn(64)
    assert model.n_updates >= 1
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.policy.parameters())
