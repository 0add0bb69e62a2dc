"""RMSNorm: out[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * w  (fp32 math, output in x's dtype).

One program per row. A row wider than BLOCK is walked in chunks twice (sum of squares, then
scale); a row that fits (the usual case, H <= 8192) is one chunk. x rows may be padded
(stride_xm >= H).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETING, next_power_of_2, to_output

MAX_BLOCK = 256 if INTERPRETING else 8192


def num_warps(block: int) -> int:
    """Warps for a row kernel of `block` elements (Liger-Kernel's calculate_settings)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


@triton.jit(do_not_specialize=["H"])
def _rms_norm_kernel(out_ptr, x_ptr, w_ptr, H, eps, stride_xm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    cols = tl.arange(0, BLOCK)
    sum_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < H, other=0.0).to(tl.float32)
        sum_sq += x * x
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(sum_sq, axis=0) / H + eps)
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + start + cols, to_output(x * inv_rms * w, out_ptr), mask=mask)


def rms_norm(x, weight, eps: float, out):
    """x [M, H] (unit last stride), weight [H] -> out [M, H]."""
    M, H = x.shape
    block = min(next_power_of_2(H), MAX_BLOCK)
    _rms_norm_kernel[(M,)](out, x, weight, H, eps, x.stride(0), out.stride(0), BLOCK=block, num_warps=num_warps(block))
    return out
