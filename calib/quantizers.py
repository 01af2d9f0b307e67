"""Fake quantizers: integer grids simulated in float, with gradients for fine-tuning.

* ``WeightQuantizer``: symmetric signed, per output channel (axis 0) or block-wise along the input dimension.
* ``ActQuantizer``: per tensor, symmetric signed (zero point 0, what TensorRT requires) or asymmetric, with a
  learned step size (LSQ) initialized by an observer.

Number formats: ``int`` (the integer grids above) or ``e4m3`` (FP8 E4M3: x / scale saturated to +-448 and
rounded to the nearest float8e4m3fn value, as TensorRT's and ONNX's FP8 QuantizeLinear do). An FP8 quantizer
keeps the same machinery: its "qmax" is 448, so every observer's amax gives the scale amax / 448.

Rounding uses a straight-through estimator; clamping passes no gradient to the clipped values (LSQ).
A quantizer's exported state is exactly ``scale``, ``zero_point``, ``bits``, ``axis`` and ``block_size``:
the ONNX exporter reads nothing else, so the torch model and the QDQ graph compute the same grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from maskaq_deploy.calib.observers import WEIGHT_OBSERVERS, make_observer, one_of

MIN_BITS, MAX_BITS = 2, 8
INT, E4M3 = "int", "e4m3"
FORMATS = (INT, E4M3)
E4M3_MAX = 448.0  # largest finite float8e4m3fn value


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with LSQ gradients in one autograd node.

    Written out as ``round_ste``/``clamp``/multiply it is about ten autograd nodes per quantizer, each saving
    a full-size tensor. Here the forward keeps a boolean "in range" mask (plus the input and output, only when
    the scale is trained), and the backward is two or three element-wise ops. Gradients (straight-through):
    d/dx = 1 where the rounded code lies on the grid, 0 where it was clipped; d/dscale = round(x/s) - x/s where
    it lies on the grid and the clipped code (minus zp) elsewhere, i.e. (out - x * in_range) / s, times
    ``grad_factor`` (LSQ's step-size gradient scale), summed to the scale's shape.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float, float8: bool = False):
        out, in_range = _lsq_values(x, scale, zero_point, qmin, qmax, float8,
                                    in_range=ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(in_range, x, out, scale)
        else:
            ctx.save_for_backward(in_range)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        in_range = ctx.saved_tensors[0]
        grad_x = grad * in_range
        grad_s = None
        if ctx.needs_input_grad[1]:
            _, x, out, scale = ctx.saved_tensors
            grad_s = (grad * out - grad_x * x).sum_to_size(scale.shape) / scale * ctx.grad_factor
        return (grad_x if ctx.needs_input_grad[0] else None), grad_s, None, None, None, None, None


def _lsq_values(x, scale, zero_point, qmin: int, qmax: int, float8: bool, in_range: bool):
    """The fake-quantized values, and the "code on the grid" mask when ``in_range`` (the backward's input)."""
    code = x / scale if float8 else torch.round(x / scale)
    if zero_point is not None:
        code.add_(zero_point)
    q = torch.clamp(code, qmin, qmax)
    mask = q.eq(code) if in_range else None
    if float8:  # round to the nearest E4M3 value (the cast rounds to nearest even, like ONNX's saturating Q)
        q = q.to(torch.float8_e4m3fn).to(x.dtype)
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale), mask


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                   grad_factor: float = 1.0, float8: bool = False) -> torch.Tensor:
    """``fake_quant`` (same values) whose scale gradient is LSQ's, scaled by ``grad_factor``; the training
    path. ``zero_point=None`` for a symmetric grid saves two passes over the tensor. ``float8``: the E4M3
    grid (qmin/qmax -448/448) instead of the integer one. Without grad mode (evaluation, calibration passes)
    the same values come without the autograd node: a learnable scale would otherwise make it compute the
    backward's mask and keep the input and output alive for a backward that never comes."""
    if not torch.is_grad_enabled():
        return _lsq_values(x, scale, zero_point, qmin, qmax, float8, in_range=False)[0]
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor, float8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               float8: bool = False) -> torch.Tensor:
    if float8:
        y = torch.clamp(x / scale + zero_point, qmin, qmax)
        q = (y.to(torch.float8_e4m3fn).to(x.dtype) - y).detach() + y  # straight through the E4M3 rounding
    else:
        q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} bit width must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def grid_range(bits: int, fmt: str, what: str) -> tuple:
    """(qmin, qmax) of a symmetric signed grid in format ``fmt``: the integer codes, or +-448 for E4M3."""
    if fmt not in FORMATS:
        raise ValueError(f"{what} number format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == E4M3:
        if bits != 8:
            raise ValueError(f"an {E4M3} {what} quantizer has 8 bits, got {bits}")
        return -E4M3_MAX, E4M3_MAX
    return signed_range(bits)


class WeightQuantizer(nn.Module):
    """Symmetric signed weight quantizer.

    ``granularity="channel"``: one scale per output channel (dim 0), shape [out].
    ``granularity="block"``: one scale per ``block_size`` consecutive input elements of each output channel,
    shape [out, ceil(in / block_size)] (the input dims of a conv weight are flattened first). The scale is a
    learnable parameter (LSQ) initialized from the weight by min-max or an MSE search over clipping ratios.
    """

    def __init__(self, bits: int, granularity: str = "channel", block_size: int = 128, observer: str = "minmax",
                 fmt: str = INT):
        super().__init__()
        self.bits = check_bits(bits, "weight")
        if granularity not in ("channel", "block"):
            raise ValueError(f"weight granularity must be 'channel' or 'block', got {granularity!r}")
        if granularity == "block" and (block_size < 2 or block_size & (block_size - 1)):
            raise ValueError(f"block size must be a power of two >= 2 (e.g. 32, 64, 128), got {block_size}")
        if observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"weight observer must be {one_of(WEIGHT_OBSERVERS)}, got {observer!r}")
        if fmt == E4M3 and granularity != "channel":
            raise ValueError("FP8 (e4m3) weights are per-channel")
        self.granularity = granularity
        self.block_size = block_size if granularity == "block" else 0
        self.observer = observer
        self.fmt = fmt
        self.enabled = True
        self.qmin, self.qmax = grid_range(bits, fmt, "weight")
        self.scale = nn.Parameter(torch.empty(0))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def axis(self) -> int:
        return 0

    @property
    def float8(self) -> bool:
        return self.fmt == E4M3

    def _blocked(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """View the weight as [out, groups, group] (per channel: one group of all inputs), zero-padded."""
        w2 = w.reshape(w.shape[0], -1)
        if self.granularity == "channel":
            return w2.unsqueeze(1), 0
        pad = (-w2.shape[1]) % self.block_size
        if pad:
            w2 = torch.nn.functional.pad(w2, (0, pad))
        return w2.reshape(w2.shape[0], -1, self.block_size), pad

    def _scale_view(self) -> torch.Tensor:
        return self.scale.reshape(self.scale.shape[0], -1, 1)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        wb, _ = self._blocked(w.detach().float())
        amax = wb.abs().amax(dim=-1).clamp_min(1e-8)  # [out, groups]
        scale = amax / self.qmax
        if self.observer == "mse":
            best_err = torch.full_like(amax, float("inf"))
            best = scale.clone()
            zero = torch.zeros(())
            for ratio in torch.linspace(0.5, 1.0, 51).tolist():
                s = (amax * ratio / self.qmax).unsqueeze(-1)
                err = ((fake_quant(wb, s, zero, self.qmin, self.qmax, self.float8) - wb) ** 2).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, s.squeeze(-1), best)
            scale = best
        if self.granularity == "channel":
            scale = scale.squeeze(1)
        self.scale = nn.Parameter(scale.to(w.device))
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if not bool(self.initialized):
            self.init_from(w)
        wb, pad = self._blocked(w)
        g = 1.0 / math.sqrt(wb[0].numel() * self.qmax)
        wq = lsq_fake_quant(wb, self._scale_view().to(wb.dtype), None, self.qmin, self.qmax, g, self.float8)
        wq = wq.reshape(w.shape[0], -1)
        if pad:
            wq = wq[:, :-pad]
        return wq.reshape(w.shape)

    @torch.no_grad()
    def quantize_int(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``w`` on this quantizer's grid (int8 tensor, same shape as ``w``)."""
        wb, pad = self._blocked(w.float())
        q = torch.clamp(torch.round(wb / self._scale_view()), self.qmin, self.qmax).reshape(w.shape[0], -1)
        if pad:
            q = q[:, :-pad]
        return q.reshape(w.shape).to(torch.int8)

    def extra_repr(self) -> str:
        g = f"block={self.block_size}" if self.granularity == "block" else "per-channel"
        return f"bits={self.bits}, {self.fmt}, {g}, enabled={self.enabled}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a learned step size (LSQ).

    Symmetric: signed grid [-2^(b-1), 2^(b-1)-1], zero point 0. Asymmetric: unsigned grid [0, 2^b-1] with a
    zero point. Until calibrated, ``calibrating=True`` lets values through unchanged while the observer
    collects them; ``finish_calibration()`` sets the scale and zero point from the observed range.
    """

    def __init__(self, bits: int, symmetric: bool = True, observer: str = "minmax", fmt: str = INT):
        super().__init__()
        self.bits = check_bits(bits, "activation")
        if fmt == E4M3 and not symmetric:
            raise ValueError("FP8 (e4m3) activations are symmetric (zero point 0)")
        self.symmetric = symmetric
        self.fmt = fmt
        self.observer_name = observer
        self.observer = make_observer(observer)
        if symmetric:
            self.qmin, self.qmax = grid_range(bits, fmt, "activation")
        else:
            self.qmin, self.qmax = 0, (1 << bits) - 1
        self.enabled = True
        self.calibrating = False
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    axis = None
    block_size = 0

    @property
    def float8(self) -> bool:
        return self.fmt == E4M3

    def _params_for_range(self, lo: float, hi: float) -> tuple[float, float]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric:
            amax = max(-lo, hi, 1e-8)
            return amax / self.qmax, 0.0
        scale = max(hi - lo, 1e-8) / (self.qmax - self.qmin)
        zp = float(min(max(round(self.qmin - lo / scale), self.qmin), self.qmax))
        return scale, zp

    def _range_error(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        scale, zp = self._params_for_range(lo, hi)
        xq = fake_quant(x, torch.tensor(scale), torch.tensor(zp), self.qmin, self.qmax, self.float8)
        return ((xq - x) ** 2).mean()

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set scale and zero point from the observer's range; a quantizer that saw no data raises."""
        lo, hi = self.observer.compute(self._range_error)
        scale, zp = self._params_for_range(lo, hi)
        self.scale.data.fill_(scale)
        self.zero_point.fill_(zp)
        self.initialized.fill_(True)
        self.calibrating = False
        self.observer.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observer.collect(x)
            return x
        if not bool(self.initialized):
            raise RuntimeError("activation quantizer used before calibration; run calibrate_observers first")
        g = 1.0 / math.sqrt(x[0].numel() * max(self.qmax, 1))
        s = self.scale.clamp_min(1e-8).to(x.dtype)
        zp = None if self.symmetric else self.zero_point.to(x.dtype)
        return lsq_fake_quant(x, s, zp, self.qmin, self.qmax, g, self.float8)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {self.fmt}, {kind}, observer={self.observer_name}, enabled={self.enabled}"
