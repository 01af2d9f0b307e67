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

import platform
from pathlib import Path

from maskaq_deploy.export.errors import ExportInputError

X86_VNNI, X86_AVX2, ARM = "x86-vnni", "x86-avx2", "arm"
CPU_FAMILIES = (X86_VNNI, X86_AVX2, ARM)
AUTO = "auto"
CPU_METADATA_KEY = "maskaq.ort_cpu"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# the flags worth naming next to a latency figure
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                  "amx_bf16", "asimddp", "i8mm", "sve")


class UnknownCpuError(ExportInputError, ValueError):
    """The CPU family asked for is not one the onnxruntime flavour has a layout for."""


def _cpuinfo(path: str = "/proc/cpuinfo") -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:  # not Linux: the architecture alone decides
        return ""


def cpu_flags(text: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (x86 "flags", ARM "Features")."""
    text = _cpuinfo() if text is None else text
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(text: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    text = _cpuinfo() if text is None else text
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def detect(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The CPU family of this machine (or of ``flags`` / ``machine`` when given)."""
    machine = (machine or platform.machine()).lower()
    if machine.startswith(("aarch64", "arm")):
        return ARM
    flags = cpu_flags() if flags is None else flags
    return X86_VNNI if any(f in flags for f in VNNI_FLAGS) else X86_AVX2


def resolve(cpu: str | None) -> str:
    """``cpu`` checked, with None / "auto" meaning this machine's family."""
    if cpu is None or cpu == AUTO:
        return detect()
    if cpu not in CPU_FAMILIES:
        raise UnknownCpuError(f"unknown CPU family {cpu!r} for the onnxruntime flavour; choose one of "
                              f"{', '.join(CPU_FAMILIES)} or {AUTO} (this machine: {detect()})")
    return cpu


def describe(flags: set[str] | None = None) -> str:
    """One line naming this CPU, its family and the flags that decide the kernels, for tables and logs."""
    flags = cpu_flags() if flags is None else flags
    shown = [f for f in REPORTED_FLAGS if f in flags]
    return f"{cpu_model()} ({detect(flags)}; {' '.join(shown) or 'no SIMD flags listed'})"
