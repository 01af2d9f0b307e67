"""The import arrows point one way: runtimes <- export <- maskaq_deploy, calib <- export, and no cycle among
the product modules (imports inside functions count too). The one product module every layer may import is
maskaq_deploy.errors, the errors' root, which itself imports nothing of the project."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"calib": "maskaq_deploy.calib", "export": "maskaq_deploy.export", "runtimes": "maskaq_deploy.runtimes",
           "maskaq_deploy": "maskaq_deploy"}
# subsystem -> the subsystems it must never import
FORBIDDEN = {"runtimes": ("maskaq_deploy.export", "maskaq_deploy.calib", "maskaq_deploy"),
             "calib": ("maskaq_deploy.export", "maskaq_deploy.runtimes", "maskaq_deploy"),
             "export": ("maskaq_deploy",)}
SHARED_LEAF = "maskaq_deploy.errors"  # the errors' root: importable from every layer


def module_name(folder: str, path: Path) -> str:
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([FOLDERS[folder], *parts])


def project_imports(path: Path) -> set[str]:
    """Every maskaq_deploy module ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskaq_deploy"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("maskaq_deploy")}
    return out


def product_layer(name: str) -> bool:
    """A module of maskaq_deploy's own folder (not one of the mapped subpackages)."""
    return name.startswith("maskaq_deploy") and not any(
        name == sub or name.startswith(sub + ".") for sub in list(FOLDERS.values())[:3])


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_subsystems_never_import_upwards(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for target in project_imports(path):
            for forbidden in FORBIDDEN[folder]:
                hit = product_layer(target) if forbidden == "maskaq_deploy" else (
                    target == forbidden or target.startswith(forbidden + "."))
                shared = target == SHARED_LEAF or target.startswith(SHARED_LEAF + ".")
                if hit and not shared and target != "maskaq_deploy.__version__":
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert bad == []


def test_the_product_modules_form_no_cycle():
    modules = {module_name("maskaq_deploy", p): p for p in (ROOT / "maskaq_deploy").glob("*.py")}
    edges = {m: {t for t in project_imports(p) if t in modules and t not in (m, "maskaq_deploy")}
             for m, p in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in edges.get(start, ()))

    cyclic = sorted(m for m in edges if m != "maskaq_deploy" and reaches(m, m))
    assert cyclic == []


def test_the_errors_root_is_a_leaf():
    """maskaq_deploy.errors imports nothing of the project, so importing it from any layer adds no arrow."""
    path = ROOT / "maskaq_deploy" / "errors.py"
    assert project_imports(path) == set()
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(path.read_text())))
