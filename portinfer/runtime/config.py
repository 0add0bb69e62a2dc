"""ModelConfig: one normalized description of a decoder, from a Hugging Face config.json or
GGUF metadata.

Supported: `llama` (SmolLM2 and Yi included; Llama 3 `llama3` rope scaling, `linear` scaling),
`qwen2` (q/k/v biases), `mistral`, `qwen3` (an RMSNorm over each head's q and k before rope),
`glm` (GLM-4-9B-chat-hf: rotary on the first half of each head, interleaved pairs, q/k/v biases)
and `glm4` (GLM-4-0414: as glm, plus norms after attention and after the MLP); GQA; tied or untied
embeddings; an explicit head_dim; `rope_theta` or transformers 5's `rope_parameters`. Each
architecture is data here (rotary_dim, rope_style, qk_norm, post_norms, biases), read by the one
decoder. Anything else is refused with a message listing what is supported, before any weight is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backends.spec import RotaryParams

ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3", "glm", "glm4")
# GGUF general.architecture (as llama.cpp's converter writes it) -> ours; its metadata keys use the GGUF name
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "chatglm": "glm", "glm4": "glm4"}
# architectures whose rotary embedding rotates adjacent pairs (2i, 2i+1) of the first half of each head
_GLM = ("glm", "glm4")
ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """The checkpoint describes a model this runtime does not support, or a config value has the wrong
    type or range (the message names the field and says what is expected)."""


# sane bounds, checked before anything is allocated from a config (a corrupt file must not ask for
# an exabyte): well above any released model
MAX_SIZE = 1 << 24  # vocab, hidden, intermediate sizes
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_CONTEXT = 1 << 26
_BOUNDS = {"vocab_size": MAX_SIZE, "hidden_size": MAX_SIZE, "intermediate_size": MAX_SIZE, "num_layers": MAX_LAYERS,
           "num_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS, "head_dim": MAX_HEAD_DIM, "context_length": MAX_CONTEXT}


def field_value(source: dict, key: str, kind, default=None, where="config.json"):
    """source[key] checked to be of `kind` ("int": an int, not a bool; "float": a finite number; "bool";
    "str"); `default` when absent or null. A wrong type is a ConfigError naming `where` and the key."""
    value = source.get(key) if isinstance(source, dict) else None
    if value is None:
        return default
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
        raise ConfigError(f"{where}: {key}: expected {expected[kind]}, got {value!r}"[:300])
    return value


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...} or None
    context_length: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    # GGUF llama3 files carry per-pair frequency factors as a tensor (rope_freqs.weight)
    rope_freq_factors: torch.Tensor | None = None
    # rotary embedding on the first rotary_dim dims of each head (None: all of them; GLM: half), pairs
    # rotate-half ("neox", as Hugging Face's llama) or adjacent ("interleaved", as GLM)
    rotary_dim: int | None = None
    rope_style: str = "neox"
    qk_norm: bool = False  # qwen3: RMSNorm (weight [head_dim]) over each head of q and of k, before rope
    post_norms: bool = False  # glm4: RMSNorm of the attention output and of the MLP output, before each residual add

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture: {self.architecture!r} is not supported; supported are "
                              f"{', '.join(ARCHITECTURES)}")
        for name, bound in _BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise ConfigError(f"{name}: expected an integer in 1..{bound}, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")
        for name in ("bos_token_id",):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}: expected a token id (an integer >= 0), got {value!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ConfigError(f"eos_token_id: expected token ids (integers >= 0), got {self.eos_token_ids!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads: expected a divisor of num_heads = {self.num_heads}, "
                              f"got {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: expected an even number (rotary pairs), got {self.head_dim}")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or self.rotary_dim % 2
                                            or not 2 <= self.rotary_dim <= self.head_dim):
            raise ConfigError(f"rotary_dim: expected an even number in 2..head_dim = {self.head_dim}, "
                              f"got {self.rotary_dim!r}")
        if self.rope_style not in ("neox", "interleaved"):
            raise ConfigError(f"rope_style: expected 'neox' or 'interleaved', got {self.rope_style!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope scaling: type {rope_type!r} is not supported; supported are "
                              f"{', '.join(ROPE_TYPES)}")
        scaling_keys = {"linear": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key in scaling_keys.get(rope_type, ()):
            value = self.rope_scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"rope scaling ({rope_type}): {key}: expected a finite number > 0, got {value!r}")
        if rope_type == "llama3" and self.rope_scaling["low_freq_factor"] == self.rope_scaling["high_freq_factor"]:
            raise ConfigError("rope scaling (llama3): low_freq_factor and high_freq_factor must differ")
        if self.rope_freq_factors is not None:
            f = self.rope_freq_factors
            pairs = (self.rotary_dim or self.head_dim) // 2
            if f.dim() != 1 or f.numel() != pairs:
                raise ConfigError(f"rope_freqs: expected {pairs} frequency factors (rotary dims / 2), got "
                                  f"shape {list(f.shape)}")
            if not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
                raise ConfigError("rope_freqs: expected finite frequency factors > 0")

    # ------------------------------------------------------------------ derived

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rotary(self) -> RotaryParams:
        """The rotary parameters with any scaling applied to the frequencies (float64)."""
        base = RotaryParams.from_theta(self.head_dim, self.rope_theta, self.rotary_dim, self.rope_style)
        inv_freq = base.inv_freq
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / self.rope_freq_factors.to(torch.float64)
        elif rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        return RotaryParams(inv_freq=inv_freq, style=self.rope_style)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf(cls, cfg: dict, generation: dict | None = None) -> "ModelConfig":
        """From a Hugging Face config.json (and generation_config.json) dict."""
        arch = cfg.get("model_type")
        if arch not in ARCHITECTURES:
            archs = cfg.get("architectures") or []
            archs = [str(a) for a in archs] if isinstance(archs, list) else [repr(archs)]
            raise ConfigError(f"config.json: model_type {arch!r} ({', '.join(archs) or 'no architectures'}) is not "
                              f"supported; supported are {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if cfg.get(key) is None:
                raise ConfigError(f"config.json: missing {key!r}")
        get = field_value
        act = get(cfg, "hidden_act", "str", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported; the MLP is silu(gate) * up")
        heads = get(cfg, "num_attention_heads", "int")
        hidden = get(cfg, "hidden_size", "int")
        if heads < 1:
            raise ConfigError(f"config.json: num_attention_heads: expected an integer >= 1, got {heads}")
        head_dim = get(cfg, "head_dim", "int") or hidden // heads
        rope = cfg.get("rope_parameters") or {}
        legacy = cfg.get("rope_scaling")
        for key, value in (("rope_parameters", rope), ("rope_scaling", legacy)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config.json: {key}: expected an object, got {value!r}"[:300])
        rope = dict(rope)
        if legacy:
            rope.update(legacy)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = get(rope, "rope_theta", "float", None, "config.json: rope_parameters")
        theta = get(cfg, "rope_theta", "float", 10000.0) if theta is None else theta
        rope.pop("rope_theta", None)
        # GLM rotates the first half of each head (GlmConfig's default); the others rotate all of it
        partial = get(rope, "partial_rotary_factor", "float", None, "config.json: rope_parameters")
        partial = get(cfg, "partial_rotary_factor", "float", 0.5 if arch in _GLM else 1.0) if partial is None else partial
        rope.pop("partial_rotary_factor", None)
        if partial != 1.0 and arch not in _GLM:
            raise ConfigError(f"rope: partial_rotary_factor {partial} is not supported for {arch} (only glm/glm4 "
                              f"rotate part of each head)")
        rotary_dim = int(head_dim * partial)
        rope_type = rope.get("rope_type", "default")
        if not isinstance(rope_type, str):
            raise ConfigError(f"config.json: rope_scaling: rope_type: expected a string, got {rope_type!r}"[:300])
        scaling = rope if rope_type != "default" else None
        if scaling and scaling.get("rope_type") == "llama3":
            scaling.setdefault("original_max_position_embeddings", get(cfg, "max_position_embeddings", "int"))
        context = get(cfg, "max_position_embeddings", "int", 2048)
        context = _cap_sliding_window(arch, cfg, context)
        generation = generation if isinstance(generation, dict) else {}
        eos = generation.get("eos_token_id", cfg.get("eos_token_id"))
        eos_where = "generation_config.json" if "eos_token_id" in generation else "config.json"
        bias = get(cfg, "attention_bias", "bool", False)
        bos_where = "generation_config.json" if "bos_token_id" in generation else "config.json"
        bos = get(generation if bos_where == "generation_config.json" else cfg, "bos_token_id", "int", None,
                  bos_where)
        return cls(
            architecture=arch, vocab_size=get(cfg, "vocab_size", "int"), hidden_size=hidden,
            intermediate_size=get(cfg, "intermediate_size", "int"), num_layers=get(cfg, "num_hidden_layers", "int"),
            num_heads=heads, num_kv_heads=get(cfg, "num_key_value_heads", "int") or heads, head_dim=head_dim,
            rms_norm_eps=get(cfg, "rms_norm_eps", "float", 1e-6), rope_theta=theta, rope_scaling=scaling,
            context_length=context, tie_word_embeddings=get(cfg, "tie_word_embeddings", "bool", False),
            # qwen2: q/k/v biases always, o never; glm/glm4: attention_bias (default on) for q/k/v, o never;
            # llama/mistral/qwen3: attention_bias for all four
            qkv_bias=True if arch == "qwen2" else get(cfg, "attention_bias", "bool", arch in _GLM),
            o_bias=False if arch in ("qwen2",) + _GLM else bias,
            mlp_bias=get(cfg, "mlp_bias", "bool", False), bos_token_id=bos,
            eos_token_ids=token_ids(eos, f"{eos_where}: eos_token_id"), rotary_dim=rotary_dim,
            rope_style="interleaved" if arch in _GLM else "neox", qk_norm=arch == "qwen3", post_norms=arch == "glm4")

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set, rope_freq_factors=None) -> "ModelConfig":
        """From GGUF metadata (key -> value) and the set of tensor names in the file."""
        gguf_arch = meta.get("general.architecture")
        if not isinstance(gguf_arch, str) or gguf_arch not in GGUF_ARCHITECTURES:  # (a list is unhashable)
            raise ConfigError(f"GGUF general.architecture {gguf_arch!r} is not supported; supported are "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
        arch = GGUF_ARCHITECTURES[gguf_arch]

        def key(name, kind="int", default=None, required=True):
            full = f"{gguf_arch}.{name}"
            if meta.get(full) is None and required and default is None:
                raise ConfigError(f"GGUF metadata: missing {full!r}")
            return field_value(meta, full, kind, default, "GGUF metadata")

        heads = key("attention.head_count")
        hidden = key("embedding_length")
        if heads < 1:  # before it divides anything
            raise ConfigError(f"GGUF metadata: {gguf_arch}.attention.head_count: expected an integer >= 1, got {heads}")
        head_dim = key("attention.key_length", "int", hidden // heads, required=False)
        # chatglm/glm4 files: rotary on the first rope.dimension_count dims (half the head), adjacent pairs
        rotary_dim = key("rope.dimension_count", "int", head_dim, required=False)
        tokens = meta.get("tokenizer.ggml.tokens", ())
        vocab = key("vocab_size", "int", required=False) or (len(tokens) if isinstance(tokens, list) else 0)
        if not vocab:
            raise ConfigError("GGUF metadata: no vocab_size and no tokenizer.ggml.tokens")
        scaling = None
        scaling_type = field_value(meta, f"{gguf_arch}.rope.scaling.type", "str", None, "GGUF metadata")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor", "float")}
        elif scaling_type not in (None, "none"):
            raise ConfigError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported are "
                              f"{', '.join(ROPE_TYPES)}")
        eos = token_ids(meta.get("tokenizer.ggml.eos_token_id"), "GGUF metadata: tokenizer.ggml.eos_token_id")
        eot = token_ids(meta.get("tokenizer.ggml.eot_token_id"), "GGUF metadata: tokenizer.ggml.eot_token_id")
        has = tensor_names.__contains__
        return cls(
            architecture=arch, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=key("feed_forward_length"), num_layers=key("block_count"),
            num_heads=heads, num_kv_heads=key("attention.head_count_kv", "int", heads, required=False),
            head_dim=head_dim, rms_norm_eps=key("attention.layer_norm_rms_epsilon", "float"),
            rope_theta=key("rope.freq_base", "float", 10000.0, required=False), rope_scaling=scaling,
            context_length=key("context_length", "int", 2048, required=False),
            tie_word_embeddings=not has("output.weight"), qkv_bias=has("blk.0.attn_q.bias"),
            o_bias=has("blk.0.attn_output.bias"), mlp_bias=has("blk.0.ffn_up.bias"),
            bos_token_id=field_value(meta, "tokenizer.ggml.bos_token_id", "int", None, "GGUF metadata"),
            eos_token_ids=eos + [t for t in eot if t not in eos], rope_freq_factors=rope_freq_factors,
            rotary_dim=rotary_dim, rope_style="interleaved" if arch in _GLM else "neox",
            qk_norm=has("blk.0.attn_q_norm.weight"), post_norms=has("blk.0.post_attention_norm.weight"))


def token_ids(value, where) -> list:
    """An eos_token_id value (an id or a list of ids) -> [int]; True/False or a non-integer is a ConfigError
    (a bool is an int in Python: eos_token_id=True must not mean token 1)."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: expected a token id or a list of them (integers >= 0), got {value!r}"[:300])
    return values


def _cap_sliding_window(arch, cfg, context) -> int:
    """A sliding window only changes results past its length: cap the context there, so it never applies."""
    window = field_value(cfg, "sliding_window", "int")
    in_use = field_value(cfg, "use_sliding_window", "bool", arch == "mistral")
    if window and in_use and window < context:
        return int(window)
    return context


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
