"""Two builds of the cpu backend's linear, timed in one process, turn by turn.

On a noisy machine (this project's 2-vCPU VMs move 20-50% between runs minutes apart) a kernel
change is only visible when both builds run under the same conditions: this script loads the
`portinfer/_cpu*.so` of two directories side by side and alternates them, many short turns each,
keeping each build's best turn. Every pair of outputs is compared, so a faster build that computes
something else fails loudly.

    git worktree add /tmp/base HEAD~1 && (cd /tmp/base && python setup.py build_ext --inplace)
    python setup.py build_ext --inplace
    python bench/kernel_ab.py /tmp/base . --route int8 --format q4_1 --rows 1 4 8

Shapes default to SmolLM2-135M's linears (N x K). Weights: random, quantized with the gguf package;
each shape is held `--copies` times (2: in cache; 40+: streamed from memory).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from portinfer.backends import spec  # noqa: E402
from portinfer.backends.cpu import _DTYPE_CODE, _INT8_FORMATS, _WEIGHT_CODE, _buf  # noqa: E402
from portinfer.backends.cpu import PANEL as _PANEL  # noqa: E402
from portinfer.bench.machine import provenance  # noqa: E402


def load_build(directory: str, tag: str):
    """The extension built in `directory`, loaded from a private copy: a shared object is loaded once per
    file, so the same build twice (or the build this script's own imports already loaded) must be two
    files to be two modules."""
    import shutil
    import tempfile

    found = sorted(glob.glob(os.path.join(directory, "portinfer", "_cpu*.so")))
    if not found:
        raise SystemExit(f"{directory}: no portinfer/_cpu*.so (build it there: python setup.py build_ext --inplace)")
    copy = os.path.join(tempfile.mkdtemp(prefix=f"kernel_ab_{tag}_"), os.path.basename(found[0]))
    shutil.copy(found[0], copy)
    spec = importlib.util.spec_from_file_location(f"{tag}._cpu", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DENSE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}  # fp32 route only: packed panels


def blocks_for(n, k, fmt, seed):
    """The weight as stored: GGUF blocks [N][...] of a block format, or the dense [N][K] tensor."""
    from portinfer.backends import quant

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt in DENSE:
        return w.to(DENSE[fmt])
    return quant.quantize(w, fmt).blocks.reshape(n, -1).contiguous()


def prepared(mod, route, fmt, blocks, n, k):
    """The payload `linear` reads on this route: the int8 route's repacked panels of 16 rows (builds before
    2026-12-02 night: groups of 4) or the GGUF blocks (fp32)."""
    if route == "fp32" and fmt in DENSE:  # panels of 32 output features, k-major (CpuBackend._prepare_linear)
        packed = torch.zeros((n + _PANEL - 1) // _PANEL, k, _PANEL, dtype=blocks.dtype)
        mod.pack_dense(_buf(packed), _buf(blocks), n, k, blocks.stride(0), blocks.element_size())
        return packed
    if route == "fp32":
        return blocks.clone()
    code = _INT8_FORMATS[fmt]
    if hasattr(mod, "int8_panel_bytes"):
        size = ((n + 15) // 16) * mod.int8_panel_bytes(code, k)
    else:
        size = ((n + 3) // 4) * mod.int8_group_bytes(code, k)
    packed = torch.empty(size, dtype=torch.uint8)
    mod.int8_repack(_buf(packed), _buf(blocks), n, k, code)
    return packed


def call(mod, route, fmt, out, x, payload, m, n, k):
    adt = _DTYPE_CODE[x.dtype]
    if route == "int8":  # every row count on the int8 kernels (mode 2, the cpu[int8-all] route)
        args = (_buf(out), _buf(x), _buf(payload), _buf(None), m, n, k, k, adt, _INT8_FORMATS[fmt])
        try:
            mod.linear_int8(*args, 2)
        except TypeError:  # a build from before the int8 modes: more than 16 rows there take fp32 activations
            mod.linear_int8(*args)
    else:
        code = _WEIGHT_CODE[spec.dtype_name(DENSE[fmt])] if fmt in DENSE else _WEIGHT_CODE[fmt]
        mod.linear(_buf(out), _buf(x), _buf(payload), _buf(None), m, n, k, k, adt, code)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_a", help="directory with a built portinfer/_cpu*.so (the baseline)")
    p.add_argument("build_b", help="directory with a built portinfer/_cpu*.so (the change)")
    p.add_argument("--route", choices=("int8", "fp32"), default="int8")
    p.add_argument("--format", default="q4_1", choices=("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k") + tuple(DENSE),
                   help="K-quants: K a multiple of 256, int8 route only; f32 / f16 / bf16: fp32 route only")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8], help="rows of x (M)")
    p.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536", "576x576"], help="N x K")
    p.add_argument("--act", choices=("fp32", "bf16"), default="fp32",
                   help="activations' dtype (bf16 with bf16 weights: the avx512bf16 table's bf16 GEMM past the GEMV)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--int8-path", help="the int8 path of both builds (default: the best this CPU has)")
    p.add_argument("--copies", type=int, default=2, help="weight copies per shape (2: in cache; 40+: from memory)")
    p.add_argument("--turns", type=int, default=12, help="turns per build (each ~3 MMAC of calls)")
    p.add_argument("--json", help="write the rows with provenance here")
    args = p.parse_args(argv)
    mods = [load_build(args.build_a, "a"), load_build(args.build_b, "b")]
    for mod in mods:
        mod.set_num_threads(args.threads)
        if args.int8_path:
            mod.set_int8_path(args.int8_path)
    if args.format in DENSE and args.route != "fp32":
        raise SystemExit(f"--format {args.format}: dense weights have no int8 route (use --route fp32)")
    rows = []
    for i, shape in enumerate(args.shapes):
        n, k = (int(v) for v in shape.lower().split("x"))
        blocks = blocks_for(n, k, args.format, seed=i)
        payloads = [[prepared(mod, args.route, args.format, blocks, n, k) for _ in range(args.copies)] for mod in mods]
        for m in args.rows:
            act = torch.bfloat16 if args.act == "bf16" else torch.float32
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + i)).to(act)
            outs = [torch.empty(m, n, dtype=act), torch.empty(m, n, dtype=act)]
            reps = max(1, int(3e6 / (m * n * k * args.copies)))
            best = [float("inf"), float("inf")]
            for _ in range(args.turns):
                for j, mod in enumerate(mods):
                    t = time.perf_counter()
                    for _ in range(reps):
                        for payload in payloads[j]:
                            call(mod, args.route, args.format, outs[j], x, payload, m, n, k)
                    best[j] = min(best[j], (time.perf_counter() - t) / (reps * args.copies))
            tol = 1e-2 if args.act == "bf16" else 1e-4  # two bf16 kernels round their fp32 sums once each
            if not torch.allclose(outs[0].float(), outs[1].float(), rtol=tol, atol=tol * float(outs[0].abs().max())):
                raise SystemExit(f"{shape} M={m}: the builds disagree (max |diff| "
                                 f"{float((outs[0] - outs[1]).abs().max()):.3g})")
            gmac = [m * n * k / b / 1e9 for b in best]
            row = {"n": n, "k": k, "m": m, "us_a": best[0] * 1e6, "us_b": best[1] * 1e6, "gmac_s_a": gmac[0],
                   "gmac_s_b": gmac[1], "b_over_a": best[0] / best[1]}
            rows.append(row)
            print(f"{args.route} {args.format} x:{args.act} {n}x{k} M={m:<3d} threads={args.threads}: A {gmac[0]:6.1f}  "
                  f"B {gmac[1]:6.1f} GMAC/s  B/A {row['b_over_a']:.2f}", flush=True)
    if args.json:
        doc = {"provenance": provenance("python bench/kernel_ab.py " + " ".join(argv or sys.argv[1:])),
               "builds": [os.path.abspath(args.build_a), os.path.abspath(args.build_b)], "route": args.route,
               "format": args.format, "act": args.act, "threads": args.threads, "copies": args.copies,
               "int8_path": args.int8_path or mods[1].get_int8_path(), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
