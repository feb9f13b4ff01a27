"""The updates' host syncs: how often ``update`` reads the device (counted here on the CPU by
the conversions that would wait for a GPU), and the divergence check that needs no read per
minibatch: a non-finite loss or gradient makes the fused Adam skip that step and every later one,
and the error comes after the loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from agents import GRPO, PPO, RLOO, PPOConfig, TrainingDivergedError
from agents.buffer import compact
from agents.policy import PolicyConfig
from agents.ppo import filled_columns, filled_span

TINY = PolicyConfig(d_model=32, n_layers=1, n_heads=2)
CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


def _is_mask(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[str]]:
    """Record every call that would make the host wait for a GPU: a tensor read into Python
    (``item``, ``tolist``, ``bool(t)``, ...), ``nonzero`` and boolean-mask indexing (whose result
    size only the device knows). Reads nested inside one counted call count once."""
    calls: list[str] = []
    depth = [0]

    def counted(name: str, original):
        def wrapper(self, *args, **kwargs):
            if depth[0] == 0 and (name != "__getitem__" or _is_mask(args[0])):
                calls.append(name)
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in (*CONVERSIONS, "__getitem__"):
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield calls


def _ppo(**config) -> PPO:
    return PPO("TextGen-v0", PPOConfig(n_steps=8, policy=TINY, **config), 8, device="cpu", seed=0)


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
def test_an_update_reads_the_device_a_fixed_number_of_times(make, most):
    """Not once per minibatch: the count does not grow with epochs, minibatches or micro-batches."""
    model = make()
    batch = _batch(model)
    with counting_syncs() as calls:
        model._train(batch)
    assert len(calls) <= most, calls


def test_the_counter_sees_a_read_per_minibatch():
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
