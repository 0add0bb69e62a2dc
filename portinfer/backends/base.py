"""The Backend protocol.

A backend is one class: it declares what it is (name, device, protocol version,
activation dtypes, weight formats it computes natively) and implements one private
method per op (`_rms_norm`, `_attention`, ...). The public methods here validate
every input against the op contract (spec.py) and check `supports(op, **meta)`
before calling the implementation, so a kernel never sees an input it was not
written for. Implementations allocate outputs with `new_output`, which the
conformance suite poisons (NaN) to catch elements a kernel never writes.

Optional: `probe()` (is it usable here, and if not why), `info()` (extra facts for
`portinfer backends`, e.g. the SIMD path chosen), `compile(plan)` (run a whole step plan its own
way: see runtime/graph.py), and fused ops later.

Memory: a backend's tensors live in its `memory` (by default its torch device). A backend
whose memory torch cannot address directly (a vendor device behind a torch device, the
npu-sim emulator) declares `memory_space` and implements the two copy hooks,
`copy_to_memory` and `copy_from_memory`; Placement moves a tensor between backends of
different memories only through those hooks, and counts the bytes.
"""
from __future__ import annotations

import torch

from . import spec
from .spec import OPS, PreparedLinear, UnsupportedOpError

# Bump when the Backend interface changes incompatibly; out-of-tree backends declare
# the version they were built for and are refused when it differs.
PROTOCOL_VERSION = 1


