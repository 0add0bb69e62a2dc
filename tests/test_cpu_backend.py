"""The cpu backend beyond the conformance suite: every compiled instruction-set path (the
portable fallback included) against the float64 reference, the shapes the conformance
strategies do not reach (decode attention split over keys, long K across GEMM blocks),
thread-count independence, the environment settings, and the probe without the extension."""
import math
import os
import subprocess
import sys

import pytest
import torch

import portinfer
from portinfer import backends
from portinfer.backends import quant, spec
from portinfer.backends.reference import ReferenceBackend
from portinfer.conformance.budget import budget, relative_error

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="the cpu backend's extension is not built here")

PATHS = backends.get("cpu").simd_paths() if backends.available("cpu") else []
REFERENCE = ReferenceBackend(exact=True)
i32 = torch.int32


@pytest.fixture
def cpu():
    # the fp32 route: these tests hold quantized weights to the fp32 budget (int8 route: test_cpu_int8.py)
    b = backends.get("cpu", quant_route="fp32")
    default_simd, default_threads = b.simd(), b.num_threads()
    yield b
    b.set_simd(default_simd)
    b.set_num_threads(default_threads)


@pytest.mark.parametrize("path", PATHS)
def test_every_simd_path_matches_the_reference(cpu, path, conformance_seed):
    cpu.set_simd(path)
    assert cpu.simd() == path and cpu.info()["simd"] == path
    results = portinfer.check(cpu, ops=["linear", "attention", "rms_norm", "silu_mul", "rope", "gelu"],
                              dtypes=["fp32", "bf16"], weight_formats=["dense", "q4_0", "q4_1"], max_examples=5,
                              seed=conformance_seed)
    assert results.passed, "\n" + results.table()


def _attention_case(gen, dtype, B, Hq, Hkv, Sq, Sk, D, q_pos, kv_len):
    q = torch.randn(B, Hq, Sq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Sk + 3, D, generator=gen).to(dtype)[:, :, :Sk]  # a longer cache
    v = torch.randn(B, Hkv, Sk + 3, D, generator=gen).to(dtype)[:, :, :Sk]
    return q, k, v, torch.tensor(q_pos, dtype=i32), torch.tensor(kv_len, dtype=i32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_attention_split_over_keys(cpu, path, threads):
    """Sq = 1 with few heads: the keys are split across threads and the partial softmaxes merged."""
    cpu.set_simd(path)
    cpu.set_num_threads(threads)
    gen = torch.Generator().manual_seed(threads)
    for dtype in (torch.float32, torch.bfloat16):
        # 3 sequences x 1 kv head: fewer work items than 2 x threads, so keys are split (threads > 1).
        # kv_len 0 (a fully masked row), a prefix ending past a split boundary, all keys
        q, k, v, q_pos, kv_len = _attention_case(gen, dtype, 3, 6, 1, 1, 700, 80, [0, 300, 699], [0, 385, 700])
        y = cpu.attention(q, k, v, q_pos, kv_len, causal=True, scale=0.125)
        y_ref = REFERENCE.attention(q, k, v, q_pos, kv_len, causal=True, scale=0.125)
        assert torch.all(y[0] == 0), "a row with no visible key must be zeros"
        logits = (q.double() @ k.double().repeat_interleave(6, 1).transpose(-1, -2)) * 0.125
        cond = 80 ** 0.5 * float(logits.abs().max())  # as the conformance cases define it
        err = relative_error(y, y_ref)
        assert err <= budget("attention", dtype, 700, cond=cond), (path, threads, dtype, err)


@pytest.mark.parametrize("path", PATHS)
def test_linear_large_shapes(cpu, path):
    """K across several GEMM k-blocks (and two GEMV k-chunks), N not a multiple of the panel, M on
    both sides of the GEMV switch: one pass, several passes of equal sizes (9 = 5 + 4, 13 = 7 + 6 on
    avx512; 3 + 3 + 3, ... on the 4-row paths), 16 rows (a server's step), then the GEMM (17, 29)."""
    cpu.set_simd(path)
    gen = torch.Generator().manual_seed(7)
    K, N = 1056, 77
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    dense = (w, w.to(torch.float16), w.to(torch.bfloat16))
    for M in (1, 3, 5, 8, 9, 13, 16, 17, 29):
        x = torch.randn(M, K, generator=gen)
        for weight in dense + ((quant.quantize(w, "q8_0"), quant.quantize(w, "q4_1")) if M in (3, 29) else ()):
            y = cpu.linear(x, cpu.prepare_linear(weight, torch.float32))
            y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(weight, torch.float32))
            assert relative_error(y, y_ref) <= budget("linear", torch.float32, K), (path, M, spec.weight_format(weight))
    # rows 4 KiB apart (K = 1024 fp32) go through a copy with a padded stride past the GEMV (4K aliasing);
    # bf16 x converted to fp32 likewise
    w = torch.randn(N, 1024, generator=gen) / 32
    for x in (torch.randn(29, 1024, generator=gen), torch.randn(29, 1024, generator=gen).to(torch.bfloat16)):
        for weight in (w, w.to(torch.float16)):
            y = cpu.linear(x, cpu.prepare_linear(weight, x.dtype))
            y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(weight, x.dtype))
            assert relative_error(y, y_ref) <= budget("linear", x.dtype, 1024), (path, x.dtype, spec.weight_format(weight))


