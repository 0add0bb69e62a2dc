"""The operator contract in code: op names, weight formats, and input validation.

Every backend op goes through `validate(op, ...)` before any kernel runs (see
`Backend` in base.py), so a kernel never sees an input it was not written for.
Each validator returns the op's *meta*: the few facts a backend's
`supports(op, **meta)` decides on (dtype, weight format, head_dim, ...).

Errors name the argument, what was expected and what was found.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

OPS = ("embedding", "linear", "rms_norm", "layer_norm", "rope", "silu_mul", "gelu", "attention")

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# GGUF block-quantized formats: name -> (weights per block, bytes per block).
# Block layouts (little endian), as ggml defines them:
#   q8_0: fp16 d, int8 q[32]                      x = d * q
#   q4_0: fp16 d, uint8 qs[16] (lo nibbles = 0..15, hi = 16..31)   x = d * (nib - 8)
#   q4_1: fp16 d, fp16 m, uint8 qs[16] (same nibble order)          x = d * nib + m
# K-quants: super-blocks of 256 weights in sub-blocks, two-level scales (quant.py decodes them):
#   q4_k (144 bytes): fp16 d, fp16 dmin, uint8 scales[12] (8 x 6-bit scale + 6-bit min), uint8 qs[128];
#         sub-block s (32 weights) = nibbles of qs[32 (s/2) ..][32]: low for even s, high for odd
#         x = d * sc[s] * nib - dmin * m[s]
#   q5_k (176 bytes): as q4_k, plus uint8 qh[32] before qs: bit s of qh[l] is the 5th bit of weight l
#         of sub-block s;  x = d * sc[s] * (nib | bit << 4) - dmin * m[s]
#   q6_k (210 bytes): uint8 ql[128] (low 4 bits), uint8 qh[64] (high 2 bits), int8 scales[16], fp16 d;
#         16 sub-blocks of 16 weights;  x = d * scales[s] * (q - 32), q in [0, 64)
QUANT_FORMATS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
                 "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
K_QUANT_FORMATS = ("q4_k", "q5_k", "q6_k")
DENSE_FORMATS = ("fp32", "fp16", "bf16")
WEIGHT_FORMATS = DENSE_FORMATS + tuple(QUANT_FORMATS)


class UnsupportedOpError(NotImplementedError):
    """A backend was asked for an op/meta combination its `supports` rejects."""


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(name) -> torch.dtype:
    """'fp32'|'fp16'|'bf16' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in ACTIVATION_DTYPES:
            raise ValueError(f"dtype: expected one of fp32, fp16, bf16, got {name}")
        return name
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPES_BY_NAME:
        raise ValueError(f"dtype: expected one of fp32, fp16, bf16, got {name!r}")
    return DTYPES_BY_NAME[key]


@dataclass(frozen=True)
class QuantizedWeight:
    """A GGUF block-quantized matrix of logical shape [N, K]: `blocks` is uint8 [N, K/block * bytes_per_block]
    (block = 32 weights, 256 for the K-quants)."""

    format: str
    blocks: torch.Tensor
    shape: tuple

    def __post_init__(self):
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"weight format: expected one of {sorted(QUANT_FORMATS)}, got {self.format!r}")
        n, k = self.shape
        per_block, block_bytes = QUANT_FORMATS[self.format]
        if k % per_block:
            raise ValueError(f"{self.format} weight: K={k} must be a multiple of the block size {per_block}")
        expected = (n, k // per_block * block_bytes)
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != expected:
            raise ValueError(
                f"{self.format} weight blocks: expected uint8 {list(expected)} for shape {list(self.shape)}, "
                f"got {self.blocks.dtype} {list(self.blocks.shape)}")

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


def weight_format(weight) -> str:
    if isinstance(weight, QuantizedWeight):
        return weight.format
    if isinstance(weight, torch.Tensor) and weight.dtype in ACTIVATION_DTYPES:
        return DTYPE_NAMES[weight.dtype]
    raise ValueError(f"weight: expected a fp32/fp16/bf16 tensor [N, K] or a QuantizedWeight, got {_describe(weight)}")


def weight_shape(weight) -> tuple:
    return tuple(weight.shape)


@dataclass(frozen=True)
class PreparedLinear:
    """The handle `prepare_linear` returns and `linear` takes. Immutable: kernels trust the sizes it
    records (the cpu backend's native calls also check them against the payload's bytes).

    `payload` is whatever the backend keeps (a packed tensor, raw blocks, ...);
    `format` is the format it computes in (after any dequantization at prepare time),
    `source_format` the format it was given, `dtype` the activation dtype it serves.
    """

    backend: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    format: str
    source_format: str
    payload: object
    extra: dict = field(default_factory=dict)

    @property
    def shape(self):
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class RotaryParams:
    """Rotary embedding parameters, independent of the rope *scaling* type.

    inv_freq: float64 CPU tensor [rotary_dim / 2] -- the per-pair frequencies, with any
    scaling (llama3, linear) already applied by the runtime, so backends only ever see
    angle = pos * inv_freq[i]. style: 'neox' (rotate-half, Hugging Face) or 'interleaved'
    (pairs (2i, 2i+1), GPT-J / llama.cpp). Dimensions >= rotary_dim pass through unchanged.
    """

    inv_freq: torch.Tensor
    style: str = "neox"

    def __post_init__(self):
        if self.style not in ("neox", "interleaved"):
            raise ValueError(f"rotary style: expected 'neox' or 'interleaved', got {self.style!r}")
        if self.inv_freq.dim() != 1 or self.inv_freq.numel() == 0:
            raise ValueError(f"rotary inv_freq: expected a non-empty 1-D tensor, got shape {list(self.inv_freq.shape)}")

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @staticmethod
    def from_theta(head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None, style: str = "neox"):
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
        return RotaryParams(inv_freq=1.0 / (theta ** exponents), style=style)


# ----------------------------------------------------------------------------
# validation helpers

def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{dtype_name(t.dtype)} tensor of shape {list(t.shape)} on {t.device}"
    return type(t).__name__


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _rank(name, t, rank, layout):
    _tensor(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name}: expected {rank} dims {layout}, got shape {list(t.shape)}")


def _activation(name, t, rank, layout, device=None):
    _rank(name, t, rank, layout)
    if t.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name}: expected dtype fp32, fp16 or bf16, got {t.dtype}")
    if 0 in t.shape:
        raise ValueError(f"{name}: expected a non-empty tensor {layout}, got shape {list(t.shape)}")
    _unit_last_stride(name, t)
    _device(name, t, device)


