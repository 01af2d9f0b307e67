"""Run configuration: frozen dataclasses with defaults, loadable from TOML, overridable from CLI options.

A TOML file may hold the tables [model] (ModelConfig fields), [calibrate] (CalibrateConfig fields) and [dfq]
(calib.dfq.DFQConfig fields: synthesis, loss weights, fine-tuning, on top of the preset; by their flat keys, or
inside the table of their part such as [dfq.reconstruction]; docs/maskaq.md lists both):

    [model]
    name = "deit_tiny_patch16_224"
    checkpoint = "deit_tiny.safetensors"

    [calibrate]
    recipe = "w4a8"
    keep_fp = ["blocks.11.*"]

    [dfq]
    iterations = 500
    w_entropy = 0.5

    [dfq.reconstruction]          # the same as  recon_iters = 100  under [dfq]
    iters = 100

CLI options given explicitly override the file; the fully resolved config goes into the manifest.

``BuildOptions`` holds how one ``build`` runs (beyond the model and the calibration config): the calibrate,
export and verify options, built once by the CLI or by a Python caller and passed down whole.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass

from maskaq_deploy.calib.dfq.config import PRESETS
from maskaq_deploy.calib.dfq.sources import method_names
from maskaq_deploy.calib.tomlfile import read_toml as read_toml_file
from maskaq_deploy.checks import DEVICE_PATTERN
from maskaq_deploy.errors import UsageError
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TARGETS, TENSORRT, check_name

if typing.TYPE_CHECKING:
    from maskaq_deploy.gate import Thresholds


CONFIG_VERSION = 1
SEED_LIMIT = 2 ** 63  # seeds are in [0, 2^63): torch and numpy take them


@dataclass(frozen=True)
class CalibrateConfig:
    method: str = "maskaq"  # maskaq | psaq | noise | real
    preset: str = "fast"  # fast | paper (standard: the same as fast): a set of DFQ config values
    recipe: str = "w8a8"  # built-in name or a .toml recipe file
    keep_fp: tuple[str, ...] = ()  # fnmatch patterns on module names kept in float
    calib_data: str | None = None  # real images (method real); default for the embedded model: embedded:calib
    num_images: int | None = None  # calibration images (synthetic or real); None: the preset's
    batch_size: int = 64  # batch size of evaluation and real-image calibration
    seed: int = 0
    device: str = "cpu"
    save_images: bool = False  # write a PNG grid of the synthetic images into the run directory
    dfq: dict = dataclasses.field(default_factory=dict)  # DFQConfig values ([dfq] table of --config)
    attention_qdq: bool | None = None  # quantize the attention matmuls; None: as the recipe says
    version: int = CONFIG_VERSION

    def __post_init__(self):
        check_field_types(self)
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        if self.method not in method_names():
            raise UsageError(f"unknown `method` {self.method!r}; choose one of {', '.join(method_names())}")
        if self.preset not in PRESETS:
            raise UsageError(f"unknown `preset` {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if (self.num_images is not None and self.num_images < 1) or self.batch_size < 1:
            raise UsageError("`num_images` and `batch_size` must be positive")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UsageError(f"`device` {self.device!r}: use cpu, cuda or cuda:N")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UsageError(f"`seed` {self.seed} is out of range; use 0 to 2^63 - 1")
        if self.dfq.get("preset", self.preset) != self.preset:
            raise UsageError(f"[dfq] preset = {self.dfq['preset']!r} and the preset {self.preset!r} (`preset` or "
                             "[calibrate] preset) disagree; name the preset once")
        self.dfq_config()  # [dfq] values are checked now, before any work

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


FLOAT_DTYPES = ("fp16", "bf16", "fp32")  # --float-dtype of a tensorrt graph


@dataclass(frozen=True)
class CalibrateOptions:
    """How calibrate treats the output folder: replace a run in it (``force``), continue one (``resume``)."""

    force: bool = False
    resume: bool = False


@dataclass(frozen=True)
class ExportOptions:
    """What build exports: the target's QDQ flavour, its batch dimension, the TensorRT bundle and engine."""

    target: str = ONNXRUNTIME
    dynamic_batch: bool = False
    bundle_only: bool = False  # tensorrt: the bundle only, no engine build here
    float_dtype: str | None = None  # tensorrt: dtype of what is not quantized (None: the exporter's fp16)

    def __post_init__(self):
        check_name(self.target, TARGETS, "`target`", UsageError)
        if self.float_dtype is not None and self.float_dtype not in FLOAT_DTYPES:
            raise UsageError(f"unknown `float_dtype` {self.float_dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
        if self.float_dtype not in (None, "fp32") and self.target != TENSORRT:
            raise UsageError(f"`float_dtype` {self.float_dtype} is for `target` tensorrt; {self.target} computes "
                             "in fp32")


@dataclass(frozen=True)
class VerifyOptions:
    """Which images a verify evaluates, the gate it applies and the sensitivity table it adds."""

    val_data: str | None = None  # a --val-data spec; None: the embedded test set for the embedded model
    limit: int | None = None  # a seeded subset of that many images
    batch_size: int = 256
    limits: Thresholds | None = None  # gate.thresholds(...): validated, the baseline read
    sensitivity_images: int = 64  # 0: no sensitivity table

    def __post_init__(self):
        if (self.limit is not None and self.limit < 1) or self.batch_size < 1:
            raise UsageError("`limit` and `batch_size` must be positive")
        if self.sensitivity_images < 0:
            raise UsageError("sensitivity_images must be 0 (no table) or positive")


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs besides the model and the calibration config; ``command`` is recorded in the
    run folder's lock and in report.json."""

    calibrate: CalibrateOptions = dataclasses.field(default_factory=CalibrateOptions)
    export: ExportOptions = dataclasses.field(default_factory=ExportOptions)
    verify: VerifyOptions = dataclasses.field(default_factory=VerifyOptions)
    command: str | None = None

    # the flat keywords of ``pipeline.build`` (its signature before BuildOptions) and where each one goes
    KEYWORDS: typing.ClassVar[dict] = {"force": "calibrate", "resume": "calibrate", "target": "export",
                                       "dynamic_batch": "export", "bundle_only": "export", "float_dtype": "export",
                                       "val_data": "verify", "limit": "verify", "limits": "verify",
                                       "batch_size": "verify", "sensitivity_images": "verify"}

    @classmethod
    def from_keywords(cls, *, command: str | None = None, **keywords) -> BuildOptions:
        """BuildOptions from flat keywords (``target="tensorrt", limit=64, ...``); an unknown one is refused."""
        unknown = sorted(set(keywords) - set(cls.KEYWORDS))
        if unknown:
            raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(cls.KEYWORDS)}")
        parts = {"calibrate": CalibrateOptions, "export": ExportOptions, "verify": VerifyOptions}
        return cls(**{part: kind(**{k: v for k, v in keywords.items() if cls.KEYWORDS[k] == part})
                      for part, kind in parts.items()}, command=command)


