"""npu-sim: an emulated NPU that runs on this machine and imposes an NPU's constraints.

None of the domestic accelerators is here, so the porting path (a partial backend,
placement, fallback, strict mode, the bytes that cross) is exercised on this one. It
behaves like an Ascend-style NPU, not like torch on a CPU:

- Cube unit: every matrix product (linear, attention's QKᵀ and PV) takes fp16/bf16
  operands and accumulates in fp32, one 16x16x16 tile at a time; shapes are zero-padded
  to multiples of 16 inside the op, as the hardware pads to its fractal tiles.
- Weights are converted once, in `prepare_linear`, to its own layout: the fractal layout
  [K/16, N/16, 16(n), 16(k)] in the activation dtype, padded with zeros; `linear` computes
  from that layout and never sees the [N, K] matrix again.
- Vector unit: norms and activations upcast fp16/bf16 to fp32, compute, round once.
  Attention rounds its softmax probabilities to the input dtype before the PV product,
  as NPU flash-attention kernels do, and divides by the fp32 row sum afterwards.
- A deliberately partial op set: no fp32 activations at all, no rope, no layer_norm, no
  gelu, no GGUF block formats. Those fall back (placement.py), or are refused up front
  under fallback="error".
- Its own device memory (`memory_space = "npu-sim"`): a tensor crosses into or out of
  it only through `copy_to_memory` / `copy_from_memory`, which make real copies and count
  the bytes; Placement uses those hooks for every fallback, so a model's placement report
  shows what crossed. The emulated memory is host memory: torch glue between ops (residual
  adds, views, KV-cache writes) runs on it as on any device's memory.

It is registered through the `portinfer.backends` entry point in pyproject.toml, as an
out-of-tree plugin would be, not in the registry's built-in list.
"""
from __future__ import annotations

import torch

from . import spec
from .base import Backend, attention_mask

TILE = 16
F32 = torch.float32


