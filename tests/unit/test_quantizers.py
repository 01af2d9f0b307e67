"""Quantizer math: grids, rounding, clamping, STE gradients, scale shapes, observers and LSQ initialization."""

import pytest
import torch

from maskaq_deploy.calib.observers import MSEObserver, Observer, PercentileObserver
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer, fake_quant, lsq_fake_quant, round_ste


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.4, 0.5, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 0.0, 2.0, -3.0]  # half-to-even, like ONNX QuantizeLinear
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_fake_quant_clamps_and_blocks_gradient_of_clipped_values():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.74, 10.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(0.0), -8, 7)
    assert y.tolist() == [-4.0, -0.5, 0.0, 0.5, 3.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("zero_point,qmin,qmax", [(0.0, -8, 7), (3.0, 0, 15)])
def test_lsq_gradients_follow_the_lsq_definition(zero_point, qmin, qmax):
    # x / s chosen around both ends of the grid; straight-through LSQ: d/dx = 1 where round(x/s) + zp lies in
    # [qmin, qmax], 0 where clipped; d/ds = round(v) - v there, the clipped code (minus zp) elsewhere; times g.
    v = torch.tensor([-11.2, -7.5, -1.6705, 0.3, 6.9, 7.4, 8.2, 12.6])
    s, g = 0.5, 0.25
    x = (v * s).requires_grad_(True)
    scale = torch.tensor(s, requires_grad=True)
    y = lsq_fake_quant(x, scale, torch.tensor(zero_point), qmin, qmax, g)
    y.sum().backward()
    shifted = torch.round(v) + zero_point
    inside = (shifted >= qmin) & (shifted <= qmax)
    codes = torch.clamp(torch.round(v) + zero_point, qmin, qmax)
    assert torch.allclose(y.detach(), (codes - zero_point) * s)
    # bit-identical to the plain fake_quant (what export mirrors), with and without a zero point tensor
    assert torch.equal(y.detach(), fake_quant(x.detach(), torch.tensor(s), torch.tensor(zero_point), qmin, qmax))
    if zero_point == 0.0:
        assert torch.equal(y.detach(), lsq_fake_quant(x.detach(), torch.tensor(s), None, qmin, qmax))
    with torch.no_grad():  # evaluation: the same values, with a learnable scale, without the autograd node
        assert torch.equal(y.detach(), lsq_fake_quant(x, scale, torch.tensor(zero_point), qmin, qmax, g))
    assert x.grad.tolist() == inside.float().tolist()
    expected_ds = torch.where(inside, torch.round(v) - v, codes - zero_point).sum() * g
    assert scale.grad.item() == pytest.approx(expected_ds.item(), rel=1e-5)


def test_lsq_without_grad_mode_gives_the_training_values_on_every_grid():
    x = torch.randn(4, 33) * 5
    scale = torch.nn.Parameter(torch.tensor(0.07))
    for zp, qmin, qmax, f8 in ((None, -128, 127, False), (torch.tensor(5.0), 0, 255, False),
                               (None, -448, 448, True)):
        trained = lsq_fake_quant(x, scale, zp, qmin, qmax, 1.0, f8)
        with torch.no_grad():
            evaluated = lsq_fake_quant(x, scale, zp, qmin, qmax, 1.0, f8)
        assert trained.grad_fn is not None and evaluated.grad_fn is None
        assert torch.equal(trained.detach(), evaluated)


def test_fused_lsq_sums_the_scale_gradient_to_per_channel_shape():
    x = torch.randn(6, 20) * 3
    scale = (torch.rand(6, 1) * 0.4 + 0.3).requires_grad_(True)
    lsq_fake_quant(x, scale, torch.tensor(0.0), -8, 7, 1.0).sum().backward()
    assert scale.grad.shape == (6, 1)
    v = x / scale.detach()
    inside = (v.round() >= -8) & (v.round() <= 7)
    expected = torch.where(inside, v.round() - v, v.round().clamp(-8, 7)).sum(1, keepdim=True)
    assert torch.allclose(scale.grad, expected, atol=1e-5)


def test_fused_lsq_computes_no_scale_gradient_when_the_scale_is_frozen():
    x = torch.randn(4, 8, requires_grad=True)
    s = torch.tensor(0.5)
    lsq_fake_quant(x, s, None, -8, 7, 1.0).sum().backward()
    assert x.grad is not None and s.grad is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_per_channel_grid_and_error_bound(bits):
    w = torch.randn(16, 40)
    q = WeightQuantizer(bits, "channel")
    q.init_from(w)
    assert q.scale.shape == (16,)
    wq = q(w)
    codes = wq / q.scale.view(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
    # min-max scale: every value is within half a step of its code
    assert ((w - wq).abs() <= q.scale.view(-1, 1) / 2 + 1e-6).all()


def test_weight_block_shapes_and_padding():
    w = torch.randn(8, 100)  # 100 = 3 blocks of 32 + a padded remainder
    q = WeightQuantizer(4, "block", block_size=32)
    q.init_from(w)
    assert q.scale.shape == (8, 4)
    wq = q(w)
    assert wq.shape == w.shape
    # each block has its own scale: the last (padded) block's values use scale[:, 3]
    step = q.scale[:, 3:4]
    codes = wq[:, 96:] / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert torch.equal(q.quantize_int(w).float() * q.scale.repeat_interleave(32, 1)[:, :100], wq.detach())


def test_conv_weight_per_channel():
    w = torch.randn(6, 3, 4, 4)
    q = WeightQuantizer(8, "channel")
    q.init_from(w)
    assert q.scale.shape == (6,) and q(w).shape == w.shape


def test_weight_mse_init_not_worse_than_minmax():
    w = torch.randn(32, 64)
    w[0, 0] = 12.0  # an outlier the MSE search should clip
    mm, mse = WeightQuantizer(3, observer="minmax"), WeightQuantizer(3, observer="mse")
    mm.init_from(w)
    mse.init_from(w)
    err_mm, err_mse = ((mm(w) - w) ** 2).sum(), ((mse(w) - w) ** 2).sum()
    assert err_mse <= err_mm


def test_weight_scale_gets_lsq_gradient_and_weight_ste():
    w = torch.randn(4, 8, requires_grad=True)
    q = WeightQuantizer(4)
    q.init_from(w)
    q(w).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    assert w.grad is not None


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bit width"):
        WeightQuantizer(9)
    with pytest.raises(ValueError, match="bit width"):
        ActQuantizer(1)


def _calibrated(x, **kw):
    q = ActQuantizer(**kw)
    q.calibrating = True
    q(x)
    q.finish_calibration()
    return q


def test_act_symmetric_init_minmax():
    x = torch.linspace(-3.0, 2.0, 1000)
    q = _calibrated(x, bits=8, symmetric=True, observer="minmax")
    assert q.zero_point.item() == 0.0
    assert q.scale.item() == pytest.approx(3.0 / 127, rel=1e-6)
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_act_asymmetric_zero_point_and_unsigned_grid():
    x = torch.linspace(-1.0, 3.0, 1000)
    q = _calibrated(x, bits=4, symmetric=False, observer="minmax")
    assert q.qmin == 0 and q.qmax == 15
    assert q.scale.item() == pytest.approx(4.0 / 15, rel=1e-5)
    assert q.zero_point.item() == round(1.0 / q.scale.item())
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-5


def test_act_lsq_step_gradient():
    x = torch.randn(64)
    q = _calibrated(x, bits=4, symmetric=True, observer="minmax")
    (q(x) - x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_act_before_calibration_raises():
    with pytest.raises(RuntimeError, match="before calibration"):
        ActQuantizer(8)(torch.randn(3))


def test_observers_ranges():
    x = torch.cat([torch.randn(100000), torch.tensor([50.0])])
    mm = Observer()
    mm.collect(x)
    assert mm.compute(None)[1] == pytest.approx(50.0)
    pc = PercentileObserver(99.9)
    pc.collect(x)
    lo, hi = pc.compute(None)
    assert 2.5 < hi < 4.0 and -4.0 < lo < -2.5
    q = ActQuantizer(4, observer="mse")
    q.calibrating = True
    q(x)
    q.finish_calibration()
    assert q.scale.item() * q.qmax < 25.0  # the MSE search clips the outlier


def test_mse_observer_beats_minmax_on_outliers():
    x = torch.cat([torch.randn(20000), torch.tensor([40.0])])
    errs = {}
    for obs in ("minmax", "mse"):
        q = _calibrated(x, bits=4, symmetric=True, observer=obs)
        errs[obs] = ((q(x) - x) ** 2).mean().item()
    assert errs["mse"] < errs["minmax"]
    assert isinstance(MSEObserver(), Observer)