def read_toml(path: str) -> dict:
    return read_toml_file(path, UsageError, "config file")


TABLES = ("model", "calibrate", "dfq")


def config_tables(path: str | None) -> dict:
    """The tables of a --config file ({} without one), each checked to be a table."""
    if not path:
        return {}
    data = read_toml(path)
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise UsageError(f"config file {path}: unknown table(s) {unknown}; it may hold [model], [calibrate], [dfq]")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise UsageError(f"config file {path}: {name} must be a table ([{name}]), got a "
                             f"{type(table).__name__}")
    return data


def with_dfq_preset(calibrate_table: dict | None, dfq_table: dict | None, cli_preset: str | None):
    """(calibrate values, dfq values) with a ``[dfq] preset`` moved to the run's preset, so it is applied; a
    different preset named elsewhere is refused."""
    calibrate_table, dfq_table = dict(calibrate_table or {}), dict(dfq_table or {})
    if "preset" in dfq_table:
        preset = dfq_table.pop("preset")
        named = cli_preset or calibrate_table.get("preset")
        if named is not None and named != preset:
            raise UsageError(f"[dfq] preset = {preset!r} and the preset {named!r} (`preset` or [calibrate] "
                             "preset) disagree; name the preset once")
        calibrate_table["preset"] = preset
    return calibrate_table, dfq_table


def build(cls, file_values: dict | None, overrides: dict, table: str = ""):
    """``cls`` from file values, then explicit CLI overrides (None means 'not given')."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(file_values or {})
    unknown = sorted(set(values) - known)
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"{u}: did you mean {c[0]}?" for u, c in close.items() if c)
        raise UsageError(f"unknown field(s) {unknown} in [{table or cls.__name__}] of the config file"
                         f"{'; ' + hint if hint else ''}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(f"bad {cls.__name__} values: {e}") from None


def check_field_types(obj) -> None:
    """Every field of dataclass ``obj`` holds a value of its annotated type (a TOML list may stand for a tuple;
    a string never does). Raises UsageError naming the field, the expected and the given type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _conforms(value, hints[f.name]):
            raise UsageError(f"{f.name} must be {_describe(hints[f.name])}, got {type(value).__name__} {value!r}")


def _conforms(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    names = {type(None): "not set", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             dict: "a table"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))
