"""INT4 packing: ONNX INT4 initializers (opset 21) and onnxruntime's MatMulNBits layout.

ONNX INT4 tensors pack two elements per byte in row-major order, element 2i in the low nibble and 2i+1 in the
high nibble; an odd element count leaves the last high nibble zero (onnx/docs/Changelog, "INT4").

MatMulNBits (com.microsoft) takes the weight in torch's Linear layout [N, K], split into blocks of
``block_size`` along K (the last block zero-padded), as unsigned codes q + 8 (its default zero point for 4 bits
when no zero_points input is given), packed low nibble first: B has shape [N, ceil(K / block_size),
block_size / 2] uint8, scales [N, ceil(K / block_size)] float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from maskaq_deploy.export.errors import ExportError

INT4_MIN, INT4_MAX = -8, 7
MS_DOMAIN = "com.microsoft"


def _check_codes(codes: np.ndarray, lo: int, hi: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ExportError(f"{what}: codes span [{codes.min()}, {codes.max()}], outside [{lo}, {hi}]; "
                          "the weight quantizer must have 4 bits or fewer")
    return codes.astype(np.int16)


def pack_nibbles(values: np.ndarray) -> bytes:
    """Pack integers in [0, 15] two per byte, low nibble first (row-major, odd count zero-padded)."""
    flat = np.asarray(values, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(data: bytes, count: int, signed: bool) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(raw.size * 2, dtype=np.int16)
    out[0::2], out[1::2] = raw & 0x0F, raw >> 4
    out = out[:count]
    if signed:
        out = np.where(out >= 8, out - 16, out)
    return out


def make_int4_initializer(name: str, codes: np.ndarray, signed: bool = True) -> onnx.TensorProto:
    """An INT4 (or UINT4) initializer holding ``codes`` (an integer array, any shape)."""
    if signed:
        vals = _check_codes(codes, INT4_MIN, INT4_MAX, name) & 0x0F
        dtype = TensorProto.INT4
    else:
        vals = _check_codes(codes, 0, 15, name)
        dtype = TensorProto.UINT4
    t = onnx.TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(int(d) for d in np.shape(codes))
    t.raw_data = pack_nibbles(vals)
    return t


def int4_initializer_to_array(t: onnx.TensorProto) -> np.ndarray:
    """Unpacked values of an INT4 / UINT4 initializer (int16 array)."""
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.raw_data:
        vals = unpack_nibbles(t.raw_data, count, t.data_type == TensorProto.INT4)
    else:  # int32_data holds packed pairs when not raw
        packed = np.asarray(t.int32_data, dtype=np.uint8).tobytes()
        vals = unpack_nibbles(packed, count, t.data_type == TensorProto.INT4)
    return vals.reshape(tuple(t.dims))


def pack_matmulnbits(codes: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, scales) for MatMulNBits from signed codes [N, K] and block scales [N, ceil(K / block_size)]."""
    codes = _check_codes(codes, INT4_MIN, INT4_MAX, "MatMulNBits weight")
    n, k = codes.shape
    blocks = -(-k // block_size)
    if scale.shape != (n, blocks):
        raise ExportError(f"MatMulNBits: scale shape {scale.shape} does not match weight [{n}, {k}] with "
                          f"block {block_size} (expected {(n, blocks)})")
    padded = np.full((n, blocks * block_size), 8, dtype=np.uint8)  # pad with code 0 (+8)
    padded[:, :k] = (codes + 8).astype(np.uint8)
    blob = np.frombuffer(pack_nibbles(padded), dtype=np.uint8).reshape(n, blocks, block_size // 2)
    return blob.copy(), scale.astype(np.float32)


def make_matmulnbits(name: str, a: str, b: str, scales: str, out: str, k: int, n: int, block_size: int,
                     accuracy_level: int = 0) -> onnx.NodeProto:
    """A MatMulNBits node. ``accuracy_level=0`` keeps float activations (levels 4+ quantize A to int8,
    which would no longer match the torch fake-quant model)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"MatMulNBits needs a power-of-two block size >= 16, got {block_size}")
    return helper.make_node("MatMulNBits", [a, b, scales], [out], name=name, domain=MS_DOMAIN,
                            K=int(k), N=int(n), bits=4, block_size=int(block_size),
                            accuracy_level=int(accuracy_level))
