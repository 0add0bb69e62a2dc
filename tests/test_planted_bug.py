"""The suite must catch a wrong backend, name the op, and print a shrunk, reproducible case."""
import pytest
import torch

import portinfer
from portinfer import cli
from portinfer.backends import registry
from portinfer.backends.torch_backend import TorchBackend


class WrongHalfRope(TorchBackend):
    """neox rope that rotates the wrong half (x2 takes x1's role): a classic porting bug."""
    name = "planted-rope-bug"

    def _rope(self, x, pos, rotary):
        rd = rotary.rotary_dim
        swapped = torch.cat([x[..., rd // 2: rd], x[..., : rd // 2], x[..., rd:]], dim=-1)
        return super()._rope(swapped, pos, rotary)


class UnscaledAttention(TorchBackend):
    """attention that forgets its scale."""
    name = "planted-scale-bug"

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        return super()._attention(q, k, v, q_pos, kv_len, causal, 1.0)


class LastRowUnwritten(TorchBackend):
    """silu_mul into a preallocated output whose last row is never written (an off-by-one tile)."""
    name = "planted-unwritten"

    def _silu_mul(self, x):
        y = super()._silu_mul(x)
        out = self.new_output(y.shape, y.dtype)
        out[:-1] = y[:-1]
        return out


PLANTED = (WrongHalfRope, UnscaledAttention, LastRowUnwritten)


@pytest.fixture
def planted():
    for cls in PLANTED:
        registry.register(cls.name, cls)
    yield
    for cls in PLANTED:
        registry.unregister(cls.name)


def test_rope_bug_fails_rope_only_with_shrunk_reproducible_case(planted):
    results = portinfer.check("planted-rope-bug", ops=["rope", "silu_mul"], dtypes=["fp32"], seed=1234)
    assert not results.passed
    rope = results.row("rope", "fp32")
    assert rope.status == "fail"
    assert results.row("silu_mul", "fp32").status == "pass"
    assert rope.failure.error > 10 * rope.failure.budget
    # shrunk: hypothesis minimizes sizes towards the smallest failing case
    assert rope.failure.params["B"] == 1 and rope.failure.params["H"] == 1
    assert "--seed 1234" in rope.reproduce
    table = results.table()
    assert "FAIL rope fp32" in table and "shrunk case:" in table and rope.reproduce in table
    # the printed seed reproduces the same shrunk case
    again = portinfer.check("planted-rope-bug", ops=["rope"], dtypes=["fp32"], seed=1234)
    assert again.row("rope", "fp32").failure.params == rope.failure.params


def test_unscaled_attention_is_caught_in_every_dtype(planted):
    results = portinfer.check("planted-scale-bug", ops=["attention"], seed=7)
    assert [r.status for r in results.rows] == ["fail", "fail", "fail"]


def test_unwritten_output_elements_are_caught_by_poison(planted):
    results = portinfer.check("planted-unwritten", ops=["silu_mul"], dtypes=["bf16"], seed=11)
    row = results.row("silu_mul", "bf16")
    assert row.status == "fail" and "NaN positions differ" in row.failure.message
    assert row.failure.params["M"] == 1  # shrunk to a single (unwritten) row


def test_check_cli_exits_nonzero_and_prints_the_reproduction(planted, capsys):
    code = cli.main(["check", "--backend", "planted-rope-bug", "--ops", "rope", "--dtypes", "fp32", "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL rope fp32" in out
    assert "portinfer check --backend planted-rope-bug --ops rope --dtypes fp32 --seed 5" in out
