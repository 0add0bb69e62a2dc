"""`python -m fuzz`: see fuzz/__init__.py."""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .targets import KINDS

DEFAULT_SEEDS_DIR = Path(tempfile.gettempdir()) / "portinfer-fuzz-seeds"


def case(kinds, j):
    """Case j of a run -> (kind, index within that kind)."""
    return kinds[j % len(kinds)], j // len(kinds)


def case_bytes(kind, index, seed, seed_inputs):
    from .mutate import mutate

    rng = random.Random(f"{seed}:{kind}:{index}")
    return mutate(kind, rng.choice(seed_inputs), rng)


# ------------------------------------------------------------------ worker (runs cases, reports each)

def worker(args):
    import torch

    sys.setrecursionlimit(10_000)  # the mutator writes nested GGUF arrays recursively
    torch.set_num_threads(1)  # tiny models: one thread, no spinning pool on a shared machine
    from . import seeds as seed_corpus
    from .targets import Finding, Target

    kinds = args.kinds
    corpus = seed_corpus.build(args.seeds)
    targets = {k: Target(k, corpus, Path(args.scratch)) for k in kinds}
    inputs = {k: t.seed_bytes() for k, t in targets.items()}
    out = sys.stdout
    # the harness's own test: PORTINFER_FUZZ_PLANT="crash:J,hang:K" makes case J die by a signal, K hang
    plant = dict(item.split(":")[::-1] for item in os.environ.get("PORTINFER_FUZZ_PLANT", "").split(",") if item)
    for j in range(args.start, args.end):
        kind, index = case(kinds, j)
        try:
            data = case_bytes(kind, index, args.seed, inputs[kind])
        except Exception as exc:  # the mutator's own failure: counted as such, the run goes on
            out.write(f"B {j}\nF {j} {json.dumps(f'mutator: {type(exc).__name__}: {exc}')}\n")
            out.flush()
            continue
        out.write(f"B {j}\n")
        out.flush()
        if plant.get(str(j)) == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if plant.get(str(j)) == "hang":
            time.sleep(3600)
        try:
            outcome = targets[kind].run(data)
            out.write(f"E {j} {outcome}\n")
        except Finding as exc:
            out.write(f"F {j} {json.dumps(str(exc))}\n")
        out.flush()


# ------------------------------------------------------------------ parent (spawns, watches, counts)

