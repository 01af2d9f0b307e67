"""Attaching quantizers to the supported timm families; float equivalence, w8a8 fidelity, recipes, checkpoints."""

import copy

import pytest
import timm
import torch
from torch import nn

from maskaq_deploy.calib import (
    CheckpointError,
    RecipeError,
    UnsupportedModelError,
    attach_quantizers,
    calibrate_observers,
    get_recipe,
    iter_quantizers,
    load_quantized_checkpoint,
    quantizers_enabled,
    save_quantized_checkpoint,
)
from maskaq_deploy.calib.calibrate import batches_forward_loop
from maskaq_deploy.calib.qmodules import QuantAttention, QuantLinear, QuantMatMul, QuantWindowAttention
from maskaq_deploy.calib.recipes import load_recipe_toml
from maskaq_deploy.runtimes.compare import sqnr_db
from tests.conftest import TINY_VIT

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT, 32),
    "vit_no_cls": ("vit_tiny_patch16_224", {**TINY_VIT, "class_token": False, "global_pool": "avg"}, 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT, 32),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7,
                  num_classes=10), 56),
}


def _model(family):
    name, kw, size = FAMILIES[family]
    return timm.create_model(name, pretrained=False, **kw).eval(), size


def _calibrate(model, size, n=3):
    calibrate_observers(model, batches_forward_loop([torch.randn(8, 3, size, size) for _ in range(n)]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_disabled_quantizers_give_the_float_model(family):
    model, size = _model(family)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        qm = copy.deepcopy(model)
        attach_quantizers(qm, get_recipe("w8a8"))
        with quantizers_enabled(qm, False):
            out = qm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w8a8_logits_sqnr_at_least_30db(family):
    model, size = _model(family)
    qm = copy.deepcopy(model)
    info = attach_quantizers(qm, get_recipe("w8a8"))
    _calibrate(qm, size)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        assert sqnr_db(model(x), qm(x)) >= 30.0
    # every Linear, the patch conv and both attention matmuls of each block are quantized
    attn_cls = QuantWindowAttention if family == "swin" else QuantAttention
    n_attn = sum(isinstance(m, attn_cls) for m in qm.modules())
    n_lin = sum(isinstance(m, QuantLinear) for m in qm.modules())
    assert n_attn > 0 and len(info.quantized) == n_lin + 1 + 2 * n_attn
    assert info.family == {"vit_no_cls": "vit"}.get(family, family)


def test_keep_fp_patterns_leave_modules_float():
    model, size = _model("vit")
    info = attach_quantizers(model, get_recipe("w4a4"), keep_fp=("blocks.1.*",))
    assert "patch_embed.proj" in info.kept_fp and "head" in info.kept_fp  # the recipe's first/last
    assert all(n not in info.quantized for n in info.kept_fp)
    assert model.blocks[1].attn.qkv.weight_quantizer is None
    assert model.blocks[0].attn.qkv.weight_quantizer is not None


def test_weight_only_recipe_has_no_activation_quantizers():
    model, _ = _model("vit")
    attach_quantizers(model, get_recipe("w4a16"))
    kinds = {type(q).__name__ for _, q in iter_quantizers(model)}
    assert kinds == {"WeightQuantizer"}
    assert model.blocks[0].mlp.fc1.weight_quantizer.scale.shape == (256, 1)  # 64 inputs, block 128 -> 1 block
    assert all(m.a_quantizer is None for m in model.modules() if isinstance(m, QuantMatMul))


def test_unsupported_architecture():
    with pytest.raises(UnsupportedModelError, match="supported families"):
        attach_quantizers(nn.Sequential(nn.Linear(3, 3)), get_recipe("w8a8"))


def test_recipes_unknown_and_out_of_range(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("w9a9")
    bad = tmp_path / "r.toml"
    bad.write_text('[recipe]\nname = "w12"\nw_bits = 12\na_bits = 8\n')
    with pytest.raises(RecipeError, match="out of range"):
        load_recipe_toml(str(bad))
    good = tmp_path / "g.toml"
    good.write_text('[recipe]\nname = "w6a6"\nbase = "w4a4"\nw_bits = 6\na_bits = 6\n')
    r = load_recipe_toml(str(good))
    assert (r.w_bits, r.a_bits, r.a_symmetric, r.keep_fp) == (6, 6, False, get_recipe("w4a4").keep_fp)


@pytest.mark.parametrize("family,recipe", [("vit", "w8a8"), ("deit_distilled", "w4a4"), ("swin", "w4a16")])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, family, recipe):
    model, size = _model(family)
    name, kw, _ = FAMILIES[family]
    attach_quantizers(model, get_recipe(recipe))
    _calibrate(model, size, n=1)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    save_quantized_checkpoint(tmp_path / "run", model, {"model": {"timm_name": name, "kwargs": kw},
                                                        "recipe": get_recipe(recipe).to_dict()})
    loaded, manifest = load_quantized_checkpoint(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert manifest["schema_version"] == 1
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_checkpoint_without_manifest_is_refused(tmp_path):
    model, size = _model("vit")
    attach_quantizers(model, get_recipe("w8a8"))
    _calibrate(model, size, n=1)
    run = tmp_path / "run"
    save_quantized_checkpoint(run, model, {"model": {"timm_name": FAMILIES["vit"][0], "kwargs": TINY_VIT},
                                           "recipe": get_recipe("w8a8").to_dict()})
    (run / "manifest.json").unlink()  # what an interrupted save leaves: the manifest is written last
    with pytest.raises(CheckpointError, match="interrupted write"):
        load_quantized_checkpoint(run)
