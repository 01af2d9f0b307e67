"""torch fake-quant -> QDQ ONNX -> onnxruntime, on tiny ViT / DeiT-distilled / Swin models.

Asserted: node counts by op type for every recipe and flavour, conformance (TensorRT rules, onnxruntime
loading), onnxruntime-vs-torch agreement (top-1 agreement, logits SQNR), and the typed errors for bad input.
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from maskaq_deploy.calib import attach_quantizers, calibrate_observers, get_recipe, iter_quantizers
from maskaq_deploy.calib.calibrate import batches_forward_loop
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer
from maskaq_deploy.export.errors import ExportError, NoQDQError, TargetError, UnsupportedModelError, UnsupportedOpError
from maskaq_deploy.export.inspect import inspect_onnx
from maskaq_deploy.export.onnx_export import export_fp_onnx
from maskaq_deploy.export.qdq import (act_params, default_options, export_qdq_onnx, trace_quantized, weight_params,
                                      write_qdq)
from maskaq_deploy.export.rules import check_onnxruntime, check_tensorrt
from maskaq_deploy.runtimes import BackendError, BackendUnavailable, OrtBackend, TorchBackend, benchmark, compare_logits

torch.set_num_threads(1)

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                         num_classes=10), (3, 32, 32)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                               num_heads=2, num_classes=10), (3, 32, 32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, patch_size=4, embed_dim=32, depths=(2, 2),
                                                  num_heads=(2, 4), window_size=7, num_classes=10), (3, 56, 56)),
}
BATCH = 4


@functools.lru_cache(maxsize=None)
def calibrated(family: str, recipe: str) -> nn.Module:
    name, kwargs, shape = TINY[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    attach_quantizers(model, get_recipe(recipe))
    gen = torch.Generator().manual_seed(1)
    calibrate_observers(model, batches_forward_loop([torch.randn(8, *shape, generator=gen) for _ in range(2)]))
    return model


@functools.lru_cache(maxsize=None)
def marked(family: str, recipe: str):
    model = calibrated(family, recipe)
    return trace_quantized(model, default_options(model, batch_size=BATCH))


@functools.lru_cache(maxsize=None)
def exported(family: str, recipe: str, flavour: str, tmp_root, float_dtype: str | None = None) -> str:
    path = tmp_root / f"{family}_{recipe}_{flavour}_{float_dtype}.onnx"
    return str(write_qdq(marked(family, recipe), path, flavour, metadata={"recipe": recipe},
                         float_dtype=float_dtype).path)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def images(family: str, n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY[family][2])).astype(np.float32)


def op_counts(path) -> dict:
    return dict(collections.Counter(n.op_type for n in onnx.load(path).graph.node))


def ort_vs_torch(family, recipe, path, n=32):
    x = images(family, n)
    with TorchBackend(calibrated(family, recipe)) as ref, OrtBackend(path, threads=1) as rt:
        return compare_logits(ref.run(x), rt.run(x))


# ---- node counts ------------------------------------------------------------------------------------------
# tiny ViT, depth 2: L = 9 Linear layers (4 per block + head), A = 4 attention matmuls, 1 patch-embedding Conv.
# Sub-8-bit recipes keep the patch embedding and the head float (FIRST_LAST).

L, A = 9, 4
COUNTS = {
    ("w8a8", "tensorrt"): {"QuantizeLinear": L + 2 * A + 1, "DequantizeLinear": L + 2 * A + 1 + L + 1,
                           "MatMul": L - 1 + A, "Gemm": 1, "Conv": 1},
    ("w8a8", "onnxruntime"): {"QuantizeLinear": L + 2 * A + 1, "DequantizeLinear": 2 * A + 2,
                              "MatMulIntegerToFloat": L, "MatMul": A, "Conv": 1},
    ("w4a16", "tensorrt"): {"DequantizeLinear": L, "MatMul": L - 1 + A, "Gemm": 1, "Conv": 1},
    ("w4a16", "onnxruntime"): {"MatMulNBits": L, "MatMul": A, "Conv": 1},
    ("w4a4", "onnxruntime"): {"Clip": L - 1 + 2 * A, "QuantizeLinear": L - 1 + 2 * A, "DequantizeLinear": 2 * A,
                              "MatMulIntegerToFloat": L - 1, "MatMul": A, "Gemm": 1, "Conv": 1},
}
COUNTS[("w4a8", "tensorrt")] = COUNTS[("w8a8", "tensorrt")]  # 4-bit per-channel weights in int8 containers
COUNTS[("w4a8", "onnxruntime")] = COUNTS[("w8a8", "onnxruntime")]
COUNTS[("w3a3", "onnxruntime")] = COUNTS[("w5a5", "onnxruntime")] = COUNTS[("w4a4", "onnxruntime")]
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "Clip", "MatMulIntegerToFloat", "MatMulNBits", "MatMul", "Gemm",
             "Conv")


@pytest.mark.parametrize("recipe,flavour", sorted(COUNTS))
def test_node_counts(out_dir, recipe, flavour):
    counts = op_counts(exported("vit", recipe, flavour, out_dir))
    got = {op: counts.get(op, 0) for op in QUANT_OPS}
    want = {op: COUNTS[(recipe, flavour)].get(op, 0) for op in QUANT_OPS}
    assert got == want
    assert counts["Softmax"] == 2 and counts["LayerNormalization"] == 5 and counts["Gelu"] == 2
    assert "QMark" not in counts


@pytest.mark.parametrize("recipe", ["w4a4", "w3a3", "w5a5"])
def test_sub_8_bit_activations_are_refused_for_tensorrt(out_dir, recipe):
    with pytest.raises(TargetError, match="symmetric 8-bit activations"):
        write_qdq(marked("vit", recipe), out_dir / "refused.onnx", "tensorrt")


# ---- numerics: onnxruntime vs torch fake-quant ---------------------------------------------------------------
# Same scales, same codes: the only differences are float summation order inside the integer / float kernels,
# which flips a rare activation code by one step. Bounds: >= 97% top-1 agreement on 32 random images (random
# weights give near-tied logits, the hardest case) and logits SQNR >= 35 dB. The tensorrt flavour is checked
# here with its float path in fp32 (the same grid as torch); its fp16 default has its own bound below.

@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
def test_w8a8_matches_torch(out_dir, family, flavour):
    m = ort_vs_torch(family, "w8a8", exported(family, "w8a8", flavour, out_dir, "fp32"))
    assert m["top1_agreement"] >= 0.97 and m["sqnr_db"] >= 35.0, m


@pytest.mark.parametrize("recipe,flavour", [("w4a16", "onnxruntime"), ("w4a16", "tensorrt"),
                                            ("w4a8", "onnxruntime"), ("w4a4", "onnxruntime"),
                                            ("w3a3", "onnxruntime"), ("fp8", "onnxruntime"), ("fp8", "tensorrt")])
def test_other_recipes_match_torch(out_dir, recipe, flavour):
    m = ort_vs_torch("vit", recipe, exported("vit", recipe, flavour, out_dir, "fp32"))
    assert m["top1_agreement"] >= 0.97 and m["sqnr_db"] >= 35.0, m


# fp16 everywhere outside the Q/DQ pairs: half-precision rounding of every activation, scale and bias on
# random-weight models with near-tied logits. Bounds: logits SQNR >= 30 dB and >= 90% agreement on 32 images
# (the embedded model's trained logits are held to 99.5% in test_half_precision.py). FP8 gets 20 dB: an fp16
# input that lands across an E4M3 rounding boundary moves its code by one E4M3 step, 1/8 of its magnitude.
@pytest.mark.parametrize("family, recipe, min_sqnr", [("vit", "w8a8", 30), ("deit_distilled", "w8a8", 30),
                                                      ("swin", "w8a8", 30), ("vit", "w4a16", 30), ("vit", "fp8", 20)])
def test_fp16_tensorrt_flavour_tracks_torch(out_dir, family, recipe, min_sqnr):
    path = exported(family, recipe, "tensorrt", out_dir)
    assert onnx.load(path).graph.node[0].op_type == "Cast"  # fp16 is the flavour's default
    m = ort_vs_torch(family, recipe, path)
    assert m["top1_agreement"] >= 0.9 and m["sqnr_db"] >= min_sqnr, m
    assert check_tensorrt(path) == []


def test_swin_w4a16_matches_torch(out_dir):
    m = ort_vs_torch("swin", "w4a16", exported("swin", "w4a16", "onnxruntime", out_dir), n=16)
    assert m["top1_agreement"] >= 0.97 and m["sqnr_db"] >= 35.0, m


def test_exported_grid_is_torchs_grid():
    """The scales and codes written to ONNX reproduce each torch quantizer's output bit for bit."""
    for recipe in ("w8a8", "w4a16"):
        model = calibrated("vit", recipe)
        for name, q in iter_quantizers(model):
            if isinstance(q, WeightQuantizer):
                w = model.get_submodule(name.rpartition(".")[0]).weight
                p = weight_params(name, q, w)
                assert np.array_equal(p.dequantized(), q(w).detach().numpy()), name
            elif isinstance(q, ActQuantizer):
                x = torch.randn(1, 17 * 64) * 3
                p = act_params(name, q, x[0].numel())
                s = torch.tensor(p.scale)
                ours = (torch.clamp(torch.round(x / s) + p.zero_point, p.qmin, p.qmax) - p.zero_point) * s
                assert torch.equal(ours, q(x)), name