def run(args) -> dict:
    kinds = args.kinds
    counts = {k: collections.Counter() for k in kinds}
    findings = []
    scratch = tempfile.mkdtemp(prefix="portinfer-fuzz-")
    next_case, started = 0, time.time()
    from . import seeds as seed_corpus

    seed_corpus.build(args.seeds)  # once, here, so a worker's first case is not timed with it
    while next_case < args.cases:
        cmd = [sys.executable, "-m", "fuzz", "--worker", "--kinds", ",".join(kinds), "--seed", str(args.seed),
               "--start", str(next_case), "--end", str(args.cases), "--scratch", scratch, "--seeds", str(args.seeds)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PORTINFER_NUM_THREADS="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current, last = None, time.time()
        startup = True
        while True:
            limit = args.timeout_s * (6 if startup else 1)  # the first case also imports torch
            if not sel.select(timeout=max(0.1, limit - (time.time() - last))):
                if time.time() - last < limit:
                    continue
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current is not None:
                    kind, index = case(kinds, current)
                    counts[kind]["hang"] += 1
                    findings.append({"kind": kind, "index": index, "case": current, "what": "hang",
                                     "detail": f"no progress within {limit:.0f} s"})
                    next_case = current + 1
                break
            line = proc.stdout.readline()
            if not line:  # the worker ended
                rc = proc.wait()
                if current is not None:  # it died inside a case: a crash
                    kind, index = case(kinds, current)
                    counts[kind]["crash"] += 1
                    findings.append({"kind": kind, "index": index, "case": current, "what": "crash",
                                     "detail": f"worker exit status {rc}"})
                    next_case = current + 1
                elif rc != 0:  # outside any case: the harness itself failed
                    raise RuntimeError(f"fuzz worker failed (exit status {rc}) after case {next_case - 1}; rerun "
                                       f"it to see why: {' '.join(cmd)}")
                else:
                    next_case = args.cases
                break
            last, startup = time.time(), False
            tag, j, *rest = line.rstrip("\n").split(" ", 2)
            j = int(j)
            if tag == "B":
                current = j
                continue
            kind, index = case(kinds, j)
            if tag == "E":
                counts[kind][rest[0]] += 1
            else:
                counts[kind]["finding"] += 1
                findings.append({"kind": kind, "index": index, "case": j, "what": "finding",
                                 "detail": json.loads(rest[0])})
            current, next_case = None, j + 1
            done = sum(sum(c.values()) for c in counts.values())
            if args.progress and done % args.progress == 0:
                print(f"{done}/{args.cases} cases, {len(findings)} findings, {time.time() - started:.0f} s",
                      file=sys.stderr, flush=True)
    return {"cases": args.cases, "seed": args.seed, "kinds": list(kinds), "seconds": round(time.time() - started, 1),
            "counts": {k: dict(sorted(c.items())) for k, c in counts.items()}, "findings": findings}


def print_report(report):
    print(f"{report['cases']} cases, seed {report['seed']}, {report['seconds']} s")
    outcomes = sorted({o for c in report["counts"].values() for o in c})
    print(f"{'kind':18s} {'cases':>7s}  " + "  ".join(outcomes))
    for kind, c in report["counts"].items():
        print(f"{kind:18s} {sum(c.values()):7d}  " + "  ".join(f"{c.get(o, 0):{len(o)}d}" for o in outcomes))
    for f in report["findings"][:20]:
        print(f"\n{f['what']}: {f['kind']}:{f['index']} (replay: python -m fuzz --replay {f['kind']}:{f['index']} "
              f"--seed {report['seed']})\n{f['detail']}")
    print(f"\nfindings: {len(report['findings'])} (crashes {sum(c.get('crash', 0) for c in report['counts'].values())}, "
          f"hangs {sum(c.get('hang', 0) for c in report['counts'].values())})")


def replay(args):
    from . import seeds as seed_corpus
    from .targets import Target

    kind, index = args.replay.split(":")
    target = Target(kind, seed_corpus.build(args.seeds), Path(tempfile.mkdtemp(prefix="portinfer-fuzz-")))
    data = case_bytes(kind, int(index), args.seed, target.seed_bytes())
    if args.save:
        Path(args.save).write_bytes(data)
        print(f"case bytes written to {args.save}")
    print(target.run(data))


def fuzz_atheris(args, rest):
    import atheris

    with atheris.instrument_imports():
        import portinfer.runtime  # noqa: F401  (instrumented for coverage)
    from . import seeds as seed_corpus
    from .mutate import mutate
    from .targets import Target

    target = Target(args.atheris, seed_corpus.build(args.seeds), Path(tempfile.mkdtemp(prefix="portinfer-fuzz-")))
    seed_inputs = target.seed_bytes()

    def custom_mutator(data, max_size, seed):
        rng = random.Random(seed)
        try:
            return mutate(args.atheris, data, rng)[:max_size]
        except Exception:  # the input no longer parses as its format: start again from a seed
            return mutate(args.atheris, rng.choice(seed_inputs), rng)[:max_size]

    def test_one_input(data):
        target.run(bytes(data))  # a Finding propagates: atheris reports it with the input

    atheris.Setup([sys.argv[0]] + rest, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m fuzz", description="fuzz portinfer's loaders (see fuzz/__init__.py)")
    p.add_argument("--cases", type=int, default=1200, help="cases in all, spread evenly over the kinds")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=20.0, help="a case without progress for this long is a hang")
    p.add_argument("--seeds", default=str(DEFAULT_SEEDS_DIR), help="where the seed corpus is built (reused)")
    p.add_argument("--json", help="write the report (counts per kind and outcome, findings) here")
    p.add_argument("--progress", type=int, default=0, help="print progress every N cases")
    p.add_argument("--replay", help="KIND:INDEX: run one case in this process")
    p.add_argument("--save", help="with --replay: write the case's bytes to this file")
    p.add_argument("--atheris", choices=KINDS, help="coverage-guided run of one kind (args after -- go to atheris)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--end", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown}; expected some of {', '.join(KINDS)}")
    if args.worker:
        return worker(args)
    if args.replay:
        return replay(args)
    if args.atheris:
        return fuzz_atheris(args, rest)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
