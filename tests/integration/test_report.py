"""report.json / report.md / report.html of a real (tiny) run: schema, gate outcome, and an HTML that parses,
holds its tables and decodable inlined PNGs, and refers to nothing on the network."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from maskaq_deploy import gate
from maskaq_deploy.config import CalibrateConfig
from maskaq_deploy.models import ModelConfig
from maskaq_deploy.pipeline import calibrate, verify
from maskaq_deploy.records import REPORT_SCHEMA_VERSION, Report
from maskaq_deploy.render import PNG_SIGNATURE, grid_images, loss_series, write_reports
from maskaq_deploy.report import LATENCY_FILE, merge_report, record_latency, validate_report
from tests.conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DOC = ROOT / "docs" / "report_schema.md"
CI_WORKFLOW = ROOT / "examples" / "ci" / "quantization-gate.yml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A w4a4 checkpoint of a tiny random ViT, validated on images labelled with the FP model's own
    predictions (FP top-1 is 100%, so the quantized drop is large and known to be positive)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("report")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    save_file(m.state_dict(), str(d / "ck.safetensors"))
    images = np.random.default_rng(0).integers(0, 256, (48, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
        labels = m(x).argmax(1).numpy()
    np.savez_compressed(d / "val.npz", images=images, labels=labels)
    cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT, checkpoint=str(d / "ck.safetensors"))
    calibrate(cfg, CalibrateConfig(method="real", recipe="w4a4", calib_data=str(d / "val.npz"), num_images=32),
              d / "run")
    report = verify(d / "run", str(d / "val.npz"), sensitivity_images=0).report.to_dict()
    return d, report


def reverify(d, **kw):
    """verify of the fixture's run again (it writes report.json, .md and .html once, at the end)."""
    return verify(d / "run", str(d / "val.npz"), **kw)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.refs, self.tables = [], [], [], 0
        self.headings, self._in_h2 = [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.tables += tag == "table"
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href", "data", "action", "poster"):
            if a.get(key):
                self.refs.append(a[key])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def parse(html_path: Path) -> Page:
    page = Page()
    page.feed(html_path.read_text())
    page.close()
    return page


def decode_pngs(page: Page) -> list[bytes]:
    out = []
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def test_verify_writes_a_valid_versioned_report(run):
    d, report = run
    assert report["top1_drop"] > 0  # the fixture's premise
    fin = reverify(d, limits=gate.thresholds(max_drop=100.0), command="pytest")
    on_disk = json.loads((d / "run" / "report.json").read_text())
    assert on_disk == fin.report.to_dict() and Report.from_dict(on_disk) == fin.report
    assert on_disk["schema_version"] == REPORT_SCHEMA_VERSION and validate_report(on_disk) == []
    assert on_disk["gate"]["passed"] is True and on_disk["gate"]["max_drop"] == 100.0
    assert on_disk["command"] == "pytest" and re.match(r"\d{4}-\d\d-\d\dT", on_disk["created"])
    assert len(on_disk["val_fingerprint"]) == 16
    rows = on_disk["sensitivity"]["rows"]
    assert on_disk["sensitivity"]["images"] == 48 and len(rows) == 12  # 2 blocks x (4 Linear + 2 MatMul)
    assert [r["rank"] for r in rows] == list(range(1, 13))
    assert fin.md_path.name == "report.md" and fin.html_path.name == "report.html"


def test_every_report_key_is_documented(run):
    d, report = run
    rows = [{"batch": 1, "threads": 1, "median_ms": 1.0, "p90_ms": 1.2, "throughput": 9.0}]
    (d / "run" / LATENCY_FILE).write_text(json.dumps(rows))
    try:
        fin = reverify(d, limits=gate.thresholds(max_drop=1.0), command="pytest")
    finally:  # the latency rows would be merged into the next verify's report
        (d / "run" / LATENCY_FILE).unlink()
        (d / "run" / "report.json").unlink()
    doc = SCHEMA_DOC.read_text()
    fin.report = fin.report.to_dict()
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, re.MULTILINE))
    keys = set(fin.report) | {k for r in fin.report["runtimes"].values() for k in r}
    keys |= set(fin.report["gate"]) | {k for c in fin.report["gate"]["checks"] for k in c}
    keys |= set(fin.report["sensitivity"]) | {k for r in fin.report["sensitivity"]["rows"] for k in r}
    keys |= {k for r in fin.report["latency"] for k in r}
    assert keys - documented == set()


