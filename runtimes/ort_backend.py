"""The onnxruntime backend: one InferenceSession on CPU (or CUDA when asked and present).

Session settings that matter for our graphs:

* the default graph optimization level (ORT_ENABLE_ALL): the exported QDQ graphs are made to load and fuse at
  it, so the numbers measured here are those a user of the plain onnxruntime API gets;
* ``session.qdq_matmulnbits_accuracy_level = "0"``: at the default (4) onnxruntime fuses INT4 DequantizeLinear
  -> MatMul into MatMulNBits that quantizes the activations to int8, which the torch model does not do;
* ``session.disable_quant_qdq = "1"`` for graphs exported in the ``tensorrt`` flavour: onnxruntime would fuse
  their int8 Q/DQ MatMuls into integer kernels that, on x86 CPUs without VNNI (AVX2, plain AVX-512), add
  pairs of int8 products in 16 bits and saturate (a DeiT block came out at 25-28 dB SQNR instead of 45+).
  Those graphs are for TensorRT; onnxruntime runs them to check them, so it computes DequantizeLinear and a
  float MatMul: the values TensorRT's int8 kernels compute exactly. (The ``onnxruntime`` flavour is laid out
  for one CPU family, recorded in its metadata: uint8 x int8 integer MatMuls for x86 with VNNI, exact and
  fastest there; uint8 x uint8, exact on every x86 CPU, for x86 without VNNI. A graph laid out for VNNI that
  runs on a CPU without it logs a warning: re-export it with ``--cpu x86-avx2``.)
* intra-op threads: explicit, so benchmarks say what they used.

A model exported with a fixed batch size still takes any number of images: they are run in chunks of that
size, the last one zero-padded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from maskaq_deploy.runtimes import cpu
from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError, BackendUnavailable
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TENSORRT

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")


def provider_name(provider: str) -> str:
    """Full onnxruntime provider name of ``provider`` ("cpu", "cuda", "tensorrt" or a full name)."""
    return PROVIDERS.get(provider.lower(), provider)


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def exported_metadata(path, key: str) -> str | None:
    """The value an exported graph records under ``key`` in its metadata (None: absent, not one of ours, or
    unreadable; the session load reports what is wrong with the file)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a missing or broken file: _load says so in its own words
        return None
    return next((p.value for p in model.metadata_props if p.key == key), None)


def exported_flavour(path) -> str | None:
    """The ``maskaq.flavour`` an exported graph records in its metadata."""
    return exported_metadata(path, "maskaq.flavour")


def layout_mismatch(path) -> str | None:
    """Why the graph's integer layout does not suit this CPU, or None. A graph laid out for VNNI on x86 without
    it: its u8 x s8 products may saturate; one laid out for ARM on x86: onnxruntime runs its s8 x s8 products
    on a slow path (about 10x slower than u8 x s8 on one layer, docs/onnxruntime.md); any other mismatch: a
    slower kernel than this CPU has."""
    made_for = exported_metadata(path, cpu.CPU_METADATA_KEY)
    here = cpu.detect()
    if made_for is None or made_for == here:
        return None
    why = {(cpu.X86_VNNI, cpu.X86_AVX2): "onnxruntime's uint8 x int8 products can saturate here",
           (cpu.ARM, cpu.X86_VNNI): "onnxruntime runs int8 x int8 products on a slow path on x86",
           (cpu.ARM, cpu.X86_AVX2): "onnxruntime runs int8 x int8 products on a slow path on x86"}.get(
        (made_for, here), "this CPU has a faster integer layout")
    return (f"{Path(path).name} is laid out for {made_for} CPUs but this CPU is {here}: {why}; re-export with "
            f"--cpu {here if here != cpu.X86_VNNI or made_for == cpu.ARM else 'auto'}")


class OrtBackend(Backend):
    """Run an ONNX file with onnxruntime.

    ``provider``: "cpu" (default), "cuda", "tensorrt" or a full provider name; CPU is always the fallback for
    nodes the provider does not take. ``threads``: intra-op threads (None: onnxruntime's default).
    ``optimization``: graph optimization level, one of disable/basic/extended/all (default "all", as
    onnxruntime's own default). ``exact_qdq``: keep Q/DQ MatMuls in float instead of onnxruntime's integer
    kernels (None: only for graphs exported in the ``tensorrt`` flavour; see the module docstring).
    """

    name = ONNXRUNTIME

    def __init__(self, path, *, provider: str = "cpu", threads: int | None = None, optimization: str = "all",
                 int4_accuracy_level: int = 0, profile_prefix: str | None = None, exact_qdq: bool | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPT_LEVELS)}, got {optimization!r}")
        self.path = Path(path)
        self.provider = provider_name(provider)
        self.threads = threads
        self.optimization = optimization
        self.int4_accuracy_level = int4_accuracy_level
        self.profile_prefix = profile_prefix
        self.exact_qdq = exact_qdq
        self.session = None
        self.input_name: str | None = None
        self.input_shape: tuple | None = None

    @classmethod
    def available(cls, provider: str = "cpu") -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime is not installed ({e}); pip install onnxruntime"
        want = provider_name(provider)
        have = available_providers()
        if want not in have:
            return False, f"requested provider {want}; available providers are {have}"
        return True, ""

    def session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.int4_accuracy_level))
        exact = self.exact_qdq if self.exact_qdq is not None else exported_flavour(self.path) == TENSORRT
        if exact:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        so.log_severity_level = 3  # warnings about hardware-specific optimizations are noise here
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        return so

    def _load(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise BackendError(f"ONNX file {self.path} does not exist")
        ok, why = self.available(self.provider)
        if not ok:
            raise BackendUnavailable(f"onnxruntime: {why}")
        mismatch = layout_mismatch(self.path)
        if mismatch:
            log.warning(mismatch)
        providers = [self.provider] + (["CPUExecutionProvider"] if self.provider != "CPUExecutionProvider" else [])
        try:
            self.session = ort.InferenceSession(str(self.path), self.session_options(), providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"onnxruntime cannot load {self.path.name}: {first[:300]}") from e
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{self.path.name} has {len(inputs)} inputs; expected one image batch")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)

    def close(self) -> None:
        self.session = None

    def end_profiling(self) -> str | None:
        """Stop profiling and return the JSON trace's path (when ``profile_prefix`` was given)."""
        return self.session.end_profiling() if self.session is not None and self.profile_prefix else None

    @property
    def fixed_batch(self) -> int | None:
        dim = self.input_shape[0] if self.input_shape else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def _check_shape(self, batch: np.ndarray) -> None:
        want = self.input_shape[1:]
        got = batch.shape[1:]
        if len(want) != len(got) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
            raise BackendError(f"{self.path.name} expects images of shape {tuple(want)}, got {tuple(got)}")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise BackendError("onnxruntime backend used outside its 'with' block")
        self._check_shape(batch)
        fixed = self.fixed_batch
        if fixed is None or batch.shape[0] == fixed:
            return self.session.run(None, {self.input_name: batch})[0]
        outs = []
        for i in range(0, batch.shape[0], fixed):
            chunk = batch[i:i + fixed]
            n = chunk.shape[0]
            if n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(outs, axis=0)
