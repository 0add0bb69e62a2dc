"""GPU benchmark of the triton backend: conformance at full shapes, then the op benchmarks the
triton issue asks for, each against torch measured in the same run, written as JSON with
provenance.

    python bench/triton_gpu.py --out bench/results/triton-<gpu>.json

Needs a CUDA GPU (exits with a message otherwise). What it does, in order:
  1. `portinfer check --backend triton --profile full --json --max-examples 10` (autotuning
     off there: PORTINFER_TRITON_AUTOTUNE=0, so each new shape class compiles one config, not
     the whole list);
  2. bf16 linear 4096^3 vs torch.matmul;
  3. attention prefill B=1, H=32, S=4096, D=128, causal, bf16 vs F.scaled_dot_product_attention;
  4. decode attention (Sq=1) over Sk=8192, H=32, Hkv=8, D=128, bf16 (B=1 and B=8) vs SDPA;
  5. one decode step of a Qwen2-0.5B-shaped layer stack (random weights, ops only, KV length
     1024), triton backend vs torch backend: tokens/s.
`--smoke` runs the same code at tiny shapes on CPU under the Triton interpreter (no GPU, no
conformance, one timed call each after an untimed one): it checks the script, its figures mean
nothing, and its JSON says so. tests/test_triton_bench.py runs it.

Times are portinfer.bench.timing.measure's (the timing of every portinfer benchmark): the median
per-call time over --repeats repeats after at least --warmup calls (and after autotuning), each
repeat a batch of calls lasting ~0.1 s / repeats in all, timed with CUDA events. Provenance is
portinfer.bench.machine.provenance's (GPU, CPU, versions, commit). The "kernel" times call the
launcher directly; "op" times go through the backend (validation, output allocation) as the
runtime does. speedup = torch time / triton time (>1: triton faster). Each benchmark also reports
the relative L2 difference of the two outputs (a sanity check; conformance is step 1).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portinfer.bench.machine import provenance  # noqa: E402  (after the path: runs from a checkout)
from portinfer.bench.timing import measure  # noqa: E402


def fail(message):
    print(f"bench/triton_gpu.py: {message}", file=sys.stderr)
    sys.exit(2)


def provenance_record():
    """machine.provenance, plus the host and the flat names this script gave some of its fields before
    (machine.provenance's "gpu" is a record: name, count, cuda, compute_capability, memory_gib, ...)."""
    p = provenance(" ".join([Path(sys.executable).name, *sys.argv]))
    record = {**p, "date_utc": p["date"], "cuda": torch.version.cuda, "host": platform.node()}
    if p["gpu"]:
        record.update(compute_capability=p["gpu"]["compute_capability"], gpu_memory_gib=p["gpu"]["memory_gib"],
                      multiprocessors=p["gpu"]["multiprocessors"])
    return record


SHAPES = {
    "gpu": dict(device="cuda", linear=4096, prefill=(1, 32, 4096, 128), decode=(32, 8, 8192, 128), decode_batches=(1, 8),
                qwen=dict(L=24, Hd=896, Hq=14, Hkv=2, D=64, I=4864, V=151936, ctx=1024)),
    "smoke": dict(device="cpu", linear=48, prefill=(1, 2, 40, 32), decode=(4, 2, 70, 32), decode_batches=(1, 2),
                  qwen=dict(L=2, Hd=64, Hq=4, Hkv=2, D=16, I=96, V=300, ctx=20)),
}


def median_ms(fn, args):
    """Median per-call time of fn() in ms, as `args.timing` says (CUDA events on a GPU)."""
    return measure(fn, **args.timing).median_s * 1e3


def rel_diff(a, b):
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def conformance(seed, max_examples, timeout_s):
    env = dict(os.environ, PORTINFER_TRITON_AUTOTUNE="0", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "portinfer.cli", "check", "--backend", "triton", "--profile", "full", "--json",
           "--seed", str(seed), "--max-examples", str(max_examples)]
    start = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"timed out after {timeout_s} s"}
    result = {"command": "portinfer " + " ".join(cmd[3:]), "exit_code": done.returncode,
              "seconds": round(time.time() - start, 1)}
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        result["error"] = (done.stderr or done.stdout)[-4000:]
        return result
    result["passed"] = report["passed"]
    result["rows"] = [{"op": r["op"], "dtype": r["dtype"], "status": r["status"], "cases": r["cases"],
                       "worst_error": (r["failure"] or r["worst"] or {}).get("error"),
                       "budget": (r["failure"] or r["worst"] or {}).get("budget"),
                       "message": (r["failure"] or {}).get("message", ""), "reproduce": r["reproduce"]}
                      for r in report["results"]]
    return result


