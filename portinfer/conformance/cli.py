"""`portinfer check --backend NAME [--ops ...] [--dtypes ...] [--json]`: the conformance table;
exit status 1 when any op fails."""
from __future__ import annotations

import sys

from ..backends import spec
from . import check
from .cases import LINEAR_VARIANTS, PROFILES


def run(args) -> int:
    def progress(op, variant, dtype):
        if not args.json and sys.stderr.isatty():
            label = f"{op}[{variant}]" if variant and variant != "dense" else op
            print(f"\r  checking {label} {spec.dtype_name(dtype)}...".ljust(48), end="", file=sys.stderr, flush=True)

    results = check(args.backend, ops=args.ops, dtypes=args.dtypes, weight_formats=args.weight_formats,
                    max_examples=args.max_examples, seed=args.seed, profile=args.profile, progress=progress)
    if not args.json and sys.stderr.isatty():
        print("\r".ljust(49) + "\r", end="", file=sys.stderr)
    print(results.to_json() if args.json else results.table(verbose=args.verbose))
    return 0 if results.passed else 1


def register(sub):
    p = sub.add_parser("check", help="run the conformance suite on a backend against the float64 reference")
    p.add_argument("--backend", required=True, help="backend name (see `portinfer backends`)")
    p.add_argument("--ops", nargs="+", choices=spec.OPS, metavar="OP", help=f"ops to check (default all: {' '.join(spec.OPS)})")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16", "bf16"), help="activation dtypes (default all)")
    p.add_argument("--weight-formats", nargs="+", choices=LINEAR_VARIANTS, help="linear weight formats (default all)")
    p.add_argument("--max-examples", type=int, help="hypothesis examples per op and dtype")
    p.add_argument("--seed", type=int, help="hypothesis seed (printed; rerun with it to reproduce)")
    p.add_argument("--profile", choices=PROFILES, help="case sizes (default: the backend's own profile)")
    p.add_argument("--verbose", action="store_true", help="print cases in full")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
