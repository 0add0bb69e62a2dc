"""LayerNorm: out[m, :] = (x - mean) / sqrt(var + eps) * w + b, mean and var over the row.

fp32 math, corrected two-pass (Bjorck): pass 1 gives the fp32 mean m; pass 2 sums
d = x - m and d^2, giving the residual r = sum(d) / H (m's own rounding error) and
var = (sum(d^2) - sum(d)^2 / H) / H; pass 3 normalizes c = (x - m) - r. A row with a large
offset (|mean| >> std) would otherwise carry m's rounding, u * |mean|, into every x - mean;
one pass of E[x^2] - E[x]^2 would be worse still. One program per row, walked in chunks of
BLOCK (one chunk when H <= 8192). x rows may be padded (stride_xm >= H).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import next_power_of_2, to_output
from .rms_norm import MAX_BLOCK, num_warps


@triton.jit(do_not_specialize=["H"])
def _layer_norm_kernel(out_ptr, x_ptr, w_ptr, b_ptr, H, eps, stride_xm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    cols = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        total += tl.load(x_row + start + cols, mask=start + cols < H, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=0) / H
    sum_d = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        sum_d += d
        sum_sq += d * d
    total_d = tl.sum(sum_d, axis=0)
    residual = total_d / H  # the fp32 mean's rounding error
    var = tl.maximum(tl.sum(sum_sq, axis=0) - total_d * residual, 0.0) / H
    inv_std = 1.0 / tl.sqrt_rn(var + eps)
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = ((x - mean) - residual) * inv_std * w + b
        tl.store(out_ptr + row * stride_om + start + cols, to_output(y, out_ptr), mask=mask)


def layer_norm(x, weight, bias, eps: float, out):
    """x [M, H] (unit last stride), weight/bias [H] -> out [M, H]."""
    M, H = x.shape
    block = min(next_power_of_2(H), MAX_BLOCK)
    _layer_norm_kernel[(M,)](out, x, weight, bias, H, eps, x.stride(0), out.stride(0), BLOCK=block,
                             num_warps=num_warps(block))
    return out
