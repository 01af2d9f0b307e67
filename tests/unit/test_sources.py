"""Calibration sources: the registry, the stages each allows, and a new source through the unchanged driver."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from maskaq_deploy.calib import RECIPES, attach_quantizers
from maskaq_deploy.calib.dfq import (SOURCES, DFQConfig, Source, effective_config, load_dfq_toml, method_names,
                                     register, run_calibration)
from maskaq_deploy.calib.dfq.config import FinetuneConfig, RealConfig, ReconstructionConfig, SynthesisConfig
from maskaq_deploy.calib.dfq.errors import DFQConfigError

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depth": 2, "num_heads": 2,
        "mlp_ratio": 2.0}
DATA = {"mean": (0.1307,), "std": (0.3081,), "input_size": (1, 16, 16)}
ALL_STAGES = DFQConfig(finetune=FinetuneConfig(epochs=2, refresh_every=1), reconstruction=ReconstructionConfig(iters=5))


def test_the_four_built_in_methods_are_registered():
    assert set(SOURCES) == set(method_names()) == {"maskaq", "psaq", "noise", "real"}


def test_registering_a_source_is_all_it_takes_for_the_config_to_accept_it():
    from maskaq_deploy.config import CalibrateConfig
    from maskaq_deploy.errors import UsageError

    with pytest.raises(UsageError, match="unknown `method` 'stripes'; choose one of maskaq, psaq, noise, real"):
        CalibrateConfig(method="stripes")

    @register
    class Stripes(Source):
        name = "stripes"

    try:
        assert CalibrateConfig(method="stripes").method == "stripes"
        assert method_names()[-1] == "stripes"
    finally:
        SOURCES.pop("stripes")
    with pytest.raises(UsageError):
        CalibrateConfig(method="stripes")


@pytest.mark.parametrize("method,stages", [("maskaq", (2, 1, 5)), ("real", (2, 0, 0)), ("psaq", (0, 0, 0)),
                                           ("noise", (0, 0, 0))])
def test_each_source_switches_off_the_stages_it_does_not_have(method, stages):
    cfg = effective_config(method, ALL_STAGES)
    assert (cfg.finetune.epochs, cfg.finetune.refresh_every, cfg.reconstruction.iters) == stages


def test_real_reconstructs_only_when_asked():
    assert effective_config("real", ALL_STAGES).reconstruction.iters == 0
    assert effective_config("real", ALL_STAGES.replace(real=RealConfig(reconstruct=True))).reconstruction.iters == 5


def test_a_new_source_runs_through_the_driver(tmp_path):
    calls = []

    @register
    class Checkerboard(Source):
        name = "checkerboard"
        reconstructs = True

        def images(self, ctx, rnd):
            calls.append(rnd)
            board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
            return board.float().expand(ctx.cfg.num_images, 1, 16, 16).clone(), None

    try:
        torch.manual_seed(0)
        fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
        q = copy.deepcopy(fp)
        attach_quantizers(q, RECIPES["w8a8"])
        summary = run_calibration(fp, q, method="checkerboard", config=ALL_STAGES.replace(num_images=8),
                                  data_config=DATA, run_dir=tmp_path)
    finally:
        SOURCES.pop("checkerboard")
    assert calls == [0]  # one set, no refresh, no fine-tune (the source has neither)
    assert [u["unit"] for u in summary["curves"]["reconstruction"]] == ["blocks.0", "blocks.1"]
    assert summary["seconds"]["finetune"] == 0.0 and summary["rounds"] == 0


def test_the_tv_weight_follows_the_recipes_bit_widths():
    cfg = SynthesisConfig(w_tv=4e-3, w_tv_8bit=2.5e-5)
    assert cfg.for_bit_widths([8, 8, 8]).w_tv == 2.5e-5
    assert cfg.for_bit_widths([8, 4, 8]).w_tv == 4e-3  # one 4-bit quantizer: the low-bit weight
    assert cfg.for_bit_widths([]).w_tv == 4e-3  # nothing quantized: unchanged
    assert DFQConfig.from_preset("fast").for_bit_widths([8]).synthesis.w_tv == 2.5e-5


def test_the_synthesis_steps_follow_the_recipes_bit_widths():
    cfg = DFQConfig(synthesis=SynthesisConfig(iterations=100, iterations_8bit=40))
    assert cfg.for_bit_widths([8, 8]).synthesis.iterations == 40
    assert cfg.for_bit_widths([8, 4]) == cfg
    assert SynthesisConfig(iterations=100).for_bit_widths([8, 8]).iterations == 100  # 0: the same steps at 8 bits
    with pytest.raises(DFQConfigError, match="iterations_8bit must be a non-negative integer"):
        SynthesisConfig(iterations_8bit=-1)


def _at_8_bits(cfg: DFQConfig) -> tuple[int, float]:
    synthesis = cfg.for_bit_widths([8]).synthesis
    return synthesis.iterations, synthesis.w_tv


def test_a_value_set_over_a_preset_applies_at_8_bits_too(tmp_path):
    fast = DFQConfig.from_preset("fast")
    assert (_at_8_bits(fast)[0], fast.for_bit_widths([4, 8]).synthesis.iterations) == (50, 100)
    # a user's step count or TV weight replaces the preset's at every bit width, in either spelling ...
    assert _at_8_bits(DFQConfig.from_preset("fast", iterations=30, w_tv=1e-3)) == (30, 1e-3)
    assert _at_8_bits(DFQConfig.from_preset("fast", synthesis={"iterations": 30, "w_tv": 1e-3})) == (30, 1e-3)
    toml = tmp_path / "dfq.toml"
    toml.write_text('[dfq]\npreset = "fast"\niterations = 30\n')
    assert _at_8_bits(load_dfq_toml(toml))[0] == 30
    # ... unless the 8-bit value is set as well (also when the file sets one and an override the other)
    both = DFQConfig.from_preset("fast", iterations=30, iterations_8bit=20, w_tv=1e-3, w_tv_8bit=2e-3)
    assert _at_8_bits(both) == (20, 2e-3)
    toml.write_text('[dfq]\npreset = "fast"\n[dfq.synthesis]\niterations_8bit = 20\n')
    assert _at_8_bits(load_dfq_toml(toml, iterations=30))[0] == 20


@pytest.mark.parametrize("recipe,steps", [("w8a8", 3), ("w4a8", 5)])
def test_the_driver_synthesizes_the_steps_of_the_recipe(tmp_path, recipe, steps):
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    cfg = DFQConfig.from_preset("fast", num_images=4, batch_size=4, iterations=5, iterations_8bit=3,
                                recon_iters=0, log_every=1)
    summary = run_calibration(fp, q, method="maskaq", config=cfg, data_config=DATA, run_dir=tmp_path,
                              synthesis_workers=1)
    assert summary["config"]["synthesis"]["iterations"] == steps
    assert [p["iteration"] for p in summary["curves"]["synthesis"][0]["curve"]] == list(range(steps))


@pytest.mark.parametrize("recipe,w_tv", [("w8a8", 2.5e-5), ("w4a8", 4e-3), ("w4a4", 4e-3)])
def test_the_driver_runs_the_tv_weight_of_the_recipe(tmp_path, recipe, w_tv):
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    cfg = DFQConfig.from_preset("fast", num_images=4, recon_iters=0)
    summary = run_calibration(fp, q, method="noise", config=cfg, data_config=DATA, run_dir=tmp_path)
    synthesis = summary["config"]["synthesis"]
    assert synthesis["w_tv"] == w_tv and synthesis["w_tv_8bit"] == 2.5e-5
