"""The triton backend beyond the conformance suite (test_conformance.py runs that on it):
import hygiene and availability, the interpreter workarounds (bf16 dots upcast, bf16 outputs
rounded to nearest), that results come from the Triton kernels rather than torch, that
strided views are read in place, and the decode split/merge path.

Without CUDA, conftest.py sets TRITON_INTERPRET=1, so the kernels run on CPU tensors."""
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import portinfer
from portinfer.backends import quant, registry, spec
from portinfer.backends.reference import ReferenceBackend
from portinfer.conformance.budget import budget, relative_error

TRITON_OK, TRITON_REASON = registry.entry("triton").status()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable here: {TRITON_REASON}")
REFERENCE = ReferenceBackend(exact=True)
KERNEL_MODULES = ("embedding", "linear", "quantized_linear", "rms_norm", "layer_norm", "rope", "silu_mul", "gelu",
                  "attention", "attention_decode")


def _interpreting():
    import portinfer.kernels

    return portinfer.kernels.INTERPRETING


needs_interpreter = pytest.mark.skipif(
    not TRITON_OK or not _interpreting(),
    reason="an interpreter workaround: compiled GPU kernels use native bf16 dots and round to nearest")


if TRITON_OK:  # test kernels (jit functions must live at module level: they resolve names in its globals)
    import triton
    import triton.language as tl

    from portinfer.kernels import to_output

    @triton.jit
    def _store_kernel(out_ptr, x_ptr, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, to_output(tl.load(x_ptr + i, mask=i < N), out_ptr), mask=i < N)

    @triton.jit
    def _rms_norm_without_weight(out_ptr, x_ptr, w_ptr, H, eps, stride_xm, stride_om, BLOCK: tl.constexpr):
        """A planted bug: rms_norm that forgets the weight."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps)
        tl.store(out_ptr + row * stride_om + cols, to_output(x * inv_rms, out_ptr), mask=mask)


def _python(code, env=None):
    run_env = dict(os.environ, **(env or {}))
    for key in [k for k, v in run_env.items() if v is None]:
        del run_env[key]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------- availability

def test_import_portinfer_does_not_import_triton():
    out = _python("import sys, portinfer; portinfer.backends.names(); print('triton' in sys.modules)")
    assert out.strip() == "False"


def test_missing_triton_package_is_unavailable_with_the_reason():
    out = _python("import sys; sys.modules['triton'] = None\n"
                  "import portinfer\n"
                  "from portinfer.backends import registry\n"
                  "ok, why = registry.entry('triton').status(); print(ok); print(why)\n"
                  "try:\n    registry.get('triton')\nexcept registry.BackendUnavailable as e:\n    print('refused:', e)")
    ok, why, refused = out.strip().splitlines()
    assert ok == "False"
    assert "triton package cannot be imported" in why and "pip install" in why
    assert refused.startswith("refused: backend 'triton' is not available here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the backend is available without the interpreter")
def test_without_cuda_or_interpreter_the_reason_says_so():
    out = _python("from portinfer.backends import registry; print(registry.entry('triton').status()[1])",
                  env={"TRITON_INTERPRET": None})
    assert "no CUDA device" in out and "TRITON_INTERPRET=1" in out


@needs_interpreter
def test_interpreter_backend_is_for_tests_only():
    backend = registry.get("triton")
    assert backend.device.type == "cpu"
    assert backend.conformance_profile == "small"
    assert backend.info()["mode"] == "interpreter"
    assert not type(backend).auto_eligible()
    assert registry.auto_name() != "triton"


@needs_triton
def test_fp32_matmuls_are_ieee_unless_tf32_is_asked_for():
    from portinfer.backends.triton import TritonBackend

    assert TritonBackend().input_precision == "ieee" and not TritonBackend().info()["tf32"]
    assert TritonBackend(allow_tf32=True).input_precision == "tf32"


def test_int32_offset_guard_names_the_input():
    from portinfer.backends.triton import _check_int32_extent

    huge = types.SimpleNamespace(shape=(3, 8), stride=lambda: (2 ** 30, 1))
    with pytest.raises(ValueError, match=r"q: spans .* 32-bit offsets"):
        _check_int32_extent("q", huge)
    _check_int32_extent("q", torch.empty(3, 8))


# ---------------------------------------------------------------------------- interpreter workarounds

def _linear_error(x, w, upcast=None):
    from portinfer.kernels import linear

    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)  # fp32 out: no output rounding in the way
    linear.linear(x, w, None, out, upcast=upcast)
    return relative_error(out, x.double() @ w.double().T)


@needs_interpreter
def test_bf16_dot_upcast_switch_is_what_makes_bf16_right():
    x = torch.randn(5, 40).bfloat16()
    w = torch.randn(7, 40).bfloat16()
    fp32_budget = budget("linear", torch.float32, reduction=40)
    assert _linear_error(x, w) <= fp32_budget  # default: upcast under the interpreter
    assert _linear_error(x, w, upcast=False) > 1.0  # the interpreter's native bf16 dot is garbage
    from portinfer.kernels import attention

    q, k, v = (torch.randn(1, 2, 17, 16).bfloat16() for _ in range(3))
    pos, kv_len = torch.zeros(1, dtype=torch.int32), torch.full((1,), 17, dtype=torch.int32)
    want = REFERENCE.attention(q, k, v, pos, kv_len, True, 0.25)
    errors = {}
    for upcast in (None, False):
        out = torch.empty(q.shape, dtype=torch.float32)
        attention.attention(q, k, v, pos, kv_len, True, 0.25, out, upcast=upcast)
        errors[upcast] = relative_error(out, want)
    assert errors[None] < 1e-2 < errors[False]


@needs_interpreter
def test_fp16_dots_are_right_under_the_interpreter_without_upcast():
    from portinfer.kernels import upcast_dot

    assert not upcast_dot(torch.float16) and upcast_dot(torch.bfloat16)
    x = torch.randn(5, 40).half()
    w = torch.randn(7, 40).half()
    assert _linear_error(x, w, upcast=False) <= budget("linear", torch.float32, reduction=40)


@needs_triton
def test_bf16_outputs_round_to_nearest_even():
    import triton

    backend = registry.get("triton")
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F7FFF],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-30, -3.0e38])
    x = torch.cat([torch.randn(200) * 10.0 ** torch.randint(-8, 8, (200,)), ties, special]).to(backend.device)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=backend.device)
    _store_kernel[(1,)](out, x, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


# ---------------------------------------------------------------------------- the kernels do the work

def _op_calls(dtype):
    """(name, call(backend), reference output, budget) for every op, on small inputs with views."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = randn(5, 40)
    fused = randn(2, 3, 6 + 2 * 2, 16)  # [B, S, Hq + 2 Hkv, D]
    q, k, v = fused[:, :, :6].transpose(1, 2), fused[:, :, 6:8].transpose(1, 2), fused[:, :, 8:].transpose(1, 2)
    cache_k, cache_v = randn(2, 2, 30, 16), randn(2, 2, 30, 16)
    q1 = randn(2, 6, 1, 16)
    q_pos, kv_len = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([3, 25], dtype=torch.int32)
    rotary = spec.RotaryParams.from_theta(16, rotary_dim=12, style="interleaved")
    pos = torch.arange(3).repeat(2, 1) + 100
    w_dense, bias = randn(24, 64, scale=0.125), randn(24)
    x64 = randn(3, 64)
    table, ids = randn(11, 20), torch.tensor([3, 0, 10, 3])
    prepared = {}  # weights are prepared once per backend, as a model does at load

    def prepare(b, w):
        key = (id(b), id(w))
        if key not in prepared:
            prepared[key] = b.prepare_linear(w, dtype)
        return prepared[key]

    calls = [
        ("embedding", lambda b: b.embedding(ids, table), (ids, table)),
        ("linear", lambda b: b.linear(x64, prepare(b, w_dense), bias), None),
        ("rms_norm", lambda b: b.rms_norm(x, x[0], 1e-6), None),
        ("layer_norm", lambda b: b.layer_norm(x, x[0], x[1], 1e-5), None),
        ("rope", lambda b: b.rope(q, pos, rotary), None),
        ("silu_mul", lambda b: b.silu_mul(x), None),
        ("gelu", lambda b: b.gelu(x, "tanh"), None),
        ("attention", lambda b: b.attention(q, k, v, q_pos.clone().fill_(0), torch.tensor([3, 2], dtype=torch.int32)),
         None),
        ("attention", lambda b: b.attention(q1, cache_k[:, :, :25], cache_v[:, :, :25], q_pos, kv_len), None),
    ]
    for fmt in ("q8_0", "q4_0", "q4_1"):
        qw = quant.quantize(torch.randn(24, 64, generator=g) / 8, fmt)
        for rows in (x64[:1], x64):  # the GEMV path (M <= 4) and the tiled path
            calls.append(("linear", lambda b, qw=qw, rows=rows: b.linear(rows, prepare(b, qw), bias), None))
    return [(op, call, call(REFERENCE)) for op, call, _ in calls]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_results_come_from_the_triton_kernels_not_torch(monkeypatch, dtype):
    backend = registry.get("triton")
    calls = _op_calls(dtype)  # references computed before torch's math is taken away

    def banned(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the triton backend called torch's {name}")
        return fail

    for owner, names in ((F, ("linear", "scaled_dot_product_attention", "softmax", "silu", "gelu", "embedding",
                              "layer_norm", "rms_norm")),
                         (torch, ("matmul", "mm", "bmm", "addmm", "einsum", "softmax", "rsqrt", "erf", "tanh",
                                  "sigmoid", "exp")),
                         (torch.Tensor, ("__matmul__", "softmax", "exp", "rsqrt"))):
        for name in names:
            monkeypatch.setattr(owner, name, banned(f"{owner.__name__}.{name}"))
    launches = {}
    import importlib

    for name in KERNEL_MODULES:
        module = importlib.import_module(f"portinfer.kernels.{name}")
        launcher_name = {"quantized_linear": "quantized_linear", "attention_decode": "decode_attention"}.get(name, name)
        original = getattr(module, launcher_name)

        def counted(*args, _original=original, _name=name, **kwargs):
            launches[_name] = launches.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, launcher_name, counted)

    for op, call, want in calls:
        got = call(backend).cpu()
        assert got.dtype == dtype and got.shape == want.shape
        assert relative_error(got, want) <= budget(op, dtype, reduction=64, cond=100.0), op
    assert set(launches) == set(KERNEL_MODULES)
    assert launches["quantized_linear"] == 4 and launches["linear"] == 3  # q4_1 runs dense (fp32, prepared)


