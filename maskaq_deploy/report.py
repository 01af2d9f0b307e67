"""report.json: the machine-readable result of verify/build, merged across runtimes of the same run.

The schema is versioned (``schema_version``) and every key is described in docs/report_schema.md. Adding a key
keeps the version (readers ignore keys they do not know); renaming or removing a key, or changing what one
means, increments it. ``finish_report`` is what every verify/build ends with: gate, sensitivity table,
report.json, report.md and report.html.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from maskaq_deploy.errors import UsageError

log = logging.getLogger(__name__)

# 1: the undocumented first format. 2: documented; adds val_fingerprint, created, command, gate, sensitivity,
# latency (all additive: a version-1 report is still a valid baseline).
REPORT_SCHEMA_VERSION = 2
REPORT_FILE = "report.json"
LATENCY_FILE = "latency.json"  # bench rows, kept apart so a bench before the first verify is not lost
# Keys a report must have to serve as a baseline: (key, accepted types).
REQUIRED_KEYS = (("model", str), ("recipe", str), ("fp_top1", (int, float)), ("runtimes", dict),
                 ("num_eval_images", int))
# Runs whose per-runtime results may be merged: same checkpoint identity and the same images.
MERGE_KEYS = ("model", "recipe", "method", "num_eval_images", "val_data")


def merge_report(path: Path, new: dict) -> dict:
    """Keep the per-runtime results (and the latency table) an earlier verify of the same model / recipe /
    method / images wrote into ``path``; the new run's entries win."""
    new = {"schema_version": REPORT_SCHEMA_VERSION, **new}
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return new
    if not isinstance(old, dict):
        return new
    same = all(old.get(k) == new.get(k) for k in MERGE_KEYS)
    if same and isinstance(old.get("runtimes"), dict):
        new["runtimes"] = {**old["runtimes"], **new["runtimes"]}
    if same and old.get("latency") and "latency" not in new:
        new["latency"] = old["latency"]
    return new


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
    runtimes = report.get("runtimes")
    if isinstance(runtimes, dict):
        if not runtimes:
            problems.append("'runtimes' is empty")
        for name, r in runtimes.items():
            top1 = r.get("top1") if isinstance(r, dict) else None
            if not isinstance(top1, (int, float)) or isinstance(top1, bool) or not math.isfinite(top1):
                problems.append(f"runtime {name!r} has no numeric top1")
    return problems


def read_report(path, what: str = "--baseline") -> dict:
    """A report.json from disk, checked; every problem is a one-line UsageError naming the file."""
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
    problems = validate_report(report)
    if problems:
        raise UsageError(f"{what} {path} is not a maskaq-deploy report: {'; '.join(problems[:3])}")
    return report


@dataclass
class FinishedReport:
    report: dict
    gate: object  # gate.GateResult
    md_path: Path
    html_path: Path


def finish_report(run_dir, report: dict, *, limits=None, latency_rows: list[dict] | None = None,
                  sensitivity_rows: list[dict] | None = None, sensitivity_images: int = 64,
                  command: str | None = None) -> FinishedReport:
    """End a verify/build: apply the gate (``limits``: gate.Thresholds, or None for no gate), add the
    per-layer sensitivity table (computed on ``sensitivity_images`` validation images unless given; 0 skips
    it), rewrite RUN/report.json, and write RUN/report.md and RUN/report.html. Never raises on a breach: the
    caller reads ``.gate.passed`` (the CLI exits 4). A baseline refused here (other images) raises its
    UsageError after the files are written, with ``gate`` null."""
    from maskaq_deploy.calib.checkpoint import atomic_write_json, read_manifest
    from maskaq_deploy import gate as gate_mod
    from maskaq_deploy.render import write_reports

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    report = {**report, "schema_version": REPORT_SCHEMA_VERSION}
    images = None
    if "val_fingerprint" not in report or (sensitivity_rows is None and sensitivity_images > 0):
        images = _val_images(report, manifest)
        if images is not None:
            report.setdefault("val_fingerprint", images.fingerprint())

    limits = limits if limits is not None else gate_mod.Thresholds()
    refused = None
    try:
        result = gate_mod.evaluate_thresholds(report, limits)
    except UsageError as e:  # e.g. a baseline of other images: still leave json, md and html consistent
        refused, result = e, gate_mod.GateResult(True, [])
    report["gate"] = gate_mod.gate_entry(result, limits) if limits.active and refused is None else None

    used = None
    if sensitivity_rows is None and sensitivity_images > 0 and images is not None:
        t0 = time.perf_counter()
        used = images.subset(sensitivity_images, seed=1)
        sensitivity_rows = _sensitivity(run_dir, used)
        report["seconds"] = {**(report.get("seconds") or {}), "sensitivity": round(time.perf_counter() - t0, 3)}
    if sensitivity_rows is not None:
        from maskaq_deploy.sensitivity import METRIC

        report["sensitivity"] = {"metric": METRIC, "images": None if used is None else len(used),
                                 "rows": sensitivity_rows}
    if latency_rows is None:
        latency_rows = _read_latency(run_dir)
    if latency_rows is not None:
        report["latency"] = list(latency_rows)
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if command:
        report["command"] = command
    atomic_write_json(run_dir / REPORT_FILE, report)
    md, html = write_reports(run_dir, report, manifest, sensitivity_rows=sensitivity_rows,
                             latency_rows=report.get("latency"))
    if refused is not None:
        raise refused
    return FinishedReport(report, result, md, html)


def record_latency(run_dir, rows: list[dict]) -> Path | None:
    """Keep bench's latency rows: RUN/latency.json always; when RUN/report.json exists, also its ``latency``
    key and a fresh report.md / report.html (gate and sensitivity as they were). Returns the report path."""
    from maskaq_deploy.calib.checkpoint import atomic_write_json, read_manifest
    from maskaq_deploy.render import write_reports

    run_dir = Path(run_dir)
    rows = [dict(r) for r in rows]
    atomic_write_json(run_dir / LATENCY_FILE, rows)
    path = run_dir / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if validate_report(report):
        return None
    report["latency"] = rows
    atomic_write_json(path, report)
    write_reports(run_dir, report, read_manifest(run_dir))
    return path


def _read_latency(run_dir: Path) -> list[dict] | None:
    try:
        rows = json.loads((run_dir / LATENCY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


def _val_images(report: dict, manifest: dict):
    """The images verify evaluated (same spec, same seeded subset), or None when they cannot be reloaded."""
    from maskaq_deploy.data import load_image_set
    from maskaq_deploy.errors import MaskAQError

    try:
        images = load_image_set(report["val_data"], manifest["model"]["data_config"], "--val-data")
    except (MaskAQError, KeyError) as e:
        log.warning("cannot reload the validation images for the report: %s", e)
        return None
    return images.subset(report.get("num_eval_images"))


def _sensitivity(run_dir: Path, images) -> list[dict]:
    from maskaq_deploy.calib import load_quantized_checkpoint
    from maskaq_deploy.sensitivity import layer_sensitivity

    qmodel, _ = load_quantized_checkpoint(run_dir)
    return layer_sensitivity(qmodel, images)
