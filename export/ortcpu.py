"""The CPU family an onnxruntime-flavour graph is laid out for, and how to tell which one this machine is.

onnxruntime's CPU integer GEMMs (MLAS) take different paths per instruction set, so the fastest exact layout
of the same quantized values differs (docs/onnxruntime.md has the measurements):

    x86-vnni   AVX512-VNNI / AVX-VNNI / AMX: uint8 activations (a signed grid moved up by 128, zero point 128)
               times int8 weights (zero point 0). VPDPBUSD adds the u8 x s8 products in 32 bits: exact, and
               about 2x faster than uint8 weights, which onnxruntime 1.32 runs on a widening u8 x u8 kernel.
    x86-avx2   x86 without VNNI (AVX2, plain AVX-512): uint8 activations times uint8 weights (zero point 128).
               The u8 x s8 kernel there (VPMADDUBSW) adds pairs of products in 16 bits and saturates
               (255 * 127 * 2 > 32767); u8 x u8 widens first and is exact.
    arm        aarch64: int8 activations (signed grids stay as they are, zero point 0) times int8 weights:
               onnxruntime's own choice there (it keeps int8 Q/DQ on ARM), the SDOT kernel, no zero-point
               correction for symmetric grids.

The default is the machine the export runs on (``detect``). A graph records its family in its metadata
(``CPU_METADATA_KEY``), so a runtime can warn when it runs somewhere else.
"""

from __future__ import annotations

from maskaq_deploy.export.errors import ExportInputError
from maskaq_deploy.runtimes.cpu import ARM, CPU_FAMILIES, CPU_METADATA_KEY, X86_AVX2, X86_VNNI, detect

__all__ = ["ARM", "AUTO", "CPU_FAMILIES", "CPU_METADATA_KEY", "X86_AVX2", "X86_VNNI", "UnknownCpuError", "detect",
           "resolve"]

AUTO = "auto"


class UnknownCpuError(ExportInputError, ValueError):
    """The CPU family asked for is not one the onnxruntime flavour has a layout for."""


def resolve(cpu: str | None) -> str:
    """``cpu`` checked, with None / "auto" meaning this machine's family."""
    if cpu is None or cpu == AUTO:
        return detect()
    if cpu not in CPU_FAMILIES:
        raise UnknownCpuError(f"unknown CPU family {cpu!r} for the onnxruntime flavour; choose one of "
                              f"{', '.join(CPU_FAMILIES)} or {AUTO} (this machine: {detect()})")
    return cpu
