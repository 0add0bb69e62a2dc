"""Decode attention (Sq = 1), split-K over the keys (flash-decoding), then a reduce kernel.

    out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, h // group, j]) v[b, h // group, j]

over j < kv_len[b] (and, with causal, j <= q_pos[b]); no visible key -> zeros.

With one query row, a prefill kernel would give each (b, h) one program walking all Sk keys:
too few programs to fill a GPU at long Sk. Here the keys are cut into NUM_SPLITS ranges of
SPLIT_LEN; program (split, b, kv head) folds its range for all `group` query heads that share
that kv head (K/V read once per group, the heads stacked as the rows of a tl.dot) and writes
a partial (unnormalized acc [D], running max m and sum l, base-2 logits). The reduce kernel
merges the splits of each (b, h):  M = max_s m_s, w_s = 2^(m_s - M),
out = sum_s w_s acc_s / sum_s w_s l_s  (zeros when no split saw a key).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import AUTOTUNE, INTERPRETING, next_power_of_2, to_output, upcast_dot
from .attention import LOG2_E, online_softmax_step

CONFIGS = [triton.Config({}, num_stages=s, num_warps=w) for s, w in ((2, 4), (3, 4), (4, 4), (3, 8))]
BLOCK_N = 64  # keys per inner step on a GPU
INTERPRETER_BLOCK_N = 16
MAX_SPLITS = 128


@triton.jit(do_not_specialize=["Hkv", "GROUP", "SPLIT_LEN", "NUM_SPLITS"])
def _decode_split_kernel(acc_ptr, m_ptr, l_ptr, q_ptr, k_ptr, v_ptr, q_pos_ptr, kv_len_ptr,
                         Hkv, GROUP, D, SPLIT_LEN, NUM_SPLITS, scale_log2e,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                         CAUSAL: tl.constexpr, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         EVEN_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // Hkv
    hk = bk % Hkv
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    h = hk * GROUP + rg  # the query heads of this kv head, [BLOCK_G]
    g_mask = rg < GROUP
    d_mask = rd < D
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + rd[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST_TO_FP32:
        q = q.to(tl.float32)
    end = tl.load(kv_len_ptr + b)
    if CAUSAL:
        end = tl.minimum(end, tl.load(q_pos_ptr + b) + 1)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, end)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_mask = rn < hi
        k_ptrs = k_base + rn[None, :] * stride_ks + rd[:, None]  # [BLOCK_D, BLOCK_N] = k^T
        v_ptrs = v_base + rn[:, None] * stride_vs + rd[None, :]  # [BLOCK_N, BLOCK_D]
        if EVEN_D:  # no mask along D: the loads stay vectorized
            kt = tl.load(k_ptrs, mask=n_mask[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, kt, v, n_mask[None, :], scale_log2e, UPCAST_TO_FP32,
                                            INPUT_PRECISION)
    # partials [B, Hq, NUM_SPLITS(, D)]: row (b, h) starts at (b * Hkv * GROUP + h) * NUM_SPLITS
    row = (b * Hkv * GROUP + h) * NUM_SPLITS + split  # [BLOCK_G]
    tl.store(m_ptr + row, m_i, mask=g_mask)
    tl.store(l_ptr + row, l_i, mask=g_mask)
    tl.store(acc_ptr + row[:, None] * D + rd[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["Hq", "NUM_SPLITS"])
def _decode_reduce_kernel(out_ptr, acc_ptr, m_ptr, l_ptr, Hq, D, NUM_SPLITS, stride_ob, stride_oh,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    s_mask = rs < NUM_SPLITS
    m = tl.load(m_ptr + bh * NUM_SPLITS + rs, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + bh * NUM_SPLITS + rs, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (bh * NUM_SPLITS + rs)[:, None] * D + rd[None, :],
                  mask=s_mask[:, None] & (rd < D)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)  # 0 for splits that saw no key
    total = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
    out = tl.where(total > 0.0, out, 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, to_output(out, out_ptr), mask=rd < D)


_split_tuned = None if not AUTOTUNE else triton.autotune(CONFIGS, key=["BLOCK_D", "BLOCK_G", "SPLIT_LEN"])(
    _decode_split_kernel)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(Sk: int, programs_per_split: int, block_n: int, target_programs: int) -> tuple[int, int]:
    """(SPLIT_LEN, NUM_SPLITS): cut Sk into ranges of whole key blocks so that about
    target_programs programs run (at most MAX_SPLITS ranges)."""
    key_blocks = triton.cdiv(Sk, block_n)
    splits = max(1, min(key_blocks, MAX_SPLITS, triton.cdiv(target_programs, programs_per_split)))
    split_len = triton.cdiv(key_blocks, splits) * block_n
    return split_len, triton.cdiv(Sk, split_len)


def decode_attention(q, k, v, q_pos, kv_len, causal: bool, scale: float, out, input_precision: str = "ieee",
                     upcast: bool | None = None):
    """q [B, Hq, 1, D], k/v [B, Hkv, Sk, D] (any strides, unit in D) -> out [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    upcast = upcast_dot(q.dtype) if upcast is None else upcast
    block_d = next_power_of_2(D, 16)
    block_g = next_power_of_2(group, 16)
    if INTERPRETING:
        # one key block per split, so the small conformance shapes exercise the merge
        block_n = INTERPRETER_BLOCK_N
        split_len, splits = block_n, triton.cdiv(Sk, block_n)
    else:
        block_n = BLOCK_N
        split_len, splits = num_splits(Sk, B * Hkv, block_n, 2 * _multiprocessors(q.device))
    part_acc = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    args = (part_acc, part_m, part_l, q, k, v, q_pos, kv_len, Hkv, group, D, split_len, splits, scale * LOG2_E,
            q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3])
    flags = dict(CAUSAL=causal, UPCAST_TO_FP32=upcast, INPUT_PRECISION=input_precision,
                 EVEN_D=block_d == D, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d)
    kernel = _decode_split_kernel if _split_tuned is None else _split_tuned
    kernel[(splits, B * Hkv)](*args, **flags)
    _decode_reduce_kernel[(B * Hq,)](out, part_acc, part_m, part_l, Hq, D, splits, out.stride(0), out.stride(1),
                                     BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d)
    return out
