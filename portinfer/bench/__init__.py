"""Benchmarks: `portinfer bench ops` (every op on every backend against the machine's own
ceilings). The timing core (`measure`) is shared by every benchmark."""
from .machine import measure_ceilings, provenance
from .ops import BENCH_OPS, Case, build_cases, cost, run_ops
from .shapes import SHAPE_SETS, ModelShapes, parse_shapes
from .timing import Progress, TimingStats, measure

__all__ = ["BENCH_OPS", "Case", "ModelShapes", "Progress", "SHAPE_SETS", "TimingStats", "build_cases", "cost",
           "measure", "measure_ceilings", "parse_shapes", "provenance", "run_ops"]
