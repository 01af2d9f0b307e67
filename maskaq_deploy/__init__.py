"""maskaq-deploy: data-free quantization (MaskAQ) and edge deployment for timm Vision Transformers.

The Python API (names resolve on first use, so ``import maskaq_deploy`` and the CLI's ``--help`` stay fast):

    from maskaq_deploy import (BuildOptions, CalibrateConfig, ExportOptions, ModelConfig, Run, VerifyOptions, build,
                               calibrate, export_run, verify)
    run = calibrate(ModelConfig(), CalibrateConfig(method="maskaq", recipe="w8a8"), "runs/w8a8")
    export_run(run, "onnxruntime")                  # RUN/model.qdq.onnx and RUN/model.onnx
    print(verify(run, runtime="onnxruntime").report.runtimes)

    # the whole chain, its options in one object (or as flat keywords: build(..., target="tensorrt"))
    options = BuildOptions(export=ExportOptions(target="tensorrt"), verify=VerifyOptions(limit=256))
    result = build(ModelConfig(), CalibrateConfig(), "runs/trt", options)


Every error it raises is a ``MaskAQDeployError`` with a one-line message and an ``exit_code``.
``get_recipe`` and ``attach_quantizers`` quantize a timm model in place for your own calibration loop. The
export stage is ``export_run`` (also ``maskaq_deploy.pipeline.export``): the name ``maskaq_deploy.export`` is
the exporter subpackage, and Python binds a subpackage's name on its parent once it is imported.
"""

import importlib

__version__ = "0.1.0"

# where each public name lives; imported on first use
_API = {
    "maskaq_deploy.pipeline": ("calibrate", "export_run", "evaluate", "verify", "build"),
    "maskaq_deploy.run": ("Run",),
    "maskaq_deploy.config": ("CalibrateConfig", "BuildOptions", "CalibrateOptions", "ExportOptions", "VerifyOptions"),
    "maskaq_deploy.models": ("ModelConfig",),
    "maskaq_deploy.records": ("Manifest", "Report"),
    "maskaq_deploy.calib": ("get_recipe", "attach_quantizers"),
    "maskaq_deploy.errors": ("MaskAQDeployError",),  # the root of every error the package raises
}
_HOME = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'maskaq_deploy' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOME[name]), name)
    return value


def __dir__():
    return sorted([*globals(), *_HOME])
