"""Rotary position embedding on x [B, H, S, D], pairs rotated by angle pos[b, s] * inv_freq[i]:

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),  i in [0, rotary_dim / 2)
    neox:        x1 = x[..., i], x2 = x[..., i + rotary_dim / 2]   (rotate-half, Hugging Face)
    interleaved: x1 = x[..., 2i], x2 = x[..., 2i + 1]              (GPT-J, llama.cpp)
dimensions >= rotary_dim pass through unchanged.

The angles are taken precomputed: cos/sin tables [B, S, rotary_dim / 2] in fp32, made by the
launcher from float64 angles (pos * inv_freq grows with the position; an fp32 product would
be off by ~u * angle radians before any cos is taken, and GPU fp32 cos/sin of a large
argument is an approximation). The kernel does the rotation, the op's memory traffic.

One program per (b, s) and block of heads: [BLOCK_H, rotary_dim / 2] pairs at once; x may be
any view with unit stride in D (e.g. [B, S, H, D] storage seen as [B, H, S, D]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETING, next_power_of_2, to_output

MAX_BLOCK_H = 16 if INTERPRETING else 32


@triton.jit(do_not_specialize=["H", "S"])
def _rope_kernel(out_ptr, x_ptr, cos_ptr, sin_ptr, H, S, D, HALF,
                 stride_xb, stride_xh, stride_xs, stride_ob, stride_oh, stride_os,
                 INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    bs = tl.program_id(0)
    b = bs // S
    s = bs % S
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ri = tl.arange(0, BLOCK_HALF)
    h_mask = rh < H
    i_mask = ri < HALF
    cos = tl.load(cos_ptr + bs * HALF + ri, mask=i_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + bs * HALF + ri, mask=i_mask, other=0.0)[None, :]
    if INTERLEAVED:
        i1 = 2 * ri
        i2 = 2 * ri + 1
    else:
        i1 = ri
        i2 = ri + HALF
    x_base = x_ptr + b * stride_xb + s * stride_xs + rh[:, None] * stride_xh  # [BLOCK_H, 1]
    o_base = out_ptr + b * stride_ob + s * stride_os + rh[:, None] * stride_oh
    mask = h_mask[:, None] & i_mask[None, :]
    x1 = tl.load(x_base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_base + i1[None, :], to_output(x1 * cos - x2 * sin, out_ptr), mask=mask)
    tl.store(o_base + i2[None, :], to_output(x2 * cos + x1 * sin, out_ptr), mask=mask)
    if HAS_REST:
        rr = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest_mask = h_mask[:, None] & (rr < D)[None, :]
        tl.store(o_base + rr[None, :], tl.load(x_base + rr[None, :], mask=rest_mask), mask=rest_mask)


def cos_sin(pos, inv_freq):
    """pos int64 [B, S], inv_freq float64 [rotary_dim / 2] -> fp32 cos, sin [B, S, rotary_dim / 2]
    on pos's device, from float64 angles (float32 where the device has no float64)."""
    angle_dtype = torch.float64 if pos.device.type in ("cpu", "cuda") else torch.float32
    angles = pos.to(angle_dtype)[..., None] * inv_freq.to(device=pos.device, dtype=angle_dtype)
    return torch.cos(angles).float().contiguous(), torch.sin(angles).float().contiguous()


def rope(x, pos, inv_freq, interleaved: bool, out):
    """x [B, H, S, D] (unit stride in D), pos int64 [B, S] on x's device -> out [B, H, S, D]."""
    B, H, S, D = x.shape
    half = inv_freq.numel()
    cos, sin = cos_sin(pos, inv_freq)
    rest = D - 2 * half
    block_h = min(next_power_of_2(H), MAX_BLOCK_H)
    _rope_kernel[(B * S, triton.cdiv(H, block_h))](
        out, x, cos, sin, H, S, D, half, *x.stride()[:3], *out.stride()[:3],
        INTERLEAVED=interleaved, HAS_REST=rest > 0, BLOCK_H=block_h, BLOCK_HALF=next_power_of_2(half),
        BLOCK_REST=next_power_of_2(max(rest, 1)))
    return out