@needs_triton
def test_a_bug_planted_in_a_kernel_fails_conformance(monkeypatch):
    from portinfer.kernels import rms_norm

    monkeypatch.setattr(rms_norm, "MAX_BLOCK", 1 << 16)  # the planted kernel does a row in one block
    monkeypatch.setattr(rms_norm, "_rms_norm_kernel", _rms_norm_without_weight)
    results = portinfer.check("triton", ops=["rms_norm", "silu_mul"], dtypes=["fp32"], max_examples=5, seed=3)
    assert results.row("rms_norm", "fp32").status == "fail"
    assert results.row("silu_mul", "fp32").status == "pass"


@needs_triton
def test_strided_views_are_read_in_place(monkeypatch):
    backend = registry.get("triton")
    calls = _op_calls(torch.float16)
    original = torch.Tensor.contiguous

    def contiguous(self, *args, **kwargs):
        if not self.is_contiguous():
            raise AssertionError(f"copied a strided view {list(self.shape)} / {list(self.stride())}")
        return original(self, *args, **kwargs)

    for _, call, _ in calls:
        call(backend)  # prepares the weights (a q4_1 weight is dequantized then, with copies)
    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    for op, call, want in calls:
        assert relative_error(call(backend).cpu(), want) <= budget(op, torch.float16, reduction=64, cond=100.0), op


