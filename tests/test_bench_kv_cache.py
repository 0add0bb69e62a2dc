"""bench/kv_cache.py end to end on a tiny Llama: both caches in one run, each case's rows say the cache
dtype they ran, the fp16 cache's prefill logits differ from the fp32 cache's by its rounding (not 0, small),
and the attention clock of the compiled plans is read."""
import importlib.util
import json
from pathlib import Path

import pytest

import hf_models

cpu_mod = pytest.importorskip("portinfer.backends.cpu")
if cpu_mod._cpu is None:
    pytest.skip(f"cpu extension not built: {cpu_mod._IMPORT_ERROR}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_kv_cache_bench_runs_both_caches(tmp_path):
    model = tmp_path / "tiny"
    hf_models.build("llama_gqa", model, layers=2)
    spec = importlib.util.spec_from_file_location("kv_cache_bench", ROOT / "bench" / "kv_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--model", str(model), "--backend", "cpu", "--cases", "2x24", "1x8", "--steps", "3",
                     "--turns", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["provenance"]["command"].startswith("python bench/kv_cache.py")
    rows = {(r["sequences"], r["context"], r["kv_cache_dtype"]): r for r in doc["rows"]}
    assert set(rows) == {(2, 24, "fp32"), (2, 24, "fp16"), (1, 8, "fp32"), (1, 8, "fp16")}
    for (b, c, d), r in rows.items():
        assert r["step_ms"] > 0 and r["attention_ms"] > 0 and len(r["each_turn_ratio"]) == 2
        if d == "fp16":  # (the fp32 rows are the baseline, compared with themselves)
            assert 0 < r["logits_rel_l2_vs_fp32"] < 2e-3, (b, c, r["logits_rel_l2_vs_fp32"])
