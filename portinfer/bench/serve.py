"""`portinfer bench serve [MODEL]`: a load generator for `portinfer serve`.

At each concurrency level c (default 1, 4, 16, 64), c clients each send streaming completion
requests back to back (a fixed prompt of about --prompt-tokens tokens, exactly --max-tokens
generated: ignore_eos) until --requests-per-client x c requests (at least 4) are done. Per level:
aggregate generated tokens/s over the level's wall time, time to first token (TTFT) and the gaps
between streamed chunks (inter-token latency) at p50/p99, and errors. With one request per client
a level is a single burst (every prompt read at once, then every stream decoded in lockstep); the
default of 3 lets later requests arrive while others decode, as a service's load does. With
--rounds R every level runs R times, in turn (1, 4, 16, 64, 1, 4, ...): a level's throughput is its
median round's, its latency percentiles are over every round's samples, and the c=16 / c=1 ratio is
the median of the rounds' own ratios, each from two levels run a minute apart at most (this
project's machines drift 20-50% between minutes).

The server runs in its own process (started here with the given flags, or --url for one already
running), so the load generator and the engine loop do not share an interpreter lock.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

from .machine import provenance

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings near "
         "old rivers and tall mountains under bright stars").split()


def _percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _one(http, body):
    """One streamed request -> (ttft_s, [chunk gaps], generated tokens) or an error string."""
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return chunk["error"]["message"]
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, gaps, tokens


def _wait_for_idle_builds(url, timeout_s=300):
    """Until a portinfer server's /health says no step plans are left to build while idle (other
    servers do not say: no wait)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = httpx.get(url + "/health", timeout=10).json().get("plans_to_build", 0)
        if not left:
            return
        time.sleep(0.2)


async def run_level(url, concurrency, requests, body, timeout_s=600):
    import httpx

    done, results = [0], []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        async def client():
            while done[0] < requests:
                done[0] += 1
                results.append(await _one(http, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall_s = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, str)]
    errors = [r for r in results if isinstance(r, str)]
    ttft = [r[0] for r in ok if r[0] is not None]
    gaps = [g for r in ok for g in r[1]]
    tokens = sum(r[2] for r in ok)
    level = {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
             "first_error": errors[0] if errors else None, "generated_tokens": tokens, "wall_s": wall_s,
             "throughput_tok_s": tokens / wall_s if wall_s > 0 else None}
    level.update(_latencies(ttft, gaps))
    return level


def _latencies(ttft, gaps) -> dict:
    return {"ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "itl_p50_s": _percentile(gaps, 0.5), "itl_p99_s": _percentile(gaps, 0.99),
            "itl_mean_s": statistics.fmean(gaps) if gaps else None, "_ttft": ttft, "_gaps": gaps}


def combine_rounds(rounds: list) -> dict:
    """One level's runs (one per round) -> the level: counts summed, throughput the median round's,
    latency percentiles over every round's samples, each round's throughput kept."""
    rates = [lv["throughput_tok_s"] for lv in rounds]
    level = {"concurrency": rounds[0]["concurrency"], "requests": sum(lv["requests"] for lv in rounds),
             "errors": sum(lv["errors"] for lv in rounds),
             "first_error": next((lv["first_error"] for lv in rounds if lv["first_error"]), None),
             "generated_tokens": sum(lv["generated_tokens"] for lv in rounds),
             "wall_s": sum(lv["wall_s"] for lv in rounds),
             "throughput_tok_s": statistics.median(r for r in rates if r is not None) if any(rates) else None,
             "throughput_tok_s_each_round": rates}
    level.update(_latencies([t for lv in rounds for t in lv["_ttft"]], [g for lv in rounds for g in lv["_gaps"]]))
    level["load_avg"] = rounds[-1].get("load_avg")
    return level


