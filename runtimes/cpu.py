"""Which CPU this is, as onnxruntime's integer kernels see it: model name, instruction-set flags, family.

    x86-vnni   x86 with AVX512-VNNI, AVX-VNNI or AMX-INT8 (u8 x s8 products added in 32 bits)
    x86-avx2   other x86 (AVX2, plain AVX-512: u8 x s8 pair sums saturate in 16 bits)
    arm        aarch64

export/ortcpu.py says which graph layout each family runs fastest and exactly; OrtBackend warns when a
graph laid out for one family runs on another.
"""

from __future__ import annotations

import platform
from pathlib import Path

X86_VNNI, X86_AVX2, ARM = "x86-vnni", "x86-avx2", "arm"
CPU_FAMILIES = (X86_VNNI, X86_AVX2, ARM)
CPU_METADATA_KEY = "maskaq.ort_cpu"  # the family an exported graph is laid out for
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# the flags worth naming next to a latency figure
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                  "amx_bf16", "asimddp", "i8mm", "sve")


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


def describe(flags: set[str] | None = None) -> str:
    """One line naming this CPU, its family and the flags that decide the kernels, for tables and logs."""
    flags = cpu_flags() if flags is None else flags
    shown = [f for f in REPORTED_FLAGS if f in flags]
    return f"{cpu_model()} ({detect(flags)}; {' '.join(shown) or 'no SIMD flags listed'})"
