"""BuildOptions: one object for how a build runs, built once (by the CLI or a Python caller), validated when made;
pipeline.build's flat keywords map onto it."""

import pytest

from maskaq_deploy import BuildOptions, CalibrateOptions, ExportOptions, VerifyOptions
from maskaq_deploy.errors import UsageError
from maskaq_deploy.gate import thresholds


def test_flat_keywords_land_in_their_part():
    limits = thresholds(max_drop=0.5)
    options = BuildOptions.from_keywords(target="tensorrt", force=True, limit=64, float_dtype="fp16",
                                         limits=limits, command="maskaq-deploy build")
    assert options == BuildOptions(CalibrateOptions(force=True), ExportOptions(target="tensorrt", float_dtype="fp16"),
                                   VerifyOptions(limit=64, limits=limits), command="maskaq-deploy build")
    assert BuildOptions.from_keywords() == BuildOptions()  # the defaults of the old keywords
    assert set(BuildOptions.KEYWORDS) == {"force", "resume", "target", "dynamic_batch", "bundle_only",
                                          "float_dtype", "val_data", "limit", "limits", "batch_size",
                                          "sensitivity_images"}


def test_an_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="unknown build option"):
        BuildOptions.from_keywords(targt="tensorrt")


@pytest.mark.parametrize("make,fragment", [
    (lambda: ExportOptions(target="openvino"), "unknown `target` 'openvino'"),
    (lambda: ExportOptions(target="tensorrt", float_dtype="fp64"), "unknown `float_dtype`"),
    (lambda: ExportOptions(target="onnxruntime", float_dtype="fp16"), "is for `target` tensorrt"),
    (lambda: VerifyOptions(limit=0), "`limit`"),
    (lambda: VerifyOptions(sensitivity_images=-1), "sensitivity_images"),
])
def test_options_are_validated_when_made(make, fragment):
    """In library terms (option keys in backquotes; the CLI renders them as flags), never a CLI flag."""
    with pytest.raises(UsageError, match=fragment) as e:
        make()
    assert "--" not in str(e.value)


def test_build_takes_options_or_keywords_not_both():
    from maskaq_deploy import CalibrateConfig, ModelConfig, build

    with pytest.raises(TypeError, match="not both"):
        build(ModelConfig(), CalibrateConfig(), "unused", BuildOptions(), target="torch")
