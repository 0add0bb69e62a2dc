"""npu-sim: registered as a plugin, checked op by op, its weight layout, its fp32 cube
accumulation, and what placement does around it (fallback with counted bytes, strict mode).

Its full conformance run (every supported op and dtype vs the float64 reference) happens in
test_conformance.py, which picks every available backend up, npu-sim included."""
import json
import math
import warnings

import pytest
import torch

import portinfer
from portinfer import cli
from portinfer.backends import quant, registry, spec
from portinfer.backends.npu_sim import NpuSimBackend
from portinfer.backends.placement import FallbackError, FallbackWarning, Placement
from portinfer.backends.reference import ReferenceBackend

from conftest import CONFORMANCE_SEED

LLAMA_OPS = ("embedding", "linear", "rms_norm", "rope", "silu_mul", "attention")


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- registration and check

def test_registered_through_the_entry_point_like_a_plugin():
    assert "npu-sim" not in registry.BUILTIN
    entry = registry.entry("npu-sim")
    assert entry.origin == "entry point (portinfer)"
    assert entry.target == "portinfer.backends.npu_sim:NpuSimBackend"
    assert entry.status() == (True, "")
    assert registry.auto_name() != "npu-sim"


def test_check_passes_supported_ops_and_lists_the_rest_as_unsupported(capsys):
    code = cli.main(["check", "--backend", "npu-sim", "--profile", "small", "--max-examples", "4",
                     "--seed", str(CONFORMANCE_SEED), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"]
    status = {(r["op"], r["dtype"]): r for r in report["results"]}
    for (op, dtype), r in status.items():
        base, _, variant = op.partition("[")
        # npu-sim lists no prepared-table formats (Backend.embedding_table_formats): dense tables only
        supported = (dtype != "fp32" and base in ("embedding", "linear", "rms_norm", "silu_mul", "attention")
                     and not (base == "embedding" and variant.rstrip("]") not in ("", "dense")))
        assert r["status"] == ("pass" if supported else "unsupported"), (op, dtype, r["status"])
        assert (r["cases"] > 0) == supported
    assert status[("linear[q4_1]", "bf16")]["status"] == "pass"


# ----------------------------------------------------------------------------- how it computes

def test_prepare_linear_converts_to_the_padded_fractal_layout():
    backend = NpuSimBackend()
    w = torch.randn(20, 37)  # N=20, K=37: padded to 32 and 48, i.e. 2 x 3 tiles of 16x16
    prepared = backend.prepare_linear(w, torch.bfloat16)
    fractal = prepared.payload
    assert tuple(fractal.shape) == (2, 3, 16, 16) and fractal.dtype == torch.bfloat16
    assert prepared.format == "fractal-bf16" and prepared.source_format == "fp32"
    w16 = w.to(torch.bfloat16)
    for n in (0, 7, 19):
        for kt in range(3):
            cols = w16[n, kt * 16:(kt + 1) * 16]
            assert torch.equal(fractal[n // 16, kt, n % 16, :cols.numel()], cols)
    assert not fractal[:, 2, :, 5:].any() and not fractal[1, :, 4:].any()  # zeros beyond K=37 and N=20
    assert backend.weight_bytes == nbytes(fractal)


def test_cube_accumulates_in_fp32():
    # K = 8192 in bf16 with w = 1/16: every 16x16x16 tile adds exactly 1.0, 512 tiles make 512.
    # A bf16 accumulator stalls at 256 (256 + 1 rounds back to 256); fp32 holds 512 exactly.
    backend = NpuSimBackend()
    x = torch.ones(1, 8192, dtype=torch.bfloat16)
    w = backend.prepare_linear(torch.full((3, 8192), 1 / 16, dtype=torch.bfloat16))
    assert backend.linear(x, w).tolist() == [[512.0, 512.0, 512.0]]


def test_gguf_weights_are_computed_from_their_blocks_not_rerounded():
    # each output must be the quantized matrix's exact product rounded once to fp16: within one
    # fp16 ulp plus an fp32 accumulation bound (2 sqrt(K) u32 sum|x w|, which only matters where
    # the output cancels). Dequantized weights rounded to fp16 are off by ~u16 sum|x w| there.
    backend = NpuSimBackend()
    g = torch.Generator().manual_seed(0)
    for fmt in ("q8_0", "q4_0", "q4_1"):
        w = quant.quantize(torch.randn(96, 256, generator=g) / 16, fmt)
        x = (torch.randn(16, 256, generator=g) * 4).to(torch.float16)
        prepared = backend.prepare_linear(w, torch.float16)
        assert prepared.source_format == fmt and prepared.format == "fractal-fp16"
        y = backend.linear(x, prepared).double()
        dense = quant.dequantize(w, torch.float64)
        exact = x.double() @ dense.T
        tolerance = (torch.finfo(torch.float16).eps * exact.abs().clamp_min(2.0 ** -14)
                     + 2 * 256 ** 0.5 * 2.0 ** -24 * (x.double().abs() @ dense.abs().T))
        off = int(((y - exact).abs() > tolerance).sum())
        assert off == 0, f"{fmt}: {off} outputs off by more than 1 ulp + the fp32 accumulation bound"


def test_refuses_what_it_lacks_and_a_device_it_does_not_emulate():
    backend = NpuSimBackend()
    with pytest.raises(spec.UnsupportedOpError, match="'npu-sim' does not support rms_norm with .*'dtype': 'fp32'"):
        backend.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    x = torch.randn(1, 1, 2, 8, dtype=torch.float16)
    with pytest.raises(spec.UnsupportedOpError, match="does not support rope"):
        backend.rope(x, torch.zeros(1, 2, dtype=torch.int64), spec.RotaryParams.from_theta(8))
    with pytest.raises(ValueError, match="device: npu-sim emulates its memory on the CPU, expected 'cpu', got 'meta'"):
        NpuSimBackend("meta")


BF16 = torch.bfloat16


@pytest.mark.parametrize("call, message", [
    (lambda b, w: b.linear(torch.randn(2, 5, dtype=BF16), w), r"x: expected K = 4"),
    (lambda b, w: b.linear(torch.randn(2, 4, dtype=torch.float16), w), r"x: expected dtype bf16"),
    (lambda b, w: b.linear(torch.randn(2, 4, dtype=BF16), w, torch.randn(4, dtype=BF16)), r"bias: expected shape \[3\]"),
    (lambda b, w: b.linear(torch.randn(4, 2, dtype=BF16).T, w), r"x: expected unit stride in the last dimension"),
], ids=["wrong K", "dtype mismatch", "bias shape", "strided x"])
def test_bad_linear_input_is_a_value_error_before_the_cube_runs(call, message):
    # the bf16 counterparts of test_bad_input.py's linear cases, which are built in fp32
    backend = NpuSimBackend()
    w = backend.prepare_linear(torch.randn(3, 4, dtype=BF16))
    backend._linear = lambda *a: pytest.fail("the kernel ran on bad input")
    with pytest.raises(ValueError, match=message):
        call(backend, w)


# ----------------------------------------------------------------------------- placement around it

def test_fallback_crosses_its_memory_through_the_hooks_and_counts_the_bytes():
    sim = NpuSimBackend()
    p = Placement(sim, torch.bfloat16, fallback="warn")
    x = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16)
    pos = torch.arange(5).repeat(2, 1) + 7
    rotary = spec.RotaryParams.from_theta(16)
    with pytest.warns(FallbackWarning, match="rope falls back to torch on cpu: backend 'npu-sim' does not support rope"):
        y = p.rope(x, pos, rotary)
    ref = ReferenceBackend().rope(x, pos, rotary)
    assert torch.allclose(y.float(), ref.float(), atol=3e-2)
    h = torch.randn(4, 16, dtype=torch.bfloat16)
    p.rms_norm(h, torch.ones(16, dtype=torch.bfloat16), 1e-6)  # supported: runs on npu-sim, nothing crosses
    rows = {r.op: r for r in p.report().rows}
    assert (rows["rope"].backend, rows["rope"].device, rows["rope"].calls) == ("torch", "cpu", 1)
    assert rows["rope"].bytes_copied == nbytes(x, pos) + nbytes(y)  # inputs out of npu-sim, result back in
    assert (rows["rms_norm"].backend, rows["rms_norm"].reason, rows["rms_norm"].bytes_copied) == ("npu-sim", "", 0)
    assert (sim.bytes_from_device, sim.bytes_to_device) == (nbytes(x, pos), nbytes(y))
    assert p.report().bytes_copied == nbytes(x, pos, y)


def test_fp32_falls_back_whole_and_every_linear_call_counts_its_crossing():
    sim = NpuSimBackend()
    p = Placement(sim, torch.float32, fallback="allow")
    w = quant.quantize(torch.randn(24, 64) / 8, "q8_0")
    prepared = p.prepare_linear(w)
    assert prepared.backend == "torch"
    x = torch.randn(3, 64)
    for _ in range(2):
        y = p.linear(x, prepared)
    expected = x.double() @ quant.dequantize(w, torch.float64).T
    assert (y.double() - expected).norm() / expected.norm() < 1e-5
    (row,) = p.report().rows
    assert (row.op, row.backend, row.calls) == ("linear", "torch", 2)
    assert row.bytes_copied == 2 * nbytes(x, y)
    assert (sim.bytes_from_device, sim.bytes_to_device) == (2 * nbytes(x), 2 * nbytes(y))


def test_strict_mode_refuses_before_running_and_lists_the_missing_ops():
    sim = NpuSimBackend()
    p = Placement(sim, torch.bfloat16, fallback="error")
    with pytest.raises(FallbackError) as exc:
        p.require()
    assert str(exc.value) == ("backend 'npu-sim' does not support layer_norm, rope, gelu for dtype bf16, and "
                              "fallback='error' forbids running them elsewhere; use fallback='warn' or 'allow', "
                              "another dtype, or implement those ops")
    with pytest.raises(FallbackError, match="does not support rope for dtype bf16"):
        p.require(LLAMA_OPS)
    fp32 = Placement(sim, torch.float32, fallback="error")
    with pytest.raises(FallbackError, match="does not support embedding, linear, rms_norm, layer_norm, rope, "
                                            "silu_mul, gelu, attention for dtype fp32"):
        fp32.require()
    x = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(FallbackError, match="rope: backend 'npu-sim' does not support rope"):
        p.rope(x, torch.zeros(1, 3, dtype=torch.int64), spec.RotaryParams.from_theta(8))
    assert (sim.bytes_from_device, sim.bytes_to_device) == (0, 0) and p.report().rows == []


# ----------------------------------------------------------------------------- a decoder layer on it

def _tiny_decoder(p, weights, ids, heads=4, kv_heads=2, head_dim=16):
    """One llama-style layer plus the LM head, every op through the placement `p`."""
    S = ids.shape[0]
    rotary = spec.RotaryParams.from_theta(head_dim)
    pos = torch.arange(S)[None]
    h = p.embedding(ids, weights["embed"])  # [S, H]
    qkv = p.linear(p.rms_norm(h, weights["norm1"], 1e-5), weights["qkv"])  # [S, (heads + 2 kv_heads) * D]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q = p.rope(q.reshape(1, S, heads, head_dim).transpose(1, 2), pos, rotary)  # [1, heads, S, D]
    k = p.rope(k.reshape(1, S, kv_heads, head_dim).transpose(1, 2), pos, rotary)
    v = v.reshape(1, S, kv_heads, head_dim).transpose(1, 2)
    zero, length = torch.zeros(1, dtype=torch.int32), torch.full((1,), S, dtype=torch.int32)
    a = p.attention(q, k, v, zero, length).transpose(1, 2).reshape(S, heads * head_dim)
    h = h + p.linear(a, weights["o"])
    h = h + p.linear(p.silu_mul(p.linear(p.rms_norm(h, weights["norm2"], 1e-5), weights["gate_up"])), weights["down"])
    return p.linear(p.rms_norm(h, weights["norm3"], 1e-5), weights["head"])  # [S, V]


def test_a_decoder_layer_runs_on_npu_sim_with_rope_falling_back():
    g = torch.Generator().manual_seed(0)
    H, V, I, D = 64, 50, 96, 16
    raw = {"embed": torch.randn(V, H, generator=g), "qkv": torch.randn(128, H, generator=g) / 8,
           "o": torch.randn(H, 64, generator=g) / 8, "gate_up": torch.randn(2 * I, H, generator=g) / 8,
           "down": torch.randn(H, I, generator=g) / 10, "head": torch.randn(V, H, generator=g) / 8,
           "norm1": 1 + torch.randn(H, generator=g) / 10, "norm2": 1 + torch.randn(H, generator=g) / 10,
           "norm3": 1 + torch.randn(H, generator=g) / 10}
    ids = torch.randint(0, V, (9,), generator=g)

    def run(backend, dtype, fallback):
        p = Placement(backend, dtype, fallback=fallback)
        p.require(LLAMA_OPS)
        weights = {n: (p.prepare_linear(w.to(dtype)) if w.dim() == 2 and n != "embed" else w.to(dtype))
                   for n, w in raw.items()}
        return _tiny_decoder(p, weights, ids), p

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, p = run(NpuSimBackend(), torch.bfloat16, "warn")
    assert [str(w.message).split(":")[0] for w in caught] == ["rope falls back to torch on cpu"]
    expected, _ = run(ReferenceBackend(exact=False), torch.float32, "error")
    assert logits.dtype == torch.bfloat16
    assert (logits.double() - expected.double()).norm() / expected.double().norm() < 3e-2
    rows = {r.op: r for r in p.report().rows}
    assert {op for op, r in rows.items() if r.reason} == {"rope"}
    assert all(rows[op].backend == "npu-sim" and rows[op].bytes_copied == 0 for op in rows if op != "rope")
    # q [1, 4, 9, 16] and k [1, 2, 9, 16] bf16 out and back, plus pos int64 [1, 9] out, per call
    q_bytes, k_bytes, pos_bytes = 4 * 9 * 16 * 2, 2 * 9 * 16 * 2, 9 * 8
    assert rows["rope"].calls == 2 and rows["rope"].bytes_copied == 2 * (q_bytes + k_bytes) + 2 * pos_bytes
    assert not math.isnan(float(logits.float().sum()))
