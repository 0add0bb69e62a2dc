"""Dense linear: out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]).

Tiled matmul with fp32 accumulation (Triton's matmul tutorial, grouped tile order for L2
reuse). fp16/bf16 tiles go to tl.dot natively; fp32 tiles use `input_precision` ("ieee" by
default, "tf32" only when the backend was built with allow_tf32=True). A weight in another
dtype than x (fp32 weights dequantized from q4_1 blocks) upcasts both tiles to fp32, as does
bf16 under the interpreter (see kernels/__init__.py).

Strides: x rows may be padded (stride_xm >= K, a view of a wider buffer); w is the prepared
(contiguous) weight; bias is contiguous [N].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AUTOTUNE, INTERPRETING, to_output, upcast_dot

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps): the tutorial's CUDA list, a few
# Hopper-sized tiles, and thin-M tiles for decode (M = 1..16).
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_stages=s, num_warps=w)
    for bm, bn, bk, g, s, w in (
        (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 256, 32, 8, 3, 8),
        (64, 256, 32, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4),
        (64, 64, 64, 8, 4, 4), (32, 64, 32, 8, 5, 2),
        (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 4), (16, 64, 256, 1, 3, 4), (16, 32, 256, 1, 3, 2),
    )
]
# without autotuning: under the interpreter, small enough that small cases cross every tile edge
FIXED_CONFIG = (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2) if INTERPRETING
                else dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3))


@triton.jit(do_not_specialize=["M", "N", "K", "M_BUCKET"])
def _linear_kernel(out_ptr, x_ptr, w_ptr, bias_ptr, M, N, K, M_BUCKET,
                   stride_xm, stride_wn, stride_om,
                   HAS_BIAS: tl.constexpr, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles share each column tile while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows/cols past the edge wrap around (read valid memory, never stored): no mask in the loop
    rm_load = rm % M
    rn_load = rn % N
    x_ptrs = x_ptr + rm_load[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn_load[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] = tile of w^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            b = tl.load(w_ptrs, mask=(k0 + rk)[:, None] < K, other=0.0)
        if UPCAST_TO_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, to_output(acc, out_ptr), mask=(rm[:, None] < M) & (rn[None, :] < N))


_linear_kernel_tuned = None if not AUTOTUNE else triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K"])(
    triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_linear_kernel))


def m_bucket(M: int) -> int:
    """Autotuning key for M: powers of two up to 256, so prefill lengths don't each retune."""
    return min(triton.next_power_of_2(M), 256)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           input_precision: str = "ieee", upcast: bool | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride), w [N, K] contiguous, bias [N] or None -> out [M, N] (contiguous).

    upcast: force the fp32-upcast switch on or off (default: on for bf16 under the interpreter,
    or when w's dtype differs from x's); tests use it to show the switch matters.
    """
    M, K = x.shape
    N = w.shape[0]
    if upcast is None:
        upcast = upcast_dot(x.dtype) or w.dtype != x.dtype
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    args = (out, x, w, bias_arg, M, N, K, m_bucket(M), x.stride(0), w.stride(0), out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, UPCAST_TO_FP32=upcast, INPUT_PRECISION=input_precision)
    if _linear_kernel_tuned is None:
        cfg = FIXED_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _linear_kernel[grid](*args, **flags, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _linear_kernel_tuned[grid](*args, **flags)
    return out
