"""Embedding: out[n, :] = table[ids[n], :] (a row gather; ids were range-checked on the host).

Grid (N, cdiv(H, BLOCK)); table rows may be padded (stride_tv >= H).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETING, next_power_of_2

BLOCK = 256 if INTERPRETING else 1024


@triton.jit
def _embedding_kernel(out_ptr, ids_ptr, table_ptr, H, stride_tv, stride_on, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    row = tl.load(ids_ptr + n)  # int64
    tl.store(out_ptr + n * stride_on + cols, tl.load(table_ptr + row * stride_tv + cols, mask=mask), mask=mask)


def embedding(ids, table, out):
    """ids int64 [N], table [V, H] (unit last stride) -> out [N, H]."""
    N = ids.shape[0]
    H = table.shape[1]
    block = min(next_power_of_2(H), BLOCK)
    _embedding_kernel[(N, triton.cdiv(H, block))](out, ids, table, H, table.stride(0), out.stride(0), BLOCK=block)
    return out
