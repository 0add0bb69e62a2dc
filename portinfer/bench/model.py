"""`portinfer bench model [MODEL] [-p 128] [-n 64] [-r 5] [--backends ...]`: llama-bench-style
prompt processing (pp) and token generation (tg) tokens/s, mean ± sd over repetitions.

What each test times (as llama-bench does): pp P = one prefill of P tokens into an empty KV
cache; tg N = N decode steps of one token each, starting from an empty cache. Token ids are
drawn at random from the vocabulary (seeded), so no tokenizer is involved. Every backend is
loaded from the same file and measured in the same run, so their ratios compare.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch

from .machine import provenance
from .timing import device_sync


def _model_threads(model):
    info = model._placement.primary.info() or {}
    return info.get("threads") or (torch.get_num_threads() if model.device.type == "cpu" else None)


def _timed(model, fn):
    sync = device_sync(model.device)
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def _greedy(logits):
    """The next tokens as generate's greedy sampling picks them on the host (numpy's argmax over CPU
    logits: one thread, no torch op; portinfer/runtime/sampling.py), torch's argmax elsewhere."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def bench_backend(model, prompt_tokens, gen_tokens, repetitions, seed=0, batch=1, probe=None):
    """[(test name, [tok/s per repetition], step breakdown or None, [probe per repetition] or None)] for
    one loaded model. tg with batch B decodes B sequences at once (one step = B tokens; tok/s counts
    all of them). probe: called right before each timed tg repetition (a bandwidth probe: on a shared
    machine the rate moves between minutes, so a share of it is taken against the probe next to it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, max(prompt_tokens, 1)), generator=g)

    def pp():
        model.prefill(ids[:1], model.new_cache(1, prompt_tokens))

    def tg():
        cache = model.new_cache(batch, gen_tokens)
        token = ids[:, 0]
        for _ in range(gen_tokens):
            token = _greedy(model.decode(token, cache))

    tests = []
    if prompt_tokens:
        tests.append((f"pp{prompt_tokens}", pp, prompt_tokens))
    if gen_tokens:
        tests.append((f"tg{gen_tokens}" + (f" x{batch}" if batch > 1 else ""), tg, gen_tokens * batch))
    results = []
    for name, fn, tokens in tests:
        fn()  # warm-up: first-call allocations, plan building, kernel compilation, autotuning
        probes = [] if probe is not None and name.startswith("tg") else None
        rates = []
        for _ in range(repetitions):
            if probes is not None:
                probes.append(probe())
            rates.append(tokens / _timed(model, fn))
        breakdown = step_breakdown(model, fn, gen_tokens) if name.startswith("tg") else None
        results.append((name, rates, breakdown, probes))
    return results


def shares(rates, probes, bytes_per_unit) -> dict:
    """A rate's share of a bandwidth limit, repetition by repetition against the probe taken right
    before it: the median share, its range, the median probe."""
    each = sorted(r * bytes_per_unit / bw for r, bw in zip(rates, probes))
    return {"share": statistics.median(each), "share_range": [each[0], each[-1]],
            "bytes_s": statistics.median(probes), "probes_bytes_s": list(probes)}


def step_breakdown(model, fn, steps):
    """One more run of a decode test with the plan executors' kernel clocks on: per step, the wall
    time, the time inside kernels (a compiled plan's native call counts whole: its glue is native
    too) and the rest (validation, inputs, Python: the host). None on the op path (no plans)."""
    executors = list(model.decoder._plans.values())
    if not model.plans or not executors or model.device.type != "cpu":
        return None
    for e in executors:
        e.profile, e.kernel_s = True, 0.0
        if hasattr(e, "reset_profile"):
            e.reset_profile()
    wall = _timed(model, fn)
    kernel = sum(e.kernel_s for e in executors)
    by_op = {}  # a compiled cpu plan also times each native node: ms per step by op
    for e in executors:
        e.profile = False
        for op, s in (e.node_seconds() if hasattr(e, "node_seconds") else {}).items():
            by_op[op] = by_op.get(op, 0.0) + 1e3 * s / steps
    step_ms, kernel_ms = 1e3 * wall / steps, 1e3 * kernel / steps
    out = {"step_ms": step_ms, "kernel_ms": kernel_ms, "host_ms": step_ms - kernel_ms,
           "host_pct": 100.0 * (step_ms - kernel_ms) / step_ms,
           "executor": type(executors[0]).__name__}
    if by_op:
        out["kernel_ms_by_op"] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return out


def _load(model_path, name, dtype, plans, kv_cache_dtype=None):
    """Load on backend spec `name` ('cpu[int8]' / 'cpu[fp32]' / 'cpu[int8-all]' choose the cpu backend's quant route)."""
    import portinfer

    return portinfer.load(model_path, backend=name, dtype=dtype, fallback="allow", plans=plans,
                          kv_cache_dtype=kv_cache_dtype)


def bytes_per_token(model, model_path, gen_tokens, batch=1) -> int | None:
    """Bytes one decode step reads, averaged over a tg test from an empty cache: the weights
    (synthetic.weight_bytes_per_token; GGUF files only) plus the KV cache of `batch` sequences at
    the mean position (gen_tokens + 1) / 2, in the cache's dtype."""
    from pathlib import Path

    from .synthetic import weight_bytes_per_token

    if model_path is None or Path(model_path).suffix != ".gguf":
        return None
    c = model.config
    kv = batch * c.num_layers * 2 * c.num_kv_heads * c.head_dim * model.decoder.kv_dtype.itemsize * (gen_tokens + 1) / 2
    return int(weight_bytes_per_token(model_path) + kv)


def run(model_path, backends, prompt_tokens=128, gen_tokens=64, repetitions=5, dtype=None, command="",
        log=None, batch=1, plans=(True,), roofline=True, kv_cache_dtype=None) -> dict:
    from portinfer.backends import registry, spec
    from portinfer.runtime import default_model_path

    from .machine import read_bandwidth

    prov = provenance(command)  # before the run writes anything: git_dirty describes the code measured
    if backends is None:
        backends = [n for n in registry.names() if n != "reference" and registry.available(n)
                    and registry.entry(n).cls.auto_eligible()]
    path = model_path if model_path is not None else default_model_path()
    rows = []
    for name in backends:
        for use_plans in plans:
            if log:
                log(f"bench model: loading on {name}" + ("" if use_plans else " (op path)"))
            model = _load(path, name, dtype, use_plans, kv_cache_dtype)
            per_token = bytes_per_token(model, path, gen_tokens, batch) if roofline else None
            # the read-bandwidth probe next to each tg repetition (this machine's rate moves by minutes)
            probe = (lambda: read_bandwidth("cpu", repeats=3)["bytes_s"]) if per_token and model.device.type == "cpu" else None
            for test, tok_s, breakdown, probes in bench_backend(model, prompt_tokens, gen_tokens, repetitions,
                                                               batch=batch, probe=probe):
                rows.append({
                    "model": model.name, "size_bytes": model.file_bytes, "params": model.num_parameters,
                    "backend": name, "device": str(model.device), "dtype": spec.dtype_name(model.dtype),
                    "kv_cache_dtype": spec.dtype_name(model.decoder.kv_dtype),
                    "threads": _model_threads(model), "plans": use_plans, "test": test,
                    "tok_s_mean": statistics.fmean(tok_s),
                    "tok_s_sd": statistics.stdev(tok_s) if len(tok_s) > 1 else 0.0, "tok_s": tok_s,
                    "step_breakdown": breakdown,
                    "fell_back": sorted({r.op for r in model.placement().fell_back}),
                    "backend_info": model._placement.primary.info() or {},
                    # tokens/s of tg count every sequence of the batch; bytes are per step
                    "bytes_per_token": per_token / batch if per_token and test.startswith("tg") else None,
                })
                if probes:  # tokens/s of tg count every sequence of the batch; bytes are per step
                    sh = shares(tok_s, probes, per_token / batch)
                    rows[-1].update(read_bytes_s=sh["bytes_s"], read_bytes_s_probes=sh["probes_bytes_s"],
                                    bandwidth_share=sh["share"], bandwidth_share_range=sh["share_range"])
            del model
    doc = {"provenance": prov, "rows": rows}
    doc["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return doc


def format_table(doc) -> str:
    head = (f"| {'model':<32} | {'size':>9} | {'params':>8} | {'backend':<13} | {'threads':>7} | {'test':>9} | "
            f"{'t/s':>16} | {'step: kernels / host':>22} | {'tg read / bandwidth: % of limit':>34} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in doc["rows"]:
        size = f"{r['size_bytes'] / 2 ** 20:.2f} MiB"
        params = f"{r['params'] / 1e6:.2f} M"
        ts = f"{r['tok_s_mean']:.2f} ± {r['tok_s_sd']:.2f}"
        b = r.get("step_breakdown")
        split = f"{b['kernel_ms']:.2f} / {b['host_ms']:.2f} ms ({b['host_pct']:.0f}%)" if b else "-"
        roof = "-"
        if r.get("bandwidth_share") is not None:
            roof = (f"{r['bytes_per_token'] / 2 ** 20:.1f} MiB/tok, {r['read_bytes_s'] / 1e9:.1f} GB/s: "
                    f"{100 * r['bandwidth_share']:.0f}%")
        lines.append(f"| {r['model'][:32]:<32} | {size:>9} | {params:>8} | {_label(r):<13} | "
                     f"{str(r['threads'] or '-'):>7} | {r['test']:>9} | {ts:>16} | {split:>22} | {roof:>34} |")
    by_test = {}
    for r in doc["rows"]:
        by_test.setdefault(r["test"], {})[_label(r)] = r["tok_s_mean"]
    for test, speeds in by_test.items():
        if "torch" in speeds and len(speeds) > 1:
            ratios = ", ".join(f"{b} {v / speeds['torch']:.2f}x" for b, v in speeds.items() if b != "torch")
            lines.append(f"{test} vs torch (same run): {ratios}")
    return "\n".join(lines)


def _label(row):
    return row["backend"] + ("" if row.get("plans", True) else " (op)")


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def run_command(args) -> int:
    if args.repetitions < 1:
        raise ValueError(f"-r/--repetitions: expected an integer >= 1, got {args.repetitions}")
    if not args.n_prompt and not args.n_gen:
        raise ValueError("-p/--n-prompt and -n/--n-gen: expected at least one of them > 0")
    if args.synthetic:
        from .synthetic import synthetic_gguf

        if args.model:
            raise ValueError("--synthetic: expected no MODEL argument with it (the synthetic file is the model)")
        args.model = str(synthetic_gguf(args.synthetic, args.weights))
    parts = ["portinfer", "bench", "model"]
    parts += ["--synthetic", args.synthetic, "--weights", args.weights] if args.synthetic else \
        ([args.model] if args.model else [])
    parts += ["-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions)]
    if args.backends:
        parts += ["--backends", *args.backends]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if args.kv_cache_dtype:
        parts += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.batch != 1:
        parts += ["--batch", str(args.batch)]
    if args.op_path:
        parts += ["--op-path"]
    if args.batch < 1:
        raise ValueError(f"--batch: expected an integer >= 1, got {args.batch}")
    plans = (True, False) if args.op_path else (True,)
    doc = run(args.model, args.backends, args.n_prompt, args.n_gen, args.repetitions, args.dtype,
              command=shlex.join(parts), log=lambda m: print(m, file=sys.stderr), batch=args.batch, plans=plans,
              kv_cache_dtype=args.kv_cache_dtype)
    print(format_table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_model(bench_sub):
    p = bench_sub.add_parser("model", help="prompt-processing and token-generation tokens/s (llama-bench style)")
    p.add_argument("model", nargs="?", help="Hugging Face directory or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("-p", "--n-prompt", type=_nonnegative_int, default=128, help="prompt tokens (pp test; 0 = skip)")
    p.add_argument("-n", "--n-gen", type=_nonnegative_int, default=64, help="generated tokens (tg test; 0 = skip)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions of each test")
    p.add_argument("--backends", nargs="+",
                   help="backends (default: every available one auto may pick); cpu[int8] / cpu[fp32] choose the "
                        "cpu backend's route for quantized weights, so both run side by side")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="activation dtype (default: the backend's)")
    p.add_argument("--kv-cache-dtype", choices=("fp32", "fp16", "bf16"), help="the KV cache's dtype (default: the "
                                                                             "activations')")
    p.add_argument("-b", "--batch", type=int, default=1, help="sequences decoded at once in the tg test")
    p.add_argument("--op-path", action="store_true",
                   help="also measure every backend on the op path (plans=False), side by side")
    p.add_argument("--json", metavar="FILE", help="also write the results with their provenance as JSON")
    p.add_argument("--synthetic", metavar="SHAPE",
                   help="a synthetic GGUF of a real model's shapes, random weights (portinfer.bench.synthetic: "
                        "smollm2-135m, qwen2-0.5b, qwen2-1.5b, qwen2-7b, llama-3-8b), written once and cached")
    p.add_argument("--weights", default="q4_0",
                   help="weight format of --synthetic (f32, f16, bf16, q8_0, q4_0, q4_1, or a named mix; default q4_0)")
    p.set_defaults(func=run_command)
