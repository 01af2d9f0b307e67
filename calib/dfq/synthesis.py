"""Image synthesis: optimize a batch of pixels against the teacher P (and, for MaskAQ, the quantized Q).

MaskAQ loss per step (on an augmented view of the batch):

    L = w_ce CE(P(x), y) + w_interhead L_interhead + w_tv TV(x) + w_mask L_mask - w_entropy H

PSAQ-ViT loss: w_ce CE + w_tv TV - w_entropy H_kde (entropy of patch similarity of the attention outputs by
kernel density estimate, summed over layers; Q is not used). Both run through the same loop, optimizer,
schedule and augmentation, so the comparison isolates the loss. ``y`` is the batch's labels, or with
``soft_label_mix > 0`` target probabilities that put part of each image's weight on a second class.

Token layout. ViT / DeiT: prefix tokens (CLS, distillation, registers) are dropped from every patch statistic;
the informative-region mask scores patches by the CLS row averaged over layers and heads (no CLS: the mean
logit each patch receives). Swin: attention lives in windows, so the entropy and the inter-head SSIM are taken
per window (rows and columns are the window's tokens) and averaged over windows; the mask is built per layer
over all of that layer's tokens (an image's windows concatenated, scores = mean logit received) because the
stages have different token grids and cannot share one mask.

Speed. P's parameters are frozen and Q's are frozen for the whole synthesis, so backward computes only the
gradient to the pixels; every loss is vectorized over layers, images and heads (inter-head SSIM uses one
batched Gram matrix over unique head pairs); loss values are read back to the host only every ``log_every``
steps; on CUDA the model forwards run under bf16 autocast while the losses compute in float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from maskaq_deploy.calib.dfq import losses as L
from maskaq_deploy.calib.dfq.augment import synthesis_augment
from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.errors import DFQConfigError
from maskaq_deploy.calib.dfq.models import Capture, TokenLayout, frozen, group_by_shape
from maskaq_deploy.calib.dfq.state import derive_seed, generators

log = logging.getLogger(__name__)


@dataclass
class SynthesisSetup:
    """What stays fixed across the batches of one synthesis round."""

    teacher: nn.Module
    student: nn.Module | None  # None: Q not in the loop (PSAQ, or MaskAQ with w_mask = 0)
    layout: TokenLayout
    cfg: DFQConfig
    method: str  # "maskaq" | "psaq"
    device: torch.device
    input_size: tuple[int, int, int]
    mean: torch.Tensor  # [1, C, 1, 1] on device
    std: torch.Tensor
    autocast_dtype: torch.dtype | None

    @property
    def lo(self) -> torch.Tensor:
        return -self.mean / self.std

    @property
    def hi(self) -> torch.Tensor:
        return (1 - self.mean) / self.std


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def _layer_mean(items: list[tuple[int, torch.Tensor]], fn) -> torch.Tensor:
    """Mean over layers of ``fn(stacked group)`` where each group's value is already a mean over its layers."""
    total = sum(n for n, _ in items)
    return sum(fn(t) * (n / total) for n, t in items)


def _scores(stats: list[L.AttnStats], layout: TokenLayout, batch: int) -> list[torch.Tensor]:
    """Per layer [B, T] patch scores (for a Swin layer: the image's windows concatenated)."""
    out = []
    for st in stats:
        s = st.cls if layout.has_cls else st.headmean.mean(dim=-2)  # [B', P]
        out.append(s.reshape(batch, -1))
    return out


def maskaq_losses(setup: SynthesisSetup, x: torch.Tensor, x_aug: torch.Tensor, y: torch.Tensor, step: int,
                  gen: torch.Generator, cap_p: Capture, cap_q: Capture | None) -> dict[str, torch.Tensor]:
    cfg, lay = setup.cfg, setup.layout
    b = x.shape[0]
    with autocast_ctx(setup.device, setup.autocast_dtype):
        out = setup.teacher(x_aug)
        if cap_q is not None:
            setup.student(x_aug)
    use_mask = cap_q is not None
    need_cls = use_mask and lay.has_cls
    need_mean = cfg.synthesis.w_entropy > 0 or (use_mask and not lay.has_cls)
    p_stats = [L.attention_stats(t, lay.num_prefix, pairs=cfg.maskaq.w_interhead > 0, headmean=need_mean, cls=need_cls)
               for t in cap_p.logits()]
    terms: dict[str, torch.Tensor] = {}
    if cfg.synthesis.w_ce:
        terms["ce"] = F.cross_entropy(out.float(), y)
    if cfg.maskaq.w_interhead:
        groups = zip(*(group_by_shape([getattr(st, k) for st in p_stats]) for k in ("mu", "lo", "hi", "gram")))
        total = len(p_stats)
        terms["interhead"] = sum(L.interhead_ssim_from_stats(mu, lo, hi, gram) * (n / total)
                                 for (n, mu), (_, lo), (_, hi), (_, gram) in groups)
    if cfg.synthesis.w_entropy:
        terms["entropy"] = _layer_mean(group_by_shape([st.headmean for st in p_stats]),
                                       lambda t: L.similarity_entropy_headmean(t, cfg.maskaq.entropy_rows, gen))
    if cfg.synthesis.w_tv:
        terms["tv"] = L.total_variation(x)
    if use_mask:
        ratio = L.mask_ratio(step, cfg.synthesis.iterations, cfg.maskaq.mask_ratio_start, cfg.maskaq.mask_ratio_end)
        q_stats = [L.attention_stats(t, lay.num_prefix, headmean=not lay.has_cls, cls=lay.has_cls)
                   for t in cap_q.logits()]
        sp, sq = _scores(p_stats, lay, b), _scores(q_stats, lay, b)
        if lay.windowed:  # per-layer masks (stages differ in token count)
            terms["mask"] = sum(L.masked_l1(a.unsqueeze(0), q.unsqueeze(0),
                                            L.informative_mask(a.detach(), ratio, cfg.maskaq.mask_drop, gen))
                                for a, q in zip(sp, sq)) / len(sp)
        else:
            sp_t, sq_t = torch.stack(sp), torch.stack(sq)  # [L, B, P]
            mask = L.informative_mask(sp_t.detach().mean(0), ratio, cfg.maskaq.mask_drop, gen)
            terms["mask"] = L.masked_l1(sp_t, sq_t, mask)
    return terms


