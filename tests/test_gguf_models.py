"""GGUF files written by the gguf package's own writer from random Hugging Face models, the way
llama.cpp's converter lays them out (llama Q/K rows permuted for interleaved rope, Qwen2 not;
quantized and fp16 tensors mixed), loaded by portinfer and compared with transformers running the
same weights (the quantized ones replaced by their dequantized values)."""
import numpy as np
import pytest
import torch

import portinfer
from portinfer.backends import quant

import hf_models
from conftest import model_backends

PROMPT = [1, 5, 9, 33, 2, 71, 100, 7, 7, 120]


def llama_cpp_permute(w, heads):
    """llama.cpp convert_hf_to_gguf: rows of each head reordered from (half, pair) to (pair, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, arch, path, fmt):
    import gguf

    c = hf.config
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    replaced = {}

    def add(name, hf_name, permute_heads=None, quantize=True):
        """Store a tensor as llama.cpp would; the HF reference gets exactly the stored values."""
        t = sd[hf_name]
        if quantize and t.dim() == 2:
            q = quant.quantize(t, fmt)  # blocks run along rows, so quantizing before permuting rows is the same
            replaced[hf_name] = quant.dequantize(q)
            stored, raw = q.blocks.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper())
        else:
            stored, raw = t.numpy().astype(np.float16 if t.dim() == 2 else np.float32), None
            replaced[hf_name] = torch.from_numpy(stored).float()
        if permute_heads:
            stored = np.ascontiguousarray(llama_cpp_permute(stored, permute_heads))
        if raw is None:
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=raw)

    add("token_embd.weight", "model.embed_tokens.weight", quantize=False)
    add("output_norm.weight", "model.norm.weight")
    if not c.tie_word_embeddings:
        add("output.weight", "lm_head.weight")
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    permute = arch == "llama"
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", heads if permute else None)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", kv if permute else None, quantize=False)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight")
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")
        if arch == "qwen2":
            for n in "qkv":
                add(f"blk.{i}.attn_{n}.bias", p + f"self_attn.{n}_proj.bias")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for name, value in replaced.items():
            hf.state_dict()[name].copy_(value)
    if c.tie_word_embeddings:  # tied: the head is the (fp16-rounded) embedding
        hf.lm_head.weight = hf.model.embed_tokens.weight


@pytest.mark.parametrize("arch, model, fmt", [("llama", "llama_gqa", "q8_0"), ("qwen2", "qwen2_bias_tied", "q4_0"),
                                              ("llama", "llama_gqa", "q4_1")])
@pytest.mark.parametrize("backend", model_backends())
def test_gguf_loads_like_transformers(tmp_path, arch, model, fmt, backend):
    hf = hf_models.build(model, tmp_path / "hf")
    write_gguf(hf, arch, tmp_path / "m.gguf", fmt)
    ours = portinfer.load(tmp_path / "m.gguf", backend=backend, dtype="fp32", fallback="error")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf(ids).logits
    err = float((ours.logits(ids).double() - ref.double()).norm() / ref.double().norm())
    assert err <= 1e-4, f"{arch}/{fmt} on {backend}: {err:.2e}"
    assert ours.generate(ids[0].tolist(), max_new_tokens=16, eos_token_id=[]).token_ids == \
        hf_models.hf_greedy(hf, ids[0].tolist(), 16)

