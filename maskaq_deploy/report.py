"""report.json on disk: merging with an earlier verify of the same run, validating a report read back (a
``--baseline``), and the latency table bench keeps beside it.

The schema is versioned (``records.REPORT_SCHEMA_VERSION``, with its rules) and every key is described in
docs/report_schema.md; the record itself is ``records.Report``. Writing it is the last step of a verify or a
build (``pipeline.finish``), once per command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from maskaq_deploy.calib.checkpoint import atomic_write_json, read_manifest
from maskaq_deploy import layout
from maskaq_deploy.errors import UsageError
from maskaq_deploy.records import REPORT_FILE, REPORT_SCHEMA_VERSION, Manifest, Report
from maskaq_deploy.render import write_reports

log = logging.getLogger(__name__)

LATENCY_FILE = layout.LATENCY_FILE  # bench rows, kept apart so a bench before the first verify is not lost
# Keys a report must have to serve as a baseline: (key, accepted types).
REQUIRED_KEYS = (("model", str), ("recipe", str), ("fp_top1", (int, float)), ("runtimes", dict),
                 ("num_eval_images", int))
# Runs whose per-runtime results may be merged: same checkpoint identity and the same images.
MERGE_KEYS = ("model", "recipe", "method", "num_eval_images", "val_data")
TOP1_RANGE = (0.0, 100.0)  # top-1 figures are percentages
TOP1_KEYS = ("fp_top1", "quant_top1")  # the report's own top-1 figures (each runtime has its ``top1``)


def merge_report(path: Path, new: Report) -> Report:
    """``new`` with the per-runtime results (and the latency table) an earlier verify of the same model / recipe
    / method / images wrote into ``path`` (a report.json that reads as one); the new run's entries win."""
    old = _read_valid(Path(path))
    if old is None or any(getattr(old, k) != getattr(new, k) for k in MERGE_KEYS):
        return new
    merged = dataclasses.replace(new, runtimes={**old.runtimes, **new.runtimes})
    if old.latency and merged.latency is None:
        merged.latency = old.latency
    return merged


def _read_valid(path: Path) -> Report | None:
    """The report.json at ``path`` when it is one (anything else: None)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None if validate_report(raw) else Report.from_dict(raw)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _top1_problem(what: str, value) -> str | None:
    lo, hi = TOP1_RANGE
    if not lo <= value <= hi:
        return f"{what} {value} is outside [{lo:g}, {hi:g}] (top-1 is a percentage)"
    return None


def validate_report(report) -> list[str]:
    """Problems that keep ``report`` from being read as a report.json (empty list: fine)."""
    if not isinstance(report, dict):
        return [f"the top level is a {type(report).__name__}, not an object"]
    problems = []
    version = report.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append("it has no integer schema_version")
    elif version > REPORT_SCHEMA_VERSION:
        problems.append(f"its schema_version {version} is newer than this tool reads ({REPORT_SCHEMA_VERSION}); "
                        "upgrade maskaq-deploy")
    for key, types in REQUIRED_KEYS:
        value = report.get(key)
        if key not in report:
            problems.append(f"key {key!r} is missing")
        elif not isinstance(value, types) or isinstance(value, bool):
            problems.append(f"key {key!r} is a {type(value).__name__}")
    for key in TOP1_KEYS:
        value = report.get(key)
        if value is not None and not _number(value):
            problems.append(f"key {key!r} is not a finite number")
        elif value is not None:
            problems.append(_top1_problem(key, value))
    runtimes = report.get("runtimes")
    if isinstance(runtimes, dict):
        if not runtimes:
            problems.append("'runtimes' is empty")
        for name, r in runtimes.items():
            top1 = r.get("top1") if isinstance(r, dict) else None
            if not _number(top1):
                problems.append(f"runtime {name!r} has no numeric top1")
            else:
                problems.append(_top1_problem(f"runtime {name!r} top1", top1))
    return [p for p in problems if p]


def report_of(report: Report | dict, what: str = "the baseline") -> Report:
    """``report`` (a Report, or a dict as read from a report.json) checked like a file; every problem is a
    one-line UsageError naming ``what``."""
    raw = report.to_dict() if isinstance(report, Report) else report
    problems = validate_report(raw)
    if problems:
        raise UsageError(f"{what} is not a maskaq-deploy report: {'; '.join(problems[:3])}")
    return report if isinstance(report, Report) else Report.from_dict(raw)


def read_report(path, what: str = "`baseline`") -> Report:
    """A report.json from disk, checked (required keys, numbers, top-1 figures within [0, 100]); every problem
    is a one-line UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} not found; give the report.json of a previous run (keep it as a CI "
                         "artifact, or copy it out of the run directory)")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); give a report.json "
                         "written by maskaq-deploy verify or build") from None
    return report_of(report, f"{what} {path}")


def record_latency(run_dir, rows: list[dict]) -> Path | None:
    """Keep bench's latency rows: RUN/latency.json always; when RUN/report.json exists, also its ``latency``
    key and a fresh report.md / report.html (gate and sensitivity as they were). Returns the report path."""
    run_dir = Path(run_dir)
    rows = [dict(r) for r in rows]
    atomic_write_json(run_dir / LATENCY_FILE, rows)
    path = run_dir / REPORT_FILE
    report = _read_valid(path)
    if report is None:
        return None
    report.latency = rows
    atomic_write_json(path, report.to_dict())
    write_reports(run_dir, report, Manifest.from_dict(read_manifest(run_dir)))
    return path


def read_latency(run_dir: Path) -> list[dict] | None:
    try:
        rows = json.loads((run_dir / LATENCY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None
