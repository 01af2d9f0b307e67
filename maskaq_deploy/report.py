"""report.json: the machine-readable result of verify/build, merged across runtimes of the same run."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SCHEMA_VERSION = 1


def merge_report(path: Path, new: dict) -> dict:
    """Keep the per-runtime results an earlier verify of the same model/recipe/method wrote into ``path``."""
    new = {"schema_version": REPORT_SCHEMA_VERSION, **new}
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return new
    same = all(old.get(k) == new.get(k) for k in ("model", "recipe", "method", "num_eval_images", "val_data"))
    if same and isinstance(old.get("runtimes"), dict):
        new["runtimes"] = {**old["runtimes"], **new["runtimes"]}
    return new
