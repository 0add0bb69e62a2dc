"""The runtime vs Hugging Face transformers on random-initialized Llama / Qwen2 / Mistral checkpoints,
on every backend a model runs on: fp32 logits within 1e-4 (relative L2) and greedy tokens identical
for 32 steps, for one prompt and for a batch of prompts of different lengths."""
import pytest
import torch

import portinfer
from portinfer.runtime import ModelConfig

import hf_models
from conftest import model_backends

PROMPTS = hf_models.PROMPTS


@pytest.fixture(scope="module", params=sorted(hf_models.ARCHS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_models.build(request.param, path)
    return request.param, path, model


def relative_error(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("backend", model_backends())
def test_logits_and_greedy_tokens_match_transformers(checkpoint, backend):
    arch, path, hf = checkpoint
    model = portinfer.load(path, backend=backend, dtype="fp32", fallback="error")
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        ref = hf(ids).logits
    err = relative_error(model.logits(ids), ref)
    assert err <= 1e-4, f"{arch} on {backend}: logits relative error {err:.2e} > 1e-4"

    for prompt in PROMPTS[:1]:
        ours = model.generate(prompt, max_new_tokens=32, eos_token_id=[])
        assert ours.token_ids == hf_models.hf_greedy(hf, prompt, 32), f"{arch} on {backend}"
        assert ours.finish_reason == "length"

    # a batch of prompts of different lengths, decoded together, against each prompt alone in transformers
    batch = model.generate(PROMPTS, max_new_tokens=32, eos_token_id=[])
    for prompt, got in zip(PROMPTS, batch):
        assert got.token_ids == hf_models.hf_greedy(hf, prompt, 32), f"{arch} on {backend}: prompt of {len(prompt)}"


def test_config_normalization(checkpoint):
    """What the loader understood from config.json, field by field, against transformers' own config."""
    arch, path, hf = checkpoint
    c = hf.config
    cfg = portinfer.runtime.load_checkpoint(path).config
    assert isinstance(cfg, ModelConfig)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert cfg.tie_word_embeddings == bool(c.tie_word_embeddings)
    assert cfg.qkv_bias == (arch.startswith("qwen2"))
    # the rotary frequencies transformers uses (computed in fp32 there) equal ours (float64) to fp32 precision
    inv_freq = hf.model.rotary_emb.inv_freq.double()
    assert torch.allclose(cfg.rotary().inv_freq, inv_freq, rtol=1e-6, atol=0)
