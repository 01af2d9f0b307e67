"""The quantized checkpoint: the artifact every stage after calibration starts from.

    RUN/model.safetensors   the (fine-tuned) model weights, timm state-dict names
    RUN/quant.safetensors   every quantizer's scale / zero point; bits, axis, block size in the metadata
    RUN/manifest.json       schema version, timm name and kwargs, data config, recipe, method, seed, input
                            hashes, library versions, measured figures

No pickle anywhere. Files are written to temporary names and renamed; manifest.json goes last, so a directory
without it is an interrupted write and is refused on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maskaq_deploy.calib.errors import CheckpointError, QuantError
from maskaq_deploy.calib.quantize import attach_quantizers, iter_quantizers
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer
from maskaq_deploy.calib.recipes import Recipe

SCHEMA_VERSION = 1
MODEL_FILE, QUANT_FILE, MANIFEST_FILE = "model.safetensors", "quant.safetensors", "manifest.json"
MANIFEST_KEYS = (("model", dict), ("recipe", dict))  # what every reader relies on


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` (readers never see a
    half-written file), on any error it is removed. The file gets the permissions a plain ``open`` would
    give (0666 minus the umask), not ``mkstemp``'s private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON; a NaN or infinity in it (not valid JSON) raises CheckpointError naming the key."""
    bad = _non_finite_key(obj)
    if bad is not None:
        raise CheckpointError(f"refusing to write {path}: {bad[0]} is {bad[1]}, which JSON cannot hold; a stage "
                              "produced a non-finite figure, rerun it")
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def _non_finite_key(obj, where: str = "the top level"):
    """(key path, value) of the first NaN/inf float in a JSON-like ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_key(v, f"{where}.{k}" if where != "the top level" else str(k))
        if found is not None:
            return found
    return None


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files() -> tuple[str, str]:
    """The tensor files of a quantized checkpoint, whose sha256 the manifest records under ``files``."""
    return MODEL_FILE, QUANT_FILE


def check_finite_quantizers(model: nn.Module) -> None:
    """Refuse to keep a model whose weights or quantizer scales are NaN/inf (a stage failed), naming the layer."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise QuantError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite value(s) after "
                             "calibration; check the calibration images, or keep that layer in float with `keep_fp`")


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a .safetensors file atomically. safetensors reports a failed write (a full disk) as a
    SafetensorError with the OS error inside; it is raised as that OSError, naming ``path``."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _is_quantizer_key(key: str) -> bool:
    return "_quantizer." in key


def quantizer_spec(q) -> dict:
    if isinstance(q, WeightQuantizer):
        return {"kind": "weight", "bits": q.bits, "symmetric": True, "axis": 0, "granularity": q.granularity,
                "block_size": q.block_size, "observer": q.observer, "enabled": q.enabled}
    return {"kind": "activation", "bits": q.bits, "symmetric": q.symmetric, "axis": None, "block_size": 0,
            "observer": q.observer_name, "enabled": q.enabled}


def save_quantized_checkpoint(run_dir, model: nn.Module, manifest: dict) -> Path:
    """Write the three files of a quantized checkpoint into ``run_dir`` (created if needed).

    ``manifest`` must hold at least ``model`` ({"timm_name", "kwargs", "data_config", ...}) and ``recipe``
    (a Recipe dict); ``schema_version`` is added.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for key in ("model", "recipe"):
        if key not in manifest:
            raise ValueError(f"manifest needs a {key!r} entry")
    check_finite_quantizers(model)
    state = model.state_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items() if not _is_quantizer_key(k)}
    quant, specs = {}, {}
    for name, q in iter_quantizers(model):
        specs[name] = quantizer_spec(q)
        quant[f"{name}.scale"] = q.scale.detach().contiguous().cpu().float().reshape(q.scale.shape)
        if isinstance(q, ActQuantizer):
            quant[f"{name}.zero_point"] = q.zero_point.detach().cpu().float()
            quant[f"{name}.initialized"] = q.initialized.detach().cpu()
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the old manifest must not vouch for new files
    atomic_save_safetensors(weights, run_dir / MODEL_FILE, {"format": "pt"})
    atomic_save_safetensors(quant, run_dir / QUANT_FILE, {"quantizers": json.dumps(specs)})
    full = {"schema_version": SCHEMA_VERSION, **manifest,
            "files": {name: file_sha256(run_dir / name) for name in checkpoint_files()}}
    atomic_write_json(run_dir / MANIFEST_FILE, full)
    return run_dir


def read_manifest(run_dir) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"quantized checkpoint directory {run_dir} does not exist; "
                              "run 'maskaq-deploy calibrate --out DIR' first")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {MANIFEST_FILE}: not a quantized checkpoint, or an "
                              "interrupted write; recalibrate into it with `force`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0][:100]}); recalibrate with "
                              "`force`") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object; recalibrate "
                              "with `force`")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version {version!r}; this tool reads {SCHEMA_VERSION}")
    for key, kind in MANIFEST_KEYS:
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path} has no valid {key!r} entry (a {kind.__name__} is expected); recalibrate "
                                  "with `force`")
    model = manifest["model"]
    if not isinstance(model.get("timm_name"), str) or not isinstance(model.get("kwargs", {}), dict):
        raise CheckpointError(f"{path}: its 'model' entry lacks a timm_name or has malformed kwargs; recalibrate "
                              "with `force`")
    return manifest


def build_float_model(model_entry: dict) -> nn.Module:
    """A fresh (randomly initialized) timm model from a manifest's ``model`` entry."""
    import timm

    return timm.create_model(model_entry["timm_name"], pretrained=False, **model_entry.get("kwargs", {}))


def load_quantized_checkpoint(run_dir, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the quantized model of ``run_dir``; its outputs are bit-identical to the saved model's."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = Recipe.from_dict(manifest["recipe"])
    try:
        model = build_float_model(manifest["model"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / MANIFEST_FILE} names a model that cannot be built "
                              f"({str(e).splitlines()[0][:120]}); recalibrate with `force`") from None
    attach_quantizers(model, recipe, keep_fp=manifest.get("keep_fp", ()))
    try:
        weights = load_file(run_dir / MODEL_FILE, device=map_location)
        quant = load_file(run_dir / QUANT_FILE, device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the tensors of {run_dir}: {e}; recalibrate with `force`") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{run_dir / MODEL_FILE} does not fit the model "
                              f"({str(e).splitlines()[-1].strip()[:160]}); recalibrate with `force`") from None
    missing = [k for k in missing if not _is_quantizer_key(k)]
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / MODEL_FILE} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, q in iter_quantizers(model):
        key = f"{name}.scale"
        if key not in quant:
            raise CheckpointError(f"{run_dir / QUANT_FILE} has no entry for quantizer {name}")
        try:
            with torch.no_grad():
                q.scale = nn.Parameter(quant[key].clone().reshape(quant[key].shape))
                if isinstance(q, ActQuantizer):
                    q.zero_point.copy_(quant[f"{name}.zero_point"])
                    q.initialized.copy_(quant[f"{name}.initialized"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{run_dir / QUANT_FILE}: the entry of quantizer {name} is missing or "
                                  f"malformed ({str(e).splitlines()[0][:100]}); recalibrate with `force`") from None
    model.eval()
    return model, manifest
