"""The quantized-decode bench scripts end to end: bench/kquant_decode.py on a tiny Q4_K_M-style file
(both cpu routes decode the same file in one run, each repetition's share is taken against the probe
right before it, and the int8 route repacks the K-quants: its loaded bytes are the groups', not the
file's) and bench/quant_routes.py (one linear on both routes, alternated)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

cpu_mod = pytest.importorskip("portinfer.backends.cpu")
if cpu_mod._cpu is None:
    pytest.skip(f"cpu extension not built: {cpu_mod._IMPORT_ERROR}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("kquant_decode", ROOT / "bench" / "kquant_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kquant_decode_write_only_writes_the_file_it_would_measure(tmp_path):
    """--write FILE: the same bytes the benchmark decodes, and nothing run (for step_plans.py --model)."""
    script = _script()
    assert script.main(["--shape", "tiny", "--write", str(tmp_path / "w.gguf")]) == 0
    formats = script.write_k_mix(tmp_path / "ref.gguf", "tiny", "q4_k_m")
    assert (tmp_path / "w.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    assert set(formats.values()) == {"q4_k", "q6_k"}


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])
def test_kquant_decode_both_routes(tmp_path, mix):
    out = tmp_path / "r.json"
    doc = _script().main(["--shape", "tiny", "-n", "2", "-r", "2", "--mix", mix, "--backend", "cpu[fp32]",
                          "--backend", "cpu[int8]", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    fp32, int8 = doc["rows"]
    base = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}[mix]
    assert fp32["backend"] == "cpu[fp32]" and int8["backend"] == "cpu[int8]"
    assert set(fp32["formats"]) == {base, "q6_k"} and fp32["formats"] == int8["formats"]
    assert int8["backend_info"]["quant_route"] == "int8" and base in int8["backend_info"]["int8_formats"]
    for row in (fp32, int8):
        probes, rates = row["read_bytes_s_probes"], row["tok_s"]
        assert len(probes) == len(rates) == 2 and min(probes) > 0 and min(rates) > 0
        each = sorted(r * row["file_bytes_per_token"] / p for r, p in zip(rates, probes))
        assert math.isclose(row["share_of_file_limit"], (each[0] + each[1]) / 2)
        assert row["share_of_file_limit_range"] == each
    # the fp32 route reads the blocks as stored; the int8 route its repacked groups (a little more)
    assert fp32["read_bytes_per_token"] <= fp32["file_bytes_per_token"] < int8["read_bytes_per_token"]


def test_quant_routes_script():
    """bench/quant_routes.py: one linear per format and shape on both routes, alternated; its ratio is
    the two routes' own medians."""
    spec = importlib.util.spec_from_file_location("quant_routes", ROOT / "bench" / "quant_routes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.main(["--formats", "q6_k", "q4_0", "--shapes", "8x256", "--rows", "1", "3", "--rounds", "2"])
    assert [(r["format"], r["M"]) for r in doc["rows"]] == [("q6_k", 1), ("q6_k", 3), ("q4_0", 1), ("q4_0", 3)]
    for r in doc["rows"]:
        assert set(r["seconds"]) == {"cpu[fp32]", "cpu[int8]"} and all(len(v) == 2 for v in r["seconds"].values())
        assert r["stored_bytes"] == 8 * 256 * {"q6_k": 210 / 256, "q4_0": 18 / 32}[r["format"]]
        assert math.isclose(r["fp32_over_int8"], r["median_s"]["cpu[fp32]"] / r["median_s"]["cpu[int8]"])


def test_step_plans_batch_ratios_alternate_with_the_reference(tmp_path):
    """bench/step_plans.py's batched decode: every repetition times each batch size between two runs
    of the reference size, and each ratio is against those neighbours; the JSON keeps every value,
    the medians are of them."""
    from hf_models import build

    spec = importlib.util.spec_from_file_location("step_plans", ROOT / "bench" / "step_plans.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build("llama_gqa", tmp_path / "m")
    out = tmp_path / "r.json"
    mod.main(["--model", str(tmp_path / "m"), "--backend", "cpu[int8]", "--batches", "1", "3", "-p", "4", "-n", "2",
              "-r", "3", "--rounds", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["backend"] == "cpu[int8]"
    each, ratios = doc["decode_step_ms_by_batch_each"], doc["decode_step_vs_one_each"]
    assert set(each) == set(ratios) == {"1", "3"} and all(len(v) == 3 for v in each.values())
    assert ratios["1"] == [1.0, 1.0, 1.0]
    for ms, r, ref in zip(each["3"], ratios["3"], each["1"]):
        assert ms > 0 and math.isclose(r, ms / ref)
    assert math.isclose(doc["decode_step_vs_one"]["3"], sorted(ratios["3"])[1])
