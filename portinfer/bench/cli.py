"""`portinfer bench ops ...`: the op benchmark (see ops.py); `bench` takes its subcommands from
SUBCOMMANDS, one function each that adds a parser to the `bench` subparsers (a `model`
subcommand is one more function there)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import ops, report
from .embed import add_embed
from .model import add_model
from .serve import add_serve
from .shapes import SHAPE_SETS, parse_shapes, with_lengths

DEFAULT_SHAPES = ("smollm2-135m",)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def ops_command(args) -> str:
    """The run as one explicit command line (every default spelled out), for its provenance."""
    parts = ["portinfer", "bench", "ops", "--backends", *args.backends] if args.backends else \
        ["portinfer", "bench", "ops"]
    parts += ["--shapes", *args.shapes, "--ops", *args.ops, "--dtypes", *args.dtypes, "--formats", *args.formats,
              "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--min-time-s", str(args.min_time_s),
              "--max-input-sets", str(args.max_input_sets)]
    for flag, value in (("--threads", args.threads), ("--tokens", args.tokens), ("--context", args.context),
                        ("--matmul-n", args.matmul_n), ("--copy-mib", args.copy_mib), ("--json", args.json),
                        ("--csv", args.csv), ("--plot", args.plot)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def require_matplotlib():
    """--plot needs matplotlib (the `bench` extra): checked before the benchmark runs, not after it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot: matplotlib is not installed; install the bench extra "
                         "(pip install 'portinfer[bench]') or leave out --plot")


def run_ops(args) -> int:
    shape_sets = [with_lengths(parse_shapes(s), args.tokens, args.context) for s in args.shapes]
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            # checked before the run, not after minutes of timing
            raise ValueError(f"{flag}: the folder of {path} does not exist; create it or name another file")
    if args.plot is not None:
        require_matplotlib()
    doc = ops.run_ops(args.backends, shape_sets, ops=args.ops, dtypes=args.dtypes, formats=args.formats,
                      repeats=args.repeats, warmup=args.warmup, min_time_s=args.min_time_s,
                      max_input_sets=args.max_input_sets, threads=args.threads, matmul_n=args.matmul_n,
                      copy_bytes=args.copy_mib * 2 ** 20 if args.copy_mib else None, command=ops_command(args),
                      log=lambda msg: print(msg, file=sys.stderr))
    print(report.format_table(doc))
    written = []
    if args.json:
        report.write_json(doc, args.json)
        written.append(args.json)
    if args.csv:
        report.write_csv(doc, args.csv)
        written.append(args.csv)
    if args.plot:
        report.plot_roofline(doc, args.plot)
        speedup = report.speedup_plot_path(args.plot)
        report.plot_speedup(doc, speedup)
        written += [args.plot, str(speedup)]
    if written:
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 1 if any(s["kind"] == "error" for s in doc["skipped"]) else 0


def add_ops(bench_sub):
    p = bench_sub.add_parser(
        "ops", help="time every op on every backend against this machine's ceilings",
        description="Time every op x shape x dtype x backend: median and spread, GFLOP/s, GB/s, the roofline "
                    "floor max(flops/peak, bytes/bandwidth) from ceilings measured in the same run, the fraction "
                    "of it reached, and the speedup over the torch backend on the same device.")
    p.add_argument("--backends", nargs="+", metavar="NAME[:DEVICE]",
                   help="backends to time (default: every available one except reference and those auto never "
                        "picks, such as triton under its interpreter); torch is always timed as the baseline")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="SET",
                   help=f"shape sets: {', '.join(SHAPE_SETS)} or custom:hidden=H,intermediate=I,heads=Hq,"
                        f"kv_heads=Hkv,head_dim=D,vocab=V (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--ops", nargs="+", default=list(ops.BENCH_OPS), choices=ops.BENCH_OPS, metavar="OP",
                   help=f"ops (default all: {' '.join(ops.BENCH_OPS)})")
    p.add_argument("--dtypes", nargs="+", default=list(ops.DEFAULT_DTYPES), choices=("fp32", "fp16", "bf16"),
                   help=f"activation dtypes (default: {' '.join(ops.DEFAULT_DTYPES)})")
    p.add_argument("--formats", nargs="+", default=list(ops.LINEAR_FORMATS), choices=ops.LINEAR_FORMATS,
                   help="linear weight formats: dense (the activation dtype) and GGUF blocks (default all)")
    p.add_argument("--tokens", type=_positive_int, help="prefill length (default: the shape set's, 128)")
    p.add_argument("--context", type=_positive_int, help="decode KV-cache length (default: the shape set's, 1024)")
    p.add_argument("--threads", type=_positive_int,
                   help="threads: torch's intra-op threads (torch.set_num_threads) and those of every backend with "
                        "a set_num_threads method, such as cpu (default: each one's own choice)")
    p.add_argument("--repeats", type=_positive_int, default=10, help="timed repeats per measurement (default 10)")
    p.add_argument("--warmup", type=_positive_int, default=2, help="warm-up calls, at least (default 2)")
    p.add_argument("--min-time-s", type=_nonnegative_float, default=0.1,
                   help="time the repeats of one measurement take together, at least (default 0.1)")
    p.add_argument("--max-input-sets", type=_positive_int, default=ops.MAX_INPUT_SETS,
                   help="rotating input sets per measurement, at most (default %(default)s; enough sets to stream "
                        "2x the last-level cache are used up to this)")
    p.add_argument("--matmul-n", type=_positive_int, help="n of the n^3 matmul ceiling (default 2048 CPU, 8192 GPU)")
    p.add_argument("--copy-mib", type=_positive_int,
                   help="size of the copied tensor for the bandwidth ceiling (default 4x the cache, >= 256 MiB CPU; 1 GiB GPU)")
    p.add_argument("--json", metavar="FILE", help="write the results (provenance, ceilings, rows) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per measurement")
    p.add_argument("--plot", metavar="FILE.png", help="write the roofline plot there and the speedup chart "
                                                      "next to it (FILE-speedup.png)")
    p.set_defaults(func=run_ops)


# each adds one `portinfer bench` subcommand
SUBCOMMANDS = [add_ops, add_model, add_serve, add_embed]


def register(sub):
    p = sub.add_parser("bench", help="benchmarks: ops against the machine's ceilings",
                       description="Benchmarks. Absolute times hold on the machine that produced them; "
                                   "compare ratios measured side by side in one run.")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    bench_sub.required = True
    for add in SUBCOMMANDS:
        add(bench_sub)
