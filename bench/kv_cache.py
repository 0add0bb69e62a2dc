"""The KV cache's dtype, measured side by side in one run (docs/kv-cache.md):

the same model loaded once per cache dtype (fp32, fp16 by default), decode steps of each case
(sequences x context) alternated turn by turn, per turn the step time and the time inside the
native attention nodes (the compiled plan's per-node clock), and each turn's ratio of the step
times. Plus the prefill's logits against the baseline cache's (relative L2).

    python bench/kv_cache.py --backend 'cpu[int8-all]' --cases 1x1024 16x64 \
        --json bench/results/kv-cache-smollm2-cpu-avx512.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import portinfer  # noqa: E402
from portinfer.bench.machine import provenance  # noqa: E402
from portinfer.bench.model import _greedy  # noqa: E402


def decode(model, batch, context, steps, profile, seed=0):
    """(ms per decode step, ms of it in attention, the prefill's logits) after a prefill of `context`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
    cache = model.new_cache(batch, context + steps + 1)
    first = model.step(ids, cache)
    token = _greedy(first)
    executors = list(model.decoder._plans.values())
    for e in executors:
        e.profile = profile
        if hasattr(e, "reset_profile"):
            e.reset_profile()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = _greedy(model.decode(token, cache))
    step_ms = 1e3 * (time.perf_counter() - t0) / steps
    attention = sum(e.node_seconds().get("attention", 0.0) for e in executors if hasattr(e, "node_seconds"))
    for e in executors:
        e.profile = False
    return step_ms, 1e3 * attention / steps, first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or HF directory (default: the embedded SmolLM2)")
    p.add_argument("--backend", default="cpu[int8-all]")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], help="cache dtypes; the first is the baseline")
    p.add_argument("--cases", nargs="+", default=["1x1024", "16x64"], help="SEQUENCESxCONTEXT")
    p.add_argument("--steps", type=int, default=32, help="decode steps per turn")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cases = [tuple(int(x) for x in c.lower().split("x")) for c in args.cases]
    cmd = "python bench/kv_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"provenance": provenance(cmd), "backend": args.backend, "rows": []}
    models = {d: portinfer.load(args.model, backend=args.backend, kv_cache_dtype=d) for d in args.dtypes}
    base = args.dtypes[0]
    for batch, context in cases:
        got = {d: {"step_ms": [], "attention_ms": []} for d in args.dtypes}
        logits = {}
        for d, m in models.items():  # warm-up: plans of these shapes, allocations
            logits[d] = decode(m, batch, context, 2, False)[2]
        for _ in range(args.turns):
            for d, m in models.items():
                step, att, _ = decode(m, batch, context, args.steps, True)
                got[d]["step_ms"].append(step)
                got[d]["attention_ms"].append(att)
        for d in args.dtypes:
            ratios = [a / b for a, b in zip(got[base]["step_ms"], got[d]["step_ms"])]
            rel = ((logits[d].double() - logits[base].double()).norm() / logits[base].double().norm()).item()
            row = {"sequences": batch, "context": context, "kv_cache_dtype": d,
                   "step_ms": statistics.median(got[d]["step_ms"]),
                   "attention_ms": statistics.median(got[d]["attention_ms"]),
                   f"step_{base}_over_this": statistics.median(ratios), "each_turn_ratio": ratios,
                   "step_ms_each": got[d]["step_ms"], "attention_ms_each": got[d]["attention_ms"],
                   "logits_rel_l2_vs_" + base: rel}
            doc["rows"].append(row)
            print(f"{batch:>3} x {context:<5} {d}: step {row['step_ms']:.2f} ms, attention {row['attention_ms']:.2f} ms, "
                  f"{base}/{d} {row[f'step_{base}_over_this']:.2f}x (turns {', '.join(f'{r:.2f}' for r in ratios)}), "
                  f"logits vs {base} {rel:.1e}", flush=True)
    doc["load_avg_end"] = list(os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
