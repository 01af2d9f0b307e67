"""Block-wise reconstruction (calib.dfq.reconstruct): its pieces on hand-made tensors, then on a tiny ViT."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from maskaq_deploy.calib import RECIPES, attach_quantizers
from maskaq_deploy.calib.calibrate import calibrate_observers
from maskaq_deploy.calib.dfq import DFQConfig
from maskaq_deploy.calib.dfq.config import CalibrationConfig, ReconstructionConfig
from maskaq_deploy.calib.dfq.models import make_teacher
from maskaq_deploy.calib.dfq.reconstruct import (mixed_input, readout_importance, reconstruct, reconstruct_unit,
                                                  reconstruction_units, rollout, token_weights, unit_error, unit_io,
                                                  with_cutmix)

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "mlp_ratio": 2.0}


def test_mixed_input_takes_each_element_from_p_with_the_drop_probability():
    g = torch.Generator().manual_seed(0)
    x_p, x_q = torch.zeros(64, 50, 8), torch.ones(64, 50, 8)
    assert torch.equal(mixed_input(x_p, x_q, 0.0, g), x_q)
    assert torch.equal(mixed_input(x_p, x_q, 1.0, g), x_p)
    mix = mixed_input(x_p, x_q, 0.3, g)
    assert set(mix.unique().tolist()) == {0.0, 1.0}
    assert (mix == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)  # 25600 draws: std 0.003


def test_cutmix_images_paste_one_rectangle_of_another_image_of_the_set():
    images = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 2, 12, 10).clone()  # image k is all k
    out = with_cutmix(images, 2.0, seed=0)
    assert out.shape == (18, 2, 12, 10) and torch.equal(out[:6], images)
    assert torch.equal(out, with_cutmix(images, 2.0, seed=0)) and not torch.equal(out, with_cutmix(images, 2.0, 1))
    for m in out[6:]:
        values = m.unique()
        assert 1 <= len(values) <= 2 and torch.equal(m[0], m[1])  # two source images, the same box on all channels
        if len(values) == 2:  # the pasted image covers one solid rectangle of a quarter to three quarters
            boxes = [_solid_box(m[0] == v) for v in values]
            assert any(b is not None and 0.25 * 120 - 12 <= b <= 0.75 * 120 + 12 for b in boxes)  # +- rounding
    assert with_cutmix(images, 0.0, seed=0) is images


def _solid_box(mask: torch.Tensor) -> int | None:
    """The area of ``mask`` when its True elements form one solid rectangle, else None."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return box.numel() if bool(box.all()) and int(mask.sum()) == box.numel() else None


def test_unit_error_is_the_mean_squared_difference():
    x = torch.arange(12.0).reshape(3, 4)
    assert unit_error(nn.Identity(), x, x + 2.0, batch_size=2, device="cpu") == pytest.approx(4.0)


def test_reconstruct_unit_recovers_a_known_linear_map():
    # Target y = 2x; the unit starts as the identity. Weight training alone (no quantizers) must reach 2 * I.
    torch.manual_seed(0)
    unit = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        unit.weight.copy_(torch.eye(4))
    x = torch.randn(256, 4)
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=300, batch_size=64, weight_lr=0.05, drop=0.0))
    info = reconstruct_unit(unit, x, x, 2 * x, cfg, seed=0, device="cpu")
    assert info["mse_before"] == pytest.approx(float((x ** 2).mean()), rel=1e-5)
    assert torch.allclose(unit.weight.detach(), 2 * torch.eye(4), atol=0.02)
    assert info["mse_after"] < 1e-3


def test_rollout_carries_the_readout_back_half_by_residual_half_by_attention():
    # 3 tokens, 2 blocks. Block 1 makes every token read only token 2; the readout is token 0.
    a1 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    a0 = torch.full((3, 3), 1 / 3)  # never used: nothing before block 0 is reconstructed
    readout = torch.tensor([[1.0, 0.0, 0.0]])
    last, first = rollout([a0[None], a1[None]], readout)[::-1]
    assert torch.equal(last, readout)  # the last block's output is read by the head alone
    assert torch.allclose(first, torch.tensor([[0.5, 0.0, 0.5]]))  # r (I + A) / 2
    w = token_weights(first, 0.5)
    assert torch.allclose(w, torch.tensor([[1.25, 0.5, 1.25]])) and w.mean().item() == pytest.approx(1.0)
    assert torch.equal(token_weights(first, 0.0), torch.ones(1, 3))


