"""A tiny random decoder with a real tokenizer and chat template, saved as a Hugging Face directory,
for the server tests (fast: a few ms per step).

The tokenizer is byte-level BPE over printable ASCII only (one character = one token, so text
and ids map one to one and a response's text identifies its tokens), plus ChatML's two special
tokens; <|im_end|> is the eos token.
"""
import json
from pathlib import Path

import torch

import hf_models

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _ascii_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    chars = [byte_char[b] for b in [10] + list(range(32, 127))]
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return backend


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (what ByteLevel uses), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_chat_model(path, seed=0, nan_token=None):
    """The directory at `path`; nan_token: a character whose embedding row is NaN (a request
    containing it makes this model produce NaN logits, for the one-request-fails-alone test)."""
    path = Path(path)
    tok = _ascii_tokenizer()
    vocab = tok.get_vocab_size()
    model = hf_models.build("llama_gqa", path, seed=seed, vocab_size=vocab)
    tok.save(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}))
    config = json.loads((path / "config.json").read_text())
    config.update(eos_token_id=eos, bos_token_id=tok.token_to_id("<|im_start|>"))
    (path / "config.json").write_text(json.dumps(config))
    generation = path / "generation_config.json"
    if generation.exists():
        g = json.loads(generation.read_text())
        g.update(eos_token_id=eos, bos_token_id=config["bos_token_id"])
        generation.write_text(json.dumps(g))
    if nan_token is not None:
        from safetensors.torch import load_file, save_file

        weights = load_file(path / "model.safetensors")
        weights["model.embed_tokens.weight"][tok.token_to_id(nan_token)] = float("nan")
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return model
