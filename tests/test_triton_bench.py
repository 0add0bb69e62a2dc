"""bench/triton_gpu.py (the GPU benchmark of the triton backend) is ready to run: it refuses
a machine without CUDA with a clear message, and its --smoke mode runs every benchmark's code
at tiny shapes under the Triton interpreter and writes the JSON it would write on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_gpu.py"


def _run(*args, env=None):
    run_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=run_env,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_fails_with_a_clear_message(tmp_path):
    done = _run("--out", str(tmp_path / "r.json"), env={"TRITON_INTERPRET": None})
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "torch.cuda.is_available() is False" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_smoke_run_writes_every_benchmark_with_provenance(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "results" / "smoke.json"
    done = _run("--smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] is True and "not measurements" in report["note"]
    assert {"torch", "triton", "git_commit", "date_utc", "gpu"} <= set(report["provenance"])
    names = [row["name"] for row in report["benchmarks"]]
    assert [n.split()[0] for n in names] == ["linear", "attention", "decode", "decode", "Qwen2-0.5B-shaped"]
    for row in report["benchmarks"]:
        assert "error" not in row, row
        # the triton and torch outputs agree (bf16): the benchmarks time the right computation
        assert row["rel_diff_vs_torch"] < 2e-2, row
