"""Resident memory after load of Qwen2-0.5B-shaped GGUF files on the cpu backend (issue 12).

    python bench/memory.py [--formats f32 q4_0] [--dir DIR] [--json bench/results/memory-qwen2-0.5b-cpu.json]

Each file (vocab 151936 x hidden 896, 24 layers, tied embeddings, random weights; quantized
formats as random blocks) is written with the gguf package (portinfer.bench.memory.write_gguf,
kept in --dir for reruns) and loaded in a fresh process; the figures are that process's RSS growth
(VmRSS) after `portinfer.load` and after one prefill + decode step into a 4096-position KV cache,
over a baseline taken after a warm-up load of a tiny file (see portinfer/bench/memory.py). The
aim: growth after load <= 1.15 x the file's tensor bytes, + the KV cache once a step has run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from portinfer.bench import memory
from portinfer.bench.machine import provenance


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["f32", "q4_0"], choices=memory.FORMATS)
    parser.add_argument("--shape", default="qwen2-0.5b", choices=sorted(memory.SHAPES))
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "portinfer" / "memory"))
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in args.formats:
        path = directory / f"{args.shape}-{fmt}.gguf"
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr)
            memory.write_gguf(path.with_suffix(".tmp"), memory.SHAPES[args.shape], fmt)
            path.with_suffix(".tmp").rename(path)
        r = memory.measure(path, backend=args.backend, dtype="fp32", max_len=args.max_len)
        r["format"] = fmt
        r["budget_bytes"] = 1.15 * r["tensor_bytes"]
        r["within_budget"] = r["load_bytes"] <= r["budget_bytes"] and \
            r["step_bytes"] <= r["budget_bytes"] + r["kv_cache_bytes"]
        rows.append(r)
        print(f"{args.shape} {fmt:>5}: tensors {r['tensor_bytes'] / 2**20:8.1f} MiB  after load "
              f"{r['load_bytes'] / 2**20:8.1f} MiB ({r['load_ratio']:.3f}x)  after a step "
              f"{r['step_bytes'] / 2**20:8.1f} MiB (KV cache {r['kv_cache_bytes'] / 2**20:.1f} MiB; "
              f"{r['step_ratio']:.3f}x without it)", file=sys.stderr)
    result = {"provenance": {**provenance("python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or
                                                                                                      sys.argv[1:]))),
                             "loadavg": Path("/proc/loadavg").read_text().split()[:3] if os.path.exists("/proc/loadavg")
                             else None},
              "shape": args.shape, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))


if __name__ == "__main__":
    main()
