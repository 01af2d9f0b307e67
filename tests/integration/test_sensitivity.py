"""Per-layer sensitivity and the greedy --keep-fp search on a tiny w4a4 checkpoint."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from maskaq_deploy.calib import iter_quantizers, load_quantized_checkpoint
from maskaq_deploy.config import CalibrateConfig
from maskaq_deploy.data import load_image_set
from maskaq_deploy.models import ModelConfig
from maskaq_deploy.pipeline import calibrate
from maskaq_deploy.run import model_logits, top1
from maskaq_deploy.sensitivity import (
    SENSITIVITY_FILE,
    TABLE_COLUMNS,
    analyze,
    compress_patterns,
    layer_sensitivity,
    quantized_layers,
    set_layers_float,
    suggest_keep_fp,
    summary_lines,
    table_rows,
)
from tests.conftest import TINY_VIT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """w4a4 checkpoint of a tiny random ViT (real-image calibration, weights untouched), with validation
    labels = the FP model's predictions, so FP top-1 is 100% and every point of drop is quantization's."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("sens")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    save_file(m.state_dict(), str(d / "ck.safetensors"))
    images = np.random.default_rng(1).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        labels = m((torch.from_numpy(images).float() / 255 - 0.5) / 0.5).argmax(1).numpy()
    np.savez_compressed(d / "val.npz", images=images, labels=labels)
    cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT, checkpoint=str(d / "ck.safetensors"))
    calibrate(cfg, CalibrateConfig(method="real", recipe="w4a4", calib_data=str(d / "val.npz"), num_images=32,
                                   keep_fp=("blocks.1.attn.av_matmul",)), d / "run")
    return d, cfg


def load(d):
    qmodel, manifest = load_quantized_checkpoint(d / "run")
    return qmodel, manifest, load_image_set(str(d / "val.npz"), manifest["model"]["data_config"])


def test_rows_cover_every_quantized_layer_worst_first_and_leave_the_model_as_it_was(run):
    d, _ = run
    qmodel, _, images = load(d)
    x = images.tensor()
    with torch.no_grad():
        before = qmodel(x)
    rows = layer_sensitivity(qmodel, images, limit=32, batch_size=16)
    names = [n for n, _ in quantized_layers(qmodel)]
    assert sorted(r["layer"] for r in rows) == sorted(names)
    assert "blocks.1.attn.av_matmul" not in names and "head" not in names  # kept in float
    assert len(rows) == 11
    sqnr = [r["sqnr_db"] for r in rows]
    assert sqnr == sorted(sqnr) and all(5 < s < 60 for s in sqnr)  # 4-bit: noisy but far from useless
    assert [r["rank"] for r in rows] == list(range(1, 12))
    by_name = {r["layer"]: r for r in rows}
    assert by_name["blocks.0.mlp.fc1"]["bits"] == "w4a4" and by_name["blocks.0.mlp.fc1"]["kind"] == "Linear"
    assert by_name["blocks.0.attn.qk_matmul"]["weight_sqnr_db"] is None
    assert by_name["blocks.0.attn.qk_matmul"]["bits"] == "a4"
    assert all(q.enabled for _, q in iter_quantizers(qmodel))
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_a_damaged_layer_ranks_worst(run):
    d, _ = run
    qmodel, _, images = load(d)
    q = qmodel.get_submodule("blocks.1.mlp.fc1").weight_quantizer
    with torch.no_grad():
        q.scale.mul_(6.0)  # a 6x coarser grid: most weights round to 0 or clip
    rows = layer_sensitivity(qmodel, images, limit=32)
    assert rows[0]["layer"] == "blocks.1.mlp.fc1"
    assert rows[0]["weight_sqnr_db"] < min(r["weight_sqnr_db"] for r in rows[1:] if r["weight_sqnr_db"])


def test_tensor_and_batch_inputs_give_the_same_rows(run):
    d, _ = run
    qmodel, _, images = load(d)
    x = images.tensor()[:16]
    a = layer_sensitivity(qmodel, x, batch_size=8)
    b = layer_sensitivity(qmodel, [(x[:10], None), (x[10:], None)])
    assert [r["layer"] for r in a] == [r["layer"] for r in b]
    assert [r["sqnr_db"] for r in a] == pytest.approx([r["sqnr_db"] for r in b], abs=1e-3)
    with pytest.raises(ValueError):
        layer_sensitivity(qmodel, x, limit=0)


