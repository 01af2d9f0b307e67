"""Fault injection: bad inputs, stale files, full or read-only disks, locked, killed and interrupted commands.

One table (FAULTS). Each row is a command, its exit code, the text its one error line must contain (stderr has
exactly one ``error:`` line, it is the last one, and there is no traceback), and what must still be on disk
afterwards: by default the previous run byte-identical (``run_intact``) and no stage or lock left beside it.
Rows run in this process through click's runner, except those that kill, interrupt or race real processes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from maskaq_deploy import rundir
from maskaq_deploy.cli import cli
from tests.conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT)]
DFQ_SLOW = "[dfq]\nnum_images = 8\nbatch_size = 4\niterations = 30\nlog_every = 5\n"  # a second batch to kill


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Inputs (good and broken) and two finished runs (w8a8 and w4a8, each exported) to copy per row."""
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).state_dict()
    save_file(state, str(d / "ck.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(d / "nan.safetensors"))
    huge = dict(state, **{"patch_embed.proj.weight": state["patch_embed.proj.weight"] * 1e37})
    save_file(huge, str(d / "huge.safetensors"))  # finite weights whose activations overflow
    (d / "text.pth").write_text("these are not weights\n")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 24)
    np.savez(d / "data.npz", images=images, labels=labels)
    nan_images = images.astype(np.float32) / 255
    nan_images[0, 0, 0, :4] = np.nan
    np.savez(d / "nan.npz", images=nan_images, labels=labels)
    np.savez(d / "labels100.npz", images=images, labels=np.where(np.arange(24) < 3, 100, labels))
    np.savez(d / "labels-1.npz", images=images, labels=np.where(np.arange(24) < 2, -1, labels))
    (d / "slow.toml").write_text(DFQ_SLOW)
    for name, recipe in (("good", "w8a8"), ("other", "w4a8")):
        _ok("calibrate", *MODEL, "--checkpoint", d / "ck.safetensors", "--method", "real", "--recipe", recipe,
            "--calib-data", d / "data.npz", "--num-images", 16, "--out", d / name)
        _ok("export", d / name)
    return d


def _ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@dataclass
class Ctx:
    """One row's world: ``d`` the shared inputs, ``tmp`` its own folder, ``run`` a copy of the w8a8 run."""

    d: Path
    tmp: Path
    run: Path
    mp: pytest.MonkeyPatch
    before: dict = field(default_factory=dict)
    procs: list = field(default_factory=list)

    @property
    def new(self) -> Path:  # an --out that does not exist yet
        return self.tmp / "new"

    @property
    def busy(self) -> Path:  # a folder of someone's files
        return self.tmp / "busy"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ what must hold after
def run_unchanged(c: Ctx) -> None:
    assert snapshot(c.run) == c.before, "the previous run changed"


def run_intact(c: Ctx) -> None:
    """The previous run is byte-identical, and nothing is left beside it (stage, replaced copy, lock)."""
    run_unchanged(c)
    no_litter(c, c.run)


def interrupted_keeps_work(c: Ctx) -> None:
    """The previous run is untouched; the stage keeps the finished batches for --resume."""
    run_unchanged(c)
    assert rundir.holds_work(rundir.staging_path(c.run))


def ctrl_c_keeps_work(c: Ctx) -> None:
    interrupted_keeps_work(c)
    assert not rundir.lock_path(c.run).exists()  # released on the way out


def no_litter(c: Ctx, out: Path) -> None:
    for p in (rundir.staging_path(out), rundir.replaced_path(out), rundir.lock_path(out)):
        assert not p.exists(), f"{p.name} left behind"


def nothing_created(c: Ctx) -> None:
    assert not c.new.exists(), "a failed command left its --out behind"
    no_litter(c, c.new)
    run_intact(c)


def busy_intact(c: Ctx) -> None:
    assert snapshot(c.busy) == {"notes.txt": b"mine", "dfq/keep.bin": b"x"}
    run_intact(c)


def busy_intact_stage_kept(c: Ctx) -> None:
    assert snapshot(c.busy) == {"notes.txt": b"mine", "dfq/keep.bin": b"x"}
    assert rundir.holds_work(rundir.staging_path(c.busy))
    run_intact(c)


def run_replaced_and_valid(c: Ctx) -> None:
    manifest = json.loads((c.run / "manifest.json").read_text())
    assert snapshot(c.run) != c.before and manifest["schema_version"] == 1
    no_litter(c, c.run)


# ------------------------------------------------------------------------------------------ setups
def with_busy(c: Ctx) -> None:
    (c.busy / "dfq").mkdir(parents=True)
    (c.busy / "notes.txt").write_text("mine")
    (c.busy / "dfq" / "keep.bin").write_text("x")


def write(name: str, text: str | bytes) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        p = c.tmp / name
        p.mkdir() if text is None else p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def write_folder_with_bad_image(c: Ctx) -> None:
    """An ImageFolder of two good PNGs and one text file named .png."""
    from PIL import Image

    for cls in ("a", "b"):
        (c.tmp / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 36), (10, 200, 30)).save(c.tmp / "val" / cls / "ok.png")
    (c.tmp / "val" / "b" / "broken.png").write_text("not pixels")


