"""The review's loader cases (issue 16), each answered with a documented error that names the file and
the field: GGUF alignment 0, head_count 0, deep nesting, a dimension product that overflows 64 bits, a
rope_freqs tensor of the wrong length, an untied checkpoint without lm_head.weight, eos_token_id = true,
config values of the wrong type; and the Llama 3 chat prompt encoded exactly as transformers encodes it
(one BOS, though both the template and the tokenizer.json post-processor write it)."""
import json
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: fuzz/ (seed corpus)

from portinfer.runtime import CheckpointError, ConfigError, load_checkpoint  # noqa: E402
from portinfer.runtime.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 12 + 3?"},
            {"role": "assistant", "content": "15."}, {"role": "user", "content": "And 7 * 6?"}]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from fuzz import seeds as corpus

    try:
        return corpus.build(tmp_path_factory.mktemp("seeds"))
    except FileNotFoundError as exc:
        pytest.skip(f"the seed corpus is built from the SmolLM2 GGUF: {exc}")


def _gguf_header(kvs, tensors=(), alignment_pad=32):
    """Raw GGUF v3 bytes: kvs [(key, type, packed value bytes)], tensors [(name, dims, type, offset)]."""
    def string(s):
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, kind, value in kvs:
        out += string(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
    return out + bytes(-len(out) % alignment_pad)


def test_gguf_alignment_zero_is_a_format_error(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(_gguf_header([("general.alignment", 4, struct.pack("<I", 0))]))
    with pytest.raises(GGUFFormatError, match=r"general.alignment = 0: expected a power of two"):
        GGUFFile(path)
    with pytest.raises(CheckpointError, match=r"a\.gguf.*general.alignment"):
        load_checkpoint(path)


def test_gguf_deep_nesting_is_bounded(tmp_path):
    depth = 20_000  # deeper than Python's recursion limit: a RecursionError before
    value = struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path = tmp_path / "n.gguf"
    path.write_bytes(_gguf_header([("x.nested", 9, value)]))
    with pytest.raises(GGUFFormatError, match=r"'x.nested': arrays nested deeper than 8"):
        GGUFFile(path)


def test_gguf_dimension_product_overflow_is_caught(tmp_path):
    # 2^32 * 2^32 * 16 elements: the int64 product wraps to 0 and passed the size check before
    path = tmp_path / "o.gguf"
    path.write_bytes(_gguf_header([], [("t", [16, 2**32, 2**32], 0, 0)]) + bytes(64))
    with pytest.raises(GGUFFormatError, match=r"tensor 't' ends at byte \d{20,}, past the end of the file"):
        GGUFFile(path)


def test_gguf_counts_bounded_by_file_size(tmp_path):
    path = tmp_path / "c.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(32))
    with pytest.raises(GGUFFormatError, match=r"tensor_count = 1099511627776 .* more than the 32 bytes left"):
        GGUFFile(path)


def _edit_gguf(seed_path, out_path, edit):
    from fuzz.mutate import GGUF

    g = GGUF.parse(Path(seed_path).read_bytes())
    edit(g)
    out_path.write_bytes(g.to_bytes())
    return out_path


def test_gguf_head_count_zero_is_a_config_error(seeds, tmp_path):
    def edit(g):
        g.kv = [(k, t, 0 if k == "llama.attention.head_count" else v) for k, t, v in g.kv]

    path = _edit_gguf(seeds["smollm2.gguf"], tmp_path / "h.gguf", edit)
    with pytest.raises(ConfigError, match=r"h\.gguf.*llama\.attention\.head_count: expected an integer >= 1, got 0"):
        load_checkpoint(path)


def test_gguf_architecture_of_another_type_is_a_config_error(seeds, tmp_path):
    """Fuzz cases gguf:4161/6317/6373 (seed 5): general.architecture an array of strings was looked up in
    a dict (TypeError: unhashable type: 'list')."""
    def edit(g):
        g.kv = [(k, 9, (8, ["llama", "qwen2"])) if k == "general.architecture" else (k, t, v) for k, t, v in g.kv]

    path = _edit_gguf(seeds["smollm2.gguf"], tmp_path / "a.gguf", edit)
    with pytest.raises(ConfigError, match=r"a\.gguf.*general\.architecture \['llama', 'qwen2'\] is not supported"):
        load_checkpoint(path)


def test_gguf_rope_freqs_of_the_wrong_length_is_refused(seeds, tmp_path):
    def edit(g):
        for t in g.tensors:
            if t[0] == "rope_freqs.weight":
                t[1] = [t[1][0] - 2]  # 2 factors fewer than head_dim / 2: broadcast silently before

    assert load_checkpoint(seeds["llama3.gguf"]).config.rope_freq_factors.numel() == 8
    path = _edit_gguf(seeds["llama3.gguf"], tmp_path / "r.gguf", edit)
    with pytest.raises(ConfigError, match=r"r\.gguf: rope_freqs: expected 8 frequency factors"):
        load_checkpoint(path)


def _hf_copy(seeds, tmp_path):
    src, dst = Path(seeds["llama3-hf"]), tmp_path / "hf"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_untied_checkpoint_without_lm_head_is_a_checkpoint_error(seeds, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _hf_copy(seeds, tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'lm_head.weight'.*tie_word_emb"):
        load_checkpoint(path)


@pytest.mark.parametrize("file, key, value, match", [
    ("generation_config.json", "eos_token_id", True, r"generation_config.json: eos_token_id: expected a token id"),
    ("generation_config.json", "eos_token_id", [2, False], r"generation_config.json: eos_token_id: expected a token"),
    ("config.json", "tie_word_embeddings", "yes", r"config.json: tie_word_embeddings: expected true or false"),
    ("config.json", "num_attention_heads", [4], r"config.json: num_attention_heads: expected an integer, got \[4\]"),
    ("config.json", "hidden_size", "64", r"config.json: hidden_size: expected an integer, got '64'"),
    ("config.json", "rope_scaling", {"rope_type": "llama3", "factor": "8"},
     r"config.json: rope scaling \(llama3\): factor: expected a finite number > 0"),
    ("config.json", "vocab_size", 2**40, r"config.json: vocab_size: expected an integer in 1..16777216"),
    ("generation_config.json", "temperature", "hot", r"generation_config.json: temperature: expected a finite"),
    ("generation_config.json", "top_p", 7.0, r"generation_config.json: top_p: expected a value in \(0, 1\]"),
])
def test_config_values_of_the_wrong_type_name_file_and_field(seeds, tmp_path, file, key, value, match):
    path = _hf_copy(seeds, tmp_path)
    doc = json.loads((path / file).read_text())
    doc[key] = value
    (path / file).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model"].update(merges=[["a", "b", "c"]]), r"tokenizer.json: cannot build the tokenizer"),
    (lambda d: d["model"].update(merges=["zz qq"]), r"tokenizer.json: cannot build the tokenizer"),
    (lambda d: d.update(model=7), r"tokenizer.json: cannot build the tokenizer"),
])
def test_tokenizer_library_errors_are_wrapped(seeds, tmp_path, edit, match):
    from portinfer.runtime.tokenizer import TokenizerError

    path = _hf_copy(seeds, tmp_path)
    doc = json.loads((path / "tokenizer.json").read_text())
    edit(doc)
    (path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match=match):
        load_checkpoint(path)


def test_broken_chat_template_named_at_load(seeds, tmp_path):
    from portinfer.runtime.tokenizer import ChatTemplateError, TokenizerError

    path = _hf_copy(seeds, tmp_path)
    doc = json.loads((path / "tokenizer_config.json").read_text())
    doc["chat_template"] = "{% for m in messages %}{{ m.content }"
    (path / "tokenizer_config.json").write_text(json.dumps(doc))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: chat_template: not a valid Jinja template"):
        load_checkpoint(path)
    doc["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(doc))
    tokenizer = load_checkpoint(path).tokenizer
    with pytest.raises(ChatTemplateError, match=r"range\(\): more than 100000 steps"):
        tokenizer.apply_chat_template(MESSAGES)


def test_llama3_chat_prompt_encodes_as_transformers_does(seeds):
    """Template and post-processor both write <|begin_of_text|>: one BOS, ids equal to transformers'
    apply_chat_template(tokenize=True) (the reference); a plain prompt still gets the post-processor's BOS."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(seeds["llama3-hf"])
    expected = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if not isinstance(expected, list) else expected
    ours = load_checkpoint(seeds["llama3-hf"]).tokenizer
    ids = ours.encode(ours.apply_chat_template(MESSAGES))
    bos = ours.token_id("<|begin_of_text|>")
    assert ids == expected
    assert ids.count(bos) == 1 and ids[0] == bos
    assert ours.encode("Hello there") == hf("Hello there")["input_ids"]


def test_gguf_chat_prompt_keeps_one_bos(seeds):
    tokenizer = load_checkpoint(seeds["llama3.gguf"]).tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))
    bos = tokenizer.token_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1


def test_mixed_formats_in_q_k_v_stay_blocks(seeds):
    """q/k in Q4_1 and v in Q8_0 (as the seed, like llama.cpp's mixes): three linears, each in its own
    blocks (not one dense matrix, which the loader used to warn about), with the reference backend's logits
    through plans and the op path."""
    import warnings

    import portinfer

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(seeds["smollm2.gguf"])
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    want = portinfer.load(seeds["smollm2.gguf"], backend="reference").logits(ids)
    for plans in (True, False):
        model = portinfer.load(seeds["smollm2.gguf"], backend="cpu", plans=plans)
        layer = model.decoder.layers[0]
        assert layer["qkv"] is None
        assert [w.format for w, _ in layer["qkv_parts"]] == ["q4_1", "q4_1", "q8_0"]
        for step_ids in (ids, ids[:, :1]):  # a prefill (GEMM) and one token (GEMV)
            got = model.logits(step_ids)
            torch.testing.assert_close(got, want[:, :step_ids.shape[1]], rtol=1e-4, atol=1e-4)


def test_a_bpe_merge_the_prefix_cannot_be_cut_from_is_a_tokenizer_error(seeds, tmp_path):
    """Fuzz case tokenizer:67 (seed 4): continuing_subword_prefix "\\u0000" (one byte) cut from a merge's
    second part "Ġ" (two bytes) made tokenizers panic inside a destructor: SIGABRT, the process gone.
    Checked in Python first, in a child process here so a regression cannot take pytest down."""
    from fuzz.__main__ import case_bytes

    path = _hf_copy(seeds, tmp_path)
    data = case_bytes("tokenizer", 67, 4, [(Path(seeds["llama3-hf"]) / "tokenizer.json").read_bytes()])
    (path / "tokenizer.json").write_bytes(data)
    code = ("import sys\nfrom portinfer.runtime.loader import load_checkpoint\nfrom portinfer.runtime.tokenizer "
            "import TokenizerError\ntry:\n    load_checkpoint(sys.argv[1])\nexcept TokenizerError as exc:\n"
            "    print('TokenizerError:', exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"tokenizer.json: model.merges\[\d+\]: the second part .* continuing_subword_prefix",
                     done.stdout), done.stdout


@pytest.mark.parametrize("index", [5601, 8084])
def test_tokenizers_panic_is_a_tokenizer_error(seeds, tmp_path, index):
    """Fuzz cases (seed 3) whose tokenizer.json made the tokenizers library panic (pyo3 PanicException, a
    BaseException that escaped `except Exception` and killed the process's caller)."""
    from fuzz.__main__ import case_bytes
    from portinfer.runtime.tokenizer import TokenizerError

    path = _hf_copy(seeds, tmp_path)
    data = case_bytes("tokenizer", index, 3, [(Path(seeds["llama3-hf"]) / "tokenizer.json").read_bytes()])
    (path / "tokenizer.json").write_bytes(data)
    with pytest.raises(TokenizerError, match=r"tokenizer.json: (cannot build the tokenizer|model.merges\[0\]: the second)"):
        load_checkpoint(path)
