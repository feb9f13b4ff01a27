"""The README's code runs as pasted.

Every ```python block of README.md runs on its own, in a fresh interpreter, in an empty temporary
directory (whatever it writes, ``runs/`` or checkpoints, lands there), on the CPU (CUDA hidden) and
offline. A block that needs files a user must make first is marked, on the line before it, with
``<!-- readme-test: skip (the reason) -->``; a marker without a reason fails. The ```bash blocks
are checked lightly: every ``python scripts/X.py`` they name exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FENCE = re.compile(r"^```(?P<lang>\S*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<text>.*?)\s*-->", re.S)
SKIP = re.compile(r"skip\s*(?:\((?P<reason>[^)]*)\))?\s*$", re.S)
BLOCK_TIMEOUT_S = 300


class Block(NamedTuple):
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    heading: str  # the nearest heading above the block
    marker: str | None  # the text of a readme-test comment just before the block


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of ``text``, in order, with their heading and readme-test marker."""
    blocks = []
    for fence in FENCE.finditer(text):
        before = text[: fence.start()]
        headings = HEADING.findall(_without_fences(before))
        marker = MARKER.search(before.rstrip().rsplit("\n", 1)[-1])  # only on the line just above
        blocks.append(
            Block(
                lang=fence["lang"].lower(),
                code=fence["body"],
                line=before.count("\n") + 1,
                heading=headings[-1] if headings else "top",
                marker=marker["text"] if marker else None,
            )
        )
    return blocks


def _without_fences(text: str) -> str:
    """``text`` with its fenced blocks blanked, so a ``# comment`` in a block is not a heading."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def python_blocks(text: str) -> list[Block]:
    return [b for b in parse_blocks(text) if b.lang in ("python", "py")]


def block_ids(blocks: list[Block]) -> list[str]:
    """``<heading slug>-<index within that heading>``, e.g. ``the-vector-environment-0``."""
    seen: dict[str, int] = {}
    ids = []
    for block in blocks:
        slug = _slug(block.heading)
        ids.append(f"{slug}-{seen.get(slug, 0)}")
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def skip_reason(block: Block) -> str | None:
    """The reason given by a block's skip marker, None when it has none; fails on a bad marker."""
    if block.marker is None:
        return None
    match = SKIP.fullmatch(block.marker)
    if match is None:
        pytest.fail(
            f"README.md line {block.line}: unknown marker <!-- readme-test: {block.marker} -->; "
            "the one accepted is <!-- readme-test: skip (the reason) -->"
        )
    reason = (match["reason"] or "").strip()
    if not reason:
        pytest.fail(
            f"README.md line {block.line}: a skip marker needs a reason, "
            "<!-- readme-test: skip (needs a trained checkpoint) -->"
        )
    return reason


PYTHON_BLOCKS = python_blocks(README.read_text())


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # a CPU-only machine, whatever this one has
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),  # nothing read from, or written to, the user's cache
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_ids(PYTHON_BLOCKS))
def test_python_block_runs_as_pasted(block: Block, tmp_path: Path):
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(f"README.md line {block.line}: {reason}")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"README.md line {block.line} (under '{block.heading}') failed:\n{block.code}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


def test_readme_has_python_blocks_and_no_stray_markers():
    """Every readme-test marker sits on the line just above a python block, so none is ignored."""
    text = README.read_text()
    assert len(PYTHON_BLOCKS) >= 5
    attached = sum(block.marker is not None for block in parse_blocks(text))
    assert len(MARKER.findall(text)) == attached, "a readme-test marker is not just above a code block"
    for block in parse_blocks(text):
        if block.marker is not None:
            assert block.lang in ("python", "py"), (
                f"README.md line {block.line}: marker on a {block.lang} block"
            )
            skip_reason(block)


def test_bash_blocks_name_scripts_that_exist():
    blocks = [b for b in parse_blocks(README.read_text()) if b.lang in ("bash", "sh", "shell", "console")]
    named = {
        script for block in blocks for script in re.findall(r"python3?\s+(scripts/[\w./-]+\.py)", block.code)
    }
    assert named, "no `python scripts/...` command found in the README's bash blocks"
    missing = sorted(script for script in named if not (ROOT / script).is_file())
    assert not missing, f"the README runs scripts that do not exist: {missing}"


# ------------------------------------------------------------------------- the parser, by itself
def test_parser_finds_headings_markers_and_ignores_comments_in_code():
    text = (
        "# Title\n\n## Section\n\n```python\n# not a heading\nx = 1\n```\n\n"
        "<!-- readme-test: skip (needs a model) -->\n```python\ny = 2\n```\n\n"
        "```bash\npython scripts/train.py\n```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.lang, b.heading, b.marker) for b in blocks] == [
        ("python", "Section", None),
        ("python", "Section", "skip (needs a model)"),
        ("bash", "Section", None),
    ]
    assert blocks[0].code == "# not a heading\nx = 1\n"
    assert block_ids(python_blocks(text)) == ["section-0", "section-1"]
    assert skip_reason(blocks[1]) == "needs a model"


@pytest.mark.parametrize("marker", ["skip", "skip ()", "skip (  )", "skipped"])
def test_a_marker_without_a_reason_fails(marker):
    text = f"## S\n\n<!-- readme-test: {marker} -->\n```python\nx = 1\n```\n"
    (block,) = parse_blocks(text)
    with pytest.raises(pytest.fail.Exception):
        skip_reason(block)
