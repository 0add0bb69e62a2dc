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
- GGUF block formats (q8_0, q4_0, q4_1) are computed from their blocks, as an NPU's
  weight-only-quantized matmul does: the integer codes (exact in fp16/bf16) go through the
  cube, each 32-wide block's fp32 partial sum is scaled by the block's scale.
- A deliberately partial op set: no fp32 activations at all, no rope, no layer_norm, no
  gelu. Those fall back (placement.py), or are refused up front under fallback="error".
- Its own device memory (`memory_space = "npu-sim"`): a tensor crosses into or out of
  it only through `copy_to_memory` / `copy_from_memory`, which make real copies and count
  the bytes; Placement uses those hooks for every fallback, so a model's placement report
  shows what crossed. The emulated memory is host memory: torch glue between ops (residual
  adds, views, KV-cache writes) runs on it as on any device's memory.

It is registered through the `portinfer.backends` entry point in pyproject.toml, as an
out-of-tree plugin would be, not in the registry's built-in list.
"""
from __future__ import annotations

import math

import torch

from . import quant, spec
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


def cube_matmul(a: torch.Tensor, b_fractal: torch.Tensor, n: int, block_scales=None, block_mins=None,
                chunk_bytes: int = 32 << 20) -> torch.Tensor:
    """a [..., M, K] (fp16/bf16) times a fractal operand [..., K/16, Np, 16] -> fp32 [..., M, n].

    Every 16x16x16 tile product is formed in fp32 from fp16/bf16 operands (their products
    are exact in fp32), and tile products are accumulated in fp32, as a cube unit's L0C
    accumulator does. Tiles are processed a chunk of K tiles at a time (intermediate
    [..., T, Mp, Np] fp32 of at most `chunk_bytes`), not one Python step per tile.

    GGUF weights (block_scales fp32 [K/32, Np], block_mins for q4_1): the fractal holds the
    blocks' integer codes, exact in fp16/bf16; each 32-wide block's fp32 partial sum is
    scaled by its block's scale (q4_1: plus its min times the block's sum of `a`) before it
    joins the accumulator, so the result is that of the quantized matrix, never re-rounded."""
    *batch, m, k = a.shape
    k_tiles, n_padded = b_fractal.shape[-3], b_fractal.shape[-2]
    if k > k_tiles * TILE:
        raise ValueError(f"a: expected K <= {k_tiles * TILE} (the fractal operand's padded K), got shape {list(a.shape)}")
    a_padded = a.new_zeros(*batch, _round_up(m), k_tiles * TILE)
    a_padded[..., :m, :k] = a
    m_padded = a_padded.shape[-2]
    a_tiles = a_padded.unflatten(-1, (k_tiles, TILE)).transpose(-3, -2)  # [..., Kt, Mp, 16]
    acc = torch.zeros(*batch, m_padded, n_padded, dtype=F32, device=a.device)
    per_tile_bytes = 4 * m_padded * n_padded * math.prod(batch)
    step = max(2, chunk_bytes // per_tile_bytes // 2 * 2)  # even: a GGUF block is two tiles
    for t0 in range(0, k_tiles, step):
        t1 = min(k_tiles, t0 + step)
        # [..., T, Mp, Np]: one fp32 product per tile of this chunk
        partial = a_tiles[..., t0:t1, :, :].to(F32) @ b_fractal[..., t0:t1, :, :].to(F32).transpose(-1, -2)
        if block_scales is None:
            acc += partial.sum(dim=-3)
            continue
        block_sums = partial.unflatten(-3, (-1, 2)).sum(dim=-3)  # [..., T/2, Mp, Np]
        acc += (block_sums * block_scales[t0 // 2:t1 // 2, None, :]).sum(dim=-3)
        if block_mins is not None:
            a_sums = a_padded[..., t0 * TILE:t1 * TILE].to(F32).unflatten(-1, (-1, 2 * TILE)).sum(dim=-1)
            acc += a_sums @ block_mins[t0 // 2:t1 // 2]  # [..., Mp, T/2] @ [T/2, Np]
    return acc[..., :m, :n]


def _gguf_codes(weight: spec.QuantizedWeight):
    """GGUF blocks -> (integer codes [N, K] fp32, scales [N, K/32] fp32, mins [N, K/32] fp32 or None).

    The scales (and q4_1 mins) are each block's leading fp16 fields; the codes follow exactly
    from quant.dequantize, the one decoder of the block bytes: d * q is exact in fp32."""
    n, k = weight.shape
    per_block, block_bytes = spec.QUANT_FORMATS[weight.format]
    blocks = weight.blocks.reshape(n, k // per_block, block_bytes)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).to(F32)[..., 0]  # [N, K/32]
    mins = blocks[..., 2:4].contiguous().view(torch.float16).to(F32)[..., 0] if weight.format == "q4_1" else None
    values = quant.dequantize(weight, F32).reshape(n, k // per_block, per_block)
    shifted = values if mins is None else values - mins[..., None]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)[..., None]
    codes = torch.where(scales[..., None] == 0, torch.zeros_like(values), torch.round(shifted / safe))
    return codes.reshape(n, k), scales, mins


class NpuSimBackend(Backend):
    name = "npu-sim"
    default_device = "cpu"  # the torch device its emulated memory sits on
    memory_space = "npu-sim"
    activation_dtypes = (torch.float16, torch.bfloat16)
    # fp32 weights are rounded to the activation dtype at prepare; GGUF blocks are kept (codes + scales)
    native_weight_formats = ("fp16", "bf16") + tuple(spec.QUANT_FORMATS)
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
        source = spec.weight_format(weight)
        extra = {}
        if isinstance(weight, spec.QuantizedWeight):
            # codes in the fractal layout (exact in fp16/bf16), per-block scales and mins beside it,
            # padded along N like the fractal: [K/32, Np]
            weight, scales, mins = _gguf_codes(weight)
            n_padded = _round_up(n)
            for name, t in (("block_scales", scales), ("block_mins", mins)):
                if t is not None:
                    extra[name] = torch.zeros(t.shape[1], n_padded, dtype=F32)
                    extra[name][:, :n] = t.T
        fractal = to_fractal(weight.to(dtype))  # [K/16, Np, 16]
        self.weight_bytes += sum(t.numel() * t.element_size() for t in (fractal, *extra.values()))
        return spec.PreparedLinear(self.name, n, k, dtype, "fractal-" + spec.dtype_name(dtype), source, fractal, extra)

    def _linear(self, x, w, bias):
        acc = cube_matmul(x, w.payload, w.out_features, w.extra.get("block_scales"), w.extra.get("block_mins"))
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
        Hkv = k.shape[1]
        group = Hq // Hkv
        # keys at or beyond every sequence's kv_len are never visible: a KV cache allocated for the
        # whole context is read only up to the longest sequence, as a paged NPU kernel does
        Sk = max(int(kv_len.max()), 1)
        k, v = k[:, :, :Sk], v[:, :, :Sk]
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
