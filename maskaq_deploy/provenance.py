"""Do the files of a run belong together? The quantized checkpoint against the sha256 its manifest recorded,
the full-precision weights against the hash calibration saw, an exported graph against the checkpoint it was
exported from (its ``maskaq.checkpoint`` metadata), a TensorRT engine against the record written beside it when
it was built (``model.engine.provenance.json``: the metadata of the graph it was built from).

A mismatch is a ProvenanceError: one line naming the stale file and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import stat
from pathlib import Path

from maskaq_deploy.calib.checkpoint import (MANIFEST_FILE, atomic_write_json, checkpoint_files, file_sha256,
                                            read_manifest)
from maskaq_deploy import layout
from maskaq_deploy.errors import ProvenanceError, UsageError

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "maskaq.checkpoint"  # ONNX metadata: digest of the checkpoint files the graph was exported from


def recalibrate_command(run_dir, manifest: dict) -> str:
    """The calibrate command that rebuilds ``run_dir`` from the settings its manifest recorded."""
    mc = manifest.get("model_config") or {}
    cfg = manifest.get("config") or {}
    args = ["maskaq-deploy", "calibrate", "--model", str(mc.get("name", "embedded"))]
    if mc.get("kwargs"):
        args += ["--model-kwargs", _json(mc["kwargs"])]
    if mc.get("checkpoint"):
        args += ["--checkpoint", str(mc["checkpoint"])]
    args += ["--method", str(manifest.get("method", "maskaq")), "--recipe", str(cfg.get("recipe", "w8a8")),
             "--preset", str(cfg.get("preset", "fast")), "--seed", str(manifest.get("seed", 0))]
    for pattern in manifest.get("keep_fp") or []:
        args += ["--keep-fp", str(pattern)]
    return shlex.join([*args, "--force", "--out", str(run_dir)])


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def checkpoint_digest(run_dir, manifest: dict) -> str:
    """One digest of the checkpoint's tensor files: the hashes the manifest recorded, else the files' own."""
    recorded = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    h = hashlib.sha256()
    for name in checkpoint_files():
        sha = recorded.get(name) or file_sha256(Path(run_dir) / name)
        h.update(f"{name}:{sha}\n".encode())
    return h.hexdigest()


def check_checkpoint(run_dir, manifest: dict) -> None:
    """The tensor files of ``run_dir`` are the ones its manifest recorded (runs written before the manifest kept
    hashes are not checked)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return
    run_dir = Path(run_dir)
    for name, sha in recorded.items():
        path = run_dir / name
        if not path.is_file() or file_sha256(path) != sha:
            raise ProvenanceError(f"{path} is not the file {run_dir / MANIFEST_FILE} recorded (changed after "
                                  f"calibration); rebuild the run: {recalibrate_command(run_dir, manifest)}")


def check_fp_weights(manifest: dict, loaded) -> None:
    """The full-precision weights reloaded now hash to what calibration used."""
    recorded = (manifest.get("inputs") or {}).get("weights_sha256")
    if recorded and loaded.weights_sha256 and recorded != loaded.weights_sha256:
        where = (manifest.get("model_config") or {}).get("checkpoint") or "the embedded model's weights"
        raise ProvenanceError(f"full-precision weights {where} changed since this run was calibrated (sha256 "
                              f"differs from the manifest's); restore them, or recalibrate: "
                              f"{recalibrate_command('RUN', manifest)}")


