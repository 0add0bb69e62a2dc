"""npu-sim: an emulated NPU that runs on this machine and imposes an NPU's constraints.

None of the domestic accelerators is here, so the porting path (a partial backend,
placement, fallback, strict mode, the bytes that cross) is exercised on this one. It
behaves like an Ascend-style NPU, not like torch on a CPU:

- Cube unit: every matrix product (linear, attention's QKᵀ and PV) takes fp16/bf16
  operands in 16x16 fractal tiles (shapes zero-padded to multiples of 16 inside the op)
  and accumulates in fp32. The emulator reproduces the cube's arithmetic, not its
  schedule: the tiles go through one fp32 product rather than a Python step per tile.
- Weights are converted once, in `prepare_linear`, to its own layout: the fractal layout
  [N/16, K/16, 16(n), 16(k)] in the activation dtype, padded with zeros; `linear` computes
  from that layout and never sees the [N, K] matrix again.
- Vector unit: norms and activations upcast fp16/bf16 to fp32, compute, round once.
  Attention rounds its softmax probabilities to the input dtype before the PV product,
  as NPU flash-attention kernels do, and divides by the fp32 row sum afterwards.
- GGUF block formats (q8_0, q4_0, q4_1, and the K-quants q4_k, q5_k, q6_k) are computed
  from their blocks, as an NPU's weight-only-quantized matmul does: the fractal holds the
  integer codes (exact in fp16/bf16), the per-block (K-quants: per-sub-block) scales and
  mins sit beside it, and the result is that of the quantized matrix in fp32, never of
  weights re-rounded to fp16/bf16.
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
from .base import Backend, softmax_mask

TILE = 16
F32 = torch.float32


def _round_up(n: int) -> int:
    return -(-n // TILE) * TILE


def to_fractal(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] -> the fractal layout [..., N/16, K/16, 16(n), 16(k)] (zero-padded, same dtype).

    Tile (nt, kt) holds w[nt*16:(nt+1)*16, kt*16:(kt+1)*16] row-major, and the 16x16 tiles
    of one N panel are contiguous: what the cube loads as one operand tile at a time."""
    *batch, n, k = w.shape
    padded = w.new_zeros(*batch, _round_up(n), _round_up(k))
    padded[..., :n, :k] = w
    n_tiles, k_tiles = padded.shape[-2] // TILE, padded.shape[-1] // TILE
    return padded.reshape(*batch, n_tiles, TILE, k_tiles, TILE).transpose(-3, -2).contiguous()


def cube_matmul(a: torch.Tensor, b_fractal: torch.Tensor, n: int, block_scales=None, block_mins=None,
                workspace=None) -> torch.Tensor:
    """a [..., M, K] (fp16/bf16) times a fractal operand [..., N/16, K/16, 16, 16] -> fp32 [..., M, n].

    Emulates the cube's arithmetic, not its schedule: both operands are fp16/bf16 values
    zero-padded to 16x16 tiles, their products are exact in fp32, and the sums over K are
    accumulated in fp32 (one fp32 product over the padded tiles, so the emulator is not a
    Python loop over 16-wide steps).

    GGUF weights (block_scales fp32 [N/16, 16, K/16, 1]: each 32-wide block's scale, once per
    K tile; block_mins likewise for q4_1): the fractal holds the blocks' integer codes, exact
    in fp16/bf16. Each code is scaled by its block's scale on the way into the product:
    code x fp16 scale is exact in fp32, so this equals scaling each block's fp32 partial sum,
    up to the order of fp32 additions; q4_1 adds its block's min. The result is that of the
    quantized matrix, never of weights re-rounded to fp16/bf16."""
    *batch, m, k = a.shape
    n_tiles, k_tiles = b_fractal.shape[-4], b_fractal.shape[-3]
    if k > k_tiles * TILE:
        raise ValueError(f"a: expected K <= {k_tiles * TILE} (the fractal operand's padded K), got shape {list(a.shape)}")
    # K is zero-padded to the fractal's tiles; M would be padded to 16 too on the cube, but padded
    # rows are zeros in and discarded out, so the emulator does not spend 16x the work on a decode
    a_padded = a.new_zeros(*batch, m, k_tiles * TILE)
    a_padded[..., :k] = a
    # the fractal's tiles read back as rows [..., Nt, 16, Kt, 16] in fp32, converted and reordered in one pass
    shape = (*b_fractal.shape[:-4], n_tiles, TILE, k_tiles, TILE)
    # `workspace(numel)`: a reused fp32 scratch buffer (a weight-sized allocation per call would
    # page-fault its way through memory on every linear)
    b = (workspace(math.prod(shape)) if workspace else torch.empty(math.prod(shape), dtype=F32)).view(shape)
    b.copy_(b_fractal.transpose(-3, -2))
    if block_scales is not None:
        b *= block_scales  # code x fp16 scale: exact in fp32
        if block_mins is not None:
            b += block_mins
    b = b.view(*b.shape[:-4], n_tiles * TILE, k_tiles * TILE)  # [..., Np, Kp]
    acc = a_padded.to(F32) @ b.transpose(-1, -2)  # [..., M, Np]
    return acc[..., :n]


