"""The target / recipe matrix: what TensorRT refuses, why, and what it suggests instead; and the one definition
of the runtime / flavour / target names that the CLI's choices and every refusal are generated from."""

import json

import click
import pytest

from maskaq_deploy.calib.recipes import RECIPES, Recipe, load_recipe_toml
from maskaq_deploy.cli import cli, with_flags
from maskaq_deploy.export.errors import ExportError
from maskaq_deploy.export.registry import get_flavour
from maskaq_deploy.runtimes.registry import BACKENDS, get_backend
from maskaq_deploy.runtimes.targets import FLAVOURS, RUNTIMES, Runtime, names
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
    assert "(or use `target` onnxruntime, which runs every recipe)" in msg  # the library names the setting
    assert "(or use --target onnxruntime, which runs every recipe)" in with_flags(msg)  # the CLI, its flag
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
    with pytest.raises(RecipeTargetError,
                       match="unknown target 'openvino'; choose one of onnxruntime, tensorrt, torch"):
        check_recipe_for_target(RECIPES["w8a8"], "openvino")
    with pytest.raises(RecipeTargetError):
        supported_recipes("tflite")
    assert TARGETS == ("onnxruntime", "tensorrt", "torch")
    assert supported_recipes("torch") == list(RECIPES)  # the fake-quant model runs every grid
    assert issubclass(RecipeTargetError, ValueError) and issubclass(RecipeTargetError, ExportError)


def _choices(command: str, option: str) -> list[str]:
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


def test_names_are_defined_once_and_read_everywhere():
    """The CLI's choices, the backends, the export flavours and the recipe matrix all read runtimes.targets."""
    assert [m.value for m in Runtime] == ["torch", "onnxruntime", "tensorrt"]
    assert _choices("verify", "runtime") == names(RUNTIMES) == list(BACKENDS)
    assert _choices("export", "flavour") == names(FLAVOURS) == ["onnxruntime", "tensorrt"]
    assert _choices("build", "target") == names(TARGETS) == ["onnxruntime", "tensorrt", "torch"]
    assert all(get_flavour(f).name == f for f in FLAVOURS)
    assert all(get_backend(r).name == r for r in RUNTIMES)


def test_a_name_reads_as_its_plain_string():
    """Members go into messages, manifests, ONNX metadata and report keys: they must read as the plain name."""
    t = Runtime.TENSORRT
    assert t == "tensorrt" and {t: 1}["tensorrt"] == 1
    assert (str(t), f"{t}", repr(t), json.dumps({t: t})) == ("tensorrt", "tensorrt", "'tensorrt'",
                                                             '{"tensorrt": "tensorrt"}')


@pytest.mark.parametrize("refuse, kind, line", [
    (lambda: get_flavour("tflite"), ExportError,
     "unknown export flavour 'tflite'; choose one of onnxruntime, tensorrt"),
    (lambda: get_backend("openvino"), ValueError,
     "unknown runtime 'openvino'; choose one of torch, onnxruntime, tensorrt"),
    (lambda: supported_recipes("openvino"), RecipeTargetError,
     "unknown target 'openvino'; choose one of onnxruntime, tensorrt, torch"),
])
def test_every_refusal_of_an_unknown_name_lists_the_defined_ones(refuse, kind, line):
    with pytest.raises(kind) as e:
        refuse()
    assert str(e.value) == line
