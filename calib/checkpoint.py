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
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maskaq_deploy.calib.errors import CheckpointError
from maskaq_deploy.calib.quantize import attach_quantizers, iter_quantizers
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer
from maskaq_deploy.calib.recipes import Recipe

SCHEMA_VERSION = 1
MODEL_FILE, QUANT_FILE, MANIFEST_FILE = "model.safetensors", "quant.safetensors", "manifest.json"


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
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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
    _atomic_save_safetensors(weights, run_dir / MODEL_FILE, {"format": "pt"})
    _atomic_save_safetensors(quant, run_dir / QUANT_FILE, {"quantizers": json.dumps(specs)})
    full = {"schema_version": SCHEMA_VERSION, **manifest}
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
                              "interrupted write; recalibrate into it with --force")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); recalibrate with --force") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version {version!r}; this tool reads {SCHEMA_VERSION}")
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
    model = build_float_model(manifest["model"])
    attach_quantizers(model, recipe, keep_fp=manifest.get("keep_fp", ()))
    try:
        weights = load_file(run_dir / MODEL_FILE, device=map_location)
        quant = load_file(run_dir / QUANT_FILE, device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the tensors of {run_dir}: {e}; recalibrate with --force") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _is_quantizer_key(k)]
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / MODEL_FILE} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, q in iter_quantizers(model):
        key = f"{name}.scale"
        if key not in quant:
            raise CheckpointError(f"{run_dir / QUANT_FILE} has no entry for quantizer {name}")
        with torch.no_grad():
            q.scale = nn.Parameter(quant[key].clone().reshape(quant[key].shape))
            if isinstance(q, ActQuantizer):
                q.zero_point.copy_(quant[f"{name}.zero_point"])
                q.initialized.copy_(quant[f"{name}.initialized"])
    model.eval()
    return model, manifest
