"""Step plans, measured side by side in one run (issue 12's figures):

- SmolLM2-135M Q4_1 decode (tg) and prefill (pp) on the cpu backend through plans and on the op
  path, with the per-step breakdown (time inside the native step vs everything else);
- decode of 1, 2, 4 and 8 sequences at once through plans: the step time of each, relative to one
  (the sizes alternated within each repetition, each ratio against the single-sequence runs around it);
- optionally the same tg/pp on an older commit of portinfer (--baseline-commit, e.g. bf98f19, the
  main before step plans), built in a temporary git worktree and run in a subprocess, alternating
  with this tree's runs so both see the same machine.

    python bench/step_plans.py --json bench/results/step-plans-smollm2-cpu.json [--baseline-commit bf98f19]
    python bench/step_plans.py --model FILE.gguf --batches 1 8 16 -p 16 -n 16 --json ...   (another model)
    python bench/step_plans.py --backend 'cpu[int8]' --batches 1 8 16 ...                (the int8 route)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import portinfer  # noqa: E402
from portinfer.bench.machine import provenance  # noqa: E402
from portinfer.bench.model import _greedy, bench_backend  # noqa: E402


def decode_step_ms(model, batch, steps, seed=0):
    """ms per decode step of `batch` sequences over `steps` steps, after a 16-token prefill each."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(batch, 16 + steps)
    model.step(torch.randint(0, model.config.vocab_size, (batch, 16), generator=g), cache)
    token = torch.randint(0, model.config.vocab_size, (batch,), generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):  # numpy's argmax, as generate and the server pick greedy tokens (_greedy)
        token = _greedy(model.decode(token, cache))
    return 1e3 * (time.perf_counter() - t0) / steps


def batch_steps(model, batches, steps, repetitions):
    """Step times by batch size, and each size's step relative to the first size's, the sizes
    alternated within every repetition and each ratio taken against the mean of the reference
    runs right before and after it (this VM's speed drifts by minutes: sizes measured one after
    another carried that drift into the ratio). Medians over the repetitions, and every value."""
    for B in batches:  # the first run of each size builds its plans
        decode_step_ms(model, B, 4)
    times = {B: [] for B in batches}
    ratios = {B: [] for B in batches}
    ref = batches[0]
    for rep in range(repetitions):
        before = decode_step_ms(model, ref, steps, rep)
        run = {B: decode_step_ms(model, B, steps, rep) for B in batches[1:]}
        after = decode_step_ms(model, ref, steps, rep)
        run[ref] = (before + after) / 2
        for B, ms in run.items():
            times[B].append(ms)
            ratios[B].append(ms / run[ref])
    return ({B: statistics.median(v) for B, v in times.items()}, {B: statistics.median(v) for B, v in ratios.items()},
            times, ratios)


BASELINE_SCRIPT = """
import json, sys, statistics, portinfer
from portinfer.bench.model import bench_backend
model = portinfer.load(backend="cpu")
out = {name: rates for name, rates, *_ in bench_backend(model, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))}
print(json.dumps(out))
"""


def baseline_tree(commit):
    path = Path(tempfile.mkdtemp(prefix="portinfer-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path, check=True, capture_output=True)
    return path


def run_baseline(path, prompt, gen, reps):
    env = dict(os.environ, PYTHONPATH=str(path))
    done = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, str(prompt), str(gen), str(reps)], cwd=path,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results with provenance here")
    ap.add_argument("--backend", default="cpu", help="backend spec, e.g. 'cpu[int8]' (default cpu)")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens of the pp test")
    ap.add_argument("-n", type=int, default=64, help="decode steps of the tg test")
    ap.add_argument("-r", type=int, default=5, help="repetitions")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of plans / op path / baseline")
    ap.add_argument("--baseline-commit", help="also measure this commit (built in a temporary worktree)")
    ap.add_argument("--model", help="a model file or directory (default: the embedded SmolLM2); "
                                    "not with --baseline-commit, which runs the embedded model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="sequences per decode step to time (default 1 2 4 8); the first is the reference")
    args = ap.parse_args(argv)
    if args.model and args.baseline_commit:
        ap.error("--baseline-commit measures the embedded model: leave out --model")
    prov = provenance(" ".join(["python", "bench/step_plans.py", *(argv if argv is not None else sys.argv[1:])]))

    models = {"plans": portinfer.load(args.model, backend=args.backend, plans=True),
              "op path": portinfer.load(args.model, backend=args.backend, plans=False)}
    base = baseline_tree(args.baseline_commit) if args.baseline_commit else None
    rates = {}
    breakdowns = {}
    try:
        for _ in range(args.rounds):
            for label, model in models.items():
                for name, values, breakdown, _ in bench_backend(model, args.p, args.n, args.r):
                    rates.setdefault((label, name), []).extend(values)
                    if breakdown:
                        breakdowns.setdefault(label, []).append(breakdown)
            if base is not None:
                for name, values in run_baseline(base, args.p, args.n, args.r).items():
                    rates.setdefault((f"main {args.baseline_commit}", name), []).extend(values)
    finally:
        if base is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)

    batch, vs_one, batch_times, batch_ratios = batch_steps(models["plans"], args.batches, 32, args.r)
    rows = [{"run": label, "test": name, "tok_s_mean": statistics.fmean(v),
             "tok_s_sd": statistics.stdev(v) if len(v) > 1 else 0.0, "tok_s": v} for (label, name), v in rates.items()]
    doc = {"provenance": prov, "model": models["plans"].name, "backend": args.backend, "rows": rows,
           "step_breakdown": {k: {f: statistics.median(b[f] for b in v) for f in ("step_ms", "kernel_ms", "host_ms",
                                                                                   "host_pct")}
                              for k, v in breakdowns.items()},
           "decode_step_ms_by_batch": batch, "decode_step_vs_one": vs_one,
           "decode_step_ms_by_batch_each": batch_times, "decode_step_vs_one_each": batch_ratios}
    for r in rows:
        print(f"{r['run']:>16} {r['test']:>6}: {r['tok_s_mean']:8.2f} ± {r['tok_s_sd']:.2f} tok/s")
    for k, b in doc["step_breakdown"].items():
        print(f"{k:>16} step {b['step_ms']:.2f} ms: kernels {b['kernel_ms']:.2f} ms, host {b['host_ms']:.2f} ms "
              f"({b['host_pct']:.1f}%)")
    for B, ms in batch.items():
        each = ", ".join(f"{r:.2f}" for r in batch_ratios[B])
        print(f"decode step of {B} sequences: {ms:.2f} ms ({vs_one[B]:.2f}x {args.batches[0]}; each repetition: {each})")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
