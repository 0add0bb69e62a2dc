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
    """The checkpoint describes a model this runtime does not support (the message says what is)."""


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
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
            raise ConfigError(f"config.json: model_type {arch!r} ({', '.join(archs) or 'no architectures'}) is not "
                              f"supported; supported are {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ConfigError(f"config.json: missing {key!r}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported; the MLP is silu(gate) * up")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        # GLM rotates the first half of each head (GlmConfig's default); the others rotate all of it
        partial = float(rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5 if arch in _GLM else 1.0)))
        if partial != 1.0 and arch not in _GLM:
            raise ConfigError(f"rope: partial_rotary_factor {partial} is not supported for {arch} (only glm/glm4 "
                              f"rotate part of each head)")
        rotary_dim = int(head_dim * partial)
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        if scaling and scaling.get("rope_type") == "llama3":
            scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        context = int(cfg.get("max_position_embeddings", 2048))
        context = _cap_sliding_window(arch, cfg, context)
        generation = generation or {}
        eos = generation.get("eos_token_id", cfg.get("eos_token_id"))
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            context_length=context, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # qwen2: q/k/v biases always, o never; glm/glm4: attention_bias (default on) for q/k/v, o never;
            # llama/mistral/qwen3: attention_bias for all four
            qkv_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", arch in _GLM)),
            o_bias=False if arch in ("qwen2",) + _GLM else bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=generation.get("bos_token_id", cfg.get("bos_token_id")),
            eos_token_ids=_as_list(eos), rotary_dim=rotary_dim,
            rope_style="interleaved" if arch in _GLM else "neox", qk_norm=arch == "qwen3", post_norms=arch == "glm4")

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set, rope_freq_factors=None) -> "ModelConfig":
        """From GGUF metadata (key -> value) and the set of tensor names in the file."""
        gguf_arch = meta.get("general.architecture")
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"GGUF general.architecture {gguf_arch!r} is not supported; supported are "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
        arch = GGUF_ARCHITECTURES[gguf_arch]

        def key(name, default=None, required=True):
            full = f"{gguf_arch}.{name}"
            if full not in meta:
                if required and default is None:
                    raise ConfigError(f"GGUF metadata: missing {full!r}")
                return default
            return meta[full]

        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", hidden // heads, required=False))
        # chatglm/glm4 files: rotary on the first rope.dimension_count dims (half the head), adjacent pairs
        rotary_dim = int(key("rope.dimension_count", head_dim, required=False))
        vocab = meta.get(f"{gguf_arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ConfigError("GGUF metadata: no vocab_size and no tokenizer.ggml.tokens")
        scaling = None
        scaling_type = meta.get(f"{gguf_arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(meta[f"{gguf_arch}.rope.scaling.factor"])}
        elif scaling_type not in (None, "none"):
            raise ConfigError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported are "
                              f"{', '.join(ROPE_TYPES)}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = _as_list(eos) + [t for t in _as_list(eot) if t not in _as_list(eos)]
        has = tensor_names.__contains__
        return cls(
            architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
            num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads, required=False)),
            head_dim=head_dim, rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0, required=False)), rope_scaling=scaling,
            context_length=int(key("context_length", 2048, required=False)),
            tie_word_embeddings=not has("output.weight"), qkv_bias=has("blk.0.attn_q.bias"),
            o_bias=has("blk.0.attn_output.bias"), mlp_bias=has("blk.0.ffn_up.bias"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
            rope_freq_factors=rope_freq_factors, rotary_dim=rotary_dim,
            rope_style="interleaved" if arch in _GLM else "neox", qk_norm=has("blk.0.attn_q_norm.weight"),
            post_norms=has("blk.0.post_attention_norm.weight"))


def _as_list(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _cap_sliding_window(arch, cfg, context) -> int:
    """A sliding window only changes results past its length: cap the context there, so it never applies."""
    window = cfg.get("sliding_window")
    in_use = cfg.get("use_sliding_window", arch == "mistral")
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
