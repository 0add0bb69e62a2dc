"""The error budget's floor for outputs that round into the subnormal range."""
import math

import torch

from portinfer.conformance.budget import budget, relative_error


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
