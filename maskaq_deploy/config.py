"""Run configuration: frozen dataclasses with defaults, loadable from TOML, overridable from CLI options.

A TOML file may hold the tables [model] (ModelConfig fields), [calibrate] (CalibrateConfig fields) and [dfq]
(calib.dfq.DFQConfig fields: synthesis, loss weights, fine-tuning, on top of the preset):

    [model]
    name = "deit_tiny_patch16_224"
    checkpoint = "deit_tiny.safetensors"

    [calibrate]
    recipe = "w4a8"
    keep_fp = ["blocks.11.*"]

    [dfq]
    iterations = 500
    w_entropy = 0.5

CLI options given explicitly override the file; the fully resolved config goes into the manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maskaq_deploy.calib.dfq.config import METHODS, PRESETS
from maskaq_deploy.calib.tomlfile import read_toml as read_toml_file
from maskaq_deploy.errors import UsageError


CONFIG_VERSION = 1


@dataclass(frozen=True)
class CalibrateConfig:
    method: str = "maskaq"  # maskaq | psaq | noise | real
    preset: str = "fast"  # fast | standard | paper: a set of DFQ config values
    recipe: str = "w8a8"  # built-in name or a .toml recipe file
    keep_fp: tuple[str, ...] = ()  # fnmatch patterns on module names kept in float
    calib_data: str | None = None  # real images (method real); default for the embedded model: embedded:calib
    num_images: int | None = None  # calibration images (synthetic or real); None: the preset's
    batch_size: int = 64  # batch size of evaluation and real-image calibration
    seed: int = 0
    device: str = "cpu"
    save_images: bool = False  # write a PNG grid of the synthetic images into the run directory
    dfq: dict = dataclasses.field(default_factory=dict)  # DFQConfig field overrides ([dfq] table of --config)
    attention_qdq: bool | None = None  # quantize the attention matmuls; None: as the recipe says
    version: int = CONFIG_VERSION

    def __post_init__(self):
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if (self.num_images is not None and self.num_images < 1) or self.batch_size < 1:
            raise UsageError("--num-images and --batch-size must be positive")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UsageError(f"--device {self.device!r}: use cpu or cuda[:N]")

    @property
    def needs_real_data(self) -> bool:
        return self.method == "real"

    def dfq_config(self):
        """The DFQConfig of this run: the preset's values, then the [dfq] overrides, seed and image count."""
        from maskaq_deploy.calib.dfq import DFQConfig

        overrides = {**self.dfq, "seed": self.seed}
        if self.num_images is not None:
            overrides["num_images"] = self.num_images
        return DFQConfig.from_preset(self.preset, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_fp"] = list(self.keep_fp)
        return d


def read_toml(path: str) -> dict:
    return read_toml_file(path, UsageError, "config file")


def build(cls, file_values: dict | None, overrides: dict):
    """``cls`` from file values, then explicit CLI overrides (None means 'not given')."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(file_values or {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown {cls.__name__} field(s) {unknown} in the config file; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in list(values.items()):
        if isinstance(v, list) and k != "dfq":
            values[k] = tuple(v)
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(f"bad {cls.__name__} values: {e}") from None
