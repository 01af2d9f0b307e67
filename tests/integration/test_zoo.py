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


def test_224px_zoo_model_loads_through_the_tool_and_scores_what_its_config_says(tmp_path):
    """deit_tiny_patch16_224 (224 px, 3 channels, fp16 weights) through the tool's model and data loading, scored on
    16 test images upscaled as scripts/train_zoo.py feeds it (bilinear, rounded to uint8, grey x3)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from maskaq_deploy.data import load_image_set
    from maskaq_deploy.models import ModelConfig, load_model

    zoo = ROOT / "benchmarks" / "zoo" / "deit_tiny_patch16_224"
    if not (zoo / "model.safetensors").is_file():
        pytest.fail(f"{zoo}/model.safetensors is missing: train it with scripts/train_zoo.py (see its config.json)")
    cfg = json.loads((zoo / "config.json").read_text())
    loaded = load_model(ModelConfig(name=cfg["timm_name"], kwargs=cfg["model_kwargs"],
                                    checkpoint=str(zoo / "model.safetensors"), mean=cfg["mean"], std=cfg["std"]))
    assert loaded.data_config["input_size"] == [3, 224, 224] == cfg["input_size"]
    with np.load(ASSETS / "mnist_test.npz") as z:
        images, labels = z["images"][:16], z["labels"][:16]
    x = F.interpolate(torch.from_numpy(images)[:, None].float(), size=(224, 224), mode="bilinear",
                      align_corners=False).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    np.savez(tmp_path / "test16.npz", images=x.numpy(), labels=labels)
    correct = 0
    with torch.no_grad():
        for xb, yb in load_image_set(str(tmp_path / "test16.npz"), loaded.data_config).batches(16):
            correct += int((loaded.model(xb).argmax(1) == yb).sum())
    # 16 images: one miss is 6.25 points; the config's figure is on the 10k test images
    assert 100.0 * correct / 16 >= cfg["test_top1"] - 10.0, (correct, cfg["test_top1"])
