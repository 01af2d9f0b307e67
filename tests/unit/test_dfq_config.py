"""DFQConfig: its parts, flat [dfq] keys and part tables, presets, validation, old manifests, the docs' list."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskaq_deploy.calib.dfq import DFQConfig, DFQConfigError, load_dfq_toml
from maskaq_deploy.calib.dfq.config import (FLAT_KEYS, PARTS, CalibrationConfig, FinetuneConfig, PSAQConfig,
                                            ReconstructionConfig)


def test_config_round_trips_and_presets_are_valid():
    for name in ("fast", "standard", "paper"):
        cfg = DFQConfig.from_preset(name, seed=4)
        assert DFQConfig.from_dict(cfg.to_dict()) == cfg == DFQConfig.from_dict(cfg.to_flat_dict())
        assert cfg.preset == name and cfg.seed == 4
    paper = DFQConfig.from_preset("paper")
    assert (paper.num_images, paper.synthesis.iterations, paper.batch_size, paper.finetune.epochs,
            paper.finetune.refresh_every) == (10000, 2000, 16, 200, 30)
    syn = paper.synthesis
    assert (syn.w_ce, paper.maskaq.w_interhead, syn.w_tv, paper.maskaq.w_mask, syn.w_entropy) == (1, 1, 2.5e-5, 0.1, 1)
    # the short presets weigh the image prior far above the paper's (chosen on the valid split, docs/maskaq.md)
    assert DFQConfig.from_preset("fast").synthesis.w_tv == DFQConfig.from_preset("standard").synthesis.w_tv == 4e-3
    # standard keeps fast's values (its guarded fine-tune did not pay, docs/maskaq.md): configs naming it still load
    fast, std = DFQConfig.from_preset("fast"), DFQConfig.from_preset("standard")
    assert fast.finetune.epochs == 0 and fast.reconstruction.iters > 0 and std == fast.replace(preset="standard")


def test_config_reads_the_flat_configs_of_earlier_versions():
    """A manifest written before the config had parts: one flat table, version 1, with the removed q_init."""
    cfg = DFQConfig.from_preset("fast", seed=2, recon_real=True)
    old = {**cfg.to_flat_dict(), "version": 1, "q_init": "noise"}
    assert DFQConfig.from_dict(old) == cfg and cfg.real.reconstruct and cfg.version == 2
    assert DFQConfig.from_dict(old).to_dict()["reconstruction"]["iters"] == 200


def test_flat_keys_and_part_tables_name_the_same_fields():
    assert FLAT_KEYS["recon_iters"] == ("reconstruction", "iters") and FLAT_KEYS["ft_lr"] == ("finetune", "lr")
    assert FLAT_KEYS["epochs"] == ("finetune", "epochs") and FLAT_KEYS["recon_real"] == ("real", "reconstruct")
    flat = DFQConfig.from_dict({"recon_iters": 7, "ft_lr": 2e-3, "psaq_kde_points": 4, "calib_batch_size": 8})
    nested = DFQConfig.from_dict({"reconstruction": {"iters": 7}, "finetune": {"lr": 2e-3}, "psaq": {"kde_points": 4},
                                  "calibration": {"batch_size": 8}})
    assert flat == nested == DFQConfig(reconstruction=ReconstructionConfig(iters=7), finetune=FinetuneConfig(lr=2e-3),
                                       psaq=PSAQConfig(kde_points=4), calibration=CalibrationConfig(batch_size=8))
    assert DFQConfig.from_dict({"reconstruction": {"lr": 1}}).reconstruction.lr == 1.0  # a TOML int for a float
    assert set(DFQConfig().to_flat_dict()) == {*FLAT_KEYS, "preset", "seed", "num_images", "batch_size", "autocast",
                                               "log_every", "version"}


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"mask_drop": 1.0}, {"lr": -1.0}, {"autocast": "fp8"},
                                 {"refresh_every": 3}, {"jitter": 0.6}, {"w_tv": float("nan")},
                                 {"ft_holdout": 1.0}, {"ft_holdout": 0.001}, {"ft_patience": 2},
                                 {"soft_label_mix": 0.6}, {"soft_label_mix": -0.1}, {"ft_flip": 1},
                                 {"finetune": {"epochs": "3"}}, {"finetune": 3}, {"version": 3}])
def test_config_rejects_bad_values_with_a_typed_error(bad):
    with pytest.raises(DFQConfigError, match="^dfq config: "):
        DFQConfig.from_dict(bad)


@pytest.mark.parametrize("values,message", [
    ({"iters": 3}, r"unknown field\(s\) \['iters'\] in the dfq config"),
    ({"reconstruction": {"iter": 3}}, r"unknown field\(s\) \['iter'\] in \[dfq.reconstruction\].*did you mean iters"),
    ({"recon_iters": 3, "reconstruction": {"iters": 4}}, "recon_iters and reconstruction.iters are the same field"),
    ({"q_init": "zeros"}, "q_init was removed"),
])
def test_config_rejects_unknown_doubled_and_removed_fields(values, message):
    with pytest.raises(DFQConfigError, match=message):
        DFQConfig.from_dict(values)


def test_config_rejects_unknown_presets():
    with pytest.raises(DFQConfigError, match="unknown preset"):
        DFQConfig.from_preset("slow")


def test_config_parts_are_checked_when_made():
    with pytest.raises(DFQConfigError, match="recon_iters must be a non-negative integer"):
        ReconstructionConfig(iters=-1)
    with pytest.raises(DFQConfigError, match="reconstruction must be a ReconstructionConfig"):
        DFQConfig(reconstruction={"iters": 3})


def test_config_from_toml_with_preset_base(tmp_path):
    path = tmp_path / "dfq.toml"
    path.write_text('[dfq]\npreset = "standard"\niterations = 50\nw_tv = 0\n')
    cfg = load_dfq_toml(path, seed=7)
    assert (cfg.preset, cfg.synthesis.iterations, cfg.synthesis.w_tv, cfg.seed) == ("standard", 50, 0.0, 7)
    assert cfg.reconstruction == DFQConfig.from_preset("standard").reconstruction
    path.write_text('[dfq]\npreset = "standard"\n[dfq.synthesis]\niterations = 50\nw_tv = 0\n')
    assert load_dfq_toml(path, seed=7) == cfg


def test_the_docs_list_every_dfq_field():
    text = (Path(__file__).parents[2] / "docs" / "maskaq.md").read_text()
    listed = text[text.index("## The `[dfq]` fields"):]
    missing = [k for k in DFQConfig().to_flat_dict() if f"`{k}`" not in listed]
    assert not missing, f"docs/maskaq.md does not list {missing}"
    for part in PARTS:
        assert f"`[dfq.{part}]`" in listed


def test_a_run_config_takes_flat_keys_and_part_tables_of_dfq(tmp_path):
    from maskaq_deploy.config import CalibrateConfig, build, config_tables, with_dfq_preset

    path = tmp_path / "run.toml"
    path.write_text('[calibrate]\npreset = "fast"\n[dfq]\nrecon_iters = 100\n[dfq.finetune]\nepochs = 2\nlr = 1e-4\n')
    tables = config_tables(str(path))
    calibrate, dfq = with_dfq_preset(tables.get("calibrate"), tables.get("dfq"), None)
    cfg = build(CalibrateConfig, calibrate, {"dfq": dfq, "seed": 3}).dfq_config()
    assert cfg == DFQConfig.from_preset("fast", seed=3, recon_iters=100, epochs=2, ft_lr=1e-4)
    assert (cfg.reconstruction.iters, cfg.finetune.epochs, cfg.finetune.lr) == (100, 2, 1e-4)