def _public(level: dict) -> dict:
    return {k: v for k, v in level.items() if not k.startswith("_")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args):
    port = _free_port()
    cmd = [sys.executable, "-m", "portinfer.cli", "serve", *([args.model] if args.model else []), "--port", str(port),
           "--backend", args.backend, "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
           "--max-queue", str(max(4 * args.max_batch, max(args.concurrency))), "--log-level", "warning",
           *(["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, cmd
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def bench_command(args) -> str:
    parts = ["portinfer", "bench", "serve", *([args.model] if args.model else []), "--backend", args.backend,
             "--concurrency", *map(str, args.concurrency), "--prompt-tokens", str(args.prompt_tokens),
             "--max-tokens", str(args.max_tokens), "--requests-per-client", str(args.requests_per_client),
             "--rounds", str(args.rounds), "--max-batch", str(args.max_batch), "--max-context", str(args.max_context)]
    for flag, value in (("--kv-cache-dtype", args.kv_cache_dtype), ("--url", args.url), ("--json", args.json),
                        ("--plot", args.plot)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run(args) -> int:
    if (any(c < 1 for c in args.concurrency) or args.max_tokens < 1 or args.prompt_tokens < 1
            or args.requests_per_client < 1 or args.rounds < 1):
        raise ValueError("--concurrency, --max-tokens, --prompt-tokens, --requests-per-client, --rounds: "
                         "expected integers >= 1")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path} does not exist")
    if args.plot:
        import matplotlib  # noqa: F401 - checked before the run, not after it (pip install "portinfer[bench]")
    doc = {"provenance": provenance(bench_command(args)), "levels": []}
    proc, runs = None, {c: [] for c in args.concurrency}
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url, server_cmd = _start_server(args)
        doc["server_command"] = shlex.join(server_cmd)
    try:
        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_tokens))
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        # warm-up: first-use costs (step plans traced per shape class, allocations) stay out of the figures:
        # the server's own idle builds first (portinfer's /health counts them down), then a burst and one
        _wait_for_idle_builds(url)
        warm = min(max(args.concurrency), args.max_batch)
        asyncio.run(run_level(url, warm, warm, {**body, "max_tokens": 4}))
        asyncio.run(run_level(url, 1, 1, {**body, "max_tokens": 4}))
        for r in range(args.rounds):  # every level once per round: levels compared are minutes apart at most
            for c in args.concurrency:
                level = asyncio.run(run_level(url, c, max(4, args.requests_per_client * c), body))
                level["load_avg"] = list(os.getloadavg())
                runs[c].append(level)
                print(_row(level) + (f" round {r + 1}" if args.rounds > 1 else ""), file=sys.stderr, flush=True)
        doc["levels"] = [_public(combine_rounds(runs[c])) for c in args.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if 1 in runs and 16 in runs:
        # the ratio of the two levels within each round (side by side), then the median round's
        each = [c16["throughput_tok_s"] / c1["throughput_tok_s"] for c1, c16 in zip(runs[1], runs[16])
                if c1["throughput_tok_s"] and c16["throughput_tok_s"]]
        if each:
            doc["throughput_16_over_1"] = statistics.median(each)
            doc["throughput_16_over_1_each_round"] = each
    doc["load_avg_end"] = list(os.getloadavg())
    print(format_table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if args.plot:
        plot(doc, args.plot)
    return 1 if any(lv["errors"] for lv in doc["levels"]) else 0


def _ms(x):
    return "-" if x is None else f"{1000 * x:.1f}"


def _row(lv):
    return (f"| {lv['concurrency']:>4} | {lv['requests']:>5} | {lv['throughput_tok_s']:>8.1f} | "
            f"{_ms(lv['ttft_p50_s']):>8} | {_ms(lv['ttft_p99_s']):>8} | {_ms(lv['itl_p50_s']):>7} | "
            f"{_ms(lv['itl_p99_s']):>7} | {lv['errors']} |")


def format_table(doc) -> str:
    lines = ["| conc | reqs  | tok/s    | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors |",
             "|------|-------|----------|----------|----------|---------|---------|--------|"]
    lines += [_row(lv) for lv in doc["levels"]]
    if "throughput_16_over_1" in doc:
        each = doc.get("throughput_16_over_1_each_round", [])
        lines.append(f"aggregate tokens/s at concurrency 16 / concurrency 1: {doc['throughput_16_over_1']:.2f}x"
                     + (f" (median of {len(each)} rounds: {', '.join(f'{x:.2f}' for x in each)})" if len(each) > 1
                        else ""))
    lines.append(f"(times in ms; load average at start {doc['provenance']['load_avg_start']}, "
                 f"end {doc['load_avg_end']})")
    return "\n".join(lines)


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = doc["levels"]
    c = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [lv["throughput_tok_s"] for lv in levels], "o-")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s (all clients)",
          title="throughput")
    a.set_xticks(c, [str(x) for x in c])
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p50_s", "s-"), ("itl_p99_s", "s--")):
        b.plot(c, [1000 * (lv[key] or float("nan")) for lv in levels], style, label=key.replace("_s", ""))
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    b.set_xticks(c, [str(x) for x in c])
    b.legend()
    import textwrap

    title = textwrap.fill(doc['provenance']['command'], 170)  # long commands wrap instead of running off
    fig.suptitle(f"{title}\nload avg {doc['provenance']['load_avg_start']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_serve(bench_sub):
    p = bench_sub.add_parser("serve", help="load generator for `portinfer serve`: throughput, TTFT and "
                                           "inter-token latency at several concurrency levels")
    p.add_argument("model", nargs="?", help="model for the server started here (default: the embedded SmolLM2)")
    p.add_argument("--url", help="benchmark a server already running there instead of starting one")
    p.add_argument("--backend", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in words (about tokens)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="requests per level: this many per client (at least 4 in all); 1 makes a level one burst")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every level this many times, in turn; a level's throughput is its median round's, "
                        "and the c=16 / c=1 ratio the median of the rounds' own ratios (default 1)")
    p.add_argument("--max-batch", type=int, default=16, help="slots of the server started here")
    p.add_argument("--max-context", type=int, default=256, help="positions per slot of the server started here")
    p.add_argument("--kv-cache-dtype", choices=("fp32", "fp16", "bf16"), help="KV-cache dtype of the server started here")
    p.add_argument("--json", help="write the results as JSON (with provenance) here")
    p.add_argument("--plot", help="write a throughput/latency plot (PNG) here")
    p.set_defaults(func=run)
    return p
