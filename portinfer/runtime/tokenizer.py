"""Tokenizer: Hugging Face tokenizer.json, or the tokenizer a GGUF file embeds, plus the chat template.

Both end up as a `tokenizers.Tokenizer`. For GGUF byte-level BPE vocabularies (`tokenizer.ggml.model
= gpt2`) the pre-tokenizer follows the file's `tokenizer.ggml.pre`, as llama.cpp does (SmolLM splits
digits one by one, Llama 3 / Qwen2 use their own split patterns); tokens the file marks as control
become special tokens, matched whole. Chat templates are Jinja, rendered in a sandbox.

Errors: anything wrong with the tokenizer files (tokenizers' and jinja2's own exceptions included) is a
TokenizerError naming the file and the field; a template that fails while rendering is a
ChatTemplateError. Both are ValueErrors.

BOS: a chat prompt (what apply_chat_template returns, a ChatPrompt) is encoded as transformers'
apply_chat_template(tokenize=True) encodes it: without the tokenizer.json post-processor's special
tokens, since the template writes them itself (Llama 3's writes <|begin_of_text|>, which the
post-processor would add a second time).
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
# a template loops over messages; range() in one rendering is bounded so a template cannot hang
MAX_TEMPLATE_RANGE = 100_000


class TokenizerError(ValueError):
    """A tokenizer file (tokenizer.json, tokenizer_config.json, a chat template, GGUF tokenizer metadata)
    is malformed or unsupported; the message names the file and the field."""


class ChatTemplateError(ValueError):
    """The model's chat template failed while rendering these messages (raise_exception, a bad template)."""


class ChatPrompt(str):
    """Text rendered by a chat template: encoded without the post-processor's special tokens (see above)."""


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

        file = path / "tokenizer.json"
        text, data = _read_json_text(file)
        _check_bpe_merges(data, file)
        try:
            backend = HFTokenizer.from_str(text)  # the text already read and checked: the file is read once
        except Exception as exc:  # tokenizers raises bare Exception / TypeError for a malformed file
            raise TokenizerError(f"{file}: cannot build the tokenizer: {_short(exc)}") from None
        except BaseException as exc:  # a Rust panic inside tokenizers (pyo3's PanicException is a BaseException)
            if type(exc).__name__ != "PanicException":
                raise
            raise TokenizerError(f"{file}: cannot build the tokenizer (tokenizers panicked): {_short(exc)}") from None
        cfg, cfg_file = {}, path / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = _read_json(cfg_file)
        template = cfg.get("chat_template")
        where = f"{cfg_file}: chat_template"
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        template_file = path / "chat_template.jinja"
        if template_file.exists():
            try:
                template, where = template_file.read_text(encoding="utf-8"), str(template_file)
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{template_file}: cannot read the chat template: {_short(exc)}") from None
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{where}: expected a Jinja template string, got {type(template).__name__}")
        tokens = []
        for key in ("bos_token", "eos_token"):
            token = _token_text(cfg.get(key))
            if token is not None and not isinstance(token, str):
                raise TokenizerError(f"{cfg_file}: {key}: expected a string or {{\"content\": string}}, "
                                     f"got {cfg.get(key)!r}"[:300])
            tokens.append(token)
        tokenizer = cls(backend, template, *tokens)
        tokenizer._compile_template(where)
        return tokenizer

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        from tokenizers import AddedToken

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer.ggml.model {kind!r} is not supported; supported is 'gpt2' "
                                 f"(byte-level BPE: SmolLM2, Llama 3, Qwen2)")
        tokens = meta["tokenizer.ggml.tokens"]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("GGUF tokenizer.ggml.tokens: expected a non-empty array of strings")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = meta.get("tokenizer.ggml.merges", [])
        if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
            raise TokenizerError("GGUF tokenizer.ggml.merges: expected an array of strings 'left right'")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        pre = meta.get("tokenizer.ggml.pre", "default")
        splits = PRE_TOKENIZER_SPLITS.get(pre) if isinstance(pre, str) else None
        if splits is None:
            raise TokenizerError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported are "
                                 f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}"[:300])
        types = meta.get("tokenizer.ggml.token_type", [])
        if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
            raise TokenizerError("GGUF tokenizer.ggml.token_type: expected an array of integers")
        try:
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            backend.decoder = decoders.ByteLevel()
            backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                        for i, t in enumerate(types[:len(tokens)]) if t == CONTROL])
            backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                                for i, t in enumerate(types[:len(tokens)]) if t == USER_DEFINED])
        except Exception as exc:  # tokenizers: "Token ... out of vocabulary" is a bare Exception
            raise TokenizerError(f"GGUF tokenizer.ggml.tokens / merges: cannot build the tokenizer: "
                                 f"{_short(exc)}") from None
        except BaseException as exc:  # a Rust panic inside tokenizers (pyo3's PanicException)
            if type(exc).__name__ != "PanicException":
                raise
            raise TokenizerError(f"GGUF tokenizer metadata: tokenizers panicked: {_short(exc)}") from None

        def token(key):
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError("GGUF tokenizer.chat_template: expected a string")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        if not isinstance(add_bos, (bool, int)):
            raise TokenizerError(f"GGUF tokenizer.ggml.add_bos_token: expected a bool, got {add_bos!r}"[:300])
        tokenizer = cls(backend, template, token("tokenizer.ggml.bos_token_id"),
                        token("tokenizer.ggml.eos_token_id"), add_bos=bool(add_bos))
        tokenizer._compile_template("GGUF tokenizer.chat_template")
        return tokenizer

    # ------------------------------------------------------------------ use

    def token_id(self, token: str):
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt: expected a str, got {type(text).__name__}")
        # a chat prompt already holds the special tokens its template writes (transformers: tokenize=True)
        post_processor = add_special_tokens and not isinstance(text, ChatPrompt)
        ids = self.backend.encode(str(text), add_special_tokens=post_processor).ids
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
        self._compile_template("chat template")
        from jinja2.exceptions import TemplateError

        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", "tools": None,
                     "documents": None, **template_kwargs}
        self._range_budget[0] = MAX_TEMPLATE_RANGE
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as exc:  # raise_exception(...) in the template, or a sandbox refusal
            raise ChatTemplateError(f"chat template: {_short(exc)}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError,
                RecursionError) as exc:  # an error inside the template's own expressions
            raise ChatTemplateError(f"chat template: rendering failed: {type(exc).__name__}: {_short(exc)}") from None
        return ChatPrompt(text)

    def _compile_template(self, where):
        """Compile the chat template once (at load, so a broken one is reported with its file)."""
        if self._template is not None or not self.chat_template:
            return
        from jinja2.exceptions import TemplateError

        try:
            self._template, self._range_budget = _compile_template(self.chat_template)
        except TemplateError as exc:
            raise TokenizerError(f"{where}: not a valid Jinja template: {_short(exc)}") from None
        except (RecursionError, MemoryError, ValueError, TypeError) as exc:
            raise TokenizerError(f"{where}: the template cannot be compiled: {type(exc).__name__}") from None


