"""`portinfer bench ops`: every op x shape x dtype x backend against the machine's ceilings.

A *case* is one op at one shape (e.g. linear `gate_up` at decode, M=1). For each case, dtype
and backend the harness builds rotating input sets (weights prepared once per set through
`prepare_linear`), times the public, validated Backend method with `timing.measure`, and
derives:

    GFLOP/s = flops / median          GB/s = bytes / median
    roofline floor = max(flops / peak, bytes / bandwidth)      (peak, bandwidth: this run's ceilings)
    fraction of the roofline reached = floor / median          speedup = median(torch) / median

`flops` and `bytes` are the op's own minimum (see `cost`): every input read once, every output
written once, weights in the format the contract names (GGUF blocks for Q8_0/Q4_0/Q4_1), not
whatever a backend happens to move. The `torch` backend on the same device is always measured:
it is the baseline of every speedup.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import backends as registry
from ..backends import quant, spec
from ..backends.spec import RotaryParams, UnsupportedOpError
from . import machine
from .shapes import ModelShapes
from .timing import Progress, measure

BENCH_OPS = ("linear", "embedding", "rms_norm", "layer_norm", "rope", "silu_mul", "gelu", "attention")
LINEAR_FORMATS = ("dense", "q8_0", "q4_0", "q4_1")
DEFAULT_DTYPES = ("fp32", "bf16")  # fp16 matmul on CPUs without fp16 units runs far below 1 GFLOP/s
# rotating input sets per case: enough to stream 2x the last-level cache per pass, at most this many
MAX_INPUT_SETS = 4096
SCHEMA = "portinfer.bench.ops/1"
# a case whose compute floor is this many times its memory floor runs on one input set (see run_ops)
COMPUTE_BOUND_MARGIN = 8


@dataclass(frozen=True)
class Case:
    """One op at one shape. `params` holds the sizes the op's inputs are built from."""

    op: str
    name: str  # the layer it comes from ("qkv", "lm_head", ...) or the op itself
    phase: str  # "decode" (one new token) or "prefill" (a prompt of `tokens`)
    shapes: str  # the shape set it was taken from
    params: dict = field(default_factory=dict)
    weight_format: str | None = None  # linear only: "dense" or a GGUF block format

    def describe(self) -> str:
        p = self.params
        if self.op == "linear":
            return f"M={p['M']} K={p['K']} N={p['N']}"
        if self.op == "embedding":
            return f"ids[{p['N']}] table[{p['V']},{p['H']}]"
        if self.op == "attention":
            return f"q[{p['B']},{p['Hq']},{p['Sq']},{p['D']}] kv[{p['B']},{p['Hkv']},{p['Sk']},{p['D']}]"
        if self.op == "rope":
            return f"x[{p['B']},{p['H']},{p['S']},{p['D']}]"
        if self.op == "silu_mul":
            return f"x[{p['M']},{2 * p['I']}]"
        if self.op == "gelu":
            return f"x[{p['M']},{p['I']}]"
        return f"x[{p['M']},{p['H']}]"


