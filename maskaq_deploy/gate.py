"""The accuracy-regression gate: did this run lose more top-1 than allowed?

Two kinds of check, one per runtime measured in the report (torch fake-quant, onnxruntime, tensorrt, ...):

* ``max_drop``: points of top-1 lost against the full-precision model, ``fp_top1 - runtime top1``.
* ``max_regression``: points of top-1 lost against a previous run (``--baseline OLD/report.json``) of the same
  model and recipe on the same validation data, ``baseline top1 - runtime top1``, for the runtimes both
  reports measured.

Semantics: a check passes when ``value <= threshold + TOLERANCE``; a drop exactly at the threshold passes
(top-1 figures are multiples of 100/N rounded to 4 decimals, so the tolerance only absorbs float noise). A
negative value (the quantized model, or this run, did better) always passes. Thresholds must be finite and
>= 0. ``--baseline`` and ``--max-regression`` go together.

Library code: breaches are reported in the ``GateResult``, never raised; a bad threshold or a missing,
malformed or mismatched baseline raises ``UsageError`` (exit 2). The CLI exits 4 (``EXIT_GATE``) on a breach.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from maskaq_deploy.errors import MaskAQError, UsageError
from maskaq_deploy.records import REPORT_FILE, Report
from maskaq_deploy.report import read_report, report_of

TOLERANCE = 1e-9
# A baseline is comparable when it measured the same model with the same recipe on the same images.
SAME_RUN_KEYS = ("model", "timm_name", "recipe")


@dataclass(frozen=True)
class Check:
    name: str  # "max_drop" or "max_regression"
    value: float  # points lost
    threshold: float  # points allowed
    passed: bool
    message: str  # one line, with the figures
    runtime: str | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def breached(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def lines(self) -> list[str]:
        """One line per check: breaches first (what the CLI prints before exiting 4)."""
        return [c.message for c in self.breached] + [c.message for c in self.checks if c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tolerance": TOLERANCE, "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True)
class Thresholds:
    """The gate options of one CLI call, validated, with the baseline already read (see ``thresholds``)."""

    max_drop: float | None = None
    max_regression: float | None = None
    baseline_path: str | None = None
    baseline: Report | None = None

    @property
    def active(self) -> bool:
        return self.max_drop is not None or self.max_regression is not None


def _threshold(value, option: str) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} takes a number of top-1 points, e.g. {option} 0.5") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{option} {value} must be a finite number of points >= 0, e.g. {option} 0.5")
    return value


def _check_pair(baseline, max_regression) -> None:
    if (baseline is None) != (max_regression is None):
        raise UsageError("`baseline` and `max_regression` go together: give the previous run's report.json "
                         "and the points of top-1 it may lose, e.g. `baseline` old/report.json `max_regression` 0.2")


def load_baseline(path) -> Report:
    """Read a baseline report: a report.json, or a run directory holding one. Raises UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    return read_report(path, "`baseline`")


def thresholds(max_drop=None, baseline=None, max_regression=None) -> Thresholds:
    """Validate the gate options and read the baseline now: before a long calibration, and before ``verify``
    rewrites a report.json the baseline might be (``--baseline RUN/report.json`` on a re-verify)."""
    max_drop = _threshold(max_drop, "`max_drop`")
    max_regression = _threshold(max_regression, "`max_regression`")
    _check_pair(baseline, max_regression)
    loaded = load_baseline(baseline) if baseline is not None else None
    return Thresholds(max_drop, max_regression, None if baseline is None else str(baseline), loaded)


def _pts(x: float) -> str:
    """A figure with up to 4 decimals (what report.json stores), without trailing zeros."""
    return f"{x:.4f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)


def _runtimes(report: Report, what: str, error=MaskAQError) -> dict:
    """{runtime: top1}; a report without them is our bug (exit 1), a baseline without them the user's (2)."""
    runtimes = report.runtimes
    if not isinstance(runtimes, dict) or not runtimes:
        raise error(f"{what} has no per-runtime results ('runtimes'); rerun verify")
    out = {}
    for name, r in runtimes.items():
        top1 = getattr(r, "top1", None)
        if not isinstance(top1, (int, float)) or isinstance(top1, bool):
            raise error(f"{what}: runtime {name!r} has no numeric top1; rerun verify")
        out[name] = float(top1)
    return out


def _check(name: str, runtime: str, value: float, threshold: float, detail: str, advice: str) -> Check:
    passed = math.isfinite(value) and value <= threshold + TOLERANCE
    if passed:
        msg = f"{name} ok ({runtime}): {detail} = {_pts(value)} pts <= {_pts(threshold)} allowed"
    else:
        msg = f"{name} breached ({runtime}): {detail} = {_pts(value)} pts > {_pts(threshold)} allowed; {advice}"
    return Check(name, value, threshold, passed, msg, runtime)


