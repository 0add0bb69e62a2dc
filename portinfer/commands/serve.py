"""`portinfer serve [MODEL]`: an OpenAI-compatible server (FastAPI on uvicorn) over one engine loop.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models, /health,
/metrics (Prometheus). Continuous batching: up to --max-batch sequences share one KV cache of
--max-context positions per slot; more wait in a queue of --max-queue (then 429).
"""
from __future__ import annotations

import os
import sys

SERVE_MODULES = ("fastapi", "uvicorn", "pydantic", "prometheus_client")


def _check_extra():
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"portinfer serve needs {', '.join(missing)}: pip install \"portinfer[serve]\"")


def run_serve(args) -> int:
    _check_extra()
    import uvicorn

    import portinfer
    from ..serve.app import create_app

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--port", args.port, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1)):
        if value < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, got {value}")
    options = {} if args.plans is None else {"plans": args.plans}
    if args.kv_cache_dtype is not None:
        options["kv_cache_dtype"] = args.kv_cache_dtype
    if args.tensor_parallel is not None:  # rank 0 serves; the other ranks follow its steps inside load()
        from ..runtime import parallel
        from ..runtime.loader import default_model_path

        if parallel.launched_rank() is None:  # not under torchrun: check the split, then launch the ranks here
            parallel.check_split(args.model or default_model_path(), args.tensor_parallel)
            return parallel.launch(["-m", "portinfer.cli", *args.argv], args.tensor_parallel)
        options["tensor_parallel"] = args.tensor_parallel
    model = portinfer.load(args.model, backend=args.backend, dtype=args.dtype, fallback=args.fallback, **options)
    api_key = args.api_key or os.environ.get("PORTINFER_API_KEY") or None
    app = create_app(model, served_model_name=args.served_model_name, api_key=api_key, max_batch=args.max_batch,
                     max_context=args.max_context, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    name = args.served_model_name or model.name
    print(f"portinfer serve: {name} on {model.backend} ({model.device}), {args.max_batch} slots; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # SIGTERM/SIGINT: uvicorn stops accepting, lets running requests finish for --graceful-s
    # seconds (then cancels them), and the engine loop ends after them
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_s)
    return 0


def register(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument("model", nargs="?", help="Hugging Face model directory or .gguf file (default: the embedded "
                                            "SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="auto", help="backend name, or cpu[int8] / cpu[fp32] / cpu[int8-all] for the cpu backend's quant route (see `portinfer backends`)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="activation dtype (default: the backend's)")
    p.add_argument("--kv-cache-dtype", choices=("fp32", "fp16", "bf16"),
                   help="the KV cache's dtype (default: the activations'); fp16 halves its memory and what "
                        "attention reads per step (docs/kv-cache.md)")
    p.add_argument("--fallback", choices=("allow", "warn", "error"), default="warn")
    p.add_argument("--max-batch", type=int, default=8, help="slots: sequences decoded together (default 8)")
    p.add_argument("--max-context", type=int, help="positions per slot: prompt + completion (default: "
                                                   "the model's context, at most 2048)")
    p.add_argument("--max-queue", type=int, help="sequences waiting for a slot before 429 (default 4 x max-batch)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens read per step (default 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or PORTINFER_API_KEY)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the model's own)")
    p.add_argument("--plans", dest="plans", action="store_true", default=None, help="run steps through plans")
    p.add_argument("--no-plans", dest="plans", action="store_false", help="run every step on the op path")
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="split the model over N ranks on this host (launched here; rank 0 runs the server)")
    p.add_argument("--graceful-s", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are cancelled")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)
