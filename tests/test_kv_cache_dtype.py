"""A KV cache in another dtype than the activations (load's kv_cache_dtype, docs/kv-cache.md).

Its definition is the op path's: keys and values are rounded to the cache's dtype when written and
read back converted (graph.cache_rows), then attention runs in the activation dtype. The cpu
backend's compiled plans fuse that (the KV write converts, attention reads 16-bit rows directly):
they must give the op path's tokens and logits exactly, and the float64 reference backend with the
same cache gives the independent reference."""
import pytest
import torch

import portinfer

import hf_models
from conftest import available_backends

PROMPTS = hf_models.PROMPTS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv_dtype_llama")
    hf_models.build("llama_gqa", path, layers=2)
    return path


def _load(path, backend, plans, kv):
    dtype = "fp16" if backend == "npu-sim" else "fp32"
    return portinfer.load(path, backend=backend, dtype=dtype, fallback="allow", plans=plans, kv_cache_dtype=kv)


def _step_logits(model, prompts=PROMPTS, decode_steps=3):
    """Logits of a padded prefill and a few decode steps (greedy), concatenated."""
    n = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(n), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    cache = model.new_cache(len(prompts), max(n) + decode_steps + 1)
    out = [model.step(ids, cache, n)]
    for _ in range(decode_steps):
        out.append(model.decode(out[-1].argmax(-1), cache))
    return torch.cat(out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
@pytest.mark.parametrize("backend", [b for b in ["cpu", "torch", "npu-sim"] if b in available_backends()])
def test_plans_give_the_op_paths_tokens_and_logits(tiny, backend, kv):
    op_path, planned = _load(tiny, backend, False, kv), _load(tiny, backend, True, kv)
    assert planned.new_cache(1, 4).k[0].dtype == portinfer.backends.spec.parse_dtype(kv)
    one = [m.generate(PROMPTS[0], max_new_tokens=12, eos_token_id=[]).token_ids for m in (op_path, planned)]
    assert one[0] == one[1]
    batch = [[g.token_ids for g in m.generate(PROMPTS, max_new_tokens=12, eos_token_id=[])] for m in (op_path, planned)]
    assert batch[0] == batch[1]
    # the fused conversion (cpu: native KV write + 16-bit attention reads) is the glue's, bit for bit
    exact = backend == "cpu"
    a, b = _step_logits(op_path), _step_logits(planned)
    assert (torch.equal(a, b) if exact else _rel(b, a) < 1e-5), _rel(b, a)


@pytest.mark.parametrize("kv, bound", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_a_16_bit_cache_matches_the_float64_reference_with_the_same_cache(tiny, kv, bound):
    """cpu with a 16-bit cache against the reference backend (float64 ops) with the same cache: fp32
    rounding apart. Against an fp32 cache the difference is the cache's rounding: there, but bounded."""
    cpu = _step_logits(_load(tiny, "cpu", True, kv))
    ref_same = _step_logits(_load(tiny, "reference", False, kv))
    ref_fp32 = _step_logits(_load(tiny, "reference", False, None))
    assert _rel(cpu, ref_same) < 1e-5, _rel(cpu, ref_same)
    assert 1e-6 < _rel(cpu, ref_fp32) < bound, _rel(cpu, ref_fp32)


def test_a_16_bit_cache_takes_half_the_memory(tiny):
    full = _load(tiny, "cpu", True, None).new_cache(2, 64)
    half = _load(tiny, "cpu", True, "fp16").new_cache(2, 64)
    assert full.k[0].dtype == torch.float32 and half.k[0].dtype == torch.float16
    assert sum(t.nbytes for t in half.k + half.v) * 2 == sum(t.nbytes for t in full.k + full.v)


def test_bad_kv_cache_dtypes_are_refused_before_loading(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype: expected one of fp32, fp16, bf16, got 'int8'"):
        portinfer.load(tiny, backend="cpu", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype: not supported with tensor_parallel"):
        portinfer.load(tiny, backend="cpu", kv_cache_dtype="fp16", tensor_parallel=2)



def test_generate_flag_gives_the_apis_tokens(capsys):
    """`portinfer generate --kv-cache-dtype fp16` on the embedded SmolLM2: the API's tokens with that cache."""
    import json

    from portinfer import cli

    prompt = "The capital of France is"
    assert cli.main(["generate", "--backend", "cpu", "--kv-cache-dtype", "fp16", "--prompt", prompt,
                     "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = portinfer.load(None, backend="cpu", kv_cache_dtype="fp16")
    assert model.new_cache(1, 4).k[0].dtype == torch.float16
    assert out["token_ids"] == model.generate(prompt, max_new_tokens=8).token_ids
