"""Reporting a bench run: the stdout table, JSON, CSV and the two plots (roofline, speedup)."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

CSV_FIELDS = ("shapes", "op", "case", "phase", "shape", "dtype", "weight_format", "backend", "device", "flops",
              "bytes", "median_s", "q1_s", "q3_s", "min_s", "max_s", "repeats", "calls_per_repeat", "input_sets",
              "input_footprint_bytes", "gflop_s", "gb_s", "floor_s", "bound", "roofline_fraction", "speedup_vs_torch")


def format_time(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def describe_ceilings(ceilings) -> list[str]:
    lines = []
    for device, c in ceilings.items():
        peaks = ", ".join(f"{d} {m['flop_s'] / 1e9:.4g} GFLOP/s (n={m['n']})" for d, m in c["matmul"].items())
        copy = c["copy"]
        lines.append(f"  {device}: matmul {peaks}; copy {copy['bytes_s'] / 1e9:.4g} GB/s "
                     f"({copy['tensor_bytes'] / 2 ** 20:.0f} MiB tensor); last-level cache {c['cache_bytes'] / 2 ** 20:.0f} MiB")
    return lines


def describe_provenance(p) -> str:
    gpu = f", gpu {p['gpu']['name']}" if p.get("gpu") else ""
    commit = (p.get("git_commit") or "?")[:10] + ("+dirty" if p.get("git_dirty") else "")
    load = ", ".join(f"{x:.2f}" for x in (p.get("load_avg_start") or []))
    return (f"{p['date']}  cpu {p['cpu']} ({p['cpus_usable']} usable, {p['threads']} torch threads){gpu}  "
            f"torch {p['torch']}  triton {p.get('triton') or '-'}  commit {commit}  load avg {load}")


def format_table(doc) -> str:
    lines = [f"portinfer bench ops  {describe_provenance(doc['provenance'])}",
             f"command: {doc['provenance']['command']}", "ceilings (best repeat, better of the runs before and after the ops):"]
    lines += describe_ceilings(doc["ceilings"])
    header = (f"{'op':<18} {'phase':<7} {'shape':<34} {'dtype':<5} {'weights':<7} {'backend':<10} {'device':<6} {'median':>9} "
              f"{'IQR':>8} {'GFLOP/s':>8} {'GB/s':>7} {'floor':>9} {'roof%':>6} {'x torch':>7}")
    current = None
    for r in doc["rows"]:
        if r["shapes"] != current:
            current = r["shapes"]
            lines += ["", f"[{current}]", header]
        lines.append(
            f"{r['op'] + ('.' + r['case'] if r['case'] != r['op'] else ''):<18} {r['phase']:<7} {r['shape']:<34} "
            f"{r['dtype']:<5} {r['weight_format'] or '-':<7} {r['backend']:<10} {r['device']:<6} {format_time(r['median_s']):>9} "
            f"{format_time(r['q3_s'] - r['q1_s']):>8} {_num(r['gflop_s']):>8} {_num(r['gb_s']):>7} "
            f"{format_time(r['floor_s']):>9} {_num(100 * r['roofline_fraction'], '{:.1f}'):>6} "
            f"{_num(r['speedup_vs_torch'], '{:.2f}'):>7}")
    unsupported = [s for s in doc["skipped"] if s["kind"] == "unsupported"]
    errors = [s for s in doc["skipped"] if s["kind"] == "error"]
    if unsupported:
        lines += ["", f"not run ({len(unsupported)}, the backend does not support them): "
                  + "; ".join(sorted({f"{s['backend']} {s['op']} {s['dtype']}" for s in unsupported}))]
    for s in errors:
        lines.append(f"ERROR {s['backend']} {s['op']}.{s['case']} {s['phase']} {s['dtype']}: {s['reason']}")
    p = doc["provenance"]
    lines.append(f"\n{len(doc['rows'])} measurements in {p['elapsed_s']:.0f} s; load avg at the end "
                 + ", ".join(f"{x:.2f}" for x in (p.get("load_avg_end") or [])))
    return "\n".join(lines)


def write_json(doc, path):
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_csv(doc, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in doc["rows"]:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


# ----------------------------------------------------------------------------------------------
# plots

_MARKERS = {"linear": "o", "attention": "s", "rms_norm": "^", "layer_norm": "v", "rope": "D", "silu_mul": "P",
            "gelu": "X", "embedding": "*"}


def _caption(doc, width=170) -> str:
    import textwrap
    p = doc["provenance"]
    return "\n".join(textwrap.wrap(p["command"], width) + textwrap.wrap(describe_provenance(p), width))


def speedup_plot_path(path) -> Path:
    """Where --plot F.png puts the speedup chart: F-speedup.png next to the roofline F.png."""
    path = Path(path)
    return path.with_name(path.stem + "-speedup" + (path.suffix or ".png"))


def plot_roofline(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(doc["ceilings"])
    fig, axes = plt.subplots(1, len(devices), figsize=(11 * len(devices), 6.5), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in doc["rows"]))  # run order: torch first
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    for ax, device in zip(axes[0], devices):
        c = doc["ceilings"][device]
        bandwidth = c["copy"]["bytes_s"]
        rows = [r for r in doc["rows"] if r["device"].split(":")[0] == device and r["flops"] > 0]
        intensities = [r["flops"] / r["bytes"] for r in rows] or [1.0]
        lo, hi = min(intensities) / 2, max(max(intensities) * 2, 4 * max(m["flop_s"] for m in c["matmul"].values()) / bandwidth)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        for k, (dtype, m) in enumerate(c["matmul"].items()):
            ys = [min(m["flop_s"], x * bandwidth) / 1e9 for x in xs]
            ax.plot(xs, ys, color="black", linestyle=("-", "--", ":")[k % 3], linewidth=1,
                    label=f"roof: {dtype} matmul {m['flop_s'] / 1e9:.0f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
        for r in rows:
            ax.scatter(r["flops"] / r["bytes"], r["gflop_s"], color=colors[r["backend"]], marker=_MARKERS.get(r["op"], "o"),
                       s=28, alpha=0.75, edgecolors="none")
        for b in backends:
            ax.scatter([], [], color=colors[b], marker="o", label=f"backend {b}")
        for op in sorted({r["op"] for r in rows}):
            ax.scatter([], [], color="gray", marker=_MARKERS.get(op, "o"), label=op)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (flop / byte, op's compulsory bytes)")
        ax.set_ylabel("GFLOP/s (median)")
        ax.set_title(f"roofline on {c.get('name', doc['provenance']['cpu'] if device == 'cpu' else device)} ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.005, _caption(doc, 150) + "\n(embedding does no arithmetic: not on this plot)", fontsize=6,
             va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def speedup_groups(doc):
    """{group label: {backend: [speedups], ...}} and the same for roofline fractions; groups are
    op (+ weight format for quantized linears) x phase, in run order."""
    speedups, fractions, order = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list)), []
    for r in doc["rows"]:
        fmt = r["weight_format"] if r["op"] == "linear" and r["weight_format"] not in ("fp32", "fp16", "bf16") else ""
        label = f"{r['op']}{' ' + fmt if fmt else ''}\n{r['phase']}"
        if label not in order:
            order.append(label)
        backend = f"{r['backend']} ({r['device']})"
        speedups[label][backend].append(r["speedup_vs_torch"])
        fractions[label][backend].append(r["roofline_fraction"])
    return order, speedups, fractions


def plot_speedup(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, speedups, fractions = speedup_groups(doc)
    backends = list(dict.fromkeys(b for label in order for b in speedups[label]))  # run order: torch first
    width_in = min(18, max(10, 0.35 * len(order) * max(1, len(backends)) + 2))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width_in, 8.5), sharex=True)
    width = 0.8 / max(1, len(backends))
    for panel, data, ylabel in ((top, speedups, "speedup vs torch (geometric mean)"),
                                (bottom, fractions, "fraction of roofline reached (geometric mean)")):
        for i, b in enumerate(backends):
            xs, ys, lo, hi = [], [], [], []
            for g, label in enumerate(order):
                values = [v for v in data[label].get(b, []) if v is not None]
                mean = _geomean(values)
                if mean is None:
                    continue
                xs.append(g + (i - (len(backends) - 1) / 2) * width)
                ys.append(mean)
                lo.append(mean - min(values))
                hi.append(max(values) - mean)
            panel.bar(xs, ys, width=width, color=f"C{i}", label=b, yerr=[lo, hi], capsize=2, error_kw={"linewidth": 0.8})
        panel.set_ylabel(ylabel)
        panel.set_yscale("log")
        panel.grid(True, axis="y", which="both", alpha=0.3)
    top.axhline(1.0, color="black", linewidth=0.8)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    top.legend(fontsize=8)
    top.set_title("per-op speedup over the torch backend and fraction of the roofline (bars: min..max over shapes and dtypes)")
    bottom.set_xticks(range(len(order)))
    bottom.set_xticklabels(order, fontsize=7, rotation=60, ha="right")
    fig.text(0.01, 0.005, _caption(doc), fontsize=6, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
