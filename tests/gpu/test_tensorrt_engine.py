"""Real TensorRT engines: build from small QDQ graphs, run through TensorRTBackend and the bundle's
verify_engine.py, compare with onnxruntime. Skipped (tests/conftest.py) without tensorrt or a CUDA GPU.

Graphs are built here with onnx.helper, and one with torch.onnx.export of a tiny timm ViT, so the tests do not
depend on the project's exporter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.export.bundle import write_bundle
from maskaq_deploy.export.tensorrt import build_engine
from maskaq_deploy.runtimes.compare import sqnr_db
from maskaq_deploy.runtimes.tensorrt_backend import TensorRTBackend

pytestmark = pytest.mark.tensorrt

CHW, CLASSES = (3, 16, 16), 10


def qdq_graph(path: Path, *, batch="batch", int4: bool = False, seed: int = 0) -> Path:
    """images -> Flatten -> MatMul + bias -> logits, as w8a8 (int8 Q/DQ activation, per-channel int8 weights,
    opset 17) or w4a16 (block-wise INT4 weights, block 128 along K, float activations, opset 21)."""
    rng = np.random.default_rng(seed)
    k = int(np.prod(CHW))
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1)]
    if int4:
        wq = rng.integers(-8, 8, (k, CLASSES)).astype(np.int8)
        scale = (rng.random((k // 128, CLASSES)) * 0.02 + 0.01).astype(np.float32)
        inits = [helper.make_tensor("w_q", TensorProto.INT4, wq.shape, wq.flatten().tolist()),
                 numpy_helper.from_array(scale, "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, block_size=128))
        act, opset, ir = "flat", 21, 10
    else:
        wq = rng.integers(-127, 128, (k, CLASSES)).astype(np.int8)
        scale = (rng.random(CLASSES) * 0.002 + 0.001).astype(np.float32)
        inits = [numpy_helper.from_array(wq, "w_q"), numpy_helper.from_array(scale, "w_scale"),
                 numpy_helper.from_array(np.array(0.03, np.float32), "a_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "a_zp"),
                 numpy_helper.from_array(np.zeros(CLASSES, np.int8), "w_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["flat", "a_scale", "a_zp"], ["flat_q"]),
                  helper.make_node("DequantizeLinear", ["flat_q", "a_scale", "a_zp"], ["flat_dq"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1)]
        act, opset, ir = "flat_dq", 17, 8
    inits.append(numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "bias"))
    nodes += [helper.make_node("MatMul", [act, "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_qdq", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, *CHW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def ort_logits(path: Path, x: np.ndarray, step: int | None = None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = step or len(x)
    outs = []
    for s in range(0, len(x), step):
        chunk = np.zeros((step, *x.shape[1:]), np.float32)
        chunk[: len(x[s:s + step])] = x[s:s + step]
        outs.append(sess.run(["logits"], {"images": chunk})[0][: len(x[s:s + step])])
    return np.concatenate(outs)


@pytest.fixture
def images():
    return np.random.default_rng(1).standard_normal((20, *CHW)).astype(np.float32)


def test_int8_engine_dynamic_batch_matches_onnxruntime(tmp_path, images):
    onnx_path = qdq_graph(tmp_path / "w8a8.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    info = build_engine(onnx_path, tmp_path / "out", min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256,
                        timing_cache=cache)
    assert info.path == tmp_path / "out" / "model.engine" and info.path.stat().st_size > 0
    assert info.profile["max"] == (8, *CHW)
    assert cache.stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))
    with TensorRTBackend(info.path) as rt:
        assert rt.batch_range == (1, 8)
        got = rt.run(images)  # 20 images: runs of 8, 8, 4
        one = rt.run(images[:1])
    ref = ort_logits(onnx_path, images)
    assert got.shape == ref.shape
    assert sqnr_db(ref, got) >= 35
    np.testing.assert_allclose(one, got[:1], rtol=0, atol=1e-4)
    # a rebuild reads the timing cache it wrote
    again = build_engine(onnx_path, tmp_path / "out2", max_batch=8, timing_cache=cache)
    assert again.path.exists()


def test_static_batch_engine_pads_short_runs(tmp_path, images):
    onnx_path = qdq_graph(tmp_path / "static.onnx", batch=4)
    info = build_engine(onnx_path, tmp_path)
    assert info.profile is None
    with TensorRTBackend(info.path) as rt:
        assert rt.batch_range == (4, 4)
        got = rt.run(images[:6])  # 4 + (2 padded to 4)
    assert sqnr_db(ort_logits(onnx_path, images[:6], step=4), got) >= 35


def test_int4_weight_only_engine_matches_onnxruntime(tmp_path, images):
    onnx_path = qdq_graph(tmp_path / "w4a16.onnx", int4=True)
    info = build_engine(onnx_path, tmp_path, max_batch=8)
    with TensorRTBackend(info.path) as rt:
        got = rt.run(images)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    ref = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": images})[0]
    assert sqnr_db(ref, got) >= 30


def test_float_vit_engine_matches_torch(tmp_path, tiny_vit):
    import torch

    x = torch.randn(6, 3, 32, 32)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(tiny_vit, (x,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    info = build_engine(path, tmp_path, max_batch=4)
    with TensorRTBackend(info.path) as rt:
        got = rt.run(x.numpy())
    with torch.no_grad():
        ref = tiny_vit(x).numpy()
    assert sqnr_db(ref, got) >= 40


def test_bundle_verify_script_passes_on_a_real_engine(tmp_path, images, capsys):
    onnx_path = qdq_graph(tmp_path / "w8a8.onnx")
    bundle = write_bundle(tmp_path / "run", onnx_path, images, manifest={"model": {}, "recipe": {}}, max_batch=8)
    build_engine(bundle / "model.qdq.onnx", bundle, max_batch=8)
    spec = importlib.util.spec_from_file_location("bundle_verify_engine", bundle / "verify_engine.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    assert verify.main([]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith("PASS")


def test_backend_rejects_wrong_image_shape(tmp_path, images):
    from maskaq_deploy.runtimes.errors import BackendError

    info = build_engine(qdq_graph(tmp_path / "w8a8.onnx"), tmp_path, max_batch=4)
    with TensorRTBackend(info.path) as rt, pytest.raises(BackendError, match="takes images of shape"):
        rt.run(np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.parametrize("recipe, float_dtype", [("w8a8", "fp16"), ("w8a8", "fp32"), ("w4a16", "fp16"),
                                                 ("fp8", "fp16")])
def test_exported_tiny_vit_engine_matches_its_golden_outputs(tmp_path, recipe, float_dtype):
    """The whole deployment path on the project's own graph: calibrate a tiny ViT, export the tensorrt-flavour
    QDQ graph (fp16 around the quantized layers by default), write the bundle, build the engine in it, and check
    it with the bundle's verify_engine.py. FP8 needs a GPU of compute capability 8.9 or later."""
    import timm
    import torch

    if recipe == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 needs compute capability 8.9+, this GPU is {torch.cuda.get_device_capability()}")

    from maskaq_deploy.calib import RECIPES, attach_quantizers, calibrate_observers
    from maskaq_deploy.export.qdq import export_qdq_onnx
    from maskaq_deploy.export.targets import check_recipe_for_target

    check_recipe_for_target(RECIPES[recipe], "tensorrt")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=128,
                              depth=2, num_heads=2, num_classes=10).eval()
    attach_quantizers(model, RECIPES[recipe])
    x = torch.randn(32, 3, 32, 32)
    calibrate_observers(model, lambda m: m(x))
    exported = export_qdq_onnx(model, tmp_path / "model.onnx", flavour="tensorrt", batch_size=8, dynamic_batch=True,
                               float_dtype=float_dtype)
    bundle = write_bundle(tmp_path / "run", exported.path, x.numpy(), manifest={"recipe": recipe}, max_batch=8)
    build_engine(bundle / "model.qdq.onnx", bundle, max_batch=8)
    spec = importlib.util.spec_from_file_location("bundle_verify_engine_vit", bundle / "verify_engine.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    with np.load(bundle / "golden_outputs.npz") as f:
        golden = f["logits"]
    m = verify.compare(golden, verify.run_engine(bundle / "model.engine", x.numpy()))
    assert m["sqnr_db"] >= 20, m
    assert m["agreement"] >= 0.9, m
