"""A hypothesis-generated stream of invalid inputs at every entry point of the cpu backend:
each must raise ValueError before any C++ kernel runs (never a crash, a hang or a result).

The strategy builds a valid call, then breaks exactly one thing: a wrong dtype, an empty
tensor, a wrong rank or shape, a last dimension that is not contiguous, a tensor that is not
on the CPU (the meta device), a non-tensor, an index out of range, or a bad scalar."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portinfer import backends
from portinfer.backends import spec

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="the cpu backend's extension is not built here")

ACT = (torch.float32, torch.float16, torch.bfloat16)


class KernelSpy:
    """Stands in for portinfer._cpu: records every call, forwards the settings queries."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name.startswith(("get_", "simd_", "default_")):
            return fn

        def record(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return record


@pytest.fixture(scope="module")
def cpu():
    return backends.get("cpu")


def strided_last(t):
    """The same values, but the last dimension has stride 2 (last dim >= 2 guaranteed by the caller)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _tensor_breaks(t, rank_matters=True, other_dtype=False):
    """Ways to make an activation tensor argument invalid; each value is a function of the tensor."""
    breaks = {
        "float64": lambda t: t.to(torch.float64),
        "int32": lambda t: t.to(torch.int32),
        "meta": lambda t: t.to("meta"),
        "list": lambda t: t.tolist(),
        "empty": lambda t: t.new_zeros(*t.shape[:-1], 0),
    }
    if rank_matters:
        breaks["rank"] = lambda t: t.unsqueeze(0)
    if t.shape[-1] >= 2:
        breaks["strided"] = strided_last
    if other_dtype:  # must match another argument's activation dtype
        breaks["other dtype"] = lambda t: t.to(torch.float16 if t.dtype != torch.float16 else torch.bfloat16)
    return breaks


@st.composite
def bad_calls(draw, op, index):
    """One invalid call to `op`: a valid one with its `index`-th break applied (None past the last)."""
    dtype = draw(st.sampled_from(ACT))
    M, H = draw(st.integers(1, 5)), draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    i32 = torch.int32
    if op == "embedding":
        args = {"ids": torch.randint(0, 7, (M,), generator=g), "table": rnd(7, H)}
        breaks = {f"table {k}": ("table", f) for k, f in _tensor_breaks(args["table"]).items()}
        breaks.update({"ids int32": ("ids", lambda t: t.to(i32)), "ids 2-D": ("ids", lambda t: t[None]),
                       "ids >= V": ("ids", lambda t: t + 7), "ids < 0": ("ids", lambda t: t - 8),
                       "ids meta": ("ids", lambda t: t.to("meta")), "ids empty": ("ids", lambda t: t[:0])})
        call = lambda b, a: b.embedding(a["ids"], a["table"])  # noqa: E731
    elif op == "linear":
        K, N = H, draw(st.integers(2, 40))
        fmt = draw(st.sampled_from(("dense", "q8_0")))
        args = {"x": rnd(M, K if fmt == "dense" else 32), "bias": rnd(N)}
        breaks = {f"x {k}": ("x", f) for k, f in _tensor_breaks(args["x"], other_dtype=True).items()}
        breaks.update({f"bias {k}": ("bias", f) for k, f in _tensor_breaks(args["bias"], other_dtype=True).items()})
        breaks.update({"x wrong K": ("x", lambda t: torch.cat([t, t[:, :1]], 1)),
                       "bias wrong N": ("bias", lambda t: torch.cat([t, t[:1]])),
                       "w not prepared": ("w", lambda w: torch.zeros(N, 4)),
                       "w from torch": ("w", lambda w: backends.get("torch", device="cpu").prepare_linear(
                           torch.zeros(w.shape, dtype=w.dtype)))})

        k_valid = args["x"].shape[1]

        def call(b, a):
            dense = torch.randn(N, k_valid, generator=g)
            w = b.prepare_linear(dense.to(dtype) if fmt == "dense" else _quantized(dense), dtype)
            if "w_break" in a:
                w = a["w_break"](w)
            return b.linear(a["x"], w, a["bias"])
    elif op == "prepare_linear":
        args = {"weight": rnd(M + 1, H)}
        breaks = {f"weight {k}": ("weight", f) for k, f in _tensor_breaks(args["weight"]).items()
                  if k not in ("strided",)}  # a strided weight is legal at prepare time (copied once)
        breaks.update({"weight 1-D": ("weight", lambda t: t[0]), "dtype int": ("dtype", lambda d: torch.int8),
                       "dtype float64": ("dtype", lambda d: torch.float64)})
        args["dtype"] = dtype
        call = lambda b, a: b.prepare_linear(a["weight"], a["dtype"])  # noqa: E731
    elif op in ("rms_norm", "layer_norm"):
        args = {"x": rnd(M, H), "weight": rnd(H), "bias": rnd(H), "eps": 1e-5}
        breaks = {f"x {k}": ("x", f) for k, f in _tensor_breaks(args["x"]).items()}
        breaks.update({f"weight {k}": ("weight", f) for k, f in _tensor_breaks(args["weight"], other_dtype=True).items()})
        breaks.update({"weight shape": ("weight", lambda t: t[:-1]), "eps 0": ("eps", lambda e: 0.0),
                       "eps nan": ("eps", lambda e: math.nan), "eps -1": ("eps", lambda e: -1.0),
                       "eps inf": ("eps", lambda e: math.inf), "eps str": ("eps", lambda e: "1e-5")})
        if op == "layer_norm":
            breaks.update({f"bias {k}": ("bias", f) for k, f in _tensor_breaks(args["bias"], other_dtype=True).items()})
            breaks["bias shape"] = ("bias", lambda t: torch.cat([t, t]))
            call = lambda b, a: b.layer_norm(a["x"], a["weight"], a["bias"], a["eps"])  # noqa: E731
        else:
            call = lambda b, a: b.rms_norm(a["x"], a["weight"], a["eps"])  # noqa: E731
    elif op == "rope":
        D = 2 * draw(st.integers(1, 8))
        args = {"x": rnd(1, 2, M, D), "pos": torch.arange(M)[None], "rotary": spec.RotaryParams.from_theta(D)}
        breaks = {f"x {k}": ("x", f) for k, f in _tensor_breaks(args["x"]).items()}
        breaks.update({"pos int32": ("pos", lambda p: p.to(i32)), "pos shape": ("pos", lambda p: p[:, :-1] if M > 1 else p[:, :0]),
                       "pos < 0": ("pos", lambda p: p - 1), "pos meta": ("pos", lambda p: p.to("meta")),
                       "rotary too wide": ("rotary", lambda r: spec.RotaryParams.from_theta(D + 2)),
                       "rotary type": ("rotary", lambda r: r.inv_freq)})
        call = lambda b, a: b.rope(a["x"], a["pos"], a["rotary"])  # noqa: E731
    elif op == "silu_mul":
        args = {"x": rnd(M, 2 * H)}
        breaks = {f"x {k}": ("x", f) for k, f in _tensor_breaks(args["x"]).items()}
        breaks["x odd"] = ("x", lambda t: t[:, :-1])
        call = lambda b, a: b.silu_mul(a["x"])  # noqa: E731
    elif op == "gelu":
        args = {"x": rnd(M, H), "approximate": "none"}
        breaks = {f"x {k}": ("x", f) for k, f in _tensor_breaks(args["x"], rank_matters=False).items()}
        breaks.update({"x scalar": ("x", lambda t: t[0, 0]), "approximate": ("approximate", lambda s: "fast"),
                       "approximate None": ("approximate", lambda s: None)})
        call = lambda b, a: b.gelu(a["x"], a["approximate"])  # noqa: E731
    else:  # attention
        Hkv, group, Sk, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), 8
        args = {"q": rnd(1, Hkv * group, M, D), "k": rnd(1, Hkv, Sk, D), "v": rnd(1, Hkv, Sk, D),
                "q_pos": torch.tensor([0], dtype=i32), "kv_len": torch.tensor([Sk], dtype=i32),
                "causal": True, "scale": 0.3}
        breaks = {f"q {k}": ("q", f) for k, f in _tensor_breaks(args["q"]).items()}
        breaks.update({f"k {k}": ("k", f) for k, f in _tensor_breaks(args["k"], other_dtype=True).items()})
        breaks.update({f"v {k}": ("v", f) for k, f in _tensor_breaks(args["v"], other_dtype=True).items()})
        breaks.update({
            "k head dim": ("k", lambda t: t[..., :-1]), "v length": ("v", lambda t: torch.cat([t, t], 2)),
            "q heads not multiple": ("q", lambda t: torch.cat([t, t[:, :1]], 1) if Hkv == 2 else t[:, :, :, :4]),
            "q_pos int64": ("q_pos", lambda t: t.long()), "q_pos < 0": ("q_pos", lambda t: t - 1),
            "q_pos shape": ("q_pos", lambda t: torch.cat([t, t])), "kv_len > Sk": ("kv_len", lambda t: t + 1),
            "kv_len < 0": ("kv_len", lambda t: t - Sk - 1), "kv_len meta": ("kv_len", lambda t: t.to("meta")),
            "causal int": ("causal", lambda c: 1), "scale 0": ("scale", lambda s: 0.0),
            "scale nan": ("scale", lambda s: math.nan), "scale inf": ("scale", lambda s: math.inf)})
        call = lambda b, a: b.attention(a["q"], a["k"], a["v"], a["q_pos"], a["kv_len"], a["causal"], a["scale"])  # noqa: E731
    labels = sorted(breaks)
    if index >= len(labels):
        return None
    return op, labels[index], args, breaks[labels[index]], call


def _quantized(dense):
    from portinfer.backends import quant
    return quant.quantize(dense, "q8_0")


@pytest.mark.parametrize("entry", spec.OPS + ("prepare_linear",))
def test_invalid_input_is_a_value_error_before_any_kernel(cpu, entry):
    # every break of this entry point in turn, each on hypothesis-drawn sizes, dtypes and values
    for index in range(100):
        checked = []

        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=bad_calls(entry, index))
        def check(case):
            if case is not None:
                _check_rejected(cpu, case)
                checked.append(case[1])
        check()
        if not checked:
            break
    assert index > 5, f"{entry}: only {index} kinds of bad input were generated"


def _check_rejected(cpu, case):
    import portinfer.backends.cpu as cpu_module
    op, label, args, (name, breaker), call = case
    args = dict(args)
    if name == "w":
        args["w_break"] = breaker
    else:
        args[name] = breaker(args[name])
    spy = KernelSpy(cpu_module._cpu)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_module, "_cpu", spy)
        with pytest.raises(ValueError):
            call(cpu, args)
    # prepare_linear of a *valid* weight may run (linear cases prepare one), nothing else may
    # (pack_dense for dense weights; int8_panel_bytes / int8_repack for blocks on the int8 route)
    ran = [c for c in spy.calls if c not in ("pack_dense", "int8_panel_bytes", "int8_repack") or op == "prepare_linear"]
    assert ran == [], f"{op} with {label}: kernels {ran} ran before the bad input was rejected"


def test_settings_reject_bad_values(cpu):
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        cpu.set_num_threads(0)
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        cpu.set_num_threads(2.5)
    with pytest.raises(ValueError, match="simd: expected one of the paths usable on this CPU"):
        cpu.set_simd("sse9")
    with pytest.raises(ValueError, match="device: the cpu backend runs on 'cpu'"):
        backends.get("cpu", device="cuda")
