"""Image files load at their own bit depth and mode, each compared with the 8-bit image of the same content, or
are refused with one line naming the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from maskaq_deploy.data import _load_image, load_image_set
from maskaq_deploy.errors import DataError

RGB = {"input_size": (3, 12, 16), "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
GREY = {**RGB, "input_size": (1, 12, 16), "mean": [0.5], "std": [0.5]}
STEP = 1 / 255 + 1e-6  # the bound: one 8-bit step in [0, 1]


def content(channels: int, seed: int = 0) -> np.ndarray:
    """(12, 16, C) uint8 with every value 0-255 likely present."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (12, 16, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())


def load(path, cfg=RGB) -> np.ndarray:
    return _load_image(path, cfg)


def eight_bit(tmp_path, arr: np.ndarray, cfg=RGB) -> np.ndarray:
    Image.fromarray(arr).save(tmp_path / "ref8.png")
    return load(tmp_path / "ref8.png", cfg)


def png16(path, arr16: np.ndarray) -> None:
    """A 16-bit PNG (grey or RGB / RGBA: PIL cannot write 16-bit colour) from (H, W[, C]) uint16."""
    colour = 0 if arr16.ndim == 2 else {3: 2, 4: 6}[arr16.shape[2]]
    h, w = arr16.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr16.reshape(h, -1))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_8bit_rgb_and_grey_are_divided_by_255(tmp_path):
    arr = content(3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(load(tmp_path / "a.png"), arr.transpose(2, 0, 1) / np.float32(255))
    grey = content(1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load(tmp_path / "g.png")  # a grey file for an RGB model: replicated
    assert out.shape == (3, 12, 16) and np.array_equal(out[0], out[2]) and np.allclose(out[0], grey / 255)


@pytest.mark.parametrize("cfg", [GREY, RGB], ids=["grey-model", "rgb-model"])
def test_16bit_grey_png_is_scaled_not_clipped(tmp_path, cfg):
    grey = content(1)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # PIL writes I;16 as 16-bit PNG
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = load(tmp_path / "g16.png", cfg)
    assert out.max() > 0.9  # not clipped at 255/65535
    assert np.abs(out - eight_bit(tmp_path, grey, cfg)).max() <= STEP


def test_16bit_big_endian_tiff_and_32bit_int_tiff(tmp_path):
    grey = content(1)
    big = Image.frombytes("I;16B", (16, 12), (grey.astype(np.uint16) * 257).astype(">u2").tobytes())
    big.save(tmp_path / "b.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B"
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    ref = eight_bit(tmp_path, grey, GREY)
    for name in ("b.tif", "i.tif"):
        assert np.abs(load(tmp_path / name, GREY) - ref).max() <= STEP, name


def test_32bit_int_pixels_beyond_16_bits_are_refused(tmp_path):
    Image.fromarray(np.full((12, 16), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big.tif: I pixels range 70000 to 70000, outside the 16-bit range"):
        load(tmp_path / "big.tif", GREY)


@pytest.mark.parametrize("channels", [3, 4], ids=["rgb16", "rgba16"])
def test_16bit_colour_png(tmp_path, channels):
    arr = content(channels)
    low = np.random.default_rng(2).integers(0, 256, arr.shape).astype(np.uint16)  # low bytes: must not matter
    png16(tmp_path / "c16.png", arr.astype(np.uint16) * 256 + low)
    opened = Image.open(tmp_path / "c16.png")
    assert opened.mode == ("RGB" if channels == 3 else "RGBA")  # PIL keeps the high byte of each sample
    ref = arr if channels == 3 else (arr[..., :3] * (arr[..., 3:] / 255.0)).round().astype(np.uint8)
    assert np.abs(load(tmp_path / "c16.png") - eight_bit(tmp_path, ref)).max() <= STEP


def test_palette_with_and_without_transparency(tmp_path):
    arr = content(3)
    pal = Image.fromarray(arr).quantize(64)
    pal.save(tmp_path / "p.png")
    ref = np.asarray(pal.convert("RGB"))
    assert np.abs(load(tmp_path / "p.png") - eight_bit(tmp_path, ref)).max() <= STEP
    pal.save(tmp_path / "pt.png", transparency=0)  # palette entry 0 is transparent: black after compositing
    assert Image.open(tmp_path / "pt.png").mode == "P"
    ref_t = ref.copy()
    ref_t[np.asarray(pal) == 0] = 0
    assert (np.asarray(pal) == 0).any()
    assert np.abs(load(tmp_path / "pt.png") - eight_bit(tmp_path, ref_t)).max() <= STEP


def test_cmyk(tmp_path):
    arr = content(3)
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    assert np.abs(load(tmp_path / "c.tif") - eight_bit(tmp_path, arr)).max() <= STEP


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_black(tmp_path, mode):
    colour = content(1 if mode == "LA" else 3)
    alpha = content(1, seed=1)
    alpha[:3] = 0  # fully transparent rows: black, whatever colour they store
    stacked = np.dstack([colour, alpha])
    Image.fromarray(stacked, mode).save(tmp_path / "a.png")
    ref = (stacked[..., :-1] * (alpha[..., None] / 255.0)).round().astype(np.uint8).squeeze()
    cfg = GREY if mode == "LA" else RGB
    out = load(tmp_path / "a.png", cfg)
    assert np.abs(out - eight_bit(tmp_path, ref, cfg)).max() <= STEP
    assert out[:, :3].max() == 0


def test_1bit(tmp_path):
    bits = content(1) > 127
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    ref = bits.astype(np.uint8) * 255
    assert np.abs(load(tmp_path / "b.png", GREY) - eight_bit(tmp_path, ref, GREY)).max() <= STEP


def test_exif_orientation_is_applied(tmp_path):
    arr = content(3)[:, :12]  # 12 x 12 after the transpose too: no resize in the way
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_back = np.rot90(arr, k=1)  # stored so that the display orientation is ``arr``
    Image.fromarray(np.ascontiguousarray(rotated_back)).save(tmp_path / "o.png", exif=exif.tobytes())
    cfg = {**RGB, "input_size": (3, 12, 12)}
    assert np.abs(load(tmp_path / "o.png", cfg) - eight_bit(tmp_path, arr, cfg)).max() <= STEP


def test_resize_of_16bit_matches_8bit(tmp_path):
    grey = content(1)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    cfg = {**GREY, "input_size": (1, 6, 8), "crop_pct": 0.875}
    assert np.abs(load(tmp_path / "g16.png", cfg) - eight_bit(tmp_path, grey, cfg)).max() <= 1e-5


@pytest.mark.parametrize("data,match", [
    (b"not an image at all", "not an image file of a known format"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x0c\x08\x02\0\0\0", "cannot read image"),
], ids=["text", "truncated"])
def test_unreadable_files_are_refused_naming_them(tmp_path, data, match):
    (tmp_path / "bad.png").write_bytes(data)
    with pytest.raises(DataError, match=match) as e:
        load(tmp_path / "bad.png")
    assert "bad.png" in str(e.value) and "\n" not in str(e.value)


def test_a_folder_refuses_a_non_image_before_reading_any(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(content(3)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "notes.png").write_text("hello")
    images = load_image_set(str(tmp_path), RGB)
    with pytest.raises(DataError, match="notes.png"):
        images.check_readable()


def test_class_mapping_says_how_folder_names_map():
    from maskaq_deploy.data import ImageSet

    digits = ImageSet("val/", RGB, files=[], classes=sorted(str(i) for i in range(12)))
    text = digits.class_mapping()
    assert "'0' -> 0, '1' -> 1, '10' -> 2" in text and "numbers sorted as text" in text
    wnids = ImageSet("val/", RGB, files=[], classes=["n01440764", "n01443537"])
    assert "numbers" not in wnids.class_mapping()
    assert "as they are" in ImageSet("x.npz", RGB, array=np.zeros((0, 3, 2, 2), np.uint8)).class_mapping()


def test_16bit_pngs_of_the_embedded_test_images_score_as_8bit_ones(tmp_path):
    """64 MNIST test images as an ImageFolder of 8-bit and of 16-bit PNGs: the same pixels, the same FP top-1
    (the 8-bit conversion used to clip the 16-bit ones at 255/65535: 95.31 against 100.00)."""
    import torch

    from maskaq_deploy.data import EMBEDDED_DATA
    from maskaq_deploy.models import ModelConfig, load_model
    from maskaq_deploy.run import model_logits, top1

    with np.load(EMBEDDED_DATA["test"]) as z:
        images, labels = z["images"][:64], z["labels"][:64]
    for depth in (8, 16):
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = tmp_path / str(depth) / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = img.reshape(28, 28)
            Image.fromarray(pixels if depth == 8 else pixels.astype(np.uint16) * 257).save(folder / f"{i}.png")
    loaded = load_model(ModelConfig())
    scores, tensors = {}, {}
    for depth in (8, 16):
        sets = load_image_set(str(tmp_path / str(depth)), loaded.data_config)
        assert sets.classes == [str(d) for d in sorted(set(labels.tolist()))]  # single digits: text order = numbers
        logits, y = model_logits(loaded.model, sets, 64)
        scores[depth], tensors[depth] = top1(logits, y), sets.tensor()
    assert torch.equal(tensors[8], tensors[16])
    assert scores[8] == scores[16] and scores[8] > 90
