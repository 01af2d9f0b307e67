"""Observer calibration: run batches through the model, then fix every activation quantizer's range.

Calibration data enters through one callback, ``forward_loop(model)``, so any image source (real images,
MaskAQ or PSAQ synthetic images, Gaussian noise) plugs in without the quantizers knowing which.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from maskaq_deploy.calib.errors import QuantError
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer
from maskaq_deploy.calib.quantize import iter_quantizers

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_observers(model: nn.Module, forward_loop: Callable[[nn.Module], None]) -> int:
    """Calibrate all activation quantizers of ``model`` on what ``forward_loop`` feeds it.

    Weight quantizers are (re)initialized from the current weights with their own observer. Returns the number
    of activation quantizers calibrated. A quantizer that saw no data (e.g. a branch the loop never ran) raises.
    """
    acts = [(n, q) for n, q in iter_quantizers(model) if isinstance(q, ActQuantizer)]
    for name, q in iter_quantizers(model):
        if isinstance(q, WeightQuantizer):
            weight = model.get_submodule(name.rpartition(".")[0]).weight
            q.init_from(weight)
            if not bool(torch.isfinite(q.scale).all()):
                raise QuantError(f"weight quantizer {name} got a NaN or infinite scale: the weights are not finite")
    was_training = model.training
    model.eval()
    for _, q in acts:
        q.observer.reset()
        q.calibrating = True
    try:
        forward_loop(model)
        for name, q in acts:
            if not q.observer.has_data:
                raise RuntimeError(f"activation quantizer {name} saw no calibration data")
            q.finish_calibration()
            if not bool(torch.isfinite(q.scale).all()) or not bool(torch.isfinite(q.zero_point).all()):
                raise QuantError(f"activation quantizer {name} got a NaN or infinite scale: its inputs were not "
                                 "finite; check the calibration images, or keep that layer in float with `keep_fp`")
    finally:
        for _, q in acts:
            q.calibrating = False
        model.train(was_training)
    log.info("calibrated %d activation quantizers", len(acts))
    return len(acts)


def batches_forward_loop(batches, device: str | torch.device = "cpu") -> Callable[[nn.Module], None]:
    """A forward_loop over an iterable of image batches (tensors, or (images, labels) pairs)."""

    def loop(model: nn.Module) -> None:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))

    return loop
