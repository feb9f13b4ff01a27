"""Settings every test shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the models here are tiny, and OpenMP threads that spin-wait for
    cores other processes hold make a test 10-20x slower on a busy machine (see README: Threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hand_rollout(vocab: int, P: int, L: int, seed: int = 0):
    """Observations (N=3, L) of a rollout laid out by hand, as TextGen-v0 lays them out: row 0
    starts with a prompt of <bos> alone (nothing before the prompt window's last column to
    prefill), row 1 with a short prompt, row 2 with a prompt filling the window; row 1 restarts
    on a <bos>-only prompt and row 2 on a short one mid-way, row 0 later on a full window (the
    rightmost column any row holds then moves left), while the others keep decoding. Rows that
    reach the last column stay there, as waiting rows do."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros_like(ids)

    def start(row: int, prompt_len: int) -> None:
        ids[row], mask[row] = 0, 0
        ids[row, P - prompt_len] = 1  # <bos>
        ids[row, P - prompt_len + 1 : P] = torch.randint(4, vocab, (prompt_len - 1,), generator=gen)
        mask[row, P - prompt_len : P] = 1

    for row, prompt_len in enumerate((1, 3, P)):
        start(row, prompt_len)
    for t in range(2 * (L - P)):
        yield {"input_ids": ids.clone(), "attention_mask": mask.clone()}
        restarts = {2: {1: 1, 2: 2}, 4: {0: P}}.get(t, {})  # row: the length of its new prompt
        for row, prompt_len in restarts.items():
            start(row, prompt_len)
        for row in set(range(3)) - set(restarts):  # the others append a token
            col = int(mask[row].nonzero().max()) + 1
            if col < L:
                ids[row, col], mask[row, col] = int(torch.randint(4, vocab, (1,), generator=gen)), 1


@pytest.fixture
def hand_rollout():
    """``hand_rollout(vocab, P, L)``: observations of a rollout with restarts mid-way, for testing
    KV caches against a full pass (4 special ids first, as every textgym tokenizer)."""
    return _hand_rollout


def _random_rollout(env, steps: int, seed: int = 1, reset_seed: int = 3):
    """Observations of ``steps`` steps of a batched env (``array_type="torch"``) under uniform
    random actions with extra <eos>, so that episodes end at many lengths and rows restart at
    different steps while the others keep decoding."""
    n, vocab, eos = env.num_envs, env.single_action_space.n, env.tokenizer.eos_id
    gen = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=reset_seed)
    for _ in range(steps):
        yield obs
        actions = torch.randint(0, vocab, (n,), generator=gen)
        actions[torch.rand(n, generator=gen) < 0.15] = eos
        obs = env.step(actions)[0]


@pytest.fixture
def random_rollout():
    """``random_rollout(env, steps)``: observations of a random rollout across many autoresets, for
    testing KV caches against a full pass."""
    return _random_rollout


def _assert_same_pass(
    got: torch.Tensor,
    expected: torch.Tensor,
    real: torch.Tensor,
    weights: list[torch.Tensor],
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 1,
) -> int:
    """Assert that two passes give the same hidden states (B, T, C) at the ``real`` (B, T)
    columns, and every weight the same gradient through them; returns how many weights had one.

    The gradients are of a random projection of the states, not of a sum of squares, whose
    gradient below a final layer norm is a small difference of large terms."""
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=rtol)
    probe = torch.randn(expected[real].shape, generator=torch.Generator().manual_seed(seed))
    got_grads = torch.autograd.grad((got[real] * probe).sum(), weights, allow_unused=True)
    expected_grads = torch.autograd.grad((expected[real] * probe).sum(), weights, allow_unused=True)
    compared = 0
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10)
            compared += 1
    return compared


@pytest.fixture
def assert_same_pass():
    """``assert_same_pass(got, expected, real, weights)``: the hidden states of two passes and
    every weight's gradient through them agree (see :func:`_assert_same_pass`)."""
    return _assert_same_pass


def _grouped_sequences(env, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences (N, L) as a group-relative rollout holds them: the rows of each group of a
    batched env (``array_type="torch"``) on one prompt, after a reset, then completions of
    ``lengths`` (N,) random allowed tokens (no special id), right-padded."""
    obs, _ = env.reset(seed=seed)
    ids, mask, P = obs["input_ids"].clone(), obs["attention_mask"].clone(), env.prompt_window
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(env.config.action_mask).nonzero().squeeze(1)
    allowed = allowed[allowed >= 4]  # <pad>, <bos>, <eos>, <unk> first in every textgym tokenizer
    for row, length in enumerate(lengths):
        ids[row, P : P + length] = allowed[torch.randint(len(allowed), (length,), generator=gen)]
        mask[row, P : P + length] = 1
    return ids, mask


@pytest.fixture
def grouped_sequences():
    """``grouped_sequences(env, lengths)``: a group-relative rollout's whole sequences (see
    :func:`_grouped_sequences`)."""
    return _grouped_sequences


# Tensor methods that make the host wait for a GPU. ``numpy`` is not among them: a GPU tensor
# needs ``cpu()`` first, which is.
CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu")


def _is_mask(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def _counting_syncs() -> Iterator[list[str]]:
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


@pytest.fixture
def counting_syncs():
    """``with counting_syncs() as calls:`` records in ``calls`` every read of a tensor into the
    host that would wait for a GPU (counted on the CPU, where nothing waits)."""
    return _counting_syncs
