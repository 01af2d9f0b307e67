"""What the Q/DQ pass knows of one quantizer: its grid, read from torch (export/qdq.py does the reading).

Kept free of torch so the lowerings (export/lowering.py) and the registry can use it without importing it.
A grid is integer (codes in [qmin, qmax]) or FP8 E4M3 (``float8``: values x / scale cast to float8e4m3fn,
saturated to +-448, as TensorRT's and ONNX's FP8 QuantizeLinear do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

E4M3_MAX = 448.0  # largest finite float8e4m3fn value


@dataclass(frozen=True)
class ActParams:
    name: str
    bits: int
    symmetric: bool
    scale: np.float32
    zero_point: int
    qmin: int
    qmax: int
    float8: bool = False  # E4M3 grid (then qmin/qmax are -448/448 and the zero point is 0)


@dataclass(frozen=True)
class WeightParams:
    name: str
    bits: int
    granularity: str  # "channel" | "block"
    block_size: int
    codes: np.ndarray = field(repr=False)  # int8 codes (float32 E4M3 values when float8), the torch layout
    scale: np.ndarray = field(repr=False)  # float32, [out] or [out, ceil(in / block_size)]
    float8: bool = False

    @property
    def container(self) -> int:
        """The ONNX element type the codes are stored in (INT4 block weights are chosen by their lowering)."""
        return TensorProto.FLOAT8E4M3FN if self.float8 else TensorProto.INT8

    def dequantized(self) -> np.ndarray:
        """codes * scale in float32, the torch layout (bit-identical to the quantizer's output)."""
        out = self.codes.shape[0]
        c = self.codes.reshape(out, -1).astype(np.float32)
        if self.granularity == "channel":
            return (c * self.scale[:, None]).reshape(self.codes.shape)
        k = c.shape[1]
        s = np.repeat(self.scale, self.block_size, axis=1)[:, :k]
        return (c * s).reshape(self.codes.shape)
