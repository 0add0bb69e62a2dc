"""Placement: dispatch to the chosen backend, visible fallback, strict mode, the report."""
import warnings

import pytest
import torch

from portinfer.backends import spec
from portinfer.backends.placement import FallbackError, FallbackWarning, Placement
from portinfer.backends.reference import ReferenceBackend
from portinfer.backends.torch_backend import TorchBackend


class HalfOnly(TorchBackend):
    """A partial backend: no layer_norm, no fp32 activations."""
    name = "half-only"
    activation_dtypes = (torch.float16, torch.bfloat16)
    ops = tuple(op for op in spec.OPS if op != "layer_norm")


def test_chosen_backend_runs_and_is_reported():
    p = Placement(TorchBackend("cpu"), torch.float32, fallback="error")
    x = torch.randn(3, 8)
    y = p.rms_norm(x, torch.ones(8), 1e-6)
    ref = ReferenceBackend().rms_norm(x, torch.ones(8), 1e-6)
    assert torch.allclose(y, ref, atol=1e-6)
    (row,) = p.report().rows
    assert (row.op, row.backend, row.calls, row.reason, row.bytes_copied) == ("rms_norm", "torch", 1, "", 0)


def test_unsupported_op_falls_back_with_one_warning_and_the_reason():
    p = Placement(HalfOnly("cpu"), torch.bfloat16, fallback="warn")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w, b = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
    with pytest.warns(FallbackWarning, match="layer_norm falls back to torch"):
        y = p.layer_norm(x, w, b, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.layer_norm(x, w, b, 1e-5)  # warned once per op and backend
        p.rms_norm(x, w, 1e-5)
    assert torch.allclose(y.float(), ReferenceBackend().layer_norm(x, w, b, 1e-5).float(), atol=2e-2)
    rows = {(r.op, r.backend): r for r in p.report().rows}
    assert rows[("layer_norm", "torch")].calls == 2
    assert "does not support layer_norm" in rows[("layer_norm", "torch")].reason
    assert rows[("rms_norm", "half-only")].reason == ""


def test_strict_mode_refuses_before_running_and_lists_missing_ops():
    p = Placement(HalfOnly("cpu"), torch.float32, fallback="error")
    assert p.missing_ops() == list(spec.OPS)
    with pytest.raises(FallbackError, match="does not support embedding, linear, .*attention for dtype fp32"):
        p.require()
    p16 = Placement(HalfOnly("cpu"), torch.float16, fallback="error")
    with pytest.raises(FallbackError, match=r"does not support layer_norm for dtype fp16"):
        p16.require()
    with pytest.raises(FallbackError, match="layer_norm"):
        x = torch.randn(2, 4, dtype=torch.float16)
        p16.layer_norm(x, torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16), 1e-5)


def test_linear_weight_prepared_on_the_backend_that_runs_it():
    p = Placement(HalfOnly("cpu"), torch.float32, fallback="allow")
    w = p.prepare_linear(torch.randn(5, 8))
    assert w.backend == "torch"
    x = torch.randn(2, 8)
    assert torch.allclose(p.linear(x, w), x @ w.payload.T, atol=1e-5)


def test_fallback_policy_is_validated():
    with pytest.raises(ValueError, match="fallback: expected one of allow, warn, error"):
        Placement(TorchBackend("cpu"), torch.float32, fallback="loud")