def edit_manifest(fn) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.run / "manifest.json"
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
        c.before = snapshot(c.run)
    return setup


def zero_tensor(c: Ctx) -> None:
    t = load_file(str(c.run / "model.safetensors"))
    t["blocks.0.mlp.fc1.weight"] = torch.zeros_like(t["blocks.0.mlp.fc1.weight"])
    save_file(t, str(c.run / "model.safetensors"), metadata={"format": "pt"})
    c.before = snapshot(c.run)


def wrong_shape_without_hashes(c: Ctx) -> None:
    t = load_file(str(c.run / "model.safetensors"))
    t["head.weight"] = torch.zeros(3, 64)
    save_file(t, str(c.run / "model.safetensors"), metadata={"format": "pt"})
    edit_manifest(lambda m: {k: v for k, v in m.items() if k != "files"})(c)  # a run from before the hashes


def replaced_fp_weights(c: Ctx) -> None:
    state = load_file(str(c.d / "ck.safetensors"))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(c.tmp / "ck.safetensors"))  # the FP checkpoint the run names, changed since calibration
    moved = str(c.tmp / "ck.safetensors")
    edit_manifest(lambda m: {**m, "model_config": {**m["model_config"], "checkpoint": moved}})(c)


def other_runs_graph(c: Ctx) -> None:
    shutil.copy(c.d / "other" / "model.qdq.onnx", c.run / "model.qdq.onnx")  # a w4a8 graph in a w8a8 run
    c.before = snapshot(c.run)


def engine_of_other_run(c: Ctx) -> None:
    """A TensorRT engine (its bytes do not matter: it is refused before it is loaded) recorded as built from the
    other run's graph."""
    from maskaq_deploy.provenance import record_engine

    (c.run / "model.engine").write_bytes(b"engine")
    record_engine(c.run / "model.engine", c.d / "other" / "model.qdq.onnx")
    c.before = snapshot(c.run)


def no_input_onnx(c: Ctx) -> None:
    import onnx
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    const = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    onnx.save(helper.make_model(helper.make_graph([const], "g", [], [out])), str(c.tmp / "noinput.onnx"))


def waiting_stage(c: Ctx, run: Path | None = None) -> None:
    """What a killed calibration of ``run`` leaves: its stage, with synthetic batches."""
    stage = rundir.staging_path(run or c.run)
    (stage / "dfq" / "round000").mkdir(parents=True)
    (stage / "dfq" / "run.json").write_text(json.dumps({"fingerprint": {}}))
    (stage / "dfq" / "round000" / "batch00000.safetensors").write_bytes(b"x")


def mount_tmpfs(c: Ctx, size: str, read_only: bool = False) -> Path:
    mnt = c.tmp / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount for a real tmpfs (the injected-ENOSPC row covers a full disk anyway)")
    c.procs.append(("umount", mnt))
    return mnt


def full_tmpfs(c: Ctx) -> None:
    """A 700 KiB disk holding a previous run: the new model (460 KB) does not fit beside it."""
    mnt = mount_tmpfs(c, "700k")
    for name in ("model.safetensors", "quant.safetensors", "manifest.json"):
        (mnt / "run").mkdir(exist_ok=True)
        shutil.copy(c.run / name, mnt / "run" / name)
    c.run = mnt / "run"
    c.before = snapshot(c.run)


