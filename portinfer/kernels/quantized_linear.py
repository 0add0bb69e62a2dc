"""Linear on GGUF Q8_0 / Q4_0 blocks and Q4_K / Q5_K / Q6_K super-blocks, dequantized inside the
kernel (a GEMV for decode).

    out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),  W[n, k] = d(n, k/32) * q(n, k)

Blocks are the raw GGUF bytes, uint8 [N, K/32 * bytes_per_block], row n holding its K/32
blocks in order (spec.QUANT_FORMATS):
    q8_0 (34 bytes): fp16 d, int8 q[32]                       W = d * q
    q4_0 (18 bytes): fp16 d, uint8 qs[16]; weight j < 16 is the low nibble of qs[j],
                     weight j >= 16 the high nibble of qs[j - 16]   W = d * (nibble - 8)
    q4_k (144 bytes per 256): fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales sc / mins m,
                     qs[128]; weight i: sub-block s = i / 32, nibble s % 2 of qs[32 (s / 2) + i % 32]
                     W = d sc[s] q - dmin m[s]
    q5_k (176 bytes): as q4_k, qh[32] before qs: bit s of qh[i % 32] is q's bit 4
    q6_k (210 bytes): ql[128], qh[64], int8 sc[16], fp16 d; i = 128 h + 32 Q + l: low 4 bits =
                     nibble Q / 2 of ql[64 h + 32 (Q % 2) + l], high 2 bits = bits 2Q of qh[32 h + l]
                     W = d sc[i / 16] (q - 32)
Every weight of a tile gathers its own block's scale bytes (they are few and cached). d * q (and
d sc q) is exact in fp32, so the kernel dequantizes to fp32 and accumulates x (upcast to fp32)
against it in fp32: the result is that of the quantized matrix, as the reference's (the K-quants'
- dmin m is one fp32 rounding, as in ggml's own dequantizer).

Two kernels: for M <= GEMV_MAX_M (decode) a GEMV, one x row per program and a multiply and
row sum per [BLOCK_N, BLOCK_K] tile; above it (prefill) a tiled fp32 tl.dot. Columns past K in
the last tile read wrapped (valid) blocks and meet x = 0 there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AUTOTUNE, INTERPRETING, to_output
from .linear import m_bucket

FORMATS = {"q8_0": 0, "q4_0": 1, "q4_k": 2, "q5_k": 3, "q6_k": 4}
GEMV_MAX_M = 4

GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
    for bn, bk, s, w in ((16, 256, 3, 4), (32, 256, 3, 4), (32, 128, 4, 4), (64, 128, 3, 4), (8, 512, 3, 4),
                         (64, 256, 3, 8))
]
DOT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in ((16, 64, 64, 3, 4), (32, 64, 64, 3, 4), (64, 64, 64, 3, 4), (64, 128, 32, 3, 4),
                             (128, 64, 64, 3, 8), (128, 128, 32, 3, 8))
]
# without autotuning (under the interpreter BLOCK_K spans two quant blocks, to exercise the block index math)
FIXED_GEMV = dict(BLOCK_N=16, BLOCK_K=64) if INTERPRETING else dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)
FIXED_DOT = (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64) if INTERPRETING
             else dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3))


@triton.jit
def _f16_at(ptr):
    """The little-endian fp16 at ptr (a tensor of byte pointers) as fp32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize_tile(blocks_ptr, rn, k, stride_bn, FORMAT: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] tile of W at rows rn, columns k (both in range). One return, every
    branch on the constexpr FORMAT (resolved when the kernel is compiled)."""
    if FORMAT <= 1:
        BLOCK_BYTES: tl.constexpr = 34 if FORMAT == 0 else 18
        kb = k // 32
        j = k % 32
        row = blocks_ptr + rn[:, None] * stride_bn + (kb * BLOCK_BYTES)[None, :]  # start of each element's block
        if FORMAT == 0:
            q = tl.load(row + 2 + j[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
        else:
            byte = tl.load(row + 2 + (j % 16)[None, :])
            q = ((byte.to(tl.int32) >> ((j // 16) * 4)[None, :]) & 15).to(tl.float32) - 8.0
        w = _f16_at(row) * q
    else:
        SUPER_BYTES: tl.constexpr = 144 if FORMAT == 2 else (176 if FORMAT == 3 else 210)
        i = k % 256
        row = blocks_ptr + rn[:, None] * stride_bn + ((k // 256) * SUPER_BYTES)[None, :]  # each element's super-block
        lane = i % 32
        if FORMAT == 4:  # q6_k
            h = i // 128
            quarter = (i % 128) // 32
            ql = tl.load(row + (64 * h + 32 * (quarter % 2) + lane)[None, :]).to(tl.int32)
            qh = tl.load(row + (128 + 32 * h + lane)[None, :]).to(tl.int32)
            low = (ql >> (4 * (quarter // 2))[None, :]) & 15
            high = (qh >> (2 * quarter)[None, :]) & 3
            sc6 = tl.load(row + (192 + i // 16)[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
            w = (_f16_at(row + 208) * sc6) * ((low | (high << 4)) - 32).to(tl.float32)
        else:  # q4_k, q5_k
            s = i // 32  # sub-block
            j = (s % 4)[None, :]
            b_sc = tl.load(row + 4 + j).to(tl.int32)  # bytes 0-3 of the 12: scales 0-3 (+ top bits of 4-7)
            b_mn = tl.load(row + 8 + j).to(tl.int32)  # bytes 4-7: mins 0-3 (+ top bits of mins 4-7)
            b_hi = tl.load(row + 12 + j).to(tl.int32)  # bytes 8-11: low 4 bits of scales / mins 4-7
            first = (s < 4)[None, :]
            sc = tl.where(first, b_sc & 63, (b_hi & 15) | ((b_sc >> 6) << 4)).to(tl.float32)
            mn = tl.where(first, b_mn & 63, (b_hi >> 4) | ((b_mn >> 6) << 4)).to(tl.float32)
            QS: tl.constexpr = 16 if FORMAT == 2 else 48
            byte = tl.load(row + (QS + 32 * (s // 2) + lane)[None, :]).to(tl.int32)
            q = (byte >> (4 * (s % 2))[None, :]) & 15
            if FORMAT == 3:  # q5_k: bit 4 from qh
                qh5 = tl.load(row + (16 + lane)[None, :]).to(tl.int32)
                q = q | (((qh5 >> s[None, :]) & 1) << 4)
            w = (_f16_at(row) * sc) * q.to(tl.float32) - _f16_at(row + 2) * mn
    return w


@triton.jit(do_not_specialize=["M", "N", "K", "M_BUCKET"])
def _quantized_gemv_kernel(out_ptr, x_ptr, blocks_ptr, bias_ptr, M, N, K, M_BUCKET,
                           stride_xm, stride_bn, stride_om,
                           FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_load = rn % N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_load = k % K  # K is a multiple of the block; the wrapped tail is zeroed through x
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        w = _dequantize_tile(blocks_ptr, rn_load, k_load, stride_bn, FORMAT)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, to_output(acc, out_ptr), mask=rn < N)


@triton.jit(do_not_specialize=["M", "N", "K", "M_BUCKET"])
def _quantized_matmul_kernel(out_ptr, x_ptr, blocks_ptr, bias_ptr, M, N, K, M_BUCKET,
                             stride_xm, stride_bn, stride_om,
                             FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_load = rm % M
    rn_load = rn % N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm_load[:, None] * stride_xm + k[None, :], mask=(k < K)[None, :], other=0.0)
        w = _dequantize_tile(blocks_ptr, rn_load, k % K, stride_bn, FORMAT)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, to_output(acc, out_ptr), mask=(rm[:, None] < M) & (rn[None, :] < N))


_gemv_tuned = None if not AUTOTUNE else triton.autotune(GEMV_CONFIGS, key=["M_BUCKET", "N", "K"])(
    _quantized_gemv_kernel)
_matmul_tuned = None if not AUTOTUNE else triton.autotune(DOT_CONFIGS, key=["M_BUCKET", "N", "K"])(
    _quantized_matmul_kernel)


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, fmt: str, bias: torch.Tensor | None,
                     out: torch.Tensor, input_precision: str = "ieee") -> torch.Tensor:
    """x [M, K] (unit last stride), blocks uint8 [N, K/32 * bytes] (unit last stride) -> out [M, N]."""
    M, K = x.shape
    N = blocks.shape[0]
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    args = (out, x, blocks, bias_arg, M, N, K, m_bucket(M), x.stride(0), blocks.stride(0), out.stride(0))
    flags = dict(FORMAT=FORMATS[fmt], HAS_BIAS=bias is not None)
    if M <= GEMV_MAX_M:
        if _gemv_tuned is None:
            _quantized_gemv_kernel[(triton.cdiv(N, FIXED_GEMV["BLOCK_N"]), M)](*args, **flags, **FIXED_GEMV)
        else:
            _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args, **flags)
    else:
        flags["INPUT_PRECISION"] = input_precision
        if _matmul_tuned is None:
            cfg = FIXED_DOT
            _quantized_matmul_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))](
                *args, **flags, **cfg)
        else:
            _matmul_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](
                *args, **flags)
    return out
