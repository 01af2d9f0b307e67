"""The distribution owns one import name: calib/, export/ and runtimes/ install as maskaq_deploy subpackages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # run outside the repository, so the source folders on the current directory cannot mask the install
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["calib", "export", "runtimes"])
def test_generic_top_level_names_are_not_installed(name, tmp_path):
    proc = _run_python(f"import {name}", tmp_path)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, proc.stderr


def test_subpackages_resolve_to_the_repository_folders(tmp_path):
    proc = _run_python("import maskaq_deploy.calib.dfq, maskaq_deploy.export.rules, maskaq_deploy.runtimes as r;"
                       "import maskaq_deploy.calib as c; print(c.__file__); print(r.__file__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    calib_file, runtimes_file = (Path(p) for p in proc.stdout.split())
    assert calib_file.parent.name == "calib" and runtimes_file.parent.name == "runtimes"


def test_wheel_holds_one_top_level_package(tmp_path):
    # setuptools >= 70.1 builds a wheel itself, without the `wheel` package or network access
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta;"
                           "print(build_meta.build_wheel(sys.argv[1]))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = tmp_path / proc.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"maskaq_deploy"}, tops
    for expected in ("maskaq_deploy/calib/__init__.py", "maskaq_deploy/calib/dfq/methods.py",
                     "maskaq_deploy/export/qdq.py", "maskaq_deploy/export/templates/verify_engine.py",
                     "maskaq_deploy/runtimes/ort_backend.py", "maskaq_deploy/assets/embedded/model.safetensors"):
        assert expected in names, f"{expected} missing from the wheel"


@pytest.mark.parametrize("name", ["calib", "export", "runtimes"])
def test_source_tree_resolves_subpackages_without_an_import_hook(name):
    # type checkers and IDEs read the tree, not the editable install's finder: maskaq_deploy/<name> must lead
    # to the top-level folder itself
    link = ROOT / "maskaq_deploy" / name
    assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
    assert (link / "__init__.py").is_file()
