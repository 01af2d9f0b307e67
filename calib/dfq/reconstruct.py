"""Block-wise reconstruction of Q against P on the calibration set (BRECQ / QDrop style, our own code).

For each unit in forward order (a ViT block; a Swin patch merging or block), Q's copy of the unit is trained to
reproduce P's output of that unit:

    loss = mean over tokens and channels of (Q_unit(x_mix) - P_unit(x_p))^2

``x_p`` is the unit's input in P (the float model on the same image), ``x_q`` its input in Q (after the units
already reconstructed, so later units learn to absorb earlier errors); ``x_mix`` takes each element from
``x_p`` with probability ``recon_drop`` and from ``x_q`` otherwise (QDrop's mixing: the unit sees both clean
and quantization-perturbed inputs, which flattens the loss it is tuned on and overfits a few hundred images
less than a model-level objective). Trained per unit: the quantizers' step sizes (LSQ, Adam at ``recon_lr``,
capped at 5% of each scale tensor's mean per step and floored at 1% of its start, so scales stay positive at any
bit width) and the float weights, biases and norms (Adam at ``recon_weight_lr``, small, so the weights move by about
a rounding step: the effect of learned rounding without a rounding variable per weight). Both learning rates
are cosine-annealed over ``recon_iters`` steps of ``recon_batch_size`` samples.

With ``recon_focus = a`` (> 0, ViT/DeiT), the squared error of token ``t`` in image ``n`` is weighted by
``(1 - a) + a * T * r[n, t]``, where ``r`` is how much P's readout (the class token, or the mean of the patch
tokens) depends on that token of the unit's output: attention rollout from the readout back through the later
blocks, each block counted as half residual, half its head-averaged attention. The weights average 1 over the
tokens, so ``a = 0`` is the plain MSE; a larger ``a`` spends the unit's few parameters on the tokens the rest
of the network reads (the last block's patch tokens, for a class-token model, are read by nobody) -- MaskAQ's
"informative patches", applied to the reconstruction.

Determinism: unit ``i`` draws its batch order and mixing masks from ``derive_seed(seed, "recon", i)``.
Resume: Q is saved after every unit, with the number of units done; a resumed run continues at the next unit
and gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.models import Capture, token_layout
from maskaq_deploy.calib.dfq.state import derive_seed
from maskaq_deploy.calib.families import DEIT_DISTILLED

QUANTIZER_KEY = "_quantizer."


class _Stop(Exception):
    pass


def reconstruction_units(model: nn.Module) -> list[str]:
    """Names of the units reconstructed one after another, in forward order (the same in P and Q)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):  # ViT / DeiT
        return [f"blocks.{i}" for i in range(len(blocks))]
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.Sequential):  # Swin: stages of [patch merging] + blocks
        names = []
        for i, stage in enumerate(layers):
            if not isinstance(getattr(stage, "downsample", None), (nn.Identity, type(None))):
                names.append(f"layers.{i}.downsample")
            names += [f"layers.{i}.blocks.{j}" for j in range(len(stage.blocks))]
        return names
    return []


