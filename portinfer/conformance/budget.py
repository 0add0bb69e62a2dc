"""The error budget: how "matches the reference" is decided (DESIGN.md, Correctness).

    e = ||y - y_ref||_2 / ||y_ref||_2          (y_ref: float64 reference on the same rounded inputs)
    e <= c_out * u(out dtype) + c_acc * u(fp32) * sqrt(R) * kappa + c_cond * u(fp32) * cond  [+ c_int8 * 2^-8]

u is the unit roundoff (fp32 2^-24, fp16 2^-11, bf16 2^-8). R is the op's reduction length
(K for linear, Sk for attention, H for norms; 1 for elementwise ops). `cond` is the op's
sensitivity to fp32 rounding of an intermediate that grows with the input, and is 0 for
every op but two:
  - rope:      the largest angle pos * inv_freq (an fp32 angle is off by ~u * angle radians);
  - attention: sqrt(D) * the largest |logit| (a logit's fp32 rounding error moves softmax
               weights by about that much, relative).
`kappa` = max(1, ||m|| / ||y_ref||) is the case's conditioning: m is the magnitude that
rounding errors scale with, elementwise. For linear, m_j = sqrt(sum_k x_k^2 w_jk^2) (a
random-data dot product has ||m|| ~ ||y||, so kappa ~ 1; an output that cancels to nearly
nothing, easy to hit with M = N = 1, has kappa >> 1). For gelu, m = |x| (x * (1 + erf(x/sqrt2))
loses relative accuracy where erf -> -1 however it is computed in fp32). Every other op: 1.
A backend that quantizes activations to int8 for integer dot products (declares
`quantizes_activations`) gets the extra int8 term on linear.

Outputs near zero: u bounds the *relative* rounding error of normal numbers only. An output
that rounds into the subnormal range (fp16 below 2^-14, as silu of a large negative gate
times a small up can be) carries an *absolute* error of up to half the smallest subnormal,
which no relative bound covers. So the budget adds c_out * s/2 * sqrt(n) / ||y_ref||, with s
the dtype's smallest subnormal and n the output size: negligible unless the outputs
themselves are near the bottom of the dtype's range.

The constants are small and live only in this table: a kernel that needs larger ones has a
real accuracy problem, not a tolerance problem.
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SMALLEST_SUBNORMAL = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}
U_FP32 = UNIT_ROUNDOFF[torch.float32]
U_INT8 = 2.0 ** -8

# op -> (c_out, c_acc, c_cond)
CONSTANTS = {
    "embedding": (1.0, 0.0, 0.0),  # a gather: exact
    "linear": (2.0, 4.0, 0.0),
    "rms_norm": (3.0, 4.0, 0.0),
    "layer_norm": (3.0, 4.0, 0.0),
    "rope": (4.0, 4.0, 4.0),
    "silu_mul": (3.0, 4.0, 0.0),
    "gelu": (3.0, 4.0, 0.0),
    "attention": (4.0, 4.0, 4.0),
}
C_INT8 = 4.0


def budget(op: str, dtype: torch.dtype, reduction: int = 1, cond: float = 0.0, kappa: float = 1.0,
           quantized_activations: bool = False, outputs: int = 0, ref_norm: float = math.inf) -> float:
    """The error budget of one case; `outputs` and `ref_norm` (the reference's element count and
    L2 norm) give the floor for outputs that round into the subnormal range."""
    c_out, c_acc, c_cond = CONSTANTS[op]
    e = (c_out * UNIT_ROUNDOFF[dtype] + c_acc * U_FP32 * math.sqrt(max(reduction, 1)) * max(kappa, 1.0)
         + c_cond * U_FP32 * cond)
    if outputs and ref_norm > 0:
        e += c_out * SMALLEST_SUBNORMAL[dtype] / 2 * math.sqrt(outputs) / ref_norm
    if quantized_activations and op == "linear":
        e += C_INT8 * U_INT8
    return e


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref|| / ||y_ref|| over finite positions (absolute when the reference is all zero)."""
    finite = torch.isfinite(y_ref)
    diff = (y.to(torch.float64) - y_ref)[finite]
    ref_norm = float(torch.linalg.vector_norm(y_ref[finite]))
    diff_norm = float(torch.linalg.vector_norm(diff))
    if not math.isfinite(diff_norm):
        return math.inf
    return diff_norm / ref_norm if ref_norm > 0 else diff_norm
