"""Settings every test shares."""

from __future__ import annotations

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
