"""The repository's own contracts: CI runs the README's test command, and the README's commands exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [
        line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
    ]


def test_ci_runs_exactly_the_readme_test_command():
    readme_lines = _bash_blocks((ROOT / "README.md").read_text())
    test_commands = [line for line in readme_lines if "pytest" in line and "pip install" in line]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_main_job_runs_a_script_that_exists():
    readme_lines = _bash_blocks((ROOT / "README.md").read_text())
    main = [line for line in readme_lines if "pip install" in line and "scripts/" in line]
    assert len(main) == 1, main
    script = re.search(r"python (scripts/\S+\.py)", main[0])
    assert script is not None and (ROOT / script[1]).is_file()
