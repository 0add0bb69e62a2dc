"""Hypothesis strategies for every op of the contract.

A strategy draws a small dict of *parameters* (shapes, layouts, magnitudes, a tensor seed);
`build(op, params, dtype)` turns it into concrete CPU tensors (generated in fp32 from the
seed, then rounded to the activation dtype: the reference and the backend see the same
rounded inputs). Drawing parameters rather than tensors keeps shrinking meaningful: a
failure shrinks to the smallest shape and simplest layout that still fails.

What the strategies cover, per DESIGN.md: odd sizes and sizes that are no multiple of any
tile, Sq = 1, Hq/Hkv ratios 1..8, strided views (fused projections, a KV cache longer than
kv_len, padded rows), large magnitudes for softmax/exp stability, fully masked rows.

Profiles: "full" (shapes large enough to cross tile boundaries) and "small" (for slow
executors such as the Triton interpreter).
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from ..backends import quant, spec
from . import budget as budget_mod

PROFILES = ("full", "small")

# per profile: upper bounds of the drawn sizes
_LIMITS = {
    "full": dict(rows=48, cols=640, vocab=300, heads_kv=3, seq_q=40, seq_k=96, batch=3, head_dims=(8, 16, 32, 48, 64, 80, 128)),
    "small": dict(rows=6, cols=96, vocab=40, heads_kv=2, seq_q=6, seq_k=20, batch=2, head_dims=(8, 16, 32)),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale + offset


def _strided_rows(t, pad):
    """A view of `t` [..., C] whose rows are `pad` elements longer than C in memory."""
    if pad == 0:
        return t
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + pad, dtype=t.dtype)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


seeds = st.integers(0, 2 ** 31 - 1)


# ---------------------------------------------------------------------------- strategies

@st.composite
def embedding_params(draw, profile="full", table="dense"):
    """table: 'dense' (a [V, H] tensor), 'prepared' (a dense weight in the activation dtype, prepared by
    the backend: a tied output head) or a GGUF block format (blocks prepared by the backend)."""
    lim = _LIMITS[profile]
    block = spec.QUANT_FORMATS[table][0] if table in spec.QUANT_FORMATS else 1
    H = block * draw(st.integers(1, max(1, lim["cols"] // block))) if block > 1 else draw(st.integers(1, lim["cols"]))
    return dict(V=draw(st.integers(1, lim["vocab"])), H=H, N=draw(st.integers(1, 2 * lim["rows"])),
                pad=draw(st.sampled_from((0, 0, 3))) if table == "dense" else 0, table=table, seed=draw(seeds))


@st.composite
def linear_params(draw, profile="full", weight_format="dense"):
    lim = _LIMITS[profile]
    if weight_format in spec.K_QUANT_FORMATS:
        # K-quant super-blocks are 256 weights: one or two of them, and few output rows to keep it cheap
        K = 256 * draw(st.integers(1, max(1, lim["cols"] // 256)))
        return dict(M=draw(st.integers(1, lim["rows"])), K=K, N=draw(st.integers(1, max(2, lim["cols"] // 10))),
                    bias=draw(st.booleans()), pad=draw(st.sampled_from((0, 0, 5))), weight_format=weight_format,
                    seed=draw(seeds))
    if weight_format == "dense":
        K = draw(st.integers(1, lim["cols"]))
    else:
        K = 32 * draw(st.integers(1, max(1, lim["cols"] // 32)))
    N = draw(st.integers(1, lim["cols"] // 2))
    return dict(M=draw(st.integers(1, lim["rows"])), K=K, N=N,
                bias=draw(st.booleans()), pad=draw(st.sampled_from((0, 0, 5))), weight_format=weight_format,
                seed=draw(seeds))


@st.composite
def norm_params(draw, profile="full"):
    lim = _LIMITS[profile]
    return dict(M=draw(st.integers(1, lim["rows"])), H=draw(st.integers(1, 2 * lim["cols"])),
                eps=draw(st.sampled_from((1e-5, 1e-6))), scale=draw(st.sampled_from((1.0, 1.0, 30.0))),
                offset=draw(st.sampled_from((0.0, 0.0, 4.0))), pad=draw(st.sampled_from((0, 0, 7))),
                seed=draw(seeds))


@st.composite
def rope_params(draw, profile="full"):
    lim = _LIMITS[profile]
    D = draw(st.sampled_from(lim["head_dims"]))
    rotary_dim = draw(st.sampled_from(sorted({D, D, max(2, D // 2 // 2 * 2)})))
    return dict(B=draw(st.integers(1, lim["batch"])), H=draw(st.integers(1, 2 * lim["heads_kv"])),
                S=draw(st.integers(1, lim["seq_q"])), D=D, rotary_dim=rotary_dim,
                style=draw(st.sampled_from(("neox", "interleaved"))),
                theta=draw(st.sampled_from((10000.0, 500000.0))),
                max_pos=draw(st.sampled_from((0, 64, 4096))), seq_major=draw(st.booleans()), seed=draw(seeds))


@st.composite
def silu_mul_params(draw, profile="full"):
    lim = _LIMITS[profile]
    return dict(M=draw(st.integers(1, lim["rows"])), I=draw(st.integers(1, lim["cols"])),
                scale=draw(st.sampled_from((1.0, 1.0, 12.0))), pad=draw(st.sampled_from((0, 0, 3))),
                seed=draw(seeds))


@st.composite
def gelu_params(draw, profile="full"):
    lim = _LIMITS[profile]
    shape = draw(st.lists(st.integers(1, lim["rows"]), min_size=0, max_size=2)) + [draw(st.integers(1, lim["cols"]))]
    return dict(shape=shape, approximate=draw(st.sampled_from(("none", "tanh"))),
                scale=draw(st.sampled_from((1.0, 1.0, 10.0))), seed=draw(seeds))


@st.composite
def attention_params(draw, profile="full"):
    lim = _LIMITS[profile]
    B = draw(st.integers(1, lim["batch"]))
    Sk = draw(st.integers(1, lim["seq_k"]))
    Sq = draw(st.one_of(st.just(1), st.integers(1, lim["seq_q"])))
    causal = draw(st.booleans())
    # per sequence: kv_len in [0, Sk] (0 = a fully masked sequence), q_pos in [0, Sk]
    kv_len = draw(st.lists(st.one_of(st.just(Sk), st.integers(0, Sk)), min_size=B, max_size=B))
    q_pos = [draw(st.one_of(st.just(max(0, k - Sq)), st.integers(0, Sk))) for k in kv_len]
    return dict(B=B, Hkv=draw(st.integers(1, lim["heads_kv"])), group=draw(st.integers(1, 8)), Sq=Sq, Sk=Sk,
                D=draw(st.sampled_from(lim["head_dims"])), causal=causal, kv_len=kv_len, q_pos=q_pos,
                magnitude=draw(st.sampled_from((1.0, 1.0, 3.0, 6.0))), fused_q=draw(st.booleans()),
                cache_pad=draw(st.sampled_from((0, 0, 5))), seed=draw(seeds))


def edge_examples(op, variant=None) -> list:
    """Fixed cases run on every check besides the random ones (hypothesis finds these only by chance).

    Every op: one case of 512 to 1024 outputs, so the bias test (budget.bias_statistics) has the
    samples to see a systematic error within the L2 budget -- a 1% scale error or results rounded
    toward zero in bf16 -- on every seed, whatever sizes the random examples draw.
    Attention also: key counts at tile boundaries (63/64/65, 127/128/129), Sq = 1, a fully masked
    row, GQA ratio 8, one head, and a prefill chunk across a boundary."""
    if op == "embedding":
        table = variant or "dense"
        return [dict(V=40, H=256 if table in spec.K_QUANT_FORMATS else 64, N=16, pad=0, table=table, seed=11)]
    if op == "linear":
        fmt = variant or "dense"
        K = 256 if fmt in spec.K_QUANT_FORMATS else 64
        return [dict(M=8, K=K, N=64, bias=True, pad=0, weight_format=fmt, seed=12)]
    if op in ("rms_norm", "layer_norm"):
        return [dict(M=4, H=160, eps=1e-6, scale=1.0, offset=0.0, pad=0, seed=13)]
    if op == "rope":
        return [dict(B=1, H=4, S=8, D=32, rotary_dim=32, style="neox", theta=10000.0, max_pos=64, seq_major=False,
                     seed=14)]
    if op == "silu_mul":
        return [dict(M=8, I=80, scale=1.0, pad=0, seed=15)]
    if op == "gelu":
        return [dict(shape=[8, 80], approximate="none", scale=1.0, seed=16)]
    if op != "attention":
        return []
    base = dict(B=1, Hkv=1, group=1, Sq=1, Sk=64, D=16, causal=True, kv_len=[64], q_pos=[63], magnitude=1.0,
                fused_q=False, cache_pad=0, seed=0)
    cases = [dict(base, B=2, Hkv=2, group=2, Sq=8, Sk=40, kv_len=[40, 37], q_pos=[32, 29], seed=17)]  # 1024 outputs
    cases += [dict(base, Sk=n, kv_len=[n], q_pos=[n - 1]) for n in (63, 64, 65, 127, 128, 129)]  # decode, H = 1
    cases += [dict(base, Sk=129, kv_len=[129], q_pos=[121], Sq=8),  # a prefill chunk across the 128 boundary
              dict(base, Sk=65, kv_len=[65], q_pos=[0], Sq=1, causal=False),
              dict(base, B=2, Sk=5, kv_len=[0, 5], q_pos=[0, 4]),  # sequence 0: every row fully masked
              dict(base, B=2, Sk=65, Sq=3, kv_len=[65, 0], q_pos=[62, 0], causal=False),
              dict(base, Hkv=2, group=8, Sk=64, kv_len=[64], q_pos=[63]),  # GQA ratio 8
              dict(base, Hkv=1, group=8, Sq=4, Sk=128, kv_len=[128], q_pos=[124], fused_q=True, cache_pad=5)]
    return cases


def strategy(op, profile="full", variant=None):
    if op == "linear":
        return linear_params(profile, variant or "dense")
    if op == "embedding":
        return embedding_params(profile, variant or "dense")
    return {
        "embedding": embedding_params, "rms_norm": norm_params, "layer_norm": norm_params,
        "rope": rope_params, "silu_mul": silu_mul_params, "gelu": gelu_params, "attention": attention_params,
    }[op](profile)


# variants: linear is checked once per weight format; embedding once per kind of table (a tensor, or the
# rows of a prepared weight: dense, or each block format), on backends with Backend.embedding_table_formats
LINEAR_VARIANTS = ("dense",) + tuple(spec.QUANT_FORMATS)
EMBEDDING_VARIANTS = ("dense", "prepared") + tuple(spec.QUANT_FORMATS)


def variants(op):
    return {"linear": LINEAR_VARIANTS, "embedding": EMBEDDING_VARIANTS}.get(op, (None,))


# ---------------------------------------------------------------------------- building inputs

class Case:
    """Concrete inputs for one op call, plus what the budget needs (reduction length, cond)."""

    def __init__(self, op, params, dtype):
        self.op, self.params, self.dtype = op, params, dtype
        self.reduction, self.cond = 1, 0.0
        self.magnitude = None  # float64 tensor that rounding errors scale with (budget.py: kappa)
        self.bias_check = True  # whether a correct kernel's rounding errors are symmetric here (budget.py)
        self._int8_operands = None  # linear: (x, exact weights) for magnitude_int8, computed on first use
        getattr(self, "_build_" + op)(params, dtype)

    @property
    def magnitude_int8(self):
        """The magnitude int8 activation rounding scales with (budget.py: kappa8; linear), or None. Only a
        backend that quantizes activations needs it, so it is computed on first use."""
        if self._int8_operands is None:
            return None
        if not hasattr(self, "_magnitude_int8"):
            self._magnitude_int8 = budget_mod.int8_magnitude(*self._int8_operands)
        return self._magnitude_int8

    def _build_embedding(self, p, dtype):
        table = p.get("table", "dense")
        w = _randn((p["V"], p["H"]), p["seed"])
        self.table = _strided_rows(w.to(dtype), p["pad"]) if table in ("dense", "prepared") else quant.quantize(w, table)
        self.prepared = table != "dense"  # run() prepares it on the backend, as a tied head would be
        self.ids = torch.randint(0, p["V"], (p["N"],), generator=_gen(p["seed"] + 1))
        self._prepared = {}

    def prepared_table(self, backend):
        """The table prepared by `backend` (once per backend and case)."""
        if backend.name not in self._prepared:
            self._prepared[backend.name] = backend.prepare_linear(self.table, self.dtype)
        return self._prepared[backend.name]

    def _build_linear(self, p, dtype):
        s = p["seed"]
        self.x = _strided_rows(_randn((p["M"], p["K"]), s).to(dtype), p["pad"])
        w = _randn((p["N"], p["K"]), s + 1, scale=1.0 / math.sqrt(p["K"]))
        self.weight = w.to(dtype) if p["weight_format"] == "dense" else quant.quantize(w, p["weight_format"])
        self.bias = _randn((p["N"],), s + 2).to(dtype) if p["bias"] else None
        self.reduction = p["K"]
        exact_w = self.weight.double() if p["weight_format"] == "dense" else quant.dequantize(self.weight, torch.float64)
        square = self.x.double() ** 2 @ (exact_w ** 2).T
        if self.bias is not None:
            square = square + self.bias.double() ** 2
        self.magnitude = square.sqrt()
        self._int8_operands = (self.x, exact_w)

    def _build_rms_norm(self, p, dtype):
        s = p["seed"]
        self.x = _strided_rows(_randn((p["M"], p["H"]), s, p["scale"], p["offset"]).to(dtype), p["pad"])
        self.weight = _randn((p["H"],), s + 1, 0.5, 1.0).to(dtype)
        self.bias = _randn((p["H"],), s + 2).to(dtype)
        self.eps = p["eps"]
        self.reduction = p["H"]

    def _build_layer_norm(self, p, dtype):
        self._build_rms_norm(p, dtype)
        # x - mean cancels: an fp32 rounding of x (about u |x|) becomes u |x| / sigma of the normalized
        # output, so a row whose values spread little against their size (a large offset, or two values
        # close together) is ill-conditioned by rms(x) / sqrt(var + eps): kappa for the fp32 term
        x = self.x.double()
        var = x.var(dim=1, unbiased=False, keepdim=True)
        rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
        self.magnitude = self.weight.double().abs()[None, :] * rms / (var + self.eps).sqrt()
        # a row of two normalizes to +-sqrt(var / (var + eps)), a hair inside +-1: its outputs sit just
        # short of w + b or b - w, values a 16-bit dtype often holds exactly, so rounding moves them all
        # the same way and the bias statistic's symmetry does not hold (the L2 budget still applies)
        self.bias_check = p["H"] > 2

    def _build_rope(self, p, dtype):
        s = p["seed"]
        B, H, S, D = p["B"], p["H"], p["S"], p["D"]
        x = _randn((B, S, H, D), s) if p["seq_major"] else _randn((B, H, S, D), s)
        x = x.to(dtype)
        # seq-major storage ([B, S, H, D], as a projection writes it) seen as [B, H, S, D]
        self.x = x.transpose(1, 2) if p["seq_major"] else x
        start = torch.randint(0, p["max_pos"] + 1, (B, 1), generator=_gen(s + 1))
        self.pos = (start + torch.arange(S)).to(torch.int64)
        self.rotary = spec.RotaryParams.from_theta(D, p["theta"], p["rotary_dim"], p["style"])
        self.cond = float(self.pos.max()) * float(self.rotary.inv_freq.max())

    def _build_silu_mul(self, p, dtype):
        self.x = _strided_rows(_randn((p["M"], 2 * p["I"]), p["seed"], p["scale"]).to(dtype), p["pad"])

    def _build_gelu(self, p, dtype):
        self.x = _randn(tuple(p["shape"]), p["seed"], p["scale"]).to(dtype)
        self.approximate = p["approximate"]
        self.magnitude = self.x.double().abs()

    def _build_attention(self, p, dtype):
        s = p["seed"]
        B, Hkv, Sq, Sk, D = p["B"], p["Hkv"], p["Sq"], p["Sk"], p["D"]
        Hq = Hkv * p["group"]
        a = p["magnitude"]
        if p["fused_q"]:
            # q as a view of a fused [B, Sq, Hq + 2 Hkv, D] projection: strides (.., D, row, 1)
            fused = _randn((B, Sq, Hq + 2 * Hkv, D), s, a).to(dtype)
            self.q = fused[:, :, :Hq].transpose(1, 2)
        else:
            self.q = _randn((B, Hq, Sq, D), s, a).to(dtype)
        # k, v as the first Sk positions of a longer cache [B, Hkv, Sk + pad, D]
        cache = Sk + p["cache_pad"]
        self.k = _randn((B, Hkv, cache, D), s + 1, a).to(dtype)[:, :, :Sk]
        self.v = _randn((B, Hkv, cache, D), s + 2).to(dtype)[:, :, :Sk]
        self.q_pos = torch.tensor(p["q_pos"], dtype=torch.int32)
        self.kv_len = torch.tensor(p["kv_len"], dtype=torch.int32)
        self.causal = p["causal"]
        self.scale = D ** -0.5
        self.reduction = Sk
        group = p["group"]
        logits = (self.q.double() @ self.k.double().repeat_interleave(group, 1).transpose(-1, -2)) * self.scale
        self.cond = math.sqrt(D) * float(logits.abs().max())

    # ------------------------------------------------------------------------ running

    def meta(self, backend=None):
        """What `supports` is asked before the case runs (a prepared embedding table: by `backend`)."""
        meta = {"dtype": self.dtype}
        if self.op == "embedding" and self.prepared:
            if backend is None or not backend.embedding_table_formats:
                return {**meta, "table": "prepared"}
            meta.update(spec.prepared_table_meta(self.prepared_table(backend)))
        elif self.op == "linear":
            meta["weight_format"] = spec.weight_format(self.weight)
        elif self.op == "attention":
            meta.update(D=self.q.shape[-1], causal=self.causal, gqa=self.q.shape[1] // self.k.shape[1],
                        Sq=self.q.shape[2], Sk=self.k.shape[2])
        elif self.op == "rope":
            meta.update(style=self.rotary.style, D=self.x.shape[-1], rotary_dim=self.rotary.rotary_dim)
        elif self.op == "gelu":
            meta["approximate"] = self.approximate
        return meta

    def run(self, backend):
        """Call the op on `backend` (inputs moved to its device, views kept as views)."""
        dev = backend.device

        def on(t):
            return t if t is None or t.device == dev else _to_device_keep_strides(t, dev)

        op = self.op
        if op == "embedding":
            return backend.embedding(on(self.ids), self.prepared_table(backend) if self.prepared else on(self.table))
        if op == "linear":
            w = backend.prepare_linear(self.weight, self.dtype)
            return backend.linear(on(self.x), w, on(self.bias))
        if op == "rms_norm":
            return backend.rms_norm(on(self.x), on(self.weight), self.eps)
        if op == "layer_norm":
            return backend.layer_norm(on(self.x), on(self.weight), on(self.bias), self.eps)
        if op == "rope":
            return backend.rope(on(self.x), on(self.pos), self.rotary)
        if op == "silu_mul":
            return backend.silu_mul(on(self.x))
        if op == "gelu":
            return backend.gelu(on(self.x), self.approximate)
        if op == "attention":
            return backend.attention(on(self.q), on(self.k), on(self.v), on(self.q_pos), on(self.kv_len),
                                     self.causal, self.scale)
        raise ValueError(f"op: unknown {op!r}")


def _to_device_keep_strides(t, device):
    """Copy a (possibly strided) view to `device`, preserving its strides."""
    if t.is_contiguous():
        return t.to(device)
    base = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    base.copy_(t)
    return base


def describe(op, params) -> str:
    """A compact one-line description of a case, for tables and failure reports."""
    p = dict(params)
    seed = p.pop("seed", None)
    return ", ".join(f"{k}={v}" for k, v in p.items()) + (f", seed={seed}" if seed is not None else "")
