"""Benchmark of the cpu backend's kernels against torch and the machine's copy bandwidth.

Every ratio is measured side by side in one run (issue 4's targets):
  - fp32 GEMM (M=128, K=N=1024 and M=512, K=N=2048): GFLOP/s vs torch.matmul;
  - GEMV (M=1) with fp32 and bf16 weights of >= 64 MiB (twice this machine's L3, so the
    weights stream from DRAM as in LLM decode): weight bytes/s vs the copy bandwidth;
  - Q8_0 / Q4_0 / Q4_1 GEMV: quantized bytes/s vs the copy bandwidth;
  - attention decode (1 query, 2048 keys, 14 q heads over 2 kv heads, D=64) and
    prefill (S=512, causal) vs torch.nn.functional.scaled_dot_product_attention.
Copy bandwidth = (bytes read + bytes written) / time of a 256 MiB torch tensor copy (the best of
1 and N threads), measured again right before each GEMV row. Both sides run with the same thread
count (--threads, default: usable cores). Each time is taken over repetitions after warm-up;
ratios use the fastest repetition of each side (on a shared machine the least disturbed one),
medians are recorded next to them. With --threads 1 the GEMV rows are repeated per CPU-second of
the calling thread (weights and copy alike), which other processes' turns on the core do not
distort. Absolute numbers only hold on the machine that made them.

  python bench/cpu_kernels.py [--quick] [--threads N] [--out bench/results/cpu-<date>-<N>t.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from portinfer import backends
from portinfer.backends import spec

MIB = 1 << 20


def times_s(fn, reps, warmup=2):
    """(fastest, median) seconds of fn over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def thread_cpu_s(fn, reps):
    """Fastest CPU time of the calling thread: with 1 thread, the kernel's own time even when other
    processes take turns on the core (memory bandwidth is still shared)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth(reps, threads):
    """(read + write) bytes/s of a 256 MiB tensor copy: the best of torch with 1 and `threads`
    threads (the higher one is the stricter yardstick)."""
    src = torch.rand(256 * MIB // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        best = max(best, 2 * src.numel() * 4 / times_s(lambda: dst.copy_(src), reps)[0])
    torch.set_num_threads(threads)
    return best


def per_core_rows(cpu, reps, gen):
    """1 thread: GEMV weight bytes per CPU-second vs the copy's, robust to other processes' turns."""
    torch.set_num_threads(1)
    src = torch.rand(256 * MIB // 4)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / thread_cpu_s(lambda: dst.copy_(src), reps)
    x = torch.randn(1, 4096, generator=gen)
    weights = [("fp32", torch.randn(4096, 4096, generator=gen)), ("bf16", torch.randn(8192, 4096, generator=gen).bfloat16())]
    weights += [(fmt, random_blocks(fmt, n, 4096, gen)) for fmt, n in (("q8_0", 16384), ("q4_0", 28672), ("q4_1", 28672))]
    rows = []
    for name, w in weights:
        wp = cpu.prepare_linear(w, torch.float32)
        nbytes = w.nbytes if isinstance(w, spec.QuantizedWeight) else w.numel() * w.element_size()
        rate = nbytes / thread_cpu_s(lambda: cpu.linear(x, wp), reps)
        rows.append({"name": f"per-core gemv {name} weights fp32 x M=1 K=4096 ({nbytes // MIB} MiB)",
                     "cpu_GB_per_cpu_s": round(rate / 1e9, 2), "copy_GB_per_cpu_s": round(copy / 1e9, 2),
                     "ratio_vs_copy": round(rate / copy, 3)})
        print(rows[-1], flush=True)
    return rows


def random_blocks(fmt, n, k, gen):
    """Valid GGUF blocks with random quants and fp16 scales ~0.01 (quantizing 100M weights would take minutes)."""
    per_block, block_bytes = spec.QUANT_FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, k // per_block, block_bytes), dtype=torch.uint8, generator=gen)
    scale = torch.full((n, k // per_block, 1), 0.01, dtype=torch.float16).view(torch.uint8)
    blocks[..., 0:2] = scale
    if fmt == "q4_1":
        blocks[..., 2:4] = torch.full((n, k // per_block, 1), -0.08, dtype=torch.float16).view(torch.uint8)
    return spec.QuantizedWeight(fmt, blocks.reshape(n, -1), (n, k))


def run(quick=False, threads=None):
    reps = 5 if quick else 15
    cpu = backends.get("cpu")
    # the same thread count on both sides (default: the cpu backend's, i.e. the usable cores)
    threads = threads or cpu.num_threads()
    cpu.set_num_threads(threads)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    results = {"provenance": {
        "cpu_model": cpu_model(), "machine": platform.machine(), "cpu_backend": cpu.info(),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__, "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "command": "python bench/cpu_kernels.py" + (" --quick" if quick else "") + f" --threads {threads}"}}

    results["copy_bandwidth_GBps"] = copy_bandwidth(reps, threads) / 1e9
    rows = []

    def row(name, **fields):
        fields = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}
        rows.append({"name": name, **fields})
        print(name, fields, flush=True)

    # ---------------------------------------------------------------- fp32 GEMM vs torch.matmul
    for m, k, n in ((128, 1024, 1024), (512, 2048, 2048)):
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        wp = cpu.prepare_linear(w)
        wt = w.T
        (t_cpu, med_cpu), (t_torch, med_torch) = times_s(lambda: cpu.linear(x, wp), reps), times_s(
            lambda: torch.matmul(x, wt), reps)
        flops = 2 * m * n * k
        row(f"gemm fp32 M={m} K={k} N={n}", cpu_GFLOPs=flops / t_cpu / 1e9, torch_GFLOPs=flops / t_torch / 1e9,
            ratio_vs_torch=t_torch / t_cpu, median_ratio_vs_torch=med_torch / med_cpu, target=0.9)

    # ---------------------------------------------------------------- GEMV, dense weights, vs copy bandwidth
    k = 4096
    for dtype, n in ((torch.float32, 4096), (torch.bfloat16, 8192)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(1, k, generator=gen).to(dtype)
        wp = cpu.prepare_linear(w)
        bandwidth = copy_bandwidth(reps, threads)
        (t_cpu, med_cpu), (t_torch, _) = times_s(lambda: cpu.linear(x, wp), reps), times_s(lambda: F.linear(x, w), reps)
        nbytes = w.numel() * w.element_size()
        row(f"gemv {spec.dtype_name(dtype)} weights M=1 K={k} N={n} ({nbytes // MIB} MiB)",
            cpu_GBps=nbytes / t_cpu / 1e9, torch_GBps=nbytes / t_torch / 1e9, copy_GBps=bandwidth / 1e9,
            ratio_vs_copy_bandwidth=nbytes / t_cpu / bandwidth, median_ratio_vs_copy_bandwidth=nbytes / med_cpu / bandwidth,
            speedup_vs_torch=t_torch / t_cpu, target=0.85)
        del w, wp

    # ---------------------------------------------------------------- GEMV, GGUF block weights
    x = torch.randn(1, k, generator=gen)
    for fmt, n in (("q8_0", 16384), ("q4_0", 28672), ("q4_1", 28672)):
        qw = random_blocks(fmt, n, k, gen)
        wp = cpu.prepare_linear(qw)
        bandwidth = copy_bandwidth(reps, threads)
        t_cpu, med_cpu = times_s(lambda: cpu.linear(x, wp), reps)
        row(f"gemv {fmt} weights fp32 x M=1 K={k} N={n} ({qw.nbytes // MIB} MiB)", cpu_GBps=qw.nbytes / t_cpu / 1e9,
            copy_GBps=bandwidth / 1e9, ratio_vs_copy_bandwidth=qw.nbytes / t_cpu / bandwidth,
            median_ratio_vs_copy_bandwidth=qw.nbytes / med_cpu / bandwidth, target=0.8)
        del qw, wp

    # ---------------------------------------------------------------- attention vs torch SDPA
    i32 = torch.int32
    for label, sq, sk, dtype in (("decode", 1, 2048, torch.float32), ("prefill", 512, 512, torch.float32),
                                 ("decode", 1, 2048, torch.bfloat16), ("prefill", 512, 512, torch.bfloat16)):
        q = torch.randn(1, 14, sq, 64, generator=gen).to(dtype)
        kk = torch.randn(1, 2, sk, 64, generator=gen).to(dtype)
        v = torch.randn(1, 2, sk, 64, generator=gen).to(dtype)
        q_pos, kv_len = torch.tensor([sk - sq], dtype=i32), torch.tensor([sk], dtype=i32)
        t_cpu, med_cpu = times_s(lambda: cpu.attention(q, kk, v, q_pos, kv_len, causal=True), reps)
        # decode: the one query sees every key, so no mask is the same function
        t_torch, med_torch = times_s(
            lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=sq > 1, enable_gqa=True), reps)
        row(f"attention {label} {spec.dtype_name(dtype)} Sq={sq} Sk={sk} Hq=14 Hkv=2 D=64", cpu_ms=t_cpu * 1e3,
            torch_sdpa_ms=t_torch * 1e3, speedup_vs_torch=t_torch / t_cpu, median_speedup_vs_torch=med_torch / med_cpu,
            target=">1" if label == "decode" else 1.0)

    if threads == 1:
        rows += per_core_rows(cpu, reps, gen)
    results["rows"] = rows
    results["provenance"]["load_average_after"] = os.getloadavg()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, help="threads for the cpu backend and torch (default: usable cores)")
    parser.add_argument("--out", help="JSON file to write (default: bench/results/cpu-<date>.json)")
    args = parser.parse_args(argv)
    results = run(args.quick, args.threads)
    threads = results["provenance"]["cpu_backend"]["threads"]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"cpu-{datetime.date.today().isoformat()}-{threads}t.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"copy bandwidth at the start {results['copy_bandwidth_GBps']:.1f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
