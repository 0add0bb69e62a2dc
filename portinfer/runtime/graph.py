"""One step of a model, written once, run two ways: the op path and step plans.

The decoder writes its step against an op interface `g` (`Decoder.step_graph(g)`): the contract's
ops (g.embedding, g.rms_norm, g.linear, g.rope, g.attention, g.silu_mul, ...) plus a few glue
calls (g.add, g.heads, g.merge_heads, g.kv_cache, g.last_rows; and, for a model split over ranks
(runtime/parallel.py), g.vocab_ids, g.all_reduce and g.all_gather_vocab around the collectives of its
parallel.Group: glue nodes in a plan like any other). Two implementations:

- `EagerOps`: the op path. Every contract op goes through the Placement now (validated, placed,
  recorded); glue is plain torch. The reference execution.
- `Tracer`: the same, and it records what ran into a `Plan` (nodes over numbered values). A plan
  is built by tracing one real step of its shape class, so validation and placement happen
  exactly once, when it is built, and that first step's result is the op path's own.

A `Plan` runs through its backend's `compile(plan)` when the backend has one (the cpu backend: the
whole step in one native call), else through `GenericExecutor`: pre-bound kernel calls (each
backend's unvalidated `_op` method), no per-call validation or placement. Per-call values
(ids, positions, q_pos, kv_len, the cache rows) come in a `StepInputs` checked once per step by
the engine.

Shape class: (rows B, tokens per row S, all_rows). A plan checks the shape it is given and
refuses any other (`PlanShapeError`), so it never computes on buffers of another shape.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends import spec


class PlanShapeError(ValueError):
    """A plan was asked to run a shape other than the one it was built for."""


@dataclass
class StepInputs:
    """Per-call values of one step over rows of a KV cache.

    ids int64 [B*S] (right-padded rows, flattened), pos int64 [B, S] (each token's position),
    q_pos int32 [B] (the row's first new position), kv_len int32 [B] (= q_pos + new tokens),
    n_new: host list of new tokens per row, filled: host list of positions already filled.
    cache: a KVCache or None (a full forward: keys are the step's own); rows: the cache rows (a slice).
    """

    B: int
    S: int
    ids: torch.Tensor
    pos: torch.Tensor
    q_pos: torch.Tensor
    kv_len: torch.Tensor
    n_new: list
    filled: list
    cache: object = None
    rows: slice = None
    kv_max: int = 0  # the longest kv_len: keys past it are never visible

    @classmethod
    def build(cls, ids2d: torch.Tensor, n_new, filled, cache, rows, device):
        B, S = ids2d.shape
        # numpy, wrapped without a copy: each torch op here costs more than the arithmetic, and right
        # after a step has streamed the weights through the caches a cold torch op costs ~10x a warm one
        start = np.asarray(filled, dtype=np.int64)
        end = start + np.asarray(n_new, dtype=np.int64)
        pos = torch.from_numpy(start[:, None] + np.arange(S, dtype=np.int64)[None, :])  # [B, S]
        q_pos, kv_len = torch.from_numpy(start.astype(np.int32)), torch.from_numpy(end.astype(np.int32))
        ids = ids2d.reshape(-1)
        if device.type != "cpu":
            ids, pos, q_pos, kv_len = (t.to(device) for t in (ids, pos, q_pos, kv_len))
        return cls(B, S, ids, pos, q_pos, kv_len, list(n_new), list(filled), cache, rows, int(end.max()))


# ---------------------------------------------------------------------------- glue shared by both paths


def heads(qkv, B, S, start, count, D):
    """[B*S, n*D] fused projection -> the view [B, count, S, D] of heads start..start+count."""
    return qkv.view(B, S, -1, D)[:, :, start:start + count].transpose(1, 2)


def head_rows(qkv, B, S, start, count, D):
    """[B*S, n*D] fused projection -> heads start..start+count as rows [B*S*count, D], one copy (the heads
    are strided in qkv; an op over each head, Qwen3's q/k rms_norm, takes 2-D rows)."""
    return qkv.view(B, S, -1, D)[:, :, start:start + count].reshape(B * S * count, D)


def merge_heads(a, B, S):
    """[B, H, S, D] -> [B*S, H*D] (a view when S = 1, else one copy)."""
    return a.transpose(1, 2).reshape(B * S, -1)


def write_cache(cache_k, cache_v, k, v, n_new, filled):
    """Write each row's new keys/values (only its n_new real tokens: padding never touches the
    cache) at positions filled[b]... of its cache row. cache_*: [B, Hkv, T, D]; k, v: [B, Hkv, S, D]."""
    for b, (n, at) in enumerate(zip(n_new, filled)):
        if n:
            cache_k[b, :, at:at + n] = k[b, :, :n]
            cache_v[b, :, at:at + n] = v[b, :, :n]


def cache_rows(cache_k, cache_v, kv_max, dtype):
    """The cache rows attention reads (their first kv_max positions), in the activation dtype: a
    cache of another dtype (load's kv_cache_dtype) is read back converted (exactly, from fp16/bf16)."""
    k, v = cache_k[:, :, :kv_max], cache_v[:, :, :kv_max]
    if k.dtype != dtype:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


def vocab_ids(ids, shard):
    """Token ids -> row numbers in this rank's vocabulary slice; ids of other ranks' slices -> the
    extra zero row after it (so their embedding here is zeros, and the all-reduce sums one row)."""
    local = ids - shard.vocab_start
    return torch.where((local >= 0) & (local < shard.local_vocab), local, shard.local_vocab)


def last_rows(x, B, S, n_new, device):
    """[B*S, H] -> [B, H]: each row's last new token (a padded row of 0 new tokens gives row 0)."""
    if S == 1:
        return x
    last = torch.tensor([max(n, 1) - 1 for n in n_new], device=device)
    return x.view(B, S, -1)[torch.arange(B, device=device), last]


# ---------------------------------------------------------------------------- the op path


class EagerOps:
    """The op interface on the op path: contract ops through the Placement, glue in torch."""

    def __init__(self, placement, inputs: StepInputs, head_dim: int):
        self.placement = placement
        self.inp = inputs
        self.D = head_dim
        self.device = placement.device
        self.finite = []  # per layer: a 0-d bool tensor (is the residual stream finite?)

    # step inputs
    @property
    def ids(self):
        return self.inp.ids

    @property
    def pos(self):
        return self.inp.pos

    @property
    def q_pos(self):
        return self.inp.q_pos

    @property
    def kv_len(self):
        return self.inp.kv_len

    # contract ops
    def embedding(self, ids, table):
        return self.placement.embedding(ids, table)

    def rms_norm(self, x, w, eps):
        return self.placement.rms_norm(x, w, eps)

    def layer_norm(self, x, w, b, eps):
        return self.placement.layer_norm(x, w, b, eps)

    def linear(self, x, w, bias=None):
        return self.placement.linear(x, w, bias)

    def rope(self, x, pos, rotary):
        return self.placement.rope(x, pos, rotary)

    def silu_mul(self, x):
        return self.placement.silu_mul(x)

    def gelu(self, x, approximate="none"):
        return self.placement.gelu(x, approximate)

    def attention(self, q, k, v, q_pos, kv_len, causal, scale):
        return self.placement.attention(q, k, v, q_pos, kv_len, causal, float(scale))

    # glue
    def add(self, x, y):
        return x + y

    def heads(self, qkv, start, count):
        return heads(qkv, self.inp.B, self.inp.S, start, count, self.D)

    def head_rows(self, qkv, start, count):
        return head_rows(qkv, self.inp.B, self.inp.S, start, count, self.D)

    def merge_heads(self, a):
        return merge_heads(a, self.inp.B, self.inp.S)

    def kv_cache(self, layer, k, v):
        """Write this step's keys/values into the cache rows; -> the keys/values to attend to."""
        inp = self.inp
        if inp.cache is None:
            return k, v
        ck, cv = inp.cache.k[layer][inp.rows], inp.cache.v[layer][inp.rows]
        write_cache(ck, cv, k, v, inp.n_new, inp.filled)
        return cache_rows(ck, cv, inp.kv_max, k.dtype)

    def last_rows(self, x):
        return last_rows(x, self.inp.B, self.inp.S, self.inp.n_new, self.device)

    def layer_done(self, layer, x):
        self.finite.append(torch.isfinite(x).all())

    # tensor parallelism (runtime/parallel.py): glue around the collectives of a parallel.Group
    def vocab_ids(self, ids, shard):
        return vocab_ids(ids, shard)

    def all_reduce(self, x, group):
        """Sum x over the ranks (in place: returns x)."""
        return group.all_reduce(x)

    def all_gather_vocab(self, logits, group, shard):
        """[M, this rank's vocabulary] -> [M, V]."""
        return group.all_gather_vocab(logits, shard)


# ---------------------------------------------------------------------------- plans


@dataclass
class Node:
    """One call of a plan: `op` is a contract op (run by `backend`) or a glue name; `args` are
    value numbers (int: the output of an earlier node or a step input) or constants (Const);
    `out` the value number it defines. `ran_on` and `bytes_copied` feed the placement report."""

    op: str
    args: tuple
    out: int
    backend: object = None  # the backend that runs a contract op (None: glue)
    meta: dict = field(default_factory=dict)  # shapes/strides/dtype of the output (for compilers)


@dataclass(frozen=True)
class Const:
    value: object


# step inputs are the first value numbers of every plan
INPUTS = ("ids", "pos", "q_pos", "kv_len")


@dataclass
class Plan:
    """A step of one shape class, recorded: nodes over numbered values (see Node)."""

    B: int
    S: int
    all_rows: bool
    with_cache: bool
    nodes: list
    output: int
    num_values: int
    placement: object  # the Placement it was traced on (its primary: the chosen backend)
    head_dim: int
    layer_outputs: list = field(default_factory=list)  # value numbers of each layer's residual stream
    input_meta: list = field(default_factory=list)  # _describe of the step inputs (values 0..3)
    runs: int = 0

    @property
    def key(self):
        return (self.B, self.S, self.all_rows, self.with_cache)

    def check(self, inputs: StepInputs):
        if (inputs.B, inputs.S) != (self.B, self.S) or (inputs.cache is not None) != self.with_cache:
            raise PlanShapeError(
                f"plan: built for {self.B} rows x {self.S} tokens ({'with' if self.with_cache else 'without'} a "
                f"cache), asked to run {inputs.B} x {inputs.S} ({'with' if inputs.cache is not None else 'without'} "
                f"a cache); get the plan for this shape from Decoder.plan_for")

    def op_counts(self):
        """{(op, backend): calls per run} of the contract ops, for the placement report."""
        counts = {}
        for n in self.nodes:
            if n.backend is not None:
                counts[(n.op, n.backend)] = counts.get((n.op, n.backend), 0) + 1
        return counts

    @property
    def bytes_per_run(self):
        """{(op, backend): bytes copied between memories per run}."""
        copied = {}
        for n in self.nodes:
            if n.backend is not None and n.meta.get("bytes_copied"):
                copied[(n.op, n.backend)] = copied.get((n.op, n.backend), 0) + n.meta["bytes_copied"]
        return copied


def _describe(t):
    if isinstance(t, torch.Tensor):
        return {"shape": tuple(t.shape), "stride": tuple(t.stride()), "dtype": t.dtype,
                "storage_offset": t.storage_offset()}
    return {}


def describe_inputs(inputs: StepInputs):
    """The meta (_describe) of the step inputs, values 0..3 of every plan."""
    return [_describe(getattr(inputs, name)) for name in INPUTS]


class Tracer(EagerOps):
    """Runs a step on the op path and records it as a Plan."""

    def __init__(self, placement, inputs: StepInputs, head_dim: int, all_rows: bool):
        super().__init__(placement, inputs, head_dim)
        self.all_rows = all_rows
        self.nodes = []
        self.values = {}  # id(tensor) -> value number
        self.keep = []  # every traced tensor stays alive while tracing, so no id is reused
        for name in INPUTS:
            self._define(getattr(inputs, name))
        self.layer_outputs = []

    def _define(self, t):
        number = len(self.keep)
        self.keep.append(t)
        self.values[id(t)] = number
        return number

    def _arg(self, a):
        if isinstance(a, torch.Tensor) and id(a) in self.values:
            return self.values[id(a)]
        return Const(a)

    def _record(self, op, args, out, backend=None):
        node = Node(op, tuple(self._arg(a) for a in args), self._define(out), backend, _describe(out))
        if backend is None:  # glue: say which argument the output is a view of, if any (compilers alias it)
            storage = out.untyped_storage().data_ptr()
            node.meta["view_of"] = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                                         and a.untyped_storage().data_ptr() == storage), None)
        self.nodes.append(node)
        return out

    def _contract(self, op, args):
        out = getattr(self.placement, op)(*args)
        self._record(op, args, out, self.placement.last_backend)
        self.nodes[-1].meta["bytes_copied"] = self.placement.last_copied
        return out

    def embedding(self, ids, table):
        return self._contract("embedding", (ids, table))

    def rms_norm(self, x, w, eps):
        return self._contract("rms_norm", (x, w, float(eps)))

    def layer_norm(self, x, w, b, eps):
        return self._contract("layer_norm", (x, w, b, float(eps)))

    def linear(self, x, w, bias=None):
        return self._contract("linear", (x, w, bias))

    def rope(self, x, pos, rotary):
        return self._contract("rope", (x, pos, rotary))

    def silu_mul(self, x):
        return self._contract("silu_mul", (x,))

    def gelu(self, x, approximate="none"):
        return self._contract("gelu", (x, approximate))

    def attention(self, q, k, v, q_pos, kv_len, causal, scale):
        return self._contract("attention", (q, k, v, q_pos, kv_len, bool(causal), float(scale)))

    def add(self, x, y):
        return self._record("add", (x, y), super().add(x, y))

    def heads(self, qkv, start, count):
        return self._record("heads", (qkv, start, count), super().heads(qkv, start, count))

    def head_rows(self, qkv, start, count):
        return self._record("head_rows", (qkv, start, count), super().head_rows(qkv, start, count))

    def merge_heads(self, a):
        return self._record("merge_heads", (a,), super().merge_heads(a))

    def kv_cache(self, layer, k, v):
        ck, cv = super().kv_cache(layer, k, v)
        # one node defines both outputs: the keys (out) and the values (out + 1)
        cache = self.inp.cache
        self.nodes.append(Node("kv_cache", (Const(layer), self._arg(k), self._arg(v)), self._define(ck), None,
                               {"keys": _describe(ck), "cache_dtype": cache.k[layer].dtype if cache else k.dtype}))
        self._define(cv)
        return ck, cv

    def last_rows(self, x):
        return self._record("last_rows", (x,), super().last_rows(x))

    def vocab_ids(self, ids, shard):
        return self._record("vocab_ids", (ids, shard), super().vocab_ids(ids, shard))

    def all_reduce(self, x, group):
        return self._record("all_reduce", (x, group), super().all_reduce(x, group))

    def all_gather_vocab(self, logits, group, shard):
        return self._record("all_gather_vocab", (logits, group, shard), super().all_gather_vocab(logits, group, shard))

    def layer_done(self, layer, x):
        super().layer_done(layer, x)
        self.layer_outputs.append(self.values[id(x)])

    def plan(self, output) -> Plan:
        inp = self.inp
        return Plan(inp.B, inp.S, self.all_rows, inp.cache is not None, self.nodes, self.values[id(output)],
                    len(self.keep), self.placement, self.D, self.layer_outputs, describe_inputs(inp))


class GenericExecutor:
    """Runs a Plan with pre-bound calls: each contract op straight into the backend's `_op`
    implementation (validated once, when the plan was traced), glue as plain torch."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.placement = plan.placement
        self.D = plan.head_dim
        self.steps = [self._bind(n) for n in plan.nodes]
        # profiling (bench model's step breakdown): seconds inside contract-op kernels, when on
        self.profile = False
        self.kernel_s = 0.0
        self._is_op = [n.backend is not None for n in plan.nodes]

    def _bind(self, node: Node):
        slots = tuple(a if isinstance(a, int) else None for a in node.args)
        consts = tuple(a.value if isinstance(a, Const) else None for a in node.args)
        if node.backend is not None:
            fn = getattr(node.backend, "_" + node.op)
            if node.backend.memory != self.placement.primary.memory:
                fn = self._across_memories(fn, node.backend)
        elif node.op == "kv_cache":
            return self._kv_cache, slots, consts, node.out, True
        else:
            fn = getattr(self, "_glue_" + node.op)
        return fn, slots, consts, node.out, False

    def _across_memories(self, fn, backend):
        primary, move = self.placement.primary, self.placement._transfer

        def call(*args):
            args = [move(a, primary, backend)[0] for a in args]
            return move(fn(*args), backend, primary)[0]
        return call

    # glue (the same functions the op path uses)
    def _glue_add(self, x, y):
        return x + y

    def _glue_heads(self, qkv, start, count):
        return heads(qkv, self.inp.B, self.inp.S, start, count, self.D)

    def _glue_head_rows(self, qkv, start, count):
        return head_rows(qkv, self.inp.B, self.inp.S, start, count, self.D)

    def _glue_merge_heads(self, a):
        return merge_heads(a, self.inp.B, self.inp.S)

    def _glue_last_rows(self, x):
        return last_rows(x, self.inp.B, self.inp.S, self.inp.n_new, x.device)

    def _glue_vocab_ids(self, ids, shard):
        return vocab_ids(ids, shard)

    def _glue_all_reduce(self, x, group):
        return group.all_reduce(x)

    def _glue_all_gather_vocab(self, logits, group, shard):
        return group.all_gather_vocab(logits, shard)

    def _kv_cache(self, layer, k, v):
        inp = self.inp
        if inp.cache is None:
            return k, v
        ck, cv = inp.cache.k[layer][inp.rows], inp.cache.v[layer][inp.rows]
        if inp.S == 1 and all(inp.n_new):  # (a captured graph always takes this branch: n_new is all 1)
            # decode: one indexed write per tensor instead of one per row
            ck[self._rows_index, :, self._at_index] = k[:, :, 0].to(ck.dtype)
            cv[self._rows_index, :, self._at_index] = v[:, :, 0].to(cv.dtype)
        else:
            write_cache(ck, cv, k, v, inp.n_new, inp.filled)
        return cache_rows(ck, cv, inp.kv_max, k.dtype)

    def run(self, inputs: StepInputs):
        self.plan.check(inputs)
        self.inp = inputs
        if inputs.cache is not None and inputs.S == 1:
            device = inputs.ids.device
            self._rows_index = torch.arange(inputs.B, device=device)
            # an idle row of a captured graph writes at its next position; a full row never decodes
            self._at_index = inputs.q_pos.to(torch.int64).clamp(max=inputs.cache.max_len - 1)
        env = [None] * self.plan.num_values
        env[0], env[1], env[2], env[3] = inputs.ids, inputs.pos, inputs.q_pos, inputs.kv_len
        if self.profile:
            return self._run_profiled(env)
        for fn, slots, consts, out, pair in self.steps:
            result = fn(*[env[s] if s is not None else c for s, c in zip(slots, consts)])
            if pair:
                env[out], env[out + 1] = result
            else:
                env[out] = result
        self.plan.runs += 1
        self._env = env  # kept until the next run: layer_flags reads it when the logits are not finite
        return env[self.plan.output]

    def _run_profiled(self, env):
        sync = torch.cuda.synchronize if self.placement.device.type == "cuda" else (lambda: None)
        for (fn, slots, consts, out, pair), is_op in zip(self.steps, self._is_op):
            args = [env[s] if s is not None else c for s, c in zip(slots, consts)]
            t0 = time.perf_counter()
            result = fn(*args)
            if is_op:
                sync()
                self.kernel_s += time.perf_counter() - t0
            if pair:
                env[out], env[out + 1] = result
            else:
                env[out] = result
        self.plan.runs += 1
        self._env = env
        return env[self.plan.output]

    def layer_flags(self):
        """Per layer of the last run: is the residual stream finite? (0-d bool tensors)"""
        return [torch.isfinite(self._env[i]).all() for i in self.plan.layer_outputs]


class _ReplayByRerun:
    """Stands in for torch.cuda.CUDAGraph where there is no GPU (tests): `capture` remembers the
    function, `replay` runs it again on the same static buffers, which is what a graph replay does."""

    def __init__(self):
        self.fn = None

    def capture(self, fn):
        self.fn = fn
        return fn()

    def replay(self):
        self.fn()


class _CudaGraph:
    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: autotuning, allocator pools
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            out = fn()
        return out

    def replay(self):
        self.graph.replay()


class GraphExecutor:
    """Decode steps (S = 1, with a cache) replayed from a captured CUDA graph, one per cache and
    first row; other shapes run on the generic executor. A graph needs static buffers: the step
    inputs are copied into buffers captured once, keys are read up to the cache's full length
    (kv_len masks the rest, so the result is the same), and every row writes its key slot (an
    idle row writes at its own next position, which no query sees before a real write replaces it)."""

    def __init__(self, plan: Plan, graph_factory=None):
        self.plan = plan
        self.generic = GenericExecutor(plan)
        self.graph_factory = graph_factory or _CudaGraph
        self.graphs = {}  # (cache id, first row) -> (cache, graph, static inputs, output)
        self.profile, self.kernel_s = False, 0.0

    def run(self, inputs: StepInputs):
        self.plan.check(inputs)
        if inputs.S != 1 or inputs.cache is None:
            return self.generic.run(inputs)
        key = (id(inputs.cache), inputs.rows.start)
        entry = self.graphs.get(key)
        if entry is None or entry[0] is not inputs.cache:
            static = StepInputs(inputs.B, 1, inputs.ids.clone(), inputs.pos.clone(), inputs.q_pos.clone(),
                                inputs.kv_len.clone(), [1] * inputs.B, list(inputs.filled), inputs.cache,
                                inputs.rows, inputs.cache.max_len)
            graph = self.graph_factory()
            out = graph.capture(lambda: self.generic.run(static))
            entry = self.graphs[key] = (inputs.cache, graph, static, out)
            self.plan.runs += 1
            return out.clone()
        _, graph, static, out = entry
        static.ids.copy_(inputs.ids)
        static.pos.copy_(inputs.pos)
        static.q_pos.copy_(inputs.q_pos)
        static.kv_len.copy_(inputs.kv_len)
        graph.replay()
        self.plan.runs += 1
        return out.clone()
