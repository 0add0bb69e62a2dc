"""The decoder (Llama / Qwen2 / Mistral / Qwen3 / GLM-4) built only from contract ops, and its KV cache.

The step is written once, in `step_graph(g)`, against the op interface of graph.py: on the op
path every op goes through the Placement (never a backend directly) and the glue between ops
(residual adds, views, KV-cache writes) is plain torch on the placement's device; a step plan
records the same calls once per shape class and its backend runs the record (see graph.py).

One step function serves prefill, decode, chunked prefill and padded batches: row b of the
cache feeds `n_new[b]` new tokens (right-padded to S), written at cache positions
cache.filled[b] + i; its queries attend with q_pos = cache.filled[b] and
kv_len = cache.filled[b] + n_new[b] (the contract's attention semantics).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import quant, spec
from ..backends.placement import Placement
from . import graph
from .config import ModelConfig
from .gguf_file import release_pages
from .loader import CheckpointError

# plans kept per decoder (least recently used dropped first): decode widths and prefill (rows, chunk)
# classes of a server (5 widths + 5 x 5 prefill shapes at 16 slots and 256-token chunks); a compiled cpu
# plan reuses its buffers (about one layer's values), so 32 of them stay small
MAX_PLANS = 32


class NonFiniteError(RuntimeError):
    """The forward pass produced NaN/Inf (the message names the first layer that did)."""


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once per generation and written in place."""

    k: tuple  # per layer [B, Hkv, max_len, D]; tuples: the layers are fixed for the cache's life
    v: tuple
    filled: list  # per row: positions filled so far

    def layer_buffers(self) -> list:
        """[(data pointer, bytes)] of every layer's keys, then values: what a compiled step plan passes
        to its native call each step. Computed once (k and v are tuples of the same tensors for the
        cache's whole life): 4 x layers tensor calls a step, each slow right after the weights have
        streamed through the CPU caches, were a large part of a SmolLM2 step's host time."""
        buffers = self.__dict__.get("_layer_buffers")
        if buffers is None:
            buffers = [(t.data_ptr(), t.nbytes) for t in self.k] + [(t.data_ptr(), t.nbytes) for t in self.v]
            self.__dict__["_layer_buffers"] = buffers
        return buffers

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return len(self.filled)

    def reset(self, row: int):
        """Row `row` holds nothing again (a freed server slot); its old keys are never read."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row: expected 0..{self.batch_size - 1}, got {row}")
        self.filled[row] = 0


class Decoder:
    def __init__(self, config: ModelConfig, weights: dict, placement: Placement, shard=None, group=None):
        """shard (parallel.ShardSpec): the heads, MLP columns and vocabulary rows this rank holds
        (default: all of them, one process); group (parallel.Group): the collectives between ranks."""
        from .parallel import ShardSpec

        self.config = config
        self.placement = placement
        self.dtype = placement.dtype
        self.kv_dtype = placement.dtype  # the KV cache's (load's kv_cache_dtype); attention reads it converted
        self.device = placement.device
        self.rotary = config.rotary()
        self.scale = config.head_dim ** -0.5
        self.shard = shard = shard or ShardSpec.single(config)
        self.group = group
        c = config
        H = c.hidden_size
        q_size, kv_size = shard.num_heads * c.head_dim, shard.num_kv_heads * c.head_dim
        inter, vocab = shard.intermediate_size, shard.local_vocab
        get = _WeightReader(weights)

        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = get(p + "self_attn.q_proj.weight", (q_size, H))
            k = get(p + "self_attn.k_proj.weight", (kv_size, H))
            v = get(p + "self_attn.v_proj.weight", (kv_size, H))
            qkv_biases = [get(p + f"self_attn.{n}_proj.bias", (size,)) for n, size in
                          (("q", q_size), ("k", kv_size), ("v", kv_size))] if c.qkv_bias else [None] * 3
            # q/k/v in one linear, unless they come in different block formats (llama.cpp's Q4_K_M: Q6_K v):
            # then three, each kept in its blocks, instead of one dense matrix (7x the bytes in fp32)
            fuse_qkv = len({spec.weight_format(w) for w in (q, k, v)}) == 1 or not any(
                isinstance(w, spec.QuantizedWeight) for w in (q, k, v))
            gate = get(p + "mlp.gate_proj.weight", (inter, H))
            up = get(p + "mlp.up_proj.weight", (inter, H))
            gate_up_bias = _concat_rows([get(p + f"mlp.{n}_proj.bias", (inter,))
                                         for n in ("gate", "up")]) if c.mlp_bias else None
            # o_proj and down_proj are split by columns (partial sums, all-reduced): one rank adds the bias
            o_bias = get(p + "self_attn.o_proj.bias", (H,)) if c.o_bias and shard.adds_row_bias else None
            down_bias = get(p + "mlp.down_proj.bias", (H,)) if c.mlp_bias and shard.adds_row_bias else None
            self.layers.append(dict(
                attn_norm=self._dense(get(p + "input_layernorm.weight", (H,))),
                qkv=placement.prepare_linear(_concat_rows([q, k, v])) if fuse_qkv else None,
                qkv_bias=self._dense(_concat_rows(qkv_biases) if c.qkv_bias else None) if fuse_qkv else None,
                qkv_parts=None if fuse_qkv else [(placement.prepare_linear(w), self._dense(b))
                                                 for w, b in zip((q, k, v), qkv_biases)],
                o=placement.prepare_linear(get(p + "self_attn.o_proj.weight", (H, q_size))),
                o_bias=self._dense(o_bias),
                mlp_norm=self._dense(get(p + "post_attention_layernorm.weight", (H,))),
                # gate and up fused in one linear: silu_mul takes [M, 2I] = [gate | up]
                gate_up=placement.prepare_linear(_concat_rows([gate, up])),
                gate_up_bias=self._dense(gate_up_bias),
                down=placement.prepare_linear(get(p + "mlp.down_proj.weight", (H, inter))),
                down_bias=self._dense(down_bias),
                # qwen3: RMSNorm weights over each head's q and k; glm4: norms after attention and after the MLP
                q_norm=self._dense(get(p + "self_attn.q_norm.weight", (c.head_dim,)) if c.qk_norm else None),
                k_norm=self._dense(get(p + "self_attn.k_norm.weight", (c.head_dim,)) if c.qk_norm else None),
                post_attn_norm=self._dense(get(p + "post_self_attn_layernorm.weight", (H,)) if c.post_norms else None),
                post_mlp_norm=self._dense(get(p + "post_mlp_layernorm.weight", (H,)) if c.post_norms else None),
            ))
        self.norm = self._dense(get("model.norm.weight", (H,)))
        table = get("model.embed_tokens.weight", (vocab, H))
        tied = c.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = placement.prepare_linear(table if tied else get("lm_head.weight", (vocab, H)))
        if shard.sharded:  # one zero row more: ids of other ranks' vocabulary embed to zeros here
            self.embed = self._dense(table)
            self.embed = torch.cat([self.embed, self.embed.new_zeros(1, H)])
        else:
            self.embed = self._embedding_table(table, self.lm_head if tied else None)
        self._plans = OrderedDict()  # (B, S, all_rows, with cache) -> executor of that step plan

    def _dense(self, t):
        """A dense tensor (or GGUF blocks, dequantized) in the activation dtype on the device, in memory of
        its own (never a view of the checkpoint's file map, which would keep the whole map resident)."""
        if t is None:
            return None
        if isinstance(t, spec.QuantizedWeight):
            t = quant.dequantize(t, torch.float32)
        out = t.to(device=self.device, dtype=self.dtype).contiguous()
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    def _embedding_table(self, table, tied_head):
        """The table `embedding` reads, as one copy of the matrix where the backend can gather rows from
        its prepared weights (Backend.embedding_table_formats): a tied model's prepared output head
        itself, or GGUF blocks prepared as for a linear (kept as blocks); else a dense copy."""
        primary = self.placement.primary
        prepared = tied_head
        if (prepared is None and isinstance(table, spec.QuantizedWeight)
                and table.format in primary.embedding_table_formats and table.format in primary.native_weight_formats):
            prepared = primary.prepare_linear(table, self.dtype)
        if prepared is not None and primary.supports("embedding", **spec.prepared_table_meta(prepared)):
            return prepared
        return self._dense(table)

    # ------------------------------------------------------------------ cache

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        shape = (batch_size, self.shard.num_kv_heads, max_len, c.head_dim)
        # one allocation, viewed per layer (each view contiguous): 2 x layers small fills were 2 x layers
        # wake-ups of torch's intra-op pool, ~1 ms each on a busy 2-core machine, for every generate()
        whole = torch.zeros((2, c.num_layers) + shape, dtype=self.kv_dtype, device=self.device)
        return KVCache(tuple(whole[0]), tuple(whole[1]), [0] * batch_size)

    # ------------------------------------------------------------------ the step, written once

    def step_graph(self, g, all_rows=False):
        """One step on the op interface `g` (graph.py): g's inputs are ids [B*S], pos [B, S],
        q_pos and kv_len [B] -> logits [B, V] at each row's last new token ([B*S, V] with all_rows)."""
        c, shard = self.config, self.shard
        Hq, Hkv = shard.num_heads, shard.num_kv_heads  # this rank's heads (all of them in one process)
        if shard.sharded:  # vocabulary-parallel: this rank's rows, zeros for the others', summed over ranks
            x = g.all_reduce(g.embedding(g.vocab_ids(g.ids, shard), self.embed), self.group)  # [B*S, H]
        else:
            x = g.embedding(g.ids, self.embed)  # [B*S, H]
        for li, layer in enumerate(self.layers):
            h = g.rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
            if layer["qkv"] is not None:
                qkv = g.linear(h, layer["qkv"], layer["qkv_bias"])  # [B*S, (Hq + 2 Hkv) D]
                (qs, q0), (ks, k0), (vs, v0) = (qkv, 0), (qkv, Hq), (qkv, Hq + Hkv)
            else:  # q, k, v in three linears (mixed block formats): each its own [B*S, heads * D]
                (qs, q0), (ks, k0), (vs, v0) = [(g.linear(h, w, b), 0) for w, b in layer["qkv_parts"]]
            if c.qk_norm:  # qwen3: rms_norm over each head of q and of k ([B*S*Hx, D] rows), before rope
                q = g.heads(g.rms_norm(g.head_rows(qs, q0, Hq), layer["q_norm"], c.rms_norm_eps), 0, Hq)
                k = g.heads(g.rms_norm(g.head_rows(ks, k0, Hkv), layer["k_norm"], c.rms_norm_eps), 0, Hkv)
            else:
                q, k = g.heads(qs, q0, Hq), g.heads(ks, k0, Hkv)
            q = g.rope(q, g.pos, self.rotary)  # [B, Hq, S, D]
            k = g.rope(k, g.pos, self.rotary)  # [B, Hkv, S, D]
            v = g.heads(vs, v0, Hkv)  # [B, Hkv, S, D]
            k, v = g.kv_cache(li, k, v)  # [B, Hkv, kv, D]: the cache rows after this step's writes
            a = g.attention(q, k, v, g.q_pos, g.kv_len, True, self.scale)  # [B, Hq, S, D]
            o = self._reduce(g, g.linear(g.merge_heads(a), layer["o"], layer["o_bias"]))  # [B*S, H]
            if c.post_norms:  # glm4: the attention output normed before the residual add (the whole sum)
                o = g.rms_norm(o, layer["post_attn_norm"], c.rms_norm_eps)
            x = g.add(x, o)
            h = g.rms_norm(x, layer["mlp_norm"], c.rms_norm_eps)
            gate_up = g.linear(h, layer["gate_up"], layer["gate_up_bias"])  # [B*S, 2I]
            m = self._reduce(g, g.linear(g.silu_mul(gate_up), layer["down"], layer["down_bias"]))  # [B*S, H]
            if c.post_norms:  # glm4: and the MLP output
                m = g.rms_norm(m, layer["post_mlp_norm"], c.rms_norm_eps)
            x = g.add(x, m)
            g.layer_done(li, x)
        if not all_rows:
            x = g.last_rows(x)  # [B, H]
        x = g.rms_norm(x, self.norm, c.rms_norm_eps)
        logits = g.linear(x, self.lm_head)  # [B, V] (this rank's vocabulary slice when sharded)
        return g.all_gather_vocab(logits, self.group, shard) if shard.sharded else logits

    def _reduce(self, g, partial):
        """A column-split linear's partial sums -> the whole sum (one all-reduce over the ranks)."""
        return g.all_reduce(partial, self.group) if self.shard.sharded else partial

    # ------------------------------------------------------------------ running it

    def forward(self, ids, n_new, cache: KVCache | None, all_rows: bool = False, rows=None, plans: bool = False):
        """ids int64 [B, S] (right-padded), n_new: new tokens per row -> fp32 logits: [B, S, V]
        when all_rows, else [B, V] at each row's last new token. Without a cache the keys are this
        call's own (a full forward from position 0). rows: the cache rows (a slice; None: all).
        plans: run through the step plan of this shape class (built on first use) instead of the op path."""
        rows = slice(None) if rows is None else rows
        B, S = ids.shape
        filled = cache.filled[rows] if cache is not None else [0] * B
        inputs = graph.StepInputs.build(ids, n_new, filled, cache, rows, self.device)
        with _torch_glue_threads(self.placement.primary):
            if plans:
                logits, finite = self._run_plan(inputs, all_rows)
            else:
                g = graph.EagerOps(self.placement, inputs, self.config.head_dim)
                logits, finite = self.step_graph(g, all_rows), g.finite
        if cache is not None:
            cache.filled[rows] = [f + n for f, n in zip(filled, n_new)]
        logits = logits.float()
        if not all_finite(logits):
            raise NonFiniteError(_non_finite_message(finite() if callable(finite) else finite, self.dtype))
        return logits.view(B, S, -1) if all_rows else logits

    def plan_for(self, inputs, all_rows=False):
        """The executor of this shape class's plan, or None when it is not built yet."""
        key = (inputs.B, inputs.S, all_rows, inputs.cache is not None)
        executor = self._plans.get(key)
        if executor is not None:
            self._plans.move_to_end(key)
        return executor

    def _run_plan(self, inputs, all_rows):
        """-> (logits, per-layer finite flags or a function giving them)."""
        executor = self.plan_for(inputs, all_rows)
        if executor is not None:
            return executor.run(inputs), getattr(executor, "layer_flags", None)
        # first step of this shape class: run it on the op path and record it
        tracer = graph.Tracer(self.placement, inputs, self.config.head_dim, all_rows)
        logits = self.step_graph(tracer, all_rows)
        plan = tracer.plan(logits)
        # a sharded step's collectives run in Python: the generic executor, not a backend's compiled plan
        compile_plan = None if self.shard.sharded else getattr(self.placement.primary, "compile", None)
        executor = compile_plan(plan) if compile_plan is not None else None
        if executor is None:
            executor = graph.GenericExecutor(plan)
        self.placement.plans.append(plan)
        self._plans[plan.key] = executor
        if len(self._plans) > MAX_PLANS:
            _, dropped = self._plans.popitem(last=False)
            self.placement.retire_plan(dropped.plan)
        return logits, tracer.finite


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. On the CPU numpy's isfinite and all, one thread (torch's would
    wake its intra-op pool for a vocabulary of logits, and on a busy machine wait a time slice for a
    thread the OS has not scheduled): [16, 49152] fp32 logits 58 us, against 142 us for the one sum
    (NaN or infinity making it non-finite) used before, and ~10x that for torch's isfinite().all()."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    total = float(t.sum())
    if math.isfinite(total):
        return True
    return bool(torch.isfinite(t).all())


