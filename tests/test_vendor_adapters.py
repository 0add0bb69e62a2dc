"""ascend and kunlun adapters: the availability probe (why not here), registration, and the
dispatch to a vendor fused kernel vs the generic torch path.

No vendor plugin is installed here, so the dispatch tests inject fake plugin modules into
sys.modules. Each fake kernel implements the vendor's documented semantics in plain torch
(mask polarity, argument names, layouts); the adapter driving them must then pass the
conformance suite against the float64 reference, which fails if the adapter passes the
wrong mask, layout, head count or cos/sin halves.
"""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import portinfer
from portinfer.backends import registry, spec
from portinfer.backends.ascend import AscendBackend
from portinfer.backends.kunlun import KunlunBackend
from portinfer.backends.reference import ReferenceBackend

from conftest import CONFORMANCE_SEED


# ----------------------------------------------------------------------------- fake plugins

def _fake_torch_npu(calls, device_count=1, without=(), legacy_rotary=False):
    """torch_npu as documented in its API reference, computing in fp32 on the CPU."""
    m = types.ModuleType("torch_npu")
    m.__version__ = "2.5.1.fake"
    m.npu = types.SimpleNamespace(device_count=lambda: device_count)

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        calls.append(("npu_rms_norm", {"epsilon": epsilon}))
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):  # the 7.0 signature (rotary_mode: even D < 896)
        calls.append(("npu_rotary_mul", {"r1_shape": tuple(r1.shape)}))
        x1, x2 = torch.chunk(x.float(), 2, -1)
        return (r1.float() * x.float() + r2.float() * torch.cat((-x2, x1), dim=-1)).to(x.dtype)

    if legacy_rotary:  # torch_npu <= 6.0: no rotary_mode, D = 128 only
        def npu_rotary_mul(x, r1, r2, _new=npu_rotary_mul):
            assert x.shape[-1] == 128, "documented: D = 128"
            return _new(x, r1, r2)

    def npu_swiglu(x, dim=-1):
        calls.append(("npu_swiglu", {"dim": dim}))
        a, b = torch.chunk(x.float(), 2, dim)
        return (F.silu(a) * b).to(x.dtype)

    def npu_gelu(x, approximate="none"):
        calls.append(("npu_gelu", {"approximate": approximate}))
        return F.gelu(x.float(), approximate=approximate).to(x.dtype)

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, **_):
        calls.append(("npu_fusion_attention", {"head_num": head_num, "input_layout": input_layout}))
        assert input_layout == "BNSD" and head_num == query.shape[1] and keep_prob == 1.0
        group = head_num // key.shape[1]
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        scores = query.float() @ k.transpose(-1, -2) * scale
        if atten_mask is not None:  # True: this key does not take part
            scores = scores.masked_fill(atten_mask, -math.inf)
        out = torch.softmax(scores, dim=-1) @ v
        return out.to(query.dtype), None, None, None, 0, 0, 0

    for f in (npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_gelu, npu_fusion_attention):
        if f.__name__ not in without:
            setattr(m, f.__name__, f)
    return m


def _fake_kunlun(calls, device_count=1):
    """torch_xmlir (device API only) and kunlun_ops, as vLLM-Kunlun calls them."""
    plugin = types.ModuleType("torch_xmlir")
    plugin.xpu = types.SimpleNamespace(device_count=lambda: device_count)
    ops = types.ModuleType("kunlun_ops")

    def rmsnorm(x, weight, epsilon, out):
        calls.append(("rmsnorm", {"weight_dtype": weight.dtype}))
        xf = x.float()
        out.copy_(xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + epsilon) * weight)

    def silu_and_mul(x, axis=-1, turn=True, out=None):
        calls.append(("silu_and_mul", {"axis": axis, "turn": turn}))
        a, b = torch.chunk(x.float(), 2, axis)
        out.copy_(F.silu(a) * b if turn else F.silu(b) * a)

    ops.rmsnorm, ops.silu_and_mul = rmsnorm, silu_and_mul
    return plugin, ops


