"""Placement: which backend runs each op of a model, and what happens when one can't.

The model calls ops on a Placement (`placement.rms_norm(x, w, eps)`), never on a backend.
Each call goes to the chosen backend; if its `supports` says no (an op it lacks, a dtype,
a head_dim...), the call falls back along the chain: the `torch` backend on the same
device, then `torch` on the CPU. When the backend that runs an op lives in another memory
than the chosen one (`Backend.memory`: a torch device, or a backend's own memory space such
as npu-sim's), its inputs cross through the backends' copy hooks and the output crosses
back; the bytes are counted. Policy: "allow" (silent), "warn" (default: one warning per op and
backend), "error" (strict: `require` refuses before anything runs, listing missing ops).

`report()` says, per op and backend, the calls, the reason for any fallback and the bytes
that crossed devices.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from . import spec
from .base import Backend
from .spec import OPS, PreparedLinear, UnsupportedOpError

POLICIES = ("allow", "warn", "error")


class FallbackError(RuntimeError):
    """fallback="error" and the chosen backend does not support an op the model needs."""


class FallbackWarning(UserWarning):
    pass


@dataclass
class OpRecord:
    op: str
    backend: str
    device: str
    calls: int = 0
    bytes_copied: int = 0
    reason: str = ""  # why this op ran here rather than on the chosen backend ("" = chosen)

    def as_dict(self):
        return dict(self.__dict__)


@dataclass
class PlacementReport:
    backend: str
    device: str
    dtype: str
    fallback: str
    rows: list = field(default_factory=list)

    @property
    def bytes_copied(self) -> int:
        return sum(r.bytes_copied for r in self.rows)

    @property
    def fell_back(self) -> list:
        return [r for r in self.rows if r.reason]

    def as_dict(self):
        return {"backend": self.backend, "device": self.device, "dtype": self.dtype, "fallback": self.fallback,
                "bytes_copied": self.bytes_copied, "ops": [r.as_dict() for r in self.rows]}

    def __str__(self):
        head = f"placement: backend={self.backend} device={self.device} dtype={self.dtype} fallback={self.fallback}"
        lines = [head, f"{'op':<12} {'backend':<12} {'device':<8} {'calls':>7} {'bytes copied':>13}  why"]
        for r in self.rows:
            lines.append(f"{r.op:<12} {r.backend:<12} {r.device:<8} {r.calls:>7} {r.bytes_copied:>13}  "
                         f"{r.reason or 'chosen backend'}")
        return "\n".join(lines)


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class Placement:
    def __init__(self, backend: Backend, dtype=torch.float32, fallback: str = "warn"):
        if fallback not in POLICIES:
            raise ValueError(f"fallback: expected one of {', '.join(POLICIES)}, got {fallback!r}")
        self.primary = backend
        self.dtype = spec.parse_dtype(dtype)
        self.policy = fallback
        self._chain = None
        self._records: dict = {}
        self._warned = set()
        self.last_backend, self.last_copied = None, 0  # the latest op's backend and bytes (step plans record them)
        self.plans = []  # step plans built on this placement: their runs count in report()

    # ------------------------------------------------------------ the fallback chain

    @property
    def chain(self) -> list[Backend]:
        if self._chain is None:
            from .torch_backend import TorchBackend
            chain = [self.primary]
            if self.primary.name != "torch":
                chain.append(TorchBackend(self.primary.device))
            if self.primary.device.type != "cpu":
                chain.append(TorchBackend("cpu"))
            self._chain = chain
        return self._chain

    @property
    def device(self):
        return self.primary.device

    def missing_ops(self, ops=OPS, **meta) -> list[str]:
        """Ops the chosen backend does not support for this dtype (and meta)."""
        return [op for op in ops if not self.primary.supports(op, dtype=self.dtype, **meta)]

    def require(self, ops=OPS, **meta):
        """Call at load: under fallback="error", refuse before running if any op would fall back."""
        missing = self.missing_ops(ops, **meta)
        if missing and self.policy == "error":
            raise FallbackError(
                f"backend {self.primary.name!r} does not support {', '.join(missing)} for dtype "
                f"{spec.dtype_name(self.dtype)}, and fallback='error' forbids running them elsewhere; "
                f"use fallback='warn' or 'allow', another dtype, or implement those ops")
        return missing

    def _record(self, op, backend, reason, copied):
        self.last_backend, self.last_copied = backend, copied
        key = (op, backend)  # one row per op and backend instance of the chain (the hot path: no strings)
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = OpRecord(op, backend.name, str(backend.device), reason=reason)
        rec.calls += 1
        rec.bytes_copied += copied
        if reason and self.policy == "warn" and key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{op} falls back to {backend.name} on {backend.device}: {reason}", FallbackWarning,
                          stacklevel=4)

    def _refuse(self, op, reason):
        if self.policy == "error":
            raise FallbackError(f"{op}: {reason}, and fallback='error' forbids running it elsewhere")

    # ------------------------------------------------------------ dispatch

    @staticmethod
    def _transfer(value, src: Backend, dst: Backend):
        """Move a tensor from src's memory into dst's through their copy hooks; (value, bytes copied).

        Bytes count only when a copy was made (a CPU-resident q_pos passed to a CPU fallback
        is not copied, whatever memory the chosen backend has)."""
        if src is dst or not isinstance(value, torch.Tensor) or src.memory == dst.memory:
            return value, 0
        moved = dst.copy_to_memory(src.copy_from_memory(value, dst.device))
        return moved, (_nbytes(value) if moved is not value else 0)

    def _call(self, op, args, kwargs):
        reason = ""
        for backend in self.chain:
            moved = [self._transfer(a, self.primary, backend) for a in args]
            args_b = [m[0] for m in moved]
            copied = sum(m[1] for m in moved)
            try:
                out = getattr(backend, op)(*args_b, **kwargs)
            except UnsupportedOpError as exc:
                reason = reason or str(exc)
                self._refuse(op, reason)
                continue
            out, back = self._transfer(out, backend, self.primary)
            self._record(op, backend, reason, copied + back)
            return out
        raise UnsupportedOpError(f"{op}: no backend in the chain {[b.name for b in self.chain]} supports it: {reason}")

    def prepare_linear(self, weight) -> PreparedLinear:
        fmt = spec.weight_format(weight)
        reason = ""
        for backend in self.chain:
            if backend.supports("linear", dtype=self.dtype, weight_format=fmt):
                if reason:
                    self._refuse("linear", reason)
                return backend.prepare_linear(weight, self.dtype)
            reason = reason or (f"backend {backend.name!r} does not support linear with "
                                f"{spec.dtype_name(self.dtype)} activations and {fmt} weights")
        raise UnsupportedOpError(f"linear: no backend supports {fmt} weights with {spec.dtype_name(self.dtype)}")

    def linear(self, x, w: PreparedLinear, bias=None):
        backend = next((b for b in self.chain if b.name == w.backend), None)
        if backend is None:
            raise ValueError(f"w: prepared by backend {w.backend!r}, which is not in this placement's chain")
        x, copied = self._transfer(x, self.primary, backend)
        bias, copied_bias = self._transfer(bias, self.primary, backend)
        out = backend.linear(x, w, bias)
        out, copied_out = self._transfer(out, backend, self.primary)
        copied += copied_bias + copied_out
        reason = "" if backend is self.primary else f"backend {self.primary.name!r} does not support this linear"
        self._record("linear", backend, reason, copied)
        return out

    def embedding(self, ids, table):
        return self._call("embedding", (ids, table), {})

    def rms_norm(self, x, weight, eps):
        return self._call("rms_norm", (x, weight, eps), {})

    def layer_norm(self, x, weight, bias, eps):
        return self._call("layer_norm", (x, weight, bias, eps), {})

    def rope(self, x, pos, rotary):
        return self._call("rope", (x, pos, rotary), {})

    def silu_mul(self, x):
        return self._call("silu_mul", (x,), {})

    def gelu(self, x, approximate="none"):
        return self._call("gelu", (x, approximate), {})

    def attention(self, q, k, v, q_pos, kv_len, causal=True, scale=None):
        return self._call("attention", (q, k, v, q_pos, kv_len, causal, scale), {})

    # ------------------------------------------------------------ report

    def retire_plan(self, plan):
        """A plan dropped from the decoder's cache: its runs stay counted in the records."""
        for (op, backend), per_run in plan.op_counts().items():
            rec = self._records.get((op, backend))
            if rec is not None:
                rec.calls += per_run * plan.runs
                rec.bytes_copied += plan.bytes_per_run.get((op, backend), 0) * plan.runs
        self.plans.remove(plan)

    def report(self) -> PlacementReport:
        records = {key: OpRecord(**r.as_dict()) for key, r in self._records.items()}
        for plan in self.plans:  # a plan's ops are placed once, when traced; each run counts here
            for (op, backend), per_run in plan.op_counts().items():
                if plan.runs and (op, backend) in records:
                    records[(op, backend)].calls += per_run * plan.runs
                    records[(op, backend)].bytes_copied += plan.bytes_per_run.get((op, backend), 0) * plan.runs
        rows = sorted(records.values(), key=lambda r: (OPS.index(r.op) if r.op in OPS else 99, r.backend))
        return PlacementReport(self.primary.name, str(self.primary.device), spec.dtype_name(self.dtype), self.policy,
                               rows)