def _unit_last_stride(name, t):
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {list(t.stride())} "
                         f"(pass a view with contiguous rows, e.g. t.contiguous())")


def _device(name, t, device):
    if device is None:
        return
    expected = device.type if isinstance(device, torch.device) else torch.device(device).type
    if t.device.type != expected:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def _same_dtype(name, t, dtype):
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype_name(dtype)} (the activation dtype), got {dtype_name(t.dtype)}")


def _shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {list(expected)}, got {list(t.shape)}")


def _finite_positive(name, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def _int_tensor(name, t, dtypes, shape, device):
    _tensor(name, t)
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                         f"got {str(t.dtype).replace('torch.', '')}")
    _shape(name, t, shape)
    if t.device.type != "cpu":
        _device(name, t, device)


def _min_max(t) -> tuple:
    """(min, max) of a small index tensor ([B] of q_pos / kv_len): one host read, not two reductions."""
    values = t.tolist()
    return min(values), max(values)


# ----------------------------------------------------------------------------
# one validator per op; each returns the meta that `supports` sees

def prepared_table_meta(table: PreparedLinear) -> dict:
    """What `supports("embedding", ...)` sees for a prepared table: its backend, activation dtype and
    format (with the backend's own repacking, e.g. cpu's int8 panels, as "q4_0@int8x16")."""
    layout = table.extra.get("layout")
    return {"dtype": table.dtype, "table": "prepared", "prepared_by": table.backend,
            "weight_format": table.format if layout is None else f"{table.format}@{layout}"}


def validate_embedding(ids, table, device=None):
    if isinstance(table, PreparedLinear):
        # the rows of a prepared weight [V, H] (a tied output head, or GGUF blocks kept as prepared):
        # gathered from the backend's own layout, dequantized exactly, in the dtype it was prepared for
        vocab = table.out_features
        meta = prepared_table_meta(table)
    else:
        _rank("table", table, 2, "[V, H]")
        _activation("table", table, 2, "[V, H]", device)
        vocab = table.shape[0]
        meta = {"dtype": table.dtype}
    _tensor("ids", ids)
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"ids: expected int64 [N], got {_describe(ids)}")
    if ids.numel() == 0:
        raise ValueError("ids: expected at least one id, got an empty tensor")
    _device("ids", ids, device)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"ids: expected every id in [0, {vocab}) (the table's vocabulary), got {bad}")
    return meta


