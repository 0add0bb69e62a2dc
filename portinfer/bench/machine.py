"""The machine a benchmark ran on: its provenance and its own ceilings, measured in the run.

Ceilings (per device): the matmul peak through torch (a large square matmul, per activation
dtype; the best repeat, since a ceiling is what the machine can reach) and the copy
bandwidth (a large tensor copy, bytes read + bytes written, best repeat).
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from ..backends import spec
from .timing import measure

# without sysfs (macOS, some containers): a common last-level cache size
DEFAULT_CACHE_BYTES = 32 * 2 ** 20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# the instruction-set extensions the kernels choose between (the cpu backend's paths)
_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
                 "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def cpu_flags() -> list:
    """The vector extensions /proc/cpuinfo reports (those in _VECTOR_FLAGS), or [] where it can't be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _VECTOR_FLAGS if f in have]
    except OSError:
        pass
    return []


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)


def cpu_cache_bytes() -> int:
    """The largest CPU cache (the last level) of cpu0, from sysfs."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            sizes.append(_parse_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else DEFAULT_CACHE_BYTES


def cache_bytes(device) -> int:
    """The last-level cache in front of `device`'s memory (a CPU's L3, a GPU's L2)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or DEFAULT_CACHE_BYTES
    return cpu_cache_bytes() if device.type == "cpu" else DEFAULT_CACHE_BYTES


