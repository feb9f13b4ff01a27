"""Files the project writes for users, written so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (``<name>.tmp``), then rename it to
    ``path``: readers see the old file or the whole new one, never a half-written one. Creates
    the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (:func:`atomic_write`).

    Values JSON cannot hold are written as their ``repr``.
    """
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=repr) + "\n"))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` atomically (:func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch_checkpoint(path: str | os.PathLike[str], schema: str, what: str) -> dict[str, Any]:
    """A checkpoint dict written with ``"schema": schema``, loaded on the CPU with
    ``weights_only=True``; FileNotFoundError or ValueError naming ``what`` (e.g. "reward-model")."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a textgym {what} checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != schema:
        raise ValueError(f"{str(path)!r} is not a textgym {what} checkpoint (schema {schema})")
    return ckpt