def test_dynamic_batch(out_dir):
    model = calibrated("vit", "w8a8")
    r = export_qdq_onnx(model, out_dir / "dyn.onnx", flavour="onnxruntime", dynamic_batch=True, batch_size=2)
    for n in (1, 5):
        x = images("vit", n, seed=n)
        with TorchBackend(model) as ref, OrtBackend(r.path) as rt:
            assert rt.fixed_batch is None
            m = compare_logits(ref.run(x), rt.run(x))
        assert m["top1_agreement"] == 1.0 and m["sqnr_db"] >= 35.0, m


def test_fixed_batch_model_takes_any_number_of_images(out_dir):
    path = exported("vit", "w8a8", "onnxruntime", out_dir)
    x = images("vit", 6)
    with OrtBackend(path) as rt:
        assert rt.fixed_batch == BATCH
        whole = rt.run(x)
        parts = np.concatenate([rt.run(x[:4]), rt.run(x[4:])])
    assert whole.shape == (6, 10) and np.array_equal(whole, parts)


# ---- conformance and inspection ---------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_tensorrt_flavour_is_conformant(out_dir, recipe):
    path = exported("vit", recipe, "tensorrt", out_dir)
    assert check_tensorrt(path) == []
    assert [v for v in check_onnxruntime(path) if v.severity == "error"] == []


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "w4a8"])
def test_onnxruntime_flavour_loads_at_the_default_level(out_dir, recipe):
    path = exported("vit", recipe, "onnxruntime", out_dir)
    assert check_onnxruntime(path) == []
    # and says why it is not a TensorRT graph
    assert {v.rule for v in check_tensorrt(path)} <= {"trt-custom-op", "trt-dtype", "trt-zero-point"}


