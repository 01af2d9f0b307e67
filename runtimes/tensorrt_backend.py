"""Run a serialized TensorRT engine (TensorRT 10.x / 11.x) on batches of images.

    with TensorRTBackend("OUT/model.engine") as rt:
        logits = rt.run(images)            # (N, C, H, W) float32 -> (N, classes) float32

Buffers are torch CUDA tensors (no pycuda); execution uses the name-based tensor API of TensorRT 10+
(set_input_shape, set_tensor_address, execute_async_v3 on a torch CUDA stream; see
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html).
A batch larger than the engine's profile allows is split; a smaller one than its minimum (or than a static
batch) is zero-padded and the padding dropped from the logits.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError, BackendUnavailable
from maskaq_deploy.runtimes.targets import TENSORRT

log = logging.getLogger(__name__)


def plan_batches(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Split ``n`` rows into runs of (start, stop, run_size) with lo <= run_size <= hi; run_size - (stop -
    start) rows of zero padding fill a run that is too short."""
    if not 1 <= lo <= hi:
        raise ValueError(f"batch bounds need 1 <= lo <= hi, got {lo}, {hi}")
    runs = []
    for start in range(0, n, hi):
        stop = min(start + hi, n)
        runs.append((start, stop, max(stop - start, lo)))
    return runs


SUPPORTED_MAJORS = (10, 11)


def version_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def import_tensorrt():
    """The tensorrt module, or BackendUnavailable saying what is missing (package, version, GPU)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"the tensorrt Python package is not importable ({e}); install TensorRT 10.x "
                                 "or 11.x on the device (pip install 'maskaq-deploy[tensorrt]')") from None
    version = getattr(trt, "__version__", "0")
    if version_major(version) not in SUPPORTED_MAJORS:
        raise BackendUnavailable(f"TensorRT {version} found; this tool needs TensorRT 10.x or 11.x")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"TensorRT {version} is installed but no CUDA GPU is visible to torch")
    return trt


def make_logger(trt):
    """A TensorRT logger that forwards to ``logging`` and keeps the errors for exception messages."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.error("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("tensorrt: %s", msg)
            else:
                log.debug("tensorrt: %s", msg)

    return _Logger()


class _classorinstancemethod:
    """A method that gets the class when called on the class and the instance when called on an instance, so
    ``TensorRTBackend.available()`` checks the machine and ``backend.available()`` also checks the engine."""

    def __init__(self, func):
        self.func = func

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls if obj is None else obj)


class TensorRTBackend(Backend):
    name = TENSORRT

    def __init__(self, engine_path, device: str = "cuda"):
        self.engine_path = Path(engine_path)
        self.device = device
        self._engine = self._context = self._runtime = self._stream = None

    @_classorinstancemethod
    def available(self_or_cls) -> tuple[bool, str]:
        """(True, "") when the tensorrt package (10.x/11.x) and a CUDA GPU are here and, asked on an instance,
        its engine file exists; else (False, why). Whether the engine fits this TensorRT version and GPU is
        only known once it is deserialized (on enter)."""
        try:
            import_tensorrt()
        except BackendUnavailable as e:
            return False, str(e)
        if isinstance(self_or_cls, TensorRTBackend) and not self_or_cls.engine_path.is_file():
            return False, (f"engine {self_or_cls.engine_path} not found; build it with "
                           "'maskaq-deploy build --target tensorrt' or the bundle's build_engine.sh")
        return True, ""

    def _load(self) -> None:
        import torch

        trt = import_tensorrt()
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):  # TensorRT works on the current CUDA device
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            detail = f" ({'; '.join(self._logger.errors[-2:])})" if self._logger.errors else ""
            raise BackendUnavailable(
                f"{self.engine_path} cannot be loaded by TensorRT {trt.__version__} on this GPU{detail}; "
                "engines are specific to the TensorRT version and GPU that built them: rebuild it here with "
                "the bundle's build_engine.sh")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.engine_path} has inputs {inputs} and outputs {outputs}; a classifier "
                               "engine needs one image input and one logits output")
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16}
        try:
            self._in_dtype = dtypes[engine.get_tensor_dtype(self.input_name)]
            self._out_dtype = dtypes[engine.get_tensor_dtype(self.output_name)]
        except KeyError as e:
            raise BackendError(f"{self.engine_path}: unsupported I/O dtype {e}; expected float32/16 or bf16") from None
        shape = tuple(engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:
            lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
            self.batch_range = (lo[0], hi[0])
        else:
            self.batch_range = (shape[0], shape[0])
        self.image_shape = shape[1:]
        self._engine = engine
        with torch.cuda.device(self.device):
            self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self.device)
        log.info("loaded %s: input %s %s batch %s..%s, output %s", self.engine_path, self.input_name,
                 self.image_shape, *self.batch_range, self.output_name)

    def close(self) -> None:
        self._context = self._engine = self._runtime = self._stream = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self._context is None:
            raise BackendError("the TensorRT backend is not loaded; use it as a context manager")
        if tuple(batch.shape[1:]) != self.image_shape:
            raise BackendError(f"{self.engine_path} takes images of shape {self.image_shape}, got "
                               f"{tuple(batch.shape[1:])}")
        outs = []
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for start, stop, size in plan_batches(len(batch), *self.batch_range):
                x = torch.zeros((size, *self.image_shape), dtype=self._in_dtype, device=self.device)
                x[: stop - start] = torch.from_numpy(batch[start:stop]).to(self.device, self._in_dtype)
                if not self._context.set_input_shape(self.input_name, tuple(x.shape)):
                    raise BackendError(f"{self.engine_path} rejects input shape {tuple(x.shape)} (profile batch "
                                       f"{self.batch_range[0]}..{self.batch_range[1]})")
                y = torch.empty(tuple(self._context.get_tensor_shape(self.output_name)), dtype=self._out_dtype,
                                device=self.device)
                self._context.set_tensor_address(self.input_name, x.data_ptr())
                self._context.set_tensor_address(self.output_name, y.data_ptr())
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise BackendError(f"TensorRT failed to execute {self.engine_path}: "
                                       f"{'; '.join(self._logger.errors[-2:]) or 'see the log'}")
                # x and y must outlive the kernels queued on the stream: keep them until the sync below.
                outs.append((y[: stop - start], x))
            self._stream.synchronize()
        return np.concatenate([y.float().cpu().numpy() for y, _ in outs], axis=0)
