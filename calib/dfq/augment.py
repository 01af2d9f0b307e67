"""Batch augmentations for synthesis and fine-tuning, vectorized, drawing only from explicit generators.

Two generators are passed around: ``cpu_gen`` for the few scalars that decide shapes or shifts (no device
sync on GPU) and ``gen`` (on the images' device) for tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def random_shift(x: torch.Tensor, max_shift: int, cpu_gen: torch.Generator) -> torch.Tensor:
    """Circular shift of the whole batch by (dy, dx), each uniform in [-max_shift, max_shift]."""
    if max_shift <= 0:
        return x
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=cpu_gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def channel_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Adds a random per-image, per-channel constant ~ N(0, std^2)."""
    if std <= 0:
        return x
    b, c = x.shape[:2]
    return x + torch.randn((b, c, 1, 1), generator=gen, device=gen.device).to(x.device, x.dtype) * std


def affine_jitter(x: torch.Tensor, mean_amp: float, std_amp: float, gen: torch.Generator) -> torch.Tensor:
    """(x - m) / s per image and channel, m ~ U(-mean_amp, mean_amp), s = exp(U(-std_amp, std_amp))."""
    if mean_amp <= 0 and std_amp <= 0:
        return x
    b, c = x.shape[:2]
    m = (_uniform((b, c, 1, 1), gen, x.device) * 2 - 1) * mean_amp
    s = ((_uniform((b, c, 1, 1), gen, x.device) * 2 - 1) * std_amp).exp()
    return (x - m.to(x.dtype)) / s.to(x.dtype)


def synthesis_augment(x: torch.Tensor, step: int, total: int, *, jitter: float, noise_std: float,
                      affine_mean: float, affine_std: float, gen: torch.Generator,
                      cpu_gen: torch.Generator) -> torch.Tensor:
    """One synthesis step's view of the batch: circular shift (max ``jitter`` * side, doubled in the second
    half of the iterations), per-channel noise annealed linearly to 0, per-channel affine jitter."""
    side = min(x.shape[-2:])
    max_shift = round(jitter * side) * (1 if step < total / 2 else 2)
    x = random_shift(x, max_shift, cpu_gen)
    x = channel_noise(x, noise_std * (1.0 - (step + 1) / total), gen)
    return affine_jitter(x, affine_mean, affine_std, gen)


def resized_crop_flip(x: torch.Tensor, min_area: float, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random resized crop (area fraction in [min_area, 1], aspect kept, random position) back to
    the input size, and a random horizontal flip with probability 1/2; one ``grid_sample`` for the batch."""
    if min_area >= 1.0 and not flip:
        return x
    b = x.shape[0]
    u = _uniform((b, 4), gen, x.device)
    scale = (min_area + (1.0 - min_area) * u[:, 0]).sqrt()  # side fraction of the crop
    tx = (u[:, 1] * 2 - 1) * (1 - scale)  # keep the crop inside the image
    ty = (u[:, 2] * 2 - 1) * (1 - scale)
    sx = torch.where(u[:, 3] < 0.5, -scale, scale) if flip else scale
    theta = torch.zeros((b, 2, 3), device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = scale, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).to(x.dtype)
