"""The target / recipe matrix: what TensorRT refuses, why, and what it suggests instead."""

import pytest

from maskaq_deploy.calib.recipes import RECIPES, Recipe, load_recipe_toml
from maskaq_deploy.export.errors import ExportError
from maskaq_deploy.export.targets import (
    TARGETS,
    RecipeTargetError,
    check_recipe_for_target,
    recipe_problem,
    supported_recipes,
)


def test_builtin_support_matrix():
    assert supported_recipes("tensorrt") == ["w8a8", "fp8", "w4a16"]
    assert supported_recipes("onnxruntime") == list(RECIPES)
    for name in ("w8a8", "w4a16"):
        check_recipe_for_target(RECIPES[name], "tensorrt")
    for recipe in RECIPES.values():
        check_recipe_for_target(recipe, "onnxruntime")


@pytest.mark.parametrize("name, reason", [
    ("w4a8", "TensorRT has no INT4 x INT8 GEMM"),
    ("w4a4", "TensorRT has no INT4 activations"),
    ("w3a3", "TensorRT has no INT3 activations"),
    ("w5a5", "TensorRT has no INT5 activations"),
])
def test_tensorrt_refuses_with_recipe_reason_and_alternatives(name, reason):
    with pytest.raises(RecipeTargetError) as e:
        check_recipe_for_target(RECIPES[name], "tensorrt")
    msg = str(e.value)
    assert f"recipe {name!r} cannot run on target 'tensorrt'" in msg
    assert reason in msg
    assert "recipes that work there: w8a8, fp8, w4a16" in msg
    assert "--target onnxruntime" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("recipe, ok, reason", [
    (Recipe("w6a8", w_bits=6, a_bits=8), True, None),  # 6-bit grid held exactly in int8
    (Recipe("w8a6", w_bits=8, a_bits=6), False, "no INT6 activations"),
    (Recipe("w3a8", w_bits=3, a_bits=8), False, "no INT4 x INT8 GEMM"),
    (Recipe("w8a8-asym", w_bits=8, a_bits=8, a_symmetric=False), False, "symmetric activations"),
    (Recipe("w8a8-block", w_bits=8, a_bits=8, w_granularity="block"), False, "INT4 weight-only"),
    (Recipe("w4a16-ch", w_bits=4, a_bits=None), False, "block-wise"),
    (Recipe("w8a16", w_bits=8, a_bits=None), False, "INT4 weights only"),
    (Recipe("w3a16", w_bits=3, a_bits=None, w_granularity="block"), True, None),
])
def test_custom_recipes_on_tensorrt(recipe, ok, reason):
    problem = recipe_problem(recipe, "tensorrt")
    assert (problem is None) == ok
    if not ok:
        assert reason in problem
        with pytest.raises(RecipeTargetError, match=recipe.name):
            check_recipe_for_target(recipe, "tensorrt")
    assert recipe_problem(recipe, "onnxruntime") is None


def test_custom_toml_recipe_is_refused_by_name(tmp_path):
    path = tmp_path / "w8a4.toml"
    path.write_text('[recipe]\nbase = "w8a8"\nname = "w8a4-custom"\na_bits = 4\n')
    with pytest.raises(RecipeTargetError, match="'w8a4-custom'.*no INT4 activations"):
        check_recipe_for_target(load_recipe_toml(str(path)), "tensorrt")


def test_unknown_target_names_the_known_ones():
    with pytest.raises(RecipeTargetError, match="unknown target 'openvino'; choose one of tensorrt, onnxruntime"):
        check_recipe_for_target(RECIPES["w8a8"], "openvino")
    with pytest.raises(RecipeTargetError):
        supported_recipes("tflite")
    assert TARGETS == ("tensorrt", "onnxruntime")
    assert issubclass(RecipeTargetError, ValueError) and issubclass(RecipeTargetError, ExportError)
