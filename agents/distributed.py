"""Data-parallel training across processes launched by ``torchrun``: the process group and the
few collective operations the agents need.

    torchrun --standalone --nproc_per_node=2 scripts/train.py --agent ppo --num-envs 128

Every process (rank) runs its own shard of the batched env (its own seeds, rollouts and KV cache)
and the same update on its own transitions. What makes the ranks one run:

- **Identical weights.** Rank 0's initial trainable weights are broadcast at the start
  (:func:`broadcast_parameters`); after every backward pass the gradients of the trainable
  parameters are summed across ranks (:func:`reduce_gradients`), so every rank takes the same
  optimizer step. Each rank's loss is its share of the whole minibatch's loss: the normalisers
  (PPO's transition count, the group agents' completion and token counts) are counted over every
  rank, so the summed gradient is the gradient of one process on the union of the shards.
- **Global statistics.** What the update normalises by (PPO's advantage mean and std over the
  minibatch, :func:`mean_var`), the loss terms it logs, approx-KL (so that early stopping on
  ``target_kl`` stops every rank after the same minibatch), the KL fed to the adaptive KL
  coefficient, the episode returns behind ``rollout/ep_rew_mean`` and the env-step count come from
  sums and counts reduced over all ranks (:func:`all_sum`, :func:`global_mean`). GRPO's and RLOO's
  group statistics stay within one rank: a group's rows all live in one rank's env.
- **Rank 0 writes.** TensorBoard, ``config.json`` and checkpoints; a checkpoint holds every
  rank's env episodes, counters and RNG states, gathered to rank 0 (:func:`gather_to_main`).

Nothing here starts a process group on import. :func:`init` starts one only in a process that
``torchrun`` launched (it sets ``WORLD_SIZE`` and ``RANK``); everywhere else every helper is the
identity of one process, and the agents run exactly as they would without this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from textgym.core import resolve_device


# ---------------------------------------------------------------------------- process group
def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without one), before :func:`init`."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def init(device: str | torch.device = "auto") -> torch.device:
    """Join the process group of a ``torchrun`` launch and return this rank's device.

    ``nccl`` on CUDA, each rank on the GPU of its ``LOCAL_RANK`` (unless ``device`` names one:
    ``cuda:N``); ``gloo`` on the CPU. Outside a launch this only resolves ``device`` ("auto": CUDA
    when available). A process group already started is joined as it is."""
    resolved = resolve_device(device)
    if not launched():
        return resolved
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if is_initialized():
        return resolved
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        dist.init_process_group("nccl", device_id=resolved)
    else:  # resolve_device accepts cpu and cuda only
        dist.init_process_group("gloo")
    return resolved


def close() -> None:
    """Leave the process group, if this process joined one."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes training together (1 outside a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small tensors of counts travel: nccl reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------- shards, seeds
def local_envs(num_envs: int, multiple: int = 1) -> int:
    """This rank's share of ``num_envs`` env rows (all ranks together); ``ValueError`` unless every
    rank gets the same whole number of groups of ``multiple`` rows (in one process the env itself
    checks ``num_envs``)."""
    size = world_size()
    if size > 1 and num_envs % (size * multiple):
        groups = f" x group_size {multiple}" if multiple > 1 else ""
        raise ValueError(
            f"num_envs={num_envs} counts the envs of all {size} processes together and must be a multiple "
            f"of {size}{groups} = {size * multiple}, so that every process gets the same whole "
            f"number of {'groups' if multiple > 1 else 'envs'}"
        )
    return num_envs // size


def env_seed(seed: int | None, num_groups: int) -> int | None:
    """The first seed of this rank's env shard. The env seeds its groups ``seed, seed + 1, ...``;
    rank r's groups continue where rank r - 1's stop, so the ranks together draw the prompts that
    one process with all the envs draws from ``seed``."""
    return None if seed is None else seed + rank() * num_groups


def seed_rank(seed: int | None) -> None:
    """Give this rank's torch generator its own stream (actions, minibatch order), derived from
    the run's seed and the rank, so that a run is reproducible; nothing in one process."""
    if seed is not None and world_size() > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))


# ------------------------------------------------------------------------------- collectives
def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Overwrite ``params`` with rank 0's (the initial weights)."""
    if world_size() > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_gradients(params: Sequence[torch.Tensor], *sums: torch.Tensor) -> None:
    """Sum the gradients of ``params`` over all ranks, and the tensors ``sums`` in place with them
    (the minibatch's logged sums: one collective per dtype, not one more per minibatch). Each
    rank's loss must be its share of the global loss (normalised by counts over all ranks); the
    sum is then the gradient of the whole minibatch. A gradient missing on some ranks counts as
    zeros there; one missing on every rank (a parameter the loss does not use, as GRPO's value
    head) stays missing, so that Adam leaves it alone as it does in one process."""
    if world_size() == 1 or not params:
        return
    had = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # (P,)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for t in (*sums, had):
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])  # (total,) one message, not one per tensor
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    for p, ranks_with_grad in zip(params, had.tolist(), strict=True):
        if ranks_with_grad == 0:
            p.grad = None


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (returned for convenience)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_int(value: int) -> int:
    """An integer summed over all ranks."""
    if world_size() == 1:
        return value
    return int(all_sum(torch.tensor([value], dtype=torch.int64, device=_collective_device())).item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if world_size() == 1:
        return flag
    box = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def mean_var(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The count, mean and unbiased variance of the values of ``x`` on all ranks together, from
    their sums (in float64); in one process ``x.numel(), x.mean(), x.var()`` themselves (NaN for
    the mean of no value and the variance of fewer than two)."""
    if world_size() == 1:
        nan = x.new_full((), float("nan"))  # a fill on the device, not a copy to it
        return x.numel(), x.mean() if x.numel() else nan, x.var() if x.numel() > 1 else nan
    x64 = x.detach().double()
    sums = all_sum(torch.stack([x64.new_tensor(float(x.numel())), x64.sum(), x64.square().sum()]))
    n = int(sums[0].item())
    mean = sums[1] / max(n, 1)
    var = (sums[2] - n * mean**2).clamp(min=0) / (n - 1) if n > 1 else sums.new_tensor(float("nan"))
    return n, mean.to(x.dtype), var.to(x.dtype)


def global_mean(values: Sequence[Any], width: int = 1) -> np.ndarray | None:
    """The column means (width,) of the rows ``values`` (n, width) of all ranks together, None
    when no rank has a row. In one process, NumPy's mean of the rows."""
    rows = np.asarray(values, dtype=np.float64).reshape(-1, width)  # (n, width)
    if world_size() == 1:
        return rows.mean(0) if len(rows) else None
    totals = torch.tensor([*rows.sum(0), len(rows)], dtype=torch.float64, device=_collective_device())
    all_sum(totals)
    count = float(totals[-1].item())
    return None if count == 0 else (totals[:-1] / count).cpu().numpy()


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the other ranks and
    in one process."""
    if world_size() == 1:
        return None
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out