@torch.no_grad()
def unit_io(model: nn.Module, unit: str, images: torch.Tensor, batch_size: int, device,
            want_output: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input (and output) of submodule ``unit`` over ``images``, on the CPU in float32. The forward stops
    right after the unit when its output is not needed."""
    mod = model.get_submodule(unit)
    ins, outs = [], []

    def hook(_m, args, out):
        ins.append(args[0].detach().float().cpu())
        if not want_output:
            raise _Stop
        outs.append(out.detach().float().cpu())

    handle = mod.register_forward_hook(hook)
    try:
        for i in range(0, images.shape[0], batch_size):
            try:
                model(images[i:i + batch_size].to(device).float())
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(ins), (torch.cat(outs) if want_output else None)


def mixed_input(x_p: torch.Tensor, x_q: torch.Tensor, drop: float, gen: torch.Generator) -> torch.Tensor:
    """Each element from ``x_p`` with probability ``drop``, else from ``x_q`` (``drop`` 0: pure Q input)."""
    if drop <= 0:
        return x_q
    if drop >= 1:
        return x_p
    keep_p = torch.rand(x_q.shape, generator=gen, device=gen.device) < drop
    return torch.where(keep_p.to(x_q.device), x_p, x_q)


SCALE_STEP_CAP = 0.05  # an Adam step moves a quantizer's scales by at most ~5% of their mean magnitude
SCALE_FLOOR = 0.01  # and never below 1% of where they started (a scale must stay positive)


def unit_optimizer(unit: nn.Module, cfg: DFQConfig) -> torch.optim.Adam:
    """Adam over the unit: one group per quantizer scale tensor, at ``recon_lr`` capped relative to the
    tensor's magnitude (8-bit weight scales are ~1e-3, where an absolute step of 1e-3 would flip their sign),
    and one group of float weights at ``recon_weight_lr``."""
    groups, weights = [], []
    for name, p in unit.named_parameters():
        if QUANTIZER_KEY in name:
            lr = min(cfg.reconstruction.lr, SCALE_STEP_CAP * float(p.detach().abs().mean()))
            groups.append({"params": [p], "lr": lr, "base_lr": lr, "floor": p.detach().abs() * SCALE_FLOOR})
        else:
            weights.append(p)
    if cfg.reconstruction.weight_lr > 0 and weights:
        groups.append({"params": weights, "lr": cfg.reconstruction.weight_lr, "base_lr": cfg.reconstruction.weight_lr})
    else:
        for p in weights:
            p.requires_grad_(False)
    return torch.optim.Adam(groups)


def rollout(attn: list[torch.Tensor], readout: torch.Tensor) -> list[torch.Tensor]:
    """Token importance of each block's output. ``attn[l]``: block ``l``'s head-averaged attention [B, T, T]
    (rows sum to 1); ``readout``: [B, T], the weight of each token in what the head reads (sums to 1). The last
    block's output is read by the head alone; block ``l - 1``'s output reaches it through block ``l``, half
    by the residual path, half through the attention: r_{l-1} = r_l (I + A_l) / 2. Each result sums to 1."""
    r, out = readout, [readout]
    for a in reversed(attn[1:]):
        r = 0.5 * (r + torch.einsum("bi,bij->bj", r, a))
        out.append(r)
    return out[::-1]


@torch.no_grad()
def readout_importance(teacher: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor | None:
    """[N, blocks, T]: the rollout of P's readout to each block's output tokens, per image; None for a model
    without one global attention per block (Swin's windows), whose units are then weighted uniformly."""
    layout = token_layout(teacher)
    blocks = getattr(teacher, "blocks", None)
    if layout.windowed or not isinstance(blocks, nn.Sequential):
        return None
    pool = getattr(teacher, "global_pool", "token")
    rows = []
    with Capture(teacher) as cap:
        for i in range(0, images.shape[0], batch_size):
            teacher(images[i:i + batch_size].to(device).float())
            attn = [(lg.float() * m.scale).softmax(-1).mean(1) for lg, m in zip(cap.logits(), cap.mods)]
            b, t = attn[0].shape[0], attn[0].shape[-1]
            readout = torch.zeros(b, t, device=attn[0].device)
            if layout.family == DEIT_DISTILLED:  # the mean of the class and distillation heads
                readout[:, :2] = 0.5
            elif pool == "token" and layout.num_prefix > 0:
                readout[:, 0] = 1.0
            else:  # average pooling (and any other readout): every patch token alike
                readout[:, layout.num_prefix:] = 1.0 / (t - layout.num_prefix)
            rows.append(torch.stack(rollout(attn, readout), 1).cpu())
            cap.clear()
    return torch.cat(rows)


def token_weights(importance: torch.Tensor, focus: float) -> torch.Tensor:
    """[N, T] loss weights of the tokens from their importance (rows summing to 1): ``(1 - focus) + focus * T *
    importance``, which average 1 over the tokens."""
    return (1.0 - focus) + focus * importance.shape[-1] * importance


def reconstruct_unit(q_unit: nn.Module, x_p: torch.Tensor, x_q: torch.Tensor, target: torch.Tensor,
                     cfg: DFQConfig, seed: int, device, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Train ``q_unit`` (in place) so that ``q_unit(mix(x_p, x_q))`` matches ``target`` (squared errors weighted
    per token by ``weights`` [N, T], when given); returns the unit's output MSE (unweighted) on the pure Q
    input before and after, and the last training loss."""
    gen = torch.Generator().manual_seed(seed)
    saved = {p: p.requires_grad for p in q_unit.parameters()}
    for p in q_unit.parameters():
        p.requires_grad_(True)
    opt = unit_optimizer(q_unit, cfg)
    before = unit_error(q_unit, x_q, target, cfg.reconstruction.batch_size, device)
    n = x_q.shape[0]
    loss = torch.zeros(())
    try:
        for step in range(cfg.reconstruction.iters):
            idx = torch.randint(0, n, (min(cfg.reconstruction.batch_size, n),), generator=gen)
            inp = mixed_input(x_p[idx], x_q[idx], cfg.reconstruction.drop, gen).to(device)
            decay = 0.5 * (1 + math.cos(math.pi * step / cfg.reconstruction.iters))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * decay
            if weights is None:
                loss = F.mse_loss(q_unit(inp).float(), target[idx].to(device))
            else:
                err = (q_unit(inp).float() - target[idx].to(device)) ** 2
                loss = (err.mean(-1) * weights[idx].to(device)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for g in opt.param_groups:
                    if "floor" in g:
                        torch.maximum(g["params"][0], g["floor"], out=g["params"][0])
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
    after = unit_error(q_unit, x_q, target, cfg.reconstruction.batch_size, device)
    return {"mse_before": before, "mse_after": after, "last_loss": float(loss.detach())}


@torch.no_grad()
def unit_error(unit: nn.Module, inputs: torch.Tensor, target: torch.Tensor, batch_size: int, device) -> float:
    """Mean squared error of ``unit(inputs)`` against ``target`` over the whole set."""
    total = 0.0
    for i in range(0, inputs.shape[0], batch_size):
        out = unit(inputs[i:i + batch_size].to(device)).float().cpu()
        total += float(((out - target[i:i + batch_size]) ** 2).sum())
    return total / target.numel()


def with_cutmix(images: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``images`` followed by ``round(fraction * N)`` CutMix images: each a random image of the set with a random
    rectangle (a quarter to three quarters of its area) pasted from another. Token statistics stay those of the
    set while the combinations are new, so reconstruction sees more distinct unit inputs than the set holds."""
    count = round(fraction * images.shape[0])
    if count == 0:
        return images
    g = torch.Generator().manual_seed(seed)
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    first, second = torch.randint(0, n, (count,), generator=g), torch.randint(0, n, (count,), generator=g)
    area = 0.25 + 0.5 * torch.rand(count, generator=g)
    aspect = torch.exp((torch.rand(count, generator=g) - 0.5) * math.log(4.0))  # 1:2 ... 2:1
    mixed = images[first].clone()
    for i in range(count):
        bh = min(h, max(1, round(h * math.sqrt(float(area[i] / aspect[i])))))
        bw = min(w, max(1, round(w * math.sqrt(float(area[i] * aspect[i])))))
        y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        mixed[i, ..., y0:y0 + bh, x0:x0 + bw] = images[second[i], ..., y0:y0 + bh, x0:x0 + bw]
    return torch.cat([images, mixed])


def reconstruct(teacher: nn.Module, q_model: nn.Module, images: torch.Tensor, cfg: DFQConfig, device,
                start_unit: int = 0, after_unit: Callable[[int, dict], None] | None = None,
                on_log: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """Reconstruct Q's units ``start_unit ...`` in order on ``images``; ``after_unit(i, info)`` runs after each
    (the driver saves Q there). Returns the per-unit infos of the units done here."""
    units = reconstruction_units(q_model)
    images = with_cutmix(images, cfg.reconstruction.cutmix, derive_seed(cfg.seed, "recon-cutmix"))
    was_training = q_model.training
    q_model.eval()
    infos = []
    importance = None
    if cfg.reconstruction.focus > 0:
        importance = readout_importance(teacher, images, cfg.calibration.batch_size, device)
    try:
        for i in range(start_unit, len(units)):
            name = units[i]
            x_p, target = unit_io(teacher, name, images, cfg.calibration.batch_size, device)
            x_q, _ = unit_io(q_model, name, images, cfg.calibration.batch_size, device, want_output=False)
            weights = None if importance is None else token_weights(importance[:, i], cfg.reconstruction.focus)
            info = {"unit": name, **reconstruct_unit(q_model.get_submodule(name), x_p, x_q, target, cfg,
                                                     derive_seed(cfg.seed, "recon", i), device, weights)}
            infos.append(info)
            if after_unit is not None:
                after_unit(i, info)
            if on_log is not None:
                on_log(i + 1, len(units), {k: v for k, v in info.items() if k != "unit"})
    finally:
        q_model.train(was_training)
    return infos
