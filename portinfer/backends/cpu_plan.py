"""The cpu backend's `compile(plan)`: a traced step plan (runtime/graph.py) as one native call.

Every value of the plan gets a place: the step inputs and the KV-cache layers are slots rebound
on every run; each op's output gets a buffer, allocated once here (the plan's shape class is
fixed); views (heads of the fused qkv, a merge of heads that is a view) are offsets into the
buffer they view. Buffers are reused by liveness: once the last node that reads a buffer (or a
view of it) has run, a later output of the same byte size takes it, so a plan holds about one
layer's values, not every layer's (SmolLM2 at 256 tokens: ~250 MB -> ~12 MB). The nodes become csrc/plan.h nodes calling the same kernels as the
op path, run in order by `_cpu.Plan.run`: the GIL released once per step, the thread pool hot
across nodes, and the glue (residual adds, KV-cache writes, head merges, last-row gathers)
done natively. A plan with a node this compiler does not know, or one that fell back to another
backend, is left to the generic executor (compile returns None).

The native plan checks each node against the bytes of the buffers it names when it is added, and
each run's buffers, cache rows and per-row values before it runs (csrc/bindings.cpp, "step plans"):
a wrong offset here is a ValueError, not memory corruption.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

from ..runtime.graph import Const, PlanShapeError
from . import spec
from .cpu import _buf

# csrc/plan.h PlanOp
P_EMBEDDING, P_RMS_NORM, P_LINEAR, P_ROPE, P_SILU_MUL, P_ATTENTION, P_ADD, P_KV_WRITE, P_MERGE_HEADS, \
    P_LAST_ROWS, P_GELU, P_LAYER_NORM, P_ROWS_COPY = range(13)
_OP_NAMES = {P_EMBEDDING: "embedding", P_RMS_NORM: "rms_norm", P_LINEAR: "linear", P_ROPE: "rope",
             P_SILU_MUL: "silu_mul", P_ATTENTION: "attention", P_ADD: "add", P_KV_WRITE: "kv_cache",
             P_MERGE_HEADS: "merge_heads", P_LAST_ROWS: "last_rows", P_GELU: "gelu", P_LAYER_NORM: "layer_norm",
             P_ROWS_COPY: "head_rows"}

NONE_REF = (-1, 0, 0)
_VIRTUAL = 1 << 40  # slots of buffers before allocation (_allocate maps them to real ones)


class _Unsupported(Exception):
    pass


@dataclass
class Loc:
    """Where a value lives: slot + byte offset (+ cache: bytes per position of a cache row), and its
    shape/strides in elements."""

    slot: int
    offset: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    storage_offset: int = 0
    cache: int = 0

    @property
    def ref(self):
        return (self.slot, self.offset, self.cache)

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def contiguous(self):
        expected, size = [], 1
        for n in reversed(self.shape):
            expected.append(size)
            size *= n
        return self.cache == 0 and all(st == e or n == 1 for st, e, n in zip(self.stride, reversed(expected), self.shape))


class _Arena:
    """The memory of every compiled plan's intermediate values in this process. Plans never overlap
    (each step is one native call holding the kernel lock) and a value lives within its step, so the
    plans of every shape class, and of every model, can use the same bytes: a model's plans then take
    about its largest plan's memory, not the sum over its shape classes (16 prefill lengths of
    SmolLM2 held ~44 MiB as separate buffers). A plan needing more than the current block gets a new
    block at least twice as large; plans compiled before keep the old one (their views hold it), so
    the blocks alive sum to at most ~2x the largest."""

    def __init__(self):
        self._lock = threading.Lock()
        self._block = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._block.numel() < nbytes:
                self._block = torch.empty(max(nbytes, 2 * self._block.numel()), dtype=torch.uint8)
            return self._block


_ARENA = _Arena()


def compile_plan(plan, backend, cpu_module, dtype_code, weight_code):
    try:
        return CpuPlanExecutor(plan, backend, cpu_module, dtype_code, weight_code)
    except _Unsupported:
        return None


class CpuPlanExecutor:
    def __init__(self, plan, backend, cpu_module, dtype_code, weight_code):
        self.plan = plan
        self._dt, self._wf = dtype_code, weight_code
        self.layers = sum(1 for n in plan.nodes if n.op == "kv_cache") if plan.with_cache else 0
        self.dynamic = 4 + 2 * self.layers
        self._fixed = []  # tensors whose pointers the program holds (kept alive here)
        self._fixed_slot = {}  # id(tensor) -> slot
        self.loc = {}
        for v, meta in enumerate(plan.input_meta):
            self.loc[v] = Loc(v, 0, meta["shape"], meta["stride"], meta["dtype"])
        self.cache_meta = None
        self._virtual = []  # (shape, dtype) of each output buffer, slot _VIRTUAL + index
        pending = []  # (op, refs, ints, f)
        for node in plan.nodes:
            if node.backend is not None and node.backend is not backend:
                raise _Unsupported(f"{node.op} runs on {node.backend.name}")
            pending.extend(self._node(node))
        out = self.loc[plan.output]
        if out.slot < _VIRTUAL or out.offset or not out.contiguous():
            raise _Unsupported("the plan's output is not a buffer of its own")
        pending, self.out = self._allocate(pending, out)
        self.buffer_bytes = sum(t.numel() * t.element_size() for t in self._buffers)
        self.kernel_s = 0.0
        # kernel_s is always measured (one clock read per step); profile=True also times each native
        # node (node_seconds: the bench's per-op breakdown of the one native call)
        self.profile = False
        # fixed slots carry their bytes: add() checks every node's extent against them (csrc/bindings.cpp)
        self.program = cpu_module.Plan(self.dynamic, [_buf(t) for t in self._fixed])
        self.node_ops = []  # the plan op code of each native node
        for op, refs, ints, f in pending:
            self.program.add(op, [list(r) for r in refs], [int(i) for i in ints], float(f))
            self.node_ops.append(op)

    def reset_profile(self):
        self.kernel_s = 0.0
        self.program.clear_seconds()

    def node_seconds(self) -> dict:
        """Seconds per native node kind over the runs made with profile=True."""
        totals = {}
        for op, s in zip(self.node_ops, self.program.node_seconds()):
            name = _OP_NAMES.get(op, str(op))
            totals[name] = totals.get(name, 0.0) + s
        return totals

    # ------------------------------------------------------------ places

    def _fix(self, t: torch.Tensor) -> int:
        if id(t) not in self._fixed_slot:
            self._fixed_slot[id(t)] = self.dynamic + len(self._fixed)
            self._fixed.append(t)
        return self._fixed_slot[id(t)]

    def _const(self, a) -> Loc:
        t = a.value
        if not isinstance(t, torch.Tensor):
            raise _Unsupported(f"constant {type(t).__name__}")
        if t.device.type != "cpu":
            raise _Unsupported("a constant off the CPU")
        return Loc(self._fix(t), 0, tuple(t.shape), tuple(t.stride()), t.dtype)

    def _arg(self, a) -> Loc:
        return self._const(a) if isinstance(a, Const) else self.loc[a]

    def _new_buffer(self, meta) -> Loc:
        shape = tuple(meta["shape"])
        stride, size = [], 1
        for n in reversed(shape):
            stride.append(size)
            size *= n
        self._virtual.append((shape, meta["dtype"]))
        return Loc(_VIRTUAL + len(self._virtual) - 1, 0, shape, tuple(reversed(stride)), meta["dtype"])

    def _allocate(self, pending, out: Loc):
        """Give the output buffers real memory, reusing by liveness: a buffer is live from the first node
        that refers to it (its producer) to the last (every read, through any view, is a ref of a node),
        then its memory goes back to a free list of its byte size. An output is allocated before the
        node's inputs are released, so a node never writes over what it reads; the plan's output is
        never released. -> (pending with real slots, the output tensor)."""
        first, last = {}, {}
        for i, (_, refs, _, _) in enumerate(pending):
            for r in refs:
                if r[0] >= _VIRTUAL:
                    first.setdefault(r[0], i)
                    last[r[0]] = i
        last[out.slot] = len(pending)
        ends = {}
        for v, i in last.items():
            ends.setdefault(i, []).append(v)
        starts = {}
        for v, i in first.items():
            starts.setdefault(i, []).append(v)
        free, place = {}, {}  # place[v]: index into `spans`, a (byte offset in the arena, bytes) each
        spans, total = [], 0
        nbytes = {v: math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                  for v, (shape, dtype) in ((_VIRTUAL + k, sd) for k, sd in enumerate(self._virtual))}
        for i in range(len(pending)):
            for v in starts.get(i, ()):
                size = nbytes[v]
                if v == out.slot:  # read after the step, outside the kernel lock: memory of its own
                    place[v] = -1
                elif free.get(size):
                    place[v] = free[size].pop()
                else:
                    place[v] = len(spans)
                    spans.append((total, size))
                    total += -(-max(size, 1) // 64) * 64
            for v in ends.get(i, ()):
                if place[v] >= 0:
                    free.setdefault(nbytes[v], []).append(place[v])
        # every plan's values share one arena (_ARENA): plans run one at a time, each a whole native call
        # under the kernel lock, and a value lives within its step
        arena = _ARENA.take(total)
        output = torch.empty(max(nbytes[out.slot], 1), dtype=torch.uint8)
        self._buffers = [arena[:total], output]
        real = [self._fix(arena[o:o + max(n, 1)]) for o, n in spans]
        slot_of = {v: real[k] if k >= 0 else self._fix(output) for v, k in place.items()}
        remapped = [(op, [(slot_of[r[0]], r[1], r[2]) if r[0] >= _VIRTUAL else r for r in refs], ints, f)
                    for op, refs, ints, f in pending]
        shape, dtype = self._virtual[out.slot - _VIRTUAL]
        output = self._fixed[slot_of[out.slot] - self.dynamic][:nbytes[out.slot]].view(dtype).view(shape)
        return remapped, output

    def _view(self, node, base: Loc):
        m = node.meta
        eb = base.elem
        return Loc(base.slot, base.offset + (m["storage_offset"] - base.storage_offset) * eb, m["shape"], m["stride"],
                   m["dtype"], m["storage_offset"], base.cache)

    # ------------------------------------------------------------ nodes

    def _node(self, node):
        op, m, a = node.op, node.meta, node.args
        dt = self._dt.get(m.get("dtype"))
        if op in ("heads",) or (op in ("merge_heads", "last_rows", "head_rows") and m.get("view_of") == 0):
            self.loc[node.out] = self._view(node, self.loc[a[0]])
            return []
        if op == "kv_cache":
            return self._kv_cache(node)
        out = self.loc[node.out] = self._new_buffer(m)
        if op == "embedding":
            ids = self._arg(a[0])
            if isinstance(a[1], Const) and isinstance(a[1].value, spec.PreparedLinear):  # rows of a prepared weight
                w = a[1].value
                payload = self._const(Const(w.payload))
                from .cpu import _table_code
                return [(P_EMBEDDING, [out.ref, ids.ref, payload.ref], [ids.shape[0], w.in_features, 0, 0,
                                                                        _table_code(w), dt, w.out_features], 0.0)]
            table = self._arg(a[1])
            return [(P_EMBEDDING, [out.ref, ids.ref, table.ref], [ids.shape[0], table.shape[1], table.stride[0],
                                                                   table.elem, -1, 0, table.shape[0]], 0.0)]
        if op == "rms_norm":
            x, w = self._rows(a[0]), self._arg(a[1])
            return [(P_RMS_NORM, [out.ref, x.ref, w.ref], [x.shape[0], x.shape[1], x.stride[0], dt], a[2].value)]
        if op == "layer_norm":
            x, w, b = self._rows(a[0]), self._arg(a[1]), self._arg(a[2])
            return [(P_LAYER_NORM, [out.ref, x.ref, w.ref, b.ref], [x.shape[0], x.shape[1], x.stride[0], dt],
                     a[3].value)]
        if op == "linear":
            from . import cpu
            x, w = self._rows(a[0]), a[1].value
            bias = NONE_REF if a[2].value is None else self._arg(a[2]).ref
            payload = self._const(Const(w.payload))
            # weights repacked for the int8 route take its kernel (csrc/plan.cpp: i[6] = the route's int8 mode,
            # 1 or 2, i[5] its format)
            int8 = w.extra.get("int8_mode", 1) if w.extra.get("layout") == cpu._INT8_LAYOUT else 0
            code = cpu._INT8_FORMATS[w.format] if int8 else self._wf[w.format]
            return [(P_LINEAR, [out.ref, x.ref, payload.ref, bias],
                     [x.shape[0], w.out_features, x.shape[1], x.stride[0], dt, code, int(int8)], 0.0)]
        if op == "rope":
            x, pos, rotary = self._arg(a[0]), self._arg(a[1]), a[2].value
            inv_freq = self._const(Const(rotary.inv_freq.to(device="cpu", dtype=torch.float64).contiguous()))
            B, H, S, D = x.shape
            if x.cache:
                raise _Unsupported("rope of cache rows")
            return [(P_ROPE, [out.ref, x.ref, pos.ref, inv_freq.ref],
                     [B, H, S, D, rotary.rotary_dim, x.stride[0], x.stride[1], x.stride[2],
                      int(rotary.style == "interleaved"), dt], 0.0)]
        if op == "silu_mul":
            x = self._rows(a[0])
            return [(P_SILU_MUL, [out.ref, x.ref], [x.shape[0], x.shape[1] // 2, x.stride[0], dt], 0.0)]
        if op == "gelu":
            x = self._arg(a[0])
            if len(x.shape) != 2 or x.cache:
                raise _Unsupported("gelu of a non-2-D value")
            return [(P_GELU, [out.ref, x.ref], [x.shape[0], x.shape[1], x.stride[0], int(a[1].value == "tanh"), dt],
                     0.0)]
        if op == "attention":
            q, k, v, q_pos, kv_len = (self._arg(x) for x in a[:5])
            causal, scale = a[5].value, a[6].value
            B, Hq, Sq, D = q.shape
            if k.dtype != v.dtype:
                raise _Unsupported("keys and values of different dtypes")
            # i[17]: the keys' and values' dtype (a KV cache's may differ from the activations')
            return [(P_ATTENTION, [out.ref, q.ref, k.ref, v.ref, q_pos.ref, kv_len.ref],
                     [B, Hq, k.shape[1], Sq, k.shape[2], D, *q.stride[:3], *k.stride[:3], *v.stride[:3], int(causal), dt,
                      self._dt[k.dtype]], scale)]
        if op == "add":
            x, y = self._arg(a[0]), self._arg(a[1])
            if not (x.contiguous() and y.contiguous() and x.shape == y.shape == out.shape):
                raise _Unsupported("add of non-contiguous values")
            return [(P_ADD, [out.ref, x.ref, y.ref], [out.shape[0] * out.shape[1], dt], 0.0)]
        if op == "merge_heads":
            x = self._arg(a[0])
            if not x.contiguous():
                raise _Unsupported("merge_heads of a non-contiguous value")
            B, H, S, D = x.shape
            return [(P_MERGE_HEADS, [out.ref, x.ref], [B, H, S, D, x.elem], 0.0)]
        if op == "head_rows":  # heads start..start+count of each token's fused projection, as rows [M*count, D]
            x, start, count = self._rows(a[0]), a[1].value, a[2].value
            D = out.shape[1]
            src = Loc(x.slot, x.offset + start * D * x.elem, (x.shape[0], count * D), (x.stride[0], 1), x.dtype)
            return [(P_ROWS_COPY, [out.ref, src.ref], [x.shape[0], count * D, x.stride[0], x.elem], 0.0)]
        if op == "last_rows":
            x = self._arg(a[0])
            if not x.contiguous():
                raise _Unsupported("last_rows of a non-contiguous value")
            return [(P_LAST_ROWS, [out.ref, x.ref, self.loc[2].ref, self.loc[3].ref],
                     [self.plan.B, self.plan.S, x.shape[1], x.elem], 0.0)]
        raise _Unsupported(f"node {op}")

    def _rows(self, a) -> Loc:
        x = self._arg(a)
        if len(x.shape) != 2 or x.cache or (x.shape[1] > 1 and x.stride[1] != 1):
            raise _Unsupported("a 2-D operand without unit-stride rows")
        return x

    def _kv_cache(self, node):
        layer, k, v = node.args[0].value, self.loc[node.args[1]], self.loc[node.args[2]]
        if not self.plan.with_cache:  # a full forward: the keys are the step's own
            self.loc[node.out], self.loc[node.out + 1] = k, v
            return []
        B, Hkv, S, D = k.shape
        # the cache's own dtype (load's kv_cache_dtype): written converted, and attention reads it as it is
        # (the fused equivalent of the op path's converted copy of the rows: graph.cache_rows)
        cache_dtype = node.meta.get("cache_dtype", k.dtype)
        if cache_dtype not in self._dt:
            raise _Unsupported(f"a {cache_dtype} KV cache")
        self.cache_meta = (Hkv, D, cache_dtype)
        row_bytes = Hkv * D * cache_dtype.itemsize  # per position; x T for one cache row
        shape = (B, Hkv, 0, D)  # the key count is the run's T (csrc/plan.cpp sets strides from it)
        ck = Loc(4 + layer, 0, shape, (0, 0, D, 1), cache_dtype, 0, row_bytes)
        cv = Loc(4 + self.layers + layer, 0, shape, (0, 0, D, 1), cache_dtype, 0, row_bytes)
        self.loc[node.out], self.loc[node.out + 1] = ck, cv
        if v.cache or k.cache:
            raise _Unsupported("kv write from cache rows")
        return [(P_KV_WRITE, [ck.ref, cv.ref, k.ref, v.ref, self.loc[2].ref, self.loc[3].ref],
                 [B, Hkv, S, D, *k.stride[:3], *v.stride[:3], self._dt[k.dtype], self._dt[cache_dtype]], 0.0)]

    # ------------------------------------------------------------ running

    def run(self, inputs):
        self.plan.check(inputs)
        # (pointer, bytes) of every buffer rebound per run: run() checks them, and the ids / q_pos / kv_len
        # values, against what the nodes need (csrc/bindings.cpp, "step plans"). The kernels read these
        # tensors as contiguous, so their own nbytes is the extent (cheaper than the storage's size).
        ptrs = [(t.data_ptr(), t.nbytes) for t in (inputs.ids, inputs.pos, inputs.q_pos, inputs.kv_len)]
        row0, T = 0, 0
        cache = inputs.cache
        if cache is not None:
            Hkv, D, dtype = self.cache_meta
            k0 = cache.k[0]
            if (len(cache.k) != self.layers or len(cache.v) != self.layers or k0.dtype != dtype
                    or tuple(k0.shape[1:2]) + tuple(k0.shape[3:]) != (Hkv, D) or not k0.is_contiguous()):
                raise PlanShapeError(f"cache: expected {self.layers} layers of contiguous {spec.dtype_name(dtype)} "
                                     f"[rows, {Hkv}, T, {D}], got {len(cache.k)} of {k0.dtype} {list(k0.shape)}")
            ptrs += cache.layer_buffers()
            row0, T = inputs.rows.start or 0, cache.max_len
        t0 = time.perf_counter()
        self.program.run(ptrs, row0, T, self.profile)
        self.kernel_s += time.perf_counter() - t0  # the whole native step (bench model's breakdown)
        self.plan.runs += 1
        # a copy the caller owns (the buffer is the next run's): numpy's memcpy, one thread, where torch's
        # clone of a vocabulary of logits wakes its intra-op pool
        return torch.from_numpy(self.out.numpy().copy()) if self.out.dtype != torch.bfloat16 else self.out.clone()
