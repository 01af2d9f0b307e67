"""maskaq-deploy: data-free quantization (MaskAQ) and edge deployment for timm Vision Transformers.

The Python API (names resolve on first use, so ``import maskaq_deploy`` and the CLI's ``--help`` stay fast):

    from maskaq_deploy import CalibrateConfig, ModelConfig, Run, build, calibrate, export_run, verify
    run = calibrate(ModelConfig(), CalibrateConfig(method="maskaq", recipe="w8a8"), "runs/w8a8")
    export_run(run, "onnxruntime")                  # RUN/model.qdq.onnx and RUN/model.onnx
    print(verify(run, runtime="onnxruntime").report.runtimes)

``get_recipe`` and ``attach_quantizers`` quantize a timm model in place for your own calibration loop. The
export stage is ``export_run`` (also ``maskaq_deploy.pipeline.export``): the name ``maskaq_deploy.export`` is
the exporter subpackage, and Python binds a subpackage's name on its parent once it is imported.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "calibrate": "maskaq_deploy.pipeline",
    "export_run": "maskaq_deploy.pipeline",
    "evaluate": "maskaq_deploy.pipeline",
    "verify": "maskaq_deploy.pipeline",
    "build": "maskaq_deploy.pipeline",
    "Run": "maskaq_deploy.run",
    "CalibrateConfig": "maskaq_deploy.config",
    "ModelConfig": "maskaq_deploy.models",
    "Manifest": "maskaq_deploy.records",
    "Report": "maskaq_deploy.records",
    "get_recipe": "maskaq_deploy.calib",
    "attach_quantizers": "maskaq_deploy.calib",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'maskaq_deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted([*globals(), *_LAZY])
