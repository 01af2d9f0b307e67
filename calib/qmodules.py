"""Quantized replacements for the modules of timm ViT-family models.

Each replacement is built from an existing module instance and keeps its parameter and buffer names, so a timm
state dict loads into the quantized model unchanged (quantizer state lives under extra ``*_quantizer`` keys).
timm's classes are never modified; only the model instance's submodules are swapped.

Attention is computed explicitly (q @ k^T -> softmax -> attn @ v, never fused SDPA) so that both matmuls can
be quantized, the ONNX exporter sees MatMul / Softmax / MatMul, and MaskAQ can read the attention logits and
the attention outputs (``capture``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer


class QuantLinear(nn.Linear):
    """nn.Linear with an optional input (activation) quantizer and weight quantizer."""

    def __init__(self, src: nn.Linear):
        super().__init__(src.in_features, src.out_features, bias=src.bias is not None,
                         device=src.weight.device, dtype=src.weight.dtype)
        self.weight = src.weight
        self.bias = src.bias
        self.input_quantizer: ActQuantizer | None = None
        self.weight_quantizer: WeightQuantizer | None = None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d (the patch embedding) with optional input and per-output-channel weight quantizers."""

    def __init__(self, src: nn.Conv2d):
        super().__init__(src.in_channels, src.out_channels, src.kernel_size, stride=src.stride,
                         padding=src.padding, dilation=src.dilation, groups=src.groups,
                         bias=src.bias is not None, padding_mode=src.padding_mode,
                         device=src.weight.device, dtype=src.weight.dtype)
        self.weight = src.weight
        self.bias = src.bias
        self.input_quantizer: ActQuantizer | None = None
        self.weight_quantizer: WeightQuantizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return self._conv_forward(x, w, self.bias)


class QuantMatMul(nn.Module):
    """a @ b with a quantizer on each input (the two attention matmuls)."""

    def __init__(self):
        super().__init__()
        self.a_quantizer: ActQuantizer | None = None
        self.b_quantizer: ActQuantizer | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ b


def _adopt(dst: nn.Module, src: nn.Module) -> None:
    """Move src's children, parameters, buffers and plain attributes onto dst under the same names."""
    for name, child in src.named_children():
        dst.add_module(name, child)
    for name, p in src.named_parameters(recurse=False):
        dst.register_parameter(name, p)
    for name, b in src.named_buffers(recurse=False):
        dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
    for key, value in vars(src).items():
        if not key.startswith("_") and key not in dst.__dict__ and key != "training":
            setattr(dst, key, value)


class _CapturingAttention(nn.Module):
    """Shared machinery of the quantized attention modules: two QuantMatMuls and optional capture.

    With ``capture = True`` the forward pass keeps, for the MaskAQ losses:
      * ``captured_logits``: raw attention logits q @ k^T (before the 1/sqrt(d) scale, bias and softmax),
        shape [B', heads, N, N] (B' = batch * windows for Swin);
      * ``captured_output``: the attention output attn @ v, shape [B', heads, N, head_dim].
    """

    def __init__(self, src: nn.Module):
        super().__init__()
        _adopt(self, src)
        self.fused_attn = False  # explicit matmuls: quantizable, exportable as MatMul/Softmax/MatMul
        self.qk_matmul = QuantMatMul()
        self.av_matmul = QuantMatMul()
        self.capture = False
        self.captured_logits: torch.Tensor | None = None
        self.captured_output: torch.Tensor | None = None

    def _attend(self, q, k, v, bias=None):
        logits = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        if self.capture:
            self.captured_logits = logits / self.scale
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = self.av_matmul(attn, v)
        if self.capture:
            self.captured_output = out
        return out


class QuantAttention(_CapturingAttention):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, DeiT-distilled)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if is_causal:
            bias = x.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(
                attn_mask, dtype=x.dtype).masked_fill_(~attn_mask, float("-inf"))
        out = self._attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class QuantWindowAttention(_CapturingAttention):
    """Replacement for Swin's ``WindowAttention`` (relative position bias, shifted-window mask)."""

    def _rel_pos_bias(self) -> torch.Tensor:
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0))  # [1, nW, heads, N, N]
            bias = bias.expand(B_ // num_win, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        out = self._attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(out))
