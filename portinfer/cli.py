"""`portinfer ...`: each command lives in its own module, which exposes `register(subparsers)`
adding its parser with `set_defaults(func=...)`; `func(args)` returns the exit code.
Every command that prints a table also takes `--json`."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "portinfer.commands.backends",  # portinfer backends
    "portinfer.conformance.cli",  # portinfer check
    "portinfer.commands.generate",  # portinfer generate, portinfer chat
    "portinfer.commands.embed",  # portinfer embed
    "portinfer.commands.serve",  # portinfer serve
    "portinfer.bench.cli",  # portinfer bench ops
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portinfer", description="hardware-portable inference runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: a launcher reruns it per rank
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        # user-facing errors carry their own message: no traceback
        print(f"portinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
