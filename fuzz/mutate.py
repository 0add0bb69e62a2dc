"""A plain seeded, structure-aware mutator: one function per input kind, each (seed bytes, rng) -> bytes.

Structure first (the parts a loader trusts): GGUF header fields, metadata values and types, tensor
tables, offsets and alignment; the safetensors header length and JSON table; JSON values by path;
chat-template Jinja. Then, sometimes, plain byte mutations and truncation on top. Everything comes
from `random.Random(seed)`, so a case is reproduced from (kind, seed, index) alone.
"""
from __future__ import annotations

import json
import random
import struct

# ------------------------------------------------------------------ values a loader must survive

INTS = [0, 1, -1, 2, 3, 7, 31, 32, 33, 64, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62,
        2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63]
FLOATS = [0.0, -0.0, 1e-30, -1.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 0.5, 1e-5]
STRINGS = ["", "a", "\x00", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "llama",
           "qwen2", "mistral", "gpt2", "none", "linear", "llama3", "yarn", "dynamic", "F32", "BF16", "I8", "U8",
           "F64", "<|eot_id|>", "{{ x }}", "é" * 3, "x" * 300]


def interesting_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(INTS)
    if kind == 2:
        return rng.choice([0.0, -1.0, 1e308, -1e308, 0.5, 1e-30, 3.5, 2.0 ** 70])
    if kind == 3:
        return rng.choice(STRINGS)
    if kind == 4:
        return [interesting_json(rng, depth + 1) for _ in range(rng.randrange(4))] if depth < 3 else []
    if kind == 5:
        return {rng.choice(STRINGS): interesting_json(rng, depth + 1) for _ in range(rng.randrange(3))} if depth < 3 else {}
    if kind == 6:  # deep nesting (the JSON parser's recursion)
        n = rng.choice([50, 1000, 100_000])
        return json.loads("[" * n + "]" * n) if n < 900 else _Raw("[" * n + "]" * n)
    if kind == 7:
        return [rng.choice(INTS) for _ in range(rng.randrange(1, 5))]
    return rng.choice(INTS) * rng.choice([1, 1.0])


class _Raw(str):
    """Text spliced into the JSON output verbatim (too deep for json.dumps to build)."""


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:50]):
            yield from _paths(v, prefix + (i,))


def _random_path(rng, node):
    """A random walk down the tree: top-level structure is picked far more often than leaves deep in a vocab."""
    path = ()
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path, node = path + (key,), node[key]
    return path


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate_json_value(rng: random.Random, doc, focus=None):
    """One structural edit of a JSON document (in place where possible); returns the document."""
    raw = []
    if focus and rng.random() < 0.5:
        present = [p for p in focus if _has(doc, p)]
        path = rng.choice(present) if present else _random_path(rng, doc)
    else:
        path = _random_path(rng, doc)
    op = rng.randrange(6)
    if not path:
        return interesting_json(rng) if rng.random() < 0.2 else doc
    parent, key = _get(doc, path[:-1]), path[-1]
    value = parent[key]
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([value + 1, value - 1, -value, value * 2, 0, value * 1000003, str(value),
                                  [value], float(value), bool(value)])
    elif op == 2 and isinstance(value, list) and value:
        choice = rng.randrange(4)
        if choice == 0:
            del value[rng.randrange(len(value))]
        elif choice == 1:
            value.append(rng.choice(value))
        elif choice == 2:
            value[rng.randrange(len(value))] = interesting_json(rng)
        else:
            rng.shuffle(value)
    elif op == 3 and isinstance(value, str):
        parent[key] = mutate_text(rng, value)
    else:
        new = interesting_json(rng)
        if isinstance(new, _Raw):
            raw.append(new)
            new = "@@RAW@@"
        parent[key] = new
    doc = doc if not raw else _RawDoc(doc, raw[0])
    return doc


class _RawDoc:
    def __init__(self, doc, raw):
        self.doc, self.raw = doc, raw


