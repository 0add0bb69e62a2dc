"""The conformance edge set (cases.edge_examples) runs on every check, so attention bugs at tile
boundaries, in a fully masked row or in GQA grouping are caught on every seed, not by chance (issue 16:
a bug hiding key 64 escaped one bf16 seed). Planted bugs on the torch backend, 20 seeds each."""
import pytest
import torch

import portinfer
from portinfer.backends.base import attention_mask
from portinfer.backends.torch_backend import TorchBackend


class _MaskedAttention(TorchBackend):
    """torch attention with a planted mask bug: `hide(visible, Sk)` turns keys off (rows left with no key
    are zeroed as the contract says, so only the hidden keys differ)."""

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        visible = self.hide(attention_mask(q_pos, kv_len, q.shape[2], k.shape[2], causal, q.device), k.shape[2])
        empty = ~visible.any(dim=-1, keepdim=True)
        k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
        v_full = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
        scores = (q.float() @ k_full.transpose(-1, -2) * scale).masked_fill(~(visible | empty), float("-inf"))
        return (torch.softmax(scores, -1) @ v_full).masked_fill(empty, 0.0).to(q.dtype)


class HidesKey64(_MaskedAttention):
    name = "planted-hides-key-64"

    @staticmethod
    def hide(visible, Sk):
        if Sk > 64:
            visible = visible.clone()
            visible[..., 64] = False
        return visible


class DropsSecondKeyBlock(_MaskedAttention):
    name = "planted-drops-key-block"

    @staticmethod
    def hide(visible, Sk):
        visible = visible.clone()
        visible[..., 64:128] = False
        return visible


class CausalOffByOne(_MaskedAttention):
    name = "planted-causal-off-by-one"

    @staticmethod
    def hide(visible, Sk):  # j < q_pos + i instead of j <= q_pos + i: the diagonal key is lost
        shifted = torch.zeros_like(visible)
        shifted[..., :-1] = visible[..., 1:]
        return visible & shifted | (visible & ~visible.any(-1, keepdim=True))


class CorrectMasked(_MaskedAttention):
    name = "planted-none"

    @staticmethod
    def hide(visible, Sk):
        return visible


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_correct_backend_passes_the_edge_set(dtype):
    results = portinfer.check(CorrectMasked(), ops=["attention"], dtypes=[dtype], profile="small", max_examples=1,
                              seed=0)
    assert results.passed, results.table()


@pytest.mark.parametrize("planted", [HidesKey64, DropsSecondKeyBlock, CausalOffByOne])
def test_planted_attention_bug_caught_on_every_seed(planted):
    for seed in range(20):
        for dtype in ("bf16",):
            results = portinfer.check(planted(), ops=["attention"], dtypes=[dtype], profile="small", max_examples=1,
                                      seed=seed)
            assert not results.passed, f"{planted.name} escaped seed {seed} ({dtype})"
