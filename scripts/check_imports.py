"""Fail when the type checker cannot resolve an import of the package (CI's static-resolution gate).

Runs mypy over ``maskaq_deploy`` (its ``[tool.mypy]`` table in pyproject.toml) from the repository root and
counts the findings that mean "this import cannot be followed": ``import-not-found`` and ``import-untyped``.
Other mypy findings are reported as a count and do not fail the check: the package is not fully typed yet.
Exit 0 when no import is unresolved, 1 otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_CODES = ("import-not-found", "import-untyped")


def main() -> int:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes"],
                          cwd=ROOT, capture_output=True, text=True)
    findings = [line for line in proc.stdout.splitlines() if re.search(r"\[[a-z-]+\]$", line)]
    unresolved = [line for line in findings if line.endswith(tuple(f"[{c}]" for c in IMPORT_CODES))]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not findings):
        print(f"check_imports: mypy failed to run:\n{proc.stdout}{proc.stderr}", file=sys.stderr)
        return 1
    for line in unresolved:
        print(line)
    print(f"check_imports: {len(unresolved)} unresolved imports, {len(findings) - len(unresolved)} other "
          "type findings (not gated)")
    return 1 if unresolved else 0


if __name__ == "__main__":
    sys.exit(main())