def psaq_losses(setup: SynthesisSetup, x: torch.Tensor, x_aug: torch.Tensor, y: torch.Tensor,
                cap_p: Capture) -> dict[str, torch.Tensor]:
    cfg, lay = setup.cfg, setup.layout
    with autocast_ctx(setup.device, setup.autocast_dtype):
        out = setup.teacher(x_aug)
    terms: dict[str, torch.Tensor] = {}
    if cfg.synthesis.w_ce:
        terms["ce"] = F.cross_entropy(out.float(), y)
    if cfg.synthesis.w_entropy:
        terms["entropy"] = sum(L.kde_similarity_entropy(t, lay.num_prefix, cfg.psaq.kde_bandwidth,
                                                        cfg.psaq.kde_points)
                               for _, t in group_by_shape(cap_p.outputs()))
    if cfg.synthesis.w_tv:
        terms["tv"] = L.total_variation(x)
    return terms


WEIGHTS = {"ce": "synthesis.w_ce", "interhead": "maskaq.w_interhead", "tv": "synthesis.w_tv", "mask": "maskaq.w_mask",
           "entropy": "synthesis.w_entropy"}


def total_loss(cfg: DFQConfig, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted sum; the entropy is maximized, so it enters with a minus sign."""
    tot = 0.0
    for name, value in terms.items():
        w = attrgetter(WEIGHTS[name])(cfg)
        tot = tot + (-w if name == "entropy" else w) * value
    return tot


def synthesize_batch(setup: SynthesisSetup, labels: torch.Tensor, seed: int,
                     on_log: Callable[[int, dict[str, float]], None] | None = None
                     ) -> tuple[torch.Tensor, dict, list[dict]]:
    """Optimize one batch of images for ``labels``; returns (images float32 on CPU, final losses, curve).

    Deterministic for a given ``seed`` (every random draw comes from generators seeded from it).
    """
    cfg, syn = setup.cfg, setup.cfg.synthesis
    gen, cpu_gen = generators(seed, setup.device)
    c, h, w = (int(v) for v in setup.input_size)
    y = labels.to(setup.device)
    if syn.soft_label_mix > 0:  # its own stream: the hard-label run's draws stay the same
        y = L.soft_targets(labels, _num_classes(setup.teacher), syn.soft_label_mix,
                           torch.Generator().manual_seed(derive_seed(seed, "soft labels"))).to(setup.device)
    img = torch.randn((len(labels), c, h, w), generator=gen, device=gen.device).to(setup.device)
    img.requires_grad_(True)
    opt = torch.optim.AdamW([img], lr=syn.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=syn.weight_decay)
    lo, hi = setup.lo, setup.hi
    use_q = setup.method == "maskaq" and setup.student is not None and cfg.maskaq.w_mask > 0
    curve: list[dict] = []
    last: dict[str, float] = {}
    cap_p = Capture(setup.teacher)
    cap_q = Capture(setup.student) if use_q else None
    student_ctx = frozen(setup.student) if use_q else _null()
    with cap_p, student_ctx, (cap_q if cap_q is not None else _null()):
        for step in range(syn.iterations):
            lr = syn.lr_min + (syn.lr - syn.lr_min) * 0.5 * (1 + math.cos(math.pi * step / syn.iterations))
            for g in opt.param_groups:
                g["lr"] = lr
            x_aug = synthesis_augment(img, step, syn.iterations, jitter=syn.jitter, noise_std=syn.noise_std,
                                      affine_mean=syn.affine_mean, affine_std=syn.affine_std, gen=gen,
                                      cpu_gen=cpu_gen)
            if setup.method == "psaq":
                terms = psaq_losses(setup, img, x_aug, y, cap_p)
            else:
                terms = maskaq_losses(setup, img, x_aug, y, step, gen, cap_p, cap_q)
            loss = total_loss(cfg, terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cap_p.clear()
            if cap_q is not None:
                cap_q.clear()
            with torch.no_grad():
                img.copy_(torch.maximum(torch.minimum(img, hi), lo))
            if step % cfg.log_every == 0 or step == syn.iterations - 1:
                last = {k: float(v.detach()) for k, v in terms.items()}
                last["total"] = float(loss.detach())
                curve.append({"iteration": step, **last})
                if on_log is not None:
                    on_log(step, last)
    return img.detach().float().cpu(), last, curve


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or n < 2:
        raise DFQConfigError(f"soft labels need the model's class count; {type(model).__name__} has no "
                             "num_classes >= 2 (set soft_label_mix = 0)")
    return n


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
