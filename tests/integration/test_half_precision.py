"""The TensorRT flavour's fp16 float path, the fp8 recipe and the attention Q/DQ switch on the embedded model
(real calibration images, as the README's tables), through the library and the CLI."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from maskaq_deploy.calib import load_quantized_checkpoint
from maskaq_deploy.cli import cli
from maskaq_deploy.config import CalibrateConfig
from maskaq_deploy.data import load_image_set
from maskaq_deploy.deploy import write_tensorrt_bundle
from maskaq_deploy.export.inspect import inspect_onnx
from maskaq_deploy.export.rules import check_tensorrt, tensor_types
from maskaq_deploy.models import ModelConfig
from maskaq_deploy.pipeline import calibrate, export_run
from maskaq_deploy.run import Run
from maskaq_deploy.runtimes import OrtBackend, compare_logits

torch.set_num_threads(1)
EVAL = 2000  # test images for agreement with torch


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("half")


@functools.lru_cache(maxsize=None)
def run_dir(root, recipe: str, attention: bool | None = None):
    out = root / f"{recipe}_{attention}"
    calibrate(ModelConfig(), CalibrateConfig(method="real", recipe=recipe, attention_qdq=attention), out)
    return out


def eval_images(run, n=None):
    manifest = load_quantized_checkpoint(run)[1]
    data = load_image_set("embedded:test", manifest["model"]["data_config"], "test").subset(n)
    xs, ys = zip(*data.batches(1000))
    return torch.cat(xs), torch.cat(ys).numpy()


def ort_logits(path, x):
    with OrtBackend(path, threads=1) as rt:
        return np.concatenate([rt.run(x[i:i + 500].numpy()) for i in range(0, len(x), 500)])


def test_fp16_bundle_of_w8a8_is_conformant_half_and_agrees_with_torch(root):
    run = run_dir(root, "w8a8")
    exp = export_run(Run(run), "tensorrt", dynamic_batch=True)
    assert exp.float_dtype == "fp16"
    x, _ = eval_images(run, EVAL)
    qmodel, _ = load_quantized_checkpoint(run)
    bundle = write_tensorrt_bundle(Run(run, val_data="embedded:test"), exp.qdq_path)
    graph = bundle / "model.qdq.onnx"
    assert check_tensorrt(graph) == []
    proto = onnx.load(graph)
    types = tensor_types(proto)
    io = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    floats = {o: types[o] for n in proto.graph.node for o in n.output
              if o not in io and types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert set(floats.values()) == {TensorProto.FLOAT16}  # only the model output (after the last Cast) is float32
    with torch.no_grad():
        ref = qmodel(x).numpy()
    m = compare_logits(ref, ort_logits(graph, x))
    assert m["top1_agreement"] >= 0.995 and m["sqnr_db"] >= 30.0, m
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    assert bundle_manifest["tensorrt"]["float_dtype"] == "fp16" and bundle_manifest["tensorrt"]["fp8"] is False


@pytest.mark.slow
def test_fp8_exports_for_both_flavours_and_keeps_w8a8_accuracy(root):
    """onnxruntime top-1 over all 10k test images: fp8 within 0.1 point of w8a8 (the README's figures)."""
    top1 = {}
    for recipe in ("w8a8", "fp8"):
        run = run_dir(root, recipe)
        x, y = eval_images(run)
        path = export_run(Run(run), "onnxruntime", out=run / "ort.onnx", fp_too=False, dynamic_batch=True).qdq_path
        top1[recipe] = 100 * float((ort_logits(path, x).argmax(1) == y).mean())
    assert abs(top1["fp8"] - top1["w8a8"]) <= 0.1, top1
    run = run_dir(root, "fp8")
    trt = export_run(Run(run), "tensorrt", out=run / "trt.onnx", fp_too=False).qdq_path
    assert check_tensorrt(trt) == []
    rep = inspect_onnx(trt, check_ort=False)
    assert rep.float_dtype == "fp16" and rep.quantized_ops["MatMul"] == {"wfp8afp8": 24, "afp8afp8": 12}


def test_attention_qdq_off_at_export_and_at_calibration(root):
    run = run_dir(root, "w8a8")
    off = export_run(Run(run), "tensorrt", out=run / "attn_off.onnx", fp_too=False, attention_qdq=False)
    ops = inspect_onnx(off.qdq_path, check_ort=False).quantized_ops["MatMul"]
    assert "a8a8" not in ops and ops["w8a8"] == 24
    meta = {p.key: p.value for p in onnx.load(off.qdq_path).metadata_props}
    assert meta["maskaq.attention_qdq"] == "off" and check_tensorrt(off.qdq_path) == []
    calibrated_off = run_dir(root, "w8a8", False)
    assert load_quantized_checkpoint(calibrated_off)[1]["recipe"]["quantize_attention"] is False
    r = CliRunner().invoke(cli, ["export", str(calibrated_off), "--for", "tensorrt", "--attention-qdq", "on",
                                 "--out", str(root / "x.onnx")])
    assert r.exit_code == 1 and "without attention-matmul quantizers" in r.output


def test_cli_float_dtype_and_inspect_strict(root):
    run = run_dir(root, "w8a8")
    invoke = CliRunner().invoke
    r = invoke(cli, ["export", str(run), "--for", "onnxruntime", "--float-dtype", "fp16"])
    assert r.exit_code == 2 and "--float-dtype fp16 is for --for tensorrt" in r.output
    r = invoke(cli, ["export", str(run), "--for", "tensorrt", "--float-dtype", "bf16", "--out", str(root / "b.onnx")])
    assert r.exit_code == 0 and "bf16" in r.output
    r = invoke(cli, ["export", str(run), "--for", "onnxruntime", "--out", str(root / "o.onnx")])
    assert r.exit_code == 0
    r = invoke(cli, ["inspect", "--strict", str(root / "o.onnx")])  # contrib ops: not a TensorRT graph
    assert r.exit_code == 1 and re.search(r"TensorRT: [1-9][0-9]* violation", r.output)
    r = invoke(cli, ["inspect", str(root / "o.onnx")])
    assert r.exit_code == 0
    r = invoke(cli, ["inspect", "--strict", str(root / "b.onnx")])
    assert r.exit_code == 0 and "bf16" in r.output and "opset 22" in r.output  # bf16 Conv needs opset 22
    r = invoke(cli, ["build", "--target", "tensorrt", "--float-dtype", "bf16", "--out", str(root / "nb")])
    assert r.exit_code == 2 and "no CPU kernel for bf16" in r.output and not (root / "nb").exists()
    r = invoke(cli, ["build", "--target", "onnxruntime", "--float-dtype", "fp16", "--out", str(root / "nb")])
    assert r.exit_code == 2 and "is for --target tensorrt" in r.output


def test_verify_reports_both_flavours(root):
    from maskaq_deploy.pipeline import verify

    run = run_dir(root, "w8a8")
    export_run(Run(run), "tensorrt", dynamic_batch=True)  # RUN/model.qdq.onnx: the TensorRT graph, fp16
    rep = verify(run, "embedded:test", runtime="onnxruntime", limit=500).report.to_dict()
    ort = rep["runtimes"]["onnxruntime"]
    assert (ort["flavour"], ort["float_dtype"]) == ("tensorrt", "fp16")
    flavours = ort["flavours"]
    assert set(flavours) == {"tensorrt", "onnxruntime"} and flavours["onnxruntime"]["float_dtype"] == "fp32"
    assert flavours["tensorrt"]["top1"] == ort["top1"]
    for f in flavours.values():
        assert f["agreement_vs_torch"] >= 0.99 and f["sqnr_db_vs_torch"] >= 30.0, f
    w4a8 = run_dir(root, "w4a8")
    rep = verify(w4a8, "embedded:test", runtime="onnxruntime", limit=200).report.to_dict()
    assert "no INT4 x INT8 GEMM" in rep["runtimes"]["onnxruntime"]["flavours"]["tensorrt"]["skipped"]
    r = CliRunner().invoke(cli, ["verify", str(run), "--runtime", "onnxruntime", "--limit", "200"])
    assert r.exit_code == 0 and "fp16)" in r.output and "fp32)" in r.output  # one row per flavour (rich may wrap)
