"""GELU, elementwise, in fp32 (output in x's dtype):

    erf:   gelu(x) = 0.5 x (1 + erf(x / sqrt(2)))
    tanh:  gelu(x) = 0.5 x (1 + tanh(z)),  z = sqrt(2/pi) (x + 0.044715 x^3)
                   = x / (1 + exp(-2 z))     (the same function, 1 + tanh(z) = 2 sigmoid(2z),
                                              without tanh's cancellation near z = 0)

x is seen as rows [R, C] with a row stride (any tensor with unit last stride that reshapes to
2-D without a copy); grid (R, cdiv(C, BLOCK)).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETING, exp_fp32, next_power_of_2, to_output

BLOCK = 256 if INTERPRETING else 1024


@triton.jit
def _gelu_kernel(out_ptr, x_ptr, C, stride_xm, stride_om, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
        y = tl.div_rn(x, 1.0 + exp_fp32(tl.minimum(-2.0 * z, 80.0)))  # past 80, |y| < |x| e^-80
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # x / sqrt(2)
    tl.store(out_ptr + row * stride_om + cols, to_output(y, out_ptr), mask=mask)


def gelu(x2d, approximate: str, out2d):
    """x2d [R, C] (unit last stride) -> out2d [R, C]."""
    R, C = x2d.shape
    block = min(next_power_of_2(C), BLOCK)
    _gelu_kernel[(R, triton.cdiv(C, block))](out2d, x2d, C, x2d.stride(0), out2d.stride(0),
                                             TANH=approximate == "tanh", BLOCK=block)
    return out2d
