"""Quantization recipes: plain, frozen data that the quantizer attachment reads.

A recipe names the number format (integer grids, or FP8 E4M3), the weight bits and granularity, the activation
bits and symmetry, the observers, whether the attention matmuls are quantized, and which modules stay in float
(fnmatch patterns on module names). Custom recipes come from a TOML file:

    [recipe]
    name = "w6a6"
    w_bits = 6
    a_bits = 6
    a_symmetric = false
    keep_fp = ["patch_embed.proj", "head"]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maskaq_deploy.calib.errors import RecipeError
from maskaq_deploy.calib.observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS, one_of
from maskaq_deploy.calib.quantizers import E4M3, FORMATS, INT, MAX_BITS, MIN_BITS
from maskaq_deploy.calib.tomlfile import read_toml


RECIPE_VERSION = 1
# The first (patch embedding) and last (classifier) layers stay float in the sub-8-bit research recipes, as in
# the PSAQ-ViT and MaskAQ papers' setting; int8 recipes quantize everything.
FIRST_LAST = ("patch_embed.proj", "head", "head.fc", "head_dist")


@dataclass(frozen=True)
class Recipe:
    name: str
    w_bits: int
    a_bits: int | None  # None: activations stay float (weight-only)
    w_granularity: str = "channel"  # "channel" | "block"
    w_block_size: int = 128
    w_observer: str = "minmax"  # one of observers.WEIGHT_OBSERVERS
    a_symmetric: bool = True
    a_observer: str = "percentile"  # one of observers.ACTIVATION_OBSERVERS
    quantize_attention: bool = True  # quantize the inputs of q @ k^T and attn @ v (--attention-qdq on|off)
    keep_fp: tuple[str, ...] = ()
    number_format: str = INT  # "int" | "e4m3" (FP8: 8-bit weights and activations, symmetric, per-channel weights)
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if not isinstance(self.keep_fp, (list, tuple)) or not all(isinstance(p, str) for p in self.keep_fp):
            raise RecipeError(f"recipe {self.name!r}: keep_fp must be a list of module-name patterns, got "
                              f"{self.keep_fp!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        if not isinstance(self.w_bits, int) or not MIN_BITS <= self.w_bits <= MAX_BITS:
            raise RecipeError(f"recipe {self.name!r}: weight bit width {self.w_bits} is out of range; "
                              f"use {MIN_BITS} to {MAX_BITS}")
        if self.a_bits is not None and (not isinstance(self.a_bits, int)
                                        or not MIN_BITS <= self.a_bits <= MAX_BITS):
            raise RecipeError(f"recipe {self.name!r}: activation bit width {self.a_bits} is out of range; "
                              f"use {MIN_BITS} to {MAX_BITS}, or omit a_bits for float activations")
        if self.w_granularity not in ("channel", "block"):
            raise RecipeError(f"recipe {self.name!r}: w_granularity must be 'channel' or 'block'")
        if self.w_granularity == "block" and self.w_block_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"recipe {self.name!r}: w_block_size {self.w_block_size} unsupported; "
                              "use 32, 64 or 128")
        if self.w_observer not in WEIGHT_OBSERVERS:
            raise RecipeError(f"recipe {self.name!r}: w_observer must be {one_of(WEIGHT_OBSERVERS)}")
        if self.a_observer not in ACTIVATION_OBSERVERS:
            raise RecipeError(f"recipe {self.name!r}: a_observer must be {one_of(ACTIVATION_OBSERVERS)}")
        if self.number_format not in FORMATS:
            raise RecipeError(f"recipe {self.name!r}: number_format must be one of {', '.join(FORMATS)}")
        if self.number_format == E4M3 and (self.w_bits != 8 or self.a_bits != 8 or not self.a_symmetric
                                           or self.w_granularity != "channel"):
            raise RecipeError(f"recipe {self.name!r}: number_format 'e4m3' (FP8) takes w_bits = 8, a_bits = 8, "
                              "a_symmetric = true and w_granularity = \"channel\"")

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_fp"] = list(self.keep_fp)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"recipe has unknown field(s) {unknown}; known fields are {sorted(known)}")
        if "name" not in d or "w_bits" not in d:
            raise RecipeError("a recipe needs at least 'name' and 'w_bits'")
        d = dict(d)
        d.setdefault("a_bits", None)
        try:
            return cls(**d)
        except TypeError as e:
            raise RecipeError(f"recipe {d.get('name')!r}: {e}") from None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a8", w_bits=8, a_bits=8),
        # FP8 E4M3 (Hopper, Ada, Thor): per-channel weights, per-tensor activations, the same observers as w8a8
        Recipe("fp8", w_bits=8, a_bits=8, number_format=E4M3),
        Recipe("w4a16", w_bits=4, a_bits=None, w_granularity="block", w_block_size=128, w_observer="mse"),
        Recipe("w4a8", w_bits=4, a_bits=8, w_observer="mse"),
        Recipe("w5a5", w_bits=5, a_bits=5, w_observer="mse", a_symmetric=False, a_observer="mse",
               keep_fp=FIRST_LAST),
        Recipe("w4a4", w_bits=4, a_bits=4, w_observer="mse", a_symmetric=False, a_observer="mse",
               keep_fp=FIRST_LAST),
        Recipe("w3a3", w_bits=3, a_bits=3, w_observer="mse", a_symmetric=False, a_observer="mse",
               keep_fp=FIRST_LAST),
    )
}


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a custom one from a ``.toml`` path."""
    if name.endswith(".toml"):
        return load_recipe_toml(name)
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} "
                          "or give a .toml file with a [recipe] table") from None


def load_recipe_toml(path: str) -> Recipe:
    data = read_toml(path, RecipeError, "recipe file")
    table = data.get("recipe", data)
    if not isinstance(table, dict):
        raise RecipeError(f"recipe file {path}: 'recipe' must be a table ([recipe]), got a {type(table).__name__}")
    base = table.pop("base", None)
    if base is not None:
        merged = get_recipe(base).to_dict()
        merged.update(table)
        table = merged
    return Recipe.from_dict(table)
