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
`quantizes_activations`) gets the extra int8 term on linear, derived below.

The int8 term. Integer dot products quantize each row of x in blocks of 32: with a = max |x|
over the block, the step is d = a / 127 and round-to-nearest moves each element by at most
d / 2 = a / 254. So the int8 analogue of unit roundoff is

    U_INT8 = 1 / 254        (relative to the block's max, not to each element; the max
                             itself lands exactly on +-127)

The output error is dy_j = sum_k w_jk delta_k. Rounding errors of generic data are independent,
zero-mean and uniform on [-d/2, d/2] (variance (U_INT8 a)^2 / 3), so dy_j has standard deviation

    sd_j = U_INT8 / sqrt(3) * m8_j,     m8_j = sqrt(sum_k w_jk^2 a_{block(k)}^2)

(a_{block(k)}: the max of the block holding x_k, in x's row; w: the weights as the reference
sees them, i.e. dequantized). Over n outputs ||dy||^2 is a sum of n such terms, so
||dy|| = U_INT8 / sqrt(3) * ||m8|| * (1 + O(1 / sqrt(2n))), and for n = 1 a near-Gaussian |dy|.
The term is that expectation with a margin that shrinks as the outputs multiply:

    e_int8 = U_INT8 / sqrt(3) * kappa8 * (1 + C_INT8_TAIL / sqrt(n)),   kappa8 = ||m8|| / ||y_ref||

With C_INT8_TAIL = 4 a correct kernel stays inside at about 5 standard deviations for n = 1
and more as n grows, while the budget itself tightens to the expected error: for random normal
x (block max ~2.3 sigma, kappa8 ~2.3) it is ~0.5% relative for large n, so a kernel 1% off
(a wrong scale, a dropped offset term) fails. kappa8, like kappa, comes from the case's inputs;
without them (kappa_int8=None) a loose kappa8 = 4 is assumed.

Outputs near zero: u bounds the *relative* rounding error of normal numbers only. An output
that rounds into the subnormal range (fp16 below 2^-14, as silu of a large negative gate
times a small up can be) carries an *absolute* error of up to half the smallest subnormal,
which no relative bound covers. So the budget adds c_out * s/2 * sqrt(n) / ||y_ref||, with s
the dtype's smallest subnormal and n the output size: negligible unless the outputs
themselves are near the bottom of the dtype's range.

The constants are small and live only in this table: a kernel that needs larger ones has a
real accuracy problem, not a tolerance problem.

The bias test (fp16 / bf16 outputs). The L2 budget bounds the size of the error, not its
direction, and in bf16 it is wide: c_out * u is 1.2% for the norms, 1.6% for attention. So a
kernel that scales its output by 1.01, or rounds its results toward zero instead of to nearest,
passes it. Both leave a signature a correct kernel does not: the errors lean one way. With
e_i = y_i - y_ref_i and s_i = sign(y_ref_i) over the finite outputs,

    b = sum(s_i e_i) / sum(|y_ref_i|)     the mean relative error toward larger magnitudes
    t = sum(s_i e_i) / sqrt(sum(e_i^2))   the same in units of its own spread (sqrt(n) mean / rms)

Round-to-nearest (ties to even) errors are symmetric, so t is about a standard normal; a scale
error or a directed rounding mode moves every e_i the same way, so t grows like sqrt(n): a 1%
scale error in bf16 gives t ~ 0.78 sqrt(n), truncation toward zero t ~ -0.87 sqrt(n) and
b ~ -0.7 u. A case fails when |t| > Z_BIAS and |b| > C_BIAS_FLOOR * u: the first keeps a correct
kernel out (no false alarm below n = Z_BIAS^2 outputs, and one in ~10^6 cases above), the second
ignores a bias too small to matter (an fp32 approximation of exp or rsqrt that leans by 1e-7 is
far below u/4 of fp16). fp32 outputs are left to the L2 budget, which already sees 1% there.
Every op's edge set (cases.edge_examples) has 512 or more outputs, enough to see both on every
seed.
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SMALLEST_SUBNORMAL = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}
U_FP32 = UNIT_ROUNDOFF[torch.float32]
U_INT8 = 1.0 / 254  # half an int8 step, relative to the block max (see above)
C_INT8_TAIL = 4.0
KAPPA_INT8_DEFAULT = 4.0

