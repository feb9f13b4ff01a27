"""The batched episode core: N token-generation episodes as tensors on one device.

Both faces of the environment (the single :class:`~textgym.env.TextGenEnv` and the vector
:class:`~textgym.vector.TextGenVectorEnv`) drive this class and nothing else holds episode logic:
append a token, detect the end, score every finished episode in one reward-model call, reset rows.

Layout of a row (``P = max_prompt_tokens``, ``M = max_new_tokens``)::

    column:  0 ........ P-1 | P ........... P+M-1
             <pad>.. <bos> prompt | generated tokens, then <pad>
    mask:    0 ..... 1 ...... 1 | 1 ... 1       0 ... 0

Prompts are left-padded into the prompt window and generated tokens fill the generation window
from column ``P``, so the t-th generated token of every episode sits in column ``P + t`` whatever
its prompt's length: a batch of episodes is one rectangular array, and the column of an entry is
its slot in an agent's KV cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from textgym.rewards import TokenRewardModel
from textgym.tasks import EnvConfig

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), ``"auto"`` (CUDA when available) or a torch.device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: {', '.join(DEVICES)} or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; accepted: {', '.join(DEVICES)} or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def check_bfloat16(device: str | torch.device, what: str) -> None:
    """Refuse ``what`` (a bfloat16 setting, named as the user gave it) on a device without
    bfloat16 arithmetic: a device other than the CPU or CUDA, or a GPU without it."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} runs on the CPU or a CUDA GPU, not on {device}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{what}: {torch.cuda.get_device_name(device)} has no bfloat16 support; use float32")