def _has(doc, path):
    try:
        _get(doc, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def dump_json(doc) -> bytes:
    if isinstance(doc, _RawDoc):
        return json.dumps(doc.doc).replace('"@@RAW@@"', doc.raw, 1).encode()
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def mutate_bytes(rng: random.Random, data: bytes, start=0, end=None) -> bytes:
    """Byte-level edits inside [start, end): flips, interesting values, insertions, deletions, or a truncation."""
    b = bytearray(data)
    end = len(b) if end is None else min(end, len(b))
    if end <= start:
        return bytes(b)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        op = rng.randrange(6)
        i = rng.randrange(start, end) if end > start else start
        if op == 0 and i < len(b):
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and i < len(b):
            b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2 and i + 8 <= len(b):
            b[i:i + 8] = struct.pack("<Q", rng.choice(INTS) % 2**64)
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 4 and i < len(b):
            del b[i:i + rng.randrange(1, 16)]
        else:
            return bytes(b[:rng.randrange(0, len(b) + 1)])
    return bytes(b)


def mutate_text(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    op = rng.randrange(4)
    if op == 0:
        return text[:i] + text[i + rng.randrange(1, 20):]
    if op == 1:
        return text[:i] + rng.choice(STRINGS + JINJA_SNIPPETS) + text[i:]
    if op == 2:
        return text[:i]
    return text + text[i:]


# ------------------------------------------------------------------ JSON files

JSON_FOCUS = {
    "config.json": [("vocab_size",), ("hidden_size",), ("intermediate_size",), ("num_hidden_layers",),
                    ("num_attention_heads",), ("num_key_value_heads",), ("head_dim",), ("rope_theta",),
                    ("rope_scaling",), ("rope_scaling", "factor"), ("rope_scaling", "rope_type"),
                    ("rope_scaling", "low_freq_factor"), ("rope_scaling", "high_freq_factor"),
                    ("rope_scaling", "original_max_position_embeddings"), ("max_position_embeddings",),
                    ("rms_norm_eps",), ("tie_word_embeddings",), ("model_type",), ("eos_token_id",),
                    ("bos_token_id",), ("hidden_act",), ("attention_bias",), ("sliding_window",)],
    "generation_config.json": [("eos_token_id",), ("bos_token_id",), ("do_sample",), ("temperature",), ("top_p",),
                               ("top_k",), ("min_p",), ("repetition_penalty",)],
    "tokenizer_config.json": [("chat_template",), ("bos_token",), ("eos_token",)],
    "tokenizer.json": [("model",), ("model", "type"), ("model", "merges"), ("model", "vocab"), ("added_tokens",),
                       ("post_processor",), ("pre_tokenizer",), ("decoder",), ("normalizer",),
                       ("post_processor", "processors"), ("model", "unk_token"), ("model", "byte_fallback")],
}

JINJA_SNIPPETS = [
    "{{", "}}", "{%", "%}", "{% for m in messages %}", "{% endfor %}", "{% if %}", "{% endif %}",
    "{{ raise_exception('refused') }}", "{{ messages[7].content }}", "{{ ''.__class__.__mro__ }}",
    "{{ messages.__init__.__globals__ }}", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
    "{% endfor %}", "{{ 1 / 0 }}", "{{ messages | length }}", "{{ bos_token * 10 }}", "{{ 'a' * 100000 }}",
    "{% set ns = namespace(x=1) %}", "{{ messages[0]['content'] | trim }}", "{{ x.y.z }}", "{% macro m() %}",
    "{{ range(10) | list }}", "{% include 'x' %}", "{% import 'os' as os %}", "{{ cycler }}", "{{ lipsum() }}",
    "{{ '%s' % messages }}", "{{ messages | tojson }}", "{% raw %}", "{{ 2 ** 100000 }}",
]


def mutate_json(rng: random.Random, data: bytes, kind: str) -> bytes:
    if rng.random() < 0.15:
        return mutate_bytes(rng, data)
    doc = json.loads(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if isinstance(doc, _RawDoc):
            break
        if kind == "tokenizer_config.json" and isinstance(doc, dict) and isinstance(doc.get("chat_template"), str) \
                and rng.random() < 0.5:
            doc["chat_template"] = mutate_text(rng, doc["chat_template"])
            continue
        doc = mutate_json_value(rng, doc, JSON_FOCUS.get(kind))
    out = dump_json(doc)
    return mutate_bytes(rng, out) if rng.random() < 0.05 else out


# ------------------------------------------------------------------ safetensors

def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    op = rng.randrange(10)
    if op == 0:  # the header length lies
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(data), len(data) + 1, 2**63, 2**64 - 1,
                                             100_000_001])) + data[8:]
    if op == 1:  # truncated anywhere
        return data[:rng.randrange(len(data))]
    if op == 2:  # the data: NaN/Inf/garbage inside a tensor
        return data[:8 + n] + mutate_bytes(rng, body)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    if op == 3:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "Q4", "", 7])
    elif op == 4:
        shape = entry["shape"]
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] = rng.choice(INTS + [0.5, "3", None])
        else:
            entry["shape"] = rng.choice([[], [0], [2**32, 2**32], [2**63, 2], shape + [1], shape[:1], "x", None])
    elif op == 5:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [begin - 4, end], [0, 2**64 - 1],
                                            [begin, begin], [-1, end], [begin], None, [begin + 1, end + 1]])
    elif op == 6:  # two tensors claim the same bytes, or a name changes
        other = header[rng.choice(names)]
        if rng.random() < 0.5:
            entry["data_offsets"] = list(other["data_offsets"])
        else:
            header[rng.choice(["lm_head.weight", "model.layers.9.mlp.up_proj.weight", "", name + "x"])] = \
                header.pop(name)
    elif op == 7:
        del header[name]
    else:
        header = mutate_json_value(rng, header)
        if isinstance(header, _RawDoc):
            raw = dump_json(header)
            return struct.pack("<Q", len(raw)) + raw + body
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# ------------------------------------------------------------------ GGUF

