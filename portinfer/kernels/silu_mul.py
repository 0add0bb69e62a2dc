"""SiLU-and-multiply (the gated MLP's activation): out[m, i] = silu(x[m, i]) * x[m, I + i],
silu(g) = g / (1 + exp(-g)), for x [M, 2I] (gate and up halves of one fused linear).

fp32 math, output in x's dtype. Grid (M, cdiv(I, BLOCK)); x rows may be padded.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETING, exp_fp32, next_power_of_2, to_output

BLOCK = 256 if INTERPRETING else 1024


@triton.jit
def _silu_mul_kernel(out_ptr, x_ptr, I, stride_xm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.div_rn(gate, 1.0 + exp_fp32(-gate)) * up  # IEEE division: fp32 keeps its budget
    tl.store(out_ptr + row * stride_om + cols, to_output(y, out_ptr), mask=mask)


def silu_mul(x, out):
    """x [M, 2I] (unit last stride) -> out [M, I]."""
    M, two_i = x.shape
    I = two_i // 2
    block = min(next_power_of_2(I), BLOCK)
    _silu_mul_kernel[(M, triton.cdiv(I, block))](out, x, I, x.stride(0), out.stride(0), BLOCK=block)
    return out