def test_focused_loss_with_weights_one_is_the_plain_mse():
    torch.manual_seed(0)
    x = torch.randn(64, 5, 4)
    units = [nn.Linear(4, 4, bias=False) for _ in range(2)]
    units[1].load_state_dict(units[0].state_dict())
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=20, batch_size=16, weight_lr=0.01, drop=0.0))
    a = reconstruct_unit(units[0], x, x, 2 * x, cfg, seed=0, device="cpu")
    b = reconstruct_unit(units[1], x, x, 2 * x, cfg, seed=0, device="cpu", weights=torch.ones(64, 5))
    assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-5)
    assert torch.allclose(units[0].weight, units[1].weight, atol=1e-6)
    # a token of weight 0 is not trained for: with only token 0 weighted, the error of the others stays
    unit = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        unit.weight.copy_(torch.eye(4))
    target = x.clone()
    target[:, 0] *= 2
    weights = torch.zeros(64, 5)
    weights[:, 0] = 5.0
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=200, batch_size=64, weight_lr=0.05, drop=0.0))
    reconstruct_unit(unit, x, x, target, cfg, seed=0, device="cpu", weights=weights)
    assert torch.allclose(unit.weight.detach(), 2 * torch.eye(4), atol=0.05)  # fits token 0, ignores the rest


def test_readout_importance_of_a_class_token_vit():
    fp, q, images = _calibrated_pair("w4a4", 8)
    imp = readout_importance(make_teacher(fp, q), images, 4, "cpu")
    assert imp.shape == (8, 2, 17)  # images, blocks, CLS + 16 patches
    assert torch.allclose(imp.sum(-1), torch.ones(8, 2), atol=1e-5)
    assert torch.equal(imp[:, 1], torch.eye(17)[0].expand(8, 17))  # the last block: only CLS is read
    assert bool((imp[:, 0, 0] >= 0.5).all()) and bool((imp[:, 0, 1:] > 0).all())


def test_units_follow_the_forward_order_of_vit_and_swin():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    assert reconstruction_units(vit) == ["blocks.0", "blocks.1"]
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, in_chans=1,
                             num_classes=10, patch_size=2, window_size=4, embed_dim=16, depths=(1, 2),
                             num_heads=(1, 2))
    assert reconstruction_units(swin) == ["layers.0.blocks.0", "layers.1.downsample", "layers.1.blocks.0",
                                          "layers.1.blocks.1"]


def _calibrated_pair(recipe: str, num_images: int):
    """A tiny float ViT, its quantized copy calibrated on noise images, and those images."""
    torch.manual_seed(0)
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    images = torch.randn(num_images, 1, 16, 16)
    calibrate_observers(q, lambda m: m(images))
    return fp, q, images


def test_reconstruction_lowers_the_block_error_it_optimizes_on_a_tiny_vit():
    fp, q, images = _calibrated_pair("w4a4", 64)
    teacher = make_teacher(fp, q)
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=40, batch_size=16, weight_lr=1e-4),
                    calibration=CalibrationConfig(batch_size=32))
    before = {}
    for name in reconstruction_units(q):
        x_q, _ = unit_io(q, name, images, 32, "cpu", want_output=False)
        _, target = unit_io(teacher, name, images, 32, "cpu")
        before[name] = unit_error(q.get_submodule(name), x_q, target, 32, "cpu")
    with torch.no_grad():
        logits_err_before = (q(images) - fp(images)).pow(2).mean().item()
    infos = reconstruct(teacher, q, images, cfg, "cpu")
    assert [i["unit"] for i in infos] == ["blocks.0", "blocks.1"]
    assert infos[0]["mse_before"] == pytest.approx(before["blocks.0"], rel=1e-5)  # the first unit's input is Q's
    for info in infos:
        assert info["mse_after"] < 0.9 * info["mse_before"], info
    with torch.no_grad():
        assert (q(images) - fp(images)).pow(2).mean().item() < logits_err_before
    assert all(not p.requires_grad for p in teacher.parameters())


def test_focused_reconstruction_lowers_the_error_of_the_class_token_most():
    fp, q, images = _calibrated_pair("w4a4", 64)
    teacher = make_teacher(fp, q)
    q_plain = copy.deepcopy(q)
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=40, batch_size=16),
                    calibration=CalibrationConfig(batch_size=32))
    reconstruct(teacher, q_plain, images, cfg, "cpu")
    reconstruct(teacher, q, images, cfg.replace(reconstruction=cfg.reconstruction.replace(focus=0.9)), "cpu")
    with torch.no_grad():  # what the head reads: the last block's class token
        ref = fp.forward_features(images)[:, 0]
        err = [(m.forward_features(images)[:, 0] - ref).pow(2).mean().item() for m in (q_plain, q)]
    assert err[1] < err[0], err


def test_reconstruction_keeps_8_bit_weight_scales_positive():
    # 8-bit weight scales are ~1e-3: an uncapped step of recon_lr would push some below zero
    fp, q, images = _calibrated_pair("w8a8", 32)
    cfg = DFQConfig(reconstruction=ReconstructionConfig(iters=30, batch_size=16, lr=1e-2))
    reconstruct(make_teacher(fp, q), q, images, cfg, "cpu")
    scales = [p for n, p in q.named_parameters() if n.endswith("_quantizer.scale")]
    assert scales and all(bool((s > 0).all()) for s in scales)
