"""GGUF block formats: dequantize in torch; quantize through the `gguf` package (Q8_0/Q4_0/Q4_1)
or, for the K-quants (Q4_K/Q5_K/Q6_K, which the gguf package cannot quantize), a plain
round-to-nearest quantizer here.

Layouts are in spec.QUANT_FORMATS. Dequantization is written here in torch (it runs on
any device and is what backends call at prepare time); it follows the order of operations
of ggml's (and the gguf package's) dequantizers, so in fp32 it is bit-identical to them
and in fp64 it is exact. The Q8_0/Q4_0/Q4_1 quantizer is the gguf package's reference
one, which keeps tests independent of this file; the K-quant quantizer is checked by round
trip against the gguf package's dequantizers (tests/test_kquants.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import K_QUANT_FORMATS, QUANT_FORMATS, QuantizedWeight


def _nibbles(qs):
    """uint8 [..., 16] -> [..., 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _f16(b, start, compute):
    """The fp16 field at byte `start` of each block [..., bytes] -> [..., 1] in `compute`."""
    return b[..., start:start + 2].contiguous().view(torch.float16).to(compute)


def k_scales_mins(scales):
    """Q4_K/Q5_K's 12 packed bytes [..., 12] -> (6-bit scales [..., 8], 6-bit mins [..., 8]) as int32.

    Bytes 0-3: scales 0-3 (low 6 bits), bytes 4-7: mins 0-3; scales/mins 4-7 take their low 4 bits
    from bytes 8-11 (scale: low nibble, min: high nibble) and their top 2 bits from the top 2 bits of
    bytes 0-3 (scales) and 4-7 (mins)."""
    s = scales.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, mn


def _dequantize_k(fmt, b, compute):
    """K-quant super-blocks uint8 [N, nb, bytes] -> [N, nb, 256] in `compute` (ggml's order of operations)."""
    n, nb = b.shape[:2]
    if fmt == "q6_k":
        ql = b[..., 0:128].reshape(n, nb, 2, 1, 64)
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32).to(torch.int32)
        scales = b[..., 192:208].contiguous().view(torch.int8).to(compute)  # [N, nb, 16]
        d = _f16(b, 208, compute)
        low = torch.cat([ql & 15, ql >> 4], dim=3).reshape(n, nb, 2, 128).to(torch.int32)
        high = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(1, 1, 1, 4, 1)) & 3)
        q = (low | (high.reshape(n, nb, 2, 128) << 4)) - 32
        return ((d * scales)[..., None] * q.reshape(n, nb, 16, 16).to(compute)).reshape(n, nb, 256)
    d, dmin = _f16(b, 0, compute), _f16(b, 2, compute)
    sc, mn = k_scales_mins(b[..., 4:16])
    qs = b[..., 16 + (32 if fmt == "q5_k" else 0):].reshape(n, nb, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, nb, 8, 32).to(torch.int32)
    if fmt == "q5_k":
        qh = b[..., 16:48].reshape(n, nb, 1, 32).to(torch.int32)
        q = q | (((qh >> torch.arange(8, dtype=torch.int32, device=b.device).view(1, 1, 8, 1)) & 1) << 4)
    scale = (d * sc.to(compute))[..., None]  # [N, nb, 8, 1]
    offset = (dmin * mn.to(compute))[..., None]
    return (scale * q.to(compute) - offset).reshape(n, nb, 256)


