"""Triton kernels of the `triton` backend, one op per file.

Each file follows the same shape (after Liger-Kernel / FlagGems): a docstring with the
formula, `_<op>_kernel(out_ptr, x_ptr, ..., stride_*, N, BLOCK: tl.constexpr)`, then a
plain launcher taking torch tensors. Every stride is passed explicitly, so views (q/k/v of
a fused projection, a KV cache longer than kv_len, padded rows) are read in place.

Importing this package imports triton, and triton decides when a kernel is *decorated*
whether it runs compiled or under the CPU interpreter (TRITON_INTERPRET=1). So nothing in
`import portinfer` imports it: the backend does, on first use.

Interpreter specifics, decided here once:
- INTERPRETING: the kernels in this process run on CPU tensors through the interpreter.
- the interpreter computes `tl.dot` on bf16 operands wrong (it multiplies the raw bits,
  triton-lang/triton#11584), so launchers upcast bf16 tiles to fp32 before every dot when
  interpreting (the `UPCAST_TO_FP32` constexpr); compiled GPU code keeps native bf16 dots.
  fp16 and fp32 dots are right under the interpreter (tests/test_triton.py checks both).
- autotuning is pointless there: each launcher uses one small fixed config instead.

On a GPU the launchers autotune over the config list of their file; PORTINFER_TRITON_AUTOTUNE=0
turns that off (one fixed config per kernel: what the conformance run at full shapes wants,
where every new shape would otherwise compile and time every config).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# triton >= 3.4 reads its environment through `knobs`; older releases read TRITON_INTERPRET=1
_knobs = getattr(triton, "knobs", None)
INTERPRETING: bool = (bool(_knobs.runtime.interpret) if _knobs is not None
                      else os.environ.get("TRITON_INTERPRET", "0") == "1")
AUTOTUNE: bool = not INTERPRETING and os.environ.get("PORTINFER_TRITON_AUTOTUNE", "1") != "0"


def next_power_of_2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


def upcast_dot(dtype, interpreting: bool | None = None) -> bool:
    """Whether tiles of `dtype` must be upcast to fp32 before tl.dot (bf16 under the interpreter)."""
    import torch

    interpreting = INTERPRETING if interpreting is None else interpreting
    return interpreting and dtype == torch.bfloat16


# The interpreter's fp32 -> bf16 conversion truncates (rounds toward zero) where a GPU rounds
# to nearest even: a bf16 output would carry up to 2u of error instead of u. Kernels store
# through `to_output`, which rounds by hand under the interpreter.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETING)


@triton.jit
def to_output(x, out_ptr):
    """fp32 `x` -> out_ptr's element type, rounded to nearest even."""
    if _ROUND_BF16_BY_HAND and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round the low 16 bits away, ties to even
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)


_INTERPRETING = tl.constexpr(INTERPRETING)


@triton.jit
def exp_fp32(x):
    """e^x for fp32 x, to a few ulp on GPUs too. Compiled tl.exp is ex2.approx(x * log2(e)):
    rounding that product costs |x| * log2(e) * u relative (2e-6 at x = -20, past the fp32
    budget of silu_mul); libdevice's expf reduces the argument exactly. The interpreter has no
    libdevice, and its tl.exp is numpy's, accurate already."""
    if _INTERPRETING:
        return tl.exp(x)
    else:
        return libdevice.exp(x)