def _compile_template(source: str):
    """A chat template compiled in the environment transformers renders chat templates in, with range()
    bounded per rendering -> (template, budget: reset to MAX_TEMPLATE_RANGE before each render)."""
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

    budget = [MAX_TEMPLATE_RANGE]

    def bounded_range(*args):
        r = range(*args)
        budget[0] -= len(r)
        if budget[0] < 0:
            raise TemplateError(f"range(): more than {MAX_TEMPLATE_RANGE} steps in one rendering")
        return r

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["range"] = bounded_range
    return env.from_string(source), budget


def _token_text(value):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _short(exc) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _check_bpe_merges(data: dict, file: Path):
    """What tokenizers would abort the process on (not raise: a panic inside a destructor, SIGABRT;
    fuzz case tokenizer:67 seed 4): a BPE model with a continuing_subword_prefix slices that many bytes
    off the second part of every merge, so each second part must be at least that long and the cut must
    fall between characters."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return
    prefix = model.get("continuing_subword_prefix")
    merges = model.get("merges")
    if not isinstance(prefix, str) or not prefix or not isinstance(merges, list):
        return
    cut = len(prefix.encode("utf-8"))
    for i, merge in enumerate(merges):
        if isinstance(merge, str):
            parts = merge.split(" ", 1)
        elif isinstance(merge, list):
            parts = merge
        else:
            continue  # tokenizers refuses it with an error of its own
        if len(parts) != 2 or not isinstance(parts[1], str):
            continue
        second = parts[1].encode("utf-8")
        if len(second) < cut or (len(second) > cut and (second[cut] & 0xC0) == 0x80):
            raise TokenizerError(f"{file}: model.merges[{i}]: the second part {parts[1]!r} cannot lose the "
                                 f"continuing_subword_prefix {prefix!r} ({cut} bytes) at a character boundary")


def _read_json(file: Path) -> dict:
    return _read_json_text(file)[1]


def _read_json_text(file: Path) -> tuple:
    """-> (the file's text, its JSON object); TokenizerError naming the file otherwise."""
    try:
        text = file.read_text(encoding="utf-8")
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise TokenizerError(f"{file}: not valid JSON ({type(exc).__name__}: {_short(exc)})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return text, value
