"""Tokenizer: Hugging Face tokenizer.json, or the tokenizer a GGUF file embeds, plus the chat template.

Both end up as a `tokenizers.Tokenizer`. For GGUF byte-level BPE vocabularies (`tokenizer.ggml.model
= gpt2`) the pre-tokenizer follows the file's `tokenizer.ggml.pre`, as llama.cpp does (SmolLM splits
digits one by one, Llama 3 / Qwen2 use their own split patterns); tokens the file marks as control
become special tokens, matched whole. Chat templates are Jinja, rendered in a sandbox.
"""
from __future__ import annotations

import json
from pathlib import Path

# llama.cpp's GGUF `tokenizer.ggml.pre` -> the split pattern its merges were learned with
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one, then GPT-2's pattern
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    # GLM-4 (chatglm) and GLM-4-0414 (glm4) files: the cl100k-style pattern, as Llama 3's
    "chatglm-bpe": [_LLAMA3_SPLIT], "glm4": [_LLAMA3_SPLIT],
}
CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>
USER_DEFINED = 4


class Tokenizer:
    def __init__(self, backend, chat_template=None, bos_token=None, eos_token=None, add_bos=False):
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos  # prepend BOS ourselves (GGUF); HF tokenizer.json does it in its post-processor
        self._template = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        from tokenizers import AddedToken

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported; supported is 'gpt2' (byte-level "
                             f"BPE: SmolLM2, Llama 3, Qwen2)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        splits = PRE_TOKENIZER_SPLITS.get(pre)
        if splits is None:
            raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported are "
                             f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", []))
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t == CONTROL])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, t in enumerate(types) if t == USER_DEFINED])

        def token(key):
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(backend, meta.get("tokenizer.chat_template"), token("tokenizer.ggml.bos_token_id"),
                   token("tokenizer.ggml.eos_token_id"), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    # ------------------------------------------------------------------ use

    def token_id(self, token: str):
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt: expected a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self.token_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
        """Render the model's chat template for `messages` ([{"role": ..., "content": ...}]) as transformers'
        apply_chat_template(tokenize=False) does: the same sandboxed Jinja environment (trim_blocks,
        lstrip_blocks, loop controls, a tojson that does not escape HTML, raise_exception, strftime_now) and
        the same variables (messages, tools, documents, add_generation_prompt, bos_token, eos_token).
        `template_kwargs` reach the template as variables, e.g. Qwen3's enable_thinking=False."""
        if not self.chat_template:
            raise ValueError("chat: this model has no chat template (tokenizer_config.json chat_template or GGUF "
                             "tokenizer.chat_template); use `portinfer generate` with a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", "tools": None,
                     "documents": None, **template_kwargs}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def _compile_template(source: str):
    """A chat template compiled in the environment transformers renders chat templates in."""
    import datetime
    import json as _json

    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # as transformers: Jinja's own tojson escapes <, >, & and ' for HTML, which no prompt wants
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value
