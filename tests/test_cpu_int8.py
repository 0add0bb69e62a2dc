"""The cpu backend's int8 route (csrc/int8*.{h,cpp}): every int8 path usable on this CPU against
two independent references, the float64 reference backend under the int8 budget and a float64
emulation of the int8 arithmetic itself (which the kernel must match to fp32 rounding: a 1%
slip anywhere in scales, offsets or nibble order shows up there at once); both routes through
conformance; the route and path settings."""
import math
import os
import subprocess
import sys

import pytest
import torch

import portinfer
from portinfer.backends import quant, registry, spec
from portinfer.conformance.budget import budget, int8_magnitude, relative_error

cpu_mod = pytest.importorskip("portinfer.backends.cpu")
if cpu_mod._cpu is None:
    pytest.skip(f"cpu extension not built: {cpu_mod._IMPORT_ERROR}", allow_module_level=True)
CpuBackend = cpu_mod.CpuBackend

FORMATS = ("q8_0", "q4_0", "q4_1")
# (M, N, K): M = 1 (decode), M in 2..4, M > 4 (prefill chunks of 4 with a remainder); N not a
# multiple of the 16-row panels; K from one block up
# M = 5..8, 13 and 18 split into equal chunks of rows of x (at most 4 a call on the ymm paths, 8 on zmm)
# 8 x 1030 x 1024: many tasks of whole 16-row panels, the last panel of 6 rows
SHAPES = [(1, 37, 96), (1, 4, 32), (2, 61, 160), (3, 9, 64), (4, 64, 256), (5, 12, 64), (6, 20, 96), (7, 33, 128),
          (8, 9, 32), (13, 17, 64), (18, 70, 224), (8, 1030, 1024)]
PATHS = CpuBackend.int8_paths() if cpu_mod._cpu else []


@pytest.fixture(autouse=True)
def _restore_path():
    # M > 4 on int8 activations too, so the int8 kernels' multi-row code is what these tests check
    cpu_mod._cpu.set_int8_prefill(True)
    yield
    cpu_mod._cpu.set_int8_prefill(False)
    cpu_mod._cpu.set_simd(cpu_mod._cpu.simd_paths()[0])  # also returns the int8 path to its default


def test_prefill_runs_on_fp32_activations_by_default():
    """M > 16 (prefill): the same repacked weights, fp32 activations (the fp32 route's numbers);
    a decode step of up to 16 rows on int8."""
    cpu_mod._cpu.set_int8_prefill(False)
    be8, be32 = CpuBackend(quant_route="int8"), CpuBackend(quant_route="fp32")
    for fmt in FORMATS:
        # 17 rows: the GEMM on both routes (9..16 rows take the fp32 route's GEMV passes, summed in another order)
        x, w, b = _case(17, 70, 160, fmt, seed=11)
        y8 = be8.linear(x, be8.prepare_linear(w, torch.float32), b)
        y32 = be32.linear(x, be32.prepare_linear(w, torch.float32), b)
        assert torch.equal(y8, y32), fmt
        for m in (1, 8, 16):  # a decode step of up to 16 sequences: int8
            y1 = be8.linear(x[:m], be8.prepare_linear(w, torch.float32), b)
            assert relative_error(y1, _emulate_int8(x[:m], w, b)) <= 1e-5, (fmt, m)


def test_int8_all_route_runs_prefill_on_int8_activations():
    """cpu[int8-all]: the same repacked weights as cpu[int8], and every row count on int8 activations
    (the int8 definition to fp32 rounding at 17..40 rows, where cpu[int8] gives the fp32 route's numbers);
    a linear call's int8 mode out of range is refused. The step plans' linear node: tests/test_smollm2.py
    runs the model on cpu[int8-all]."""
    cpu_mod._cpu.set_int8_prefill(False)
    be_all, be8 = CpuBackend(quant_route="int8-all"), CpuBackend(quant_route="int8")
    assert be_all.quantizes_activations and be_all.info()["int8_path"] == be8.info()["int8_path"]
    assert "int8-all" in be_all.info()["quant_routes"].split("/")  # `portinfer backends` lists the routes
    for fmt in FORMATS:
        x, w, b = _case(40, 70, 160, fmt, seed=12)
        p_all, p8 = be_all.prepare_linear(w, torch.float32), be8.prepare_linear(w, torch.float32)
        assert torch.equal(p_all.payload, p8.payload)
        for m in (1, 8, 17, 40):
            y = be_all.linear(x[:m], p_all, b)
            assert relative_error(y, _emulate_int8(x[:m], w, b)) <= 1e-5, (fmt, m)
        assert relative_error(be8.linear(x, p8, b), _emulate_int8(x, w, b)) > 1e-4, fmt  # fp32 activations
    with pytest.raises(ValueError, match="int8 mode"):
        out = torch.empty(2, 70)
        cpu_mod._cpu.linear_int8(cpu_mod._buf(out), cpu_mod._buf(x[:2]), cpu_mod._buf(p_all.payload),
                                 cpu_mod._buf(None), 2, 70, 160, 160, 0, 2, 3)