# value types (gguf spec): 0 u8 1 i8 2 u16 3 i16 4 u32 5 i32 6 f32 7 bool 8 string 9 array 10 u64 11 i64 12 f64
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUF:
    """A parsed GGUF file that keeps every value's type, so it can be written back after an edit."""

    _parsed = {}  # seed bytes -> parsed GGUF (parsing a vocabulary takes longer than a case)

    @classmethod
    def parse(cls, data: bytes) -> "GGUF":
        """A fresh, editable copy of the parsed `data` (parsed once per distinct seed)."""
        base = cls._parsed.get(data)
        if base is None:
            base = cls._parsed[data] = cls(data)
        g = object.__new__(cls)
        g.__dict__.update(base.__dict__)
        g.kv = list(base.kv)
        g.tensors = [list(t) for t in base.tensors]
        g.count_override = {}
        return g

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0
        assert data[:4] == b"GGUF"
        self.pos = 4
        self.version = self._u(4)
        n_tensors, n_kv = self._u(10), self._u(10)
        self.kv = [(self._str(), *self._typed()) for _ in range(n_kv)]
        # id(seed entry) -> its bytes: the seed's entries stay alive in the parsed seed, so an id is never reused
        self.raw = {id(e): self._w_str(e[0]) + struct.pack("<I", e[1]) + self._w_value(e[1], e[2]) for e in self.kv}
        self.tensors = []
        for _ in range(n_tensors):
            name, n = self._str(), self._u(4)
            self.tensors.append([name, [self._u(10) for _ in range(n)], self._u(4), self._u(10)])
        alignment = dict((k, v) for k, _, v in self.kv).get("general.alignment", 32)
        self.data_start = -(-self.pos // alignment) * alignment
        self.blob = data[self.data_start:]
        self.count_override = {}

    def _u(self, kind):
        fmt = _FMT[kind]
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self):
        n = self._u(10)
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def _typed(self):
        kind = self._u(4)
        return kind, self._value(kind)

    def _value(self, kind):
        if kind == 8:
            return self._str()
        if kind == 9:
            item, n = self._u(4), self._u(10)
            return (item, [self._value(item) for _ in range(n)])
        return self._u(kind)

    # ---- writing
    @staticmethod
    def _w_str(s):
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)
        return struct.pack("<Q", len(raw)) + raw

    def _w_value(self, kind, value):
        if kind == 8:
            return self._w_str(value)
        if kind == 9:
            item, items = value
            count = len(items)
            return struct.pack("<IQ", item, count) + b"".join(self._w_value(item, v) for v in items)
        if kind in _FMT:
            fmt = _FMT[kind]
            try:
                return struct.pack(fmt, value)
            except (struct.error, TypeError, OverflowError):
                return struct.pack(fmt, 0)
        return b""  # an unknown type: nothing follows (the reader must stop there)

    def to_bytes(self, alignment=None) -> bytes:
        out = [b"GGUF", struct.pack("<I", self.version),
               struct.pack("<Q", self.count_override.get("tensors", len(self.tensors))),
               struct.pack("<Q", self.count_override.get("kv", len(self.kv)))]
        for entry in self.kv:
            raw = self.raw.get(id(entry))
            if raw is None:
                key, kind, value = entry
                raw = self._w_str(key) + struct.pack("<I", kind) + self._w_value(kind, value)
            out.append(raw)
        for name, dims, kind, offset in self.tensors:
            out += [self._w_str(name), struct.pack("<I", len(dims))]
            out += [struct.pack("<Q", d % 2**64) for d in dims]
            out += [struct.pack("<I", kind % 2**32), struct.pack("<Q", offset % 2**64)]
        head = b"".join(out)
        align = alignment or 32
        return head + bytes(-len(head) % align) + self.blob


_GGUF_KEYS = ["general.alignment", "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.embedding_length", "llama.block_count", "llama.feed_forward_length", "llama.context_length",
              "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
              "llama.vocab_size", "llama.attention.key_length", "llama.rope.scaling.type", "llama.rope.scaling.factor",
              "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
              "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]


def _random_typed(rng):
    kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 255])
    if kind in (6, 12):
        return kind, rng.choice(FLOATS)
    if kind == 7:
        return kind, rng.random() < 0.5
    if kind == 8:
        return kind, rng.choice(STRINGS)
    if kind == 9:
        item = rng.choice([4, 5, 6, 8, 9, 99])
        if item == 9:  # nested arrays, possibly deeper than any reader should follow
            depth = rng.choice([2, 8, 9, 64, 200])
            value = (4, [1, 2])
            for _ in range(depth):
                value = (9, [value])
            return 9, value
        return 9, (item, [rng.choice(STRINGS) if item == 8 else rng.choice([0, 1, 7]) for _ in range(3)])
    if kind in _FMT:
        lo, hi = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1),
                  5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}[kind]
        return kind, rng.choice([v for v in INTS if lo <= v <= hi] + [lo, hi])
    return kind, 0


