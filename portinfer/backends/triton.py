"""The triton backend: the op contract as Triton kernels (portinfer/kernels/, one op per file).

On a CUDA GPU the kernels are compiled (and autotuned). Without one, with TRITON_INTERPRET=1
set before the kernels are imported, they run on CPU tensors under Triton's interpreter:
slow, for tests only (not picked by backend="auto"), so the conformance suite uses its small
shapes there (`conformance_profile`).

`import portinfer` never imports triton: `probe()` imports it (through portinfer.kernels, which
fixes the interpreter-or-compiled mode), the kernel modules are imported on first use, so a machine without triton lists the backend as unavailable, with the
reason, instead of failing to import.

Precision: reductions accumulate in fp32. fp32 matmuls (linear, attention) are IEEE fp32 by
default; TritonBackend(allow_tf32=True) lets them use TF32 tensor cores (about 10 bits of
mantissa: outside the fp32 conformance budget, by design of the budget).
Weights: dense fp32/fp16/bf16, GGUF q8_0/q4_0 blocks and q4_k/q5_k/q6_k super-blocks are
computed natively (dequantized inside the kernel); q4_1 is dequantized to fp32 once, at prepare time.
"""
from __future__ import annotations

import importlib

import torch

from . import quant, spec
from .base import Backend

MAX_HEAD_DIM = 256  # attention keeps a [BLOCK_M, D] accumulator in registers
INT32_MAX = 2 ** 31 - 1


def _kernel(name):
    """The launcher module portinfer.kernels.<name> (imports triton on first use)."""
    return importlib.import_module(f"portinfer.kernels.{name}")


def _interpreting() -> bool:
    """Whether the kernels run under the interpreter (decided by triton when they were imported)."""
    return importlib.import_module("portinfer.kernels").INTERPRETING


def _check_int32_extent(name, t):
    """Kernels index with 32-bit offsets: refuse tensors whose furthest element is beyond 2^31 - 1."""
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    if extent > INT32_MAX:
        raise ValueError(f"{name}: spans {extent + 1} elements, more than the triton kernels' 32-bit offsets "
                         f"address ({INT32_MAX}); split the call (smaller batch or shorter cache)")