def bench_linear(backend, args, shapes):
    from portinfer.kernels import linear as linear_kernel

    dev = shapes["device"]
    M = N = K = shapes["linear"]
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
    prepared = backend.prepare_linear(w)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    t_kernel = median_ms(lambda: linear_kernel.linear(x, prepared.payload, None, out), args)
    t_op = median_ms(lambda: backend.linear(x, prepared), args)
    t_torch = median_ms(lambda: torch.matmul(x, w.T), args)
    flops = 2 * M * N * K
    return {"name": f"linear bf16 {M}x{N}x{K}", "baseline": "torch.matmul(x, w.T)",
            "triton_kernel_ms": t_kernel, "triton_op_ms": t_op, "torch_ms": t_torch,
            "triton_tflops": flops / t_kernel / 1e9, "torch_tflops": flops / t_torch / 1e9,
            "speedup_kernel": t_torch / t_kernel, "speedup_op": t_torch / t_op, "target": 0.9,
            "rel_diff_vs_torch": rel_diff(backend.linear(x, prepared), torch.matmul(x, w.T))}


def bench_prefill(backend, args, shapes):
    from portinfer.kernels import attention as attention_kernel

    B, H, S, D = shapes["prefill"]
    q, k, v = (torch.randn(B, H, S, D, device=shapes["device"], dtype=torch.bfloat16) for _ in range(3))
    q_pos = torch.zeros(B, dtype=torch.int32)
    kv_len = torch.full((B,), S, dtype=torch.int32)
    q_pos_d, kv_len_d = q_pos.to(shapes["device"]), kv_len.to(shapes["device"])
    scale = D ** -0.5
    out = torch.empty_like(q)
    t_kernel = median_ms(lambda: attention_kernel.attention(q, k, v, q_pos_d, kv_len_d, True, scale, out), args)
    t_op = median_ms(lambda: backend.attention(q, k, v, q_pos, kv_len, True, scale), args)
    t_torch = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), args)
    flops = 4 * B * H * S * S * D / 2  # causal: half of QK^T and PV
    return {"name": f"attention prefill bf16 B={B} H={H} S={S} D={D} causal",
            "baseline": "F.scaled_dot_product_attention(is_causal=True)",
            "triton_kernel_ms": t_kernel, "triton_op_ms": t_op, "torch_ms": t_torch,
            "triton_tflops": flops / t_kernel / 1e9, "torch_tflops": flops / t_torch / 1e9,
            "speedup_kernel": t_torch / t_kernel, "speedup_op": t_torch / t_op, "target": 0.9,
            "rel_diff_vs_torch": rel_diff(backend.attention(q, k, v, q_pos, kv_len, True, scale),
                                          F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))}