def check_baseline_matches(report: Report, baseline: Report, source: str = "the baseline") -> None:
    """Refuse (UsageError) a baseline of another model, recipe or validation set."""
    for key in SAME_RUN_KEYS:
        if getattr(baseline, key) != getattr(report, key):
            raise UsageError(
                f"{source} is for model {baseline.model!r} ({baseline.timm_name}) recipe {baseline.recipe!r}, "
                f"this run is {report.model!r} ({report.timm_name}) recipe {report.recipe!r}; give the report of "
                "a previous run of the same model and recipe")
    same_images = baseline.num_eval_images == report.num_eval_images
    fb, fr = baseline.val_fingerprint, report.val_fingerprint
    # The fingerprint (when both reports have one) identifies the images; the spec string is the fallback.
    same_data = fb == fr if (fb and fr) else baseline.val_data == report.val_data
    if not (same_images and same_data):
        raise UsageError(
            f"{source} was evaluated on {baseline.num_eval_images} images of {baseline.val_data}, this run on "
            f"{report.num_eval_images} of {report.val_data}; top-1 is only comparable on the same images: use "
            "the same `val_data` and `limit` as the baseline")


def precheck(limits: Thresholds, *, model: str, recipe: str) -> None:
    """Refuse a baseline of another model or recipe before a build or verify spends time (the full check,
    timm architecture and images included, runs on the finished report)."""
    base = limits.baseline
    if base is None:
        return
    if base.model != model or base.recipe != recipe:
        raise UsageError(
            f"baseline {limits.baseline_path} is for model {base.model!r} recipe {base.recipe!r}, "
            f"this run is {model!r} recipe {recipe!r}; give the report of a previous run of the same model "
            "and recipe")


def evaluate(report: Report | dict, *, max_drop: float | None = None, baseline=None,
             max_regression: float | None = None) -> GateResult:
    """Apply the thresholds to ``report`` (a verify report: a Report, or its dict). ``baseline``: a path to a
    previous report.json (or its run directory), or an already loaded Report (or dict, checked like a file).
    No threshold given: passed, no checks."""
    max_drop = _threshold(max_drop, "`max_drop`")
    max_regression = _threshold(max_regression, "`max_regression`")
    _check_pair(baseline, max_regression)
    source = "the baseline"
    if baseline is not None and not isinstance(baseline, (dict, Report)):
        source = f"baseline {baseline}"
        baseline = load_baseline(baseline)
    elif baseline is not None:
        baseline = report_of(baseline, source)
    return _evaluate(_own_report(report), max_drop, baseline, max_regression, source)


def evaluate_thresholds(report: Report | dict, limits: Thresholds) -> GateResult:
    """``evaluate`` with the options ``thresholds`` validated (and the baseline it read)."""
    source = f"baseline {limits.baseline_path}" if limits.baseline_path else "the baseline"
    return _evaluate(_own_report(report), limits.max_drop, limits.baseline, limits.max_regression, source)


def _own_report(report: Report | dict) -> Report:
    """The report being gated as a Report; one that cannot be read as one is a failure of ours (exit 1)."""
    if isinstance(report, Report):
        return report
    try:
        return Report.from_dict(report)
    except TypeError:
        missing = [k for k in ("model", "recipe", "fp_top1", "num_eval_images", "runtimes") if k not in report]
        raise MaskAQError(f"the report lacks {', '.join(missing) or 'required keys'} (e.g. per-runtime results, "
                          "'runtimes'); rerun verify") from None


def _evaluate(report: Report, max_drop, baseline: Report | None, max_regression, source: str) -> GateResult:
    checks: list[Check] = []
    if max_drop is not None:
        fp = report.fp_top1
        if not isinstance(fp, (int, float)):
            raise MaskAQError("the report has no numeric fp_top1; rerun verify")
        for name, top1 in _runtimes(report, "the report").items():
            checks.append(_check("max_drop", name, fp - top1, max_drop, f"top-1 {_pts(fp)}% (FP) -> "
                                 f"{_pts(top1)}%, drop", "keep sensitive layers in float (maskaq-deploy "
                                 "sensitivity RUN) or choose a wider recipe"))
    if max_regression is not None:
        check_baseline_matches(report, baseline, source)
        old = _runtimes(baseline, source, UsageError)
        new = _runtimes(report, "the report")
        common = [n for n in new if n in old]
        if not common:
            raise UsageError(f"{source} measured runtimes {sorted(old)}, this run {sorted(new)}: none in "
                             "common; verify the same `runtime` as the baseline")
        for name in common:
            checks.append(_check("max_regression", name, old[name] - new[name], max_regression,
                                 f"top-1 {_pts(old[name])}% (baseline) -> {_pts(new[name])}%, lost",
                                 "compare the two runs' manifest.json (config, inputs, versions)"))
    return GateResult(all(c.passed for c in checks), checks)


def gate_entry(result: GateResult, limits: Thresholds) -> dict:
    """The report.json ``gate`` object: the thresholds applied and their outcome."""
    base = limits.baseline
    return {**result.to_dict(), "max_drop": limits.max_drop, "max_regression": limits.max_regression,
            "baseline": None if base is None else {
                "path": limits.baseline_path, "model": base.model, "recipe": base.recipe, "method": base.method,
                "created": base.created, "runtimes": {k: v.top1 for k, v in base.runtimes.items()}}}

