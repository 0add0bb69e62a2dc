"""Every available backend, every op, every dtype (and weight format) against the float64 reference.

The reference itself is checked against independent float64 formulas in test_reference.py
(comparing it with itself here would prove nothing)."""
import pytest

import portinfer
from portinfer.backends import spec

from conftest import CONFORMANCE_SEED, available_backends


@pytest.mark.parametrize("op", spec.OPS)
@pytest.mark.parametrize("backend", available_backends())
def test_backend_matches_reference(backend, op):
    results = portinfer.check(backend, ops=[op], seed=CONFORMANCE_SEED)
    assert results.rows, f"no cases ran for {backend} {op}"
    ran = [r for r in results.rows if r.status != "unsupported"]
    for r in ran:
        assert r.cases > 0, f"{backend} {r.op} {r.dtype}: supported but no case ran"
    assert results.passed, "\n" + results.table()
