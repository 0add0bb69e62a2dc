"""Bad input to any op raises a ValueError naming the argument and what was expected, before
any kernel runs, on every available backend (the reference included)."""
import pytest
import torch

from portinfer import backends
from portinfer.backends import quant, spec

from conftest import available_backends

BACKENDS = available_backends(exclude=())
i32 = torch.int32


def _attention_args(**over):
    args = dict(q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8),
                q_pos=torch.tensor([0], dtype=i32), kv_len=torch.tensor([5], dtype=i32), causal=True, scale=0.5)
    args.update(over)
    return args


CASES = {
    # op name, a callable taking the backend, the expected message fragment
    "embedding ids outside vocab": (lambda b: b.embedding(torch.tensor([0, 10]), torch.randn(10, 4)),
                                    r"ids: expected every id in \[0, 10\).*got 10"),
    "embedding negative id": (lambda b: b.embedding(torch.tensor([-1]), torch.randn(10, 4)), r"ids: .*got -1"),
    "embedding int32 ids": (lambda b: b.embedding(torch.tensor([1], dtype=i32), torch.randn(10, 4)),
                            r"ids: expected int64"),
    "linear wrong K": (lambda b: b.linear(torch.randn(2, 5), b.prepare_linear(torch.randn(3, 4))),
                       r"x: expected K = 4"),
    "linear dtype mismatch": (lambda b: b.linear(torch.randn(2, 4, dtype=torch.float16),
                                                 b.prepare_linear(torch.randn(3, 4))), r"x: expected dtype fp32"),
    "linear bias shape": (lambda b: b.linear(torch.randn(2, 4), b.prepare_linear(torch.randn(3, 4)), torch.randn(4)),
                          r"bias: expected shape \[3\]"),
    "linear int weight": (lambda b: b.prepare_linear(torch.ones(3, 4, dtype=torch.int32)), r"weight: expected"),
    "linear strided last dim": (lambda b: b.linear(torch.randn(4, 2).T, b.prepare_linear(torch.randn(3, 4))),
                                r"x: expected unit stride in the last dimension"),
    "rms_norm weight shape": (lambda b: b.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5),
                              r"weight: expected shape \[8\]"),
    "rms_norm fp64": (lambda b: b.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-5),
                      r"x: expected dtype fp32, fp16 or bf16"),
    "rms_norm eps": (lambda b: b.rms_norm(torch.randn(2, 8), torch.randn(8), -1.0), r"eps: expected a finite number > 0"),
    "rms_norm empty": (lambda b: b.rms_norm(torch.randn(0, 8), torch.randn(8), 1e-5), r"x: expected a non-empty"),
    "layer_norm bias dtype": (lambda b: b.layer_norm(torch.randn(2, 8), torch.randn(8),
                                                     torch.randn(8, dtype=torch.bfloat16), 1e-5),
                              r"bias: expected dtype fp32"),
    "rope rank": (lambda b: b.rope(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long),
                                   spec.RotaryParams.from_theta(8)), r"x: expected 4 dims"),
    "rope pos shape": (lambda b: b.rope(torch.randn(1, 2, 3, 8), torch.zeros(1, 4, dtype=torch.long),
                                        spec.RotaryParams.from_theta(8)), r"pos: expected shape \[1, 3\]"),
    "rope rotary_dim": (lambda b: b.rope(torch.randn(1, 2, 3, 8), torch.zeros(1, 3, dtype=torch.long),
                                         spec.RotaryParams.from_theta(16)), r"rotary: expected an even rotary_dim <= head dim 8"),
    "silu_mul odd": (lambda b: b.silu_mul(torch.randn(2, 7)), r"x: expected an even number of columns"),
    "gelu variant": (lambda b: b.gelu(torch.randn(3), "fast"), r"approximate: expected 'none'"),
    "attention Hq not multiple": (lambda b: b.attention(**_attention_args(q=torch.randn(1, 3, 3, 8))),
                                  r"q: expected Hq to be a multiple of Hkv = 2"),
    "attention kv_len > Sk": (lambda b: b.attention(**_attention_args(kv_len=torch.tensor([6], dtype=i32))),
                              r"kv_len: expected values in \[0, Sk = 5\].*got 6"),
    "attention q_pos dtype": (lambda b: b.attention(**_attention_args(q_pos=torch.tensor([0]))),
                              r"q_pos: expected dtype int32"),
    "attention head dim": (lambda b: b.attention(**_attention_args(k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4))),
                           r"k: expected shape \[B=1, Hkv, Sk, D=8\]"),
    "attention v shape": (lambda b: b.attention(**_attention_args(v=torch.randn(1, 2, 4, 8))),
                          r"v: expected shape \[1, 2, 5, 8\]"),
    "attention k dtype": (lambda b: b.attention(**_attention_args(k=torch.randn(1, 2, 5, 8, dtype=torch.float16))),
                          r"k: expected dtype fp32"),
    "attention strided q": (lambda b: b.attention(**_attention_args(q=torch.randn(1, 4, 8, 3).transpose(-1, -2))),
                            r"q: expected unit stride in the last dimension"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_input_is_a_clear_value_error(name, case):
    backend = backends.get(name, device="cpu") if name in ("torch", "reference") else backends.get(name)
    call, message = CASES[case]
    if backend.device.type != "cpu":
        pytest.skip(f"these cases build CPU tensors; {name} runs on {backend.device}")
    if case.startswith("linear") and case != "linear int weight" and not backend.supports("linear", dtype=torch.float32):
        pytest.skip(f"this case prepares an fp32 weight and {name} has no fp32 linear (a partial backend)")
    called = []
    for op in spec.OPS + ("prepare_linear",):  # no implementation may run on bad input
        impl = getattr(backend, "_" + op)
        setattr(backend, "_" + op, lambda *a, _impl=impl, _op=op, **k: called.append(_op) or _impl(*a, **k))
    with pytest.raises(ValueError, match=message):
        call(backend)
    assert [op for op in called if op != "prepare_linear"] == [], \
        f"{name}: kernel {called} ran before the bad input was rejected"


def test_quantized_weight_shape_is_checked():
    blocks = quant.quantize(torch.randn(4, 64), "q8_0").blocks
    with pytest.raises(ValueError, match=r"q8_0 weight blocks: expected uint8 \[4, 68\]"):
        spec.QuantizedWeight("q8_0", blocks[:, :-1], (4, 64))
    with pytest.raises(ValueError, match="K=48 must be a multiple of the block size 32"):
        spec.QuantizedWeight("q4_0", blocks, (4, 48))
