"""bench/kernel_ab.py: two builds of the cpu extension timed turn by turn in one process. Run here on
the same build twice (the script's own checks: both builds must compute the same outputs; every
requested shape and row count reported), and on a planted disagreement, which must stop it."""
import json
import os
import runpy
import sys

import pytest

import portinfer.backends.cpu as cpu_mod

if cpu_mod._cpu is None:
    pytest.skip(f"cpu extension not built: {cpu_mod._IMPORT_ERROR}", allow_module_level=True)
pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "kernel_ab.py")


@pytest.fixture(scope="module")
def builds():
    """This build, named twice, as the README's example does (`kernel_ab.py /tmp/base .`): the script
    loads each from a private copy, so even the build this test process already imported loads again."""
    build = os.path.dirname(os.path.dirname(os.path.abspath(cpu_mod._cpu.__file__)))
    return [build, build]


def run_script(*args):
    old = sys.argv
    sys.argv = [SCRIPT, *args]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old
    return done.value.code


@pytest.mark.parametrize("route,fmt,act", [("int8", "q4_1", "fp32"), ("fp32", "q8_0", "fp32"),
                                           ("fp32", "bf16", "bf16")])
def test_same_build_twice_reports_every_case(tmp_path, builds, route, fmt, act):
    out = tmp_path / "ab.json"
    assert run_script(*builds, "--route", route, "--format", fmt, "--act", act, "--rows", "1", "3", "--shapes",
                      "40x64", "8x96", "--turns", "1", "--copies", "1", "--json", str(out)) == 0
    doc = json.loads(out.read_text())
    assert [(r["n"], r["k"], r["m"]) for r in doc["rows"]] == [(40, 64, 1), (40, 64, 3), (8, 96, 1), (8, 96, 3)]
    assert all(r["us_a"] > 0 and r["us_b"] > 0 and r["b_over_a"] > 0 for r in doc["rows"])
    assert doc["route"] == route and doc["act"] == act and doc["provenance"]["cpu"]


def test_builds_that_disagree_stop_the_run(monkeypatch, builds):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_ab", SCRIPT)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    real = ab.call

    def planted(mod, route, fmt, out, x, payload, m, n, k):  # build B's outputs off by 1%
        real(mod, route, fmt, out, x, payload, m, n, k)
        if mod is loaded[1]:
            out.mul_(1.01)

    loaded = []
    real_load = ab.load_build
    monkeypatch.setattr(ab, "load_build", lambda d, tag: loaded.append(real_load(d, tag)) or loaded[-1])
    monkeypatch.setattr(ab, "call", planted)
    with pytest.raises(SystemExit, match="the builds disagree"):
        ab.main([*builds, "--rows", "2", "--shapes", "16x64", "--turns", "1", "--copies", "1"])