def test_gate_breach_is_recorded_not_raised(run, tmp_path):
    d, report = run
    baseline = {**report, "schema_version": 1,
                "runtimes": {"torch": {"top1": report["runtimes"]["torch"]["top1"] + 1.0}}}
    (tmp_path / "old.json").write_text(json.dumps(baseline))
    limits = gate.thresholds(max_drop=0.0, baseline=tmp_path / "old.json", max_regression=0.5)
    fin = reverify(d, limits=limits)
    assert not fin.gate.passed
    assert [c.name for c in fin.gate.breached] == ["max_drop", "max_regression"]
    g = json.loads((d / "run" / "report.json").read_text())["gate"]
    assert g["passed"] is False and g["baseline"]["path"] == str(tmp_path / "old.json")
    md = fin.md_path.read_text()
    assert "| gate | BREACHED |" in md and "max_regression breached (torch)" in md
    assert "gate breached" in fin.html_path.read_text()


def test_a_baseline_of_other_images_is_refused_after_the_files_are_consistent(run, tmp_path):
    from maskaq_deploy.errors import UsageError

    d, report = run
    (tmp_path / "old.json").write_text(json.dumps({**report, "num_eval_images": 10}))
    limits = gate.thresholds(baseline=tmp_path / "old.json", max_regression=1.0)
    with pytest.raises(UsageError, match="same `val_data` and `limit`"):
        reverify(d, limits=limits, sensitivity_images=0)
    on_disk = json.loads((d / "run" / "report.json").read_text())
    assert on_disk["gate"] is None and "no gate applied" in (d / "run" / "report.md").read_text()


def test_html_is_self_contained_with_tables_and_png_plots(run):
    d, report = run
    fin = reverify(d, limits=gate.thresholds(max_drop=100.0))
    page = parse(fin.html_path)
    assert page.tags[:2] == ["html", "head"] and "script" not in page.tags and "link" not in page.tags
    assert all(r.startswith("data:") for r in page.refs), [r[:40] for r in page.refs]
    assert "http://" not in fin.html_path.read_text() and "https://" not in fin.html_path.read_text()
    # summary, gate, accuracy, sensitivity, calibration, provenance
    assert page.tables == 6
    assert page.headings[:4] == ["Summary", "Accuracy gate", "Accuracy per runtime", "Per-layer sensitivity"]
    pngs = decode_pngs(page)
    assert len(pngs) == 2  # accuracy bars, sensitivity bars (no curves or images for method real)
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert report["runtimes"]["torch"]["top1"] is not None
    assert f"{report['fp_top1']:.2f}%" in fin.md_path.read_text()


def test_calibration_curves_images_and_latency_are_rendered_when_present(run, tmp_path):
    d, report = run
    manifest = json.loads((d / "run" / "manifest.json").read_text())
    grid = tmp_path / "grid.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(grid)
    (tmp_path / "not_png.png").write_text("text")
    manifest["calibration"] = {
        "method": "maskaq", "num_images": 8, "seconds": {"synthesis": 3.0},
        "curves": {"synthesis": [{"round": 0, "curve": [{"iteration": i, "ce": 2.0 / (i + 1), "tv": 0.1}
                                                         for i in range(5)]}],
                   "finetune": [{"epoch": e, "kd": 1.0 / (e + 1)} for e in range(3)]},
        "paths": {"images": [str(grid), "not_png.png", "missing.png"]}}
    latency = [{"runtime": "onnxruntime", "batch": 1, "threads": 2, "median_ms": 0.8, "p90_ms": 1.1,
                "throughput": 1250.0}]
    md, html = write_reports(tmp_path, {**report, "gate": None}, manifest, latency_rows=latency)
    page = parse(html)
    assert "Calibration" in page.headings and "Latency" in page.headings and "Accuracy gate" not in page.headings
    pngs = decode_pngs(page)
    assert len(pngs) == 4  # accuracy, synthesis curves, fine-tune curves, the image grid
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs) and grid.read_bytes() in pngs
    text = md.read_text()
    assert "| onnxruntime | 1 | 2 | 0.800 | 1.100 | 1250.0 |" in text
    assert "no gate applied" in text


