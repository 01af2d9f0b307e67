"""The generated docs are current, a hand edit is caught, and the README stays short with its two commands."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "scripts" / "render_docs.py"
INSTALL = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/maskaq-deploy build'
TESTS = ".venv/bin/python -m pytest -q tests"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render():
    return _module(RENDER, "render_docs")


@pytest.fixture()
def tree(tmp_path):
    """A copy of what the generator reads and writes: docs/ and benchmarks/results/."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), "--check", "--root", str(root)],
                          capture_output=True, text=True, check=False)


def test_committed_docs_are_current(render, capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def test_hand_edited_results_fail_the_check_naming_the_file(tree):
    path = tree / "docs" / "results.md"
    path.write_text(path.read_text().replace("| embedded |", "| embedded (edited) |", 1))
    done = _check(tree)
    assert done.returncode == 1
    assert "docs/results.md" in done.stderr
    assert "docs/cli.md" not in done.stderr


def test_hand_edited_cli_reference_fails_the_check(tree):
    path = tree / "docs" / "cli.md"
    path.write_text(path.read_text() + "\nA line written by hand.\n")
    done = _check(tree)
    assert done.returncode == 1
    assert "docs/cli.md" in done.stderr and "docs/results.md" not in done.stderr


def test_changed_figure_makes_results_stale_and_rendering_fixes_it(render, tree):
    path = tree / "benchmarks" / "results" / "real_calibration.json"
    data = json.loads(path.read_text())
    data["rows"][0]["torch_top1"] = 12.34
    path.write_text(json.dumps(data))
    assert render.main(["--check", "--root", str(tree)]) == 1
    assert render.main(["--root", str(tree)]) == 0  # rewrites docs/results.md
    assert "| 12.34 |" in (tree / "docs" / "results.md").read_text()
    assert render.main(["--check", "--root", str(tree)]) == 0


def test_cli_reference_lists_every_command_and_option():
    import click

    from maskaq_deploy.cli import cli

    text = (ROOT / "docs" / "cli.md").read_text()
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        assert f"## {name}\n" in text
        for param in cli.get_command(ctx, name).params:
            if isinstance(param, click.Option) and not param.hidden:
                assert f"`{param.opts[0]}" in text, (name, param.opts[0])


def test_every_results_file_says_where_its_figures_come_from():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["source"]["commands"], path.name
        assert data["machine"], path.name


def test_readme_is_short_and_holds_the_two_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    lines = [line.strip() for line in readme.splitlines()]
    assert INSTALL in lines and TESTS in lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL in ci and TESTS in ci


def test_a_rerun_replaces_the_transcribed_cell_of_the_same_model_recipe_method():
    tables = _module(ROOT / "benchmarks" / "result_tables.py", "result_tables")
    res = {"source": {"transcribed_from": "README.md", "commands": ["old"]},
           "cells": {"m/w8a8/noise": {"model": "m", "recipe": "w8a8", "method": "noise", "n": 3, "top1_mean": 90.0,
                                      "top1_std": 0.1, "seconds": 1.0, "from": "transcribed"}},
           "runs": {f"m/w8a8/noise/seed{s}": {"model": "m", "recipe": "w8a8", "method": "noise", "seed": s,
                                              "top1": t, "seconds": 2.0, "cpu_seconds": 1.5, "command": "new"}
                    for s, t in ((0, 97.0), (1, 98.0))}}
    tables.refresh_dfq(res, "new")
    cell = res["cells"]["m/w8a8/noise"]
    assert (cell["n"], cell["top1_mean"], cell["from"]) == (2, 97.5, "runs")
    assert abs(cell["top1_std"] - 0.7071) < 1e-3
    assert res["source"] == {"commands": ["new"]}  # nothing transcribed is left
