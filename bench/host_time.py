"""Host time between native decode steps (docs/step-plans.md, "Host time between steps").

Decodes with a compiled cpu step plan and times, per step, the native call apart from everything
between two of them (the engine's checks, the step inputs, the executor's pointer list, the logits
copy, the finite check, greedy sampling), then the same Python with the native call replaced by a
no-op, so the weights never stream through the caches. The gap between the two is what a step's
cache traffic costs the host code.

    python bench/host_time.py [MODEL] [--steps 300] [--route fp32|int8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF file or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--route", choices=("fp32", "int8"), help="the cpu backend's quant route")
    args = ap.parse_args(argv)
    import portinfer
    from portinfer.bench.model import _greedy

    model = portinfer.load(args.model, backend=f"cpu[{args.route}]" if args.route else "cpu")
    cache = model.new_cache(1, args.steps + 16)
    token = torch.tensor([1])
    for _ in range(5):  # builds the decode plan
        token = _greedy(model.decode(token, cache))
    executor = next(iter(model.decoder._plans.values()))
    native = executor.program
    stamps = []

    class Timed:
        def run(self, *a):
            t0 = time.perf_counter()
            native.run(*a)
            stamps.append((t0, time.perf_counter()))

    class NoOp:
        def run(self, *a):
            stamps.append((time.perf_counter(), time.perf_counter()))

    for name, program in (("between real steps", Timed()), ("with a no-op native call", NoOp())):
        executor.program, stamps[:] = program, []
        cache = model.new_cache(1, args.steps + 16)
        for _ in range(args.steps):
            token = _greedy(model.decode(token, cache))
        gaps = sorted(b[0] - a[1] for a, b in zip(stamps, stamps[1:]))
        native_ms = statistics.median(b - a for a, b in stamps) * 1e3
        print(f"host {name}: median {1e6 * statistics.median(gaps):.0f} us (p10 {1e6 * gaps[len(gaps) // 10]:.0f}, "
              f"p90 {1e6 * gaps[9 * len(gaps) // 10]:.0f}); native call median {native_ms:.2f} ms")
    executor.program = native
    return 0


if __name__ == "__main__":
    sys.exit(main())
