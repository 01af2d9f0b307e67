"""build --target on the embedded model: onnxruntime artifacts, the TensorRT bundle and its exit codes, refusals."""

import json

import pytest
from click.testing import CliRunner

from maskaq_deploy.export.rules import check_tensorrt
from maskaq_deploy.cli import cli

FAST = ["--method", "real", "--num-images", "32", "--limit", "256", "--quiet"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "run"
    r = run("build", "--recipe", "w8a8", "--target", "tensorrt", "--out", out, *FAST)
    return out, r


def test_tensorrt_build_without_tensorrt_writes_bundle_and_exits_3(trt_bundle):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the engine path is covered by tests/gpu")
    out, r = trt_bundle
    assert r.exit_code == 3, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("engine not built")]
    assert len(lines) == 1 and "tensorrt" in lines[0] and "build_engine.sh" in lines[0]
    bundle = out / "bundle"
    names = {p.name for p in bundle.iterdir()}
    assert {"model.qdq.onnx", "build_engine.sh", "golden_inputs.npz", "golden_outputs.npz", "verify_engine.py",
            "manifest.json"} <= names
    assert check_tensorrt(str(bundle / "model.qdq.onnx")) == []  # zero TensorRT rule violations
    report = json.loads((out / "report.json").read_text())
    ort = report["runtimes"]["onnxruntime"]
    assert ort["agreement_vs_torch"] >= 0.995 and ort["sqnr_db_vs_torch"] >= 30.0
    assert report["top1_drop"] <= 1.0


def test_bundle_only_exits_0(tmp_path):
    r = run("build", "--recipe", "w4a16", "--target", "tensorrt", "--bundle-only", "--out", tmp_path / "b",
            "--method", "real", "--num-images", "16", "--limit", "64", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "bundle" / "build_engine.sh").is_file()
    assert check_tensorrt(str(tmp_path / "b" / "bundle" / "model.qdq.onnx")) == []


@pytest.mark.parametrize("recipe", ["w4a8", "w4a4", "w3a3", "w5a5"])
def test_tensorrt_refuses_sub8bit_activation_recipes_before_any_work(tmp_path, recipe):
    r = run("build", "--recipe", recipe, "--target", "tensorrt", "--out", tmp_path / "x", *FAST)
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")][0]
    assert recipe in line and "w8a8" in line and "w4a16" in line
    assert not (tmp_path / "x").exists()  # refused before calibrating


def test_onnxruntime_target_and_inspect(tmp_path):
    out = tmp_path / "ort"
    r = run("build", "--recipe", "w4a8", "--target", "onnxruntime", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and (out / "model.qdq.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["runtimes"]["onnxruntime"]["agreement_vs_torch"] >= 0.99
    r = run("inspect", out / "model.qdq.onnx")
    assert r.exit_code == 0, r.output
    assert "MatMul" in r.output and "violation" in r.output
    r = run("bench", out / "model.qdq.onnx", "--batch-sizes", "1", "--threads", "1", "--iterations", "3",
            "--warmup", "1")
    assert r.exit_code == 0, r.output
    assert "median ms" in r.output


def test_inspect_rejects_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"definitely not protobuf")
    r = run("inspect", bad)
    assert r.exit_code in (1, 2) and r.output.startswith("error:") and "Traceback" not in r.output
