"""One root for every typed error, the exit code on the class, and the CLI's rendering of a library message."""

import importlib
import inspect
import pkgutil

import pytest

import maskaq_deploy
from maskaq_deploy.cli import cli_line, with_flags
from maskaq_deploy.errors import EXIT_FAILURE, EXIT_USAGE, Bf16BuildError, MaskAQDeployError

SKIP = ("maskaq_deploy.__main__", "maskaq_deploy.export.templates")  # the CLI's entry, a script for the device
INTERNAL = {"_Stop"}  # private control flow, caught where it is raised


def project_exception_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(maskaq_deploy.__path__, "maskaq_deploy."):
        if info.name.startswith(SKIP):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_error_of_the_project_derives_from_the_one_root():
    classes = project_exception_classes()
    assert len(classes) > 25
    stray = sorted(q for q, c in classes.items() if not issubclass(c, MaskAQDeployError)
                   and q.rsplit(".", 1)[1] not in INTERNAL)
    assert stray == []
    roots = sorted(q for q, c in classes.items() if MaskAQDeployError in c.__bases__)
    assert roots == ["maskaq_deploy.calib.dfq.workers.WorkersUnavailable", "maskaq_deploy.calib.errors.QuantError",
                     "maskaq_deploy.errors.MaskAQError", "maskaq_deploy.export.errors.ExportError",
                     "maskaq_deploy.runtimes.errors.BackendError"]
    names = [q.rsplit(".", 1)[1] for q in classes]
    assert len(names) == len(set(names)), "two error classes share a name"


# the exit codes the CLI has always ended with, by error class
EXIT_CODES = {
    "calib.errors.QuantError": 1, "calib.errors.RecipeError": 2, "calib.errors.UnsupportedModelError": 2,
    "calib.errors.CheckpointError": 1, "calib.dfq.errors.DFQConfigError": 2, "calib.dfq.errors.ResumeError": 2,
    "calib.dfq.errors.SynthesisError": 1, "calib.dfq.distributed.DistributedError": 1,
    "export.errors.ExportError": 1, "export.errors.ExportInputError": 2, "export.errors.UnsupportedOpError": 2,
    "export.errors.TargetError": 2, "export.errors.OnnxFileError": 2, "export.errors.NoQDQError": 2,
    "export.targets.RecipeTargetError": 2, "export.tensorrt.TensorRTError": 1,
    "export.tensorrt.EngineUnavailable": 1, "export.tensorrt.EngineBuildError": 1, "export.bundle.BundleError": 1,
    "runtimes.errors.BackendError": 1, "runtimes.errors.BackendUnavailable": 1,
    "runtimes.registry.UnknownBackendError": 1,
    "errors.MaskAQError": 1, "errors.UsageError": 2, "errors.ModelError": 2, "errors.DataError": 2,
    "errors.OutputExistsError": 2, "errors.RunLockedError": 2, "errors.ProvenanceError": 2,
    "errors.Bf16BuildError": 2, "errors.NonFiniteError": 1,
}


@pytest.mark.parametrize("qualname, code", sorted(EXIT_CODES.items()))
def test_the_exit_code_is_the_classes_own(qualname, code):
    module, name = f"maskaq_deploy.{qualname}".rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert cls.exit_code == code and code in (EXIT_FAILURE, EXIT_USAGE)


def test_the_exporter_and_the_quantizer_raise_the_same_unsupported_model_error():
    from maskaq_deploy.calib.errors import UnsupportedModelError as from_calib
    from maskaq_deploy.export.errors import UnsupportedModelError as from_export

    assert from_calib is from_export


@pytest.mark.parametrize("library, cli", [
    ("keep that layer in float with `keep_fp`", "keep that layer in float with --keep-fp"),
    ("check `model` and `model_kwargs`", "check --model and --model-kwargs"),
    ("`float_dtype` fp16 is for `flavour` tensorrt", "--float-dtype fp16 is for --for tensorrt"),
    ("give a TOML file as `config_file`", "give a TOML file as --config"),
    ("no option key here: 'a`b' stays", "no option key here: 'a`b' stays"),
])
def test_the_cli_turns_option_keys_into_flags(library, cli):
    assert with_flags(library) == cli


def test_a_bf16_build_is_refused_by_the_library_before_any_work(tmp_path):
    from maskaq_deploy.config import CalibrateConfig
    from maskaq_deploy.models import ModelConfig
    from maskaq_deploy.pipeline import build

    out = tmp_path / "run"
    with pytest.raises(Bf16BuildError) as e:
        build(ModelConfig(), CalibrateConfig(), out, target="tensorrt", float_dtype="bf16")
    assert e.value.exit_code == EXIT_USAGE and not out.exists()
    assert "no CPU kernel for bf16" in str(e.value) and "--" not in str(e.value)  # library terms only
    assert cli_line(e.value, str(e.value)).endswith(
        "export bf16 with 'maskaq-deploy export RUN --for tensorrt --float-dtype bf16'")