@pytest.mark.parametrize("path", PATHS)
def test_bf16_linear_at_prefill(cpu, path):
    """bf16 x and bf16 weights, in the GEMV's passes (M <= 16) and past them: on avx512bf16 a GEMM of
    vdpbf16ps over k-pairs (csrc/gemm_bf16.cpp), elsewhere the fp32 GEMM on converted values. Odd K (a
    zero-padded last pair), K across 256-k blocks, N not a multiple of the 32-wide panel, row
    remainders of the 12-row tile, x read in place with a row stride, a bias, and NaN / Inf rows:
    within the bf16 budget of the float64 reference, non-finite values exactly where the reference has
    them."""
    cpu.set_simd(path)
    gen = torch.Generator().manual_seed(13)
    # (20, 507, 40), (19, 1019, 33): row strides of 1 and 2 KiB, copied with a padded stride (4K aliasing)
    for M, K, N in ((5, 7, 33), (13, 513, 77), (17, 7, 33), (24, 255, 64), (29, 1056, 40), (37, 64, 1),
                    (20, 507, 40), (19, 1019, 33)):
        w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(torch.bfloat16)
        x = torch.randn(M, K + 5, generator=gen).to(torch.bfloat16)[:, :K]  # row stride K + 5
        b = torch.randn(N, generator=gen).to(torch.bfloat16)
        if M > 12:
            x[3, K // 2] = float("nan")
            x[7, 0] = float("inf")
        wp, wr = cpu.prepare_linear(w, torch.bfloat16), REFERENCE.prepare_linear(w, torch.bfloat16)
        for bias in (None, b):
            y, y_ref = cpu.linear(x, wp, bias), REFERENCE.linear(x, wr, bias)
            assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.isinf(), y_ref.isinf()), (path, M, K, N)
            finite = torch.isfinite(y_ref).all(dim=1)
            err = relative_error(y[finite], y_ref[finite])
            assert err <= budget("linear", torch.bfloat16, K), (path, M, K, N, err)
    # an even K whose rows are 2 KiB apart, read through the padded copy
    w = (torch.randn(40, 1024, generator=gen) / 32).to(torch.bfloat16)
    x = torch.randn(23, 1024, generator=gen).to(torch.bfloat16)
    y = cpu.linear(x, cpu.prepare_linear(w, torch.bfloat16))
    y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(w, torch.bfloat16))
    assert relative_error(y, y_ref) <= budget("linear", torch.bfloat16, 1024), path