def validate_linear(x, w, bias=None, device=None):
    _activation("x", x, 2, "[M, K]", device)
    if not isinstance(w, PreparedLinear):
        raise ValueError(f"w: expected the PreparedLinear returned by prepare_linear, got {type(w).__name__}")
    if x.shape[1] != w.in_features:
        raise ValueError(f"x: expected K = {w.in_features} columns (the weight's in_features), got shape {list(x.shape)}")
    if w.dtype != x.dtype:
        raise ValueError(f"x: expected dtype {dtype_name(w.dtype)} (the weight was prepared for it), got {dtype_name(x.dtype)}")
    if bias is not None:
        _activation("bias", bias, 1, "[N]", device)
        _shape("bias", bias, (w.out_features,))
        _same_dtype("bias", bias, x.dtype)
    return {"dtype": x.dtype, "weight_format": w.source_format, "M": x.shape[0], "K": x.shape[1], "N": w.out_features}


def validate_prepare_linear(weight, dtype):
    fmt = weight_format(weight)
    if dtype is not None and dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype: expected fp32, fp16 or bf16 activations, got {dtype}")
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"weight: expected a non-empty 2-D tensor [N, K], got shape {list(weight.shape)}")
    return {"weight_format": fmt, "dtype": dtype}


def validate_rms_norm(x, weight, eps, device=None):
    _activation("x", x, 2, "[M, H]", device)
    _activation("weight", weight, 1, "[H]", device)
    _shape("weight", weight, (x.shape[1],))
    _same_dtype("weight", weight, x.dtype)
    _finite_positive("eps", eps)
    return {"dtype": x.dtype, "H": x.shape[1]}


def validate_layer_norm(x, weight, bias, eps, device=None):
    meta = validate_rms_norm(x, weight, eps, device)
    _activation("bias", bias, 1, "[H]", device)
    _shape("bias", bias, (x.shape[1],))
    _same_dtype("bias", bias, x.dtype)
    return meta


def validate_rope(x, pos, rotary, device=None):
    _activation("x", x, 4, "[B, H, S, D]", device)
    if not isinstance(rotary, RotaryParams):
        raise ValueError(f"rotary: expected RotaryParams, got {type(rotary).__name__}")
    B, _, S, D = x.shape
    if rotary.rotary_dim > D or rotary.rotary_dim % 2:
        raise ValueError(f"rotary: expected an even rotary_dim <= head dim {D}, got {rotary.rotary_dim}")
    _int_tensor("pos", pos, (torch.int64,), (B, S), device)
    if int(pos.min()) < 0:
        raise ValueError(f"pos: expected positions >= 0, got {int(pos.min())}")
    return {"dtype": x.dtype, "style": rotary.style, "D": D, "rotary_dim": rotary.rotary_dim}


def validate_silu_mul(x, device=None):
    _activation("x", x, 2, "[M, 2I]", device)
    if x.shape[1] % 2:
        raise ValueError(f"x: expected an even number of columns [M, 2I] (gate and up), got shape {list(x.shape)}")
    return {"dtype": x.dtype}


def validate_gelu(x, approximate="none", device=None):
    _tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim, got a scalar")
    _activation("x", x, x.dim(), "[...]", device)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' (erf) or 'tanh', got {approximate!r}")
    return {"dtype": x.dtype, "approximate": approximate}


def validate_attention(q, k, v, q_pos, kv_len, causal, scale, device=None):
    _activation("q", q, 4, "[B, Hq, Sq, D]", device)
    _activation("k", k, 4, "[B, Hkv, Sk, D]", device)
    _activation("v", v, 4, "[B, Hkv, Sk, D]", device)
    B, Hq, Sq, D = q.shape
    _same_dtype("k", k, q.dtype)
    _same_dtype("v", v, q.dtype)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected shape [B={B}, Hkv, Sk, D={D}], got {list(k.shape)}")
    _shape("v", v, k.shape)
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q: expected Hq to be a multiple of Hkv = {Hkv} (GQA), got Hq = {Hq}")
    _int_tensor("q_pos", q_pos, (torch.int32,), (B,), device)
    _int_tensor("kv_len", kv_len, (torch.int32,), (B,), device)
    if _min_max(q_pos)[0] < 0:
        raise ValueError(f"q_pos: expected positions >= 0, got {_min_max(q_pos)[0]}")
    lo, hi = _min_max(kv_len)
    if lo < 0 or hi > Sk:
        raise ValueError(f"kv_len: expected values in [0, Sk = {Sk}] (the key length), got {hi if hi > Sk else lo}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    _finite_positive("scale", scale)
    return {"dtype": q.dtype, "D": D, "causal": causal, "gqa": Hq // Hkv, "Sq": Sq, "Sk": Sk}


VALIDATORS = {
    "embedding": validate_embedding,
    "linear": validate_linear,
    "rms_norm": validate_rms_norm,
    "layer_norm": validate_layer_norm,
    "rope": validate_rope,
    "silu_mul": validate_silu_mul,
    "gelu": validate_gelu,
    "attention": validate_attention,
}
