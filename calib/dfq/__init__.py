"""Data-free calibration of quantized ViTs: MaskAQ synthesis and fine-tuning, and the baselines (PSAQ-ViT,
Gaussian noise, real images) through the same code.

    from maskaq_deploy.calib.dfq import DFQConfig, run_calibration
    summary = run_calibration(fp_model, q_model, method="maskaq", config=DFQConfig.from_preset("fast"),
                              data_config={"mean": ..., "std": ..., "input_size": (C, H, W)}, run_dir=RUN)
"""

from maskaq_deploy.calib.dfq.config import (PRESETS, CalibrationConfig, DFQConfig, FinetuneConfig,
                                            MaskAQConfig, NoiseConfig, PSAQConfig, RealConfig, ReconstructionConfig,
                                            SynthesisConfig, load_dfq_toml, preset_values)
from maskaq_deploy.calib.dfq.errors import DFQConfigError, ResumeError, SynthesisError
from maskaq_deploy.calib.dfq.images import save_image_grid
from maskaq_deploy.calib.dfq.methods import effective_config, run_calibration
from maskaq_deploy.calib.dfq.sources import SOURCES, Source, method_names, register

__all__ = [
    "PRESETS",
    "SOURCES",
    "Source",
    "CalibrationConfig",
    "DFQConfig",
    "DFQConfigError",
    "FinetuneConfig",
    "MaskAQConfig",
    "NoiseConfig",
    "PSAQConfig",
    "RealConfig",
    "ReconstructionConfig",
    "ResumeError",
    "SynthesisConfig",
    "SynthesisError",
    "effective_config",
    "load_dfq_toml",
    "method_names",
    "preset_values",
    "register",
    "run_calibration",
    "save_image_grid",
]
