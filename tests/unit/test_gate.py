"""The accuracy gate: thresholds at and around their edges, and every kind of baseline (good, malformed,
mismatched, missing)."""

import json

import pytest

from maskaq_deploy import gate
from maskaq_deploy.errors import EXIT_USAGE, MaskAQError, UsageError
from maskaq_deploy.report import REPORT_SCHEMA_VERSION


def make_report(fp=98.1, torch_top1=97.6, **runtimes):
    rts = {"torch": {"top1": torch_top1, "agreement_vs_fp": 0.99}}
    rts.update({k: {"top1": v, "agreement_vs_fp": 0.98} for k, v in runtimes.items()})
    return {"schema_version": REPORT_SCHEMA_VERSION, "model": "embedded", "timm_name": "vit_mnist",
            "recipe": "w4a4", "method": "real", "runtime": "torch", "val_data": "embedded:test",
            "fp_top1": fp, "quant_top1": torch_top1, "top1_drop": round(fp - torch_top1, 4), "agreement": 0.99,
            "num_eval_images": 1000, "runtimes": rts}


def write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def one_line_usage(excinfo, *fragments):
    """One line, exit 2; a flag fragment (``--baseline``) appears as the CLI renders the library's option key."""
    from maskaq_deploy.cli import with_flags

    msg = str(excinfo.value)
    assert excinfo.value.exit_code == EXIT_USAGE
    assert "\n" not in msg
    for f in fragments:
        assert f in with_flags(msg), msg
        assert not f.startswith("--") or f not in msg, f"library message names a CLI flag: {msg}"


# ---------------------------------------------------------------------------------------------- max_drop

def test_no_threshold_passes_with_no_checks():
    r = gate.evaluate(make_report(torch_top1=0.0))
    assert r.passed and r.checks == []


def test_drop_exactly_at_threshold_passes_despite_float_noise():
    assert gate.evaluate(make_report(98.1, 97.6), max_drop=0.5).passed
    # 98.8 - 98.6 is 0.20000000000000284 in binary floating point: the tolerance absorbs it
    assert 98.8 - 98.6 > 0.2
    r = gate.evaluate(make_report(98.8, 98.6), max_drop=0.2)
    assert r.passed
    (c,) = r.checks
    assert (c.name, c.runtime, c.threshold, c.passed) == ("max_drop", "torch", 0.2, True)
    assert c.value == pytest.approx(0.2)
    assert "max_drop ok (torch)" in c.message and "98.8%" in c.message and "98.6%" in c.message


def test_drop_just_above_threshold_breaches_with_figures():
    r = gate.evaluate(make_report(98.1, 97.5999), max_drop=0.5)
    assert not r.passed
    (c,) = r.breached
    assert c.message.startswith("max_drop breached (torch): ")
    assert "0.5001 pts > 0.5 allowed" in c.message and "\n" not in c.message


def test_drop_just_below_and_negative_drop_pass():
    assert gate.evaluate(make_report(98.1, 97.6001), max_drop=0.5).passed
    assert gate.evaluate(make_report(90.0, 91.0), max_drop=0.0).passed  # quantized did better
    assert gate.evaluate(make_report(90.0, 90.0), max_drop=0.0).passed  # zero budget, zero drop
    assert not gate.evaluate(make_report(90.0, 89.99), max_drop=0.0).passed


def test_every_runtime_is_gated_and_breaches_come_first():
    r = gate.evaluate(make_report(98.0, 97.9, onnxruntime=96.0), max_drop=1.0)
    assert not r.passed
    assert [(c.runtime, c.passed) for c in r.checks] == [("torch", True), ("onnxruntime", False)]
    lines = r.lines()
    assert lines[0].startswith("max_drop breached (onnxruntime)") and lines[1].startswith("max_drop ok (torch)")
    assert "2 pts > 1 allowed" in lines[0]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "lots"])
def test_bad_threshold_values_are_usage_errors(bad):
    with pytest.raises(UsageError) as e:
        gate.evaluate(make_report(), max_drop=bad)
    one_line_usage(e, "--max-drop")
    with pytest.raises(UsageError) as e:
        gate.thresholds(max_regression=bad, baseline="x.json")
    one_line_usage(e, "--max-regression")


def test_report_without_runtimes_is_a_failure_not_a_usage_error():
    rep = make_report()
    del rep["runtimes"]
    with pytest.raises(MaskAQError) as e:
        gate.evaluate(rep, max_drop=1)
    assert not isinstance(e.value, UsageError)


# ---------------------------------------------------------------------------------------------- baselines

