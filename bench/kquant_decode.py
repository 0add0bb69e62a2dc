"""Decode of a Q4_K_M- (or Q5_K_M-) style GGUF model of real shapes as a share of the bandwidth limit (issue 13).

    python bench/kquant_decode.py --shape qwen2-1.5b [--shape qwen2-0.5b] [-n 16] [-r 3]
        [--backend 'cpu[fp32]' --backend 'cpu[int8]'] [--mix q4_k_m|q5_k_m] [--memory] [--json FILE]
    python bench/kquant_decode.py --shape qwen2-1.5b --write FILE.gguf     (only the file)

The file is written here with random block bytes (finite fp16 scales) in llama.cpp's Q4_K_M mix
(llama-quant.cpp): Q6_K for the output matrix (the token embedding when tied) and for attn_v /
ffn_down in the "use_more_bits" layers, Q4_K elsewhere (--mix q5_k_m: Q5_K). A matrix whose rows are
not whole 256-weight super-blocks gets llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
Q8_0), as in the files
people download: Qwen2-0.5B (hidden 896) has such rows in every attention and gate/up matrix.

Figures, per shape: decode tokens/s (tg N, one token per step, per repetition), the read bandwidth
probed right before each repetition (portinfer.bench.machine.read_bandwidth, the limit `portinfer
bench model` uses; this machine's rate moves between minutes), and two shares of it, each the median
over repetitions of that repetition's own: `share_of_file_limit` = tok/s x the bytes a decode step
must read as the file stores them (every matrix, the embedding's one row), over the bandwidth;
`share_of_read_limit` the same with the bytes the loaded model actually reads per step (its
prepared linears: blocks, repacked groups, or what was dequantized at load); with --memory, the
resident memory after load over the file's tensor bytes (a fresh process each). Provenance (CPU, load
average, commit) as every result under bench/results/. The backend spec chooses the route:
`--backend 'cpu[int8]'` / `'cpu[fp32]'`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import portinfer
from portinfer.backends import spec
from portinfer.bench import memory
from portinfer.bench.machine import provenance, read_bandwidth
from portinfer.bench.model import bench_backend, shares

# name -> (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
SHAPES = {
    "qwen2-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "llama-3-8b-2layers": (4096, 14336, 2, 32, 8, 128256, False),
    "tiny": (256, 512, 2, 4, 2, 512, True),  # for tests: every code path, in seconds
}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama.cpp's, for rows not whole super-blocks
MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}  # llama.cpp's *_K_M mixes: their base format (Q6_K elsewhere)


def use_more_bits(layer, layers):
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _blocks(fmt, n, k, rng):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n, k // per_block, block_bytes), dtype=np.uint8)
    scales = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q8_0": (0,), "q5_0": (0,), "q5_1": (0, 2)}[fmt]
    for start in scales:  # finite, small fp16 scales: the model's arithmetic stays finite
        b[..., start:start + 2] = (rng.random((n, k // per_block, 1)) * 0.002).astype(np.float16).view(np.uint8)
    return b.reshape(n, -1), qtype


def write_k_mix(path, shape, mix="q4_k_m"):
    """Write the file in llama.cpp's mix `mix` (MIXES); returns {tensor name: format}."""
    import gguf

    hidden, inter, layers, heads, kv_heads, vocab, tied = SHAPES[shape]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2" if shape.startswith("qwen2") else "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(vocab)
    formats = {}

    def add(name, fmt, n, k=None):
        if fmt is None:
            w.add_tensor(name, np.ones(n, dtype=np.float32) if k is None else np.zeros((n, k), dtype=np.float32))
            return
        if k % 256:
            fmt = FALLBACK[fmt]
        formats[name] = fmt
        blocks, qtype = _blocks(fmt, n, k, rng)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)

    kv = kv_heads * hidden // heads
    base = MIXES[mix]
    add("token_embd.weight", "q6_k" if tied else base, vocab, hidden)
    add("output_norm.weight", None, hidden)
    if not tied:
        add("output.weight", "q6_k", vocab, hidden)
    for i in range(layers):
        more = "q6_k" if use_more_bits(i, layers) else base
        add(f"blk.{i}.attn_norm.weight", None, hidden)
        add(f"blk.{i}.ffn_norm.weight", None, hidden)
        for name, fmt, n, k in (("attn_q", base, hidden, hidden), ("attn_k", base, kv, hidden),
                                ("attn_v", more, kv, hidden), ("attn_output", base, hidden, hidden),
                                ("ffn_gate", base, inter, hidden), ("ffn_up", base, inter, hidden),
                                ("ffn_down", more, hidden, inter)):
            add(f"blk.{i}.{name}.weight", fmt, n, k)
        if shape.startswith("qwen2"):
            for name, n in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(f"blk.{i}.{name}.bias", np.zeros(n, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return formats


def file_bytes_per_token(path, tied):
    """Bytes one decode step reads as the file stores them: every matrix once (the tied embedding as
    the output matrix), the embedding's one row."""
    from portinfer.runtime.gguf_file import GGUFFile

    total = 0
    for t in GGUFFile(path).tensors:
        if len(t.shape) != 2:
            continue
        if t.name == "token_embd.weight":
            total += t.data.nbytes if tied else t.data.nbytes // t.shape[0]
        else:
            total += t.data.nbytes
    return total


def prepared_bytes(model):
    """Bytes of every prepared linear of the loaded model (what a decode step reads), or None."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if id(obj) in seen or depth > 6:  # decoder.layers[i]["qkv_parts"][j][0] is 5 deep
            return
        seen.add(id(obj))
        if isinstance(obj, spec.PreparedLinear):
            total += obj.payload.numel() * obj.payload.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(getattr(model, "decoder", None))
    return total or None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeatable)")
    p.add_argument("-n", "--n-gen", type=int, default=16, help="decode steps per repetition")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--backend", action="append",
                   help="backend spec, repeatable (default cpu): each decodes the same file in this run")
    p.add_argument("--mix", choices=sorted(MIXES), default="q4_k_m", help="llama.cpp's quantization mix")
    p.add_argument("--memory", action="store_true",
                   help="also the resident memory after load, per backend, in a fresh process "
                        "(portinfer.bench.memory.measure: load_ratio = RSS growth / the file's tensor bytes)")
    p.add_argument("--json", help="write the results with provenance here")
    p.add_argument("--write", metavar="FILE",
                   help="only write the (first) shape's file here and stop, for other benchmarks "
                        "(e.g. bench/step_plans.py --model FILE)")
    args = p.parse_args(argv)
    shapes = args.shape or ["qwen2-1.5b"]
    if args.write:
        formats = write_k_mix(Path(args.write), shapes[0], args.mix)
        print(f"wrote {args.write}: {shapes[0]}, {args.mix} ({len(formats)} matrices)")
        return 0
    command = shlex.join(["python", "bench/kquant_decode.py"] + (argv if argv is not None else sys.argv[1:]))
    prov = provenance(command)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            path = Path(tmp) / f"{shape}-{args.mix}.gguf"
            formats = write_k_mix(path, shape, args.mix)
            per_token = file_bytes_per_token(path, SHAPES[shape][6])
            counts = {f: list(formats.values()).count(f) for f in sorted(set(formats.values()))}
            for backend in args.backend or ["cpu"]:
                model = portinfer.load(path, backend=backend, dtype="fp32", fallback="allow")
                probe = lambda: read_bandwidth("cpu", repeats=3)["bytes_s"]  # noqa: E731
                [(test, tok_s, _, probes)] = bench_backend(model, 0, args.n_gen, args.repetitions, probe=probe)
                mean = statistics.fmean(tok_s)
                read = prepared_bytes(model)
                of_file = shares(tok_s, probes, per_token)
                of_read = shares(tok_s, probes, read) if read else None
                row = {"shape": shape, "mix": args.mix, "backend": backend, "threads": model._placement.primary.info().get("threads"),
                       "backend_info": model._placement.primary.info(), "file_bytes": path.stat().st_size,
                       "formats": counts, "test": test, "tok_s_mean": mean, "tok_s": tok_s,
                       "read_bytes_s": of_file["bytes_s"], "read_bytes_s_probes": probes,
                       "file_bytes_per_token": per_token, "read_bytes_per_token": read,
                       "share_of_file_limit": of_file["share"], "share_of_file_limit_range": of_file["share_range"],
                       "share_of_read_limit": of_read["share"] if of_read else None}
                if args.memory:
                    rss = memory.measure(path, backend=backend, dtype="fp32", max_len=512)
                    row["memory"] = {k: rss[k] for k in ("load_bytes", "tensor_bytes", "load_ratio", "step_ratio",
                                                         "kv_cache_bytes")}
                    print(f"{shape} on {backend}: RSS after load {rss['load_ratio']:.2f}x the file's tensor bytes",
                          file=sys.stderr)
                rows.append(row)
                lo, hi = of_file["share_range"]
                print(f"{shape} on {backend}: {mean:.2f} tok/s, {per_token / 1e6:.0f} MB/token as stored, "
                      f"{(read or 0) / 1e6:.0f} MB/token as loaded, read {of_file['bytes_s'] / 1e9:.1f} GB/s -> "
                      f"{of_file['share']:.0%} ({lo:.0%}-{hi:.0%}) of the file's limit, "
                      f"{row['share_of_read_limit'] or 0:.0%} of the loaded model's; formats {counts}", file=sys.stderr)
                del model
    prov["load_end"] = list(__import__("os").getloadavg())
    doc = {"provenance": prov, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