Z_BIAS = 5.0  # |t| above this many standard deviations ...
C_BIAS_FLOOR = 0.25  # ... and |b| above this fraction of the output dtype's unit roundoff: a biased result

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

def budget(op: str, dtype: torch.dtype, reduction: int = 1, cond: float = 0.0, kappa: float = 1.0,
           quantized_activations: bool = False, outputs: int = 0, ref_norm: float = math.inf,
           kappa_int8: float | None = None) -> float:
    """The error budget of one case; `outputs` and `ref_norm` (the reference's element count and
    L2 norm) give the floor for outputs that round into the subnormal range; `kappa_int8`
    (||m8|| / ||y_ref||, see int8_magnitude) sizes the int8 term of a quantizing backend."""
    c_out, c_acc, c_cond = CONSTANTS[op]
    e = (c_out * UNIT_ROUNDOFF[dtype] + c_acc * U_FP32 * math.sqrt(max(reduction, 1)) * max(kappa, 1.0)
         + c_cond * U_FP32 * cond)
    if outputs and ref_norm > 0:
        e += c_out * SMALLEST_SUBNORMAL[dtype] / 2 * math.sqrt(outputs) / ref_norm
    if quantized_activations and op == "linear":
        k8 = KAPPA_INT8_DEFAULT if kappa_int8 is None else kappa_int8
        e += U_INT8 / math.sqrt(3.0) * k8 * (1.0 + C_INT8_TAIL / math.sqrt(max(outputs, 1)))
    return e


def int8_magnitude(x: torch.Tensor, w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """m8 [M, N] = sqrt(a^2 @ (w^2)^T), a [M, K]: each x_k replaced by the max |x| of its block of
    `block` along K (a partial last block is its own block); float64."""
    x = x.to(torch.float64)
    m, k = x.shape
    pad = (-k) % block
    xa = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(m, -1, block).amax(dim=-1)
    a = xa.repeat_interleave(block, dim=1)[:, :k]
    return ((a ** 2) @ (w.to(torch.float64) ** 2).T).sqrt()


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref|| / ||y_ref|| over finite positions (absolute when the reference is all zero)."""
    finite = torch.isfinite(y_ref)
    diff = (y.to(torch.float64) - y_ref)[finite]
    ref_norm = float(torch.linalg.vector_norm(y_ref[finite]))
    diff_norm = float(torch.linalg.vector_norm(diff))
    if not math.isfinite(diff_norm):
        return math.inf
    return diff_norm / ref_norm if ref_norm > 0 else diff_norm


def bias_statistics(y: torch.Tensor, y_ref: torch.Tensor) -> tuple:
    """(b, t) of the bias test above, over the positions where y_ref is finite: b the mean relative error
    toward larger magnitudes, t that sum in units of the errors' own spread ((0, 0) when y is exact)."""
    finite = torch.isfinite(y_ref)
    ref = y_ref[finite].to(torch.float64)
    err = y[finite].to(torch.float64) - ref
    toward_larger = float((torch.sign(ref) * err).sum())
    spread = float(torch.linalg.vector_norm(err))
    scale = float(ref.abs().sum())
    if spread == 0 or scale == 0 or not math.isfinite(spread):
        return 0.0, 0.0
    return toward_larger / scale, toward_larger / spread


def biased(dtype: torch.dtype, b: float, t: float) -> bool:
    """Does the bias test fail? Only for fp16 / bf16 outputs (see above)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return abs(t) > Z_BIAS and abs(b) > C_BIAS_FLOOR * UNIT_ROUNDOFF[dtype]
