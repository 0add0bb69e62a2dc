"""`portinfer backends [--json]`: every registered backend, its device, whether it is
available here (or why not), its protocol version, and its op x dtype x weight-format matrix."""
from __future__ import annotations

import json

from ..backends import registry, spec


def describe() -> list[dict]:
    rows = []
    for e in registry.entries():
        ok, reason = e.status()
        row = {"name": e.name, "origin": e.origin, "available": ok, "reason": reason,
               "protocol_version": e.protocol_version, "device": None, "ops": {}, "weight_formats": [], "info": {}}
        if ok:
            backend = e.cls()
            row["device"] = str(backend.device)
            row["info"] = backend.info()
            row["ops"] = {op: [spec.dtype_name(d) for d in spec.ACTIVATION_DTYPES if backend.supports(op, dtype=d)]
                          for op in spec.OPS}
            row["weight_formats"] = [f for f in spec.WEIGHT_FORMATS
                                     if backend.supports("linear", dtype=None, weight_format=f)]
            row["native_weight_formats"] = list(backend.native_weight_formats)
        rows.append(row)
    return rows


def format_table(rows) -> str:
    lines = [f"{'backend':<11} {'device':<7} {'proto':>5}  status"]
    for r in rows:
        status = "available" if r["available"] else f"unavailable: {r['reason']}"
        lines.append(f"{r['name']:<11} {str(r['device'] or '-'):<7} {str(r['protocol_version'] or '-'):>5}  {status}")
        if r["info"]:
            lines.append(" " * 27 + ", ".join(f"{k}={v}" for k, v in r["info"].items()))
    avail = [r for r in rows if r["available"]]
    if avail:
        width = max(16, *(len(r["name"]) + 2 for r in avail))
        lines.append("")
        lines.append("op support (activation dtypes):")
        lines.append(f"{'op':<12}" + "".join(f"{r['name']:<{width}}" for r in avail))
        for op in spec.OPS:
            lines.append(f"{op:<12}" + "".join(f"{','.join(r['ops'][op]) or '-':<{width}}" for r in avail))
        lines.append("")
        lines.append("linear weight formats (* = computed natively, others dequantized once at prepare time):")
        for r in avail:
            formats = " ".join(f + ("*" if f in r["native_weight_formats"] else "") for f in r["weight_formats"])
            lines.append(f"  {r['name']:<12}{formats}")
    return "\n".join(lines)


def run(args) -> int:
    rows = describe()
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def register(sub):
    p = sub.add_parser("backends", help="list backends, availability and op support")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
