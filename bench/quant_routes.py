"""One quantized linear on the cpu backend's two routes, side by side in one process (issue 13).

    python bench/quant_routes.py [--formats q4_k q5_k q6_k] [--shapes 8960x1536 1536x8960] [--rows 1 4 8]
        [--rounds 3] [--json FILE]

For each weight format and N x K shape (random weights, K a multiple of 256 for the K-quants), the
same weight is prepared on `cpu[fp32]` (blocks as stored, fp32 activations) and `cpu[int8]` (groups
repacked for the integer kernels), and `linear` at M rows is timed with portinfer.bench.timing.measure
on both, the two alternated `--rounds` times (this VM's speed moves by minutes; a ratio of
neighbours is what holds). Figures per case: the median time of each route over its rounds, the
GB/s of the format's own bytes (the weight as the file stores it, over that time), and fp32 / int8.
Each case calls linear on the same weight again and again: a weight that fits in the last-level
cache (the defaults: 7.7-12 MB against a 32 MB L3 here) is timed warm, which compares the routes'
kernels; the decode benchmarks (`portinfer bench model`, bench/kquant_decode.py) stream every matrix
from memory. Provenance as every result under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch

from portinfer.backends import quant, registry
from portinfer.bench.machine import provenance
from portinfer.bench.timing import measure

K_QUANTS = ("q4_k", "q5_k", "q6_k")


def _shape(text):
    n, k = (int(v) for v in text.lower().split("x"))
    return n, k


def run(formats, shapes, rows, rounds, seed=0):
    routes = {name: registry.get(name) for name in ("cpu[fp32]", "cpu[int8]")}
    out = []
    g = torch.Generator().manual_seed(seed)
    for fmt in formats:
        for n, k in shapes:
            dense = torch.randn(n, k, generator=g) / math.sqrt(k)
            w = quant.quantize_k(dense, fmt) if fmt in K_QUANTS else quant.quantize(dense, fmt)
            del dense
            stored = w.blocks.numel() * w.blocks.element_size()
            prepared = {name: be.prepare_linear(w, torch.float32) for name, be in routes.items()}
            for m in rows:
                x = torch.randn(m, k, generator=g)
                times = {name: [] for name in routes}
                for _ in range(rounds):
                    for name, be in routes.items():
                        p = prepared[name]
                        stats = measure(lambda: be.linear(x, p, None), warmup=2, repeats=5, min_time_s=0.05)
                        times[name].append(stats.median_s)
                med = {name: statistics.median(t) for name, t in times.items()}
                row = {"format": fmt, "N": n, "K": k, "M": m, "stored_bytes": stored,
                       "seconds": {name: t for name, t in times.items()},
                       "median_s": med, "stored_GBps": {name: stored / s / 1e9 for name, s in med.items()},
                       "fp32_over_int8": med["cpu[fp32]"] / med["cpu[int8]"]}
                out.append(row)
                print(f"{fmt} {n}x{k} M={m}: fp32 route {1e3 * med['cpu[fp32]']:.3f} ms, int8 route "
                      f"{1e3 * med['cpu[int8]']:.3f} ms ({row['stored_GBps']['cpu[int8]']:.1f} GB/s of {fmt} bytes): "
                      f"{row['fp32_over_int8']:.2f}x", file=sys.stderr)
            del prepared, w
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="+", default=list(K_QUANTS), choices=["q8_0", "q4_0", "q4_1", *K_QUANTS])
    p.add_argument("--shapes", nargs="+", type=_shape, default=[(8960, 1536), (1536, 8960)], help="N x K")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8], help="M: rows of x")
    p.add_argument("--rounds", type=int, default=3, help="times the two routes are alternated")
    p.add_argument("--json", help="write the results with provenance here")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/quant_routes.py"] + (argv if argv is not None else sys.argv[1:]))
    prov = provenance(command)
    doc = {"provenance": prov, "rows": run(args.formats, args.shapes, args.rows, args.rounds)}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
