"""Random-initialized Hugging Face decoders, saved as safetensors directories: the independent
reference for the runtime's architecture tests (transformers computes, portinfer loads the files).

Weights are re-drawn at a useful scale (HF's init leaves biases at zero and norms at one, which
would let a runtime that ignores them pass): linear weights ~ N(0, 1/fan_in), biases and norm
weights visibly non-trivial, so greedy decoding has clear margins between candidates.
"""
import torch

# token-id prompts of three lengths (within the models' 160-token vocabulary): one prompt, and a batch
# that pads two of them
PROMPTS = [[1, 5, 9, 33, 2, 71, 100], [1, 44], [1, 7, 7, 7, 120, 3, 15, 16, 17, 150, 99, 2, 4]]

ARCHS = {
    # GQA, untied embeddings
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # q/k/v biases, tied embeddings
    "qwen2_bias_tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    # head_dim != hidden / heads (64 / 4 = 16)
    "llama_head_dim": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    "llama3_rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}
# the GLM-4 / Qwen3 / Yi families, tested in test_models_new_arch.py (with plans, GGUF and chat templates)
FAMILY_ARCHS = {
    # GLM-4-9B-chat-hf: rotary on half of each head with adjacent pairs, q/k/v biases, fused gate_up in the
    # checkpoint; head_dim = hidden / heads as llama.cpp's chatglm converter assumes (GlmConfig's pad id
    # 151329 would lie outside this vocabulary: no padding row)
    "glm": ("GlmConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=None)),
    # GLM-4-0414: as glm plus norms after attention and after the MLP; head_dim != hidden / heads
    "glm4": ("Glm4Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, pad_token_id=None)),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads, tied embeddings (as Qwen3-0.6B ... 4B)
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                  tie_word_embeddings=True)),
    # Yi-1.5 (llama): GQA 8:1, rope_theta 5e6, rms_norm_eps 1e-6, untied
    "yi": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=1, rope_parameters={
        "rope_type": "default", "rope_theta": 5000000.0}, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def build(arch, path, seed=0, vocab_size=160, hidden_size=64, layers=2):
    import transformers

    config_cls, extra = {**ARCHS, **FAMILY_ARCHS}[arch]
    config = getattr(transformers, config_cls)(**{
        **dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=layers,
               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2), **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_greedy(model, ids, steps):
    """transformers' own greedy generation (no eos stop, an explicit all-ones attention mask so no
    pad id can be mistaken for padding), the new tokens as a list."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