def test_inspect_reports_bit_widths(out_dir):
    r = inspect_onnx(exported("vit", "w8a8", "tensorrt", out_dir))
    assert r.quantized_ops == {"Conv": {"w8a8": 1}, "Gemm": {"w8a8": 1}, "MatMul": {"w8a8": 8, "a8a8": 4}}
    assert r.flavour == "tensorrt" and r.opset == 20 and r.tensorrt_violations == []
    r4 = inspect_onnx(exported("vit", "w4a4", "onnxruntime", out_dir), check_ort=False)
    assert r4.quantized_ops == {"MatMul": {"a4a4": 4}, "MatMulIntegerToFloat": {"w4a4": 8}}
    r16 = inspect_onnx(exported("vit", "w4a16", "tensorrt", out_dir), check_ort=False)
    assert r16.opset == 21 and r16.quantized_ops == {"Gemm": {"wint4afp": 1}, "MatMul": {"wint4afp": 8}}
    # INT4 weights take half a byte per value (plus nothing else quantized)
    n_weights = sum(int(np.prod(p.codes.shape)) for p in marked("vit", "w4a16").params.values())
    assert r16.quantized_initializer_bytes <= n_weights // 2 + len(marked("vit", "w4a16").params)


# ---- bad input ----------------------------------------------------------------------------------------------

def test_float_export_has_no_qdq(out_dir):
    path = export_fp_onnx(calibrated("vit", "w8a8"), out_dir / "fp.onnx")
    counts = op_counts(path)
    assert counts["MatMul"] == L - 1 + A and counts["Softmax"] == 2 and "QuantizeLinear" not in counts
    assert not inspect_onnx(path, check_ort=False).has_qdq
    with pytest.raises(NoQDQError):
        inspect_onnx(path, require_qdq=True)