def _round_up(n: int) -> int:
    return -(-n // TILE) * TILE


def to_fractal(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> the fractal layout [..., K/16, N/16 * 16, 16] (zero-padded, same dtype).

    Tile (kt, nt) holds w[nt*16:(nt+1)*16, kt*16:(kt+1)*16] row-major, so all tiles of one
    K step are contiguous: the cube streams one [Np, 16] panel per step."""
    *batch, n, k = w.shape
    padded = w.new_zeros(*batch, _round_up(n), _round_up(k))
    padded[..., :n, :k] = w
    k_tiles = padded.shape[-1] // TILE
    return padded.reshape(*batch, padded.shape[-2], k_tiles, TILE).transpose(-3, -2).contiguous()


def cube_matmul(a: torch.Tensor, b_fractal: torch.Tensor, n: int) -> torch.Tensor:
    """a [..., M, K] (fp16/bf16) times a fractal operand [..., K/16, Np, 16] -> fp32 [..., M, n].

    One K tile at a time: the 16-long products of fp16/bf16 values are exact in fp32 and are
    summed in fp32, then added to the fp32 accumulator, as a cube unit's L0C does."""
    *batch, m, k = a.shape
    k_tiles = b_fractal.shape[-3]
    if k > k_tiles * TILE:
        raise ValueError(f"a: expected K <= {k_tiles * TILE} (the fractal operand's padded K), got shape {list(a.shape)}")
    a_padded = a.new_zeros(*batch, _round_up(m), k_tiles * TILE)
    a_padded[..., :m, :k] = a
    acc = torch.zeros(*batch, a_padded.shape[-2], b_fractal.shape[-2], dtype=F32, device=a.device)
    for t in range(k_tiles):
        a_tile = a_padded[..., t * TILE:(t + 1) * TILE].to(F32)  # [..., Mp, 16]
        b_tile = b_fractal[..., t, :, :].to(F32)  # [..., Np, 16]
        acc += a_tile @ b_tile.transpose(-1, -2)
    return acc[..., :m, :n]


class NpuSimBackend(Backend):
    name = "npu-sim"
    default_device = "cpu"  # the torch device its emulated memory sits on
    memory_space = "npu-sim"
    activation_dtypes = (torch.float16, torch.bfloat16)
    native_weight_formats = ("fp16", "bf16")  # fp32 weights are rounded to the activation dtype at prepare
    ops = ("embedding", "linear", "rms_norm", "silu_mul", "attention")

    def __init__(self, device=None):
        super().__init__(device)
        if self.device.type != "cpu":
            raise ValueError(f"device: npu-sim emulates its memory on the CPU, expected 'cpu', got {str(self.device)!r}")
        self.bytes_to_device = 0
        self.bytes_from_device = 0
        self.weight_bytes = 0

    @classmethod
    def auto_eligible(cls) -> bool:
        return False  # an emulator: slower than torch on the same CPU, never picked by backend="auto"

    def info(self):
        return {"memory": self.memory, "cube": "16x16x16 tiles, fp16/bf16 in, fp32 accumulate",
                "weight_layout": "fractal [K/16, N/16, 16, 16]", "weight_bytes": self.weight_bytes,
                "bytes_to_device": self.bytes_to_device, "bytes_from_device": self.bytes_from_device}

    def supports(self, op, **meta):
        if not super().supports(op, **meta):
            return False
        fmt = meta.get("weight_format")
        return op != "linear" or fmt is None or fmt in spec.DENSE_FORMATS

    # ---------------------------------------------------------------- its memory

    def copy_to_memory(self, t):
        """Host -> npu-sim: a DMA into a fresh contiguous buffer of its memory."""
        self.bytes_to_device += t.numel() * t.element_size()
        return t.to(self.device).clone(memory_format=torch.contiguous_format)

    def copy_from_memory(self, t, device):
        """npu-sim -> `device`: always a copy, never a view of its memory."""
        self.bytes_from_device += t.numel() * t.element_size()
        return t.to(device, copy=True)

    # ---------------------------------------------------------------- ops

    def _prepare_linear(self, weight, dtype):
        n, k = weight.shape
        fractal = to_fractal(weight.to(dtype))  # [K/16, Np, 16]
        self.weight_bytes += fractal.numel() * fractal.element_size()
        return spec.PreparedLinear(self.name, n, k, dtype, "fractal-" + spec.dtype_name(dtype),
                                   spec.weight_format(weight), fractal)

    def _linear(self, x, w, bias):
        acc = cube_matmul(x, w.payload, w.out_features)  # fp32 [M, N]
        if bias is not None:
            acc += bias.to(F32)
        out = self.new_output(acc.shape, x.dtype)
        out.copy_(acc)
        return out

    def _embedding(self, ids, table):
        out = self.new_output((ids.numel(), table.shape[1]), table.dtype)
        torch.index_select(table, 0, ids, out=out)
        return out

    def _rms_norm(self, x, weight, eps):
        xf = x.to(F32)
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps) * weight.to(F32)
        out = self.new_output(x.shape, x.dtype)
        out.copy_(y)
        return out

    def _silu_mul(self, x):
        half = x.shape[1] // 2
        gate, up = x[:, :half].to(F32), x[:, half:].to(F32)
        out = self.new_output((x.shape[0], half), x.dtype)
        out.copy_(gate * torch.sigmoid(gate) * up)
        return out

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        group = Hq // Hkv
        # GQA without copying K/V per query head: the `group` query heads that share a KV head
        # are stacked along the rows of one cube product
        q_rows = q.reshape(B, Hkv, group * Sq, D)  # [B, Hkv, group*Sq, D]
        scores = cube_matmul(q_rows, to_fractal(k), Sk).reshape(B, Hq, Sq, Sk) * scale  # fp32
        visible = attention_mask(q_pos, kv_len, Sq, Sk, causal, q.device)  # [B, 1, Sq, Sk]
        any_visible = visible.any(dim=-1, keepdim=True)  # [B, 1, Sq, 1]
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
        row_max = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - row_max)  # fp32, in [0, 1]
        row_sum = p.sum(dim=-1, keepdim=True)
        p_low = p.to(q.dtype).reshape(B, Hkv, group * Sq, Sk)  # the cube takes fp16/bf16 operands
        pv = cube_matmul(p_low, to_fractal(v.transpose(-1, -2)), D).reshape(B, Hq, Sq, D)
        y = (pv / row_sum).masked_fill(~any_visible, 0.0)
        out = self.new_output(q.shape, q.dtype)
        out.copy_(y)
        return out
