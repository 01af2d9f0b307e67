"""PNG grid of (synthetic) images, for looking at what calibration ran on."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch


def save_image_grid(images: torch.Tensor, path, mean, std, max_images: int = 64, pad: int = 2,
                    min_cell: int = 64) -> Path:
    """Write up to ``max_images`` normalized images [N, C, H, W] as one PNG grid (denormalized with
    ``mean``/``std``, upscaled with nearest neighbour so small images stay visible). Returns the path."""
    from PIL import Image

    x = images[:max_images].detach().float().cpu()
    n, c, h, w = x.shape
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if c == 1:
        x = x.expand(n, 3, h, w)
    elif c != 3:
        x = x[:, :3]
    zoom = max(1, math.ceil(min_cell / max(h, w)))
    if zoom > 1:
        x = x.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    h, w = h * zoom, w * zoom
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
