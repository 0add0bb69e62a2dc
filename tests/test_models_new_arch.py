"""GLM-4-9B-chat-hf (`glm`), GLM-4-0414 (`glm4`), Qwen3 (`qwen3`) and Yi-1.5 (`llama`) against Hugging Face
transformers, from safetensors directories and from GGUF files laid out as llama.cpp's converter writes them.

- Models: random-initialized transformers models (GlmConfig, Glm4Config, Qwen3Config, a Yi-shaped LlamaConfig;
  tests/hf_models.py): fp32 logits within 1e-4 (relative L2) and 32 identical greedy tokens for one prompt and
  for a padded batch, on every model backend, on the op path and through step plans.
- GGUF: the same architectures written the way convert_hf_to_gguf.py writes them (chatglm: no key_length,
  context_length = hidden size, rms eps 1e-5, rope.dimension_count = half the head; glm4/qwen3: the TextModel
  keys plus key_length; GLM's fused gate_up under ffn_up, glm4's post_attention_norm / post_ffw_norm, qwen3's
  attn_q_norm / attn_k_norm; Q/K rows permuted for llama (Yi) only), mixed quantized and fp16 tensors; the
  runtime's greedy tokens equal transformers' on the stored (dequantized) weights.
- Chat templates: the templates as the models' tokenizer_config.json ship them (tests/chat_templates/, see
  the provenance there), written into each test directory's tokenizer_config.json; portinfer's rendering equals
  transformers' apply_chat_template for a multi-turn conversation with a system message (Qwen3 with
  enable_thinking unset, True and False), and both tokenize the result to the same ids.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import portinfer
from portinfer.backends import quant
from portinfer.runtime import ModelConfig, load_checkpoint

import hf_models
from conftest import model_backends

ARCHS = ("glm", "glm4", "qwen3", "yi")
PROMPTS = hf_models.PROMPTS
STEPS = 32
TEMPLATES = Path(__file__).parent / "chat_templates"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word."},
]


# ---------------------------------------------------------------------------- tokenizers as the models ship them

def _byte_level_tokenizer(split_regex, specials, normalizer=None):
    """A small byte-level BPE (GLM-4 / Qwen3 style): printable ASCII and newline, a few merges, special tokens
    matched whole; <= 160 ids so the test models' vocabulary covers it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    alphabet = [byte_char[b] for b in [10] + list(range(32, 127))]
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("a", "n"), ("Ġ", "a")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if normalizer == "NFC":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _sentencepiece_tokenizer(specials):
    """A small Llama-style (SentencePiece converted) BPE as Yi ships it: '▁' for spaces, byte fallback off
    here (256 byte tokens would not fit the test vocabulary; unknown characters map to <unk>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    chars = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\n")
    vocab = {t: i for i, t in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>"]


def write_tokenizer(arch, path):
    """tokenizer.json + tokenizer_config.json (with the real chat template) as each model family ships them."""
    if arch in ("glm", "glm4"):
        tok = _byte_level_tokenizer(_LLAMA3_SPLIT, _GLM_SPECIALS)
        template = (TEMPLATES / ("glm-4-9b-chat.jinja" if arch == "glm" else "glm-4-9b-0414.jinja")).read_text()
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "do_lower_case": False,
               "remove_space": False, "padding_side": "left"}
    elif arch == "qwen3":
        tok = _byte_level_tokenizer(_QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "NFC")
        from tokenizers import AddedToken
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
        template = (TEMPLATES / "qwen3-8b.jinja").read_text()
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "errors": "replace",
               "split_special_tokens": False, "clean_up_tokenization_spaces": False}
    else:  # Yi-1.5
        tok = _sentencepiece_tokenizer(["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                        "<|im_sep|>"])
        template = (TEMPLATES / "yi-1.5-chat.jinja").read_text()
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
               "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
               "legacy": True, "use_default_system_prompt": False, "spaces_between_special_tokens": False,
               "clean_up_tokenization_spaces": False}
    assert tok.get_vocab_size() <= 160
    tok.save(str(path / "tokenizer.json"))
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------- fixtures

def _load(path, backend, plans=None):
    """plans None: load's default (plans); False: the op path."""
    options = {} if plans is None else {"plans": plans}
    return portinfer.load(path, backend=backend, dtype="fp32", fallback="error", **options)


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    """arch, its HF directory, the transformers model, and transformers' logits and greedy tokens (computed once)."""
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    hf = hf_models.build(arch, path)
    write_tokenizer(arch, path)
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        logits = hf(ids).logits
    greedy = [hf_models.hf_greedy(hf, p, STEPS) for p in PROMPTS]
    return arch, path, hf, ids, logits, greedy


