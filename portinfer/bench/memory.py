"""Resident memory after load: a model's RSS against its file's tensor bytes (issue 12).

`measure(path)` loads a model in a fresh Python process and reports how much its resident set
(VmRSS) grew: after `portinfer.load`, and after one prefill + decode step into a KV cache. The
baseline is taken in the same process after a warm-up load of a tiny file of the same format (so
the interpreter, torch, the gguf package, the kernel tables and the thread pool are already
resident and do not count as the model's). The aim (issue 12): growth after load at most 1.15 x
the file's tensor bytes, plus the KV cache once a step has run.

`write_gguf(path, shape, fmt)` writes a GGUF of a real model's shapes with random weights
(quantized formats as random blocks), e.g. `SHAPES["qwen2-0.5b"]`: nothing is downloaded.
`bench/memory.py` (the script) measures the Qwen2-0.5B-shaped fp32 and Q4_0 files and writes
JSON with provenance under bench/results/.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = True
    qkv_bias: bool = True  # qwen2


SHAPES = {
    "qwen2-0.5b": Shape(151936, 896, 4864, 24, 14, 2),
    "test": Shape(32000, 512, 1024, 2, 8, 2),  # tests/test_memory.py: the embedding dominates, as in small models
    # tests/test_memory.py: the layers dominate (their fused q/k/v and gate/up copies are most of the file)
    "test-layers": Shape(2048, 512, 2048, 6, 8, 2),
    "tiny": Shape(256, 64, 128, 1, 4, 2),  # the warm-up load
}
FORMATS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def _matrix(rng, fmt, n, k):
    """(array to write, ggml type name or None) of a random [n, k] matrix in `fmt`."""
    if fmt in ("f32", "f16"):
        w = rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)
        return w.astype(np.float16 if fmt == "f16" else np.float32), None
    nb = k // 32
    d = np.full((n, nb, 1), 1.0 / (8.0 * math.sqrt(k)), dtype=np.float16).view(np.uint8)  # [n, nb, 2]
    quants = rng.integers(0, 256, size=(n, nb, BLOCK_BYTES[fmt] - 2 - (2 if fmt == "q4_1" else 0)), dtype=np.uint8)
    parts = [d] + ([np.full((n, nb, 1), 0.0, dtype=np.float16).view(np.uint8)] if fmt == "q4_1" else []) + [quants]
    return np.concatenate(parts, axis=-1).reshape(n, nb * BLOCK_BYTES[fmt]), fmt.upper()


def write_gguf(path, shape: Shape, fmt: str, seed: int = 0) -> Path:
    """A qwen2 GGUF of `shape`, every matrix in `fmt` (norms and biases f32), random values."""
    import gguf

    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    rng = np.random.default_rng(seed)
    s = shape
    d = s.hidden // s.heads
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(s.layers)
    w.add_context_length(4096)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(s.vocab)

    def matrix(name, n, k):
        array, raw = _matrix(rng, fmt, n, k)
        if raw is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_shape=array.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, raw))

    def vector(name, n, value=None):
        w.add_tensor(name, np.full(n, 1.0, dtype=np.float32) if value is None else
                     (rng.standard_normal(n, dtype=np.float32) * value))

    matrix("token_embd.weight", s.vocab, s.hidden)
    vector("output_norm.weight", s.hidden)
    if not s.tied:
        matrix("output.weight", s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", s.hidden)
        vector(p + "ffn_norm.weight", s.hidden)
        for name, n, k in (("attn_q", s.heads * d, s.hidden), ("attn_k", s.kv_heads * d, s.hidden),
                           ("attn_v", s.kv_heads * d, s.hidden), ("attn_output", s.hidden, s.heads * d),
                           ("ffn_gate", s.intermediate, s.hidden), ("ffn_up", s.intermediate, s.hidden),
                           ("ffn_down", s.hidden, s.intermediate)):
            matrix(p + name + ".weight", n, k)
        if s.qkv_bias:
            for name, n in (("attn_q", s.heads * d), ("attn_k", s.kv_heads * d), ("attn_v", s.kv_heads * d)):
                vector(p + name + ".bias", n, 0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def tensor_bytes(path) -> int:
    """The bytes of a GGUF file's tensor data (what a runtime must hold; the header is not counted)."""
    from ..runtime.gguf_file import GGUFFile

    return sum(int(t.data.nbytes) for t in GGUFFile(path).tensors)


_SCRIPT = r"""
import gc, json, sys
import torch, portinfer

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

path, warm, backend, dtype, max_len = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
at_start = rss()
warm_model = portinfer.load(warm, backend=backend, dtype=dtype, fallback="allow")
warm_model.generate([1, 2, 3], max_new_tokens=2)
del warm_model
gc.collect()
base = rss()
model = portinfer.load(path, backend=backend, dtype=dtype, fallback="allow")
gc.collect()
after_load = rss()
cache = model.new_cache(1, max_len)
model.prefill(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), cache)
model.decode(torch.tensor([9]), cache)
gc.collect()
after_step = rss()
kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
print(json.dumps({"rss_start_bytes": at_start, "rss_baseline_bytes": base, "load_bytes": after_load - base,
                  "step_bytes": after_step - base, "kv_cache_bytes": kv}))
"""


def measure(path, backend="cpu", dtype="fp32", max_len=512, threads=None, warm_path=None) -> dict:
    """RSS growth of a fresh process loading `path` (see the module docstring), with the file's tensor
    bytes and the ratios: load_ratio = load_bytes / tensor_bytes, step_ratio = (step_bytes - KV cache) /
    tensor_bytes."""
    import tempfile

    path = Path(path)
    fmt = _file_format(path)
    with tempfile.TemporaryDirectory() as tmp:
        warm = warm_path or write_gguf(Path(tmp) / "warm.gguf", SHAPES["tiny"], fmt)
        env = dict(os.environ)
        if threads is not None:
            env["PORTINFER_NUM_THREADS"] = str(threads)
        out = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), str(warm), backend, dtype, str(max_len)],
                             capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"memory measurement of {path} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    tb = tensor_bytes(path)
    result.update(file=str(path), file_bytes=path.stat().st_size, tensor_bytes=tb, backend=backend, dtype=dtype,
                  max_len=max_len, load_ratio=result["load_bytes"] / tb,
                  step_ratio=(result["step_bytes"] - result["kv_cache_bytes"]) / tb)
    return result


def _file_format(path) -> str:
    """The format of a file's token embedding (what the warm-up file copies)."""
    import gguf

    from ..runtime.gguf_file import GGUFFile

    kind = next(t.type for t in GGUFFile(path).tensors if t.name == "token_embd.weight")
    name = gguf.GGMLQuantizationType(kind).name.lower()
    return name if name in FORMATS else "f32"


def shape_named(name: str, layers: int | None = None) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {name!r}")
    return SHAPES[name] if layers is None else replace(SHAPES[name], layers=layers)
