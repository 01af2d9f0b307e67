"""Fine-tuning Q on a (synthetic or real) image set by distillation from the frozen teacher P.

    loss = kd_weight * KL(softmax(P / T) || softmax(Q / T))
         + attn_dist_weight * masked-SSIM(P's attention outputs, Q's attention outputs)
         + ce_weight * CE(Q, target labels)          (0 by default, as in the reference)

Trained: every parameter of Q -- weights and biases, LayerNorm, embeddings, the weight quantizers' scales and
the activation quantizers' LSQ step sizes. SGD with Nesterov momentum, learning rate cosine-annealed per step.
Both models stay in eval mode (no dropout / stochastic depth), so a step depends only on the seeded data
order and augmentation: an epoch is reproducible from (seed, epoch) alone.

Data-parallel (``dist`` with several processes, Q wrapped in DistributedDataParallel): ``ft_batch_size`` stays
the global batch. Every rank draws the same permutation and the augmentation of the whole global batch from
the same generators, then keeps its own contiguous slice, so the images a step sees do not depend on the number
of processes. Each rank's loss is the mean over its slice scaled by ``world * slice / batch``; DDP averages the
gradients over the ranks, which then equal the gradient of the global-batch mean (also for a last, uneven
batch). The result matches a one-process run up to floating-point summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maskaq_deploy.calib.dfq import losses as L
from maskaq_deploy.calib.dfq.augment import resized_crop_flip
from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.distributed import DistContext, DistributedError
from maskaq_deploy.calib.dfq.models import Capture, TokenLayout, group_by_shape
from maskaq_deploy.calib.dfq.state import derive_seed, generators
from maskaq_deploy.calib.dfq.synthesis import autocast_ctx


def make_optimizer(student: nn.Module, cfg: DFQConfig) -> torch.optim.SGD:
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    ft = cfg.finetune
    return torch.optim.SGD(params, lr=ft.lr, momentum=ft.momentum, nesterov=ft.momentum > 0,
                           weight_decay=ft.weight_decay)


def lr_at(cfg: DFQConfig, step: int, total: int) -> float:
    lo = cfg.finetune.lr * cfg.finetune.lr_min_ratio
    return lo + (cfg.finetune.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def steps_per_epoch(num_images: int, cfg: DFQConfig) -> int:
    return math.ceil(num_images / cfg.finetune.batch_size)


def distill_terms(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                  cfg: DFQConfig, layout: TokenLayout, cap_p: Capture, cap_q: Capture,
                  autocast_dtype) -> dict[str, torch.Tensor]:
    dev = x.device
    with torch.no_grad(), autocast_ctx(dev, autocast_dtype):
        p_out = teacher(x)
    # Q's fake quantizers round x / scale in the activations' dtype: under bf16 that misplaces 8-bit codes,
    # so Q trains in float32 unless bf16 was asked for explicitly (autocast = "bf16").
    with autocast_ctx(dev, autocast_dtype if cfg.autocast == "bf16" else None):
        q_out = student(x)
    terms = {"kd": L.kd_kl(q_out, p_out, cfg.finetune.kd_temperature)}
    if cfg.finetune.attn_dist_weight:
        pairs = zip(group_by_shape(cap_p.outputs()), group_by_shape(cap_q.outputs()))
        total = len(cap_p.mods)
        terms["attn"] = sum(L.masked_output_ssim(pt, qt, layout.num_prefix, cfg.finetune.attn_dist_top,
                                                 cfg.finetune.attn_dist_high) * (n / total)
                            for (n, pt), (_, qt) in pairs)
    if cfg.finetune.ce_weight and y is not None:
        terms["ce"] = F.cross_entropy(q_out.float(), y)
    return terms


@torch.no_grad()
def holdout_kl(teacher: nn.Module, student: nn.Module, images: torch.Tensor, cfg: DFQConfig,
               device: torch.device, autocast_dtype) -> float:
    """Mean KL(softmax(P) || softmax(Q)) at temperature 1 over ``images``, unaugmented: how far Q is from P on
    images the fine-tune does not train on (the judgement of a guarded fine-tune)."""
    student, total = _unwrap(student), 0.0
    for i in range(0, images.shape[0], cfg.finetune.batch_size):
        x = images[i:i + cfg.finetune.batch_size].to(device).float()
        with autocast_ctx(device, autocast_dtype):
            p_out = teacher(x)
        total += float(L.kd_kl(student(x), p_out, 1.0)) * x.shape[0]
    return total / images.shape[0]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def finetune_epoch(teacher: nn.Module, student: nn.Module, opt: torch.optim.Optimizer,
                   images: torch.Tensor, labels: torch.Tensor | None, cfg: DFQConfig, layout: TokenLayout,
                   epoch: int, device: torch.device, autocast_dtype,
                   on_log: Callable[[int, int, dict[str, float]], None] | None = None,
                   dist: DistContext | None = None) -> dict[str, float]:
    """One pass over ``images`` (normalized, any float dtype, on CPU or device); returns mean losses.

    ``student``: Q, or Q in DistributedDataParallel when ``dist`` has several processes (every rank then holds
    the same ``images`` and calls this for the same epoch; the returned losses are global means).
    """
    n = images.shape[0]
    per_epoch = steps_per_epoch(n, cfg)
    total = per_epoch * cfg.finetune.epochs
    world, rank = (dist.world_size, dist.rank) if dist is not None and dist.enabled else (1, 0)
    gen, cpu_gen = generators(derive_seed(cfg.seed, "finetune", epoch), device)
    order = torch.randperm(n, generator=cpu_gen)
    weights = {"kd": cfg.finetune.kd_weight, "attn": cfg.finetune.attn_dist_weight, "ce": cfg.finetune.ce_weight}
    sums: dict[str, torch.Tensor] = {}
    student.eval()
    teacher.eval()
    with Capture(teacher) as cap_p, Capture(_unwrap(student)) as cap_q:
        for i in range(per_epoch):
            idx = order[i * cfg.finetune.batch_size:(i + 1) * cfg.finetune.batch_size]
            x = images[idx].to(device, non_blocking=True).float()
            y = labels[idx].to(device) if labels is not None else None
            # augmented whole on every rank, so the random draws do not depend on the number of processes
            x = resized_crop_flip(x, cfg.finetune.crop_min, cfg.finetune.flip, gen)
            share = 1.0
            if world > 1:
                x, y, share = local_slice(x, y, rank, world)
            step = epoch * per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, total)
            terms = distill_terms(teacher, student, x, y, cfg, layout, cap_p, cap_q, autocast_dtype)
            loss = sum(weights[k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            if world > 1:
                # DDP averages over ranks: world * share turns that average into the global-batch mean
                _backward(loss * (share * world), dist)
            else:
                loss.backward()
            opt.step()
            cap_p.clear()
            cap_q.clear()
            for k, v in {**terms, "total": loss}.items():
                d = v.detach() * share if world > 1 else v.detach()  # per rank: its share of the global mean
                sums[k] = sums.get(k, 0.0) + d
            if on_log is not None and (i % cfg.log_every == 0 or i == per_epoch - 1):
                logged = {k: v.detach() for k, v in terms.items()}
                logged["total"] = loss.detach()
                if world > 1:
                    logged = _global(logged, share, dist)
                on_log(step, total, {k: float(v) for k, v in logged.items()})
    if world > 1:
        sums = _global(sums, 1.0, dist)
    return {k: float(v) / per_epoch for k, v in sums.items()}


def local_slice(x: torch.Tensor, y: torch.Tensor | None, rank: int, world: int):
    """This rank's contiguous part of the global batch and its share of it. A rank left with no image (a last
    batch smaller than the world) still runs one image with share 0, so that it joins the gradient all-reduce."""
    bounds = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    if len(bounds) == 0:
        return x[:1], (y[:1] if y is not None else None), 0.0
    lo, hi = int(bounds[0]), int(bounds[-1]) + 1
    return x[lo:hi], (y[lo:hi] if y is not None else None), (hi - lo) / x.shape[0]


def _backward(loss: torch.Tensor, dist: DistContext) -> None:
    try:
        loss.backward()  # DDP all-reduces the gradients here
    except DistributedError:
        raise
    except RuntimeError as e:
        raise dist.failure("gradient all-reduce of a fine-tune step", e) from None


def _global(values: dict[str, torch.Tensor], share: float, dist: DistContext) -> dict[str, torch.Tensor]:
    """Per-rank means (weighted by their share of the batch) summed over the ranks: the global-batch values."""
    keys = list(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()) * share for k in keys])
    summed = dist.all_reduce_sum(stacked.detach(), "all-reduce of the fine-tune losses")
    return dict(zip(keys, summed.unbind()))