def test_avx512bf16_path_where_the_cpu_has_it(cpu):
    """The avx512bf16 kernel path is offered exactly where the CPU reports AVX512-BF16 (and the
    avx512 path's extensions), and is then the default unless the amx path is usable (test_cpu_amx.py)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    has = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"} <= flags
    assert ("avx512bf16" in PATHS) == has, (PATHS, has)
    if has:
        amx = PATHS[0] == "amx"
        assert PATHS[amx] == "avx512bf16" and PATHS[amx + 1] == "avx512"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantized_gemv_every_block_count_and_row_count(cpu, path, fmt):
    """The GEMV over GGUF blocks (M <= 16) works U blocks at a time with a scalar tail: block counts
    1, 3, 5 and 129 reach every tail length, M = 1..8 every unroll; on AVX-512, 3..16 rows take tiles
    of 4 weight rows x up to 4 rows of x in passes of equal sizes (10 = 4 + 3 + 3, 13 = 4 + 4 + 5 ...),
    and N = 302 leaves a tile of 2 weight rows at the end of the last run. 17: the GEMM. A bias on
    some row counts."""
    cpu.set_simd(path)
    gen = torch.Generator().manual_seed(11)
    for K in (32, 96, 160, 4128):
        w = quant.quantize(torch.randn(302, K, generator=gen) / K ** 0.5, fmt)
        b = torch.randn(302, generator=gen)
        wp, wr = cpu.prepare_linear(w, torch.float32), REFERENCE.prepare_linear(w, torch.float32)
        for M in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 16, 17):
            x = torch.randn(M, K, generator=gen) + 0.5  # a mean, so Q4_1's m * sum(x) term matters
            bias = b if M in (5, 13) else None
            y, y_ref = cpu.linear(x, wp, bias), REFERENCE.linear(x, wr, bias)
            assert relative_error(y, y_ref) <= budget("linear", torch.float32, K), (K, M)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_embedding_large_enough_to_split_across_threads(cpu, threads):
    """Over 64 KiB of rows the copy is split into runs of rows on the pool; every row must be the
    table's row (repeated ids, a strided table, both row counts around the split)."""
    cpu.set_num_threads(threads)
    gen = torch.Generator().manual_seed(threads)
    table = torch.randn(1000, 600, generator=gen)[:, :576]  # row stride 600
    for dtype in (torch.float32, torch.bfloat16):
        t = table.to(dtype)
        for n in (29, 300):
            ids = torch.randint(0, 1000, (n,), generator=gen)
            ids[-1] = ids[0]
            assert torch.equal(cpu.embedding(ids, t), t[ids])


def test_results_do_not_depend_on_threads(cpu):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 300, generator=gen)
    w = cpu.prepare_linear(torch.randn(130, 300, generator=gen))
    args = _attention_case(gen, torch.float32, 2, 4, 2, 9, 40, 32, [31, 0], [40, 12])
    outs = []
    for threads in (1, 2, 4):
        cpu.set_num_threads(threads)
        assert cpu.num_threads() == threads
        outs.append((cpu.linear(x, w), cpu.attention(*args)))
    for y, a in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(a, outs[0][1])


def _python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True).stdout


def test_environment_settings_are_honoured():
    out = _python("from portinfer import backends; b = backends.get('cpu'); print(b.num_threads(), b.simd())",
                  PORTINFER_NUM_THREADS="3", PORTINFER_CPU_SIMD="portable")
    assert out.split() == ["3", "portable"]


def test_probe_says_why_when_the_extension_is_missing():
    code = ("import sys; sys.modules['portinfer._cpu'] = None\n"  # makes `from .. import _cpu` fail
            "import portinfer\n"
            "from portinfer import backends\n"
            "ok, reason = backends.entry('cpu').status(); print(ok); print(reason)")
    ok, reason = _python(code).splitlines()[:2]
    assert ok == "False"
    assert "portinfer._cpu is not built" in reason


def test_concurrent_python_threads_get_the_same_results(cpu):
    """Kernels release the GIL: calls from several Python threads must not share scratch state."""
    from concurrent.futures import ThreadPoolExecutor
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, 192, generator=gen)
    w = cpu.prepare_linear(quant.quantize(torch.randn(70, 192, generator=gen), "q8_0"))
    args = _attention_case(gen, torch.float32, 1, 4, 2, 1, 300, 64, [299], [300])
    expected = (cpu.linear(x, w), cpu.attention(*args))

    def work(_):
        return cpu.linear(x, w), cpu.attention(*args)
    with ThreadPoolExecutor(4) as pool:
        for y, a in pool.map(work, range(16)):
            assert torch.equal(y, expected[0]) and torch.equal(a, expected[1])