@contextlib.contextmanager
def _torch_glue_threads(backend):
    """One torch thread for the glue while a backend that owns the CPU cores computes (see
    Backend.owns_cpu_threads): two spinning pools on the same cores cost more than they give."""
    if not (backend.owns_cpu_threads and backend.device.type == "cpu") or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _non_finite_message(finite_flags, dtype):
    if finite_flags is None:  # a step plan keeps no per-layer flags
        where = "the step ran as a plan, which does not track layers (load with plans=False to find the layer)"
    else:
        flags = torch.stack(finite_flags).cpu().tolist()
        where = (f"the first layer that produced NaN/Inf is layer {flags.index(False)} (of {len(flags)})"
                 if False in flags else "every layer was finite: the final norm or the output projection produced them")
    return (f"non-finite logits: {where}; activations are {spec.dtype_name(dtype)} "
            f"(fp16 overflows past 65504: try dtype='bf16' or 'fp32'), or the checkpoint holds NaN/Inf weights")


class _WeightReader:
    """Fetch a tensor by name and check its shape; the error names the tensor, expected and found shape."""

    def __init__(self, weights: dict):
        self.weights = weights

    def __call__(self, name, shape):
        if name not in self.weights:
            raise CheckpointError(f"checkpoint: missing tensor {name!r} (expected shape {list(shape)})")
        t = self.weights[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"checkpoint: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t


def _concat_rows(weights: list):
    """Stack [N_i, K] weights (or [N_i] biases) into one [sum N_i, ...]: GGUF blocks of one format
    stay blocks (a block never spans rows), anything else becomes one dense tensor."""
    formats = {spec.weight_format(w) for w in weights}
    if len(formats) == 1 and isinstance(weights[0], spec.QuantizedWeight):
        blocks = torch.cat([w.blocks for w in weights])
        out = spec.QuantizedWeight(weights[0].format, blocks, (blocks.shape[0], weights[0].shape[1]))
    else:
        dense = [quant.dequantize(w) if isinstance(w, spec.QuantizedWeight) else w for w in weights]
        dtype = dense[0].dtype if len({d.dtype for d in dense}) == 1 else torch.float32
        out = torch.cat([d.to(dtype) for d in dense])
    # the sources' pages of a mapped file were read once, for this copy: give them back (docs/memory.md)
    release_pages(*[w.blocks if isinstance(w, spec.QuantizedWeight) else w for w in weights])
    return out