def read_only_tmpfs(c: Ctx) -> None:
    mnt = mount_tmpfs(c, "4m")
    shutil.copytree(c.run, mnt / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    c.run = mnt / "run"
    c.before = snapshot(c.run)


def enospc_on_save(c: Ctx) -> None:
    import maskaq_deploy.calib.checkpoint as ck

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    c.mp.setattr(ck, "save_file", full)


def empty_hub_cache(c: Ctx) -> None:
    from huggingface_hub import constants

    c.mp.setattr(constants, "HF_HUB_CACHE", str(c.tmp / "hub"))


def with_no_calibration(c: Ctx) -> None:
    """Calibration must not start (the bad validation set is refused first)."""
    import maskaq_deploy.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the validation data was checked")

    c.mp.setattr(pipeline, "_run_method", never)


def baseline_top1(value: float):
    """A --baseline report.json (in the row's folder) whose torch top-1 is ``value``."""
    def setup(c: Ctx) -> None:
        report = {"schema_version": 2, "model": "vit_tiny_patch16_224", "recipe": "w8a8", "fp_top1": 10.0,
                  "num_eval_images": 24, "val_data": str(c.d / "data.npz"),
                  "runtimes": {"torch": {"top1": value, "agreement_vs_fp": 0.9}}}
        (c.tmp / "old.json").write_text(json.dumps(report))
    return setup


def lock_holder(c: Ctx, kill: bool = False) -> None:
    """Another process holds the run's lock (``kill``: it then dies by SIGKILL, leaving its lock file)."""
    code = ("import sys, time; from maskaq_deploy import rundir\n"
            "with rundir.locked(sys.argv[1], 'maskaq-deploy build --out ' + sys.argv[1]):\n"
            "    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(c.run)], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    c.procs.append(("proc", proc))
    assert proc.stdout.readline().strip() == b"held"
    if kill:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert rundir.lock_path(c.run).exists()  # the dead holder's file is still there: the lock must be stale


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Fault:
    argv: Callable[[Ctx], list]
    code: int
    match: str | None
    setup: Callable | None = None
    after: Callable[[Ctx], None] = run_intact
    how: str = "cli"  # cli | kill | sigint (a subprocess, signalled) | race (a second command while one runs)
    trigger: Callable[[Ctx], Path] | None = None  # the file whose appearance starts the signal / second command
    delay: float = 0.0  # seconds from the trigger to the signal


def calibrate(c: Ctx, out=None, *extra) -> list:
    return ["calibrate", *MODEL, "--checkpoint", c.d / "ck.safetensors", "--method", "real", "--calib-data",
            c.d / "data.npz", "--num-images", 16, "--out", out or c.new, *extra]


def slow_calibrate(c: Ctx, *extra) -> list:
    return ["calibrate", *MODEL, "--checkpoint", c.d / "ck.safetensors", "--method", "maskaq", "--config",
            c.d / "slow.toml", "--quiet", "--force", "--out", c.run, *extra]


def first_batch(c: Ctx) -> Path:
    return rundir.staging_path(c.run) / "dfq" / "round000" / "batch00000.safetensors"


def lock_taken(c: Ctx) -> Path:
    return rundir.lock_path(c.run)


def resume_completes(c: Ctx) -> None:
    interrupted_keeps_work(c)
    r = CliRunner().invoke(cli, [str(a) for a in slow_calibrate(c, "--resume")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((c.run / "manifest.json").read_text())
    assert manifest["method"] == "maskaq" and manifest["calibration"]["resumed"] is True
    no_litter(c, c.run)


def verify_still_works(c: Ctx) -> None:
    """The checkpoint is untouched, every graph present is whole, and the next command is not locked out."""
    import onnx

    def checkpoint(snap):
        return {k: v for k, v in snap.items() if not k.endswith(".onnx") and not k.startswith("report")}

    assert checkpoint(snapshot(c.run)) == checkpoint(c.before)
    for p in c.run.glob("*.onnx"):
        onnx.checker.check_model(onnx.load(str(p)))
    _ok("verify", c.run, "--val-data", c.d / "data.npz", "--runtime", "onnxruntime")
    no_litter(c, c.run)


def one_run_won(c: Ctx) -> None:
    run_replaced_and_valid(c)
    _ok("verify", c.run, "--val-data", c.d / "data.npz", "--runtime", "onnxruntime")


FAULTS = {
    # 1. the previous run survives every refusal; --force and --resume only ever touch runs
    "force-with-missing-checkpoint": Fault(
        lambda c: ["calibrate", *MODEL, "--method", "real", "--force", "--checkpoint", c.tmp / "nope.safetensors",
                   "--out", c.run], 2, "not found"),
    "force-on-unrelated-files": Fault(lambda c: calibrate(c, c.busy, "--force"), 2, "not a maskaq-deploy run",
                                      with_busy, busy_intact),
    "resume-into-a-non-run": Fault(lambda c: calibrate(c, c.busy, "--resume"), 2, "not a run of maskaq-deploy",
                                   with_busy, busy_intact),
    "force-with-waiting-stage-on-unrelated-files": Fault(lambda c: calibrate(c, c.busy, "--force"), 2,
                                                         "not a maskaq-deploy run",
                                                         lambda c: (with_busy(c), waiting_stage(c, c.busy)),
                                                         busy_intact_stage_kept),
    "swap-cut-between-renames": Fault(lambda c: calibrate(c, c.run), 2, "pass --force",
                                      lambda c: os.rename(c.run, rundir.replaced_path(c.run))),
    "run-without-force": Fault(lambda c: calibrate(c, c.run), 2, "pass --force"),
    "killed-run-waiting-advises-resume": Fault(lambda c: calibrate(c, c.run), 2, "pass --resume",
                                               waiting_stage, run_unchanged),
    "failure-after-force-keeps-run": Fault(
        lambda c: ["calibrate", *MODEL, "--checkpoint", c.d / "huge.safetensors", "--method", "real",
                   "--calib-data", c.d / "data.npz", "--num-images", 16, "--force", "--out", c.run],
        1, "input_quantizer got a NaN or infinite scale"),
    # 2. finite or refused
    "nan-pixels-calib-data": Fault(lambda c: [*calibrate(c)[:-2], "--calib-data", c.d / "nan.npz", "--out", c.new],
                                   2, "4 pixel value(s) are NaN", after=nothing_created),
    "nan-pixels-val-data": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "nan.npz"], 2, "NaN or infinite"),
    "std-nan": Fault(lambda c: calibrate(c, None, "--std", "nan"), 2, "--std", after=nothing_created),
    "mean-inf": Fault(lambda c: calibrate(c, None, "--mean", "inf"), 2, "finite number", after=nothing_created),
    "all-nan-checkpoint": Fault(lambda c: ["calibrate", *MODEL, "--checkpoint", c.d / "nan.safetensors", "--out",
                                           c.new], 2, "NaN or infinite value(s)", after=nothing_created),
    # 3. labels the classifier cannot produce
    "labels-100": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "labels100.npz"], 2,
                        "3 label(s) outside [0, 10)"),
    "labels-negative": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "labels-1.npz"], 2,
                             "2 label(s) outside [0, 10)"),
    "calib-labels-100": Fault(lambda c: [*calibrate(c)[:-2], "--calib-data", c.d / "labels100.npz", "--out",
                                         c.new], 2, "label(s) outside", after=nothing_created),
    "val-data-image-not-an-image": Fault(lambda c: ["verify", c.run, "--val-data", c.tmp / "val"], 2,
                                         "cannot read image", write_folder_with_bad_image),
    # 4. provenance
    "graph-of-another-checkpoint": Fault(lambda c: ["verify", c.run, "--runtime", "onnxruntime", "--val-data",
                                                    c.d / "data.npz"], 2, "maskaq-deploy export", other_runs_graph),
    "artifact-of-another-run": Fault(lambda c: ["verify", c.run, "--runtime", "onnxruntime", "--val-data",
                                                c.d / "data.npz", "--artifact", c.d / "other" / "model.qdq.onnx"],
                                     2, "comes from another checkpoint"),
    "engine-of-another-checkpoint": Fault(lambda c: ["verify", c.run, "--runtime", "tensorrt", "--val-data",
                                                     c.d / "data.npz"], 2, "build_engine.sh", engine_of_other_run),
    "artifact-missing": Fault(lambda c: ["verify", c.run, "--runtime", "onnxruntime", "--artifact",
                                         c.tmp / "nonexist.onnx"], 2, "does not exist"),
    "fp-checkpoint-replaced": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 2,
                                    "changed since this run was calibrated", replaced_fp_weights),
    "zeroed-tensor-verify": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 2,
                                  "model.safetensors is not the file", zero_tensor),
    "zeroed-tensor-export": Fault(lambda c: ["export", c.run], 2, "--force --out", zero_tensor),
    "zeroed-tensor-bench": Fault(lambda c: ["bench", c.run, "--iterations", 1, "--warmup", 0], 2,
                                 "model.safetensors is not the file", zero_tensor),
    # 5. typed config
    "keep-fp-string": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "k.toml"), 2,
                            "keep_fp must be a list of strings", write("k.toml", '[calibrate]\nkeep_fp = "head"\n'),
                            nothing_created),
    "keep-fp-glob-string": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "k.toml"), 2,
                                 "keep_fp must be a list", write("k.toml", '[calibrate]\nkeep_fp = "blocks.*"\n'),
                                 nothing_created),
    "keep-fp-matches-nothing": Fault(lambda c: calibrate(c, None, "--keep-fp", "blocks.11.*"), 2,
                                     "matches no module of the model; close names: blocks.1", after=nothing_created),
    "keep-fp-everything": Fault(lambda c: calibrate(c, None, "--keep-fp", "*"), 2, "leaves no module quantized",
                                after=nothing_created),
    "dfq-preset-disagrees": Fault(lambda c: calibrate(c, None, "--preset", "fast", "--config", c.tmp / "p.toml"), 2,
                                  "disagree", write("p.toml", '[dfq]\npreset = "standard"\n'), nothing_created),
    "dfq-preset-applied": Fault(lambda c: calibrate(c, c.run, "--force", "--config", c.tmp / "p.toml"), 0, None,
                                write("p.toml", '[dfq]\npreset = "standard"\nepochs = 1\nrefresh_every = 0\n'),
                                lambda c: (run_replaced_and_valid(c), _assert_preset(c.run, "standard", 1))),
    # 6. one command per run folder
    "locked-by-another-build": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 2,
                                     "in use by pid", lock_holder, run_unchanged),
    "stale-lock-of-dead-holder": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 0, None,
                                       lambda c: lock_holder(c, kill=True), lambda c: no_litter(c, c.run)),
    "two-builds-race": Fault(lambda c: ["build", *MODEL, "--checkpoint", c.d / "ck.safetensors", "--method", "real",
                                        "--calib-data", c.d / "data.npz", "--num-images", 16, "--quiet", "--force",
                                        "--val-data", c.d / "data.npz", "--out", c.run], 2, "in use by pid",
                             after=one_run_won, how="race", trigger=lock_taken),
    # 7. one line, never a traceback
    "recipe-not-a-table": Fault(lambda c: calibrate(c, None, "--recipe", c.tmp / "r.toml"), 2, "must be a table",
                                write("r.toml", "recipe = 3\n"), nothing_created),
    "recipe-not-utf8": Fault(lambda c: calibrate(c, None, "--recipe", c.tmp / "r.toml"), 2, "not UTF-8",
                             write("r.toml", b"[recipe]\nname = \"\xff\xfe\"\n"), nothing_created),
    "recipe-is-a-folder": Fault(lambda c: calibrate(c, None, "--recipe", c.tmp / "r.toml"), 2, "is a folder",
                                write("r.toml", None), nothing_created),
    "config-model-not-a-table": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "c.toml"), 2,
                                      "model must be a table", write("c.toml", "model = 3\n"), nothing_created),
    "config-dfq-not-a-table": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "c.toml"), 2,
                                    "dfq must be a table", write("c.toml", 'dfq = "fast"\n'), nothing_created),
    "config-device-typed": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "c.toml"), 2,
                                 "device must be a string", write("c.toml", "[calibrate]\ndevice = 3\n"),
                                 nothing_created),
    "config-seed-typed": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "c.toml"), 2,
                               "seed must be an integer", write("c.toml", '[calibrate]\nseed = "x"\n'),
                               nothing_created),
    "config-name-typed": Fault(lambda c: ["calibrate", "--config", c.tmp / "c.toml", "--out", c.new], 2,
                               "name must be a string", write("c.toml", "[model]\nname = 5\n"), nothing_created),
    "seed-2-63": Fault(lambda c: calibrate(c, None, "--seed", 2 ** 63), 2, "--seed", after=nothing_created),
    "device-cudaX": Fault(lambda c: calibrate(c, None, "--device", "cudaX"), 2, "use cpu, cuda or cuda:N",
                          after=nothing_created),
    "verify-batch-0": Fault(lambda c: ["verify", c.run, "--batch-size", 0], 2, "--batch-size"),
    "bench-warmup-negative": Fault(lambda c: ["bench", c.run, "--warmup", -1], 2, "--warmup"),
    "bench-iterations-0": Fault(lambda c: ["bench", c.run, "--iterations", 0], 2, "--iterations"),
    "bench-onnx-without-inputs": Fault(lambda c: ["bench", c.tmp / "noinput.onnx"], 2, "no graph inputs",
                                       no_input_onnx),
    "manifest-is-a-list": Fault(lambda c: ["verify", c.run], 1, "not a manifest object", edit_manifest(lambda m: [m])),
    "manifest-without-recipe": Fault(lambda c: ["verify", c.run], 1, "no valid 'recipe' entry",
                                     edit_manifest(lambda m: {k: v for k, v in m.items() if k != "recipe"})),
    "wrong-shape-tensor": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 1, "does not fit",
                                wrong_shape_without_hashes),
    "out-under-a-file": Fault(lambda c: calibrate(c, c.tmp / "afile" / "run"), 2, "is a file, not a folder",
                              write("afile", "x"), lambda c: run_intact(c)),
    "out-read-only": Fault(lambda c: calibrate(c, c.run, "--force"), 2, "read-only", read_only_tmpfs),
    "verify-read-only": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz"], 2, "read-only",
                              read_only_tmpfs),
    "disk-full-tmpfs": Fault(lambda c: calibrate(c, c.run, "--force"), 1, "no space left on the device",
                             full_tmpfs),
    "disk-full-injected": Fault(lambda c: calibrate(c, c.run, "--force"), 1, "no space left on the device",
                                enospc_on_save),
    "export-to-proc": Fault(lambda c: ["export", c.run, "--out", "/proc/x.onnx"], 2, "/proc"),
    # 8. bounded resources
    "bench-threads-100000": Fault(lambda c: ["bench", c.run, "--threads", 100000], 2, "4x this machine"),
    # 9. exit codes and messages
    "dfq-bad-value": Fault(lambda c: calibrate(c, None, "--config", c.tmp / "c.toml"), 2,
                           "iterations must be a positive integer", write("c.toml", "[dfq]\niterations = 0\n"),
                           nothing_created),
    "seed-negative": Fault(lambda c: calibrate(c, None, "--seed", -1), 2, "--seed", after=nothing_created),
    "export-opset-5": Fault(lambda c: ["export", c.run, "--opset", 5], 2, "use 17 to 22"),
    "calibrate-batch-0": Fault(lambda c: calibrate(c, None, "--batch-size", 0), 2, "--batch-size",
                               after=nothing_created),
    # a baseline that cannot be a report fails the gate closed, before any work (a top-1 of -50 would pass it)
    "baseline-top1-negative": Fault(
        lambda c: ["verify", c.run, "--val-data", c.d / "data.npz", "--baseline", c.tmp / "old.json",
                   "--max-regression", 0.5], 2, "outside [0, 100]", baseline_top1(-50.0)),
    "baseline-top1-over-100": Fault(
        lambda c: ["verify", c.run, "--val-data", c.d / "data.npz", "--baseline", c.tmp / "old.json",
                   "--max-regression", 0.5], 2, "outside [0, 100]", baseline_top1(150.0)),
    "limit-negative": Fault(lambda c: ["verify", c.run, "--limit", -5], 2, "--limit"),
    "pretrained-offline": Fault(lambda c: ["calibrate", *MODEL, "--pretrained", "--out", c.new], 2,
                                "cannot load pretrained weights", empty_hub_cache, nothing_created),
    "build-bad-val-labels-before-work": Fault(
        lambda c: ["build", *MODEL, "--checkpoint", c.d / "ck.safetensors", "--method", "real", "--calib-data",
                   c.d / "data.npz", "--val-data", c.d / "labels100.npz", "--force", "--out", c.run], 2,
        "label(s) outside", with_no_calibration),
    "text-pth": Fault(lambda c: ["calibrate", *MODEL, "--checkpoint", c.d / "text.pth", "--out", c.new], 2,
                      "not a torch or safetensors file", after=nothing_created),
    # killed and interrupted commands
    "kill-9-calibrate": Fault(lambda c: slow_calibrate(c), -9, None, how="kill", trigger=first_batch,
                              after=resume_completes),
    "kill-9-export": Fault(lambda c: ["export", c.run], -9, None, how="kill", trigger=lock_taken, delay=0.5,
                           after=verify_still_works),
    "kill-9-verify": Fault(lambda c: ["verify", c.run, "--val-data", c.d / "data.npz", "--runtime", "onnxruntime"],
                           -9, None, how="kill", trigger=lock_taken, delay=0.5, after=verify_still_works),
    "ctrl-c-calibrate": Fault(lambda c: slow_calibrate(c), 130, "interrupted", how="sigint", trigger=first_batch,
                              after=ctrl_c_keeps_work),
}