def test_not_an_onnx_file_in_the_runtime(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(BackendError, match="cannot load"):
        with OrtBackend(p):
            pass


def test_missing_provider_lists_the_available_ones(out_dir):
    with pytest.raises(BackendUnavailable, match=r"requested provider NoSuchExecutionProvider; available providers "
                                                 r"are \[.*CPUExecutionProvider"):
        with OrtBackend(exported("vit", "w8a8", "onnxruntime", out_dir), provider="NoSuchExecutionProvider"):
            pass


class _Cummax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.cummax(x, dim=1)[0].flatten(1))


def test_unsupported_op_at_export(tmp_path):
    with pytest.raises(UnsupportedOpError, match="aten.cummax") as e:
        export_fp_onnx(_Cummax(), tmp_path / "bad.onnx", input_shape=(3, 8, 8))
    assert "\n" not in str(e.value)


def test_models_that_cannot_be_exported_quantized(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not.*nn.Module|expected a torch nn.Module"):
        export_qdq_onnx("model.pth", tmp_path / "x.onnx", input_shape=(3, 8, 8))
    float_model = timm.create_model(TINY["vit"][0], pretrained=False, **TINY["vit"][1])
    with pytest.raises(UnsupportedModelError, match="no enabled quantizers"):
        export_qdq_onnx(float_model, tmp_path / "x.onnx")
    attach_quantizers(float_model, get_recipe("w8a8"))  # attached, never calibrated
    with pytest.raises(ExportError, match="not calibrated"):
        export_qdq_onnx(float_model, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="unknown export flavour"):
        export_qdq_onnx(calibrated("vit", "w8a8"), tmp_path / "x.onnx", flavour="tflite")


def test_benchmark_rows(out_dir):
    path = exported("vit", "w8a8", "onnxruntime", out_dir)
    rows = benchmark(lambda b, t: OrtBackend(path, threads=t), (3, 32, 32), batch_sizes=(BATCH,), threads=(1,),
                     warmup=1, iterations=3, label="w8a8")
    assert len(rows) == 1 and rows[0]["batch"] == BATCH and rows[0]["iterations"] == 3
    assert rows[0]["p90_ms"] >= rows[0]["median_ms"] > 0 and rows[0]["throughput_ips"] > 0


# ---- the embedded MNIST model, calibrated on its real calibration images -----------------------------------

EMBEDDED = __import__("pathlib").Path(__file__).resolve().parents[2] / "maskaq_deploy" / "assets" / "embedded"


@functools.lru_cache(maxsize=None)
def embedded_model_and_data():
    import json

    from safetensors.torch import load_file

    cfg = json.loads((EMBEDDED / "config.json").read_text())
    model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["model_kwargs"]).eval()
    model.load_state_dict(load_file(EMBEDDED / "model.safetensors"))

    def normalize(name, n):
        d = np.load(EMBEDDED / name)
        x = (d["images"][:n].astype(np.float32) / 255.0 - cfg["mean"][0]) / cfg["std"][0]
        return x[:, None], d["labels"][:n]

    return model, normalize("mnist_calib.npz", 512), normalize("mnist_test.npz", 1000)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_embedded_model_both_flavours(tmp_path, recipe):
    """The done-when bounds on 1000 test images: >= 99.5% top-1 agreement and >= 30 dB logits SQNR, and a
    TensorRT-conformant tensorrt flavour."""
    import copy

    base, (xc, _), (xt, yt) = embedded_model_and_data()
    model = copy.deepcopy(base)
    attach_quantizers(model, get_recipe(recipe))
    calibrate_observers(model, batches_forward_loop([torch.from_numpy(xc[i:i + 64]) for i in range(0, len(xc), 64)]))
    marks = trace_quantized(model, default_options(model, batch_size=50))
    with TorchBackend(model) as ref:
        ref_logits = ref.run(xt)
    assert (ref_logits.argmax(1) == yt).mean() >= 0.95  # the fake-quant model itself still reads digits
    for flavour in ("onnxruntime", "tensorrt"):
        path = write_qdq(marks, tmp_path / f"{flavour}.onnx", flavour).path
        with OrtBackend(path, threads=2) as rt:
            m = compare_logits(ref_logits, rt.run(xt))
        assert m["top1_agreement"] >= 0.995 and m["sqnr_db"] >= 30.0, (flavour, m)
        assert [v for v in check_onnxruntime(path) if v.severity == "error"] == []
        if flavour == "tensorrt":
            assert check_tensorrt(path) == []
