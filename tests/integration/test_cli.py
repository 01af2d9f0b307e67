"""The CLI end to end on a tiny timm model and a user .npz: real calibration, verify, and every bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from maskaq_deploy.cli import cli
from tests.conftest import TINY_VIT

MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    save_file(m.state_dict(), str(d / "ck.safetensors"))
    torch.save(m.state_dict(), d / "ck.pth")
    rng = np.random.default_rng(0)
    np.savez_compressed(d / "data.npz", images=rng.integers(0, 256, (48, 3, 32, 32), dtype=np.uint8),
                        labels=rng.integers(0, 10, 48))
    return d


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_calibrate_then_verify_writes_checkpoint_and_report(files, tmp_path):
    run = tmp_path / "run"
    r = invoke("calibrate", *MODEL, "--checkpoint", files / "ck.pth", "--method", "real", "--recipe", "w8a8",
               "--calib-data", files / "data.npz", "--out", run)
    assert r.exit_code == 0, r.output
    assert {"model.safetensors", "quant.safetensors", "manifest.json"} <= {p.name for p in run.iterdir()}
    r = invoke("verify", run, "--val-data", files / "data.npz")
    assert r.exit_code == 0, r.output
    report = json.loads((run / "report.json").read_text())
    for key in ("model", "recipe", "method", "runtime", "fp_top1", "quant_top1", "top1_drop", "agreement",
                "num_eval_images", "seconds"):
        assert key in report
    assert report["num_eval_images"] == 48
    assert report["agreement"] >= 0.9  # w8a8 on a random model: predictions barely move
    assert report["top1_drop"] == pytest.approx(report["fp_top1"] - report["quant_top1"], abs=1e-3)


def _bad(*args, code=2, match):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], r.output
    assert "Traceback" not in r.output


def test_bad_inputs_one_line_and_exit_code(files, tmp_path):
    out = tmp_path / "o"
    _bad("calibrate", "--model", "vit_tiny_patch16_22", "--out", out, match="did you mean vit_tiny_patch16_224")
    _bad("calibrate", "--model", "resnet18", "--out", out, match="supported families")
    _bad("calibrate", *MODEL, "--checkpoint", tmp_path / "missing.pth", "--out", out, match="not found")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    _bad("calibrate", *MODEL, "--checkpoint", tmp_path / "corrupt.pth", "--out", out, match="cannot be read")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    _bad("calibrate", *MODEL, "--checkpoint", tmp_path / "corrupt.safetensors", "--out", out,
         match="cannot be read")
    other = json.dumps({**TINY_VIT, "num_classes": 12})
    _bad("calibrate", "--model", "vit_tiny_patch16_224", "--model-kwargs", other, "--checkpoint",
         files / "ck.safetensors", "--out", out, match="head.weight has shape")
    _bad("calibrate", *MODEL, "--checkpoint", files / "ck.pth", "--recipe", "w9a9", "--out", out,
         match="unknown recipe")
    bits = tmp_path / "r.toml"
    bits.write_text('[recipe]\nname = "w12a8"\nw_bits = 12\na_bits = 8\n')
    _bad("calibrate", *MODEL, "--checkpoint", files / "ck.pth", "--recipe", bits, "--out", out,
         match="out of range")
    _bad("calibrate", *MODEL, "--model-kwargs", "{not json", "--out", out, match="not valid JSON")


def test_bad_npz_files(files, tmp_path):
    out = tmp_path / "o"
    base = ["calibrate", *MODEL, "--checkpoint", files / "ck.pth", "--method", "real", "--out", out]
    np.savez(tmp_path / "nokeys.npz", x=np.zeros((2, 3, 32, 32), np.uint8))
    _bad(*base, "--calib-data", tmp_path / "nokeys.npz", match="needs arrays 'images' and 'labels'")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 3, 28, 28), np.uint8), labels=np.zeros(2, np.int64))
    _bad(*base, "--calib-data", tmp_path / "shape.npz", match="the model takes (3, 32, 32)")
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 3, 32, 32), np.uint8), labels=np.zeros(3, np.int64))
    _bad(*base, "--calib-data", tmp_path / "labels.npz", match="labels must be N integers")


def test_force_replaces_only_a_run(files, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    args = ["calibrate", *MODEL, "--checkpoint", files / "ck.pth", "--method", "real",
            "--calib-data", files / "data.npz", "--num-images", "16", "--out", out]
    _bad(*args, "--force", match="not a maskaq-deploy run")
    assert (out / "something").read_text() == "x"  # --force never deletes files that are not a run
    run = tmp_path / "run"
    assert invoke(*args[:-1], run).exit_code == 0
    _bad(*args[:-1], run, match="--force")
    r = invoke(*args[:-1], run, "--force")
    assert r.exit_code == 0, r.output
    assert (run / "manifest.json").exists() and not (tmp_path / ".run.partial").exists()


def test_verify_on_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _bad("verify", tmp_path / "empty", code=1, match="no manifest.json")


def test_subprocess_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maskaq_deploy", "calibrate", "--model", "no_such_model_x",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model") and "Traceback" not in proc.stderr