def test_absent_or_odd_calibration_data_is_skipped(run, tmp_path):
    d, report = run
    manifest = json.loads((d / "run" / "manifest.json").read_text())
    for calib in (None, "oops", {"curves": "none", "paths": {"images": 3}}, {"curves": {"synthesis": [1, "x"]}}):
        _, html = write_reports(tmp_path, report, {**manifest, "calibration": calib})
        assert "Calibration" not in parse(html).headings


def test_loss_series_shapes():
    assert loss_series([3, 2, 1]) == {"loss": ([0, 1, 2], [3.0, 2.0, 1.0])}
    assert loss_series({"total": [1, 0.5]}) == {"total": ([0, 1], [1.0, 0.5])}
    s = loss_series([{"epoch": 2, "kd": 1.0, "note": "x"}, {"epoch": 3, "kd": 0.5}])
    assert s == {"kd": ([2.0, 3.0], [1.0, 0.5])}
    rounds = loss_series([{"round": 0, "curve": [{"iteration": 0, "ce": 1}]},
                          {"round": 1, "curve": [{"iteration": 0, "ce": 2}]}])
    assert set(rounds) == {"round 0 ce", "round 1 ce"}
    assert loss_series(None) == {} and loss_series("x") == {} and loss_series([]) == {}


def test_grid_images_resolves_relative_paths(tmp_path):
    from PIL import Image

    (tmp_path / "state").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "state" / "g.png")
    assert grid_images(tmp_path, {"image_grid": "state/g.png"}) == [tmp_path / "state" / "g.png"]
    assert grid_images(tmp_path, {"paths": {"images": ["nope.png"]}}) == []


def test_bench_rows_reach_the_report_before_or_after_verify(run):
    d, report = run
    rows = [{"runtime": "onnxruntime", "batch": 8, "threads": 2, "median_ms": 3.5, "p90_ms": 4.0,
             "throughput": 2285.7}]
    (d / "run" / "report.json").unlink(missing_ok=True)
    assert record_latency(d / "run", rows) is None  # no report yet: kept in latency.json
    assert json.loads((d / "run" / LATENCY_FILE).read_text()) == rows
    fin = reverify(d, sensitivity_images=0)  # the next verify picks them up
    assert fin.report.latency == rows and fin.report.sensitivity is None
    rows2 = [{**rows[0], "batch": 1}]
    assert record_latency(d / "run", rows2) == d / "run" / "report.json"
    assert json.loads((d / "run" / "report.json").read_text())["latency"] == rows2
    assert "| onnxruntime | 1 | 2 |" in (d / "run" / "report.md").read_text()
    (d / "run" / LATENCY_FILE).unlink()


def test_merge_report_keeps_runtimes_and_latency_of_the_same_run(tmp_path):
    base = {"model": "m", "recipe": "w8a8", "method": "real", "num_eval_images": 10, "val_data": "v",
            "fp_top1": 3.0, "schema_version": REPORT_SCHEMA_VERSION}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({**base, "runtimes": {"onnxruntime": {"top1": 1.0, "agreement_vs_fp": 1.0}},
                                "latency": [{"batch": 1}], "gate": {"passed": False}}))
    new = Report.from_dict({**base, "runtimes": {"torch": {"top1": 2.0, "agreement_vs_fp": 1.0}}})
    merged = merge_report(path, new)
    assert set(merged.runtimes) == {"onnxruntime", "torch"} and merged.latency == [{"batch": 1}]
    assert merged.runtimes["onnxruntime"].top1 == 1.0  # typed, as read
    assert merged.gate is None  # a gate belongs to the verify that applied it
    other = merge_report(path, Report.from_dict({**new.to_dict(), "recipe": "w4a4"}))
    assert set(other.runtimes) == {"torch"} and other.latency is None
    for junk in ("[]", "{not json", json.dumps({**base, "runtimes": {"torch": {"top1": -50.0}}})):
        path.write_text(junk)  # not a report: nothing of it is kept
        assert merge_report(path, new) == new


