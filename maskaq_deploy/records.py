"""The typed records a run reads and writes: its manifest, its report (with one result per runtime) and the
progress events of a calibration. Each is a dataclass that round-trips through JSON:
``Record.from_dict(r.to_dict()) == r``.

Keys this version does not know are kept in ``extra`` and written back, so a file from a newer minor change
survives a read-modify-write. Optional keys that are None are left out of ``to_dict`` (a report of the torch
runtime has no ``*_vs_torch`` keys), as today's files have them. The schema versions and their rules live
with the files: ``calib.checkpoint.SCHEMA_VERSION`` (manifest.json) and ``REPORT_SCHEMA_VERSION`` below
(report.json, see docs/report_schema.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


from maskaq_deploy.layout import REPORT_FILE  # noqa: F401  (re-exported: where the record is written)
# 1: the undocumented first format. 2: documented; adds val_fingerprint, created, command, gate, sensitivity,
# latency (all additive: a version-1 report is still a valid baseline). Adding a key keeps the version (readers
# ignore keys they do not know); renaming or removing a key, or changing what one means, increments it.
REPORT_SCHEMA_VERSION = 2


def optional(default=None):
    """A field left out of ``to_dict`` while it is None."""
    return field(default=default, metadata={"optional": True})


class Record:
    """Mixin: ``from_dict`` / ``to_dict`` for a dataclass with an ``extra`` dict of unknown keys."""

    nested: ClassVar[dict] = {}  # field name -> record class of its values ({name: Record})

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        values = {k: v for k, v in d.items() if k in known}
        for name, rec in cls.nested.items():
            if isinstance(values.get(name), dict):
                values[name] = {k: v if isinstance(v, Record) else rec.from_dict(v)
                                for k, v in values[name].items()}
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("optional")):
                continue
            if f.name in self.nested:
                value = {k: v.to_dict() for k, v in value.items()}
            out[f.name] = value
        if "schema_version" in out:  # first, as a reader looks for it
            out = {"schema_version": out.pop("schema_version"), **out}
        return {**out, **self.extra}


@dataclass
class Manifest(Record):
    """RUN/manifest.json: what the quantized checkpoint is and how it was made."""

    schema_version: int  # calib.checkpoint.SCHEMA_VERSION
    model: dict  # timm_name, name, kwargs, data_config, weights_sha256
    recipe: dict  # a calib.recipes.Recipe dict
    model_config: dict = field(default_factory=dict)  # the ModelConfig fields, checkpoint path resolved
    keep_fp: list = field(default_factory=list)
    quantized_modules: int = 0
    kept_fp_modules: list = field(default_factory=list)
    method: str = "maskaq"
    config: dict = field(default_factory=dict)
    dfq_config: dict = field(default_factory=dict)
    seed: int | None = None  # the torch seed calibrate set before building the model
    inputs: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    files: dict | None = optional()  # sha256 of model.safetensors and quant.safetensors (provenance checks)
    extra: dict = field(default_factory=dict)

    # the entries every stage asks for
    name = property(lambda self: self.model["name"], doc="the model as given to --model")
    timm_name = property(lambda self: self.model["timm_name"])
    recipe_name = property(lambda self: self.recipe["name"])
    data_config = property(lambda self: self.model["data_config"], doc="mean, std, input_size, ...")


@dataclass
class RuntimeResult(Record):
    """One runtime's figures on the validation images (report.json ``runtimes.<name>``)."""

    top1: float
    agreement_vs_fp: float | None = optional()  # always written; a baseline may lack it (only top1 is required)
    agreement_vs_torch: float | None = optional()
    sqnr_db_vs_torch: float | None = optional()
    max_abs_diff_vs_torch: float | None = optional()
    artifact: str | None = optional()
    extra: dict = field(default_factory=dict)


VS_TORCH_KEYS = ("agreement_vs_torch", "sqnr_db_vs_torch", "max_abs_diff_vs_torch")


@dataclass
class Report(Record):
    """RUN/report.json; every key is described in docs/report_schema.md."""

    nested: ClassVar[dict] = {"runtimes": RuntimeResult}

    model: str
    recipe: str
    fp_top1: float
    num_eval_images: int
    runtimes: dict[str, RuntimeResult]
    schema_version: int = REPORT_SCHEMA_VERSION
    timm_name: str | None = None
    method: str | None = None
    runtime: str | None = None  # the runtime the headline figures are of
    val_data: str | None = None
    quant_top1: float | None = None
    top1_drop: float | None = None
    agreement: float | None = None
    seconds: dict = field(default_factory=dict)
    agreement_vs_torch: float | None = optional()
    sqnr_db_vs_torch: float | None = optional()
    max_abs_diff_vs_torch: float | None = optional()
    target: str | None = optional()
    val_fingerprint: str | None = optional()
    gate: dict | None = None  # None: no gate applied
    sensitivity: dict | None = optional()
    latency: list | None = optional()
    created: str | None = optional()
    command: str | None = optional()
    extra: dict = field(default_factory=dict)


@dataclass
class ProgressEvent(Record):
    """One progress report of a long stage (synthesis round, fine-tune epoch, ...)."""

    stage: str = "calibration"
    step: int = 0
    total: int | None = None
    round: Any = None
    losses: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def key(self):
        """What identifies the bar this event advances: its round, else its stage."""
        return self.stage if self.round is None else self.round
