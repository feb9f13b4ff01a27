"""The agents' host syncs: how often ``update`` and a rollout read the device (counted here on the
CPU by the conversions that would wait for a GPU), and the divergence checks that need no read
per minibatch or per step: a non-finite loss or gradient makes the fused Adam skip that step and
every later one, and the error comes after the loop; non-finite logits are flagged on the device
and reported at the end of the rollout."""

from __future__ import annotations

import pytest
import torch

from agents import GRPO, PPO, RLOO, PPOConfig, TrainingDivergedError
from agents.buffer import compact
from agents.on_policy import filled_columns, filled_span
from agents.policy import PolicyConfig
from textgym import TokenFunctionReward

TINY = PolicyConfig(d_model=32, n_layers=1, n_heads=2)


def _ppo(**config) -> PPO:
    config = {"n_steps": 8, "policy": TINY, **config}
    return PPO("TextGen-v0", PPOConfig(**config), 8, device="cpu", seed=0)


def _group(cls=GRPO, **config) -> GRPO | RLOO:
    config = {"group_size": 4, "policy": TINY, **config}
    return cls("TextGen-v0", cls.config_class(**config), 8, {}, "cpu", 0)


def _batch(model):
    model._obs = model.env.reset(seed=0)[0]
    return model._collect()


def test_the_sync_free_gathers_equal_their_syncing_originals():
    gen = torch.Generator().manual_seed(0)
    for mask in (
        torch.rand(50, generator=gen) < 0.3,
        torch.zeros(7, dtype=torch.bool),
        torch.ones(5, dtype=torch.bool),
    ):
        assert torch.equal(compact(mask, int(mask.sum())), mask.nonzero().squeeze(1))
    mask = (torch.rand(6, 20, generator=gen) < 0.2).long()
    mask[:, 9] = 1  # every row holds a real token
    firsts, lasts = filled_columns(mask).tolist()
    for rows in ([0], [1, 4], range(6)):
        assert (min(firsts[i] for i in rows), max(lasts[i] for i in rows)) == filled_span(mask[list(rows)])


# Per update: one read of what sizes the gathers (every epoch's order of the sequences, their
# transition or token counts and real columns), one read of the statistics at the end, and for PPO
# before them the number of sequences that segments() cuts the rollout into.
@pytest.mark.parametrize(
    ("make", "most"),
    [
        (_ppo, 3),
        (lambda: _ppo(micro_batch_size=3, n_epochs=3), 3),
        (_group, 2),
        (lambda: _group(n_epochs=2, num_minibatches=2, micro_batch_size=3), 2),
        (lambda: _group(RLOO), 2),
    ],
    ids=["ppo", "ppo-micro-batches", "grpo", "grpo-micro-batches", "rloo"],
)
def test_an_update_reads_the_device_a_fixed_number_of_times(make, most, counting_syncs):
    """Not once per minibatch: the count does not grow with epochs, minibatches or micro-batches."""
    model = make()
    batch = _batch(model)
    with counting_syncs() as calls:
        model._train(batch)
    assert len(calls) <= most, calls


def test_the_counter_sees_a_read_per_minibatch(counting_syncs):
    """The counter can fail: ``target_kl`` reads the approx KL after every minibatch."""
    model = _ppo(target_kl=1e9)
    batch = _batch(model)
    with counting_syncs() as calls:
        model._train(batch)
    assert len(calls) >= model.config.n_epochs * model.config.num_minibatches, calls


