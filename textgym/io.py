"""Files the project writes for users, written so that a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it to
    ``path``: readers see the old file or the whole new one, never a half-written one.

    The temporary name is unique (``<name>.<random>.tmp``), so two writers of one path never
    share it: the last rename wins and both succeed. If ``write`` fails, the temporary file is
    removed and ``path`` is left as it was. Creates the parent directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power cut
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def check_zip_integrity(path: str | os.PathLike[str]) -> None:
    """Raise ValueError if a file written by ``torch.save`` is damaged.

    ``torch.save`` writes a zip archive with a CRC-32 of every entry (the pickled structure and
    each tensor's bytes), but ``torch.load`` does not check them: a flipped bit in a weight loads
    silently. This reads every entry back and compares its CRC (about a second per GB).
    Files that are not zip archives are left to the caller's own error.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is damaged: its zip structure cannot be read ({exc})") from None
    if bad is not None:
        raise ValueError(
            f"{str(path)!r} is damaged: entry {bad!r} fails its CRC-32 check (a changed or truncated "
            "byte); refusing to load it. Use an earlier copy of the checkpoint."
        )


def load_torch_file(path: str | os.PathLike[str], what: str) -> Any:
    """What ``torch.save`` wrote at ``path``, checked for damage first (:func:`check_zip_integrity`)
    and loaded on the CPU with ``weights_only=True``; FileNotFoundError or ValueError naming
    ``what`` (e.g. "reward-model checkpoint")."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    check_zip_integrity(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a textgym {what} ({type(exc).__name__}: {exc})") from None


def load_torch_checkpoint(path: str | os.PathLike[str], schema: str, what: str) -> dict[str, Any]:
    """A checkpoint dict written with ``"schema": schema``, checked for damage
    (:func:`check_zip_integrity`) and loaded on the CPU with ``weights_only=True``;
    FileNotFoundError or ValueError naming ``what`` (e.g. "reward-model")."""
    ckpt = load_torch_file(path, f"{what} checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("schema") != schema:
        raise ValueError(f"{str(path)!r} is not a textgym {what} checkpoint (schema {schema})")
    return ckpt