def relative_error(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------- models vs transformers

@pytest.mark.parametrize("plans", [False, True], ids=["op-path", "plans"])
@pytest.mark.parametrize("backend", model_backends())
def test_logits_and_greedy_tokens_match_transformers(checkpoint, backend, plans):
    arch, path, hf, ids, ref_logits, ref_greedy = checkpoint
    model = _load(path, backend, plans)
    err = relative_error(model.logits(ids), ref_logits)
    assert err <= 1e-4, f"{arch} on {backend}: logits relative error {err:.2e} > 1e-4"
    one = model.generate(PROMPTS[0], max_new_tokens=STEPS, eos_token_id=[])
    assert one.token_ids == ref_greedy[0], f"{arch} on {backend}"
    # prompts of different lengths, right-padded into one cache, against each prompt alone in transformers
    batch = model.generate(PROMPTS, max_new_tokens=STEPS, eos_token_id=[])
    for prompt, got, want in zip(PROMPTS, batch, ref_greedy):
        assert got.token_ids == want, f"{arch} on {backend}: prompt of {len(prompt)}"


def test_config_normalization(checkpoint):
    """What the loader understood from config.json, against transformers' own config and modules."""
    arch, path, hf, *_ = checkpoint
    c = hf.config
    cfg = load_checkpoint(path).config
    assert isinstance(cfg, ModelConfig)
    assert cfg.architecture == {"yi": "llama"}.get(arch, arch)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (c.num_attention_heads, c.num_key_value_heads,
                                                               c.head_dim)
    attn = hf.model.layers[0].self_attn
    assert cfg.qkv_bias == (attn.q_proj.bias is not None)
    assert cfg.o_bias == (attn.o_proj.bias is not None)
    assert cfg.qk_norm == hasattr(attn, "q_norm")
    assert cfg.post_norms == hasattr(hf.model.layers[0], "post_mlp_layernorm")
    assert cfg.rope_style == ("interleaved" if arch in ("glm", "glm4") else "neox")
    # the rotary frequencies transformers uses (its partial rotary included) equal ours to fp32 precision
    inv_freq = hf.model.rotary_emb.inv_freq.double()
    assert torch.allclose(cfg.rotary().inv_freq, inv_freq, rtol=1e-6, atol=0)


def test_hub_style_config_json():
    """config.json keys as the hub's GLM-4-9B-chat-hf / Qwen3 files spell them (top-level rope_theta and
    partial_rotary_factor, rope_scaling null, sliding_window off) read the same as transformers 5's."""
    glm = ModelConfig.from_hf({
        "architectures": ["GlmForCausalLM"], "model_type": "glm", "attention_bias": True, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 13696, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 151552,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329})
    assert (glm.rotary_dim, glm.rope_style, glm.qkv_bias, glm.o_bias) == (64, "interleaved", True, False)
    assert glm.eos_token_ids == [151329, 151336, 151338]
    qwen3 = ModelConfig.from_hf({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
        "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960, "num_attention_heads": 32,
        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": True,
        "vocab_size": 151936})
    assert (qwen3.head_dim, qwen3.rotary_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.context_length) == (
        128, 128, True, False, 40960)


def test_unsupported_model_type_names_every_architecture():
    with pytest.raises(portinfer.runtime.ConfigError) as info:
        ModelConfig.from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForCausalLM"]})
    for arch in ("llama", "qwen2", "mistral", "qwen3", "glm", "glm4"):
        assert arch in str(info.value)


# ---------------------------------------------------------------------------- GGUF as llama.cpp writes it

def _llama_cpp_permute(w, heads):
    """convert_hf_to_gguf LlamaModel.permute: rows of each head reordered from (half, pair) to (pair, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_ARCH = {"glm": "chatglm", "glm4": "glm4", "qwen3": "qwen3", "yi": "llama"}
GGUF_FORMAT = {"glm": "q8_0", "glm4": "q4_0", "qwen3": "q8_0", "yi": "q4_1"}


def write_gguf(hf, arch, path, fmt):
    """The GGUF convert_hf_to_gguf.py writes for this architecture (metadata keys, tensor names and layout);
    2-D weights in `fmt` or fp16, norms and biases fp32. The HF model's weights are replaced by the values
    stored (dequantized), so transformers computes on exactly what the file holds."""
    import gguf

    c = hf.config
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), GGUF_ARCH[arch])
    heads, kv, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_vocab_size(c.vocab_size)
    if arch == "glm":  # ChatGLMModel.set_gguf_parameters
        w.add_context_length(hidden)  # seq_length is absent from GlmConfig: the converter falls back to n_embed
        w.add_layer_norm_rms_eps(1e-5)  # layernorm_epsilon is absent: its default
        w.add_rope_dimension_count(int(hidden // heads * 0.5))
        w.add_add_bos_token(False)
        w.add_rope_freq_base(10000)
    else:  # TextModel.set_gguf_parameters (+ Glm4Model's rope dimension)
        w.add_context_length(c.max_position_embeddings)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if getattr(c, "head_dim", None) is not None and arch != "yi":
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        if arch == "glm4":
            w.add_rope_dimension_count(int(c.head_dim * 0.5))
    replaced = {}

    def add(name, hf_name, permute_heads=None, quantize=True):
        t = sd[hf_name]
        if quantize and t.dim() == 2:
            q = quant.quantize(t, fmt)  # blocks run along rows: quantizing before permuting rows is the same
            replaced[hf_name] = quant.dequantize(q)
            stored, raw = q.blocks.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper())
        else:
            stored, raw = t.numpy().astype(np.float16 if t.dim() == 2 else np.float32), None
            replaced[hf_name] = torch.from_numpy(stored).float()
        if permute_heads:
            stored = np.ascontiguousarray(_llama_cpp_permute(stored, permute_heads))
        if raw is None:
            w.add_tensor(name, stored)
        else:
            w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=raw)

    add("token_embd.weight", "model.embed_tokens.weight", quantize=False)
    add("output_norm.weight", "model.norm.weight")
    if not c.tie_word_embeddings:
        add("output.weight", "lm_head.weight")
    permute = arch == "yi"
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", heads if permute else None)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", kv if permute else None, quantize=False)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight")
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight")
        if arch in ("glm", "glm4"):
            add(f"blk.{i}.ffn_up.weight", p + "mlp.gate_up_proj.weight")  # fused [gate | up]
            for n in "qkv":
                add(f"blk.{i}.attn_{n}.bias", p + f"self_attn.{n}_proj.bias")
        else:
            add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight")
            add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight")
        if arch == "glm4":
            add(f"blk.{i}.post_attention_norm.weight", p + "post_self_attn_layernorm.weight")
            add(f"blk.{i}.post_ffw_norm.weight", p + "post_mlp_layernorm.weight")
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", p + "self_attn.q_norm.weight")
            add(f"blk.{i}.attn_k_norm.weight", p + "self_attn.k_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for name, value in replaced.items():
            hf.state_dict()[name].copy_(value)
    if c.tie_word_embeddings:  # tied: the head is the (fp16-rounded) embedding
        hf.lm_head.weight = hf.model.embed_tokens.weight


@pytest.fixture(scope="module", params=ARCHS)
def gguf_checkpoint(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(f"gguf-{arch}")
    hf = hf_models.build(arch, path / "hf")
    write_gguf(hf, arch, path / "m.gguf", GGUF_FORMAT[arch])
    return arch, path / "m.gguf", hf, hf_models.hf_greedy(hf, PROMPTS[2], STEPS)


@pytest.mark.parametrize("backend", model_backends())
def test_gguf_gives_the_tokens_of_transformers(gguf_checkpoint, backend):
    arch, path, hf, want = gguf_checkpoint
    model = _load(path, backend)
    cfg = model.config
    assert cfg.architecture == {"yi": "llama"}.get(arch, arch)
    assert (cfg.head_dim, cfg.rotary_dim) == (hf.config.head_dim, hf.model.rotary_emb.inv_freq.numel() * 2)
    got = model.generate(PROMPTS[2], max_new_tokens=STEPS, eos_token_id=[]).token_ids
    assert got == want, f"{arch} GGUF ({GGUF_FORMAT[arch]}) on {backend}"


# ---------------------------------------------------------------------------- chat templates

@pytest.mark.parametrize("template_kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}],
                         ids=["default", "thinking", "no-thinking"])
def test_chat_template_renders_as_transformers(checkpoint, template_kwargs):
    from transformers import AutoTokenizer

    arch, path, *_ = checkpoint
    if template_kwargs and arch != "qwen3":
        pytest.skip("enable_thinking is a Qwen3 template switch")
    ours = portinfer.runtime.load_checkpoint(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(path)
    messages = MESSAGES
    if arch == "qwen3":  # an earlier assistant turn that thought aloud: the template drops its reasoning
        messages = MESSAGES[:2] + [{"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."}] + \
            MESSAGES[3:]
    for add_generation_prompt in (True, False):
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)
        got = ours.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        assert got == want, f"{arch}: rendered prompt differs"
        # and the prompt tokenizes the same (apply_chat_template(tokenize=True) adds no special tokens)
        assert ours.encode(got, add_special_tokens=False) == theirs.encode(want, add_special_tokens=False)
    if template_kwargs.get("enable_thinking") is False:
        assert got.endswith("<|im_start|>user\nAnd of Italy? Answer in one word.<|im_end|>\n")
        assert ours.apply_chat_template(messages, True, enable_thinking=False).endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_model_apply_chat_template_passes_template_kwargs(checkpoint):
    """Model.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs) reaches the template."""
    arch, path, *_ = checkpoint
    if arch != "qwen3":
        pytest.skip("enable_thinking is a Qwen3 template switch")
    model = portinfer.load(path, backend="torch", dtype="fp32")
    on = model.apply_chat_template(MESSAGES)
    off = model.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"


def test_yi_tokenizer_matches_transformers(checkpoint):
    """Yi ships a SentencePiece-converted tokenizer.json with add_bos_token false: text and special tokens encode
    and decode as transformers' LlamaTokenizer does with the same files.

    One known difference, not tested: transformers 5's LlamaTokenizer rebuilds the pipeline from its class
    (a Metaspace pre-tokenizer instead of the file's Prepend + Replace normalizer), so a text that starts with a
    space gets one '▁' there and two here; portinfer follows tokenizer.json as the tokenizers library (and
    transformers 4) read it."""
    from transformers import AutoTokenizer

    arch, path, *_ = checkpoint
    if arch != "yi":
        pytest.skip("Yi's tokenizer settings")
    ours = portinfer.runtime.load_checkpoint(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(path)
    for text in ["the cat ate the rat", "<|im_start|>user\nHi there!<|im_end|>\n", "two  spaces, 2 digits 42",
                 "Yes! 3 cats, 7 rats."]:
        assert ours.encode(text) == theirs(text).input_ids, text
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
