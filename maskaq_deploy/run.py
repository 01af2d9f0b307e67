"""The ``Run``: one handle on a run directory (a quantized checkpoint and what the stages wrote beside it).

    run = Run("runs/w8a8", val_data="embedded:test")
    run.manifest        # Manifest, read once
    run.quantized       # the fake-quant model, loaded once from model.safetensors + quant.safetensors
    run.fp_model        # the full-precision model it was made from (LoadedModel), rebuilt once (or handed over
                        # by the calibration that just made the checkpoint)
    run.val_images      # the labelled validation images (ImageSet), loaded once

Each is loaded on first use and kept, so a command that goes through several stages reads every file once.
The stages themselves (calibrate, export, evaluate, sensitivity, gate, render) are functions of a Run in
maskaq_deploy.pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property
from pathlib import Path

import torch

from maskaq_deploy import checks, provenance
from maskaq_deploy.calib.checkpoint import load_quantized_checkpoint, read_manifest
from maskaq_deploy.data import ImageSet, load_image_set
from maskaq_deploy.errors import DataError, MaskAQError, UsageError
from maskaq_deploy.models import EMBEDDED, LoadedModel, ModelConfig, load_model
from maskaq_deploy.records import REPORT_FILE, Manifest

log = logging.getLogger(__name__)


def default_data(model_name: str, part: str, given: str | None, what: str) -> str:
    """``given``, or the embedded model's own ``part`` ("calib" / "test"); other models must be given data."""
    if given:
        return given
    if model_name == EMBEDDED:
        return f"embedded:{part}"
    raise DataError(f"{what} is required for model {model_name} (only the embedded model ships data)")


def model_config_of(manifest: Manifest) -> ModelConfig:
    """The ModelConfig a checkpoint was calibrated from (lists back to tuples)."""
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (manifest.model_config or {}).items()}
    cfg.setdefault("name", manifest.name)
    return ModelConfig(**cfg)


def reload_fp_model(manifest: Manifest, run_dir=None, checkpoint=None) -> LoadedModel:
    """The full-precision model a quantized checkpoint was made from. Without a checkpoint or pretrained
    weights the model is randomly initialized: it is rebuilt under the seed ``calibrate`` built it with, so
    the float graph and the quantized one hold the same weights. The FP checkpoint is looked up by what the
    manifest recorded of it (provenance.find_checkpoint; ``checkpoint``: the caller names it), and checked by
    size and sha256 before it is parsed."""
    cfg = model_config_of(manifest)
    found = provenance.find_checkpoint(manifest.to_dict(), run_dir if run_dir is not None else ".", checkpoint)
    if found is not None:
        cfg = dataclasses.replace(cfg, checkpoint=str(found))
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            if manifest.seed is not None:
                torch.manual_seed(manifest.seed)
            loaded = load_model(cfg)
    except MaskAQError as e:
        raise UsageError(f"cannot reload the full-precision model of this checkpoint: {e}") from None
    provenance.check_fp_weights(manifest.to_dict(), loaded)
    return loaded


@torch.no_grad()
def model_logits(model, images: ImageSet, batch_size: int, device: str = "cpu", what: str = "the model"):
    """(logits, labels or None) of a torch model over an ImageSet; non-finite logits raise NonFiniteError
    naming the first layer that produced a non-finite output."""
    outs, labels = [], []
    for x, y in images.batches(batch_size):
        x = x.to(device)
        outs.append(model(x).float().cpu())
        checks.finite_outputs(model, x, outs[-1], what)
        if y is not None:
            labels.append(y)
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, rounded to 4 decimals (what report.json stores)."""
    return round(100.0 * (logits.argmax(1) == labels).float().mean().item(), 4)


class Run:
    """A run directory; see the module docstring. ``val_data`` (a --val-data spec; None: the embedded test set
    for the embedded model) and ``limit`` (a seeded subset) choose the validation images. ``checkpoint``: the
    full-precision checkpoint, given again (a run folder moved to a machine where it lies elsewhere)."""

    def __init__(self, path, *, val_data: str | None = None, limit: int | None = None, batch_size: int = 256,
                 manifest: Manifest | None = None, fp_model: LoadedModel | None = None, checkpoint=None):
        self.path = Path(path)
        self.checkpoint = checkpoint  # the FP checkpoint, when it is no longer where the manifest says
        self.val_data = val_data
        self.limit = limit
        self.batch_size = batch_size
        self.seconds: dict[str, float] = {}  # what loading and evaluating took, for the report
        self.logits: dict = {}  # runtime name -> logits on val_images, filled by pipeline.evaluate
        if manifest is not None:
            self.__dict__["manifest"] = manifest
        if fp_model is not None:  # the FP model the checkpoint was calibrated from, still in memory
            self.__dict__["fp_model"] = fp_model

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def of(cls, run, *, val_data: str | None = None, limit: int | None = None, **kw) -> Run:
        """``run`` itself when it is a Run (with ``val_data`` / ``limit`` applied when given), else a Run on
        that directory."""
        if not isinstance(run, Run):
            return cls(run, val_data=val_data, limit=limit, **kw)
        run.choose_images(val_data, limit)
        return run

    def choose_images(self, val_data: str | None = None, limit: int | None = None) -> None:
        """Set the validation images (None keeps the current choice); refused once they are loaded."""
        wanted = {k: v for k, v in (("val_data", val_data), ("limit", limit)) if v is not None}
        changed = {k: v for k, v in wanted.items() if getattr(self, k) != v}
        if changed and "val_images" in self.__dict__:
            raise UsageError(f"{self!r} has loaded its validation images already; give {', '.join(changed)} "
                             "when making the Run")
        for key, value in changed.items():
            setattr(self, key, value)
        self.__dict__.pop("val_spec", None)

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    def _timed(self, key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - t0, 3)
        return out

    @cached_property
    def manifest(self) -> Manifest:
        return Manifest.from_dict(read_manifest(self.path))

    @cached_property
    def quantized(self) -> torch.nn.Module:
        model, manifest = self._timed("verify_load", lambda: load_quantized_checkpoint(self.path))
        provenance.check_checkpoint(self.path, manifest)  # the tensor files are the ones the manifest recorded
        self.__dict__.setdefault("manifest", Manifest.from_dict(manifest))
        return model

    @cached_property
    def fp_model(self) -> LoadedModel:
        return self._timed("load_fp", lambda: reload_fp_model(self.manifest, self.path, self.checkpoint))

    @property
    def model_config(self) -> ModelConfig:
        return model_config_of(self.manifest)

    @cached_property
    def val_spec(self) -> str:
        return default_data(self.model_config.name, "test", self.val_data, "`val_data`")

    @cached_property
    def val_images(self) -> ImageSet:
        images = self._timed("verify_load", lambda: load_image_set(self.val_spec, self.manifest.data_config,
                                                                   "`val_data`").subset(self.limit))
        if images.labels is None or len(images) == 0:
            raise DataError(f"`val_data` {self.val_spec} holds no labelled images")
        images.check_labels(checks.num_classes(self.quantized), "`val_data`")
        return images

    @cached_property
    def fp_logits(self) -> torch.Tensor:
        """The full-precision model's logits on ``val_images`` (the reference every runtime is compared to)."""
        return self._timed("eval_fp", lambda: model_logits(self.fp_model.model, self.val_images,
                                                           self.batch_size, what="the full-precision model")[0])

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.val_images.labels).long()

    def listing(self) -> list[str]:
        """The visible entries of the run directory, folders with a trailing slash."""
        return sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir()
                      if not p.name.startswith("."))