def checkpoint_record(checkpoint, weights_sha256: str | None, run_dir) -> dict | None:
    """The manifest's ``inputs.checkpoint``: what identifies the FP checkpoint wherever it lies (its file name,
    size and sha256), and its path relative to ``run_dir`` (``../models/deit.pth`` when it lies outside: a run
    folder moved together with its checkpoint still finds it). None without a checkpoint."""
    if not checkpoint:
        return None
    path = Path(os.path.abspath(checkpoint))
    try:
        relative = Path(os.path.relpath(path, os.path.abspath(run_dir))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists; name, size and hash still identify it
        relative = None
    return {"name": path.name, "size": path.stat().st_size, "sha256": weights_sha256 or file_sha256(path),
            "path": relative}


def find_checkpoint(manifest: dict, run_dir, given=None) -> Path | None:
    """The FP checkpoint a run was calibrated from, on this machine: ``given`` (the caller names it again), else
    its path relative to the run folder, its name in the run folder or beside it, or the path as the user named
    it at calibration (relative to the working directory). A candidate is read only when its size is the
    recorded one, and used only when its sha256 is: a manifest edited to name another file never makes this
    open it. None: the run has no checkpoint.
    Manifests written before the record (only the path) give that path, unchecked until it is loaded."""
    recorded_path = (manifest.get("model_config") or {}).get("checkpoint")
    record = (manifest.get("inputs") or {}).get("checkpoint")
    if not isinstance(record, dict) or not {"name", "size", "sha256"} <= set(record):
        return Path(given) if given else (Path(recorded_path) if recorded_path else None)
    run_dir = Path(run_dir)
    if given:
        candidates = [Path(given)]
    else:
        candidates = [run_dir / record["path"] if record.get("path") else None,
                      run_dir / record["name"], run_dir.parent / record["name"],
                      Path(recorded_path) if recorded_path else None]
    for path in dict.fromkeys(c for c in candidates if c is not None):
        if _is_recorded_file(path, record):
            return path
    what = f"{record['name']} ({record['size']} bytes, sha256 {str(record['sha256'])[:12]}...)"
    if given:
        raise ProvenanceError(f"checkpoint {given} is not the full-precision checkpoint this run was calibrated "
                              f"from, {what}; give that file")
    present = [c for c in candidates if c is not None and c.is_file()]
    if present:  # the file is where it was, but it is not the one calibration used
        raise ProvenanceError(f"full-precision weights {present[0]} changed since this run was calibrated (expected "
                              f"{what}); restore them, or recalibrate: {recalibrate_command('RUN', manifest)}")
    raise UsageError(f"the full-precision checkpoint of this run, {what}, is not at {recorded_path} nor in or "
                     f"beside {run_dir}; copy it into the run folder (or beside it)")


def _is_recorded_file(path: Path, record: dict) -> bool:
    try:
        st = os.stat(path)  # size first: a file of another size is never opened
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != record["size"]:
        return False
    try:
        return file_sha256(path) == record["sha256"]
    except OSError:
        return False


def artifact_metadata(run_dir, manifest: dict) -> dict:
    """Metadata an exported graph carries so that verify and bench can tell which checkpoint it came from."""
    return {CHECKPOINT_KEY: checkpoint_digest(run_dir, manifest)}


def check_artifact(path, run_dir, manifest: dict) -> None:
    """``path`` (an ONNX graph) was exported from the checkpoint in ``run_dir``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"`artifact` {path} does not exist; give an exported .onnx or .engine, or leave it out "
                         "to use the run's own")
    meta = onnx_metadata(path) if path.suffix == ".onnx" else _read_record(path)
    if path.suffix != ".onnx" and not meta:  # e.g. built on the device by the bundle's trtexec script
        log.warning("%s has no record of the graph it was built from; assuming it belongs to %s", path, run_dir)
        return
    want = checkpoint_digest(run_dir, manifest)
    if meta.get(CHECKPOINT_KEY) != want:
        why = ("carries no record of the checkpoint it came from" if CHECKPOINT_KEY not in meta
               else "comes from another checkpoint")
        fix = (shlex.join(["maskaq-deploy", "export", str(run_dir)]
                          + ([] if path == Path(run_dir) / path.name else ["--out", str(path)]))
               if path.suffix == ".onnx" else f"rebuild it with {Path(run_dir) / 'bundle' / 'build_engine.sh'}")
        raise ProvenanceError(f"{path} does not belong to {run_dir}: it {why} (graph recipe "
                              f"{meta.get('maskaq.recipe', '?')}, run recipe {manifest['recipe']['name']}); "
                              f"re-export it: {fix}")


def engine_record_path(engine) -> Path:
    """Where an engine's provenance is kept: a TensorRT engine holds no metadata of ours."""
    return layout.engine_record(engine)


def record_engine(engine, qdq_path) -> None:
    """Note beside ``engine`` which checkpoint the graph it was built from came from."""
    meta = onnx_metadata(qdq_path)
    atomic_write_json(engine_record_path(engine), {k: v for k, v in meta.items() if k.startswith("maskaq.")})


def _read_record(engine: Path) -> dict:
    try:
        record = json.loads(engine_record_path(engine).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def onnx_metadata(path) -> dict:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"{path} is not an ONNX file ({type(e).__name__}); give an exported .onnx") from None
    return {p.key: p.value for p in proto.metadata_props}


def belongs(path, run_dir) -> bool:
    """Whether the ONNX graph ``path`` was exported from the checkpoint ``run_dir`` holds now."""
    try:
        check_artifact(path, run_dir, read_manifest(run_dir))
    except ProvenanceError:
        return False
    return True