# ---------------------------------------------------------------------------- decode attention

@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_decode_attention_merges_many_splits(causal):
    backend = registry.get("triton")
    g = torch.Generator().manual_seed(1)
    B, Hkv, group, Sk, D = 3, 2, 4, 100, 32
    q = torch.randn(B, Hkv * group, 1, D, generator=g) * 4
    k = torch.randn(B, Hkv, Sk + 7, D, generator=g)[:, :, :Sk] * 4
    v = torch.randn(B, Hkv, Sk + 7, D, generator=g)[:, :, :Sk]
    q_pos = torch.tensor([99, 40, 3], dtype=torch.int32)
    kv_len = torch.tensor([100, 77, 0], dtype=torch.int32)  # the last sequence sees no key: zeros
    want = REFERENCE.attention(q, k, v, q_pos, kv_len, causal, D ** -0.5)
    backend.poison_outputs = True
    got = backend.attention(q.to(backend.device), k.to(backend.device), v.to(backend.device), q_pos, kv_len,
                            causal, D ** -0.5).cpu()
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * D ** -0.5
    cond = math.sqrt(D) * float(logits.abs().max())  # as the conformance cases define it
    assert relative_error(got, want) <= budget("attention", torch.float32, Sk, cond)


def test_decode_split_sizes_cover_the_keys_in_whole_blocks():
    pytest.importorskip("triton")
    from portinfer.kernels.attention_decode import MAX_SPLITS, num_splits

    for Sk, programs, block, target in ((8192, 8, 64, 264), (8192, 256, 64, 264), (100, 1, 64, 264), (1, 4, 64, 264),
                                        (1_000_000, 1, 64, 264)):
        split_len, splits = num_splits(Sk, programs, block, target)
        assert split_len % block == 0 and 1 <= splits <= MAX_SPLITS
        assert (splits - 1) * split_len < Sk <= splits * split_len
