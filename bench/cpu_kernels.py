"""Benchmark of the cpu backend's kernels against torch and the machine's copy bandwidth.

Every ratio is measured side by side in one run (issue 4's targets):
  - GEMM, fp32 (M=128, K=N=1024; M=256 and 512, K=N=2048) and bf16 x and weights (M=128 and 256,
    K=N=2048; 128x576 -> 1536): GFLOP/s vs torch.matmul (the bf16 rows on the amx path where the
    CPU's tiles are usable, with the avx512bf16 path beside it; else on avx512bf16 where the CPU has it);
  - vdpbf16ps' own ceiling (a register-only loop on every thread, where the CPU has AVX512-BF16) and
    each bf16 GEMM's share of it, ours and torch's;
  - GEMV (M=1) with fp32 and bf16 weights of >= 64 MiB (twice this machine's L3, so the
    weights stream from DRAM as in LLM decode): weight bytes/s vs the copy bandwidth;
  - Q8_0 / Q4_0 / Q4_1 GEMV: quantized bytes/s vs the copy bandwidth;
  - the int8 route at prefill (cpu[int8-all]: a Q4_0 linear of 128 rows) on every int8 path usable here
    (amx, avx512vnni, avxvnni, avx2, portable), beside the fp32 route's GEMM on the same blocks;
  - attention decode (1 query, 2048 keys, 14 q heads over 2 kv heads, D=64) and
    prefill (S=512, causal) vs torch.nn.functional.scaled_dot_product_attention.
Copy bandwidth = (bytes read + bytes written) / time of a 256 MiB torch tensor copy, read bandwidth =
bytes / time of a sum over a tensor of 4x the last-level cache (>= 256 MiB), each the best of 1 and
N threads, measured again right before each GEMV row (portinfer.bench.machine's probes). Both sides
run with the same thread count (--threads, default: usable cores). Every time is
portinfer.bench.timing.measure's (the timing of every portinfer benchmark): per-call times of
repeats after a warm-up, each repeat a batch of calls lasting ~0.1 s / repeats in all; ratios use the
fastest repeat of each side (on a shared machine the least disturbed one), medians are recorded next
to them. With --threads 1 the GEMV rows are repeated per CPU-second of the calling thread (measure
with time.thread_time; weights and copy alike), which other processes' turns on the core do not
distort. Provenance (CPU model and flags, commit, load) is portinfer.bench.machine.provenance's.
Absolute numbers only hold on the machine that made them.

  python bench/cpu_kernels.py [--quick] [--threads N] [--out bench/results/cpu-<date>-<N>t.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from portinfer import backends
from portinfer.backends import spec
from portinfer.bench.machine import copy_bandwidth, provenance, read_bandwidth
from portinfer.bench.timing import measure

MIB = 1 << 20
COPY_BYTES = 256 * MIB  # the copy probe's tensor, as in the results under bench/results/


def bandwidths(reps, threads):
    """(copy, read) bytes/s, each the best of torch with 1 and `threads` threads (the higher one is
    the stricter yardstick)."""
    copy = read = 0.0
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        copy = max(copy, copy_bandwidth("cpu", COPY_BYTES, repeats=reps)["bytes_s"])
        read = max(read, read_bandwidth("cpu", repeats=reps)["bytes_s"])
    torch.set_num_threads(threads)
    return copy, read


def per_core_rows(cpu, reps, gen):
    """1 thread: GEMV weight bytes per CPU-second vs the copy's, robust to other processes' turns
    (memory bandwidth is still shared)."""
    torch.set_num_threads(1)
    copy = copy_bandwidth("cpu", COPY_BYTES, repeats=reps, timer=time.thread_time)["bytes_s"]
    x = torch.randn(1, 4096, generator=gen)
    weights = [("fp32", torch.randn(4096, 4096, generator=gen)), ("bf16", torch.randn(8192, 4096, generator=gen).bfloat16())]
    weights += [(fmt, random_blocks(fmt, n, 4096, gen)) for fmt, n in (("q8_0", 16384), ("q4_0", 28672), ("q4_1", 28672))]
    rows = []
    for name, w in weights:
        wp = cpu.prepare_linear(w, torch.float32)
        nbytes = w.nbytes if isinstance(w, spec.QuantizedWeight) else w.numel() * w.element_size()
        rate = nbytes / measure(lambda: cpu.linear(x, wp), repeats=reps, timer=time.thread_time).min_s
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
    p = provenance("python bench/cpu_kernels.py" + (" --quick" if quick else "") + f" --threads {threads}")
    # what machine.provenance does not record, and the names this script gave its fields before
    # (the results under bench/results/ have them)
    legacy = {"cpu_model": p["cpu"], "machine": platform.machine(), "cpu_backend": cpu.info(),
              "torch_threads": p["threads"], "torch_version": p["torch"], "date_utc": p["date"],
              "load_average_before": p["load_avg_start"]}
    results = {"provenance": {**p, **legacy}}

    copy, read = bandwidths(reps, threads)
    results["copy_bandwidth_GBps"], results["read_bandwidth_GBps"] = copy / 1e9, read / 1e9
    rows = []

    def row(name, **fields):
        fields = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}
        rows.append({"name": name, **fields})
        print(name, fields, flush=True)

    # ---------------------------------------------------------------- vdpbf16ps' own ceiling
    # registers only, every thread: what no bf16 GEMM on the vector units (ours or oneDNN's) can beat
    dot_peak = None
    if "avx512bf16" in cpu.simd_paths():
        from portinfer.backends.cpu import _cpu
        iters = 200_000
        probe = measure(lambda: _cpu.bf16_dot_peak(iters), repeats=reps)
        dot_peak = _cpu.bf16_dot_peak(1) * iters / probe.min_s  # flops of one round x rounds / s
        row("vdpbf16ps peak (register-only, 24 chains a thread)", GFLOPs=dot_peak / 1e9,
            GFLOPs_per_thread=dot_peak / 1e9 / cpu.num_threads())

    # ---------------------------------------------------------------- GEMM (prefill) vs torch.matmul
    # fp32 (issue 13: >= 0.95x at 256x2048x2048) and bf16 x bf16 weights (>= 1.0x; oneDNN's bf16 path)
    for dtype, m, k, n, target in ((torch.float32, 128, 1024, 1024, 0.9), (torch.float32, 256, 2048, 2048, 0.95),
                                   (torch.float32, 512, 2048, 2048, 0.9), (torch.bfloat16, 128, 2048, 2048, 1.0),
                                   (torch.bfloat16, 256, 2048, 2048, 1.0), (torch.bfloat16, 128, 576, 1536, 1.0)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        wp = cpu.prepare_linear(w, dtype)
        wt = w.T
        ours, theirs = measure(lambda: cpu.linear(x, wp), repeats=reps), measure(lambda: torch.matmul(x, wt),
                                                                                 repeats=reps)
        flops = 2 * m * n * k
        extra = {}
        if dtype == torch.bfloat16 and cpu.simd() == "amx":  # the tiles and the vector path side by side
            cpu.set_simd("avx512bf16")
            vec = measure(lambda: cpu.linear(x, wp), repeats=reps)
            cpu.set_simd("amx")
            extra = {"avx512bf16_GFLOPs": flops / vec.min_s / 1e9, "amx_vs_avx512bf16": vec.min_s / ours.min_s}
        elif dtype == torch.bfloat16 and dot_peak:  # both sides against the instruction's ceiling
            extra = {"cpu_share_of_vdpbf16ps_peak": flops / ours.min_s / dot_peak,
                     "torch_share_of_vdpbf16ps_peak": flops / theirs.min_s / dot_peak}
        row(f"gemm {spec.dtype_name(dtype)} M={m} K={k} N={n}", cpu_GFLOPs=flops / ours.min_s / 1e9,
            torch_GFLOPs=flops / theirs.min_s / 1e9, ratio_vs_torch=theirs.min_s / ours.min_s,
            median_ratio_vs_torch=theirs.median_s / ours.median_s, simd=cpu.simd(), target=target, **extra)

    # ---------------------------------------------------------------- GEMV, dense weights, vs copy bandwidth
    k = 4096
    for dtype, n in ((torch.float32, 4096), (torch.bfloat16, 8192)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(1, k, generator=gen).to(dtype)
        wp = cpu.prepare_linear(w)
        copy, read = bandwidths(reps, threads)
        ours, theirs = measure(lambda: cpu.linear(x, wp), repeats=reps), measure(lambda: F.linear(x, w), repeats=reps)
        nbytes = w.numel() * w.element_size()
        row(f"gemv {spec.dtype_name(dtype)} weights M=1 K={k} N={n} ({nbytes // MIB} MiB)",
            cpu_GBps=nbytes / ours.min_s / 1e9, torch_GBps=nbytes / theirs.min_s / 1e9, copy_GBps=copy / 1e9,
            ratio_vs_copy_bandwidth=nbytes / ours.min_s / copy,
            median_ratio_vs_copy_bandwidth=nbytes / ours.median_s / copy, read_GBps=read / 1e9,
            ratio_vs_read_bandwidth=nbytes / ours.min_s / read, speedup_vs_torch=theirs.min_s / ours.min_s,
            target=0.85)
        del w, wp

    # ---------------------------------------------------------------- GEMV, GGUF block weights
    x = torch.randn(1, k, generator=gen)
    for fmt, n in (("q8_0", 16384), ("q4_0", 28672), ("q4_1", 28672)):
        qw = random_blocks(fmt, n, k, gen)
        wp = cpu.prepare_linear(qw)
        copy, read = bandwidths(reps, threads)
        ours = measure(lambda: cpu.linear(x, wp), repeats=reps)
        row(f"gemv {fmt} weights fp32 x M=1 K={k} N={n} ({qw.nbytes // MIB} MiB)",
            cpu_GBps=qw.nbytes / ours.min_s / 1e9, copy_GBps=copy / 1e9,
            ratio_vs_copy_bandwidth=qw.nbytes / ours.min_s / copy,
            median_ratio_vs_copy_bandwidth=qw.nbytes / ours.median_s / copy, read_GBps=read / 1e9,
            ratio_vs_read_bandwidth=qw.nbytes / ours.min_s / read, target=0.8)
        del qw, wp

    # ---------------------------------------------------------------- int8 route at prefill, every int8 path
    # cpu[int8-all] (prompts on int8 activations): one Q4_0 linear of 128 rows on each int8 path usable
    # here (amx's tiles where usable), GMAC/s side by side, against the fp32 route's GEMM on the same blocks
    q8all, q32 = backends.get("cpu", quant_route="int8-all"), backends.get("cpu", quant_route="fp32")
    qw = random_blocks("q4_0", 2048, 2048, gen)
    x = torch.randn(128, 2048, generator=gen)
    wp8, wp32 = q8all.prepare_linear(qw), q32.prepare_linear(qw)
    fp32_route = measure(lambda: q32.linear(x, wp32), repeats=reps)
    default_path = q8all.int8_path()
    macs = 128 * 2048 * 2048
    for path in q8all.int8_paths():
        q8all.set_int8_path(path)
        t = measure(lambda: q8all.linear(x, wp8), repeats=reps)
        row(f"int8 route prefill q4_0 M=128 K=2048 N=2048 path={path}", GMACs=macs / t.min_s / 1e9,
            fp32_route_GMACs=macs / fp32_route.min_s / 1e9, vs_fp32_route=fp32_route.min_s / t.min_s)
    q8all.set_int8_path(default_path)
    del qw, wp8, wp32

    # ---------------------------------------------------------------- attention vs torch SDPA
    i32 = torch.int32
    for label, sq, sk, dtype in (("decode", 1, 2048, torch.float32), ("prefill", 512, 512, torch.float32),
                                 ("decode", 1, 2048, torch.bfloat16), ("prefill", 512, 512, torch.bfloat16)):
        q = torch.randn(1, 14, sq, 64, generator=gen).to(dtype)
        kk = torch.randn(1, 2, sk, 64, generator=gen).to(dtype)
        v = torch.randn(1, 2, sk, 64, generator=gen).to(dtype)
        q_pos, kv_len = torch.tensor([sk - sq], dtype=i32), torch.tensor([sk], dtype=i32)
        ours = measure(lambda: cpu.attention(q, kk, v, q_pos, kv_len, causal=True), repeats=reps)
        # decode: the one query sees every key, so no mask is the same function
        theirs = measure(lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=sq > 1, enable_gqa=True),
                         repeats=reps)
        row(f"attention {label} {spec.dtype_name(dtype)} Sq={sq} Sk={sk} Hq=14 Hkv=2 D=64", cpu_ms=ours.min_s * 1e3,
            torch_sdpa_ms=theirs.min_s * 1e3, speedup_vs_torch=theirs.min_s / ours.min_s,
            median_speedup_vs_torch=theirs.median_s / ours.median_s, target=">1" if label == "decode" else 1.0)

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
    print(f"copy bandwidth at the start {results['copy_bandwidth_GBps']:.1f} GB/s, read bandwidth "
          f"{results['read_bandwidth_GBps']:.1f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