def _version(dist) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(command: str) -> dict:
    """Where and how the figures were taken, so a reader can tell which machine they hold for."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "cuda": torch.version.cuda,
               "compute_capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2 ** 30, 1), "multiprocessors": props.multi_processor_count}
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_cache_bytes": cpu_cache_bytes(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "portinfer": _version("portinfer"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit is not None and dirty is not None else None,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def matmul_peak(device, dtype, max_n=2048, repeats=5, target_call_s=2.0) -> dict:
    """The best fp32/fp16/bf16 matmul rate through torch on `device` (FLOP/s), from an n x n x n matmul.

    n is max_n unless that would take longer than `target_call_s` per call (fp16 on some CPUs
    runs at well under 1 GFLOP/s): then the largest multiple of 64 that fits, estimated from a
    512^3 matmul first. The limit is loose on purpose: a small matmul understates the peak, and
    under load the estimate comes out several times low.
    """
    device = torch.device(device)
    n = max_n
    if max_n > 512:
        # 512^3: large enough that a thread-pool wake-up delayed by other processes (~8 ms on a
        # loaded 2-core machine) does not pass for a slow dtype
        probe = torch.randn(512, 512, device=device).to(dtype)
        probe_stats = measure(lambda: probe @ probe, warmup=1, warmup_s=0.0, repeats=3, min_time_s=0.0,
                              device=device)
        rate = 2 * 512 ** 3 / max(probe_stats.min_s, 1e-9)
        n_fit = int((target_call_s * rate / 2) ** (1 / 3)) // 64 * 64
        n = max(512, min(max_n, n_fit))
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    stats = measure(lambda: a @ b, warmup=1, warmup_s=0.0, repeats=repeats, min_time_s=0.0, device=device)
    flops = 2 * n ** 3
    return {"flop_s": flops / stats.min_s, "n": n, "flops": flops, "timing": stats.to_dict()}


def copy_bandwidth(device, nbytes, repeats=5, timer=time.perf_counter) -> dict:
    """The best copy rate on `device` (bytes read + bytes written per second) for a tensor of `nbytes`.

    timer: as measure's; time.thread_time gives bytes per CPU-second of the calling thread (with
    one thread, a rate that other processes' turns on the core do not lower)."""
    device = torch.device(device)
    numel = max(1, nbytes // 4)
    src = torch.empty(numel, device=device).uniform_()  # written, so no page is a shared zero page
    dst = torch.empty_like(src).uniform_()
    stats = measure(lambda: dst.copy_(src), warmup=1, warmup_s=0.0, repeats=repeats, min_time_s=0.0, device=device,
                    timer=timer)
    moved = 2 * numel * 4
    return {"bytes_s": moved / stats.min_s, "tensor_bytes": numel * 4, "bytes": moved, "timing": stats.to_dict()}


def read_bandwidth(device="cpu", nbytes=None, repeats=5) -> dict:
    """The best read-only rate on `device` (bytes read per second): a sum over a tensor of `nbytes`
    (default 4x the last-level cache, >= 256 MiB), which reads it once and writes nothing, as a
    decode step reads its weights. Closer to decode's limit than the copy probe, whose writes
    share the bus."""
    device = torch.device(device)
    nbytes = nbytes or max(256 * 2 ** 20, 4 * cache_bytes(device))
    numel = max(1, nbytes // 4)
    src = torch.empty(numel, device=device).uniform_()
    stats = measure(lambda: src.sum(), warmup=1, warmup_s=0.0, repeats=repeats, min_time_s=0.0, device=device)
    return {"bytes_s": numel * 4 / stats.min_s, "tensor_bytes": numel * 4, "threads": torch.get_num_threads(),
            "timing": stats.to_dict()}


def measure_ceilings(devices, dtypes, matmul_n=None, copy_bytes=None, repeats=5) -> dict:
    """{device type: {"matmul": {dtype name: ...}, "copy": ...}} for every device type in `devices`.

    fp32 is always measured (the roofline's reference peak); `dtypes` adds the others run.
    Defaults: a 2048^3 matmul and 4x the last-level cache (>= 256 MiB) copied on a CPU;
    8192^3 and 1 GiB on a GPU.
    """
    ceilings = {}
    for device_type in sorted({torch.device(d).type for d in devices}):
        device = torch.device(device_type)
        gpu = device_type != "cpu"
        n = matmul_n or (8192 if gpu else 2048)
        nbytes = copy_bytes or (2 ** 30 if gpu else max(256 * 2 ** 20, 4 * cache_bytes(device)))
        wanted = [torch.float32] + [d for d in dtypes if d != torch.float32]
        matmul = {spec.dtype_name(d): matmul_peak(device, d, max_n=n, repeats=repeats) for d in wanted}
        ceilings[device_type] = {"matmul": matmul, "copy": copy_bandwidth(device, nbytes, repeats=repeats),
                                 "cache_bytes": cache_bytes(device)}
        if gpu and device_type == "cuda":
            ceilings[device_type]["name"] = torch.cuda.get_device_name(device)
    return ceilings


def best_ceilings(*runs) -> dict:
    """Per device and dtype, the better of several ceiling measurements (each run's rate kept in `runs`)."""
    best = {}
    for device in runs[0]:
        first = runs[0][device]
        matmul = {}
        for dtype in first["matmul"]:
            entries = [r[device]["matmul"][dtype] for r in runs]
            top = max(entries, key=lambda m: m["flop_s"])
            matmul[dtype] = {**top, "runs_flop_s": [m["flop_s"] for m in entries]}
        copies = [r[device]["copy"] for r in runs]
        top = max(copies, key=lambda c: c["bytes_s"])
        best[device] = {**first, "matmul": matmul, "copy": {**top, "runs_bytes_s": [c["bytes_s"] for c in copies]}}
    return best


def roofline_peak(ceilings_for_device: dict, dtype_name: str) -> float:
    """The compute ceiling for an op in `dtype_name`: the best matmul rate measured in that dtype
    or in fp32 (an op can always be computed in fp32, so the fp32 peak bounds it from below)."""
    rates = [ceilings_for_device["matmul"][k]["flop_s"] for k in ("fp32", dtype_name)
             if k in ceilings_for_device["matmul"]]
    peak = max(rates)
    if not (peak > 0 and math.isfinite(peak)):
        raise RuntimeError(f"matmul peak for {dtype_name}: measured {peak}, expected a positive finite rate")
    return peak