def k_subblock_scales(weight: QuantizedWeight, dtype=torch.float32):
    """A K-quant weight's per-sub-block affine maps: (size, scale [N, K/size], offset [N, K/size] or None)
    with weight = scale * code - offset, code the sub-block's unsigned (q4_k/q5_k) or signed (q6_k:
    q - 32) integer. size is 32 (q4_k, q5_k) or 16 (q6_k); scale = d * sc and offset = dmin * m are
    exact in fp32."""
    n, k = weight.shape
    b = weight.blocks.reshape(n, k // 256, QUANT_FORMATS[weight.format][1])
    if weight.format == "q6_k":
        scales = b[..., 192:208].contiguous().view(torch.int8).to(dtype)
        return 16, (_f16(b, 208, dtype) * scales).reshape(n, k // 16), None
    sc, mn = k_scales_mins(b[..., 4:16])
    return (32, (_f16(b, 0, dtype) * sc.to(dtype)).reshape(n, k // 32),
            (_f16(b, 2, dtype) * mn.to(dtype)).reshape(n, k // 32))


def dequantize(weight: QuantizedWeight, dtype=torch.float32) -> torch.Tensor:
    """QuantizedWeight -> dense [N, K] in `dtype` (computed in fp32, or fp64 when asked)."""
    n, k = weight.shape
    per_block, block_bytes = QUANT_FORMATS[weight.format]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    b = weight.blocks.reshape(n, k // per_block, block_bytes)
    if weight.format in K_QUANT_FORMATS:
        return _dequantize_k(weight.format, b, compute).reshape(n, k).to(dtype)
    d = _f16(b, 0, compute)  # [N, nb, 1]
    if weight.format == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).to(compute)
        x = d * q
    elif weight.format == "q4_0":
        x = d * (_nibbles(b[..., 2:]).to(compute) - 8)
    else:  # q4_1
        m = _f16(b, 2, compute)
        x = d * _nibbles(b[..., 4:]).to(compute) + m
    return x.reshape(n, k).to(dtype)


def dequantize_rows(weight: QuantizedWeight, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Rows `ids` (int64 [R]) of a block-quantized [N, K] matrix, dense [R, K]: a block never spans
    rows, so an embedding table can stay blocks and dequantize only the rows it gathers."""
    rows = weight.blocks.index_select(0, ids.to(weight.blocks.device))
    return dequantize(QuantizedWeight(weight.format, rows, (rows.shape[0], weight.shape[1])), dtype)


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Dense [N, K] -> QuantizedWeight: gguf's reference quantizer, or quantize_k for the K-quants."""
    if fmt in K_QUANT_FORMATS:
        return quantize_k(weight, fmt)
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    blocks = quants.quantize(weight.detach().to(torch.float32).cpu().numpy(), qtype)
    return QuantizedWeight(fmt, torch.from_numpy(np.ascontiguousarray(blocks)), tuple(weight.shape))


# ---------------------------------------------------------------------------- K-quant quantizer

def _fp16_at_least(x):
    """x (float64 >= 0) rounded to fp16, upwards: the result is never below x (so ranges still cover)."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _scale_codes(need, h, top):
    """ceil(need / h) in [0, top] (0 where h = 0): the smallest integer sub-block scale that covers `need`."""
    safe = np.where(h > 0, h.astype(np.float64), 1.0)
    return np.clip(np.ceil(need / safe - 1e-9), 0, top) * (h > 0)


def _round_codes(x, step, lo, hi):
    """round(x / step) in [lo, hi]; 0 where step = 0 (the sub-block's values are then all 0 after offset)."""
    safe = np.where(step > 0, step, 1.0)
    return np.where(step > 0, np.clip(np.floor(x / safe + 0.5), lo, hi), 0.0)


def quantize_k(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Dense [N, K] (K a multiple of 256) -> Q4_K / Q5_K / Q6_K blocks by plain round-to-nearest.

    Not llama.cpp's search for the best scales (make_qkx2_quants): each sub-block's scale (and min)
    is chosen so its range covers the sub-block's values, the super-block scales d (and dmin) so the
    6-bit (8-bit for Q6_K) sub-block scales cover those, rounding every scale upwards; codes are then
    rounded to nearest, so no value is clipped and each weight is within half a code step of x
    (step = d * scale of its sub-block). For tests and synthetic models."""
    if fmt not in K_QUANT_FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(K_QUANT_FORMATS)}, got {fmt!r}")
    n, k = weight.shape
    if k % 256:
        raise ValueError(f"{fmt} weight: K={k} must be a multiple of the super-block size 256")
    x = weight.detach().to(torch.float64).cpu().numpy().reshape(-1, 256)  # [nbt, 256]
    nbt = x.shape[0]
    if fmt == "q6_k":
        xs = x.reshape(nbt, 16, 16)
        need = np.abs(xs).max(-1) / 31.0  # codes -31..31 cover the sub-block
        d = _fp16_at_least(need.max(-1) / 127.0)  # [nbt]
        sc = _scale_codes(need, d[:, None], 127)  # [nbt, 16]
        step = d.astype(np.float64)[:, None, None] * sc[..., None]
        q = (_round_codes(xs, step, -32, 31) + 32).astype(np.uint8).reshape(nbt, 2, 4, 32)  # (half, quarter, l)
        ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)  # [nbt, 2, 2, 32]: quarters 0/1 low, 2/3 high
        qh = (q >> 4)
        qh = qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)  # [nbt, 2, 32]
        blocks = np.concatenate([ql.reshape(nbt, 128), qh.reshape(nbt, 64), sc.astype(np.int8).view(np.uint8),
                                 d.reshape(nbt, 1).view(np.uint8)], axis=1)
    else:
        levels = 15 if fmt == "q4_k" else 31
        xs = x.reshape(nbt, 8, 32)
        m_need = -np.minimum(xs.min(-1), 0.0)  # >= 0: the offset that makes every value >= 0
        dmin = _fp16_at_least(m_need.max(-1) / 63.0)
        mn = _scale_codes(m_need, dmin[:, None], 63)
        offset = dmin.astype(np.float64)[:, None] * mn  # >= m_need
        need = np.maximum(xs.max(-1) + offset, 0.0) / levels
        d = _fp16_at_least(need.max(-1) / 63.0)
        sc = _scale_codes(need, d[:, None], 63)
        step = d.astype(np.float64)[:, None, None] * sc[..., None]
        q = _round_codes(xs + offset[..., None], step, 0, levels).astype(np.uint8)  # [nbt, 8, 32]
        sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
        packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)  # [nbt, 12]
        low = q & 15
        qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(nbt, 128)
        parts = [d.reshape(nbt, 1).view(np.uint8), dmin.reshape(nbt, 1).view(np.uint8), packed]
        if fmt == "q5_k":
            bits = (q >> 4).astype(np.uint8)  # [nbt, 8, 32]
            qh = np.zeros((nbt, 32), dtype=np.uint8)
            for s in range(8):
                qh |= bits[:, s] << s
            parts.append(qh)
        blocks = np.concatenate(parts + [qs], axis=1)
    per_row = k // 256 * QUANT_FORMATS[fmt][1]
    return QuantizedWeight(fmt, torch.from_numpy(np.ascontiguousarray(blocks).reshape(n, per_row)), (n, k))