@pytest.fixture
def npu_calls(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", _fake_torch_npu(calls))
    return calls


@pytest.fixture
def kunlun_calls(monkeypatch):
    calls = []
    plugin, ops = _fake_kunlun(calls)
    monkeypatch.setitem(sys.modules, "torch_xmlir", plugin)
    monkeypatch.setitem(sys.modules, "kunlun_ops", ops)
    return calls


# ----------------------------------------------------------------------------- probe and registration

@pytest.mark.parametrize("name, cls, plugin", [("ascend", AscendBackend, "torch_npu"),
                                               ("kunlun", KunlunBackend, "torch_xmlir")])
def test_registered_builtin_unavailable_here_names_the_missing_plugin(name, cls, plugin, monkeypatch):
    monkeypatch.setitem(sys.modules, plugin, None)  # not installed, even on a machine that has it
    registry.refresh()
    entry = registry.entry(name)
    assert entry.origin == "builtin" and entry.load() is cls
    ok, reason = entry.status()
    assert not ok
    assert reason.startswith(f"{plugin} (") and "is not installed" in reason
    with pytest.raises(portinfer.backends.BackendUnavailable, match=f"backend '{name}' is not available here: {plugin}"):
        portinfer.backends.get(name)


@pytest.mark.parametrize("cls, fake, what", [
    (AscendBackend, lambda: _fake_torch_npu([], device_count=0), "Ascend NPU"),
    (KunlunBackend, lambda: _fake_kunlun([], device_count=0)[0], "Kunlun XPU"),
])
def test_probe_plugin_installed_but_no_device(cls, fake, what, monkeypatch):
    monkeypatch.setitem(sys.modules, cls.plugin_module, fake())
    ok, reason = cls.probe()
    assert not ok and f"is installed but sees no {what}" in reason and "device count 0" in reason


def test_probe_reports_a_failing_device_query_and_a_broken_plugin(monkeypatch):
    plugin = _fake_torch_npu([])

    def broken():
        raise RuntimeError("drvMemGetInfo failed")
    plugin.npu = types.SimpleNamespace(device_count=broken)
    monkeypatch.setitem(sys.modules, "torch_npu", plugin)
    ok, reason = AscendBackend.probe()
    assert not ok and "asking it for devices failed: RuntimeError: drvMemGetInfo failed" in reason


def test_probe_with_a_device_is_available(npu_calls, kunlun_calls):
    assert AscendBackend.probe() == (True, "")
    assert KunlunBackend.probe() == (True, "")


def test_kernel_table_says_which_ops_are_fused():
    table = AscendBackend.kernel_table()
    assert list(table) == list(spec.OPS)
    assert table["rms_norm"] == "torch_npu.npu_rms_norm"
    assert table["attention"] == "torch_npu.npu_fusion_attention (fp16/bf16)"
    assert table["linear"].startswith("generic torch")
    kunlun = KunlunBackend.kernel_table()
    assert kunlun["silu_mul"] == "kunlun_ops.silu_and_mul" and kunlun["rope"] == "generic torch"


# ----------------------------------------------------------------------------- dispatch

def _names(calls):
    return [c[0] for c in calls]


def test_ascend_fused_kernels_pass_conformance(npu_calls):
    backend = AscendBackend("cpu")
    assert backend.info()["fused"].startswith("rms_norm=torch_npu.npu_rms_norm")
    results = portinfer.check(backend, ops=["rms_norm", "rope", "silu_mul", "gelu", "attention"],
                              dtypes=["fp16", "bf16"], profile="small", max_examples=8, seed=CONFORMANCE_SEED)
    assert results.passed, "\n" + results.table()
    for kernel in ("npu_rms_norm", "npu_swiglu", "npu_gelu", "npu_fusion_attention", "npu_rotary_mul"):
        assert kernel in _names(npu_calls), f"{kernel} never called"
    assert all(c[1]["input_layout"] == "BNSD" for c in npu_calls if c[0] == "npu_fusion_attention")


def test_ascend_takes_the_generic_path_outside_a_kernels_conditions(npu_calls):
    backend = AscendBackend("cpu")
    ref = ReferenceBackend()
    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    pos = torch.arange(5)[None]
    interleaved = spec.RotaryParams.from_theta(8, style="interleaved")
    partial = spec.RotaryParams.from_theta(8, rotary_dim=4)
    for rotary in (interleaved, partial):
        y = backend.rope(x, pos, rotary)
        assert torch.allclose(y.float(), ref.rope(x, pos, rotary).float(), atol=2e-2)
    q = torch.randn(1, 2, 3, 8)  # fp32: npu_fusion_attention takes fp16/bf16 only
    kv_len, q_pos = torch.tensor([3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    y = backend.attention(q, q, q, q_pos, kv_len)
    assert torch.allclose(y, ref.attention(q, q, q, q_pos, kv_len), atol=1e-5)
    assert npu_calls == []
    y = backend.rope(x, pos, spec.RotaryParams.from_theta(8))
    assert _names(npu_calls) == ["npu_rotary_mul"] and npu_calls[0][1]["r1_shape"] == (1, 1, 5, 8)


def test_a_kernel_missing_from_the_plugin_version_runs_generic_torch(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", _fake_torch_npu(calls, without=("npu_gelu",)))
    backend = AscendBackend("cpu")
    assert backend.info()["kernels missing from this plugin"] == "torch_npu.npu_gelu"
    assert "gelu" in backend.info()["generic torch"].split(", ")
    x = torch.randn(4, 8, dtype=torch.float16)
    assert torch.allclose(backend.gelu(x).float(), ReferenceBackend().gelu(x).float(), atol=2e-3)
    assert calls == []


def test_kunlun_fused_kernels_pass_conformance(kunlun_calls):
    backend = KunlunBackend("cpu")
    results = portinfer.check(backend, ops=["rms_norm", "silu_mul"], profile="small", max_examples=8,
                              seed=CONFORMANCE_SEED)
    assert results.passed, "\n" + results.table()
    assert {"rmsnorm", "silu_and_mul"} <= set(_names(kunlun_calls))
    assert all(c[1] == {"axis": -1, "turn": True} for c in kunlun_calls if c[0] == "silu_and_mul")
    assert all(c[1] == {"weight_dtype": torch.float32} for c in kunlun_calls if c[0] == "rmsnorm")


def test_kunlun_without_kunlun_ops_runs_generic_torch(monkeypatch):
    plugin, _ = _fake_kunlun([])
    monkeypatch.setitem(sys.modules, "torch_xmlir", plugin)
    monkeypatch.setitem(sys.modules, "kunlun_ops", None)
    backend = KunlunBackend("cpu")
    assert backend.kernels == {} and backend.info()["fused"] == "none"
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    assert torch.allclose(backend.silu_mul(x).float(), ReferenceBackend().silu_mul(x).float(), atol=2e-2)


def test_ascend_supports_encodes_the_documented_shape_limits(monkeypatch):
    """Outside a fused kernel's documented limits `supports` says no, so placement falls back visibly
    (instead of the kernel raising on the device); inside them the kernel runs."""
    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", _fake_torch_npu(calls, legacy_rotary=True))
    backend = AscendBackend("cpu")
    half = torch.float16
    for D, ok in ((8, False), (16, True), (80, True), (72, False), (512, True), (528, False)):
        assert backend.supports("attention", dtype=half, D=D, causal=True, gqa=1) is ok, D
    assert backend.supports("attention", dtype=torch.float32, D=8, causal=True, gqa=1)  # generic path: any D
    for D, ok in ((64, False), (128, True), (256, False)):
        assert backend.supports("rope", dtype=half, D=D, rotary_dim=D, style="neox") is ok, D
    assert backend.supports("rope", dtype=half, D=64, rotary_dim=32, style="neox")  # partial: generic path
    x = torch.randn(1, 2, 3, 64, dtype=half)
    with pytest.raises(spec.UnsupportedOpError, match="does not support rope"):
        backend.rope(x, torch.arange(3)[None], spec.RotaryParams.from_theta(64))
    x = torch.randn(1, 2, 3, 128, dtype=half)
    backend.rope(x, torch.arange(3)[None], spec.RotaryParams.from_theta(128))
    assert _names(calls) == ["npu_rotary_mul"]
    monkeypatch.setitem(sys.modules, "torch_npu", _fake_torch_npu(calls))  # 7.0: rotary_mode, even D < 896
    backend = AscendBackend("cpu")
    for D, ok in ((64, True), (8, True), (896, False)):
        assert backend.supports("rope", dtype=half, D=D, rotary_dim=D, style="neox") is ok, D


def test_ascend_placement_falls_back_visibly_outside_the_limits(npu_calls):
    from portinfer.backends.placement import Placement

    placement = Placement(AscendBackend("cpu"), torch.float16, "allow")
    q = torch.randn(1, 2, 3, 8, dtype=torch.float16)  # D = 8: not a multiple of 16
    lens, pos = torch.tensor([3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    y = placement.attention(q, q, q, pos, lens, True, 8 ** -0.5)
    ref = ReferenceBackend().attention(q, q, q, pos, lens)
    assert torch.allclose(y.float(), ref.float(), atol=2e-2)
    assert "npu_fusion_attention" not in _names(npu_calls)
    assert "attention" in str(placement.report()) and "torch" in str(placement.report())