def _gguf_codes(weight: spec.QuantizedWeight):
    """GGUF blocks -> (integer codes [N, K] fp32, scales [N, K/g] fp32, mins [N, K/g] fp32 or None, g).

    g is the group of weights that share one scale: a 32-weight block (q8_0, q4_*), a K-quant
    sub-block (32 for q4_k/q5_k, 16 for q6_k). The scales (and q4_1 mins) are each block's leading
    fp16 fields; a K-quant's are d * sub-block scale and -(dmin * sub-block min), exact in fp32
    (quant.k_subblock_scales). The codes follow exactly from quant.dequantize, the one decoder of
    the block bytes: code x scale is exact in fp32, and rounding (value - min) / scale recovers it."""
    n, k = weight.shape
    if weight.format in spec.K_QUANT_FORMATS:
        group, scales, offsets = quant.k_subblock_scales(weight, F32)
        mins = None if offsets is None else -offsets
    else:
        group, block_bytes = spec.QUANT_FORMATS[weight.format]
        blocks = weight.blocks.reshape(n, k // group, block_bytes)
        scales = blocks[..., 0:2].contiguous().view(torch.float16).to(F32)[..., 0]  # [N, K/32]
        mins = blocks[..., 2:4].contiguous().view(torch.float16).to(F32)[..., 0] if weight.format == "q4_1" else None
    values = quant.dequantize(weight, F32).reshape(n, k // group, group)
    shifted = values if mins is None else values - mins[..., None]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)[..., None]
    codes = torch.where(scales[..., None] == 0, torch.zeros_like(values), torch.round(shifted / safe))
    return codes.reshape(n, k), scales, mins, group


class NpuSimBackend(Backend):
    name = "npu-sim"
    default_device = "cpu"  # the torch device its emulated memory sits on
    memory_space = "npu-sim"
    activation_dtypes = (torch.float16, torch.bfloat16)
    preferred_dtype = torch.bfloat16  # what a model loads in when no dtype is asked for (it has no fp32)
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
        self._scratch = torch.empty(0, dtype=F32)

    def _workspace(self, numel: int) -> torch.Tensor:
        """A flat fp32 scratch buffer of `numel` elements, reused across calls (an NPU's workspace)."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=F32, device=self.device)
        return self._scratch[:numel]

    @classmethod
    def auto_eligible(cls) -> bool:
        return False  # an emulator: slower than torch on the same CPU, never picked by backend="auto"

    def info(self):
        return {"memory": self.memory, "cube": "16x16 tiles, fp16/bf16 in, fp32 accumulate",
                "weight_layout": "fractal [N/16, K/16, 16, 16]", "weight_bytes": self.weight_bytes,
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
            # codes in the fractal layout (exact in fp16/bf16); per-block scales and mins beside it,
            # padded along N like the fractal and repeated for the two K tiles of a block:
            # [N/16, 16, K/16, 1], which broadcasts over the fractal's tiles read back as rows
            weight, scales, mins, group = _gguf_codes(weight)
            tiles = group // TILE  # K tiles per scale group: 2 (32 weights) or 1 (q6_k's 16)
            for name, t in (("block_scales", scales), ("block_mins", mins)):
                if t is not None:
                    per_tile = torch.zeros(_round_up(n), tiles * t.shape[1], 1, dtype=F32)
                    per_tile[:n, :, 0] = t.repeat_interleave(tiles, dim=1)
                    extra[name] = per_tile.view(-1, TILE, tiles * t.shape[1], 1)
        fractal = to_fractal(weight.to(dtype))  # [N/16, K/16, 16, 16]
        self.weight_bytes += sum(t.numel() * t.element_size() for t in (fractal, *extra.values()))
        return spec.PreparedLinear(self.name, n, k, dtype, "fractal-" + spec.dtype_name(dtype), source, fractal, extra)

    def _linear(self, x, w, bias):
        acc = cube_matmul(x, w.payload, w.out_features, w.extra.get("block_scales"), w.extra.get("block_mins"),
                          self._workspace)
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
        keys, empty = softmax_mask(q_pos, kv_len, Sq, Sk, causal, q.device)  # [B,1,Sq,Sk], [B,1,Sq,1]
        scores = scores.masked_fill(~keys, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - row_max)  # fp32, in [0, 1]
        row_sum = p.sum(dim=-1, keepdim=True)
        p_low = p.to(q.dtype).reshape(B, Hkv, group * Sq, Sk)  # the cube takes fp16/bf16 operands
        pv = cube_matmul(p_low, to_fractal(v.transpose(-1, -2)), D).reshape(B, Hq, Sq, D)
        y = (pv / row_sum).masked_fill(empty, 0.0)
        out = self.new_output(q.shape, q.dtype)
        out.copy_(y)
        return out