def _case(M, N, K, fmt, seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = quant.quantize(torch.randn(N, K, generator=g) / math.sqrt(K), fmt)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _emulate_int8(x, w, b):
    """y in float64 from the int8 definition (csrc/int8.h): x quantized per block of 32 with the
    kernel's fp32 rounding (q = nearbyint(x * fp32(127 / amax)), d = amax / 127), dequantized
    weights, all products exact."""
    x32 = x.to(torch.float32)
    M, K = x32.shape
    blocks = x32.reshape(M, K // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0, dtype=torch.float32) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # torch.round: half to even, like cvtps2dq / nearbyint
    d = (amax / 127.0).to(torch.float64)
    xq = (q.to(torch.float64) * d).reshape(M, K)
    y = xq @ quant.dequantize(w, torch.float64).T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_path_matches_references(path, fmt):
    be = CpuBackend(quant_route="int8")
    be.set_int8_path(path)
    assert be.int8_path() == path and be.quantizes_activations
    for i, (M, N, K) in enumerate(SHAPES):
        x, w, b = _case(M, N, K, fmt, seed=100 * i + len(fmt), bias=i % 2 == 0)
        y = be.linear(x, be.prepare_linear(w, torch.float32), b)
        y_ref = x.double() @ quant.dequantize(w, torch.float64).T + (0 if b is None else b.double())
        # the int8 definition, to fp32 accumulation rounding
        emu = _emulate_int8(x, w, b)
        e_emu = relative_error(y, emu)
        assert e_emu <= 1e-5, f"{path} {fmt} {M}x{N}x{K}: {e_emu:.2e} off the int8 emulation"
        # the reference, under the int8 budget
        k8 = float(int8_magnitude(x, quant.dequantize(w, torch.float64)).norm() / y_ref.norm())
        bud = budget("linear", torch.float32, K, quantized_activations=True, outputs=M * N, kappa_int8=k8)
        err = relative_error(y, y_ref)
        assert err <= bud, f"{path} {fmt} {M}x{N}x{K}: error {err:.2e} > int8 budget {bud:.2e}"


K_FORMATS = ("q4_k", "q5_k", "q6_k")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_quants_on_the_int8_route(path, fmt):
    """The K-quants on the integer kernels, repacked from their super-blocks (codes, scales and mins as
    stored): the int8 definition over the same weights to fp32 rounding, and the float64 reference under
    the int8 budget. Shapes: M = 1..18 (one call, equal chunks of rows of x), N not a multiple of the
    16-row panels, K from one super-block up; many tasks of panels, the last of 2 rows."""
    be = CpuBackend(quant_route="int8")
    be.set_int8_path(path)
    for i, (M, N, K) in enumerate([(1, 37, 256), (3, 9, 512), (8, 33, 256), (16, 20, 256), (18, 70, 768),
                                   (5, 530, 1024)]):
        g = torch.Generator().manual_seed(500 + i + 10 * len(fmt))
        x = torch.randn(M, K, generator=g)
        w = quant.quantize_k(torch.randn(N, K, generator=g) / math.sqrt(K), fmt)
        b = torch.randn(N, generator=g) if i % 2 else None
        prepared = be.prepare_linear(w, torch.float32)
        assert prepared.format == fmt and prepared.extra["layout"] == "int8x16"
        y = be.linear(x, prepared, b)
        e_emu = relative_error(y, _emulate_int8(x, w, b))
        assert e_emu <= 1e-5, f"{path} {fmt} {M}x{N}x{K}: {e_emu:.2e} off the int8 emulation"
        y_ref = x.double() @ quant.dequantize(w, torch.float64).T + (0 if b is None else b.double())
        k8 = float(int8_magnitude(x, quant.dequantize(w, torch.float64)).norm() / y_ref.norm())
        bud = budget("linear", torch.float32, K, quantized_activations=True, outputs=M * N, kappa_int8=k8)
        err = relative_error(y, y_ref)
        assert err <= bud, f"{path} {fmt} {M}x{N}x{K}: error {err:.2e} > int8 budget {bud:.2e}"


@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_quants_prefill_and_non_finite_rows(fmt):
    """The K-quants' repacked panels on fp32 activations (M > 16: the GEMM decodes the records) within
    fp32 rounding of the float64 reference, and a row of x with NaN / Inf propagates like the reference's."""
    cpu_mod._cpu.set_int8_prefill(False)
    be = CpuBackend(quant_route="int8")
    g = torch.Generator().manual_seed(31)
    x = torch.randn(20, 512, generator=g)
    w = quant.quantize_k(torch.randn(45, 512, generator=g) / 20, fmt)
    prepared = be.prepare_linear(w, torch.float32)
    ref = x.double() @ quant.dequantize(w, torch.float64).T
    for simd in CpuBackend.simd_paths():  # each kernel path's decoding of the records
        CpuBackend.set_simd(simd)
        assert relative_error(be.linear(x, prepared, None), ref) <= 1e-5, simd
    CpuBackend.set_simd(CpuBackend.simd_paths()[0])
    x[1, 7], x[2, 300] = float("inf"), float("nan")
    y = be.linear(x[:3], prepared, None)
    ref = x[:3].double() @ quant.dequantize(w, torch.float64).T
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert relative_error(y[0:1], _emulate_int8(x[0:1], w, None)) <= 1e-5


@pytest.mark.parametrize("fmt", FORMATS + K_FORMATS)
def test_embedding_rows_out_of_the_int8_panels(fmt):
    """A tied output head repacked for the int8 route is the embedding table too (no dense copy): its
    rows gathered out of the 16-row panels are bitwise the rows gathered out of the GGUF blocks on the
    fp32 route (the values of quant.dequantize in ggml's fp32 order), which also pins the repacked
    layout: every code, scale and min in its place."""
    be, be32 = CpuBackend(quant_route="int8"), CpuBackend(quant_route="fp32")
    g = torch.Generator().manual_seed(41)
    w = torch.randn(23, 512, generator=g) / 20
    w = quant.quantize_k(w, fmt) if fmt in K_FORMATS else quant.quantize(w, fmt)
    prepared = be.prepare_linear(w, torch.float32)
    meta = spec.prepared_table_meta(prepared)
    assert meta["weight_format"] == f"{fmt}@int8x16" and be.supports("embedding", **meta)
    ids = torch.tensor([0, 22, 5, 3, 3, 21], dtype=torch.int64)
    rows = be.embedding(ids, prepared)
    assert torch.equal(rows, be32.embedding(ids, be32.prepare_linear(w, torch.float32)))
    assert relative_error(rows, quant.dequantize(w, torch.float64)[ids]) <= 2 ** -24


@pytest.mark.parametrize("path", PATHS)
def test_int8_paths_agree_with_portable_bitwise_quantization(path):
    """Every path quantizes x to the same bytes, so paths differ only in fp32 summation order."""
    be = CpuBackend(quant_route="int8")
    x, w, b = _case(5, 45, 192, "q4_1", seed=7)
    prepared = be.prepare_linear(w, torch.float32)
    be.set_int8_path("portable")
    y0 = be.linear(x, prepared, b)
    be.set_int8_path(path)
    y1 = be.linear(x, prepared, b)
    assert relative_error(y1, y0.double()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route,M", [("int8", 1), ("int8", 3), ("int8-all", 20)])
def test_int8_route_half_activations(dtype, route, M):
    cpu_mod._cpu.set_int8_prefill(False)
    be = CpuBackend(quant_route=route)
    x, w, b = _case(M, 50, 128, "q4_0", seed=3, dtype=dtype)
    y = be.linear(x, be.prepare_linear(w, dtype), b)
    assert y.dtype == dtype
    emu = _emulate_int8(x, w, b)
    # the int8 result rounded once to the output dtype
    assert relative_error(y, emu) <= 2 * {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype] + 1e-5


@pytest.mark.parametrize("route,M,fmt", [("int8", 3, "q8_0"), ("int8", 3, "q4_1"), ("int8-all", 20, "q4_1")])
def test_non_finite_rows_propagate_like_the_reference(route, M, fmt):
    """Rows with an Inf or a NaN take fp32 dot products (NaN / Inf land where the reference's do), the
    other rows stay on the integer kernels: M = 3 (panels where the path has them) and a prefill of
    20 rows on cpu[int8-all]."""
    cpu_mod._cpu.set_int8_prefill(False)
    be = CpuBackend(quant_route=route)
    x, w, _ = _case(M, 12, 64, fmt, seed=5)
    x[1, 7] = float("inf")
    x[2, 40] = float("nan")
    y = be.linear(x, be.prepare_linear(w, torch.float32), None)
    ref = x.double() @ quant.dequantize(w, torch.float64).T
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = [0] + list(range(3, M))
    assert relative_error(y[finite], _emulate_int8(x[finite], w, None)) <= 1e-5


def test_paths_listed_and_missing_ones_refused():
    usable = CpuBackend.int8_paths()
    assert usable[-1] == "portable"
    compiled = list(cpu_mod._cpu.int8_paths_compiled())
    assert set(usable) <= set(compiled)
    for name in compiled:
        if name not in usable:  # compiled in, but this CPU lacks the instructions: a clear refusal
            with pytest.raises(ValueError, match="lacks"):
                CpuBackend.set_int8_path(name)
    with pytest.raises(ValueError, match="usable on this CPU"):
        CpuBackend.set_int8_path("vnni9000")
    # forcing the portable kernel path makes the int8 route portable too (until chosen otherwise)
    CpuBackend.set_simd("portable")
    assert CpuBackend.int8_path() == "portable"


def test_unusable_path_from_environment_is_refused():
    compiled = list(cpu_mod._cpu.int8_paths_compiled())
    missing = [n for n in compiled if n not in CpuBackend.int8_paths()]
    name = missing[0] if missing else "nonexistent"
    code = ("import torch; from portinfer.backends.cpu import CpuBackend\n"
            "from portinfer.backends import quant\n"
            "b = CpuBackend(quant_route='int8')\n"
            "w = b.prepare_linear(quant.quantize(torch.randn(4, 32), 'q8_0'), torch.float32)\n"
            "b.linear(torch.randn(1, 32), w, None)\n")
    env = dict(os.environ, PORTINFER_CPU_INT8_PATH=name)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ValueError" in r.stderr and name in r.stderr, r.stderr[-500:]


def test_route_setting():
    assert CpuBackend(quant_route="fp32").quantizes_activations is False
    assert CpuBackend(quant_route="int8").quantizes_activations is True
    assert CpuBackend(quant_route="int8-all").quantizes_activations is True
    assert registry.get("cpu[int8-all]").quant_route == "int8-all"
    with pytest.raises(ValueError, match="quant_route"):
        CpuBackend(quant_route="int4")
    old = os.environ.get("PORTINFER_CPU_QUANT_ROUTE")
    try:
        os.environ["PORTINFER_CPU_QUANT_ROUTE"] = "fp32"
        assert registry.get("cpu").quant_route == "fp32"
        os.environ["PORTINFER_CPU_QUANT_ROUTE"] = "int8"
        assert registry.get("cpu").quantizes_activations
    finally:
        if old is None:
            os.environ.pop("PORTINFER_CPU_QUANT_ROUTE", None)
        else:
            os.environ["PORTINFER_CPU_QUANT_ROUTE"] = old
    # the backend spec of every --backend flag: cpu[int8] / cpu[fp32], over the environment's route
    try:
        os.environ["PORTINFER_CPU_QUANT_ROUTE"] = "fp32"
        assert registry.get("cpu[int8]").quant_route == "int8"
        os.environ["PORTINFER_CPU_QUANT_ROUTE"] = "int8"
        assert registry.get("cpu[fp32]").quant_route == "fp32"
    finally:
        if old is None:
            os.environ.pop("PORTINFER_CPU_QUANT_ROUTE", None)
        else:
            os.environ["PORTINFER_CPU_QUANT_ROUTE"] = old
    assert registry.parse_spec("cpu[int8]") == ("cpu", {"quant_route": "int8"})
    for bad, says in (("cpu[int4]", r"cpu\[int4\]: expected cpu\[int8\]/cpu\[fp32\]"),
                      ("reference[int8]", r"'reference' takes no \[setting\]"),
                      ("cpu[int8", "NAME\\[SETTING\\]"), ("cpu[]", "NAME\\[SETTING\\]"),
                      ("nosuch[int8]", "unknown name 'nosuch'")):
        with pytest.raises(ValueError, match=says):
            registry.get(bad)
    # the fp32 route keeps GGUF blocks; the int8 route repacks them (same bytes, 16-row panels)
    w = quant.quantize(torch.randn(8, 64), "q4_0")
    assert CpuBackend(quant_route="fp32").prepare_linear(w, torch.float32).payload.numel() == w.blocks.numel()
    assert CpuBackend(quant_route="int8").prepare_linear(w, torch.float32).extra["layout"] == "int8x16"


@pytest.mark.parametrize("route", ["int8", "fp32"])
def test_conformance_linear_and_embedding_on_both_routes(route, conformance_seed):
    res = portinfer.check(CpuBackend(quant_route=route), ops=["linear", "embedding"], dtypes=["fp32", "bf16"],
                          weight_formats=list(FORMATS) + ["q4_k", "q5_k", "q6_k"], max_examples=15,
                          seed=conformance_seed)
    assert res.passed, "\n" + res.table()


class _PlantedInt8(CpuBackend):
    """The int8 route with a 1% error planted in its output (a wrong scale)."""

    def _linear(self, x, w, bias):
        return super()._linear(x, w, bias) * 1.01


def test_conformance_catches_a_one_percent_planted_error(conformance_seed):
    res = portinfer.check(_PlantedInt8(quant_route="int8"), ops=["linear"], dtypes=["fp32"],
                          weight_formats=["q4_0"], max_examples=15, seed=conformance_seed)
    assert not res.passed, "a 1% error passed the int8 budget:\n" + res.table()
