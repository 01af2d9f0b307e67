"""DFQConfig: every knob of data-free calibration, one small config per concern, and the presets.

    DFQConfig                        the run: set size, synthesis batch, seed, autocast, progress events
      .synthesis       SynthesisConfig       the loop maskaq and psaq share: steps, optimizer, augmentation,
                                             the CE, TV and entropy weights
      .maskaq          MaskAQConfig          MaskAQ's own terms (inter-head SSIM, masked attention alignment)
      .psaq            PSAQConfig            PSAQ-ViT's kernel density estimate
      .noise           NoiseConfig           Gaussian images (no settings of their own)
      .real            RealConfig            the caller's images
      .calibration     CalibrationConfig     observer calibration
      .reconstruction  ReconstructionConfig  block-wise reconstruction of Q against P
      .finetune        FinetuneConfig        distillation fine-tuning and the refresh of the set

Every field also has a flat name, its key in a ``[dfq]`` table: a part's prefix and the field's name
(``recon_iters`` is ``reconstruction.iters``, ``ft_lr`` is ``finetune.lr``; ``FLAT_KEYS`` lists them all).
``from_dict`` and ``load_dfq_toml`` take flat keys, part tables (``[dfq.reconstruction]``) or both, and the
flat configs of earlier versions (their manifests); ``to_dict`` gives the nested form the manifest records.

A preset is only a set of values over the defaults (``fast``, ``standard``, ``paper``); the code path is the
same for all. The defaults are the published MaskAQ settings where the paper has one.

    cfg = DFQConfig.from_preset("fast", seed=3, recon_iters=0)
    cfg = load_dfq_toml("dfq.toml")        # [dfq] table; optional  preset = "paper"  as the base
    DFQConfig.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from maskaq_deploy.calib.dfq.errors import DFQConfigError
from maskaq_deploy.calib.tomlfile import read_toml


DFQ_CONFIG_VERSION = 2  # 2: nested parts; 1: one flat table (read, mapped onto the parts)
READABLE_VERSIONS = (1, 2)
AUTOCAST_MODES = ("auto", "off", "bf16")
PAPER_TV = 2.5e-5  # the published weight of the total-variation image prior
# removed fields, with the one value they could hold: configs of earlier versions that carry them still load
REMOVED_FIELDS = {"q_init": "noise"}
# annotation -> (accepted Python types, what the error calls it); bool is never taken for a number
SIMPLE_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
                "str": ((str,), "a string")}


def _bad(msg: str):
    raise DFQConfigError(f"dfq config: {msg}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# what a field must be -> (the test, how the error says it)
RULES = {
    "positive int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "non-negative int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                         "a non-negative integer"),
    "positive": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive number"),
    "non-negative": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a non-negative number"),
    "fraction": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
    "share": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
}


@dataclass(frozen=True)
class _Checked:
    """What every config class shares: flat names, type and range checks, replace."""

    flat_prefix: ClassVar[str] = ""  # a field's flat ([dfq]) name is this prefix + its name ...
    flat_names: ClassVar[dict[str, str]] = {}  # ... unless named here
    rules: ClassVar[dict[str, tuple[str, ...]]] = {}  # RULES key -> the fields it applies to

    @classmethod
    def flat_name(cls, name: str) -> str:
        return cls.flat_names.get(name, cls.flat_prefix + name)

    def _check(self) -> None:
        for f in dataclasses.fields(self):  # TOML values of the wrong type: a string is never a number or a flag
            v = getattr(self, f.name)
            kind = SIMPLE_TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
            if kind is not None and not (isinstance(v, kind[0]) and (kind[0] == (bool,) or not isinstance(v, bool))):
                _bad(f"{self.flat_name(f.name)} must be {kind[1]}, got {type(v).__name__} {v!r}")
        for rule, names in self.rules.items():
            test, what = RULES[rule]
            for name in names:
                if not test(getattr(self, name)):
                    _bad(f"{self.flat_name(name)} must be {what}, got {getattr(self, name)!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class _Part(_Checked):
    """A part of a DFQConfig: a frozen dataclass, checked when it is made."""

    def __post_init__(self):
        self._check()
        self.validate()

    def validate(self) -> None:
        """Rules between fields of this part."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynthesisConfig(_Part):
    """The synthesis loop that maskaq and psaq share: AdamW on the pixels, the augmentation of each step, and the
    loss terms both methods have (the CE on the target labels, the TV image prior, the patch-similarity
    entropy)."""

    iterations: int = 200  # optimizer steps per synthesis batch (paper: 2000)
    # steps used instead of ``iterations`` when every enabled quantizer of Q has 8 bits (w8a8, fp8); 0: the same
    iterations_8bit: int = 0
    lr: float = 0.1  # AdamW on the pixels, cosine-annealed to lr_min over the iterations
    lr_min: float = 1e-3
    weight_decay: float = 1e-6
    balanced_labels: bool = True  # target labels cycle through the classes (shuffled); else uniform random
    # augmentation of each step
    jitter: float = 8 / 224  # max circular shift, fraction of the image side (8 px at 224), doubled in 2nd half
    noise_std: float = 0.5  # per-image per-channel offset, std annealed linearly to 0
    affine_mean: float = 1.0  # per-channel affine jitter: (x - m) / s, m ~ U(-a, a) ...
    affine_std: float = 1.0  # ... and s = exp(U(-b, b))
    # loss weights (paper values)
    w_ce: float = 1.0
    # soft labels: each image's CE target gives weight U(0, soft_label_mix) to a second random class (0: hard)
    soft_label_mix: float = 0.0
    w_tv: float = PAPER_TV
    # TV weight used instead of w_tv when every enabled quantizer of Q has 8 bits (w8a8, fp8): see the presets
    w_tv_8bit: float = PAPER_TV
    w_entropy: float = 1.0  # MaskAQ: similarity entropy of P's attention logits; PSAQ: its KDE entropy

    rules: ClassVar = {
        "positive int": ("iterations",),
        "non-negative int": ("iterations_8bit",),
        "positive": ("lr", "lr_min"),
        "non-negative": ("weight_decay", "jitter", "noise_std", "affine_mean", "affine_std", "w_ce", "w_tv",
                         "w_tv_8bit", "w_entropy"),
    }

    def validate(self):
        if not 0 <= self.soft_label_mix <= 0.5:
            _bad(f"soft_label_mix must be in [0, 0.5] (the image's own label keeps the larger weight), "
                 f"got {self.soft_label_mix!r}")
        if self.lr_min > self.lr:
            _bad(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        if self.jitter >= 0.5:
            _bad(f"jitter is a fraction of the image side and must be < 0.5, got {self.jitter}")

    def for_bit_widths(self, bit_widths) -> SynthesisConfig:
        """The settings for a Q whose enabled quantizers have these bit widths: when all of them have 8 bits or
        more, ``w_tv_8bit`` replaces ``w_tv`` and a non-zero ``iterations_8bit`` replaces ``iterations``."""
        bits = list(bit_widths)
        if not bits or min(bits) < 8:
            return self
        return self.replace(w_tv=self.w_tv_8bit, iterations=self.iterations_8bit or self.iterations)


@dataclass(frozen=True)
class MaskAQConfig(_Part):
    """MaskAQ's own synthesis terms: inter-head SSIM, the masked attention alignment of Q to P, and how Q's
    activation steps are set before Q first joins synthesis (observers calibrated on N(0, 1) images)."""

    w_interhead: float = 1.0
    w_mask: float = 0.1
    entropy_rows: int = 64  # query rows sampled per map for the similarity entropy
    mask_ratio_start: float = 0.5
    mask_ratio_end: float = 0.1
    mask_drop: float = 0.3
    q_init_images: int = 32

    rules: ClassVar = {
        "positive int": ("entropy_rows", "q_init_images"),
        "non-negative": ("w_interhead", "w_mask"),
        "fraction": ("mask_ratio_start", "mask_ratio_end"),
        "share": ("mask_drop",),
    }


@dataclass(frozen=True)
class PSAQConfig(_Part):
    """PSAQ-ViT: the kernel density estimate of the patch-similarity distribution."""

    kde_bandwidth: float = 0.01
    kde_points: int = 10

    flat_prefix: ClassVar = "psaq_"
    rules: ClassVar = {"positive int": ("kde_points",), "positive": ("kde_bandwidth",)}


@dataclass(frozen=True)
class NoiseConfig(_Part):
    """N(0, 1) images in normalized space: only the shared set size and seed; the place for noise settings."""


@dataclass(frozen=True)
class RealConfig(_Part):
    """The caller's images (a seeded subset of ``num_images``)."""

    # the reference is calibration-only (+ fine-tune) unless asked; true: it reconstructs too (its upper bound)
    reconstruct: bool = False

    flat_names: ClassVar = {"reconstruct": "recon_real"}


@dataclass(frozen=True)
class CalibrationConfig(_Part):
    """Observer calibration of Q on the set."""

    batch_size: int = 64

    flat_prefix: ClassVar = "calib_"
    rules: ClassVar = {"positive int": ("batch_size",)}


@dataclass(frozen=True)
class ReconstructionConfig(_Part):
    """Block-wise reconstruction of Q against P on the set, after calibration (calib.dfq.reconstruct)."""

    iters: int = 0  # Adam steps per unit (ViT block, Swin block or patch merging); 0: no reconstruction
    batch_size: int = 32
    lr: float = 1e-3  # quantizer step sizes
    weight_lr: float = 1e-4  # float weights, biases, norms (0: step sizes only)
    drop: float = 0.5  # QDrop mixing: probability that an input element comes from P instead of Q
    cutmix: float = 0.0  # reconstruct on the set plus this many times as many CutMix images of it
    # share of each unit's output loss weighted by the tokens' attention rollout from P's readout (0: every token
    # alike); ViT/DeiT only (see calib.dfq.reconstruct.readout_importance)
    focus: float = 0.0

    flat_prefix: ClassVar = "recon_"
    rules: ClassVar = {
        "positive int": ("batch_size",),
        "non-negative int": ("iters",),
        "positive": ("lr",),
        "non-negative": ("weight_lr", "cutmix"),
        "share": ("drop", "focus"),
    }


@dataclass(frozen=True)
class FinetuneConfig(_Part):
    """Fine-tuning of Q by distillation (0 epochs: calibration-only PTQ), and the refresh of the set."""

    epochs: int = 0
    batch_size: int = 32
    lr: float = 1e-3  # SGD-Nesterov, cosine-annealed per step to lr * lr_min_ratio
    lr_min_ratio: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    kd_temperature: float = 5.0
    kd_weight: float = 25.0
    ce_weight: float = 0.0  # cross-entropy of Q against the synthesis target labels (reference: 0)
    attn_dist_weight: float = 10.0  # masked SSIM distillation of attention outputs (reference: 10)
    attn_dist_top: float = 0.1  # fraction of most active patches weighted ...
    attn_dist_high: float = 2.0  # ... this much
    crop_min: float = 0.5  # random resized crop: min kept area fraction (1.0: no crop)
    flip: bool = True
    refresh_every: int = 0  # re-synthesize the set with the current Q every N epochs (0: never)
    # A guarded fine-tune: this fraction of the first set is kept out of fine-tuning and judges it (KL of Q from
    # P on those images after every epoch); the run ends with the best epoch's Q -- the Q from before the
    # fine-tune when no epoch beat it. 0: no judging, the last epoch is kept.
    holdout: float = 0.0
    patience: int = 0  # with holdout: stop after this many epochs without a better judgement (0: never)

    flat_prefix: ClassVar = "ft_"
    flat_names: ClassVar = {name: name for name in ("epochs", "kd_temperature", "kd_weight", "ce_weight",
                                                    "attn_dist_weight", "attn_dist_top", "attn_dist_high",
                                                    "refresh_every")}
    rules: ClassVar = {
        "positive int": ("batch_size",),
        "non-negative int": ("epochs", "refresh_every", "patience"),
        "positive": ("lr", "kd_temperature", "attn_dist_high"),
        "non-negative": ("weight_decay", "kd_weight", "ce_weight", "attn_dist_weight"),
        "fraction": ("attn_dist_top", "crop_min"),
        "share": ("lr_min_ratio", "momentum", "holdout"),
    }

    def validate(self):
        if self.refresh_every and not self.epochs:
            _bad("refresh_every needs epochs > 0 (refreshing re-synthesizes the set between fine-tune epochs)")
        if self.patience and not self.holdout:
            _bad("ft_patience needs ft_holdout > 0 (the held-out images are what stops the fine-tune)")


# the parts of a DFQConfig: field name -> class (also the names of the [dfq.NAME] tables)
PARTS: dict[str, type[_Part]] = {"synthesis": SynthesisConfig, "maskaq": MaskAQConfig, "psaq": PSAQConfig,
                                 "noise": NoiseConfig, "real": RealConfig, "calibration": CalibrationConfig,
                                 "reconstruction": ReconstructionConfig, "finetune": FinetuneConfig}


@dataclass(frozen=True)
class DFQConfig(_Checked):
    """The resolved config of one calibration run: the shared settings here, each stage's and source's apart."""

    preset: str = "custom"  # informational: the preset the values came from
    seed: int = 0
    num_images: int = 256  # images per synthesis round (and the calibration set size for every method)
    batch_size: int = 32  # images synthesized together
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    maskaq: MaskAQConfig = field(default_factory=MaskAQConfig)
    psaq: PSAQConfig = field(default_factory=PSAQConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    real: RealConfig = field(default_factory=RealConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # "auto": bf16 on CUDA for synthesis and the teacher's forwards, Q fine-tunes in float32; "bf16": bf16
    # everywhere (also on CPUs with fast bf16); "off": float32 everywhere.
    autocast: str = "auto"
    log_every: int = 10  # progress events (and the only host syncs for loss values) every N steps
    version: int = DFQ_CONFIG_VERSION

    rules: ClassVar = {"positive int": ("num_images", "batch_size", "log_every"), "non-negative int": ("seed",)}

    def __post_init__(self):
        for name, cls in PARTS.items():
            if not isinstance(getattr(self, name), cls):
                _bad(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}; "
                     "DFQConfig.from_dict takes tables")
        self._check()
        if self.autocast not in AUTOCAST_MODES:
            _bad(f"autocast must be one of {AUTOCAST_MODES}, got {self.autocast!r}")
        holdout = self.finetune.holdout
        if holdout and round(self.num_images * holdout) not in range(1, self.num_images):
            _bad(f"ft_holdout {holdout} of {self.num_images} images keeps {round(self.num_images * holdout)} out; "
                 "choose a fraction that leaves both parts non-empty")
        if self.version != DFQ_CONFIG_VERSION:
            _bad(f"version {self.version} is not supported; this library reads versions {READABLE_VERSIONS}")

    # --- dict / preset round trip
    def to_dict(self) -> dict:
        """The nested form: the shared fields, and a table per part."""
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict:
        """The flat form: every field under its ``[dfq]`` key."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in PARTS:
                out.update({value.flat_name(k): v for k, v in value.to_dict().items()})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> DFQConfig:
        """A config from flat ``[dfq]`` keys, part tables (``{"reconstruction": {"iters": 100}}``) or both; a
        field set both ways is refused. Flat configs of earlier versions (version 1) are read too."""
        values = nest(d)
        version = values.pop("version", DFQ_CONFIG_VERSION)
        if version not in READABLE_VERSIONS:
            _bad(f"version {version!r} is not supported; this library reads versions {READABLE_VERSIONS}")
        parts: dict[str, Any] = {name: _make(PARTS[name], values.pop(name, {})) for name in PARTS}
        return cls(**_as_floats(cls, values), **parts)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DFQConfig:
        return cls.from_dict(over_preset(preset_values(name), overrides))

    def for_bit_widths(self, bit_widths) -> DFQConfig:
        """The config for a Q whose enabled quantizers have these bit widths (SynthesisConfig.for_bit_widths)."""
        synthesis = self.synthesis.for_bit_widths(bit_widths)
        return self if synthesis is self.synthesis else self.replace(synthesis=synthesis)

    @property
    def finetunes(self) -> bool:
        return self.finetune.epochs > 0


TOP_FIELDS = tuple(f.name for f in dataclasses.fields(DFQConfig) if f.name not in PARTS)
# every flat [dfq] key of a part's field -> (part, field)
FLAT_KEYS: dict[str, tuple[str, str]] = {cls.flat_name(f.name): (part, f.name)
                                         for part, cls in PARTS.items() for f in dataclasses.fields(cls)}


def _as_floats(cls, values: dict) -> dict:
    """TOML has no float/int distinction for whole numbers: an int for a float field becomes a float."""
    floats = {f.name for f in dataclasses.fields(cls) if f.type == "float"}
    return {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()}


def _make(cls: type[_Part], values: dict) -> _Part:
    return cls(**_as_floats(cls, values))


def _unknown(keys, known, where: str):
    keys = sorted(keys)
    close = {k: difflib.get_close_matches(k, known, n=1) for k in keys}
    hint = "; ".join(f"{k}: did you mean {c[0]}?" for k, c in close.items() if c)
    _bad(f"unknown field(s) {keys} in {where}{'; ' + hint if hint else ''}; known: {sorted(known)}")


def nest(values: Mapping) -> dict:
    """``values`` (flat ``[dfq]`` keys, part tables, or both) in the nested form: the shared fields, and a dict
    per part that has values. Unknown keys, a field set twice and a removed field's other values are refused."""
    out: dict = {}
    spelled: dict[tuple[str, str], str] = {}  # (part, field) -> how the values named it

    def put(part: str, name: str, value, how: str) -> None:
        if (part, name) in spelled:
            _bad(f"{spelled[part, name]} and {how} are the same field; set it once")
        spelled[part, name] = how
        out.setdefault(part, {})[name] = value

    unknown = []
    for key, value in values.items():
        if key in PARTS:
            if isinstance(value, _Part):
                value = value.to_dict()
            if not isinstance(value, Mapping):
                _bad(f"{key} must be a table of {PARTS[key].__name__} fields, got {type(value).__name__} {value!r}")
            known = {f.name for f in dataclasses.fields(PARTS[key])}
            if set(value) - known:
                _unknown(set(value) - known, known, f"[dfq.{key}]")
            for name, v in value.items():
                put(key, name, v, f"{key}.{name}")
        elif key in FLAT_KEYS:
            put(*FLAT_KEYS[key], value, key)
        elif key in TOP_FIELDS:
            out[key] = value
        elif key in REMOVED_FIELDS:
            if value != REMOVED_FIELDS[key]:
                _bad(f"{key} was removed ({REMOVED_FIELDS[key]!r} was its only value); delete it from the config")
        else:
            unknown.append(key)
    if unknown:
        _unknown(unknown, [*TOP_FIELDS, *FLAT_KEYS, *PARTS], "the dfq config")
    return out


def _merge(base: dict, values: dict) -> dict:
    """Nested ``values`` over nested ``base``, field by field."""
    out = copy.deepcopy(base)
    for key, value in values.items():
        if key in PARTS:
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


# Presets: only field values (their reasons: docs/maskaq.md, "Presets", and CHANGELOG.md). ``fast`` is sized
# for the embedded MNIST ViT on a 2-core CPU (a few minutes): synthesis, calibration and block-wise
# reconstruction with a focused unit loss. ``standard`` has ``fast``'s values (its guarded fine-tune did not
# pay); the name stays so that configs naming it keep working. ``paper`` is the published schedule.
# The short presets use a milder augmentation and a higher TV weight than the paper (their images converge in
# 100 steps and attend like real ones); at w8a8 they keep the paper's TV weight and make a batch in 50 steps.
SHORT_SCHEDULE_AUGMENT = {"affine_mean": 0.2, "affine_std": 0.2, "noise_std": 0.1}
SHORT_SCHEDULE_TV = 4e-3
RECON_STEPS = 200
RECON_FOCUS = 0.5
SHORT_SCHEDULE_STEPS_8BIT = 50
FAST = {"num_images": 256, "batch_size": 64,
        "synthesis": {"iterations": 100, "iterations_8bit": SHORT_SCHEDULE_STEPS_8BIT, "w_tv": SHORT_SCHEDULE_TV,
                      **SHORT_SCHEDULE_AUGMENT},
        "finetune": {"epochs": 0},
        "reconstruction": {"iters": RECON_STEPS, "focus": RECON_FOCUS}}
PRESETS: dict[str, dict] = {
    "fast": FAST,
    "standard": copy.deepcopy(FAST),  # the values of "fast" (see above)
    "paper": {"num_images": 10000, "batch_size": 16, "synthesis": {"iterations": 2000},
              "finetune": {"epochs": 200, "batch_size": 16, "refresh_every": 30}, "calibration": {"batch_size": 32}},
}


# A synthesis field and its 8-bit variant (used instead when every quantizer has 8 bits), with the variant's value
# that means "the same as the field". A value set over a preset for every bit width applies at 8 bits too, unless
# the 8-bit variant is set as well: ``iterations = 30`` means 30 steps at w8a8, not the preset's 8-bit count.
EIGHT_BIT_VARIANTS = {"iterations": ("iterations_8bit", lambda v: 0), "w_tv": ("w_tv_8bit", lambda v: v)}


def over_preset(base: Mapping, values: Mapping) -> dict:
    """``base`` (a preset's values) updated with ``values`` (either form), with the 8-bit variants of the
    synthesis fields set; the nested form."""
    values = nest(values)
    out = _merge(nest(base), values)
    synthesis = values.get("synthesis", {})
    for name, (variant, same) in EIGHT_BIT_VARIANTS.items():
        if name in synthesis and variant not in synthesis:
            out["synthesis"][variant] = same(synthesis[name])
    return out


def preset_values(name: str) -> dict:
    try:
        return {"preset": name, **copy.deepcopy(PRESETS[name])}
    except KeyError:
        raise DFQConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def load_dfq_toml(path, **overrides) -> DFQConfig:
    """A DFQConfig from a TOML file: a ``[dfq]`` table (or top-level keys), flat keys and/or ``[dfq.PART]``
    tables; ``preset = NAME`` picks the base values, the other keys override them, then ``overrides`` (e.g. CLI
    options) override the file."""
    data = read_toml(path, DFQConfigError, "dfq config file")
    table = dict(data.get("dfq", data))
    preset = overrides.get("preset", table.get("preset"))
    base = preset_values(preset) if preset not in (None, "custom") else {}
    return DFQConfig.from_dict(over_preset(base, _merge(nest(table), nest(overrides))))
