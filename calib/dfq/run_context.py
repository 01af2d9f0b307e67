"""What the stages of one calibration run share: the models, the resolved config, the run state, and the
record of times, curves and final losses that becomes the run's summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.distributed import DistContext
from maskaq_deploy.calib.dfq.models import TokenLayout
from maskaq_deploy.calib.dfq.state import RunState


@dataclass
class Record:
    """Filled by the stages, returned in the summary."""

    seconds: dict[str, float] = field(default_factory=lambda: {"synthesis": 0.0, "calibration": 0.0,
                                                               "reconstruction": 0.0, "finetune": 0.0})
    curves: dict[str, list] = field(default_factory=lambda: {"synthesis": [], "reconstruction": [],
                                                             "finetune": []})
    final: dict[str, dict] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # saved image grids
    synthesis_workers: int | None = None  # the worker processes the last synthesis round used (1: this process)


@dataclass
class RunContext:
    method: str
    cfg: DFQConfig  # the config the method actually runs (effective_config)
    teacher: nn.Module  # P, frozen
    q_model: nn.Module  # Q, trained in place
    layout: TokenLayout
    num_classes: int
    input_size: tuple[int, int, int]
    mean: torch.Tensor  # [C]
    std: torch.Tensor
    device: torch.device
    autocast_dtype: torch.dtype | None
    dist: DistContext
    state: RunState
    emit: Callable[[dict], None]
    save_images: bool
    real_images: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None
    synthesis_workers: int = 1  # local one-thread synthesis processes (calib.dfq.workers); 1: in this process
    record: Record = field(default_factory=Record)


def batches(images: torch.Tensor, size: int, device):
    for i in range(0, images.shape[0], size):
        yield images[i:i + size].to(device).float()
