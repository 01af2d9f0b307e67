"""Shared test fixtures and the one TensorRT marker.

Tests that need a real TensorRT engine carry ``@pytest.mark.tensorrt``; they are skipped, with the reason, where
the tensorrt package or a CUDA GPU is missing. Nothing here imports tensorrt at collection time.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _tensorrt_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install 'maskaq-deploy[tensorrt]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _tensorrt_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"needs TensorRT: {reason}")
    for item in items:
        # the marker itself, not item.keywords: a parametrize id "tensorrt" is a keyword too and must still run
        if item.get_closest_marker("tensorrt") is not None:
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()


@pytest.fixture
def tiny_npz(tmp_path):
    """A small labelled .npz (uint8, 3x32x32) fitting TINY_VIT."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez_compressed(path, images=rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8),
                        labels=rng.integers(0, 10, 40))
    return path
