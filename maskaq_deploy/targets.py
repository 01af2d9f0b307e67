"""The names of what runs where, spelled once: runtimes (the backends of maskaq_deploy.runtimes), the QDQ
graph flavours ``export --for`` writes, and the targets ``build --target`` aims at. Cheap to import, so the
CLI can offer them as choices without loading torch."""

from maskaq_deploy.runtimes.registry import ONNXRUNTIME, RUNTIMES, TENSORRT, TORCH

FLAVOURS = (ONNXRUNTIME, TENSORRT)  # export --for
TARGETS = (*FLAVOURS, TORCH)  # build --target

__all__ = ["ONNXRUNTIME", "RUNTIMES", "TENSORRT", "TORCH", "FLAVOURS", "TARGETS"]
