"""Build a TensorRT engine from a QDQ ONNX graph with TensorRT's Python API (TensorRT 10.x and 11.x).

    info = build_engine("model.qdq.onnx", "OUT", max_batch=32)   # -> OUT/model.engine

Precision comes from the graph, never from builder flags: the network is strongly typed, so Q/DQ nodes make
the INT8 / INT4 layers and every other tensor keeps the dtype the ONNX graph gives it. TensorRT 11 removed the
precision flags (BuilderFlag.INT8, FP16, ...) and always builds strongly typed networks
(https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html);
TensorRT 10 has the same mode behind NetworkDefinitionCreationFlag.STRONGLY_TYPED, so one code path gives the
same engine semantics on both. FP16 for the non-quantized layers is therefore left to the graph: a float32
QDQ graph builds float32 LayerNorm / Softmax / GELU (what the golden outputs were computed with); for FP16,
convert the graph first (NVIDIA's recommendation is ModelOpt AutoCast:
``python -m modelopt.onnx.autocast --onnx_path model.qdq.onnx``), which keeps Q/DQ scales in their own dtype.

tensorrt is imported lazily; without it, or without a CUDA GPU, EngineUnavailable says so and points at the
bundle's build_engine.sh, which builds the same engine with trtexec on the device.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from maskaq_deploy.export.errors import ExportError
from maskaq_deploy.runtimes.errors import BackendUnavailable
from maskaq_deploy.runtimes.tensorrt_backend import import_tensorrt as runtime_import_tensorrt
from maskaq_deploy.runtimes.tensorrt_backend import make_logger, version_major

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
_BUNDLE_HINT = ("build it on the target device instead: copy the bundle there and run 'bash build_engine.sh' "
                "(written by 'maskaq-deploy build --target tensorrt --bundle-only')")


class TensorRTError(ExportError):
    """Base of the TensorRT engine errors."""


class EngineUnavailable(TensorRTError):
    """No engine can be built here: the tensorrt package, a CUDA GPU or a supported TensorRT version is missing."""


class EngineBuildError(TensorRTError):
    """TensorRT is here but refused the graph (parse error, unsupported layer, failed build)."""


@dataclasses.dataclass(frozen=True)
class ModelIO:
    """The one image input and one logits output of a graph; None marks a dynamic dimension."""

    input_name: str
    input_shape: tuple
    output_name: str
    output_shape: tuple
    int4_weights: bool = False

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] is None


def _dims(value_info) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _has_int4(model) -> bool:
    import onnx

    int4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    if any(t.data_type in int4 for t in model.graph.initializer):
        return True
    return any(a.t.data_type in int4 for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
               if a.name == "value") or any(n.op_type == "MatMulNBits" for n in model.graph.node)


def read_model_io(onnx_path) -> ModelIO:
    """The input/output signature of a classifier graph (exactly one 4-D input and one output)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise EngineBuildError(f"{onnx_path} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                               "a classifier graph needs one image input and one logits output")
    shape = _dims(inputs[0])
    if len(shape) != 4:
        raise EngineBuildError(f"{onnx_path}: input {inputs[0].name!r} has shape {shape}; expected (N, C, H, W)")
    if any(d is None for d in shape[1:]):
        raise EngineBuildError(f"{onnx_path}: input {inputs[0].name!r} has dynamic image dims {shape}; "
                               "export with a fixed image size (only the batch may be dynamic)")
    return ModelIO(inputs[0].name, shape, model.graph.output[0].name, _dims(model.graph.output[0]),
                   _has_int4(model))


def profile_shapes(io: ModelIO, min_batch: int = 1, opt_batch: int | None = None,
                   max_batch: int = 32) -> dict | None:
    """min/opt/max input shapes of the optimization profile, or None when the batch is static."""
    if not io.dynamic_batch:
        return None
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    chw = tuple(io.input_shape[1:])
    return {"min": (min_batch, *chw), "opt": (opt_batch, *chw), "max": (max_batch, *chw)}


def import_tensorrt(what: str = "build a TensorRT engine"):
    """The tensorrt module, or EngineUnavailable saying why not (no package, no GPU, unsupported version)."""
    try:
        return runtime_import_tensorrt()
    except BackendUnavailable as e:
        raise EngineUnavailable(f"cannot {what} here: {e}; {_BUNDLE_HINT}") from None


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    path: Path
    tensorrt_version: str
    io: ModelIO
    profile: dict | None
    timing_cache: Path | None


def _network_flags(trt, major: int) -> int:
    # 10.x: strongly typed is opt-in (weak typing is deprecated since 10.12); 11.x: always on and the flag is
    # "retained for API compatibility but ignored"
    # (https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html), so it
    # is only passed where it means something.
    if major == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def build_engine(onnx_path, out_dir, *, min_batch: int = 1, opt_batch: int | None = None, max_batch: int = 32,
                 workspace_mib: int | None = None, timing_cache=None) -> EngineInfo:
    """Parse ``onnx_path``, build a strongly typed engine and write ``out_dir/model.engine`` atomically.

    The optimization profile (min/opt/max batch) applies only when the graph's batch dimension is dynamic.
    ``workspace_mib`` caps the builder's workspace pool. ``timing_cache`` is a file path: loaded when it
    exists, written back (atomically) after the build, so rebuilds on the same GPU are faster.
    """
    from maskaq_deploy.calib.checkpoint import atomic_write_bytes

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise EngineBuildError(f"QDQ ONNX {onnx_path} not found; export the model first")
    io = read_model_io(onnx_path)
    profile = profile_shapes(io, min_batch, opt_batch, max_batch)
    trt = import_tensorrt()
    major = version_major(trt.__version__)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data tensors relative to the model file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if workspace_mib is not None:
        # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if profile is not None:
        # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
        prof = builder.create_optimization_profile()
        prof.set_shape(io.input_name, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        # A cache from another TensorRT version or GPU is rejected by TensorRT (ignore_mismatch=False) rather
        # than silently used (https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/builder-performance.html).
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "see the log"
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}: {detail}")
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / ENGINE_FILE
    atomic_write_bytes(engine_path, bytes(memoryview(plan)))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    log.info("wrote %s (TensorRT %s, strongly typed, profile %s)", engine_path, trt.__version__, profile)
    return EngineInfo(engine_path, trt.__version__, io, profile, cache_path)
