"""The oracle against independent float64 formulas (torch.nn.functional in float64 and
Hugging Face's rotate-half rope written out), on fixed and random inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from portinfer.backends import quant, spec
from portinfer.backends.reference import ReferenceBackend

F64 = torch.float64


@pytest.fixture
def ref():
    return ReferenceBackend(exact=True)


def close(a, b, tol=1e-12):
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_linear_and_norms(ref):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g)
    w = torch.randn(11, 37, generator=g)
    b = torch.randn(11, generator=g)
    close(ref.linear(x, ref.prepare_linear(w), b), F.linear(x.double(), w.double(), b.double()))
    gamma, beta = torch.randn(37, generator=g), torch.randn(37, generator=g)
    close(ref.layer_norm(x, gamma, beta, 1e-5), F.layer_norm(x.double(), (37,), gamma.double(), beta.double(), 1e-5))
    close(ref.rms_norm(x, gamma, 1e-6), F.rms_norm(x.double(), (37,), gamma.double(), 1e-6))


def test_quantized_linear_uses_exact_blocks(ref):
    w = torch.randn(8, 64)
    qw = quant.quantize(w, "q4_1")
    import gguf
    dense = torch.from_numpy(gguf.quants.dequantize(qw.blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)).double()
    x = torch.randn(3, 64)
    close(ref.linear(x, ref.prepare_linear(qw)), x.double() @ dense.T)


def test_elementwise(ref):
    x = torch.linspace(-12, 12, 97)
    close(ref.gelu(x), F.gelu(x.double()))
    close(ref.gelu(x, "tanh"), F.gelu(x.double(), approximate="tanh"))
    xy = torch.randn(4, 10)
    close(ref.silu_mul(xy), F.silu(xy[:, :5].double()) * xy[:, 5:].double())
    table = torch.randn(7, 3)
    ids = torch.tensor([6, 0, 6, 3])
    close(ref.embedding(ids, table), table.double()[ids])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_neox_matches_hugging_face_formula(ref, rotary_dim):
    B, H, S, D = 2, 3, 5, 16
    x = torch.randn(B, H, S, D)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    rot = spec.RotaryParams.from_theta(D, 10000.0, rotary_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim))
    freqs = pos.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    xr, xp = x.double()[..., :rotary_dim], x.double()[..., rotary_dim:]
    expected = torch.cat((xr * emb.cos() + _rotate_half(xr) * emb.sin(), xp), dim=-1)
    close(ref.rope(x, pos, rot), expected)


def test_rope_interleaved_is_complex_multiplication(ref):
    B, H, S, D = 1, 2, 4, 8
    x = torch.randn(B, H, S, D)
    pos = torch.arange(S)[None] + 3
    rot = spec.RotaryParams.from_theta(D, 10000.0, style="interleaved")
    angles = pos.double()[..., None] * rot.inv_freq  # [B, S, D/2]
    z = torch.view_as_complex(x.double().reshape(B, H, S, D // 2, 2).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(B, H, S, D)
    close(ref.rope(x, pos, rot), expected)


def test_attention_matches_sdpa_with_gqa_and_masks(ref):
    B, Hq, Hkv, Sq, Sk, D = 2, 6, 2, 3, 7, 8
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, D)
    q_pos = torch.tensor([4, 0], dtype=torch.int32)
    kv_len = torch.tensor([7, 5], dtype=torch.int32)
    out = ref.attention(q, k, v, q_pos, kv_len, causal=True, scale=0.3)
    for b in range(B):
        rows = torch.arange(Sq)[:, None] + q_pos[b]
        mask = (torch.arange(Sk)[None] <= rows) & (torch.arange(Sk)[None] < kv_len[b])
        expected = F.scaled_dot_product_attention(
            q[b:b + 1].double(), k[b:b + 1].double().repeat_interleave(3, 1),
            v[b:b + 1].double().repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
        close(out[b:b + 1], expected)


def test_attention_row_without_visible_keys_is_zero(ref):
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = ref.attention(q, k, v, torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                        causal=False, scale=0.5)
    assert torch.equal(out, torch.zeros_like(out))
    assert not math.isnan(float(out.sum()))
