"""The torch backend: plain PyTorch on any torch device (cpu, cuda, and vendor devices
such as npu/xpu that plug into PyTorch). What a user would otherwise write, the generic
path on a new device, and the baseline every benchmark compares against.

Reductions run in fp32 (norms upcast; matmul and SDPA accumulate in fp32 internally).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quant, spec
from .base import Backend, rotary_angles, softmax_mask


class TorchBackend(Backend):
    name = "torch"
    embedding_table_formats = spec.DENSE_FORMATS  # rows of the dense payload

    @classmethod
    def default_device_name(cls):
        return "cuda" if torch.cuda.is_available() else "cpu"

    def __init__(self, device=None):
        super().__init__(device if device is not None else self.default_device_name())

    def info(self):
        return {"device": str(self.device), "threads": torch.get_num_threads() if self.device.type == "cpu" else None}

    def _prepare_linear(self, weight, dtype):
        if isinstance(weight, spec.QuantizedWeight):
            # d * q of a GGUF block is exact in fp32 but not in fp16/bf16: keep fp32 weights,
            # so the result is that of the quantized matrix (the contract), not of a re-rounded one
            blocks = spec.QuantizedWeight(weight.format, weight.blocks.to(self.device), weight.shape)
            dense = quant.dequantize(blocks, torch.float32)
        else:
            dense = weight.to(device=self.device, dtype=dtype)
        dense = dense.contiguous()
        n, k = dense.shape
        return spec.PreparedLinear(self.name, n, k, dtype, spec.dtype_name(dense.dtype), spec.weight_format(weight),
                                   dense)

    def _embedding(self, ids, table):
        if isinstance(table, spec.PreparedLinear):  # its payload: the dense weight [V, H] (fp32 if it was blocks)
            return F.embedding(ids, table.payload).to(table.dtype)
        return F.embedding(ids, table)

    def _linear(self, x, w, bias):
        if w.payload.dtype != x.dtype:  # fp32 weights dequantized from blocks
            return F.linear(x.float(), w.payload, None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, w.payload, bias)

    def _rms_norm(self, x, weight, eps):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
        return y.to(x.dtype)

    def _layer_norm(self, x, weight, bias, eps):
        y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
        return y.to(x.dtype)

    def _rope(self, x, pos, rotary):
        rd = rotary.rotary_dim
        # angles in float64 where the device has it: pos * inv_freq grows with position and
        # an fp32 angle loses ~pos * 2^-24 radians; cos/sin are then taken in fp32
        angle_dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
        angles = rotary_angles(pos.to(x.device), rotary, angle_dtype)[:, None]  # [B, 1, S, rd/2]
        cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
        xf = x.float()
        if rotary.style == "neox":
            x1, x2 = xf[..., : rd // 2], xf[..., rd // 2: rd]
            rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = xf[..., 0:rd:2], xf[..., 1:rd:2]
            rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        if rd < x.shape[-1]:
            rotated = torch.cat([rotated, xf[..., rd:]], dim=-1)
        return rotated.to(x.dtype)

    def _silu_mul(self, x):
        half = x.shape[1] // 2
        return F.silu(x[:, :half]) * x[:, half:]

    def _gelu(self, x, approximate):
        return F.gelu(x, approximate=approximate)

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        B, Hq, Sq, D = q.shape
        Sk = k.shape[2]
        keys, empty = softmax_mask(q_pos, kv_len, Sq, Sk, causal, q.device)  # [B,1,Sq,Sk], [B,1,Sq,1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale, enable_gqa=k.shape[1] != Hq)
        return y.masked_fill(empty, 0.0)
