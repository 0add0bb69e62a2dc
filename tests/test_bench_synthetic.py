"""Synthetic GGUF models (portinfer.bench.synthetic) and the roofline column of `bench model`:
the file has the named model's shapes and SmolLM2's tokenizer, loads, and its bytes per token
match the tensors' own sizes."""
import math

import gguf
import pytest
import torch

import portinfer
from portinfer.bench import model as bench_model
from portinfer.bench.synthetic import SHAPES, synthetic_gguf, weight_bytes_per_token

try:
    from portinfer.runtime import default_model_path
    default_model_path()
except FileNotFoundError as exc:
    pytest.skip(f"needs the SmolLM2 GGUF for its tokenizer: {exc}", allow_module_level=True)


def test_synthetic_file_has_the_shapes_and_loads(tmp_path):
    path = synthetic_gguf("smollm2-135m", "q4_1", directory=tmp_path, layers=1)
    assert synthetic_gguf("smollm2-135m", "q4_1", directory=tmp_path, layers=1) == path  # cached
    s = SHAPES["smollm2-135m"]
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.ffn_gate.weight"].tensor_type.name == "Q4_1"
    assert list(t["blk.0.ffn_down.weight"].shape) == [s.intermediate, s.hidden]  # ggml order: [K, N]
    assert list(t["token_embd.weight"].shape) == [s.hidden, s.vocab] and "output.weight" not in t
    # written blocks dequantize (gguf's own dequantizer) to weights of spread ~1/sqrt(K)
    w = gguf.quants.dequantize(t["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q4_1)
    assert 0.5 < float(w.std()) * math.sqrt(s.hidden) < 2.0
    m = portinfer.load(path, backend="torch")
    assert (m.config.vocab_size, m.config.num_kv_heads, m.config.num_layers) == (s.vocab, s.kv_heads, 1)
    assert m.encode("Hello, world!") == portinfer.load(default_model_path(), backend="torch").encode("Hello, world!")
    assert torch.isfinite(m.logits(torch.tensor([[1, 2, 3]]))).all()
    # tied: the output matrix is the embedding, read whole every step
    assert weight_bytes_per_token(path) == sum(int(x.n_bytes) for x in r.tensors)


def test_bench_model_roofline_column(tmp_path):
    path = synthetic_gguf("smollm2-135m", "q8_0", directory=tmp_path, layers=1)
    doc = bench_model.run(str(path), ["torch"], prompt_tokens=4, gen_tokens=3, repetitions=3)
    tg = [r for r in doc["rows"] if r["test"] == "tg3"][0]
    s = SHAPES["smollm2-135m"]
    kv = 1 * 2 * s.kv_heads * s.head_dim * 4 * 2  # mean position (3 + 1) / 2
    assert tg["bytes_per_token"] == weight_bytes_per_token(path) + kv
    # one read-bandwidth probe before each repetition; the share is the median of the repetitions' own
    probes = tg["read_bytes_s_probes"]
    assert len(probes) == 3 and min(probes) > 0 and tg["read_bytes_s"] == sorted(probes)[1]
    each = sorted(t * tg["bytes_per_token"] / p for t, p in zip(tg["tok_s"], probes))
    assert math.isclose(tg["bandwidth_share"], each[1]) and tg["bandwidth_share_range"] == [each[0], each[2]]
    assert f"{100 * tg['bandwidth_share']:.0f}%" in bench_model.format_table(doc)
    pp = [r for r in doc["rows"] if r["test"] == "pp4"][0]
    assert "bandwidth_share" not in pp and "read_bytes_s_probes" not in pp