@pytest.mark.parametrize("path", PATHS)
def test_layer_norm_of_nearly_equal_values(cpu, path):
    """H = 2 with x1 ~ x2: x - mean nearly cancels, so the fp32 rounding of the mean must be
    corrected (a shrunk conformance failure: seed 404, found on the avx2 and portable paths)."""
    from portinfer.conformance import cases
    cpu.set_simd(path)
    case = cases.Case("layer_norm", dict(M=1, H=2, eps=1e-05, scale=1.0, offset=0.0, pad=0, seed=43), torch.float32)
    y, y_ref = case.run(cpu), case.run(REFERENCE)
    assert relative_error(y, y_ref) <= budget("layer_norm", torch.float32, 2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_pointwise_over_its_whole_range(cpu, path, approximate):
    """The vector gelu (a polynomial erfc times exp, or x / (1 + exp(-2z))) element by element,
    from deep in the negative tail (where 1 + erf cancels) to where it is x, a width with a
    partial last vector: each |y - y_true| within 4 fp32 ulp of |x| (the budget is the same bound
    taken over the norm, which a local defect could hide in)."""
    cpu.set_simd(path)
    x = torch.cat([torch.linspace(-16, 16, 4097), torch.logspace(-30, 1, 61), -torch.logspace(-30, 1, 61)])
    x = x.to(torch.float32).reshape(1, -1)
    x64 = x.double()
    if approximate == "tanh":
        z = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)
        true = x64 * torch.sigmoid(2.0 * z)
    else:
        true = 0.5 * x64 * torch.special.erfc(-x64 / math.sqrt(2.0))
    y = cpu.gelu(x, approximate=approximate)
    err = (y.double() - true).abs() / x64.abs().clamp_min(2.0 ** -149)  # y(0) must be 0
    assert float(err.max()) <= 4 * 2.0 ** -24, f"worst at x = {float(x.flatten()[err.argmax()])}"
    assert torch.isfinite(cpu.gelu(torch.tensor([[3.0e38, -3.0e38]]), approximate=approximate)).all()


@pytest.mark.parametrize("path", PATHS)
def test_bf16_outputs_round_like_torch(cpu, path):
    """A bf16 output is the fp32 result rounded to nearest even (vector store on avx2 / avx512):
    gelu of bf16 inputs must equal the fp32 kernel's output rounded by torch, NaN included."""
    cpu.set_simd(path)
    x = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(5)) * 4).to(torch.bfloat16)
    x[1, 7] = float("nan")
    for approximate in ("none", "tanh"):
        y = cpu.gelu(x, approximate=approximate)
        expected = cpu.gelu(x.float(), approximate=approximate).to(torch.bfloat16)
        assert torch.equal(y.isnan(), expected.isnan()) and bool(y.isnan()[1, 7])
        assert torch.equal(y.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,style", [(torch.float32, "neox"), (torch.float32, "interleaved"),
                                         (torch.bfloat16, "neox")])
def test_rope_angles_kept_between_calls_follow_their_values(cpu, path, dtype, style):
    """The cpu rope keeps the last call's cos / sin table (csrc/kernels_impl.h rope_angles): a call with
    the same positions and frequencies reuses it, anything else must recompute. Positions and
    frequencies changed in place (same buffers, new values), a new batch shape and a new rotary_dim
    must each give the reference's result, never the previous call's angles."""
    cpu.set_simd(path)
    gen = torch.Generator().manual_seed(11)
    rotary = spec.RotaryParams.from_theta(64, 10000.0, style=style)
    pos = torch.tensor([[5, 6, 7], [900, 901, 902]], dtype=torch.int64)

    def check(x, pos, rotary):
        got = cpu.rope(x, pos, rotary).double()
        want = REFERENCE.rope(x.float(), pos, rotary).double()
        assert relative_error(got, want) < budget("rope", dtype), (path, dtype, style)

    x = torch.randn(2, 3, 3, 64, generator=gen).to(dtype)
    check(x, pos, rotary)
    check(torch.randn(2, 3, 3, 64, generator=gen).to(dtype), pos, rotary)  # same angles, new x: reused
    pos[1, 2] = 4000  # in place: the same buffer, one position new
    check(x, pos, rotary)
    rotary.inv_freq.mul_(0.5)  # in place: every frequency new
    check(x, pos, rotary)
    check(x[:1], pos[:1], rotary)  # fewer positions: a prefix of the last table's key
    check(x[..., :48].contiguous(), pos, spec.RotaryParams.from_theta(48, 10000.0, style=style))
    check(x, pos, spec.RotaryParams.from_theta(64, 10000.0, rotary_dim=32, style=style))


@pytest.mark.skipif("avx512bf16" not in PATHS, reason="the vdpbf16ps probe needs a CPU with AVX512-BF16")
def test_bf16_dot_peak_probe_counts_its_flops(cpu):
    """bench/cpu_kernels.py's ceiling: every pool thread runs iters rounds of 24 vdpbf16ps (16 lanes x
    2 pairs x 2 flops); the count it returns is what the benchmark divides by its time."""
    from portinfer.backends.cpu import _cpu
    default_threads = cpu.num_threads()
    try:
        for threads in (1, 3):
            cpu.set_num_threads(threads)
            assert _cpu.bf16_dot_peak(10) == threads * 10 * 24 * 64
    finally:
        cpu.set_num_threads(default_threads)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        _cpu.bf16_dot_peak(0)
