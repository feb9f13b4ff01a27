"""What the tests of ``scripts/`` share: a script run as a user runs it (a fresh process in the
repository root, one thread) and a script loaded as a module (its ``__main__`` block not run)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
# One thread per process (the scripts' default too): the cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 1800  # only stops a hung process; a loaded machine must never reach it


def run(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python *args`` in the repository root; ``check``: AssertionError with both streams unless
    it exits 0."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env or ENV
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_script(
    name: str, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python scripts/<name>.py *args``, as :func:`run`."""
    return run(f"scripts/{name}.py", *args, check=check, env=env)


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a new module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"_textgym_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = functools.cache(load_script)
"""scripts/<name>.py as a module, loaded once for the whole session."""


def exit_code(fn: Callable[[list[str]], object], argv: list[str]) -> int | str | None:
    """The code ``fn(argv)`` exits with (it must raise SystemExit)."""
    with pytest.raises(SystemExit) as info:
        fn(argv)
    return info.value.code
