"""What the scripts share at run time: torch's thread count, and the argument checks of their CLIs.

**Threads.** torch starts one intra-op thread per core, and its OpenMP threads spin-wait for work
between operations. For the built-in policy (64 wide, 2 layers) a second thread is worth little
when the cores are free (about 1.2x on a 2-core CPU), and costs a lot when other processes keep
them busy: threads that spin for a core another process holds made the main job 3.9-5.6x slower
beside one busy process per core, against 1.4x with one thread (10-20x was seen on a shared
machine; ``python scripts/benchmark.py busy`` measures it). So the scripts default to one thread
for the built-in policy, and leave torch's own default (one per core, or ``OMP_NUM_THREADS``) for
Hugging Face models, whose larger matrix products can use more; ``--threads 1`` there too when
the cores are shared (:func:`default_threads`, :func:`set_threads`).

**Arguments.** Every script checks all of its arguments before it does any work or creates any
file, and words each mistake as ``--option: what is wrong``; the helpers here are the checks that
several scripts share: JSON options (:func:`json_value`), seeds (:func:`seed`), thread counts,
output directories (:func:`output_dir_error`), devices (:func:`device_error`), which options the
user gave explicitly (:func:`explicit_options`), and a help formatter that shows every default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1
"""Largest seed: NumPy's legacy ``np.random.seed``, which Stable-Baselines3 calls, takes 0..2**32-1."""


# ------------------------------------------------------------------------------------- threads
def default_threads(policy_model: str | os.PathLike[str] | None = None) -> int:
    """The scripts' default ``--threads``: 1 for the built-in policy, 0 (torch's default) when
    the policy is a Hugging Face model (``policy_model``)."""
    return 0 if policy_model is not None else 1


def set_threads(threads: int) -> int:
    """Make torch use ``threads`` threads (intra-op, and inter-op where torch still allows it:
    only before any parallel work); 0 leaves torch's default. Returns the intra-op count in effect.

    Call it at the start of a process: threads already started keep spinning until they idle.
    """
    import torch

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0: torch's default), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
        # torch refuses once parallel work has started or it was set before: keep what it is then
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


def add_threads_argument(parser: argparse.ArgumentParser, policy_model_option: bool = False) -> None:
    """``--threads N`` (default None: :func:`default_threads`, resolved by the script)."""
    default = (
        "1 with the built-in policy (safe on shared cores, see above), 0 with --policy-model"
        if policy_model_option
        else "1: a second thread gains the built-in policy little on free cores and loses it much on busy ones"
    )
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="torch threads; 0: torch's default, one per core (or OMP_NUM_THREADS). More threads than "
        f"free cores spin-wait and slow training many times over (default: {default})",
    )


# ------------------------------------------------------------------------------- argument types
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and ``(default: X)`` after every option's help, unless the
    help already says ``default: ...``, the option is a flag (default off), or it defaults to None
    (its help then says ``default: ...`` in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default:" in text
            or "%(default)" in text
            or action.default in (None, argparse.SUPPRESS)
            or isinstance(action, argparse._StoreConstAction | argparse._StoreTrueAction)
        ):
            return text
        return super()._get_help_string(action) or text


def json_value(text: str) -> object:
    """argparse type of the JSON options: the parsed value, or the parser's own error
    ``argument --option: not valid JSON: <why>``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc} in {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def seed(text: str) -> int:
    """argparse type of seeds: an integer from 0 to :data:`SEED_MAX`."""
    value = _integer(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to {SEED_MAX} (2**32 - 1, what NumPy's seeding accepts), got {value}"
        )
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------- checks
def output_dir_error(path: str | os.PathLike[str], option: str) -> str | None:
    """Why the directory ``path`` cannot be created or written into, or None if it can: a file
    at ``path`` or above it, or a directory the process may not write into. Creates nothing."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under the file {str(probe)!r}"
        return f"{option}: {str(path)!r} {where}, not a directory"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"{option}: cannot write into {str(probe)!r} (permission denied)"
    return None


def _child(job: Callable[..., dict[str, Any]], args: tuple[Any, ...], queue: Any) -> None:
    try:
        queue.put(("ok", job(*args)))
    except BaseException:  # reported to the parent, which raises it
        queue.put(("error", traceback.format_exc()))


def in_fresh_process(job: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """``job(*args)`` in a new ``spawn``-ed process, whose memory high-water mark is then its own
    (:func:`peak_rss_mib` there); ``job`` and its arguments must pickle. RuntimeError with the
    child's traceback if it raises, if it ends without a result (killed for memory), or if it
    gives none within ``timeout`` seconds (then it is terminated)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(job, args, queue))
    process.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:  # a child killed outright (out of memory) puts nothing: do not wait for ever
            try:
                status, value = queue.get(timeout=5)
                break
            except queue_module.Empty:
                if not process.is_alive():
                    try:  # what it put just before ending
                        status, value = queue.get(timeout=1)
                    except queue_module.Empty:
                        status, value = "error", f"the process ended with exit code {process.exitcode}"
                    break
                if deadline is not None and time.monotonic() > deadline:
                    status, value = "error", f"no result within {timeout:.0f} s"
                    break
    finally:
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(job, '__name__', job)} failed in its process:\n{value}")
    return value


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark in MiB (Linux reports it in KiB, macOS in
    bytes): what a run in a fresh process peaked at."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def new_run_dir(
    out: str | os.PathLike[str] | None, name: str, option: str = "--out"
) -> tuple[Path, str | None]:
    """The folder of a new run, ``out`` or ``runs/<name>_<time>`` when None, and why it cannot be
    used (a folder that already holds files, or :func:`output_dir_error`'s reasons), or None."""
    path = Path(out or f"runs/{name}_{time.strftime('%Y%m%d-%H%M%S')}")
    if path.is_dir() and any(path.iterdir()):
        return path, f"{option}: {str(path)!r} is not empty; choose another directory"
    return path, output_dir_error(path, option)


def make_dir(path: str | os.PathLike[str], option: str, exist_ok: bool = False) -> Path:
    """Create the directory ``path`` (and its parents); SystemExit naming ``option`` if it fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as exc:
        raise SystemExit(f"error: {option}: cannot create {str(path)!r}: {exc.strerror or exc}") from None
    return path


def device_error(device: str, option: str = "--device") -> str | None:
    """Why torch cannot use ``device`` here (unknown, or CUDA without CUDA), or None."""
    from textgym.core import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        return f"{option}: {exc}"
    return None


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` gives explicitly (whatever their value,
    the default's included). Parse ``argv`` with ``parser`` first: this assumes it is valid."""
    saved = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return set(vars(given))