def build_cases(shapes: ModelShapes, ops=BENCH_OPS, formats=LINEAR_FORMATS) -> list[Case]:
    """The cases of one shape set: each op at decode (1 token) and prefill (`shapes.tokens`)."""
    s = shapes
    T, C = s.tokens, s.context
    phases = (("decode", 1), ("prefill", T))
    cases = []
    for op in ops:
        if op == "linear":
            projections = (("qkv", (s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden),  # (name, N, K)
                           ("o", s.hidden, s.heads * s.head_dim),
                           ("gate_up", 2 * s.intermediate, s.hidden),
                           ("down", s.hidden, s.intermediate),
                           ("lm_head", s.vocab, s.hidden))
            for phase, M in phases:
                for name, N, K in projections:
                    if name == "lm_head" and phase == "prefill":
                        continue  # prefill computes logits for the last token only: lm_head runs at M=1
                    for fmt in formats:
                        cases.append(Case(op, name, phase, s.name, {"M": M, "K": K, "N": N}, fmt))
        elif op == "embedding":
            cases += [Case(op, op, ph, s.name, {"N": M, "V": s.vocab, "H": s.hidden}) for ph, M in phases]
        elif op in ("rms_norm", "layer_norm"):
            cases += [Case(op, op, ph, s.name, {"M": M, "H": s.hidden}) for ph, M in phases]
        elif op in ("silu_mul", "gelu"):
            cases += [Case(op, op, ph, s.name, {"M": M, "I": s.intermediate}) for ph, M in phases]
        elif op == "rope":
            # the query heads; decode rotates the one new token at position C - 1
            cases.append(Case(op, op, "decode", s.name,
                              {"B": 1, "H": s.heads, "S": 1, "D": s.head_dim, "pos0": C - 1, "theta": s.rope_theta}))
            cases.append(Case(op, op, "prefill", s.name,
                              {"B": 1, "H": s.heads, "S": T, "D": s.head_dim, "pos0": 0, "theta": s.rope_theta}))
        elif op == "attention":
            common = {"B": 1, "Hq": s.heads, "Hkv": s.kv_heads, "D": s.head_dim}
            # decode: one query at position C - 1 over a cache of C keys; prefill: causal T x T from position 0
            cases.append(Case(op, op, "decode", s.name, {**common, "Sq": 1, "Sk": C, "q_pos": C - 1, "kv_len": C}))
            cases.append(Case(op, op, "prefill", s.name, {**common, "Sq": T, "Sk": T, "q_pos": 0, "kv_len": T}))
        else:
            raise ValueError(f"ops: expected names among {', '.join(BENCH_OPS)}, got {op!r}")
    return cases


# ----------------------------------------------------------------------------------------------
# cost model: the op's own flops and compulsory bytes

def visible_pairs(Sq, q_pos, kv_len, causal=True) -> int:
    """Query-key pairs a causal attention row set must score: row i sees keys j < kv_len, j <= q_pos + i."""
    if not causal:
        return Sq * kv_len
    return sum(min(kv_len, q_pos + i + 1) for i in range(Sq))


def weight_bytes(N, K, weight_format, dtype) -> int:
    if weight_format in spec.QUANT_FORMATS:
        per_block, block_bytes = spec.QUANT_FORMATS[weight_format]
        return N * (K // per_block) * block_bytes
    return N * K * dtype.itemsize


def cost(case: Case, dtype: torch.dtype) -> tuple[int, int]:
    """(flops, bytes) of one call. Conventions: a multiply-add is 2 flops, a transcendental
    (exp, erf) 1; attention counts its two matmuls over the visible pairs (softmax not counted);
    bytes = inputs read once + outputs written once."""
    p, e = case.params, dtype.itemsize
    if case.op == "linear":
        M, K, N = p["M"], p["K"], p["N"]
        return 2 * M * N * K, (M * K + M * N) * e + weight_bytes(N, K, case.weight_format, dtype)
    if case.op == "embedding":
        N, H = p["N"], p["H"]
        return 0, N * 8 + 2 * N * H * e  # int64 ids, the N rows gathered, the output
    if case.op == "rms_norm":  # square, sum, scale by 1/rms, scale by weight
        M, H = p["M"], p["H"]
        return 4 * M * H, (2 * M * H + H) * e
    if case.op == "layer_norm":  # sum, center, square, sum, scale, weight, bias
        M, H = p["M"], p["H"]
        return 7 * M * H, (2 * M * H + 2 * H) * e
    if case.op == "rope":  # each rotated element: 2 multiplies + 1 add (cos/sin per position not counted)
        B, H, S, D = p["B"], p["H"], p["S"], p["D"]
        return 3 * B * H * S * D, 2 * B * H * S * D * e + B * S * 8
    if case.op == "silu_mul":  # exp, add, divide (silu), multiply by up: per output element
        M, I = p["M"], p["I"]
        return 4 * M * I, 3 * M * I * e
    if case.op == "gelu":  # erf variant: scale, erf, add, multiply, halve
        M, I = p["M"], p["I"]
        return 5 * M * I, 2 * M * I * e
    if case.op == "attention":
        B, Hq, Hkv, Sq, D = p["B"], p["Hq"], p["Hkv"], p["Sq"], p["D"]
        pairs = visible_pairs(Sq, p["q_pos"], p["kv_len"])
        keys_read = p["kv_len"]
        return 4 * B * Hq * D * pairs, (2 * B * Hq * Sq * D + 2 * B * Hkv * keys_read * D) * e + 8 * B
    raise ValueError(f"op: no cost model for {case.op!r}")


# ----------------------------------------------------------------------------------------------
# inputs: rotating sets, so a small op reads memory rather than the cache its last call warmed

def input_sets(set_bytes, cache_bytes, max_sets=MAX_INPUT_SETS) -> int:
    """How many distinct input sets stream 2x the last-level cache per pass (1 if one set already does).
    set_bytes: the op's compulsory bytes (the embedding table is shared; its gathered rows count)."""
    return max(1, min(max_sets, math.ceil(2 * cache_bytes / max(set_bytes, 1))))


class _Data:
    """The raw tensors of one case, dtype and device, shared by every backend on that device."""

    def __init__(self, case, dtype, device, n_sets, quantized):
        self.case, self.dtype, self.device, self.n_sets = case, dtype, device, n_sets
        p, n = case.params, n_sets

        def random(*shape, scale=1.0):
            # uniform with the variance of a unit normal: as good as randn for timing, several times faster to fill
            return torch.empty(*shape, device=device).uniform_(-3 ** 0.5 * scale, 3 ** 0.5 * scale).to(dtype)

        op = case.op
        if op == "linear":
            M, K, N = p["M"], p["K"], p["N"]
            self.x = random(n, M, K)
            if case.weight_format == "dense":
                self.w = random(n, N, K, scale=K ** -0.5)
            else:
                base = quantized[(N, K, case.weight_format)]
                self.blocks = base.blocks.to(device).unsqueeze(0).repeat(n, 1, 1)  # one copy per set
        elif op == "embedding":
            self.table = random(p["V"], p["H"])  # one table, as in a model; each set gathers other rows
            self.ids = torch.randint(0, p["V"], (n, p["N"]), device=device)
        elif op in ("rms_norm", "layer_norm"):
            self.x = random(n, p["M"], p["H"])
            self.w = random(p["H"])
            self.b = random(p["H"])
        elif op == "silu_mul":
            self.x = random(n, p["M"], 2 * p["I"])
        elif op == "gelu":
            self.x = random(n, p["M"], p["I"])
        elif op == "rope":
            self.x = random(n, p["B"], p["H"], p["S"], p["D"])
            self.pos = (p["pos0"] + torch.arange(p["S"], device=device)).expand(p["B"], -1).contiguous()
            self.rotary = RotaryParams.from_theta(p["D"], p["theta"])
        elif op == "attention":
            B, Hq, Hkv, Sq, Sk, D = p["B"], p["Hq"], p["Hkv"], p["Sq"], p["Sk"], p["D"]
            self.q = random(n, B, Hq, Sq, D)
            self.k = random(n, B, Hkv, Sk, D)
            self.v = random(n, B, Hkv, Sk, D)
            self.q_pos = torch.full((B,), p["q_pos"], dtype=torch.int32, device=device)
            self.kv_len = torch.full((B,), p["kv_len"], dtype=torch.int32, device=device)

    def call(self, backend, cache_bytes, max_sets):
        """(fn, argument tuples): the public Backend method and one tuple per input set.

        Linear weights are prepared here, once per set, outside the timed region. How many sets
        a backend gets follows from what its prepared weight really occupies (a backend that
        dequantizes Q4_0 to fp32 holds 7x the block bytes), at most the sets built."""
        op, n = self.case.op, self.n_sets
        if op == "linear":
            p = self.case.params
            if self.case.weight_format == "dense":
                prepare = lambda i: backend.prepare_linear(self.w[i])
            else:
                prepare = lambda i: backend.prepare_linear(
                    spec.QuantizedWeight(self.case.weight_format, self.blocks[i], (p["N"], p["K"])), dtype=self.dtype)
            weights = [prepare(0)]
            held = tensor_bytes(weights[0].payload) + tensor_bytes(weights[0].extra)
            if held:
                n = min(n, input_sets((p["M"] * p["K"] + p["M"] * p["N"]) * self.dtype.itemsize + held,
                                      cache_bytes, max_sets))
            weights += [prepare(i) for i in range(1, n)]
            return backend.linear, [(self.x[i], weights[i]) for i in range(n)]
        if op == "embedding":
            return backend.embedding, [(self.ids[i], self.table) for i in range(n)]
        if op == "rms_norm":
            return backend.rms_norm, [(self.x[i], self.w, 1e-6) for i in range(n)]
        if op == "layer_norm":
            return backend.layer_norm, [(self.x[i], self.w, self.b, 1e-5) for i in range(n)]
        if op == "silu_mul":
            return backend.silu_mul, [(self.x[i],) for i in range(n)]
        if op == "gelu":
            return backend.gelu, [(self.x[i], "none") for i in range(n)]
        if op == "rope":
            return backend.rope, [(self.x[i], self.pos, self.rotary) for i in range(n)]
        if op == "attention":
            return backend.attention, [(self.q[i], self.k[i], self.v[i], self.q_pos, self.kv_len, True, None)
                                       for i in range(n)]
        raise ValueError(f"op: no input builder for {op!r}")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, or lists/tuples/dicts of them); 0 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------------------------
# backends taking part

def default_backends() -> list[str]:
    """Every available backend except the float64 oracle and those not meant for real runs
    (auto_eligible() False, e.g. triton under its interpreter)."""
    chosen = []
    for name in registry.names():
        if name == "reference":
            continue
        entry = registry.entry(name)
        ok, _ = entry.status()
        if ok and entry.cls.auto_eligible():
            chosen.append(name)
    return chosen


def parse_backend(text: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME:DEVICE' (e.g. torch:cpu on a CUDA machine)."""
    name, _, device = text.partition(":")
    return name, device or None


def instantiate(backend_specs) -> list:
    """Backend instances for the specs, plus the torch baseline on every device they use."""
    instances = []
    for text in backend_specs:
        name, device = parse_backend(text)
        instances.append(registry.get(name, device=device))  # unknown/unavailable: a ValueError/RuntimeError naming it
    devices = []
    for b in instances:
        if b.device.type not in devices:
            devices.append(b.device.type)
    for device_type in devices:
        if not any(b.name == "torch" and b.device.type == device_type for b in instances):
            instances.insert(0, registry.get("torch", device=device_type))
    # torch first on each device, so the baseline exists when the others' speedups are computed
    instances.sort(key=lambda b: (devices.index(b.device.type), b.name != "torch"))
    return instances


# ----------------------------------------------------------------------------------------------
# the run

def _finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


def run_ops(backend_specs=None, shape_sets=(), ops=BENCH_OPS, dtypes=DEFAULT_DTYPES, formats=LINEAR_FORMATS,
            repeats=10, warmup=2, min_time_s=0.1, max_input_sets=MAX_INPUT_SETS, threads=None, matmul_n=None,
            copy_bytes=None, command="", progress=None, log=None) -> dict:
    """Run the op benchmark; returns the result document (see SCHEMA and docs/bench.md).

    The ceilings are measured before and after the ops and the better of the two is used, so a
    burst of load during one of them does not lower the roofline; both are kept in the document."""
    started = time.perf_counter()
    dtypes = [spec.parse_dtype(d) for d in dtypes]
    instances = instantiate(backend_specs if backend_specs else default_backends())
    restore = []
    if threads is not None:
        # torch and backends with their own pool (the cpu backend) run on the same count; put back after
        restore.append(functools.partial(torch.set_num_threads, torch.get_num_threads()))
        torch.set_num_threads(threads)
        for b in instances:
            if callable(getattr(b, "set_num_threads", None)):
                if callable(getattr(b, "num_threads", None)):
                    restore.append(functools.partial(b.set_num_threads, b.num_threads()))
                b.set_num_threads(threads)
    try:
        return _run(instances, shape_sets, ops, dtypes, formats, repeats, warmup, min_time_s, max_input_sets,
                    matmul_n, copy_bytes, command, progress, log, started)
    finally:
        for undo in restore:
            undo()


def _run(instances, shape_sets, ops, dtypes, formats, repeats, warmup, min_time_s, max_input_sets, matmul_n,
         copy_bytes, command, progress, log, started) -> dict:
    torch.manual_seed(0)
    devices = sorted({b.device.type for b in instances})
    doc = {"schema": SCHEMA, "provenance": machine.provenance(command)}
    load = doc["provenance"]["load_avg_start"]
    if log and load and load[0] > 0.5 * (doc["provenance"]["cpus_usable"] or 1):
        log(f"warning: load average {load[0]:.2f} on {doc['provenance']['cpus_usable']} CPUs: other processes "
            f"compete for the cores and the figures will be noisy; rerun on a quiet machine before quoting them")
    doc["backends"] = [{"name": b.name, "device": str(b.device), "info": _jsonable(b.info())} for b in instances]
    doc["settings"] = {"shapes": [s.to_dict() for s in shape_sets], "ops": list(ops),
                       "dtypes": [spec.dtype_name(d) for d in dtypes], "weight_formats": list(formats),
                       "repeats": repeats, "warmup": warmup, "min_time_s": min_time_s, "max_input_sets": max_input_sets}
    ceilings_start = machine.measure_ceilings(devices, dtypes, matmul_n=matmul_n, copy_bytes=copy_bytes)

    cases = [c for s in shape_sets for c in build_cases(s, ops, formats)]
    bar = progress if progress is not None else Progress(len(cases) * len(dtypes) * len(instances))
    measured, skipped = [], []
    for case in cases:
        quantized = {}
        if case.op == "linear" and case.weight_format != "dense":
            N, K = case.params["N"], case.params["K"]
            if K % spec.QUANT_FORMATS[case.weight_format][0]:
                for dtype in dtypes:
                    for b in instances:
                        bar.step()
                        skipped.append(_skip(case, dtype, b, "unsupported",
                                             f"K={K} is not a multiple of the {case.weight_format} block size"))
                continue
            quantized[(N, K, case.weight_format)] = quant.quantize(torch.randn(N, K) * K ** -0.5, case.weight_format)
        for dtype in dtypes:
            flops, nbytes = cost(case, dtype)
            data = {}
            for b in instances:
                label = f"{case.shapes} {case.op}.{case.name} {case.phase} {spec.dtype_name(dtype)} {b.name}"
                bar.step(label)
                dev = b.device.type
                c = ceilings_start[dev]
                compute_s = flops / machine.roofline_peak(c, spec.dtype_name(dtype))
                try:
                    # an op compute-bound even at 8x its compulsory bytes (a backend holding 4-bit weights
                    # as fp32 moves 7x) is not sped up by a warm cache: one input set (one prepared weight)
                    # is enough; any other streams 2x the cache per pass
                    heavy = compute_s >= COMPUTE_BOUND_MARGIN * nbytes / c["copy"]["bytes_s"]
                    n_sets = 1 if heavy else input_sets(nbytes, c["cache_bytes"], max_input_sets)
                    if dev not in data:
                        data[dev] = _Data(case, dtype, b.device, n_sets, quantized)
                    fn, args = data[dev].call(b, c["cache_bytes"], max_input_sets)
                    stats = measure(fn, inputs=args, warmup=warmup, repeats=repeats, min_time_s=min_time_s,
                                    device=b.device)
                except UnsupportedOpError as exc:
                    skipped.append(_skip(case, dtype, b, "unsupported", str(exc)))
                    continue
                except Exception as exc:  # one broken kernel must not end a long run: recorded, reported
                    skipped.append(_skip(case, dtype, b, "error", f"{type(exc).__name__}: {exc}"))
                    if log:
                        log(f"error: {label}: {type(exc).__name__}: {exc}")
                    continue
                measured.append((case, dtype, b, len(args), stats))
            del data
    bar.close()
    ceilings_end = machine.measure_ceilings(devices, dtypes, matmul_n=matmul_n, copy_bytes=copy_bytes)
    doc["ceilings"] = machine.best_ceilings(ceilings_start, ceilings_end)
    doc["rows"] = derive_rows(measured, doc["ceilings"])
    doc["skipped"] = skipped
    doc["provenance"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["provenance"]["elapsed_s"] = time.perf_counter() - started
    above = [r for r in doc["rows"] if r["roofline_fraction"] > 1.05]
    if log and above:
        log(f"warning: {len(above)} measurements ran faster than this run's roofline floor (up to "
            f"{max(r['roofline_fraction'] for r in above):.2f}x): the backend beat torch's own matmul or copy (the "
            f"ceilings are torch's), the ceilings were measured low (load?), or the data stayed in cache "
            f"(input_sets in the JSON)")
    return doc


def derive_rows(measured, ceilings) -> list[dict]:
    """Rows with the derived figures: rates, the roofline floor and fraction, the speedup over
    the torch backend measured on the same case, dtype and device type."""
    baseline = {(_case_key(case), dtype, b.device.type): stats.median_s
                for case, dtype, b, _, stats in measured if b.name == "torch"}
    rows = []
    for case, dtype, b, n_sets, stats in measured:
        dev = b.device.type
        flops, nbytes = cost(case, dtype)
        peak = machine.roofline_peak(ceilings[dev], spec.dtype_name(dtype))
        bandwidth = ceilings[dev]["copy"]["bytes_s"]
        floor_s = max(flops / peak, nbytes / bandwidth)
        t = stats.median_s
        torch_s = baseline.get((_case_key(case), dtype, dev))
        rows.append({
            "shapes": case.shapes, "op": case.op, "case": case.name, "phase": case.phase,
            "shape": case.describe(), "params": dict(case.params), "dtype": spec.dtype_name(dtype),
            "weight_format": (spec.dtype_name(dtype) if case.weight_format == "dense" else case.weight_format)
            if case.op == "linear" else None,
            "backend": b.name, "device": str(b.device),
            "flops": flops, "bytes": nbytes,
            "median_s": t, "q1_s": stats.q1_s, "q3_s": stats.q3_s, "min_s": stats.min_s, "max_s": stats.max_s,
            "repeats": stats.repeats, "calls_per_repeat": stats.calls_per_repeat,
            "input_sets": n_sets, "input_footprint_bytes": n_sets * nbytes,
            "gflop_s": flops / t / 1e9 if flops else None,
            "gb_s": nbytes / t / 1e9,
            "floor_s": floor_s, "bound": "compute" if flops / peak >= nbytes / bandwidth else "memory",
            "roofline_fraction": floor_s / t,
            "speedup_vs_torch": _finite_or_none(torch_s / t) if torch_s is not None else None,
        })
    return rows


def _case_key(case):
    return (case.shapes, case.op, case.name, case.phase, case.weight_format, tuple(sorted(case.params.items())))


def _skip(case, dtype, backend, kind, reason):
    return {"shapes": case.shapes, "op": case.op, "case": case.name, "phase": case.phase, "shape": case.describe(),
            "dtype": spec.dtype_name(dtype), "weight_format": case.weight_format, "backend": backend.name,
            "device": str(backend.device), "kind": kind, "reason": reason}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
