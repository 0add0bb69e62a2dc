"""The conformance suite: does a backend compute the same function as the float64 reference?

`check(backend, ops=None, dtypes=None)` runs, for every op (and, for linear, every weight
format) and every activation dtype, hypothesis-generated cases (cases.py) on the backend
and on the `reference` backend in float64, and compares them with the derived budget
(budget.py): relative L2 error, identical NaN/Inf positions (against the reference rounded
to the output dtype), every output element written (outputs are poisoned with NaN), and for
fp16/bf16 outputs no systematic lean of the errors (the bias test: a scale error or a wrong
rounding mode that the L2 budget is too wide to see).

A failing op is shrunk by hypothesis to a small case; the result names it and a command
that reproduces it (`portinfer check --backend B --ops OP --dtypes D --seed S`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from ..backends import registry, spec
from ..backends.base import Backend
from ..backends.reference import ReferenceBackend
from . import cases as cases_mod
from .budget import UNIT_ROUNDOFF, biased, bias_statistics, budget, relative_error

DEFAULT_MAX_EXAMPLES = {"full": 25, "small": 6}


@dataclass
class CaseResult:
    op: str
    dtype: str
    params: dict
    error: float
    budget: float
    status: str  # "pass" | "fail" | "unsupported"
    message: str = ""

    @property
    def ratio(self):
        return self.error / self.budget if self.budget > 0 else float("inf")

    def as_dict(self):
        return {"op": self.op, "dtype": self.dtype, "params": self.params, "error": self.error,
                "budget": self.budget, "status": self.status, "message": self.message}


@dataclass
class OpResult:
    op: str  # "linear[q4_1]" for variants
    dtype: str
    status: str  # "pass" | "fail" | "unsupported"
    cases: int = 0
    unsupported_cases: int = 0
    worst: CaseResult | None = None
    failure: CaseResult | None = None
    reproduce: str = ""

    def as_dict(self):
        return {"op": self.op, "dtype": self.dtype, "status": self.status, "cases": self.cases,
                "unsupported_cases": self.unsupported_cases,
                "worst": self.worst.as_dict() if self.worst else None,
                "failure": self.failure.as_dict() if self.failure else None, "reproduce": self.reproduce}


@dataclass
class CheckResults:
    backend: str
    device: str
    seed: int
    profile: str
    rows: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.status != "fail" for r in self.rows)

    @property
    def failures(self):
        return [r for r in self.rows if r.status == "fail"]

    def row(self, op, dtype):
        for r in self.rows:
            if r.op == op and r.dtype == dtype:
                return r
        raise KeyError((op, dtype))

    def as_dict(self):
        return {"backend": self.backend, "device": self.device, "seed": self.seed, "profile": self.profile,
                "passed": self.passed, "results": [r.as_dict() for r in self.rows]}

    def to_json(self):
        return json.dumps(self.as_dict(), indent=2)

    def table(self, verbose=False) -> str:
        lines = [f"conformance: backend={self.backend} device={self.device} profile={self.profile} seed={self.seed}",
                 f"{'op':<16} {'dtype':<5} {'status':<11} {'cases':>5} {'worst error':>12} {'budget':>10}  worst case"]
        for r in self.rows:
            w = r.failure or r.worst
            err = f"{w.error:.3e}" if w else "-"
            bud = f"{w.budget:.3e}" if w else "-"
            case = cases_mod.describe(r.op, w.params) if w else ""
            if not verbose and len(case) > 70:
                case = case[:67] + "..."
            lines.append(f"{r.op:<16} {r.dtype:<5} {r.status:<11} {r.cases:>5} {err:>12} {bud:>10}  {case}")
        n_fail = len(self.failures)
        n_pass = sum(r.status == "pass" for r in self.rows)
        n_uns = sum(r.status == "unsupported" for r in self.rows)
        lines.append(f"{n_pass} passed, {n_fail} failed, {n_uns} unsupported")
        for r in self.failures:
            lines.append("")
            lines.append(f"FAIL {r.op} {r.dtype}: {r.failure.message}")
            lines.append(f"  shrunk case: {cases_mod.describe(r.op, r.failure.params)}")
            lines.append(f"  reproduce:   {r.reproduce}")
        return "\n".join(lines)


def _evaluate(backend: Backend, reference: Backend, op: str, dtype, params, quantized: bool) -> CaseResult:
    case = cases_mod.Case(op, params, dtype)
    name = spec.dtype_name(dtype)
    if not backend.supports(op, **case.meta(backend)):
        return CaseResult(op, name, params, 0.0, 0.0, "unsupported")
    y_ref = case.run(reference)
    kappa = 1.0
    if case.magnitude is not None:
        ref_norm = float(torch.linalg.vector_norm(y_ref))
        kappa = float(torch.linalg.vector_norm(case.magnitude)) / ref_norm if ref_norm > 0 else float("inf")
    kappa_int8 = None
    if quantized and case.magnitude_int8 is not None:
        ref_norm = float(torch.linalg.vector_norm(y_ref))
        kappa_int8 = float(torch.linalg.vector_norm(case.magnitude_int8)) / ref_norm if ref_norm > 0 else float("inf")
    finite_ref = y_ref[torch.isfinite(y_ref)]
    bud = budget(op, dtype, case.reduction, case.cond, kappa, quantized, outputs=finite_ref.numel(),
                 ref_norm=float(torch.linalg.vector_norm(finite_ref)), kappa_int8=kappa_int8)
    backend.poison_outputs = True
    try:
        y = case.run(backend)
    finally:
        backend.poison_outputs = False
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(y_ref.shape) or y.dtype != dtype:
        got = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        return CaseResult(op, name, params, float("inf"), bud, "fail",
                          f"output: expected {name} {list(y_ref.shape)}, got {got}")
    y = y.detach().cpu()
    # NaN/Inf must sit exactly where the reference, rounded to the output dtype, has them
    ref_rounded = y_ref.to(dtype)
    if not torch.equal(torch.isnan(y), torch.isnan(ref_rounded)):
        where = torch.nonzero(torch.isnan(y) != torch.isnan(ref_rounded))[0].tolist()
        return CaseResult(op, name, params, float("inf"), bud, "fail",
                          f"NaN positions differ from the reference (first at index {where}; "
                          f"a NaN where the reference is finite is often an element never written)")
    if not torch.equal(torch.isinf(y), torch.isinf(ref_rounded)):
        where = torch.nonzero(torch.isinf(y) != torch.isinf(ref_rounded))[0].tolist()
        return CaseResult(op, name, params, float("inf"), bud, "fail", f"Inf positions differ (first at {where})")
    finite = torch.isfinite(ref_rounded)
    err = relative_error(y.masked_fill(~finite, 0), y_ref.masked_fill(~finite, 0))
    if err > bud:
        return CaseResult(op, name, params, err, bud, "fail", f"relative L2 error {err:.3e} > budget {bud:.3e}")
    # within the budget, but leaning one way: a scale error or a directed rounding mode (budget.py)
    b, t = bias_statistics(y.masked_fill(~finite, 0), y_ref.masked_fill(~finite, 0))
    if case.bias_check and biased(dtype, b, t):
        way, units = "larger" if b > 0 else "smaller", abs(b) / UNIT_ROUNDOFF[dtype]
        return CaseResult(op, name, params, err, bud, "fail",
                          f"outputs biased toward {way} magnitudes by {abs(b):.2e} relative ({units:.2f} units of "
                          f"roundoff, t = {t:.1f}; a correct kernel's errors are symmetric): a scale error, or "
                          f"results rounded toward zero (or away) instead of to nearest even")
    return CaseResult(op, name, params, err, bud, "pass")


def _run_one(backend, reference, op, variant, dtype, profile, max_examples, seed, shrink=True) -> OpResult:
    label = f"{op}[{variant}]" if variant and variant != "dense" else op
    name = spec.dtype_name(dtype)
    meta = {"dtype": dtype}
    if op == "linear":
        meta["weight_format"] = name if variant == "dense" else variant
    if op == "embedding" and variant != "dense" and not backend.embedding_table_formats:
        return OpResult(label, name, "unsupported")  # it gathers from no prepared weight: a dense table
    if not backend.supports(op, **meta):
        return OpResult(label, name, "unsupported")
    results: list[CaseResult] = []
    errors: list[CaseResult] = []
    quantized = bool(getattr(backend, "quantizes_activations", False))

    def evaluate(params):
        try:
            r = _evaluate(backend, reference, op, dtype, params, quantized)
        except Exception as exc:  # a crash in the backend is a failure of that case, with its message
            r = CaseResult(op, name, params, float("inf"), 0.0, "fail", f"{type(exc).__name__}: {exc}")
        results.append(r)
        return r

    phases = (Phase.generate, Phase.shrink) if shrink else (Phase.generate,)

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=phases, report_multiple_bugs=False)
    @given(params=cases_mod.strategy(op, profile, variant))
    def prop(params):
        r = evaluate(params)
        if r.status == "fail":
            errors.append(r)
            raise AssertionError(r.message)

    prop = hypothesis_seed(seed)(prop)
    failure = None
    try:
        prop()
    except AssertionError:
        failure = errors[-1]  # hypothesis replays the shrunk example last
    except Exception as exc:  # hypothesis itself gave up (e.g. flaky): report, don't crash the suite
        failure = errors[-1] if errors else CaseResult(op, name, {}, float("inf"), 0.0, "fail",
                                                       f"{type(exc).__name__}: {exc}")
    if failure is None:
        # the fixed edge set, on every run, after the random cases (so a bug they find is reported
        # shrunk); the first edge case that fails is the report (fixed cases: the same command repeats it)
        for params in cases_mod.edge_examples(op, variant):
            r = evaluate(params)
            if r.status == "fail":
                failure = r
                break
    supported = [r for r in results if r.status != "unsupported"]
    res = OpResult(label, name, "fail" if failure else ("pass" if supported else "unsupported"),
                   cases=len(supported), unsupported_cases=len(results) - len(supported))
    if supported:
        res.worst = max((r for r in supported if r.status == "pass"), key=lambda r: r.ratio, default=None)
    if failure:
        res.failure = failure
        res.reproduce = (f"portinfer check --backend {backend.name} --ops {op} --dtypes {name} --seed {seed}"
                         + (f" --weight-formats {variant}" if op in ("linear", "embedding") else ""))
    return res


def check(backend, ops=None, dtypes=None, weight_formats=None, max_examples=None, seed=None, profile=None,
          progress=None, shrink=True) -> CheckResults:
    """Run the conformance suite on `backend` (a name or a Backend instance).

    ops: subset of spec.OPS; dtypes: names ('fp32', 'fp16', 'bf16') or torch dtypes;
    weight_formats: linear and embedding variants ('dense', 'q8_0', 'q4_0', ...; embedding also 'prepared':
    the rows of a dense prepared weight); max_examples per op and
    dtype (default: the backend's `conformance_max_examples`, else by profile); seed: the hypothesis seed (printed, reproducible; default random);
    profile: 'full' or 'small' (default: the backend's `conformance_profile`, else 'full');
    shrink: minimize a failing random case (False: report it as drawn -- for callers that only ask
    whether a bug is caught, such as tests/test_planted_matrix.py).

    Each op and dtype runs the random cases first, then the fixed edge set (cases.edge_examples).
    """
    if isinstance(backend, str):
        backend = registry.get(backend)
    ops = list(ops) if ops else list(spec.OPS)
    for op in ops:
        if op not in spec.OPS:
            raise ValueError(f"ops: unknown op {op!r}; the contract's ops are {', '.join(spec.OPS)}")
    dtypes = [spec.parse_dtype(d) for d in (dtypes or ("fp32", "fp16", "bf16"))]
    for f in weight_formats or ():
        known = cases_mod.LINEAR_VARIANTS + ("prepared",)
        if f not in known:
            raise ValueError(f"weight_formats: expected some of {', '.join(known)}, got {f!r}")
    profile = profile or getattr(backend, "conformance_profile", "full")
    if profile not in cases_mod.PROFILES:
        raise ValueError(f"profile: expected one of {', '.join(cases_mod.PROFILES)}, got {profile!r}")
    # a backend may size its own default (a slow executor trades examples for time)
    max_examples = max_examples or getattr(backend, "conformance_max_examples", None) or DEFAULT_MAX_EXAMPLES[profile]
    seed = random.randrange(2 ** 31) if seed is None else int(seed)
    reference = ReferenceBackend(exact=True)
    out = CheckResults(backend.name, str(backend.device), seed, profile)
    for op in ops:
        for variant in cases_mod.variants(op):
            if op in ("linear", "embedding") and weight_formats and variant not in weight_formats:
                continue
            # rows of a prepared table: one gather kernel per layout, so a few cases per format suffice
            examples = max(2, max_examples // 5) if op == "embedding" and variant != "dense" else max_examples
            # a backend may ask for fewer examples of one op variant (a slow executor, a costly format)
            per_variant = getattr(backend, "conformance_variant_examples", None)
            if per_variant:
                examples = per_variant(op, variant) or max_examples
            for dtype in dtypes:
                if progress:
                    progress(op, variant, dtype)
                out.rows.append(_run_one(backend, reference, op, variant, dtype, profile, examples, seed, shrink))
    return out
