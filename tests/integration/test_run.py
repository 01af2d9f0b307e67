"""The Run handle: each file of a run read once per command, report.json written once, at the end; a model
without weights exported as one network; typed records that round-trip."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import maskaq_deploy.calib.checkpoint as checkpoint
import maskaq_deploy.run as run_mod
from maskaq_deploy import pipeline
from maskaq_deploy.cli import cli
from maskaq_deploy.errors import ProvenanceError
from maskaq_deploy.records import Manifest, ProgressEvent, Report
from maskaq_deploy.run import Run
from maskaq_deploy.runtimes import BackendError, get_backend
from maskaq_deploy.sensitivity import quantized_layers
from tests.conftest import TINY_VIT


@pytest.fixture
def counted(monkeypatch):
    """Counts of checkpoint tensor reads (by file name), atomic writes (by file name) and FP model builds (by
    calibration and by a Run's reload alike)."""
    counts = Counter()
    load_file, atomic_path, load_model = checkpoint.load_file, checkpoint.atomic_path, run_mod.load_model
    assert pipeline.load_model is load_model  # the one loader, imported by name into both modules

    def counting_load_file(path, *a, **kw):
        counts["read " + Path(path).name] += 1
        return load_file(path, *a, **kw)

    def counting_atomic_path(path):
        counts["write " + Path(path).name] += 1
        return atomic_path(path)

    def counting_load_model(cfg):
        counts["fp model"] += 1
        return load_model(cfg)

    monkeypatch.setattr(checkpoint, "load_file", counting_load_file)
    monkeypatch.setattr(checkpoint, "atomic_path", counting_atomic_path)
    monkeypatch.setattr(run_mod, "load_model", counting_load_model)
    monkeypatch.setattr(pipeline, "load_model", counting_load_model)
    return counts


def test_bundle_only_build_reads_the_checkpoint_once_and_writes_the_report_once(tmp_path, counted):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["build", "--recipe", "w8a8", "--target", "tensorrt", "--bundle-only", "--out",
                                 str(out), "--method", "real", "--num-images", "16", "--limit", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    assert counted["read model.safetensors"] == 1 and counted["read quant.safetensors"] == 1
    # loaded once: calibration's teacher, then model.onnx and the FP reference (no reload from the manifest)
    assert counted["fp model"] == 1
    assert counted["write report.json"] == 1
    report = json.loads((out / "report.json").read_text())
    assert set(report["runtimes"]) == {"torch", "onnxruntime"} and report["target"] == "tensorrt"
    assert (out / "bundle" / "manifest.json").is_file() and (out / "report.html").is_file()
    # the manifest records the config that ran: at w8a8 the short preset's TV weight is w_tv_8bit's
    dfq = json.loads((out / "manifest.json").read_text())["dfq_config"]
    assert dfq["synthesis"]["w_tv"] == dfq["synthesis"]["w_tv_8bit"] == 2.5e-5 and dfq["reconstruction"]["iters"] == 0


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A tiny timm ViT without --checkpoint or --pretrained: random weights drawn under calibrate's seed."""
    d = tmp_path_factory.mktemp("random")
    rng = np.random.default_rng(0)
    np.savez_compressed(d / "val.npz", images=rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8),
                        labels=rng.integers(0, 10, 24))
    r = CliRunner().invoke(cli, ["calibrate", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                                 json.dumps(TINY_VIT), "--method", "real", "--calib-data", str(d / "val.npz"),
                                 "--num-images", "16", "--seed", "7", "--out", str(d / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    return d


def _float_initializers(path: Path) -> dict:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and t.dims and np.prod(t.dims) >= 64}


def test_a_model_without_weights_exports_the_same_network_twice(random_run):
    """model.onnx (rebuilt FP model) and model.qdq.onnx (the checkpoint) hold the same weights: the FP model
    is redrawn under the manifest's seed. Independent draws would differ by ~1.4x their norm."""
    r = CliRunner().invoke(cli, ["export", str(random_run / "run"), "--for", "onnxruntime"])
    assert r.exit_code == 0, r.output
    fp = _float_initializers(random_run / "run" / "model.onnx")
    qdq = _float_initializers(random_run / "run" / "model.qdq.onnx")
    by_shape = {}
    for name, a in fp.items():
        by_shape.setdefault(a.shape, []).append(a)
    # pos_embed (1, 17, 64), cls_token and the other float tensors both graphs keep (1-D float tensors of the
    # QDQ graph are also the quantizers' scales): each QDQ one has its twin
    shared = [a for a in qdq.values() if a.ndim >= 2 and a.shape in by_shape]
    assert any(a.shape == (1, 17, 64) for a in shared)
    for a in shared:
        assert any(np.array_equal(a, b) for b in by_shape[a.shape]), a.shape
    # and the torch side: the FP model's weights are the checkpoint's (method real does not fine-tune)
    run = Run(random_run / "run")
    fp_state = run.fp_model.model.state_dict()
    for key, value in run.quantized.state_dict().items():
        if key in fp_state and "quantizer" not in key:
            assert (fp_state[key] == value).all(), key


def test_verify_fails_halfway_and_leaves_the_previous_report(random_run, monkeypatch):
    run_dir, val = random_run / "run", str(random_run / "val.npz")
    first = pipeline.verify(run_dir, val, sensitivity_images=0)
    before = (run_dir / "report.json").read_bytes()
    assert json.loads(before) == first.report.to_dict()

    def broken(*a, **kw):
        raise RuntimeError("the sensitivity stage failed")

    monkeypatch.setattr(pipeline, "sensitivity", broken)
    with pytest.raises(RuntimeError, match="sensitivity stage failed"):
        pipeline.verify(run_dir, val, sensitivity_images=8)
    assert (run_dir / "report.json").read_bytes() == before


def test_the_stages_share_one_run(random_run, counted):
    run = Run(random_run / "run", val_data=str(random_run / "val.npz"))
    torch_result = pipeline.evaluate(run, "torch")
    ort_result = pipeline.evaluate(run, "onnxruntime")  # RUN/model.qdq.onnx from the test above, or exported
    section = pipeline.sensitivity(run, 8)
    assert counted["read model.safetensors"] == 1 and counted["fp model"] == 1
    assert torch_result.agreement_vs_torch is None and ort_result.agreement_vs_torch >= 0.95
    assert ort_result.sqnr_db_vs_torch >= 30.0 and ort_result.artifact == "model.qdq.onnx"
    assert section["images"] == 8 and len(section["rows"]) == len(quantized_layers(run.quantized))


def test_records_round_trip_and_keep_unknown_keys(random_run):
    raw = json.loads((random_run / "run" / "manifest.json").read_text())
    m = Manifest.from_dict({**raw, "from_a_newer_tool": 1})
    assert m.seed == 7 and m.recipe_name == "w8a8" and m.extra == {"from_a_newer_tool": 1}
    assert Manifest.from_dict(m.to_dict()) == m and m.to_dict()["from_a_newer_tool"] == 1
    pipeline.verify(random_run / "run", str(random_run / "val.npz"), sensitivity_images=4)
    report = json.loads((random_run / "run" / "report.json").read_text())
    r = Report.from_dict(report)
    assert r.to_dict() == report and r.runtimes["torch"].top1 == report["runtimes"]["torch"]["top1"]
    v1 = {"model": "m", "recipe": "w8a8", "fp_top1": 90.0, "num_eval_images": 10, "schema_version": 1,
          "runtimes": {"torch": {"top1": 89.0, "agreement_vs_fp": 0.9}}}
    assert Report.from_dict(v1).to_dict()["runtimes"] == v1["runtimes"]
    e = ProgressEvent.from_dict({"stage": "synthesis", "step": 3, "total": 10, "losses": {"ce": 1.5}})
    assert e.key == "synthesis" and ProgressEvent.from_dict(e.to_dict()) == e


def test_an_unknown_backend_is_one_line_listing_the_known_ones():
    with pytest.raises(BackendError) as e:
        get_backend("openvino")
    assert str(e.value) == "unknown runtime 'openvino'; choose one of torch, onnxruntime, tensorrt"


def test_a_run_directory_with_a_sparser_manifest_still_verifies(random_run, tmp_path):
    """Manifests keep schema version 1: a run written before the typed records (or by an older tool that did
    not record the seed, timings or versions) is read with defaults for what it lacks."""
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(random_run / "run", run_dir)
    (run_dir / "report.json").unlink(missing_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("seed", "seconds", "calibration", "dfq_config", "versions", "inputs", "kept_fp_modules"):
        manifest.pop(key)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(cli, ["verify", str(run_dir), "--val-data", str(random_run / "val.npz")])
    assert r.exit_code == 0, r.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_eval_images"] == 24 and report["schema_version"] == 2


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A run calibrated from a --checkpoint file outside the run folder (method real, a tiny timm ViT)."""
    import timm
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", **TINY_VIT).state_dict(), str(d / "ck.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(d / "val.npz", images=rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8),
             labels=rng.integers(0, 10, 24))
    r = CliRunner().invoke(cli, ["calibrate", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                                 json.dumps(TINY_VIT), "--checkpoint", str(d / "ck.safetensors"), "--method", "real",
                                 "--calib-data", str(d / "val.npz"), "--num-images", "16", "--out", str(d / "run"),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    return d


def _moved(checkpoint_run, tmp_path) -> Path:
    """A copy of the run folder elsewhere, on a 'machine' where the checkpoint is no longer at its old path."""
    import shutil

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(checkpoint_run / "run", moved)
    return moved


def _verify(run_dir, val) -> object:
    return CliRunner().invoke(cli, ["verify", str(run_dir), "--val-data", str(val)])


def test_the_manifest_identifies_the_checkpoint_by_name_size_and_hash(checkpoint_run):
    ck = checkpoint_run / "ck.safetensors"
    record = json.loads((checkpoint_run / "run" / "manifest.json").read_text())["inputs"]["checkpoint"]
    assert record == {"name": "ck.safetensors", "size": ck.stat().st_size, "sha256": checkpoint.file_sha256(ck),
                      "path": "../ck.safetensors"}  # outside the run folder: relative to it all the same


def test_a_run_folder_moved_with_its_checkpoint_verifies_from_any_directory(checkpoint_run, tmp_path, monkeypatch):
    import shutil

    new_home = tmp_path / "moved"
    shutil.copytree(checkpoint_run / "run", new_home / "run")
    shutil.copy(checkpoint_run / "ck.safetensors", new_home / "ck.safetensors")  # same layout, another place
    (checkpoint_run / "ck.safetensors").rename(tmp_path / "away.safetensors")  # not at the path it was named by
    monkeypatch.chdir(tmp_path)
    try:
        r = _verify(new_home / "run", checkpoint_run / "val.npz")
    finally:
        (tmp_path / "away.safetensors").rename(checkpoint_run / "ck.safetensors")
    assert r.exit_code == 0, r.output


def test_a_moved_run_folder_finds_its_checkpoint_again(checkpoint_run, tmp_path, monkeypatch):
    import shutil

    moved, val = _moved(checkpoint_run, tmp_path), checkpoint_run / "val.npz"
    hidden = tmp_path / "weights" / "renamed.safetensors"
    hidden.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    shutil.move(checkpoint_run / "ck.safetensors", hidden)  # gone from the path the manifest recorded
    try:
        r = _verify(moved, val)
        assert r.exit_code == 2 and "ck.safetensors" in r.stderr and "copy it into the run folder" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        # given again, under another name: found by its hash
        done = pipeline.verify(Run(moved, val_data=str(val), checkpoint=hidden), sensitivity_images=0)
        assert done.report.runtimes["torch"].top1 >= 0
        with pytest.raises(ProvenanceError, match="not the full-precision checkpoint"):
            Run(moved, checkpoint=val).fp_model  # another file given: refused by size and hash
        # copied into the run folder under its name
        shutil.copy(hidden, moved / "ck.safetensors")
        assert _verify(moved, val).exit_code == 0
        (moved / "ck.safetensors").unlink()
        # at the path relative to the run folder that the manifest records
        (moved / "weights").mkdir()
        shutil.copy(hidden, moved / "weights" / "fp.safetensors")
        manifest = json.loads((moved / "manifest.json").read_text())
        manifest["inputs"]["checkpoint"]["path"] = "weights/fp.safetensors"
        (moved / "manifest.json").write_text(json.dumps(manifest))
        assert _verify(moved, val).exit_code == 0
    finally:
        shutil.move(hidden, checkpoint_run / "ck.safetensors")


def test_a_manifest_naming_another_file_never_opens_it(checkpoint_run, tmp_path, monkeypatch):
    """An edited manifest points the checkpoint at a file of someone else's: with the size and hash recorded,
    verify refuses without reading it (size checked first, the hash before any parsing)."""
    import builtins

    import maskaq_deploy.models as models

    moved, val = _moved(checkpoint_run, tmp_path), checkpoint_run / "val.npz"
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model_config"]["checkpoint"] = str(secret)
    manifest["inputs"]["checkpoint"]["path"] = "../../secret.txt"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    opened, real_open, real_read = [], builtins.open, models.read_state_dict

    def spying_open(file, *a, **kw):
        opened.append(Path(os.fspath(file)).resolve() if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *a, **kw)

    def spying_read(path):
        opened.append(Path(path).resolve())
        return real_read(path)

    monkeypatch.setattr(builtins, "open", spying_open)
    monkeypatch.setattr(models, "read_state_dict", spying_read)
    monkeypatch.chdir(tmp_path)
    (checkpoint_run / "ck.safetensors").rename(tmp_path / "away.safetensors")
    try:
        r = _verify(moved, val)
    finally:
        (tmp_path / "away.safetensors").rename(checkpoint_run / "ck.safetensors")
    # the file the edited manifest names exists, so it is refused as not being the calibrated one, unread
    assert r.exit_code == 2 and "changed since this run was calibrated" in r.stderr, r.output
    assert secret.resolve() not in opened


def test_an_old_manifest_with_only_the_checkpoint_path_still_verifies(checkpoint_run, tmp_path):
    moved = _moved(checkpoint_run, tmp_path)
    manifest = json.loads((moved / "manifest.json").read_text())
    del manifest["inputs"]["checkpoint"]  # as written before the record: the resolved path only
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert _verify(moved, checkpoint_run / "val.npz").exit_code == 0
