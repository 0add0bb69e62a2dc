"""The fuzz harness's seeded CI subset (the long run is `python -m fuzz --cases 100000`, see fuzz/): every
mutated GGUF, safetensors, config.json, generation_config.json, tokenizer.json and tokenizer_config.json
ends in a load or a documented error that names its file; and the harness itself records a crash and a
hang against their cases and goes on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("seeds")


def _fuzz(tmp_path, seeds_dir, *args, env=None):
    out = tmp_path / "report.json"
    try:
        from portinfer.runtime import default_model_path

        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"the seed corpus is built from the SmolLM2 GGUF: {exc}")
    proc = subprocess.run([sys.executable, "-m", "fuzz", "--json", str(out), "--seeds", str(seeds_dir),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_seeded_subset_has_no_findings(tmp_path, seeds_dir):
    report, proc = _fuzz(tmp_path, seeds_dir, "--cases", "240", "--seed", "0")
    assert report["findings"] == [], proc.stdout
    assert proc.returncode == 0
    counts = report["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 240
    for kind, c in counts.items():  # each kind reaches both ends: some cases load, some are refused
        assert c.get("loaded", 0) > 0 and sum(c.values()) - c.get("loaded", 0) > 0, (kind, c)


def test_harness_records_a_crash_and_a_hang_and_goes_on(tmp_path, seeds_dir):
    report, proc = _fuzz(tmp_path, seeds_dir, "--cases", "12", "--kinds", "config,generation_config", "--timeout-s", "3",
                         env={"PORTINFER_FUZZ_PLANT": "crash:3,hang:6"})
    whats = sorted((f["what"], f["case"]) for f in report["findings"])
    assert whats == [("crash", 3), ("hang", 6)], proc.stdout
    assert sum(sum(c.values()) for c in report["counts"].values()) == 12
    assert proc.returncode == 1
