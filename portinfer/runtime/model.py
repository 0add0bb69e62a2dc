"""The decoder (Llama / Qwen2 / Mistral) built only from contract ops, and its KV cache.

Every op goes through the Placement (never a backend directly); the glue between ops
(residual adds, views, KV-cache writes) is plain torch on the placement's device.

One step function serves prefill, decode, chunked prefill and padded batches: sequence b
feeds `lengths[b]` new tokens (right-padded to S), written at cache positions
cache.lengths[b] + i; its queries attend with q_pos = cache.lengths[b] and
kv_len = cache.lengths[b] + lengths[b] (the contract's attention semantics).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..backends import quant, spec
from ..backends.placement import Placement
from .config import ModelConfig
from .loader import CheckpointError


class NonFiniteError(RuntimeError):
    """The forward pass produced NaN/Inf (the message names the first layer that did)."""


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once per generation and written in place."""

    k: list  # per layer [B, Hkv, max_len, D]
    v: list
    lengths: list  # per sequence: positions filled so far

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return len(self.lengths)


class Decoder:
    def __init__(self, config: ModelConfig, weights: dict, placement: Placement):
        self.config = config
        self.placement = placement
        self.dtype = placement.dtype
        self.device = placement.device
        self.rotary = config.rotary()
        self.scale = config.head_dim ** -0.5
        c = config
        H = c.hidden_size
        get = _WeightReader(weights)

        self.embed = self._dense(get("model.embed_tokens.weight", (c.vocab_size, H)))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = get(p + "self_attn.q_proj.weight", (c.q_size, H))
            k = get(p + "self_attn.k_proj.weight", (c.kv_size, H))
            v = get(p + "self_attn.v_proj.weight", (c.kv_size, H))
            qkv_bias = _concat_rows([get(p + f"self_attn.{n}_proj.bias", (size,)) for n, size in
                                     (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size))]) if c.qkv_bias else None
            gate = get(p + "mlp.gate_proj.weight", (c.intermediate_size, H))
            up = get(p + "mlp.up_proj.weight", (c.intermediate_size, H))
            gate_up_bias = _concat_rows([get(p + f"mlp.{n}_proj.bias", (c.intermediate_size,))
                                         for n in ("gate", "up")]) if c.mlp_bias else None
            self.layers.append(dict(
                attn_norm=self._dense(get(p + "input_layernorm.weight", (H,))),
                qkv=placement.prepare_linear(_concat_rows([q, k, v])),
                qkv_bias=self._dense(qkv_bias),
                o=placement.prepare_linear(get(p + "self_attn.o_proj.weight", (H, c.q_size))),
                o_bias=self._dense(get(p + "self_attn.o_proj.bias", (H,)) if c.o_bias else None),
                mlp_norm=self._dense(get(p + "post_attention_layernorm.weight", (H,))),
                # gate and up fused in one linear: silu_mul takes [M, 2I] = [gate | up]
                gate_up=placement.prepare_linear(_concat_rows([gate, up])),
                gate_up_bias=self._dense(gate_up_bias),
                down=placement.prepare_linear(get(p + "mlp.down_proj.weight", (H, c.intermediate_size))),
                down_bias=self._dense(get(p + "mlp.down_proj.bias", (H,)) if c.mlp_bias else None),
            ))
        self.norm = self._dense(get("model.norm.weight", (H,)))
        if c.tie_word_embeddings or "lm_head.weight" not in weights:
            head = get("model.embed_tokens.weight", (c.vocab_size, H))
        else:
            head = get("lm_head.weight", (c.vocab_size, H))
        self.lm_head = placement.prepare_linear(head)

    def _dense(self, t):
        """A dense tensor (or GGUF blocks, dequantized) in the activation dtype on the device."""
        if t is None:
            return None
        if isinstance(t, spec.QuantizedWeight):
            t = quant.dequantize(t, torch.float32)
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    # ------------------------------------------------------------------ cache

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        shape = (batch_size, c.num_kv_heads, max_len, c.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        return KVCache(k, v, [0] * batch_size)

    # ------------------------------------------------------------------ forward

    def forward(self, ids, lengths, cache: KVCache | None, all_rows: bool = False):
        """ids int64 [B, S] (right-padded), lengths: new tokens per sequence -> fp32 logits:
        [B, S, V] when all_rows, else [B, V] at each sequence's last new token.
        Without a cache the keys are this call's own (a full forward from position 0)."""
        with _torch_glue_threads(self.placement.primary):
            return self._forward(ids, lengths, cache, all_rows)

    def _forward(self, ids, lengths, cache, all_rows):
        ops, c = self.placement, self.config
        B, S = ids.shape
        Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        start = cache.lengths if cache is not None else [0] * B
        dev = self.device
        start_t = torch.tensor(start, dtype=torch.int64, device=dev)
        lengths_t = torch.tensor(lengths, dtype=torch.int64, device=dev)
        pos = start_t[:, None] + torch.arange(S, device=dev)[None, :]  # [B, S]
        q_pos = start_t.to(torch.int32)
        kv_len = (start_t + lengths_t).to(torch.int32)
        kv_max = max(s + n for s, n in zip(start, lengths))
        if cache is not None:
            # only real (unpadded) rows are written: a padded row must never overwrite a cache slot
            writes = [(b, s, n) for b, (s, n) in enumerate(zip(start, lengths)) if n]  # (sequence, at, rows)

        x = ops.embedding(ids.reshape(-1), self.embed)  # [B*S, H]
        finite = []
        for li, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer["attn_norm"], c.rms_norm_eps)
            qkv = ops.linear(h, layer["qkv"], layer["qkv_bias"]).view(B, S, Hq + 2 * Hkv, D)
            q = ops.rope(qkv[:, :, :Hq].transpose(1, 2), pos, self.rotary)  # [B, Hq, S, D]
            k = ops.rope(qkv[:, :, Hq:Hq + Hkv].transpose(1, 2), pos, self.rotary)  # [B, Hkv, S, D]
            v = qkv[:, :, Hq + Hkv:].transpose(1, 2)  # [B, Hkv, S, D]
            if cache is not None:
                for b, at, n in writes:
                    cache.k[li][b, :, at:at + n] = k[b, :, :n]
                    cache.v[li][b, :, at:at + n] = v[b, :, :n]
                k, v = cache.k[li][:, :, :kv_max], cache.v[li][:, :, :kv_max]  # [B, Hkv, kv_max, D]
            a = ops.attention(q, k, v, q_pos, kv_len, True, self.scale)  # [B, Hq, S, D]
            a = a.transpose(1, 2).reshape(B * S, Hq * D)
            x = x + ops.linear(a, layer["o"], layer["o_bias"])
            h = ops.rms_norm(x, layer["mlp_norm"], c.rms_norm_eps)
            gate_up = ops.linear(h, layer["gate_up"], layer["gate_up_bias"])  # [B*S, 2I]
            x = x + ops.linear(ops.silu_mul(gate_up), layer["down"], layer["down_bias"])
            finite.append(torch.isfinite(x).all())
        if cache is not None:
            cache.lengths = [s + n for s, n in zip(start, lengths)]

        x = x.view(B, S, -1)
        if not all_rows:
            x = x[torch.arange(B, device=dev), lengths_t - 1]  # [B, H]: each sequence's last new token
        x = ops.rms_norm(x.reshape(-1, c.hidden_size), self.norm, c.rms_norm_eps)
        logits = ops.linear(x, self.lm_head).float()
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(_non_finite_message(finite, self.dtype))
        return logits.view(B, S, -1) if all_rows else logits


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
        return spec.QuantizedWeight(weights[0].format, blocks, (blocks.shape[0], weights[0].shape[1]))
    dense = [quant.dequantize(w) if isinstance(w, spec.QuantizedWeight) else w for w in weights]
    dtype = dense[0].dtype if len({d.dtype for d in dense}) == 1 else torch.float32
    return torch.cat([d.to(dtype) for d in dense])