def _assert_preset(run: Path, preset: str, epochs: int) -> None:
    dfq = json.loads((run / "manifest.json").read_text())["dfq_config"]
    assert (dfq["preset"], dfq["finetune"]["epochs"]) == (preset, epochs)


def _strict_json(folder: Path) -> None:
    def refuse(name):
        raise AssertionError(f"{name} in a JSON file")

    for p in folder.rglob("*.json"):
        if p.is_file():
            json.loads(p.read_text(), parse_constant=refuse)


def _one_error_line(stderr: str, match: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert match in errors[0], errors[0]


def _subprocess(argv: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Ctrl-C as in a terminal: a shell without job control starts background jobs with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN (no KeyboardInterrupt), so the suite run in the background would never see it
    return subprocess.Popen([sys.executable, "-m", "maskaq_deploy", *[str(a) for a in argv]], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, trigger: Path) -> None:
    deadline = time.monotonic() + 240  # a lock file counts once its holder has written itself into it
    while not (trigger.exists() and trigger.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the command ended before the trigger: {proc.stderr.read()[-2000:]}"


def _signal_at(proc: subprocess.Popen, trigger: Path, delay: float, sig) -> tuple[int, str]:
    _wait_for(proc, trigger)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _race(argv: list, trigger: Path) -> tuple[int, str]:
    """The same command a second time (here) while the first (a subprocess) works: the second is refused, the
    first completes; returns the second's exit code and stderr."""
    first = _subprocess(argv)
    _wait_for(first, trigger)
    r = CliRunner().invoke(cli, [str(a) for a in argv])
    assert f"pid {first.pid}" in r.stderr, r.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    return r.exit_code, r.stderr


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_fault(fault: Fault, base, tmp_path, monkeypatch):
    c = Ctx(base, tmp_path, tmp_path / "run", monkeypatch)
    shutil.copytree(base / "good", c.run)
    c.before = snapshot(c.run)
    try:
        if fault.setup is not None:
            fault.setup(c)
        argv = fault.argv(c)
        if fault.how == "cli":
            r = CliRunner().invoke(cli, [str(a) for a in argv])
            assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
            code, stderr = r.exit_code, r.stderr
        elif fault.how == "race":
            code, stderr = _race(argv, fault.trigger(c))
        else:
            sig = signal.SIGKILL if fault.how == "kill" else signal.SIGINT
            code, stderr = _signal_at(_subprocess(argv), fault.trigger(c), fault.delay, sig)
        assert code == fault.code, stderr[-3000:]
        if fault.match is not None:
            _one_error_line(stderr, fault.match)
        monkeypatch.undo()
        fault.after(c)
        _strict_json(tmp_path)
    finally:
        for kind, what in c.procs:
            if kind == "proc":
                what.kill()
                what.wait()
            else:
                subprocess.run(["umount", "-l", str(what)], capture_output=True)


def test_json_is_never_written_with_nan(tmp_path):
    from maskaq_deploy.calib.checkpoint import atomic_write_json
    from maskaq_deploy.calib.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"runtimes.torch.top1 is nan"):
        atomic_write_json(tmp_path / "r.json", {"runtimes": {"torch": {"top1": float("nan")}}})
    assert not list(tmp_path.iterdir())


def test_non_finite_logits_name_the_layer(tiny_vit):
    from maskaq_deploy.checks import finite_outputs
    from maskaq_deploy.errors import NonFiniteError

    with torch.no_grad():
        tiny_vit.blocks[1].mlp.fc2.weight.fill_(float("inf"))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(NonFiniteError, match=r"first non-finite output: blocks\.1\.mlp\.fc2"):
        finite_outputs(tiny_vit, x, tiny_vit(x), "the quantized model")


def test_an_engine_built_from_the_runs_own_graph_belongs(base, tmp_path):
    from maskaq_deploy.calib.checkpoint import read_manifest
    from maskaq_deploy.provenance import check_artifact, record_engine

    run = tmp_path / "run"
    shutil.copytree(base / "good", run)
    (run / "model.engine").write_bytes(b"engine")
    record_engine(run / "model.engine", run / "model.qdq.onnx")
    check_artifact(run / "model.engine", run, read_manifest(run))  # no error: same checkpoint