def test_regression_against_a_good_baseline_at_and_around_the_edge(tmp_path):
    base = write(tmp_path / "old.json", make_report(98.1, 97.8))
    at_edge = gate.evaluate(make_report(98.1, 97.6), baseline=base, max_regression=0.2)
    assert at_edge.passed
    (c,) = at_edge.checks
    assert c.name == "max_regression" and c.value == pytest.approx(0.2)
    assert "97.8% (baseline) -> 97.6%" in c.message
    over = gate.evaluate(make_report(98.1, 97.5999), baseline=base, max_regression=0.2)
    assert not over.passed and "0.2001 pts > 0.2 allowed" in over.breached[0].message
    better = gate.evaluate(make_report(98.1, 99.0), baseline=base, max_regression=0.0)
    assert better.passed and better.checks[0].value < 0


def test_baseline_may_be_a_run_directory_and_combine_with_max_drop(tmp_path):
    write(tmp_path / "report.json", make_report(98.1, 97.8))
    r = gate.evaluate(make_report(98.1, 97.0), max_drop=2.0, baseline=tmp_path, max_regression=0.5)
    assert [(c.name, c.passed) for c in r.checks] == [("max_drop", True), ("max_regression", False)]
    assert not r.passed


def test_only_runtimes_in_both_reports_are_compared(tmp_path):
    base = write(tmp_path / "old.json", make_report(98.0, 97.0))
    r = gate.evaluate(make_report(98.0, 97.0, onnxruntime=90.0), baseline=base, max_regression=0.1)
    assert [c.runtime for c in r.checks] == ["torch"] and r.passed


def test_baseline_with_no_runtime_in_common_is_refused(tmp_path):
    old = make_report()
    old["runtimes"] = {"tensorrt": {"top1": 97.0}}
    base = write(tmp_path / "old.json", old)
    with pytest.raises(UsageError) as e:
        gate.evaluate(make_report(), baseline=base, max_regression=0.1)
    one_line_usage(e, "none in common", "tensorrt")


@pytest.mark.parametrize("key,value,fragment", [
    ("model", "deit_tiny", "same model and recipe"),
    ("timm_name", "vit_other", "same model and recipe"),
    ("recipe", "w8a8", "recipe 'w8a8'"),
    ("num_eval_images", 500, "same --val-data and --limit"),
    ("val_data", "other.npz", "same --val-data and --limit"),
])
def test_mismatched_baseline_is_refused(tmp_path, key, value, fragment):
    old = make_report()
    old[key] = value
    base = write(tmp_path / "old.json", old)
    with pytest.raises(UsageError) as e:
        gate.evaluate(make_report(), baseline=base, max_regression=1.0)
    one_line_usage(e, fragment, str(base))


def test_fingerprint_decides_when_both_reports_have_one(tmp_path):
    old, new = make_report(), make_report()
    old.update(val_data="/ci/a/val.npz", val_fingerprint="abc")
    new.update(val_data="/ci/b/val.npz", val_fingerprint="abc")  # same images, moved
    assert gate.evaluate(new, baseline=old, max_regression=1.0).passed
    new["val_fingerprint"] = "def"
    with pytest.raises(UsageError):
        gate.evaluate(new, baseline=old, max_regression=1.0)


def test_method_may_differ_from_the_baseline(tmp_path):
    old = make_report()
    old["method"] = "maskaq"
    assert gate.evaluate(make_report(), baseline=old, max_regression=0.0).passed


def test_missing_baseline(tmp_path):
    with pytest.raises(UsageError) as e:
        gate.thresholds(baseline=tmp_path / "nope.json", max_regression=0.5)
    one_line_usage(e, "--baseline", "nope.json", "not found")
    with pytest.raises(UsageError) as e:  # a directory without report.json
        gate.evaluate(make_report(), baseline=tmp_path, max_regression=0.5)
    one_line_usage(e, "report.json", "not found")


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "not a maskaq-deploy report"),
    (json.dumps({"schema_version": 2}), "key 'model' is missing"),
    (json.dumps({**make_report(), "runtimes": {"torch": {"top1": "high"}}}), "no numeric top1"),
    (json.dumps({**make_report(), "runtimes": {}}), "'runtimes' is empty"),
    (json.dumps({**make_report(), "fp_top1": None}), "key 'fp_top1' is a NoneType"),
    (json.dumps({**make_report(), "schema_version": REPORT_SCHEMA_VERSION + 1}), "upgrade maskaq-deploy"),
    (json.dumps({k: v for k, v in make_report().items() if k != "schema_version"}), "schema_version"),
    (json.dumps(make_report(torch_top1=-50.0)), "runtime 'torch' top1 -50.0 is outside [0, 100]"),
    (json.dumps(make_report(onnxruntime=100.5)), "runtime 'onnxruntime' top1 100.5 is outside [0, 100]"),
    (json.dumps(make_report(fp=-1.0)), "fp_top1 -1.0 is outside [0, 100]"),
    (json.dumps({**make_report(), "quant_top1": "high"}), "'quant_top1' is not a finite number"),
])
def test_malformed_baseline_gets_one_line(tmp_path, content, fragment):
    base = write(tmp_path / "bad.json", content)
    with pytest.raises(UsageError) as e:
        gate.thresholds(baseline=base, max_regression=0.5)
    one_line_usage(e, "--baseline", "bad.json", fragment)


