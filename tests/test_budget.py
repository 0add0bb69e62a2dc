"""The error budget's floor for outputs that round into the subnormal range, and the bias test."""
import math

import torch

from portinfer.conformance.budget import Z_BIAS, bias_statistics, biased, budget, relative_error


def test_correctly_rounded_subnormal_outputs_fit_the_budget():
    # silu(-12) * 1e-3 ~ -7.4e-8: below fp16's smallest normal (6.1e-5), near its smallest subnormal (6e-8)
    exact = torch.tensor([-12.0 / (1 + math.exp(12.0)) * 1e-3], dtype=torch.float64)
    rounded = exact.to(torch.float16)  # the best any fp16 kernel can return
    err = relative_error(rounded, exact)
    assert err > budget("silu_mul", torch.float16)  # a purely relative budget rejects the right answer
    assert err <= budget("silu_mul", torch.float16, outputs=1, ref_norm=float(exact.norm()))


def test_floor_does_not_excuse_wrong_normal_outputs():
    exact = torch.linspace(-3, 3, 64, dtype=torch.float64)
    wrong = (exact * 1.01).to(torch.float16)  # 1% off: far above fp16's roundoff
    assert relative_error(wrong, exact) > budget("silu_mul", torch.float16, outputs=64, ref_norm=float(exact.norm()))
    right = exact.to(torch.float16)
    assert relative_error(right, exact) <= budget("silu_mul", torch.float16, outputs=64, ref_norm=float(exact.norm()))


def _trunc(v, dtype):
    r = v.to(dtype)
    past = r.double().abs() > v.abs()
    return torch.where(past, torch.nextafter(r, torch.zeros_like(r)), r)


def test_bias_test_passes_round_to_nearest_and_fails_scale_and_truncation():
    """Round-to-nearest passes on every seed; a 1% scale (inside bf16's L2 budget) and truncation toward
    zero (inside every fp16/bf16 L2 budget) fail at 512 outputs; fp32 outputs are not tested."""
    for seed in range(50):
        exact = torch.randn(512, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for dtype in (torch.float16, torch.bfloat16):
            assert not biased(dtype, *bias_statistics(exact.to(dtype), exact)), (seed, dtype)
            assert biased(dtype, *bias_statistics(_trunc(exact, dtype), exact)), (seed, dtype)
            assert biased(dtype, *bias_statistics((exact * 1.01).to(dtype), exact)), (seed, dtype)
        assert relative_error((exact * 1.01).to(torch.bfloat16), exact) < budget("rms_norm", torch.bfloat16)
        assert relative_error(_trunc(exact, torch.bfloat16), exact) < budget("linear", torch.bfloat16)
        assert not biased(torch.float32, *bias_statistics((exact * 1.01).float(), exact))


def test_bias_test_never_fails_below_z_squared_outputs():
    """|t| <= sqrt(n): with fewer than Z_BIAS^2 outputs even an error that is all bias passes (the L2
    budget is the test there)."""
    n = int(Z_BIAS ** 2)
    exact = torch.linspace(1, 2, n, dtype=torch.float64)
    b, t = bias_statistics((exact * 1.05).to(torch.bfloat16), exact)
    assert abs(t) <= math.sqrt(n) + 1e-9 and not biased(torch.bfloat16, b, t)
    assert bias_statistics(exact, exact) == (0.0, 0.0)
