"""The smallest benchmark-zoo model (benchmarks/zoo/vit_gap: no class token, average pooling) through the CLI:
data-free calibration, export, onnxruntime against torch, and a TensorRT bundle that breaks no TensorRT rule."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maskaq_deploy.cli import cli
from maskaq_deploy.export.rules import check_tensorrt

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "benchmarks" / "zoo" / "vit_gap"
ASSETS = ROOT / "maskaq_deploy" / "assets" / "embedded"


@pytest.fixture(scope="module")
def zoo_model():
    if not (ZOO / "model.safetensors").is_file():
        pytest.fail(f"{ZOO}/model.safetensors is missing: train it with scripts/train_zoo.py --arch vit_gap")
    cfg = json.loads((ZOO / "config.json").read_text())
    return ["--model", cfg["timm_name"], "--model-kwargs", json.dumps(cfg["model_kwargs"]),
            "--checkpoint", str(ZOO / "model.safetensors"), "--mean", str(cfg["mean"][0]),
            "--std", str(cfg["std"][0]), "--val-data", str(ASSETS / "mnist_test.npz")]


def test_zoo_model_builds_a_tensorrt_bundle_that_agrees_with_torch(tmp_path, zoo_model):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["build", *zoo_model, "--recipe", "w8a8", "--target", "tensorrt", "--bundle-only",
                                 "--method", "noise", "--num-images", "32", "--limit", "512", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert check_tensorrt(str(out / "bundle" / "model.qdq.onnx")) == []  # zero TensorRT rule violations
    report = json.loads((out / "report.json").read_text())
    ort = report["runtimes"]["onnxruntime"]
    assert ort["agreement_vs_torch"] >= 0.995, ort
    assert report["fp_top1"] > 95.0 and report["top1_drop"] <= 1.0, report  # 512 images: the FP model's 97.7%