def bench_decode(backend, args, shapes, B):
    from portinfer.kernels import attention_decode

    Hq, Hkv, Sk, D = shapes["decode"]
    dev = shapes["device"]
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Sk, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q_pos = torch.full((B,), Sk - 1, dtype=torch.int32)
    kv_len = torch.full((B,), Sk, dtype=torch.int32)
    q_pos_d, kv_len_d = q_pos.to(dev), kv_len.to(dev)
    scale = D ** -0.5
    out = torch.empty_like(q)
    t_kernel = median_ms(lambda: attention_decode.decode_attention(q, k, v, q_pos_d, kv_len_d, True, scale, out), args)
    t_op = median_ms(lambda: backend.attention(q, k, v, q_pos, kv_len, True, scale), args)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    t_torch = median_ms(sdpa, args)
    kv_bytes = 2 * B * Hkv * Sk * D * 2
    return {"name": f"decode attention bf16 B={B} Hq={Hq} Hkv={Hkv} Sk={Sk} D={D}",
            "baseline": "F.scaled_dot_product_attention(enable_gqa=True)",
            "triton_kernel_ms": t_kernel, "triton_op_ms": t_op, "torch_ms": t_torch,
            "triton_gb_s": kv_bytes / t_kernel / 1e6, "torch_gb_s": kv_bytes / t_torch / 1e6,
            "speedup_kernel": t_torch / t_kernel, "speedup_op": t_torch / t_op, "target": 1.0,
            "rel_diff_vs_torch": rel_diff(backend.attention(q, k, v, q_pos, kv_len, True, scale), sdpa())}


