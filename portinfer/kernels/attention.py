"""Attention for prefill (flash-attention: tiled, online softmax, nothing of size Sq x Sk stored).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // group, j]) v[b, h // group, j]

over the keys visible to row i (the contract): j < kv_len[b], and with causal also
j <= q_pos[b] + i. A row with no visible key returns zeros. GQA/MQA maps query head h to
key/value head h // group by index: K and V are never repeated.

Online softmax (FlashAttention-2) in fp32, in base 2: s = (q . k) * scale * log2(e);
running row max m, row sum l, unnormalized acc; out = acc / l. Each program owns BLOCK_M
query rows of one (b, h) and walks key blocks in two phases: blocks every row of the tile
sees entirely (no mask), then the remaining blocks with the mask (the causal diagonal and the
kv_len tail).

Strides: q, k, v and out are passed with all their strides ([B, H, S, D], unit stride in D),
so q may be a view of a fused projection and k/v the first Sk positions of a longer cache.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from . import AUTOTUNE, INTERPRETING, next_power_of_2, to_output, upcast_dot

LOG2_E = math.log2(math.e)

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm, bn, s, w in ((128, 64, 3, 8), (128, 128, 3, 8), (128, 64, 4, 4), (64, 64, 4, 4), (128, 32, 4, 4),
                         (64, 32, 3, 4), (32, 32, 3, 4), (16, 32, 3, 4))
]
FIXED_CONFIG = dict(BLOCK_M=16, BLOCK_N=16) if INTERPRETING else dict(BLOCK_M=64, BLOCK_N=64, num_warps=4,
                                                                               num_stages=3)


@triton.jit
def online_softmax_step(acc, l_i, m_i, q, kt, v, visible, scale_log2e,
                        UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Fold one key block into the running (acc [R, BLOCK_D], l_i, m_i [R]) of R query rows:
    q [R, BLOCK_D], kt = k^T [BLOCK_D, BLOCK_N], v [BLOCK_N, BLOCK_D]; visible: bool [R or 1, BLOCK_N],
    or None when every key of the block is visible to every row. Logits in log2 units."""
    if UPCAST_TO_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    if q.dtype == tl.float32:
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
    else:
        s = tl.dot(q, kt)
    s = s * scale_log2e
    if visible is not None:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if v.dtype == tl.float32:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attention_block(acc, l_i, m_i, q, k_base, v_base, start, end, kv_len, row_pos, stride_ks, stride_vs,
                     D, scale_log2e,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                     UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold key blocks [start, end) into (acc [BLOCK_M, BLOCK_D], l_i, m_i [BLOCK_M])."""
    rd = tl.arange(0, BLOCK_D)
    for block_start in range(start, end, BLOCK_N):
        rn = block_start + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + rn[None, :] * stride_ks + rd[:, None]  # [BLOCK_D, BLOCK_N] = k^T
        v_ptrs = v_base + rn[:, None] * stride_vs + rd[None, :]  # [BLOCK_N, BLOCK_D]
        if MASKED:
            kt = tl.load(k_ptrs, mask=(rn < end)[None, :] & (rd < D)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(rn < end)[:, None] & (rd < D)[None, :], other=0.0)
            visible = (rn < kv_len)[None, :]
            if CAUSAL:
                visible = visible & (rn[None, :] <= row_pos[:, None])
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, kt, v, visible, scale_log2e, UPCAST_TO_FP32,
                                                INPUT_PRECISION)
        else:
            if EVEN_D:
                kt = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=(rd < D)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(rd < D)[None, :], other=0.0)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, kt, v, None, scale_log2e, UPCAST_TO_FP32,
                                                INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Hq", "Sq", "GROUP", "SQ_BUCKET"])
def _attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, q_pos_ptr, kv_len_ptr,
                      Hq, Sq, D, GROUP, SQ_BUCKET, scale_log2e,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                      CAUSAL: tl.constexpr, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    q_pos = tl.load(q_pos_ptr + b)
    kv_len = tl.load(kv_len_ptr + b)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q_mask = (rm < Sq)[:, None] & (rd < D)[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qs + rd[None, :], mask=q_mask, other=0.0)
    if UPCAST_TO_FP32:
        q = q.to(tl.float32)
    row_pos = q_pos + rm  # [BLOCK_M] absolute positions of the tile's rows
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    # keys [0, full_end) are visible to every row of the tile; [full_end, end) need the mask
    end = kv_len
    full_end = kv_len
    if CAUSAL:
        end = tl.minimum(kv_len, q_pos + pid_m * BLOCK_M + BLOCK_M)
        full_end = tl.minimum(kv_len, q_pos + pid_m * BLOCK_M + 1)
    full_end = tl.maximum(full_end // BLOCK_N * BLOCK_N, 0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _attention_block(acc, l_i, m_i, q, k_base, v_base, 0, full_end, kv_len, row_pos,
                                     stride_ks, stride_vs, D, scale_log2e, False, CAUSAL, BLOCK_D == D,
                                     UPCAST_TO_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _attention_block(acc, l_i, m_i, q, k_base, v_base, full_end, end, kv_len, row_pos,
                                     stride_ks, stride_vs, D, scale_log2e, True, CAUSAL, BLOCK_D == D,
                                     UPCAST_TO_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_D)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where((l_i > 0.0)[:, None], acc / l_safe[:, None], 0.0)
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_os + rd[None, :]
    tl.store(out_ptrs, to_output(out, out_ptr), mask=q_mask)


_attention_tuned = None if not AUTOTUNE else triton.autotune(CONFIGS, key=["SQ_BUCKET", "BLOCK_D", "GROUP"])(
    _attention_kernel)


def attention(q, k, v, q_pos, kv_len, causal: bool, scale: float, out, input_precision: str = "ieee",
              upcast: bool | None = None):
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (any strides, unit in D), q_pos/kv_len int32 [B] on
    q's device -> out [B, Hq, Sq, D]."""
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    upcast = upcast_dot(q.dtype) if upcast is None else upcast
    block_d = next_power_of_2(D, 16)  # tl.dot needs >= 16 on each side
    args = (out, q, k, v, q_pos, kv_len, Hq, Sq, D, group, min(triton.next_power_of_2(Sq), 1024),
            scale * LOG2_E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    flags = dict(CAUSAL=causal, UPCAST_TO_FP32=upcast, INPUT_PRECISION=input_precision, BLOCK_D=block_d)
    if _attention_tuned is None:
        cfg = FIXED_CONFIG
        _attention_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]), B * Hq)](*args, **flags, **cfg)
    else:
        _attention_tuned[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](*args, **flags)
    return out