class TritonBackend(Backend):
    name = "triton"
    native_weight_formats = spec.DENSE_FORMATS + ("q8_0", "q4_0") + spec.K_QUANT_FORMATS

    @classmethod
    def probe(cls):
        try:
            interpreting = _interpreting()  # imports triton
        except Exception as exc:  # missing, or a broken install
            return False, (f"the triton package cannot be imported ({type(exc).__name__}: {exc}); "
                           f"install it with pip install 'portinfer[triton]'")
        if interpreting:
            return True, ""
        if not torch.cuda.is_available():
            return False, ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs the "
                           "kernels on CPU under the Triton interpreter, for tests only")
        return True, ""

    @classmethod
    def auto_eligible(cls):
        return cls.probe()[0] and not _interpreting()

    def __init__(self, device=None, allow_tf32: bool = False):
        self.interpreting = _interpreting()
        default = "cpu" if self.interpreting else "cuda"
        super().__init__(device if device is not None else default)
        expected = "cpu" if self.interpreting else "cuda"
        if self.device.type != expected:
            mode = "the Triton interpreter (TRITON_INTERPRET=1)" if self.interpreting else "compiled Triton"
            raise ValueError(f"device: expected {expected} with {mode}, got {self.device}")
        self.allow_tf32 = bool(allow_tf32)
        self.input_precision = "tf32" if self.allow_tf32 else "ieee"

    @property
    def conformance_profile(self):
        return "small" if self.interpreting else "full"

    @property
    def conformance_max_examples(self):
        # the interpreter runs the small shapes fast enough for the full profile's example count
        return 25 if self.interpreting else None

    def conformance_variant_examples(self, op, variant):
        # the interpreter runs a K-quant tile at about a second per call: a few examples per dtype
        # (K = 256, every format's branches) keep the suite's time in bounds
        if self.interpreting and op == "linear" and variant in spec.K_QUANT_FORMATS:
            return 4
        return None

    def info(self):
        import triton

        return {"device": str(self.device), "mode": "interpreter" if self.interpreting else "compiled",
                "triton": triton.__version__, "tf32": self.allow_tf32}

    def supports(self, op, **meta):
        if not super().supports(op, **meta):
            return False
        if op == "attention" and meta.get("D", 0) > MAX_HEAD_DIM:
            return False
        return True

    # ---------------------------------------------------------------- ops

    def _prepare_linear(self, weight, dtype):
        source = spec.weight_format(weight)
        if isinstance(weight, spec.QuantizedWeight):
            blocks = weight.blocks.to(self.device).contiguous()
            if weight.format in _kernel("quantized_linear").FORMATS:
                payload, fmt = blocks, weight.format
            else:
                # q4_1 is not computed natively: dequantize once, to fp32 (d * nib + m is exact there)
                payload = quant.dequantize(spec.QuantizedWeight(weight.format, blocks, weight.shape), torch.float32)
                fmt = "fp32"
        else:
            payload, fmt = weight.to(device=self.device, dtype=dtype).contiguous(), spec.dtype_name(dtype)
        _check_int32_extent("weight", payload)
        n, k = weight.shape
        return spec.PreparedLinear(self.name, n, k, dtype, fmt, source, payload)

    def _embedding(self, ids, table):
        out = self.new_output((ids.shape[0], table.shape[1]), table.dtype)
        _check_int32_extent("out", out)
        return _kernel("embedding").embedding(ids.contiguous(), table, out)

    def _linear(self, x, w, bias):
        _check_int32_extent("x", x)
        out = self.new_output((x.shape[0], w.out_features), x.dtype)
        _check_int32_extent("out", out)
        if w.format in spec.QUANT_FORMATS:
            return _kernel("quantized_linear").quantized_linear(x, w.payload, w.format, bias, out, self.input_precision)
        return _kernel("linear").linear(x, w.payload, bias, out, self.input_precision)

    def _rms_norm(self, x, weight, eps):
        _check_int32_extent("x", x)
        return _kernel("rms_norm").rms_norm(x, weight, eps, self.new_output(x.shape, x.dtype))

    def _layer_norm(self, x, weight, bias, eps):
        _check_int32_extent("x", x)
        return _kernel("layer_norm").layer_norm(x, weight, bias, eps, self.new_output(x.shape, x.dtype))

    def _rope(self, x, pos, rotary):
        _check_int32_extent("x", x)
        out = self.new_output(x.shape, x.dtype)
        return _kernel("rope").rope(x, pos.to(x.device), rotary.inv_freq, rotary.style == "interleaved", out)

    def _silu_mul(self, x):
        _check_int32_extent("x", x)
        return _kernel("silu_mul").silu_mul(x, self.new_output((x.shape[0], x.shape[1] // 2), x.dtype))

    def _gelu(self, x, approximate):
        _check_int32_extent("x", x)
        # [..., C] as rows [R, C]: a view for any layout whose leading dims merge (else one copy, here)
        x2d = x.reshape(-1, x.shape[-1])
        out = self.new_output(x.shape, x.dtype)
        _kernel("gelu").gelu(x2d, approximate, out.view(-1, x.shape[-1]))
        return out

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_int32_extent(name, t)
        q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
        kv_len = kv_len.to(device=q.device, dtype=torch.int32).contiguous()
        out = self.new_output(q.shape, q.dtype)
        if q.shape[2] == 1:
            return _kernel("attention_decode").decode_attention(q, k, v, q_pos, kv_len, causal, scale, out,
                                                                self.input_precision)
        return _kernel("attention").attention(q, k, v, q_pos, kv_len, causal, scale, out, self.input_precision)