def bench_qwen2_decode_step(args, shapes):
    """One decode token through a Qwen2-0.5B-shaped stack (24 layers, hidden 896, 14/2 heads of 64,
    MLP 4864, vocab 151936, tied embedding), KV length 1024, bf16, random weights: ops only, no runtime."""
    from portinfer.backends import registry, spec

    dev = shapes["device"]
    L, Hd, Hq, Hkv, D, I, V, ctx = (shapes["qwen"][k] for k in ("L", "Hd", "Hq", "Hkv", "D", "I", "V", "ctx"))
    result = {"name": f"Qwen2-0.5B-shaped decode step (ops only, random weights, {L} layers, KV length {ctx}, bf16)"}
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(torch.bfloat16)
    weights = {"embed": rand(V, Hd), "layers": [
        dict(ln1=1 + rand(Hd), qkv=rand((Hq + 2 * Hkv) * D, Hd), qkv_b=rand((Hq + 2 * Hkv) * D), o=rand(Hd, Hq * D),
             ln2=1 + rand(Hd), gate_up=rand(2 * I, Hd), down=rand(Hd, I),
             k=rand(1, Hkv, ctx + 1, D, scale=1.0), v=rand(1, Hkv, ctx + 1, D, scale=1.0)) for _ in range(L)],
        "norm": 1 + rand(Hd)}
    rotary = spec.RotaryParams.from_theta(D, 1_000_000.0)
    ids = torch.tensor([42], device=dev)
    pos = torch.tensor([[ctx]], device=dev)
    q_pos = torch.tensor([ctx], dtype=torch.int32)
    kv_len = torch.tensor([ctx + 1], dtype=torch.int32)
    for name in ("triton", "torch"):
        b = registry.get(name, device=dev)
        layers = [{key: (b.prepare_linear(t) if key in ("qkv", "o", "gate_up", "down") else t)
                   for key, t in layer.items()} for layer in weights["layers"]]
        lm_head = b.prepare_linear(weights["embed"])

        def step():
            h = b.embedding(ids, weights["embed"])  # [1, Hd]
            for lw in layers:
                a = b.rms_norm(h, lw["ln1"], 1e-6)
                qkv = b.linear(a, lw["qkv"], lw["qkv_b"]).view(1, 1, Hq + 2 * Hkv, D)  # [B, S, heads, D]
                q = b.rope(qkv[:, :, :Hq].transpose(1, 2), pos, rotary)  # [1, Hq, 1, D]
                k = b.rope(qkv[:, :, Hq:Hq + Hkv].transpose(1, 2), pos, rotary)
                lw["k"][:, :, ctx:ctx + 1] = k
                lw["v"][:, :, ctx:ctx + 1] = qkv[:, :, Hq + Hkv:].transpose(1, 2)
                att = b.attention(q, lw["k"], lw["v"], q_pos, kv_len, True, D ** -0.5)
                h = h + b.linear(att.transpose(1, 2).reshape(1, Hq * D), lw["o"])
                m = b.silu_mul(b.linear(b.rms_norm(h, lw["ln2"], 1e-6), lw["gate_up"]))
                h = h + b.linear(m, lw["down"])
            return b.linear(b.rms_norm(h, weights["norm"], 1e-6), lm_head)
        ms = median_ms(step, args)
        result[f"{name}_ms_per_token"] = ms
        result[f"{name}_tok_s"] = 1000.0 / ms
        result[f"{name}_logits"] = step().float()
    result["speedup"] = result["torch_ms_per_token"] / result["triton_ms_per_token"]
    result["rel_diff_vs_torch"] = rel_diff(result.pop("triton_logits"), result.pop("torch_logits"))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON result (e.g. bench/results/triton-h200.json)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="conformance seed")
    parser.add_argument("--skip-conformance", action="store_true")
    parser.add_argument("--conformance-max-examples", type=int, default=10,
                        help="examples per op and dtype (each new shape class compiles its kernels: 25, the suite's "
                             "full default, compiles about 220 kernel variants, several minutes)")
    parser.add_argument("--conformance-timeout", type=int, default=480, help="seconds")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under the Triton interpreter: checks the script, measures nothing")
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before portinfer.kernels is imported
        args.skip_conformance = True
    elif not torch.cuda.is_available():
        fail("needs a CUDA GPU, and torch.cuda.is_available() is False here (torch "
             f"{torch.__version__}); run it on a CUDA machine with a CUDA build of torch and triton installed")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        fail("TRITON_INTERPRET is set: unset it, the benchmark measures compiled kernels")
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        fail(f"the triton package cannot be imported ({exc}); pip install 'portinfer[triton]'")
    from portinfer.backends import registry

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES["smoke" if args.smoke else "gpu"]
    if args.smoke:  # the interpreter takes seconds a call: one timed call after the warm-up one
        args.timing = dict(warmup=1, warmup_s=0.0, repeats=1, min_time_s=0.0, device=shapes["device"])
        timing = {"statistic": "one perf_counter-timed call after one warm-up call, ms (smoke: not a measurement)"}
    else:
        args.timing = dict(warmup=args.warmup, repeats=args.repeats, device=shapes["device"])
        timing = {"warmup": args.warmup, "repeats": args.repeats, "method": "portinfer.bench.timing.measure",
                  "statistic": "median per-call time over the repeats (batches of calls timed with CUDA events), ms"}
    report = {"smoke": args.smoke, "provenance": provenance_record(), "timing": timing}
    if not args.skip_conformance:
        print("conformance (full profile)...", flush=True)
        report["conformance"] = conformance(args.seed, args.conformance_max_examples, args.conformance_timeout)
        print(f"  passed={report['conformance'].get('passed')} "
              f"({report['conformance'].get('seconds', '?')} s)", flush=True)
    backend = registry.get("triton")
    report["benchmarks"] = []
    if args.smoke:
        report["note"] = "--smoke: tiny shapes on CPU under the Triton interpreter; the times are not measurements"
    benches = [bench_linear, bench_prefill]
    benches += [lambda b, a, s, batch=batch: bench_decode(b, a, s, batch) for batch in shapes["decode_batches"]]
    benches.append(lambda b, a, s: bench_qwen2_decode_step(a, s))
    for bench in benches:
        try:
            row = bench(backend, args, shapes)
        except Exception as exc:  # keep the other figures; the error is part of the record
            row = {"name": getattr(bench, "__name__", "benchmark"), "error": f"{type(exc).__name__}: {exc}"}
        report["benchmarks"].append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(shown), flush=True)
        out_path.write_text(json.dumps(report, indent=2))  # partial results survive a later crash
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