def mutate_gguf(rng: random.Random, data: bytes) -> bytes:
    g = GGUF.parse(data)
    if rng.random() < 0.12:  # raw bytes: header region mostly, sometimes anywhere, or a truncation
        return mutate_bytes(rng, data, 0, g.data_start if rng.random() < 0.8 else None)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.randrange(12)
        keys = [k for k, _, _ in g.kv]
        if op == 0:  # a known key gets a value of another type or an edge value
            key = rng.choice(_GGUF_KEYS)
            kind, value = _random_typed(rng)
            g.kv = [(k, t, v) for k, t, v in g.kv if k != key] + [(key, kind, value)]
        elif op == 1 and keys:  # an existing key: same type, edge value
            i = rng.randrange(len(g.kv))
            k, t, v = g.kv[i]
            if t in _FMT and t not in (6, 12, 7):
                g.kv[i] = (k, t, rng.choice([0, 1, v + 1, max(v - 1, 0), v * 2, 2**31 - 1]))
            elif t in (6, 12):
                g.kv[i] = (k, t, rng.choice(FLOATS))
            elif t == 8:
                g.kv[i] = (k, t, mutate_text(rng, v) if v else rng.choice(STRINGS))
            elif t == 9:
                item, items = v
                items = list(items)
                if items and rng.random() < 0.5:
                    del items[rng.randrange(len(items)):]
                else:
                    items.append(rng.choice(items) if items else 0)
                g.kv[i] = (k, t, (item, items))
        elif op == 2 and keys:
            del g.kv[rng.randrange(len(g.kv))]
        elif op == 3 and keys:  # a duplicated key
            g.kv.append(rng.choice(g.kv))
        elif op == 4:  # the counts lie
            g.count_override[rng.choice(["tensors", "kv"])] = rng.choice(INTS) % 2**64
        elif op == 5 and g.tensors:  # dims: zero, huge, products that overflow 64 bits
            t = rng.choice(g.tensors)
            t[1] = rng.choice([[0], [2**32, 2**32], [2**63, 2], [32, 2**59], t[1] + [1] * 8, [], t[1][::-1],
                               [d + 1 for d in t[1]], [2**64 - 1]])
        elif op == 6 and g.tensors:  # ggml type
            rng.choice(g.tensors)[2] = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 13, 14, 30, 39, 99, 2**31])
        elif op == 7 and g.tensors:  # offsets: misaligned, past the end, overlapping
            t = rng.choice(g.tensors)
            t[3] = rng.choice([t[3] + 1, t[3] + 32, 2**64 - 32, len(g.blob), len(g.blob) - 32, 0,
                               rng.choice(g.tensors)[3]])
        elif op == 8 and g.tensors:  # a tensor renamed, duplicated or removed
            i = rng.randrange(len(g.tensors))
            choice = rng.randrange(3)
            if choice == 0:
                g.tensors[i][0] = rng.choice(["output.weight", "rope_freqs.weight", "blk.0.attn_q.bias",
                                              "blk.7.attn_q.weight", g.tensors[i][0] + ".x", ""])
            elif choice == 1:
                g.tensors.append(list(g.tensors[i]))
            else:
                del g.tensors[i]
        elif op == 9:  # truncation inside the data
            g.blob = g.blob[:rng.randrange(len(g.blob) + 1)]
        elif op == 10:
            g.version = rng.choice([0, 1, 2, 3, 4, 2**32 - 1])
        else:  # the data: NaN/Inf bytes, garbage scales
            g.blob = mutate_bytes(rng, g.blob)
    alignment = dict((k, v) for k, _, v in g.kv).get("general.alignment", 32)
    alignment = alignment if isinstance(alignment, int) and 0 < alignment <= 4096 else 32
    return g.to_bytes(alignment)


def mutate(kind: str, data: bytes, rng: random.Random) -> bytes:
    if kind == "gguf":
        return mutate_gguf(rng, data)
    if kind == "safetensors":
        return mutate_safetensors(rng, data)
    return mutate_json(rng, data, KIND_FILES[kind])


# input kind -> the file it replaces in the seed directory (GGUF kinds replace the whole file)
KIND_FILES = {"config": "config.json", "generation_config": "generation_config.json",
              "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
              "safetensors": "model.safetensors"}