def test_cli_verify_gate_exit_codes(run, tmp_path):
    from maskaq_deploy.cli import cli

    d, report = run
    args = ["verify", str(d / "run"), "--val-data", str(d / "val.npz")]
    drop = report["top1_drop"]
    ok = CliRunner().invoke(cli, [*args, "--max-drop", str(drop)])
    assert ok.exit_code == 0, ok.output
    assert "max_drop ok (torch)" in ok.output
    bad = CliRunner().invoke(cli, [*args, "--max-drop", str(round(drop - 0.01, 4))])
    assert bad.exit_code == 4, bad.output
    assert "max_drop breached (torch)" in bad.output and "Traceback" not in bad.output
    (tmp_path / "bad.json").write_text("{")
    usage = CliRunner().invoke(cli, [*args, "--baseline", str(tmp_path / "bad.json"), "--max-regression", "1"])
    assert usage.exit_code == 2 and "not valid JSON" in usage.output
    assert (d / "run" / "report.html").is_file() and (d / "run" / "report.md").is_file()


@pytest.mark.slow
def test_cli_build_gate_and_baselines(run, tmp_path):
    from maskaq_deploy.cli import cli

    d, _ = run
    model = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT),
             "--checkpoint", str(d / "ck.safetensors"), "--recipe", "w4a4", "--method", "real",
             "--calib-data", str(d / "val.npz"), "--num-images", "32", "--val-data", str(d / "val.npz")]
    first = CliRunner().invoke(cli, ["build", *model, "--max-drop", "100", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "gate passed" in first.output
    page = parse(tmp_path / "a" / "report.html")
    assert page.tables >= 5 and all(p.startswith(PNG_SIGNATURE) for p in decode_pngs(page))
    # the same build again, gated against the first: identical figures, no regression
    again = CliRunner().invoke(cli, ["build", *model, "--baseline", str(tmp_path / "a" / "report.json"),
                                     "--max-regression", "0", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert "max_regression ok (torch)" in again.output
    # a baseline of another recipe is refused before anything is calibrated
    other = json.loads((tmp_path / "a" / "report.json").read_text())
    other["recipe"] = "w8a8"
    (tmp_path / "w8.json").write_text(json.dumps(other))
    refused = CliRunner().invoke(cli, ["build", *model, "--baseline", str(tmp_path / "w8.json"),
                                       "--max-regression", "0", "--out", str(tmp_path / "c")])
    assert refused.exit_code == 2, refused.output
    assert "same model and recipe" in refused.output and not (tmp_path / "c").exists()
    # verify refuses it too, before evaluating anything (the run's report is left as it was)
    before = (tmp_path / "a" / "report.json").read_bytes()
    refused = CliRunner().invoke(cli, ["verify", str(tmp_path / "a"), "--val-data", str(d / "val.npz"),
                                       "--baseline", str(tmp_path / "w8.json"), "--max-regression", "0"])
    assert refused.exit_code == 2 and "this run is" in refused.output, refused.output
    assert (tmp_path / "a" / "report.json").read_bytes() == before
    missing = CliRunner().invoke(cli, ["build", *model, "--baseline", str(tmp_path / "nope.json"),
                                       "--max-regression", "0", "--out", str(tmp_path / "d")])
    assert missing.exit_code == 2 and "not found" in missing.output and not (tmp_path / "d").exists()


def test_ci_example_uploads_the_three_reports():
    text = CI_WORKFLOW.read_text()
    upload = text[text.index("name: Upload the reports"):]
    for name in ("report.json", "report.md", "report.html"):
        assert f"/{name}" in upload
    assert 'MAX_DROP: "0.5"' in text and "if: always()" in upload


def test_ci_example_uses_only_existing_build_options():
    from maskaq_deploy.cli import cli

    text = CI_WORKFLOW.read_text()
    step = text[text.index("name: Quantize, verify and gate"):text.index("name: Job summary")]
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", step))
    known = {o for p in cli.commands["build"].params for o in p.opts}
    assert {"--max-drop", "--baseline", "--max-regression", "--recipe", "--out"} <= used
    assert used - known == set()
