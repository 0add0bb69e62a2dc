"""Resident memory of a tensor-parallel rank after load vs one process holding the whole model.

An fp32 safetensors model of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads over 2 kv
heads, MLP 4864, vocabulary 151936, tied embeddings, q/k/v biases: 494M parameters, 1.98 GB)
is written as a sparse file (zeros: what is measured is memory, not values). One process loads
it whole; then N ranks load it with tensor_parallel=N, and rank 0 reads every rank's VmRSS once
all have loaded. The figure: max rank RSS / single-process RSS (issue 17: <= 0.6 at N = 2), and
the same for RssAnon alone (one process's RSS also counts the pages of the safetensors file it
keeps mapped: its replicated weights are views of the file; a rank's sharded load copies them).

    python -m portinfer.bench.tp_memory [--ranks 2] [--backend auto] [--dir DIR] [--out bench/results/...json]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
                 bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")


def qwen2_tensors(cfg: dict) -> dict:
    """Hugging Face name -> shape of every tensor of a Qwen2 checkpoint with this config."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
                       p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (H, q), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def write_sparse_safetensors(directory, cfg: dict = QWEN2_05B) -> Path:
    """config.json + model.safetensors (fp32, all zeros, written sparse: instant, no disk used)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in qwen2_tensors(cfg).items():
        nbytes = 4
        for n in shape:
            nbytes *= n
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return directory


def rss_bytes(pid="self", field="VmRSS") -> int:
    """VmRSS (all resident pages), RssAnon (the process's own memory) or RssFile (mapped files)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


# run in a child process: load, then print {"rss": [bytes per rank]} (rank 0 reads its peers' VmRSS)
_PROBE = """
import json, sys, time
import portinfer
from portinfer.bench.tp_memory import rss_bytes
path, backend, ranks, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
model = portinfer.load(path, backend=backend, dtype="fp32", tensor_parallel=ranks or None)
load_s = time.perf_counter() - t0
if ranks:
    model.logits(__import__("torch").tensor([[1, 2, 3]]))  # every rank has loaded and stepped once
    pids = [pid for _, pid in model.decoder._group.peers]
else:
    pids = ["self"]
json.dump({"rss_bytes": [rss_bytes(p) for p in pids], "rss_anon_bytes": [rss_bytes(p, "RssAnon") for p in pids],
           "rss_file_bytes": [rss_bytes(p, "RssFile") for p in pids], "load_s": load_s, "backend": model.backend},
          open(out, "w"))
"""


def measure(path, ranks: int, backend="auto") -> dict:
    """{"rss_bytes": [...], "load_s": ...}: one process (ranks=0) or `ranks` tensor-parallel ranks."""
    from ..runtime import parallel

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rss.json")
        args = ["-c", _PROBE, str(path), backend, str(ranks), out]
        if ranks:
            code = parallel.launch(args, ranks)
        else:
            code = subprocess.call([sys.executable, *args])
        if code:
            raise RuntimeError(f"the {'tensor-parallel' if ranks else 'single-process'} load failed (status {code})")
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dir", help="where to write the synthetic model (default: a temporary directory)")
    p.add_argument("--out", help="JSON result file (default: print only)")
    args = p.parse_args(argv)
    from .machine import provenance

    command = "python -m portinfer.bench.tp_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    info = provenance(command)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_sparse_safetensors(args.dir or tmp)
        t0 = time.perf_counter()
        single = measure(path, 0, args.backend)
        sharded = measure(path, args.ranks, args.backend)
        wall_s = time.perf_counter() - t0
    ratio = max(sharded["rss_bytes"]) / single["rss_bytes"][0]
    anon_ratio = max(sharded["rss_anon_bytes"]) / single["rss_anon_bytes"][0]
    result = {"model": "qwen2-0.5b-shaped fp32 (synthetic, zeros)", "ranks": args.ranks, "backend": single["backend"],
              "single_rss_bytes": single["rss_bytes"][0], "rank_rss_bytes": sharded["rss_bytes"],
              "max_rank_over_single": round(ratio, 3),
              # RssAnon: the process's own memory, without pages of files it still maps
              "single_rss_anon_bytes": single["rss_anon_bytes"][0], "single_rss_file_bytes": single["rss_file_bytes"][0],
              "rank_rss_anon_bytes": sharded["rss_anon_bytes"], "rank_rss_file_bytes": sharded["rss_file_bytes"],
              "max_rank_over_single_anon": round(anon_ratio, 3), "single_load_s": single["load_s"],
              "rank0_load_s": sharded["load_s"], "wall_s": wall_s,
              "loadavg": open("/proc/loadavg").read().split()[:3], "provenance": info}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