def test_no_search_when_the_budget_is_already_met(run):
    d, _ = run
    s = suggest_keep_fp(d / "run", str(d / "val.npz"), max_drop=100.0)
    assert s.met and s.added == [] and s.steps == []
    assert s.patterns == ["blocks.1.attn.av_matmul"]  # the checkpoint's own keep_fp is kept
    assert s.fp_top1 == 100.0 and s.drop_before == s.drop_after == pytest.approx(100.0 - s.quant_top1_before)


@pytest.mark.slow
def test_greedy_search_meets_the_budget_and_the_figure_is_reproducible(run):
    d, _ = run
    s = suggest_keep_fp(d / "run", str(d / "val.npz"), max_drop=0.0, search_images=32)
    assert s.drop_before > 0 and s.met and s.drop_after <= 0.0
    assert s.num_images == 64 and s.search_images == 32
    assert s.steps[-1]["images"] == 64  # confirmed on the full set
    # the reported drop is what the model gives with exactly those layers in float
    qmodel, _, images = load(d)
    set_layers_float(qmodel, s.added)
    logits, labels = model_logits(qmodel, images, 64)
    assert 100.0 - top1(logits, labels) == pytest.approx(s.drop_after)
    assert s.patterns[0] == "blocks.1.attn.av_matmul"
    json.dumps(s.to_dict())


def test_greedy_keeps_only_the_layers_that_help(run):
    from maskaq_deploy.sensitivity import greedy_float_search

    d, _ = run
    qmodel, _, _ = load(d)
    a, b, c, e = [n for n, _ in quantized_layers(qmodel)][:4]
    scripted = iter([2.0, 2.2, 1.0, 0.4])  # b makes it worse: switched back; e meets the budget
    steps = []
    added, drop = greedy_float_search(qmodel, [a, b, c, e], lambda: next(scripted), 2.5, 0.5, steps, 100)
    assert added == [a, c, e] and drop == 0.4
    assert [s["accepted"] for s in steps] == [True, False, True, True] and steps[-1]["kept"] == 3
    enabled = {n: all(q.enabled for _, q in iter_quantizers(qmodel.get_submodule(n))) for n in (a, b, c, e)}
    assert enabled == {a: False, b: True, c: False, e: False}
    # nothing helps: the second pass keeps the rejected layers in order until the budget is met
    qmodel, _, _ = load(d)
    scripted = iter([3.0, 3.0, 3.0, 0.9, 0.2])
    added, drop = greedy_float_search(qmodel, [a, b, c], lambda: next(scripted), 2.5, 0.5, steps := [], 100)
    assert added == [a, b] and drop == 0.2 and [s["accepted"] for s in steps] == [False] * 3 + [True] * 2


def test_a_rebuild_with_the_suggestion_quantizes_nothing_it_names(run, tmp_path):
    d, cfg = run
    s = suggest_keep_fp(d / "run", str(d / "val.npz"), max_drop=5.0)
    manifest = calibrate(cfg, CalibrateConfig(method="real", recipe="w4a4", calib_data=str(d / "val.npz"),
                                              num_images=32, keep_fp=tuple(s.patterns)), tmp_path / "rebuilt").manifest
    assert set(s.added) <= set(manifest.kept_fp_modules)
    assert manifest.quantized_modules == 11 - len(s.added)


def test_analyze_writes_sensitivity_json(run):
    d, _ = run
    result = analyze(d / "run", str(d / "val.npz"), max_drop=100.0, limit=40)
    on_disk = json.loads((d / "run" / SENSITIVITY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["suggestion"]["num_images"] == 40 and len(on_disk["rows"]) == 11
    assert on_disk["recipe"] == "w4a4"
    lines = summary_lines(result)
    assert "already within the budget" in lines[1]
    assert lines[-1] == "suggested: --keep-fp 'blocks.1.attn.av_matmul'"
    assert [len(r) for r in table_rows(result["rows"])] == [len(TABLE_COLUMNS)] * 11


def test_bad_max_drop_is_a_usage_error(run):
    from maskaq_deploy.errors import UsageError

    d, _ = run
    with pytest.raises(UsageError):
        suggest_keep_fp(d / "run", str(d / "val.npz"), max_drop=-1)


def test_compress_patterns():
    layers = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
              "blocks.1.attn.qkv", "blocks.1.mlp.fc1", "blocks.10.mlp.fc1"]
    # all of blocks.0 -> one pattern; blocks.1 only partly; blocks.10 untouched by 'blocks.1.*'
    got = compress_patterns(["blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                             "blocks.0.mlp.fc1"], layers)
    assert got == ["blocks.0.*", "blocks.1.mlp.fc1"]
    assert compress_patterns(["blocks.0.attn.qkv", "blocks.0.attn.proj"], layers) == ["blocks.0.attn.*"]
    assert compress_patterns([], layers) == []
