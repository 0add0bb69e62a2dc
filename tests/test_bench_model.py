"""`portinfer bench model` smoke test on a tiny random model: llama-bench-style rows for each
backend, positive finite tokens/s whose mean and sd agree with the per-repetition figures."""
import json
import math
import statistics

from portinfer import cli

import hf_models


def test_bench_model_writes_rows_per_backend_and_test(tmp_path, capsys):
    hf_models.build("llama_gqa", tmp_path / "m")
    out = tmp_path / "model.json"
    assert cli.main(["bench", "model", str(tmp_path / "m"), "-p", "8", "-n", "4", "-r", "3",
                     "--backends", "torch", "reference", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["provenance"]["command"].startswith("portinfer bench model")
    rows = doc["rows"]
    assert [(r["backend"], r["test"]) for r in rows] == [("torch", "pp8"), ("torch", "tg4"),
                                                         ("reference", "pp8"), ("reference", "tg4")]
    for r in rows:
        assert len(r["tok_s"]) == 3 and all(math.isfinite(v) and v > 0 for v in r["tok_s"])
        assert math.isclose(r["tok_s_mean"], statistics.fmean(r["tok_s"]))
        assert math.isclose(r["tok_s_sd"], statistics.stdev(r["tok_s"]))
        assert r["params"] == 160 * 64 * 2 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3 + 64 * 2) + 64
        assert r["fell_back"] == []
        assert f"{r['tok_s_mean']:.2f} ± {r['tok_s_sd']:.2f}" in table
    assert "pp8 vs torch (same run): reference" in table


def test_bench_model_rejects_bad_flags(capsys):
    assert cli.main(["bench", "model", "-p", "0", "-n", "0"]) == 2
    assert "expected at least one of them > 0" in capsys.readouterr().err
