"""Image sets for calibration and validation: the embedded MNIST files, .npz arrays, ImageFolder trees.

An ``ImageSet`` keeps images in their stored form (uint8 arrays or file paths) and yields normalized float
batches (N, C, H, W) on demand, so a large folder never sits in memory as floats.

Image files are read at their own bit depth and scaled to [0, 1] before the model's normalization: 8-bit modes
(grey, 1-bit, RGB, palette, CMYK, ...) by 255, 16-bit grey (PNG, TIFF) by 65535; an alpha channel (LA, RGBA, a
palette's transparency) is composited on black; the EXIF orientation is applied. What cannot be read that way is
refused with one line naming the file. An ImageFolder's classes are its sub-folder names in sorted order (string
order: class index i is the i-th name); ``class_mapping`` says so in words.
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

    def check_readable(self) -> None:
        """Open every file's header (no decoding: cheap) and refuse one that is not an image of a mode this
        module reads, before a long command starts; a file corrupt past its header still fails when read."""
        from PIL import Image

        for p in self.files or []:
            try:
                with Image.open(p) as img:
                    mode = img.mode
            except Exception as e:
                raise _unreadable(p, e) from None
            if mode not in EIGHT_BIT and mode not in SIXTEEN_BIT and mode != "F":
                raise DataError(f"image {p}: PIL mode {mode} is not read here; save it as 8- or 16-bit grey, RGB "
                                "or RGBA")

    def class_mapping(self) -> str:
        """How the labels relate to the model's class indices, in words (for a report's warning)."""
        if self.classes is None:
            return f"the labels of {self.source} are taken as class indices as they are"
        shown = ", ".join(f"'{name}' -> {i}" for i, name in enumerate(self.classes[:3]))
        more = f", ... '{self.classes[-1]}' -> {len(self.classes) - 1}" if len(self.classes) > 3 else ""
        text = (f"the class index of an image in {self.source} is the position of its sub-folder's name in sorted "
                f"order ({shown}{more})")
        if all(c.isdigit() for c in self.classes) and self.classes != sorted(self.classes, key=int):
            text += ("; these names are numbers sorted as text ('10' before '2'): name the folders with leading "
                     "zeros (00, 01, ..., 10) or give an .npz with the labels")
        return text

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


# How each PIL mode becomes float pixels in [0, 1]. 8-bit modes divide by 255; 16-bit ones (PNG and TIFF
# 16-bit grey open as I;16 / I;16B, a 32-bit TIFF as I) by 65535; 16-bit colour PNGs open as RGB / RGBA holding the
# high byte of each sample (already on the 8-bit scale). Alpha is composited on black, see ``_on_black``.
EIGHT_BIT = {"L": "L", "1": "L", "RGB": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
             "RGBX": "RGB", "P": None, "PA": "RGBA", "LA": "LA", "La": "LA", "RGBA": "RGBA", "RGBa": "RGBA"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, what PIL's convert("L") uses


def _load_image(path: Path, data_config: dict) -> np.ndarray:
    """One image file as the model's float32 (C, H, W) in [0, 1]: its EXIF orientation applied, its mode scaled
    (``_pixels``), the shorter side resized to size/crop_pct, center-cropped to size (the model's eval
    transform). A file that cannot be read as such is a one-line DataError naming it."""
    c, h, w = data_config["input_size"]
    arr = _pixels(path)  # (H, W, C) float32 in [0, 1], C 1 or 3
    if c == 1 and arr.shape[2] == 3:
        arr = (arr @ LUMA)[:, :, None]
    elif c == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif c not in (1, 3):
        raise DataError(f"image {path}: the model takes {c} channels; only 1 (grey) or 3 (RGB) can be read from "
                        "image files, give an .npz instead")
    crop_pct = data_config.get("crop_pct", 1.0) or 1.0
    scale_h, scale_w = int(h / crop_pct), int(w / crop_pct)
    height, width = arr.shape[:2]
    ratio = max(scale_h / height, scale_w / width)
    size = (max(w, round(width * ratio)), max(h, round(height * ratio)))
    if size != (width, height):
        arr = _resize(arr, size, data_config.get("interpolation"))
    left, top = (arr.shape[1] - w) // 2, (arr.shape[0] - h) // 2
    return np.ascontiguousarray(arr[top:top + h, left:left + w].transpose(2, 0, 1))


def _pixels(path: Path) -> np.ndarray:
    """The decoded pixels of ``path``, upright, as (H, W, 1 or 3) float32 in [0, 1]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, with its name
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise _unreadable(path, e) from None
    mode = img.mode
    if mode in SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"image {path}: {mode} pixels range {arr.min():g} to {arr.max():g}, outside the 16-bit "
                            "range 0-65535, so their scale is unknown; save it as an 8- or 16-bit image")
        return arr[:, :, None] / 65535.0
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise DataError(f"image {path}: float pixels must be finite and in [0, 1]; save it as an 8- or 16-bit "
                            "image")
        return arr[:, :, None]
    if mode not in EIGHT_BIT:
        raise DataError(f"image {path}: PIL mode {mode} is not read here; save it as 8- or 16-bit grey, RGB or RGBA")
    if mode == "P":  # a palette: its transparency (a colour index or an alpha table) becomes alpha
        target = "RGBA" if "transparency" in img.info else "RGB"
    else:
        target = EIGHT_BIT[mode]
    arr = np.asarray(img.convert(target) if img.mode != target else img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return _on_black(arr) if target in ("LA", "RGBA") else arr


def _unreadable(path: Path, e: Exception) -> DataError:
    from PIL import UnidentifiedImageError

    problem = ("not an image file of a known format" if isinstance(e, UnidentifiedImageError) else
               str(e).splitlines()[0] if str(e) else type(e).__name__)
    return DataError(f"cannot read image {path}: {problem}; give a PNG, JPEG, BMP, WebP, TIFF or PPM/PGM file")


def _on_black(arr: np.ndarray) -> np.ndarray:
    """Colour channels composited on a black background (colour x alpha). Black because it is what the loaders
    models are trained with give for the usual transparent pixel, stored as (0, 0, 0, 0): timm's and
    torchvision's ``convert("RGB")`` drops alpha and keeps that black; and MNIST-style digits are on black."""
    return arr[:, :, :-1] * arr[:, :, -1:]


def _resize(arr: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    """(H, W, C) float resized to ``size`` (width, height) channel by channel in PIL's float mode, so 16-bit
    images keep their precision (bicubic overshoot is clipped back to [0, 1])."""
    from PIL import Image

    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, i], dtype=np.float32)).resize(size, resample))
           for i in range(arr.shape[2])]
    return np.clip(np.stack(out, axis=2), 0.0, 1.0)