#: The episode state (token ids and attention mask) may take at most this share of the total
#: memory of its device. It is not the whole footprint: the environment also returns a copy of the
#: state as each observation, the vector env's batched observation space holds two arrays of the
#: same size, and the agent needs room of its own.
MAX_STATE_FRACTION = 0.25
#: The bound used where a device's memory cannot be read (1 TiB).
FALLBACK_MEMORY_BYTES = 2**40


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (the machine's physical memory for the CPU), or None."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def state_nbytes(config: EnvConfig, num_envs: int) -> int:
    """Bytes of the core's tensors for ``num_envs`` rows: token ids and mask, (N, L) int64 each;
    the prompt tables, (num_prompts, L) int64 each; three (N,) int64 vectors."""
    L = config.seq_len
    return 8 * (2 * num_envs * L + 2 * len(config.prompts) * L + 3 * num_envs)


def check_state_fits(config: EnvConfig, num_envs: int, device: torch.device) -> None:
    """Refuse sizes whose state cannot fit, before torch's allocator is asked for it.

    The bound is :data:`MAX_STATE_FRACTION` of the device's total memory (not of what is free at
    the moment, which would make construction succeed or fail with the load of the machine).
    """
    need = state_nbytes(config, num_envs)
    total = device_memory(device)
    limit = int((FALLBACK_MEMORY_BYTES if total is None else total) * MAX_STATE_FRACTION)
    if need <= limit:
        return
    of = "of an assumed" if total is None else "of the"
    raise ValueError(
        f"num_envs={num_envs} episodes of seq_len={config.seq_len} tokens (max_prompt_tokens="
        f"{config.max_prompt_tokens} + max_new_tokens={config.max_new_tokens}) need {_gib(need)} for the "
        f"episode state alone (token ids and attention mask: num_envs x seq_len x 2 x 8 bytes), over "
        f"the limit of {_gib(limit)}: {MAX_STATE_FRACTION:.0%} {of} {_gib(total or FALLBACK_MEMORY_BYTES)} "
        f"of memory on {device}; lower num_envs or max_new_tokens"
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


class StepResult(NamedTuple):
    """What one step of the core produced, for all N rows."""

    reward: torch.Tensor  # (N,) float64: score at the last step plus per-token terms
    terminated: torch.Tensor  # (N,) bool: <eos> emitted
    truncated: torch.Tensor  # (N,) bool: max_new_tokens reached without <eos>
    finished: torch.Tensor  # (k,) long: rows whose episode ended in this step
    prompts: list[str] | None  # (k,) prompt text of each finished row; None if text was not decoded
    completions: list[str] | None  # (k,) completion text of each finished row (<eos> excluded), or None
    scores: np.ndarray  # (k,) float64: the reward model's score of each finished row
    lengths: np.ndarray  # (k,) int64: generated tokens of each finished episode, <eos> included
    prompt_index: np.ndarray  # (k,) int64: the prompt index of each finished row
    finished_rows: np.ndarray  # (k,) int64: ``finished`` on the host
    terminated_host: np.ndarray  # (N,) bool: ``terminated`` on the host
    truncated_host: np.ndarray  # (N,) bool: ``truncated`` on the host


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """The host array ``values`` on ``device``. On a GPU the copy goes through pinned memory
    without blocking, so the host does not wait for the work queued before it (a copy from
    ordinary memory would). On the CPU the tensor shares ``values``' memory: give an array that
    nothing changes afterwards."""
    host = torch.from_numpy(np.ascontiguousarray(values))
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class TextGenCore:
    """N episodes of one :class:`~textgym.tasks.EnvConfig` on ``device``.

    :param config: the resolved episode definition.
    :param num_envs: number of rows (episodes in flight).
    :param device: where the state lives.
    :param text_infos: decode the text of every finished episode for the step's result; False
        decodes it only for a reward model of text.
    """

    def __init__(self, config: EnvConfig, num_envs: int, device: torch.device, text_infos: bool = True):
        check_state_fits(config, num_envs, device)
        self.config = config
        self.num_envs = num_envs
        self.device = device
        tok = config.tokenizer
        self.pad_id, self.eos_id = tok.pad_id, tok.eos_id
        P, L = config.max_prompt_tokens, config.seq_len
        self.prompt_window, self.seq_len, self.max_new_tokens = P, L, config.max_new_tokens

        # One ready-made row per prompt; a reset copies rows of these tables.
        rows = torch.full((len(config.prompts), L), self.pad_id, dtype=torch.long)  # (num_prompts, L)
        for i, ids in enumerate(config.prompt_ids):
            rows[i, P - len(ids) : P] = torch.tensor(ids)
        self._row_table = rows.to(device)
        self.prompt_lengths = np.array(
            [len(ids) for ids in config.prompt_ids], dtype=np.int64
        )  # (num_prompts,)
        self._mask_table = torch.zeros_like(self._row_table)
        for i, ids in enumerate(config.prompt_ids):
            self._mask_table[i, P - len(ids) : P] = 1

        self.tokens = torch.full((num_envs, L), self.pad_id, dtype=torch.long, device=device)  # (N, L)
        self.mask = torch.zeros((num_envs, L), dtype=torch.long, device=device)  # (N, L)
        self.gen_len = torch.zeros(num_envs, dtype=torch.long, device=device)  # (N,)
        self.prompt_index = torch.zeros(num_envs, dtype=torch.long, device=device)  # (N,)
        # The host's copies of ``gen_len`` and ``prompt_index``, kept by every reset and step (the
        # host knows them without reading the device) and by :meth:`load`.
        self.gen_len_host = np.zeros(num_envs, dtype=np.int64)
        self.prompt_index_host = np.zeros(num_envs, dtype=np.int64)
        self._all_rows = torch.arange(num_envs, device=device)
        self._no_rows = torch.zeros(0, dtype=torch.long, device=device)
        reward = config.reward
        # Token reward models take the finished rows as ids, on the device, when they read the
        # env's ids. Not with a chat template: the reward judges the prompt as written, and the
        # ids hold it rendered.
        self.ids_reward = (
            isinstance(reward, TokenRewardModel)
            and not config.chat_template
            and reward.reads(config.tokenizer)
        )
        self.text_infos = text_infos
        # Seconds spent turning finished rows into text and in the reward model, for benchmarks.
        self.timings = {"decode": 0.0, "reward": 0.0}

    @property
    def num_prompts(self) -> int:
        return len(self.config.prompts)

    def sample_prompts(self, rngs: Sequence[np.random.Generator]) -> list[int]:
        """One prompt index per generator: the single way every face draws a prompt."""
        n = self.num_prompts
        return [int(rng.integers(n)) for rng in rngs]

    def reset(self, rows: np.ndarray, prompt_index: np.ndarray) -> None:
        """Start new episodes in ``rows`` (k,) from the prompts ``prompt_index`` (k,), both int64
        host arrays (copied to the device without waiting for it)."""
        rows, prompt_index = np.asarray(rows, dtype=np.int64), np.asarray(prompt_index, dtype=np.int64)
        both = to_device(np.stack([rows, prompt_index]), self.device)  # (2, k): one copy, a new array
        on_device, index = both[0], both[1]
        self.tokens[on_device] = self._row_table[index]
        self.mask[on_device] = self._mask_table[index]
        self.gen_len[on_device] = 0
        self.prompt_index[on_device] = index
        self.gen_len_host[rows] = 0
        self.prompt_index_host[rows] = prompt_index

    def load(
        self, tokens: torch.Tensor, mask: torch.Tensor, gen_len: torch.Tensor, prompt_index: torch.Tensor
    ) -> None:
        """Set every row's state (CPU tensors of :attr:`tokens`, :attr:`mask`, :attr:`gen_len`
        and :attr:`prompt_index`'s shapes), e.g. from a checkpoint."""
        for name, value in (
            ("tokens", tokens),
            ("mask", mask),
            ("gen_len", gen_len),
            ("prompt_index", prompt_index),
        ):
            getattr(self, name).copy_(value.to(self.device))
        self.gen_len_host[:] = gen_len.cpu().numpy()
        self.prompt_index_host[:] = prompt_index.cpu().numpy()

    def step(
        self,
        actions: torch.Tensor,
        active: np.ndarray | None = None,
        refuse: torch.Tensor | None = None,
    ) -> StepResult | None:
        """Append ``actions`` (N,) to the rows flagged in ``active`` (N,) bool, a host array (all
        rows if None).

        Inactive rows are left as they are and report reward 0 and no end. Every episode that
        ends is scored in one reward-model call; if that call fails, the error propagates and the
        finished rows must be reset before they are stepped again.

        ``refuse``: a 0-d bool tensor (on the device, computed from ``actions``); where it is
        True the step is undone, leaving every row as it was, and None is returned (the caller
        says why). The step reads the device once, every row's end flags together with
        ``refuse``, and once more where episodes end: the reward model's input (text) or its
        scores (ids).
        """
        N, P, M = self.num_envs, self.prompt_window, self.max_new_tokens
        if active is None:
            rows, acts = self._all_rows, actions  # (N,)
        else:
            rows = to_device(np.flatnonzero(active), self.device)  # (n,)
            acts = actions[rows]
        cols = P + self.gen_len[rows]  # (n,)
        self.tokens[rows, cols] = acts
        self.mask[rows, cols] = 1
        self.gen_len[rows] += 1
        term = acts == self.eos_id  # (n,)
        trunc = ~term & (self.gen_len[rows] >= M)  # (n,)
        penalty = 0.0 - self.config.length_penalty  # 0.0 - x: no -0.0 rewards
        if active is None:
            terminated, truncated = term, trunc
            reward = torch.full((N,), penalty, dtype=torch.float64, device=self.device)
        else:
            terminated = torch.zeros(N, dtype=torch.bool, device=self.device)
            truncated = torch.zeros_like(terminated)
            terminated[rows], truncated[rows] = term, trunc
            # Inactive rows get 0.0 exactly (not 0.0 * -penalty = -0.0).
            reward = torch.zeros(N, dtype=torch.float64, device=self.device).index_fill_(0, rows, penalty)
        flags = [terminated, truncated] if refuse is None else [terminated, truncated, refuse.reshape(1)]
        host = torch.cat(flags).cpu().numpy()  # (2N or 2N + 1,) the step's one read of the device
        if refuse is not None and host[2 * N]:
            self.tokens[rows, cols] = self.pad_id  # undo: the generation window held padding there
            self.mask[rows, cols] = 0
            self.gen_len[rows] -= 1
            return None
        if active is None:
            self.gen_len_host += 1
        else:
            self.gen_len_host[active] += 1
        terminated_host, truncated_host = host[:N], host[N : 2 * N]
        finished_rows = np.flatnonzero(terminated_host | truncated_host)  # (k,)
        flags_host = (finished_rows, terminated_host, truncated_host)
        if finished_rows.size == 0:
            empty, none = np.zeros(0), np.zeros(0, dtype=np.int64)
            return StepResult(
                reward, terminated, truncated, self._no_rows, [], [], empty, none, none, *flags_host
            )

        finished = to_device(finished_rows, self.device)  # (k,)
        lengths = self.gen_len_host[finished_rows]  # (k,) <eos> included
        completion_len = lengths - terminated_host[finished_rows]  # (k,) <eos> excluded
        prompt_index = self.prompt_index_host[finished_rows]
        score = self._score_ids if self.ids_reward else self._score_text
        prompts, completions, scores = score(reward, finished, completion_len, prompt_index)
        return StepResult(
            reward,
            terminated,
            truncated,
            finished,
            prompts,
            completions,
            scores,
            lengths,
            prompt_index,
            *flags_host,
        )

    def _score_text(
        self,
        reward: torch.Tensor,
        finished: torch.Tensor,
        completion_len: np.ndarray,
        prompt_index: np.ndarray,
    ) -> tuple[list[str], list[str], np.ndarray]:
        """Score the ``finished`` rows (k,) as text, adding the scores to ``reward`` (N,) in place."""
        P = self.prompt_window
        ids = self.tokens[finished, P:].cpu().numpy()  # (k, M): the one copy the reward model needs
        start = time.perf_counter()
        completions = self.config.tokenizer.decode_batch(ids, completion_len)
        prompts = [self.config.prompts[i] for i in prompt_index.tolist()]
        decoded = time.perf_counter()
        scores = self.config.reward(prompts, completions)
        self.timings["decode"] += decoded - start
        self.timings["reward"] += time.perf_counter() - decoded
        reward[finished] += to_device(np.asarray(scores, dtype=np.float64), self.device)
        return prompts, completions, scores

    def _score_ids(
        self,
        reward: torch.Tensor,
        finished: torch.Tensor,
        completion_len: np.ndarray,
        prompt_index: np.ndarray,
    ) -> tuple[list[str] | None, list[str] | None, np.ndarray]:
        """Score the ``finished`` rows (k,) with the token reward model, as ids on the device,
        adding the scores to ``reward`` (N,) in place; text is decoded only if ``text_infos``."""
        P, M = self.prompt_window, self.max_new_tokens
        tokens = self.tokens[finished]  # (k, L)
        lengths = to_device(completion_len, self.device)  # (k,) <eos> excluded
        completion_mask = (torch.arange(M, device=self.device) < lengths.unsqueeze(1)).long()  # (k, M)
        start = time.perf_counter()
        model = self.config.reward
        assert isinstance(model, TokenRewardModel)
        scores = model.call_ids(
            tokens[:, :P], self.mask[finished, :P], tokens[:, P:], completion_mask, check_finite=False
        )  # (k,)
        host = scores.cpu().numpy()  # the one read: for the faces' infos and the finite check
        model.check_finite(host, tokens[:, P:], completion_mask)
        reward[finished] += scores
        self.timings["reward"] += time.perf_counter() - start
        prompts = completions = None
        if self.text_infos:
            start = time.perf_counter()
            completions = self.config.tokenizer.decode_batch(tokens[:, P:].cpu().numpy(), completion_len)
            prompts = [self.config.prompts[i] for i in prompt_index.tolist()]
            self.timings["decode"] += time.perf_counter() - start
        return prompts, completions, host.astype(np.float64, copy=True)

    def texts(self, rows: torch.Tensor | None = None) -> tuple[list[str], list[str]]:
        """(prompts, completions so far) of ``rows`` (k,) (all rows if None), ``<eos>`` excluded:
        one device-to-host copy and one ``decode_batch`` call."""
        P, M = self.prompt_window, self.max_new_tokens
        sel = self._all_rows if rows is None else rows
        packed = (
            torch.cat(
                [
                    self.tokens[sel, P:],  # (k, M)
                    self.gen_len[sel].unsqueeze(1),
                    self.prompt_index[sel].unsqueeze(1),
                ],
                dim=1,
            )
            .cpu()
            .numpy()
        )  # (k, M + 2)
        completions = self.config.tokenizer.decode_batch(packed[:, :M], packed[:, M])
        return [self.config.prompts[i] for i in packed[:, M + 1].tolist()], completions

    def text(self, row: int) -> tuple[str, str]:
        """(prompt, completion so far) of one row, for rendering."""
        prompts, completions = self.texts(torch.tensor([row], device=self.device))
        return prompts[0], completions[0]
