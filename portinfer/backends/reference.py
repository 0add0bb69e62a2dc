"""The reference backend: float64 math, the simplest correct code. The oracle, never fast.

Every op upcasts its (already rounded) inputs to float64 and computes the contract's
formula directly. Outputs are cast to the activation dtype, except with `exact=True`,
where they stay float64: that is what the conformance suite compares against.
"""
from __future__ import annotations

import math

import torch

from . import quant, spec
from .base import Backend, rotary_angles, softmax_mask

F64 = torch.float64


class ReferenceBackend(Backend):
    name = "reference"
    native_weight_formats = spec.WEIGHT_FORMATS  # dequantizes exactly, in float64
    embedding_table_formats = ("fp64",)  # every prepared weight: rows of the float64 matrix

    def __init__(self, device=None, exact=False):
        super().__init__(device)
        self.exact = exact

    def _out(self, y, dtype):
        return y if self.exact else y.to(dtype)

    def _prepare_linear(self, weight, dtype):
        if isinstance(weight, spec.QuantizedWeight):
            dense = quant.dequantize(weight, F64)
        else:
            dense = weight.to(F64)
        n, k = dense.shape
        return spec.PreparedLinear(self.name, n, k, dtype, "fp64", spec.weight_format(weight), dense.to(self.device))

    def _embedding(self, ids, table):
        if isinstance(table, spec.PreparedLinear):  # its payload: the weight in float64 [V, H]
            return self._out(table.payload[ids.to(table.payload.device)], table.dtype)
        return self._out(table.to(F64)[ids], table.dtype)

    def _linear(self, x, w, bias):
        y = x.to(F64) @ w.payload.T
        if bias is not None:
            y = y + bias.to(F64)
        return self._out(y, x.dtype)

    def _rms_norm(self, x, weight, eps):
        x64 = x.to(F64)
        y = x64 / torch.sqrt((x64 * x64).mean(dim=-1, keepdim=True) + eps) * weight.to(F64)
        return self._out(y, x.dtype)

    def _layer_norm(self, x, weight, bias, eps):
        x64 = x.to(F64)
        mean = x64.mean(dim=-1, keepdim=True)
        var = ((x64 - mean) ** 2).mean(dim=-1, keepdim=True)
        y = (x64 - mean) / torch.sqrt(var + eps) * weight.to(F64) + bias.to(F64)
        return self._out(y, x.dtype)

    def _rope(self, x, pos, rotary):
        rd = rotary.rotary_dim
        angles = rotary_angles(pos, rotary, F64)[:, None]  # [B, 1, S, rd/2]
        cos, sin = torch.cos(angles), torch.sin(angles)
        x64 = x.to(F64)
        y = x64.clone()
        if rotary.style == "neox":
            x1, x2 = x64[..., : rd // 2], x64[..., rd // 2: rd]
            y[..., : rd // 2] = x1 * cos - x2 * sin
            y[..., rd // 2: rd] = x2 * cos + x1 * sin
        else:
            x1, x2 = x64[..., 0:rd:2], x64[..., 1:rd:2]
            y[..., 0:rd:2] = x1 * cos - x2 * sin
            y[..., 1:rd:2] = x2 * cos + x1 * sin
        return self._out(y, x.dtype)

    def _silu_mul(self, x):
        x64 = x.to(F64)
        half = x.shape[1] // 2
        gate, up = x64[:, :half], x64[:, half:]
        return self._out(gate / (1.0 + torch.exp(-gate)) * up, x.dtype)

    def _gelu(self, x, approximate):
        x64 = x.to(F64)
        if approximate == "tanh":
            y = 0.5 * x64 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
        else:
            y = 0.5 * x64 * (1.0 + torch.erf(x64 / math.sqrt(2.0)))
        return self._out(y, x.dtype)

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        B, Hq, Sq, D = q.shape
        group = Hq // k.shape[1]
        k64 = k.to(F64).repeat_interleave(group, dim=1)  # [B, Hq, Sk, D]
        v64 = v.to(F64).repeat_interleave(group, dim=1)
        scores = (q.to(F64) @ k64.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
        keys, empty = softmax_mask(q_pos, kv_len, Sq, k.shape[2], causal, q.device)  # [B,1,Sq,Sk], [B,1,Sq,1]
        probs = torch.softmax(scores.masked_fill(~keys, -math.inf), dim=-1)
        y = (probs @ v64).masked_fill(empty, 0.0)  # a row with no visible key returns zeros
        return self._out(y, q.dtype)
