"""Benchmark shape sets: the layer dimensions of real models, and the op cases built from them.

Each set hardcodes a model's config.json dims (the source config is named next to it), so
`portinfer bench ops` needs no download. `tiny` is for CI smoke tests. A custom set is
`custom:hidden=H,intermediate=I,heads=Hq,kv_heads=Hkv,head_dim=D,vocab=V[,tokens=T,context=C]`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelShapes:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tokens: int = 128  # prefill length: the rows M of prefill linears, Sq = Sk of prefill attention
    context: int = 1024  # decode: tokens already in the KV cache (Sk of decode attention)
    rope_theta: float = 10000.0
    source: str = ""

    def __post_init__(self):
        for f in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tokens", "context"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shapes {self.name!r}: {f} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"shapes {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}) (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"shapes {self.name!r}: head_dim must be even (rotary pairs), got {self.head_dim}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SHAPE_SETS = {
    # HuggingFaceTB/SmolLM2-135M config.json: hidden_size 576, intermediate_size 1536,
    # num_attention_heads 9, num_key_value_heads 3 (head_dim 576/9 = 64), vocab_size 49152, rope_theta 100000
    "smollm2-135m": ModelShapes("smollm2-135m", hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                                vocab=49152, rope_theta=100000.0, source="HuggingFaceTB/SmolLM2-135M config.json"),
    # Qwen/Qwen2-0.5B config.json: hidden_size 896, intermediate_size 4864, num_attention_heads 14,
    # num_key_value_heads 2 (head_dim 896/14 = 64), vocab_size 151936, rope_theta 1000000
    "qwen2-0.5b": ModelShapes("qwen2-0.5b", hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64,
                              vocab=151936, rope_theta=1000000.0, source="Qwen/Qwen2-0.5B config.json"),
    # meta-llama/Meta-Llama-3-8B config.json: hidden_size 4096, intermediate_size 14336, num_attention_heads 32,
    # num_key_value_heads 8 (head_dim 4096/32 = 128), vocab_size 128256, rope_theta 500000
    "llama-3-8b": ModelShapes("llama-3-8b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                              vocab=128256, rope_theta=500000.0, source="meta-llama/Meta-Llama-3-8B config.json"),
    # CI smoke test: every op at a size that runs in milliseconds; K, N multiples of 32 for the GGUF blocks
    "tiny": ModelShapes("tiny", hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=256,
                        tokens=8, context=24, source="made up for CI"),
}

_CUSTOM_KEYS = {f.name: f.type for f in fields(ModelShapes) if f.name not in ("name", "source")}


def parse_shapes(spec: str) -> ModelShapes:
    """A shape-set name (see SHAPE_SETS) or a `custom:key=value,...` spec."""
    if spec in SHAPE_SETS:
        return SHAPE_SETS[spec]
    if not spec.startswith("custom:"):
        raise ValueError(f"shapes: expected one of {', '.join(SHAPE_SETS)} or "
                         f"'custom:hidden=H,intermediate=I,heads=Hq,kv_heads=Hkv,head_dim=D,vocab=V', got {spec!r}")
    values = {}
    for item in filter(None, spec[len("custom:"):].split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in _CUSTOM_KEYS:
            raise ValueError(f"shapes: in {spec!r}, expected key=value with a key among {', '.join(_CUSTOM_KEYS)}, "
                             f"got {item!r}")
        try:
            values[key] = float(raw) if key == "rope_theta" else int(raw)
        except ValueError:
            raise ValueError(f"shapes: in {spec!r}, {key} must be a number, got {raw!r}") from None
    missing = [k for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab") if k not in values]
    if missing:
        raise ValueError(f"shapes: {spec!r} is missing {', '.join(missing)}")
    return ModelShapes(name=spec, source="given on the command line", **values)


def with_lengths(shapes: ModelShapes, tokens=None, context=None) -> ModelShapes:
    """The set with the prefill length and/or decode context replaced (None keeps the set's own)."""
    changes = {k: v for k, v in (("tokens", tokens), ("context", context)) if v is not None}
    return replace(shapes, **changes) if changes else shapes
