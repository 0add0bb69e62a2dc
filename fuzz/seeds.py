"""The seed corpus, built deterministically from real files (no binary checked in).

- `llama3-hf/`: a Llama-3-style Hugging Face directory with random weights: config.json (llama3 rope
  scaling, untied head), model.safetensors, generation_config.json as Meta ships it, a byte-level BPE
  tokenizer.json whose vocabulary and merges are the first entries of the real SmolLM2 tokenizer with
  Llama 3's special tokens, pre-tokenizer split and post-processor (it adds <|begin_of_text|>), and
  tokenizer_config.json with the real Meta-Llama-3-8B-Instruct chat template (which writes bos_token too).
- `smollm2.gguf`: the real SmolLM2-135M-Instruct GGUF's metadata (tokenizer trimmed to its first tokens,
  chat template, keys and value types as shipped) over a 2-layer model with tiny dimensions, tensors in
  the real file's ggml types (Q4_1 / Q8_0 / F32).
- `llama3.gguf`: a Llama 3 GGUF (llama-bpe pre-tokenizer, rope_freqs.weight) of the same tiny size.

Tests use `llama3_hf_dir` for the double-BOS check against transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template", as published
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB_KEEP = 1024  # real tokens kept from the SmolLM2 vocabulary
TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, context=256)


def _smollm2_meta() -> dict:
    """The real SmolLM2 GGUF's metadata (read with portinfer's reader)."""
    from portinfer.runtime import default_model_path
    from portinfer.runtime.gguf_file import GGUFFile

    return GGUFFile(default_model_path()).metadata


def _trimmed_vocab(meta):
    tokens = list(meta["tokenizer.ggml.tokens"][:VOCAB_KEEP])
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if m.count(" ") == 1 and all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept]
    types = list(meta["tokenizer.ggml.token_type"][:VOCAB_KEEP])
    return tokens, merges, types


def llama3_hf_dir(path: Path, meta: dict | None = None, seed: int = 0) -> Path:
    """Write the Llama-3-style HF directory (random weights) into `path`; returns it."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = meta or _smollm2_meta()
    tokens, merges, _ = _trimmed_vocab(meta)
    tokens = [t for t in tokens if not (t.startswith("<|") or t.startswith("<") and t.endswith(">") and len(t) > 2)]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [m for m in merges if all(p in vocab for p in m.split(" ")) and m.replace(" ", "") in vocab]
    special = {t: len(vocab) + i for i, t in enumerate(LLAMA3_SPECIAL)}
    bos, eos, eot = special["<|begin_of_text|>"], special["<|end_of_text|>"], special["<|eot_id|>"]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in special.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        # Llama 3's post-processor: byte-level offsets, then <|begin_of_text|> before every sequence
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    V = len(vocab) + len(special)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_max_length": TINY["context"], "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLAMA3_CHAT_TEMPLATE}), encoding="utf-8")
    t = TINY
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": t["hidden"],
        "intermediate_size": t["intermediate"], "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"], "hidden_act": "silu",
        "max_position_embeddings": t["context"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eot, "torch_dtype": "float32"}), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": True, "temperature": 0.6,
        "top_p": 0.9}), encoding="utf-8")
    g = torch.Generator().manual_seed(seed)
    H, I, q, kv = t["hidden"], t["intermediate"], t["hidden"], t["hidden"] // t["heads"] * t["kv_heads"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).contiguous()

    weights = {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": 1 + rand(H), "lm_head.weight": rand(V, H)}
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": 1 + rand(H), p + "post_attention_layernorm.weight": 1 + rand(H),
                        p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
                        p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
                        p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
                        p + "mlp.down_proj.weight": rand(H, I)})
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _gguf(path: Path, meta: dict, arch: str, rope_freqs: bool, seed: int) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    t = TINY
    w = gguf.GGUFWriter(str(path), arch)
    skip = {"general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    arch_keys = {"context_length": t["context"], "embedding_length": t["hidden"], "block_count": t["layers"],
                 "feed_forward_length": t["intermediate"], "attention.head_count": t["heads"],
                 "attention.head_count_kv": t["kv_heads"], "rope.dimension_count": t["hidden"] // t["heads"]}
    for key, value in meta.items():
        if key in skip or key.startswith("llama.") and key.split(".", 1)[1] in {*arch_keys, "vocab_size"}:
            continue
        key = key.replace("llama.", f"{arch}.", 1) if key.startswith("llama.") else key
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], int):
            w.add_array(key, value)  # token_type: written as int32 by the gguf package
        elif isinstance(value, list):
            w.add_array(key, value)
    for name, value in arch_keys.items():
        w.add_uint32(f"{arch}.{name}", value)
    H, I, kv = t["hidden"], t["intermediate"], t["hidden"] // t["heads"] * t["kv_heads"]
    V = len(meta["tokenizer.ggml.tokens"])
    Q = gguf.GGMLQuantizationType

    def add(name, shape, kind):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if kind == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    add("token_embd.weight", (V, H), Q.Q8_0)
    add("output_norm.weight", (H,), Q.F32)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, t["hidden"] // t["heads"] // 2, dtype=np.float32))
    for i in range(t["layers"]):
        for name, shape, kind in (("attn_norm.weight", (H,), Q.F32), ("ffn_norm.weight", (H,), Q.F32),
                                  ("attn_q.weight", (H, H), Q.Q4_1), ("attn_k.weight", (kv, H), Q.Q4_1),
                                  ("attn_v.weight", (kv, H), Q.Q8_0), ("attn_output.weight", (H, H), Q.Q4_1),
                                  ("ffn_gate.weight", (I, H), Q.Q4_1), ("ffn_up.weight", (I, H), Q.Q4_1),
                                  ("ffn_down.weight", (H, I), Q.Q8_0)):
            add(f"blk.{i}.{name}", shape, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_gguf(path: Path, meta: dict | None = None, seed: int = 0) -> Path:
    meta = dict(meta or _smollm2_meta())
    tokens, merges, types = _trimmed_vocab(meta)
    meta.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types})
    return _gguf(Path(path), meta, "llama", rope_freqs=False, seed=seed)


def llama3_gguf(path: Path, meta: dict | None = None, seed: int = 1) -> Path:
    meta = dict(meta or _smollm2_meta())
    tokens, merges, types = _trimmed_vocab(meta)
    tokens = tokens + LLAMA3_SPECIAL
    types = types + [3] * len(LLAMA3_SPECIAL)
    meta = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
                 "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
                 "tokenizer.ggml.eos_token_id": tokens.index("<|eot_id|>"), "tokenizer.ggml.add_bos_token": True,
                 "tokenizer.chat_template": LLAMA3_CHAT_TEMPLATE, "general.name": "tiny-llama3",
                 "llama.rope.freq_base": 500000.0})
    return _gguf(Path(path), meta, "llama", rope_freqs=True, seed=seed)


def build(root: Path) -> dict:
    """Write every seed under `root` (reused when already there); returns {name: path}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = root / ".complete"
    seeds = {"llama3-hf": root / "llama3-hf", "smollm2.gguf": root / "smollm2.gguf", "llama3.gguf": root / "llama3.gguf"}
    if not done.exists():
        meta = _smollm2_meta()
        llama3_hf_dir(seeds["llama3-hf"], meta)
        smollm2_gguf(seeds["smollm2.gguf"], meta)
        llama3_gguf(seeds["llama3.gguf"], meta)
        done.write_text("ok\n")
    return seeds