def test_a_baseline_outside_0_100_fails_closed_however_it_is_given(tmp_path):
    """A top-1 of -50 would make every run look better than the baseline: refused (exit 2), whether the baseline
    is a file, a run folder, a loaded dict or a Report."""
    from maskaq_deploy.records import Report

    bad = make_report(98.1, -50.0)
    write(tmp_path / "report.json", bad)
    for baseline in (tmp_path / "report.json", tmp_path, bad, Report.from_dict(bad)):
        with pytest.raises(UsageError) as e:
            gate.evaluate(make_report(), baseline=baseline, max_regression=0.5)
        one_line_usage(e, "outside [0, 100]")


def test_the_gate_reads_typed_reports(tmp_path):
    from maskaq_deploy.records import Report

    base = gate.thresholds(baseline=write(tmp_path / "old.json", make_report(98.1, 97.8)), max_regression=0.2)
    assert isinstance(base.baseline, Report) and base.baseline.runtimes["torch"].top1 == 97.8
    assert gate.evaluate_thresholds(Report.from_dict(make_report(98.1, 97.6)), base).passed
    assert not gate.evaluate_thresholds(Report.from_dict(make_report(98.1, 97.5)), base).passed


def test_version_1_report_is_a_valid_baseline(tmp_path):
    base = write(tmp_path / "v1.json", {**make_report(98.1, 97.8), "schema_version": 1})
    assert gate.evaluate(make_report(98.1, 97.8), baseline=base, max_regression=0.0).passed


def test_baseline_and_max_regression_go_together(tmp_path):
    base = write(tmp_path / "old.json", make_report())
    for kwargs in ({"baseline": base}, {"max_regression": 0.5}):
        with pytest.raises(UsageError) as e:
            gate.thresholds(**kwargs)
        one_line_usage(e, "go together")
        with pytest.raises(UsageError):
            gate.evaluate(make_report(), **kwargs)


def test_thresholds_read_the_baseline_up_front(tmp_path):
    base = write(tmp_path / "report.json", make_report(98.1, 97.8))
    limits = gate.thresholds(max_drop=1, baseline=base, max_regression=0.1)
    base.write_text("overwritten by a later verify")  # the gate still uses what was read
    r = gate.evaluate_thresholds(make_report(98.1, 97.5), limits)
    assert not r.passed and "0.3 pts > 0.1 allowed" in r.breached[0].message
    entry = gate.gate_entry(r, limits)
    assert entry["passed"] is False and entry["max_drop"] == 1.0 and entry["max_regression"] == 0.1
    assert entry["baseline"]["path"] == str(base) and entry["baseline"]["runtimes"] == {"torch": 97.8}
    assert [c["name"] for c in entry["checks"]] == ["max_drop", "max_regression"]
    assert json.loads(json.dumps(entry)) == entry  # plain JSON


def test_inactive_thresholds():
    limits = gate.thresholds()
    assert not limits.active
    assert gate.evaluate_thresholds(make_report(torch_top1=0), limits).passed


def test_precheck_refuses_another_model_or_recipe_before_calibration(tmp_path):
    base = write(tmp_path / "old.json", make_report())
    limits = gate.thresholds(baseline=base, max_regression=0.1)
    gate.precheck(limits, model="embedded", recipe="w4a4")
    gate.precheck(gate.thresholds(max_drop=1), model="anything", recipe="w8a8")  # no baseline: nothing to check
    for model, recipe in (("embedded", "w8a8"), ("deit_tiny_patch16_224", "w4a4")):
        with pytest.raises(UsageError) as e:
            gate.precheck(limits, model=model, recipe=recipe)
        one_line_usage(e, "same model and recipe", str(base))
