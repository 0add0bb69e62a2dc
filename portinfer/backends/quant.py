"""GGUF block formats (Q8_0, Q4_0, Q4_1): dequantize in torch, quantize through the `gguf` package.

Layouts are in spec.QUANT_FORMATS. Dequantization is written here in torch (it runs on
any device and is what backends call at prepare time); quantization uses the `gguf`
package's reference quantizer, which keeps tests independent of this file.
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import QUANT_FORMATS, QuantizedWeight


def _nibbles(qs):
    """uint8 [..., 16] -> [..., 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def dequantize(weight: QuantizedWeight, dtype=torch.float32) -> torch.Tensor:
    """QuantizedWeight -> dense [N, K] in `dtype` (computed in fp32, or fp64 when asked)."""
    n, k = weight.shape
    per_block, block_bytes = QUANT_FORMATS[weight.format]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    b = weight.blocks.reshape(n, k // per_block, block_bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).to(compute)  # [N, nb, 1]
    if weight.format == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).to(compute)
        x = d * q
    elif weight.format == "q4_0":
        x = d * (_nibbles(b[..., 2:]).to(compute) - 8)
    else:  # q4_1
        m = b[..., 2:4].contiguous().view(torch.float16).to(compute)
        x = d * _nibbles(b[..., 4:]).to(compute) + m
    return x.reshape(n, k).to(dtype)


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Dense [N, K] -> QuantizedWeight, using gguf's reference quantizer (for tests and tools)."""
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    blocks = quants.quantize(weight.detach().to(torch.float32).cpu().numpy(), qtype)
    return QuantizedWeight(fmt, torch.from_numpy(np.ascontiguousarray(blocks)), tuple(weight.shape))