class Backend:
    name: str = "unnamed"
    protocol_version: int = PROTOCOL_VERSION
    default_device: str = "cpu"
    activation_dtypes: tuple = spec.ACTIVATION_DTYPES
    # formats `linear` computes in directly; any other format is dequantized at prepare time
    native_weight_formats: tuple = spec.DENSE_FORMATS
    # an op set smaller than OPS means the rest fall back (see placement.py)
    ops: tuple = OPS
    # formats of its own prepared weights (PreparedLinear.format) `embedding` gathers rows from: a tied
    # output head is then the only copy of the matrix, GGUF blocks stay blocks (optional; empty: none)
    embedding_table_formats: tuple = ()
    # a backend that quantizes activations (integer dot products) is held to the int8 budget
    quantizes_activations: bool = False
    # a backend whose kernels run on their own pool of CPU threads: while a model runs on it,
    # torch's intra-op pool (used only for glue between ops) is held at one thread, so the two
    # pools never spin against each other on the same cores
    owns_cpu_threads: bool = False
    # where its tensors live; None: its torch device (see `memory` and the copy hooks)
    memory_space: str | None = None

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else self.default_device)
        self.poison_outputs = False

    # ---------------------------------------------------------------- description

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        """(available here, reason if not). Must be cheap and never raise."""
        return True, ""

    @classmethod
    def auto_eligible(cls) -> bool:
        """Whether backend="auto" may pick it (a Triton interpreter run is for tests only)."""
        return True

    @classmethod
    def options_from_setting(cls, setting: str) -> dict:
        """Constructor options for the backend spec 'NAME[SETTING]' (registry.parse_spec); a backend
        with settings overrides this (cpu: the quant route)."""
        raise ValueError(f"backend {cls.name!r} takes no [setting]; got {cls.name}[{setting}]")

    def info(self) -> dict:
        """Extra facts shown by `portinfer backends` (the SIMD path, threads, ...)."""
        return {}

    def supports(self, op: str, **meta) -> bool:
        """Whether this backend computes `op` for these meta (see spec.validate_*)."""
        if op not in self.ops:
            return False
        if meta.get("table") == "prepared" and (meta.get("prepared_by") != self.name
                                                or meta.get("weight_format") not in self.embedding_table_formats):
            return False
        dtype = meta.get("dtype")
        return dtype is None or dtype in self.activation_dtypes

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r} on {self.device}>"

    # ---------------------------------------------------------------- step plans (optional hook)

    def compile(self, plan):
        """Optional: take a traced step plan (runtime/graph.Plan: nodes over numbered values, each
        contract op with the backend that ran it when traced) and return an executor with
        `run(inputs: graph.StepInputs) -> logits` that computes the same function (one native call,
        a CUDA graph...), or None: the generic executor then runs the plan's pre-bound kernel calls.
        The default: decode steps replayed from CUDA graphs on a CUDA device, else None."""
        if self.device.type == "cuda":
            from ..runtime.graph import GraphExecutor
            return GraphExecutor(plan)
        return None

    # ---------------------------------------------------------------- memory (optional hooks)

    @property
    def memory(self) -> str:
        """The memory this backend's tensors live in: `memory_space`, else its torch device."""
        return self.memory_space or str(self.device)

    def copy_to_memory(self, t: torch.Tensor) -> torch.Tensor:
        """Copy a tensor from another memory into this backend's memory (host -> device)."""
        return t.to(self.device)

    def copy_from_memory(self, t: torch.Tensor, device) -> torch.Tensor:
        """Copy a tensor out of this backend's memory onto torch `device` (device -> host)."""
        return t.to(device)

    # ---------------------------------------------------------------- helpers for implementations

    def new_output(self, shape, dtype) -> torch.Tensor:
        """Allocate an op's output; NaN-filled when the conformance suite asks for poison."""
        if self.poison_outputs:
            return torch.full(tuple(shape), float("nan"), dtype=dtype, device=self.device)
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def _require(self, op, meta):
        if not self.supports(op, **meta):
            shown = {k: (spec.dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in meta.items()}
            raise UnsupportedOpError(f"backend {self.name!r} does not support {op} with {shown}")

    def _check_device(self, t, name):
        spec._device(name, t, self.device)

    # ---------------------------------------------------------------- public ops (validated)

    def prepare_linear(self, weight, dtype=None) -> PreparedLinear:
        """Prepare a weight [N, K] (dense tensor or spec.QuantizedWeight) for `linear` with
        activations of `dtype` (default: the weight's dtype, fp32 for quantized weights)."""
        meta = spec.validate_prepare_linear(weight, dtype)
        if dtype is None:
            dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        self._require("linear", {"dtype": dtype, "weight_format": meta["weight_format"]})
        return self._prepare_linear(weight, dtype)

    def embedding(self, ids, table):
        """ids int64 [N], table [V, H] (a dense tensor, or a PreparedLinear this backend prepared and
        lists in embedding_table_formats) -> [N, H] in the table's (activation) dtype."""
        self._require("embedding", spec.validate_embedding(ids, table, self.device))
        return self._embedding(ids, table)

    def linear(self, x, w, bias=None):
        meta = spec.validate_linear(x, w, bias, self.device)
        if w.backend != self.name:
            raise ValueError(f"w: prepared by backend {w.backend!r}, expected one prepared by {self.name!r}")
        self._require("linear", meta)
        return self._linear(x, w, bias)

    def rms_norm(self, x, weight, eps):
        self._require("rms_norm", spec.validate_rms_norm(x, weight, eps, self.device))
        return self._rms_norm(x, weight, float(eps))

    def layer_norm(self, x, weight, bias, eps):
        self._require("layer_norm", spec.validate_layer_norm(x, weight, bias, eps, self.device))
        return self._layer_norm(x, weight, bias, float(eps))

    def rope(self, x, pos, rotary):
        self._require("rope", spec.validate_rope(x, pos, rotary, self.device))
        return self._rope(x, pos, rotary)

    def silu_mul(self, x):
        self._require("silu_mul", spec.validate_silu_mul(x, self.device))
        return self._silu_mul(x)

    def gelu(self, x, approximate="none"):
        self._require("gelu", spec.validate_gelu(x, approximate, self.device))
        return self._gelu(x, approximate)

    def attention(self, q, k, v, q_pos, kv_len, causal=True, scale=None):
        if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
            scale = q.shape[-1] ** -0.5
        self._require("attention", spec.validate_attention(q, k, v, q_pos, kv_len, causal, scale, self.device))
        return self._attention(q, k, v, q_pos, kv_len, causal, float(scale))

    # ---------------------------------------------------------------- implementations (override)

    def _prepare_linear(self, weight, dtype) -> PreparedLinear:
        raise NotImplementedError

    def _embedding(self, ids, table):
        raise NotImplementedError

    def _linear(self, x, w, bias):
        raise NotImplementedError

    def _rms_norm(self, x, weight, eps):
        raise NotImplementedError

    def _layer_norm(self, x, weight, bias, eps):
        raise NotImplementedError

    def _rope(self, x, pos, rotary):
        raise NotImplementedError

    def _silu_mul(self, x):
        raise NotImplementedError

    def _gelu(self, x, approximate):
        raise NotImplementedError

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        raise NotImplementedError


def attention_mask(q_pos, kv_len, Sq, Sk, causal, device):
    """bool [B, 1, Sq, Sk]: key j is visible to query row i of sequence b (the contract's rule)."""
    q_pos = q_pos.to(device=device, dtype=torch.int64)
    kv_len = kv_len.to(device=device, dtype=torch.int64)
    j = torch.arange(Sk, device=device)
    visible = j[None, None, :] < kv_len[:, None, None]  # [B, 1, Sk]
    if causal:
        row_pos = q_pos[:, None] + torch.arange(Sq, device=device)[None, :]  # [B, Sq]
        visible = visible & (j[None, None, :] <= row_pos[:, :, None])  # [B, Sq, Sk]
    else:
        visible = visible.expand(-1, Sq, -1)
    return visible[:, None]


def softmax_mask(q_pos, kv_len, Sq, Sk, causal, device):
    """The contract's attention mask made safe for a softmax kernel, and the rows the result must zero.

    Returns (keys, empty): `keys` bool [B, 1, Sq, Sk] is attention_mask's visible keys, except that a row
    with no visible key (kv_len[b] = 0: an idle or padded sequence) has every key turned on -- a softmax
    over no keys is 0/0 = NaN in every kernel, over all keys it is finite; `empty` bool [B, 1, Sq, 1]
    marks those rows, whose output the contract defines as zeros: `y.masked_fill(empty, 0)`.
    The one place this idiom lives (reference, torch, ascend, npu-sim use it)."""
    visible = attention_mask(q_pos, kv_len, Sq, Sk, causal, device)  # [B, 1, Sq, Sk]
    empty = ~visible.any(dim=-1, keepdim=True)  # [B, 1, Sq, 1]
    return visible | empty, empty


def rotary_angles(pos, rotary, dtype=torch.float64):
    """pos int64 [B, S] -> angles [B, S, rotary_dim/2] = pos * inv_freq, computed in `dtype`."""
    inv_freq = rotary.inv_freq.to(device=pos.device, dtype=dtype)
    return pos.to(dtype)[..., None] * inv_freq
