"""Image sets for calibration and validation: the embedded MNIST files, .npz arrays, ImageFolder trees.

An ``ImageSet`` keeps images in their stored form (uint8 arrays or file paths) and yields normalized float
batches (N, C, H, W) on demand, so a large folder never sits in memory as floats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskaq_deploy import checks
from maskaq_deploy.errors import DataError
from maskaq_deploy.models import ASSETS_DIR

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
EMBEDDED_DATA = {"test": ASSETS_DIR / "mnist_test.npz", "calib": ASSETS_DIR / "mnist_calib.npz"}


@dataclass
class ImageSet:
    source: str
    data_config: dict
    array: np.ndarray | None = None  # (N, C, H, W) uint8 or float32 in [0, 1]
    files: list[Path] | None = None
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def subset(self, limit: int | None, seed: int = 0) -> ImageSet:
        """The first ``limit`` items of a seeded permutation (all of them when limit is None)."""
        if limit is None or limit >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:limit])
        return ImageSet(self.source, self.data_config,
                        None if self.array is None else self.array[idx],
                        None if self.files is None else [self.files[i] for i in idx],
                        None if self.labels is None else self.labels[idx], self.classes)

    def _normalize(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).float()
        if x.dtype == np.uint8:
            t = t / 255.0
        mean = torch.tensor(self.data_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config["std"]).view(1, -1, 1, 1)
        return (t - mean) / std

    def batches(self, batch_size: int):
        """Yield (images float32 normalized, labels LongTensor or None)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            if self.array is not None:
                x = self._normalize(self.array[start:stop])
            else:
                x = self._normalize(np.stack([_load_image(p, self.data_config) for p in self.files[start:stop]]))
            y = None if self.labels is None else torch.from_numpy(self.labels[start:stop]).long()
            yield x, y

    def tensor(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.batches(256)]) if len(self) else torch.empty(0)

    def check_labels(self, classes: int | None, what: str) -> None:
        """Refuse labels outside [0, classes): the classifier can never predict them."""
        checks.labels_in_range(self.labels, classes, f"{what} {self.source}")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.array is not None:
            h.update(np.ascontiguousarray(self.array).tobytes())
        else:
            for p in self.files:
                h.update(str(p).encode())
        return h.hexdigest()[:16]


def load_image_set(spec: str, data_config: dict, what: str = "`val_data`") -> ImageSet:
    """``spec``: 'embedded:test', 'embedded:calib', a .npz file, or an ImageFolder directory."""
    if spec.startswith("embedded:"):
        part = spec.split(":", 1)[1]
        if part not in EMBEDDED_DATA:
            raise DataError(f"{what} {spec}: the embedded sets are embedded:test and embedded:calib")
        return _load_npz(EMBEDDED_DATA[part], data_config, what, source=spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{what} {spec} does not exist; give a .npz file or an ImageFolder directory")
    if path.is_dir():
        return _load_folder(path, data_config, what)
    if path.suffix == ".npz":
        return _load_npz(path, data_config, what, source=str(path))
    raise DataError(f"{what} {spec} is neither a .npz file nor a directory of class sub-folders")


def _load_npz(path: Path, data_config: dict, what: str, source: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "images" not in keys or "labels" not in keys:
                raise DataError(f"{what} {path.name} needs arrays 'images' and 'labels'; it has "
                                f"{sorted(keys) or 'none'}")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{what} {path} is not a readable .npz ({type(e).__name__}: {e})") from None
    c, h, w = data_config["input_size"]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{what} {path.name}: images must be (N,C,H,W) or (N,H,W), got shape {images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # accept channels-last too
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1:] != (c, h, w):
        raise DataError(f"{what} {path.name}: images have shape {tuple(images.shape[1:])} per image but the "
                        f"model takes {(c, h, w)}; resize them, or pass `model.input_size` if the model allows it")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
        finite = np.isfinite(images)
        if not finite.all():
            raise DataError(f"{what} {path}: {int((~finite).sum())} pixel value(s) are NaN or infinite; give "
                            "finite images (float 0-1 or uint8 0-255)")
        if images.size and (images.min() < 0 or images.max() > 1.0 + 1e-6):
            raise DataError(f"{what} {path.name}: float images must be in [0, 1] (or give uint8 0-255)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what} {path.name}: labels must be N integers, got shape {labels.shape} "
                        f"{labels.dtype} for {len(images)} images")
    return ImageSet(source, data_config, array=images, labels=labels.astype(np.int64))


def _load_folder(root: Path, data_config: dict, what: str) -> ImageSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{what} {root}: no class sub-folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
    files, labels = [], []
    for i, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(i)
    if not files:
        raise DataError(f"{what} {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSet(str(root), data_config, files=files, labels=np.asarray(labels, np.int64), classes=classes)


def _load_image(path: Path, data_config: dict) -> np.ndarray:
    """Resize the shorter side to size/crop_pct, center-crop to size (the model's eval transform)."""
    from PIL import Image

    c, h, w = data_config["input_size"]
    try:
        img = Image.open(path)
        img = img.convert("L" if c == 1 else "RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    crop_pct = data_config.get("crop_pct", 1.0) or 1.0
    scale_h, scale_w = int(h / crop_pct), int(w / crop_pct)
    ratio = max(scale_h / img.height, scale_w / img.width)
    resample = Image.BICUBIC if data_config.get("interpolation") == "bicubic" else Image.BILINEAR
    img = img.resize((max(w, round(img.width * ratio)), max(h, round(img.height * ratio))), resample)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