# ---------------------------------------------------------------------------------- divergence
def _poisoned(terms: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "loss":
        return terms * float("nan")
    # A finite loss whose gradient is NaN: 0 * sqrt'(0) = 0 * inf.
    return terms + 0.0 * torch.sqrt(terms[0] - terms[0].detach())


@pytest.mark.parametrize("kind", ["loss", "gradient"])
@pytest.mark.parametrize("fused", [True, False], ids=["flagged-on-the-device", "checked-per-step"])
@pytest.mark.parametrize("make", [_ppo, lambda: _group(n_epochs=2, num_minibatches=2)], ids=["ppo", "grpo"])
def test_a_non_finite_minibatch_leaves_the_weights_of_the_last_good_step(make, fused, kind, monkeypatch):
    """Minibatch 3 goes bad: the error names it, and the weights and Adam's moments and step
    counts are those after minibatch 2's step, whether the fused Adam skipped steps 3 and later
    on a device flag or the update checked each minibatch on the host before its step."""
    bad = 3
    model = make()
    batch = _batch(model)
    monkeypatch.setitem(model.optimizer.defaults, "fused", fused)  # Adam stays fused: only the check moves
    loss_sums, calls = model._loss_sums, [0]

    def poisoning(*args, **kwargs):
        calls[0] += 1
        terms = loss_sums(*args, **kwargs)
        return _poisoned(terms, kind) if calls[0] == bad else terms

    step, after = model.optimizer.step, []

    def stepped() -> list[torch.Tensor]:  # the weights Adam steps (GRPO's value head has no gradient)
        return [p for p in model._trainable if "step" in model.optimizer.state[p]]

    def recording(*args, **kwargs):
        step(*args, **kwargs)
        state = model.optimizer.state
        after.append([(p.clone(), state[p]["exp_avg"].clone(), state[p]["step"].clone()) for p in stepped()])

    monkeypatch.setattr(model, "_loss_sums", poisoning)
    monkeypatch.setattr(model.optimizer, "step", recording)
    with pytest.raises(
        TrainingDivergedError, match=rf"{kind}.* (is not finite in|is nan in) minibatch {bad} "
    ):
        model._train(batch)
    # Every minibatch was stepped (and the bad one and later skipped), or none after the good ones.
    assert len(after) == (calls[0] if fused else bad - 1)
    last_good = after[bad - 2]
    for p, (weight, exp_avg, steps) in zip(stepped(), last_good, strict=True):
        state = model.optimizer.state[p]
        assert torch.equal(p, weight) and torch.equal(state["exp_avg"], exp_avg)
        assert int(state["step"]) == int(steps) == bad - 1
    assert not torch.equal(last_good[0][0], after[0][0][0]) or bad == 2  # the good steps did move


# ------------------------------------------------------------------------------------ rollouts
def _length(prompt_ids, prompt_mask, completion_ids, completion_mask):
    return completion_mask.sum(1).double()


def _reads_per_place(model, counting_syncs) -> tuple[list[tuple[int, bool]], int]:
    """Collect one rollout (after a first one), counting the reads inside each ``env.step`` (with
    whether an episode ended in it) and outside every step."""
    model._obs = model.env.reset(seed=0)[0]
    model._collect()
    step, in_steps = model.env.step, []

    def counted_step(action):
        before = len(calls)
        out = step(action)
        in_steps.append(
            (
                len(calls) - before,
                bool(model.env.host_view.terminated.any() or model.env.host_view.truncated.any()),
            )
        )
        return out

    model.env.step = counted_step
    with counting_syncs() as calls:
        model._collect()
    return in_steps, len(calls) - sum(n for n, _ in in_steps)


ROLLOUT_AGENTS = {
    "ppo": _ppo,
    "ppo-kl-bootstrap": lambda **kw: _ppo(kl_coef=0.1, bootstrap_truncated=True, **kw),
    "ppo-seq2seq": lambda **kw: PPO(
        "TextGen-v0",
        PPOConfig(
            n_steps=8, policy=PolicyConfig(d_model=32, n_layers=1, n_heads=2, architecture="seq2seq"), **kw
        ),
        8,
        device="cpu",
        seed=0,
    ),
    "grpo": lambda **kw: _group(**kw),
    "rloo-token-reward": lambda **kw: RLOO(
        "TextGen-v0",
        RLOO.config_class(group_size=4, policy=TINY, **kw),
        8,
        {"reward": TokenFunctionReward(_length), "text_infos": False, "task": "arithmetic"},
        "cpu",
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(ROLLOUT_AGENTS))
def test_a_rollout_reads_the_device_once_per_env_step(name, counting_syncs):
    """Each env step reads once (every row's end flags), and once more where episodes end (the
    reward's input or scores); the agent around it reads only at the rollout's start and end
    (the cache's rebuild, the ended episodes' returns, the logits' finite flag), however long."""
    in_steps, outside = _reads_per_place(ROLLOUT_AGENTS[name](), counting_syncs)
    assert in_steps and any(ended for _, ended in in_steps)
    for reads, ended in in_steps:
        assert reads == 1 + ended, in_steps
    assert outside <= 4


def test_a_longer_ppo_rollout_reads_no_more_outside_the_env(counting_syncs):
    """Three times the steps (and the episode ends), the same reads outside ``env.step``."""
    short = _reads_per_place(_ppo(), counting_syncs)[1]
    in_steps, long = _reads_per_place(_ppo(n_steps=24), counting_syncs)
    assert len(in_steps) == 24 and sum(ended for _, ended in in_steps) >= 3
    assert long == short


def test_the_rollout_counter_sees_the_reads_of_a_cache_without_the_host_view(counting_syncs, monkeypatch):
    """The counter can fail: without the env's host view each cache step reads the device."""
    model = _ppo()
    step = model._cache.step
    monkeypatch.setattr(model._cache, "step", lambda ids, mask, P, host=None: step(ids, mask, P))
    in_steps, outside = _reads_per_place(model, counting_syncs)
    assert outside >= len(in_steps)


def test_non_finite_logits_are_reported_at_the_end_of_the_rollout():
    """Flagged on the device at every step, read once: the rollout runs to its end on valid
    (meaningless) token ids, then raises."""
    model = _ppo()
    model._obs = model.env.reset(seed=0)[0]
    with torch.no_grad():
        model.policy.policy_head.bias.fill_(float("nan"))
    steps = []
    step = model.env.step
    model.env.step = lambda action: steps.append(action) or step(action)
    with pytest.raises(TrainingDivergedError, match="the policy's logits contain NaN or infinity"):
        model._collect()
    assert len(steps) == model.config.n_steps
    assert all(int(a.min()) >= 0 and int(a.max()) < model.env.single_action_space.n for a in steps)
    assert not bool(model._logits_nonfinite)  # read and cleared
