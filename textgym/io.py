"""Files the project writes for users, written so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically: a temporary file beside ``path``, then a rename.

    Values JSON cannot hold are written as their ``repr``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=repr) + "\n")
    os.replace(tmp, path)
    return path
