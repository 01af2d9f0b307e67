"""Which quantization recipes each deployment target can execute, and the refusal when it cannot.

    target        runs
    torch         every recipe (the fake-quant model itself)
    onnxruntime   every recipe (sub-8-bit grids run as QDQ simulation)
    tensorrt      w8a8, fp8, w4a16, and custom recipes whose grids TensorRT's types hold exactly:
                  int8 activations (symmetric) with 5..8-bit per-channel weights (int8 containers), float
                  activations with 2..4-bit block-wise weights (INT4 weight-only), or FP8 E4M3 (the engine
                  needs a GPU of compute capability 8.9 or later: Ada, Hopper, Blackwell, Thor; not Orin)

TensorRT quantizes activations and weights to INT8 and supports INT4 for weights only
(https://docs.nvidia.com/deeplearning/tensorrt/10.11.0/inference-library/work-quantized-types.html): it has
no INT4 activations, no INT4 x INT8 GEMM, and no zero points, so w4a8, w4a4, w3a3, w5a5 and asymmetric
activations are refused with a message naming the recipe, the reason and the recipes that work.
"""

from __future__ import annotations

from maskaq_deploy.calib.recipes import RECIPES, Recipe
from maskaq_deploy.export.errors import TargetError
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TARGETS, TENSORRT, check_name

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


class RecipeTargetError(TargetError):
    """The target cannot execute the recipe (or the target is unknown); the message names both and the fix."""


def _tensorrt_problem(recipe: Recipe) -> str | None:
    """Why TensorRT cannot run ``recipe`` (None when it can)."""
    if recipe.a_bits is None:  # weight-only
        if recipe.w_bits > 4:
            return (f"TensorRT supports weight-only quantization for INT4 weights only, not "
                    f"{recipe.w_bits}-bit weights with float activations")
        if recipe.w_granularity != "block":
            return "TensorRT runs INT4 weights only as block-wise dequantization; set w_granularity = \"block\""
        return None
    if recipe.a_bits < 8:
        return f"TensorRT has no INT{recipe.a_bits} activations (activations are INT8 or float)"
    if recipe.w_bits <= 4:
        return (f"TensorRT has no INT4 x INT8 GEMM: {recipe.w_bits}-bit weights run only weight-only "
                "(float activations)")
    if not recipe.a_symmetric:
        return "TensorRT needs symmetric activations (zero point 0); set a_symmetric = true"
    if recipe.w_granularity == "block":
        return ("TensorRT block quantization is INT4 weight-only; int8-activation recipes need "
                "w_granularity = \"channel\"")
    return None


def _ok_recipes(target: str) -> list[str]:
    return [name for name, r in RECIPES.items() if recipe_problem(r, target) is None]


def recipe_problem(recipe: Recipe, target: str) -> str | None:
    """Why ``target`` (one of runtimes.targets.TARGETS) cannot execute ``recipe``, or None when it can."""
    if check_name(target, TARGETS, "target", RecipeTargetError) == TENSORRT:
        return _tensorrt_problem(recipe)
    return None  # torch and onnxruntime run every grid (onnxruntime sub-8-bit ones as QDQ simulation)


def supported_recipes(target: str) -> list[str]:
    """Names of the built-in recipes ``target`` can execute."""
    check_name(target, TARGETS, "target", RecipeTargetError)
    return _ok_recipes(target)


def check_recipe_for_target(recipe: Recipe, target: str) -> None:
    """Raise RecipeTargetError when ``target`` cannot execute ``recipe``."""
    problem = recipe_problem(recipe, target)
    if problem is not None:
        raise RecipeTargetError(
            f"recipe {recipe.name!r} cannot run on target {target!r}: {problem}; recipes that work there: "
            f"{', '.join(_ok_recipes(target))} (or use `target` {ONNXRUNTIME}, which runs every recipe)")
