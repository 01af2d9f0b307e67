"""FP8 E4M3: the torch fake quantizers, the recipe's validation, and the float8 Q/DQ the exporter writes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, numpy_helper

from maskaq_deploy.calib.errors import RecipeError
from maskaq_deploy.calib.quantizers import E4M3, ActQuantizer, WeightQuantizer
from maskaq_deploy.calib.recipes import RECIPES, Recipe
from maskaq_deploy.export.inspect import quantized_ops
from maskaq_deploy.export.qdq import insert_qdq
from maskaq_deploy.export.qparams import ActParams, WeightParams
from maskaq_deploy.export.rules import check_tensorrt
from maskaq_deploy.runtimes.compare import sqnr_db
from tests.unit.test_registry import linear_graph, ops, run


def on_e4m3_grid(v: torch.Tensor) -> bool:
    """Every value is an E4M3 number (up to the float32 rounding of (code * scale) / scale)."""
    return torch.allclose(v, v.to(torch.float8_e4m3fn).float(), rtol=1e-6, atol=0)


def calibrated_act(x: torch.Tensor) -> ActQuantizer:
    q = ActQuantizer(8, True, "minmax", E4M3)
    q.calibrating = True
    q(x)
    q.finish_calibration()
    return q


def test_act_quantizer_lands_on_e4m3_and_saturates():
    x = torch.randn(4, 64) * 3
    q = calibrated_act(x)
    assert float(q.scale.detach()) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    y = q(torch.cat([x, torch.full((4, 1), 1e4)], 1)).detach()
    assert on_e4m3_grid(y / q.scale.detach())
    assert float(y.max()) == pytest.approx(448 * float(q.scale.detach()), rel=1e-6)  # saturated, not NaN
    rel = float(((y[:, :64] - x).norm() / x.norm()))
    assert rel < 0.05  # E4M3 keeps 3 mantissa bits: about 2^-4 relative error at worst, much less on average


def test_gradients_pass_straight_through_inside_the_range():
    q = calibrated_act(torch.randn(4, 64))
    x = torch.tensor([0.1, -0.2, 1e4], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


def test_weight_quantizer_is_per_channel_e4m3():
    w = torch.randn(8, 32)
    q = WeightQuantizer(8, "channel", observer="minmax", fmt=E4M3)
    wq = q(w).detach()
    assert on_e4m3_grid(wq / q.scale.detach()[:, None])
    assert torch.allclose(q.scale.detach(), w.abs().amax(1) / 448)
    with pytest.raises(ValueError, match="per-channel"):
        WeightQuantizer(8, "block", 32, fmt=E4M3)
    with pytest.raises(ValueError, match="8 bits"):
        ActQuantizer(4, True, fmt=E4M3)


def test_fp8_recipe_and_its_validation():
    r = RECIPES["fp8"]
    assert (r.w_bits, r.a_bits, r.number_format, r.a_symmetric) == (8, 8, E4M3, True)
    assert Recipe.from_dict({k: v for k, v in r.to_dict().items() if k != "number_format"}).number_format == "int"
    with pytest.raises(RecipeError, match="number_format 'e4m3'"):
        Recipe("x", w_bits=4, a_bits=8, number_format=E4M3)
    with pytest.raises(RecipeError, match="number_format must be"):
        Recipe("x", w_bits=8, a_bits=8, number_format="fp4")


def fp8_params(seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((8, 32)).astype(np.float32) * 100
    codes = codes.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    w = WeightParams("fc.weight_quantizer", 8, "channel", 0, codes, rng.uniform(1e-4, 2e-4, 8).astype(np.float32),
                     float8=True)
    a = ActParams("fc.input_quantizer", 8, True, np.float32(0.02), 0, -448, 448, float8=True)
    return a, w


@pytest.mark.parametrize("flavour", ["tensorrt", "onnxruntime"], ids=["trt-flavour", "ort-flavour"])
def test_float8_qdq_in_both_flavours(flavour):
    x = (np.random.default_rng(7).standard_normal((2, 5, 32)) * 2).astype(np.float32)
    m = linear_graph()
    bias = next(t for t in m.graph.initializer if t.name == "bias")
    a, w = fp8_params()
    insert_qdq(m, {a.name: a, w.name: w}, flavour)
    assert ops(m) == {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1, "Add": 1}  # no integer kernel
    fp8 = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == 3  # the weight and both zero points
    assert quantized_ops(m) == {"MatMul": {"wfp8afp8": 1}}
    xq = (np.clip(x / a.scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * a.scale)
    ref = xq @ w.dequantized().T + numpy_helper.to_array(bias)
    assert sqnr_db(ref, run(m, x)) > 80
    assert check_tensorrt(m) == []
