"""The layers: ``scripts/`` -> ``agents/`` -> ``textgym/``, never upwards.

The environment package stands alone, so that an RL user can install and use it without our
agents (DESIGN.md, "Layers"). Two checks: every import statement in ``textgym/``'s source,
wherever it sits (a function body too), and what importing every ``textgym`` module really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXTGYM = ROOT / "textgym"
UPPER = ("agents", "scripts")  # the packages textgym must not reach


def _is_upper(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in UPPER)


def upward_imports(source: str, filename: str = "<source>") -> list[str]:
    """``line: statement`` of every import of an upper layer in ``source``: ``import agents``,
    ``from agents.x import y``, a relative import reaching above the package, and
    ``importlib.import_module("agents...")`` / ``__import__("agents...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:  # from .. import x: out of textgym, into whatever is beside it
                names = [f"{'.' * node.level}{node.module or ''}"]
            elif node.level == 0 and node.module:
                names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [
            f"{node.lineno}: {ast.unparse(node)}"
            for name in names
            if name.startswith("..") or _is_upper(name)
        ]
    return found


def textgym_sources() -> list[Path]:
    return sorted(TEXTGYM.rglob("*.py"))


def test_the_checker_sees_every_form_of_upward_import():
    source = """
import os
import agents
import agents.ppo as ppo
from agents.reward_model import LearnedReward
from textgym.rewards import RewardModel
from . import rewards
from .. import agents as up

def later():
    from agents import PPO
    importlib.import_module("agents.lm")
    __import__("scripts.train")
    importlib.import_module("textgym.hf")
"""
    lines = [found.split(":")[0] for found in upward_imports(source)]
    assert lines == ["3", "4", "5", "8", "11", "12", "13"]


def test_textgym_source_imports_no_upper_layer():
    assert textgym_sources(), f"no Python files under {TEXTGYM}"
    offending = {
        str(path.relative_to(ROOT)): found
        for path in textgym_sources()
        if (found := upward_imports(path.read_text(encoding="utf-8"), str(path)))
    }
    assert not offending, f"textgym must stand alone; it imports the agents or scripts in {offending}"


_IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import textgym
names = sorted(m.name for m in pkgutil.walk_packages(textgym.__path__, "textgym."))
for name in names:
    importlib.import_module(name)
upper = sorted(m for m in sys.modules if m.split(".")[0] in ("agents", "scripts"))
print(json.dumps({"modules": names, "upper": upper}))
"""


@pytest.mark.parametrize("start", ["textgym", "textgym.learned"])
def test_importing_every_textgym_module_loads_no_agents(start):
    """In a fresh interpreter (this one has the agents loaded already), from either entry point."""
    code = f"import {start}\n" + _IMPORT_EVERYTHING
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "textgym.learned" in report["modules"] and "textgym.nn" in report["modules"]
    assert report["upper"] == [], f"importing textgym loaded {report['upper']}"


def test_a_learned_reward_model_loads_and_scores_without_the_agents(tmp_path):
    """The checkpoint is written with the agents here, then read in a process that never imports them."""
    from agents.reward_model import save_reward_model
    from textgym.learned import RewardNet
    from textgym.nn import PolicyConfig
    from textgym.tasks import make_env_config

    tokenizer = make_env_config("sentiment").tokenizer
    net = RewardNet(tokenizer.vocab_size, 16, PolicyConfig(d_model=16, n_layers=1, n_heads=2))
    path = save_reward_model(tmp_path / "reward.pt", net, {"task": "sentiment", "tokenizer": None}, tokenizer)
    code = (
        "import sys, gymnasium as gym, textgym\n"
        f"env = gym.make('TextGen-v0', task='sentiment', reward={str(path)!r}, max_new_tokens=3)\n"
        "env.reset(seed=0)\n"
        "done = False\n"
        "while not done:\n"
        "    _, reward, terminated, truncated, _ = env.step(2)\n"
        "    done = terminated or truncated\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'agents'], 'agents imported'\n"
        "print(float(reward))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    float(result.stdout.strip().splitlines()[-1])
