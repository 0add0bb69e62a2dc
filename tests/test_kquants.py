"""K-quants (Q4_K, Q5_K, Q6_K) end to end: our torch dequantizer bit-exact against the gguf package's,
the round-to-nearest quantizer by round trip through gguf's dequantizer, the loader keeping them as
blocks (and dequantizing what it cannot keep), and a Q4_K_M-style GGUF model giving transformers'
greedy tokens (transformers loading the same file with gguf_file=, dequantizing it itself)."""
import struct
import warnings

import gguf
import numpy as np
import pytest
import torch

import portinfer
from portinfer.backends import quant, spec
from portinfer.runtime import loader
from portinfer.runtime.gguf_file import GGUFFile

FORMATS = ["q4_k", "q5_k", "q6_k"]
QTYPE = {f: getattr(gguf.GGMLQuantizationType, f.upper()) for f in FORMATS}


def gguf_dequantize(qw):
    return gguf.quants.dequantize(qw.blocks.numpy(), QTYPE[qw.format])


def random_blocks(fmt, n, k, seed):
    """Every byte random (all scale / min / high-bit patterns), the fp16 super-block scales finite."""
    g = torch.Generator().manual_seed(seed)
    per_block, block_bytes = spec.QUANT_FORMATS[fmt]
    b = torch.randint(0, 256, (n, k // per_block, block_bytes), generator=g, dtype=torch.uint8)
    for start in ((208,) if fmt == "q6_k" else (0, 2)):
        b[..., start:start + 2] = (torch.rand(n, k // per_block, 1, generator=g) * 0.1).half().view(torch.uint8)
    return spec.QuantizedWeight(fmt, b.reshape(n, -1), (n, k))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_bit_exact_against_gguf(fmt):
    for qw in (random_blocks(fmt, 5, 512, seed=1), quant.quantize(torch.randn(3, 768) * 3, fmt)):
        expected = gguf_dequantize(qw)
        np.testing.assert_array_equal(quant.dequantize(qw).numpy(), expected)
        # float64 is exact: its fp32 rounding is gguf's fp32 result (one rounding at most per weight)
        np.testing.assert_array_equal(quant.dequantize(qw, torch.float64).float().numpy(), expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_round_trip_within_half_a_step(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 512, generator=g) * 2
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, :32] = 5.0  # a constant sub-block
    w[2] = -w[2].abs() - 1  # only negative values (the Q4_K/Q5_K min carries the whole range)
    w[3, :16] *= 1000  # one large sub-block next to small ones
    qw = quant.quantize(w, fmt)
    assert qw.blocks.shape == (6, 2 * spec.QUANT_FORMATS[fmt][1])
    back = torch.from_numpy(gguf_dequantize(qw)).reshape(6, 512).double()
    size, scale, _ = quant.k_subblock_scales(qw, torch.float64)
    half_step = scale.repeat_interleave(size, dim=1) / 2  # [6, 512]: each weight's sub-block
    err = (back - w.double()).abs()
    assert bool((err <= half_step * (1 + 1e-6) + 1e-6 * w.abs().double()).all()), float((err - half_step).max())
    assert float(err[0, :256].max()) == 0.0
    # and the steps are those of the format: at most the sub-block's range over the code count
    levels = {"q4_k": 15, "q5_k": 31, "q6_k": 62}[fmt]
    blocks = w.double().reshape(6, -1, size)
    spread = blocks.amax(-1) - torch.minimum(blocks.amin(-1), torch.zeros(1, dtype=torch.float64))
    if fmt == "q6_k":
        spread = 2 * blocks.abs().amax(-1)
    # ceil'd 6/8-bit sub-block scales: up to one super-block unit (d) above the sub-block's own need
    d = scale.amax(-1, keepdim=True) / (127 if fmt == "q6_k" else 63)
    assert bool((scale <= spread / levels * (1 + 1e-3) + 2 * d).all())


def test_quantizer_rejects_k_not_a_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of the super-block size 256"):
        quant.quantize(torch.randn(2, 384), "q4_k")
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        spec.QuantizedWeight("q6_k", torch.zeros(2, 210, dtype=torch.uint8), (2, 128))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_linear_is_float64_of_the_dequantized_weight(fmt):
    ref = portinfer.backends.get("reference")
    qw = random_blocks(fmt, 7, 512, seed=5)
    x = torch.randn(3, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).float()
    # gguf's fp32 weights are the exact ones rounded once (d * sc * q - dmin * m), hence the tolerance,
    # relative to the sum of |x w| (an output that cancels to near 0 keeps the absolute error of its terms)
    dense = torch.from_numpy(gguf_dequantize(qw)).double()
    expected = (x.double() @ dense.T).float()
    scale = float((x.double().abs() @ dense.abs().T).max())
    torch.testing.assert_close(ref.linear(x, ref.prepare_linear(qw, torch.float32)), expected, rtol=1e-6,
                               atol=1e-7 * scale)


# ---------------------------------------------------------------------------- loader

def _write(path, tensors):
    """tensors: name -> (numpy blocks or dense array, ggml type or None)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_loader_keeps_k_quants_as_blocks_and_dequantizes_the_rest(tmp_path):
    g = torch.Generator().manual_seed(0)
    kq = {f: quant.quantize(torch.randn(4, 512, generator=g), f) for f in FORMATS}
    q5_0 = gguf.quants.quantize(torch.randn(4, 64, generator=g).numpy(), gguf.GGMLQuantizationType.Q5_0)
    odd = quant.quantize(torch.randn(1, 256, generator=g), "q4_k")  # rewritten below as [2, 128]
    tensors = {f"t.{f}": (kq[f].blocks.numpy(), QTYPE[f]) for f in FORMATS}
    tensors["t.q5_0"] = (q5_0, gguf.GGMLQuantizationType.Q5_0)
    tensors["t.odd"] = (odd.blocks.numpy(), QTYPE["q4_k"])
    path = tmp_path / "t.gguf"
    _write(path, tensors)
    # a Q4_K tensor of shape [2, 128]: 256 weights, one super-block, but rows of half a block (the
    # gguf writer cannot produce it, so its dims are rewritten in the header)
    data = path.read_bytes()
    old = b"t.odd" + struct.pack("<IQQ", 2, 256, 1)
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, b"t.odd" + struct.pack("<IQQ", 2, 128, 2)))

    infos = {t.name: t for t in GGUFFile(path).tensors}
    for f in FORMATS:
        value = loader._gguf_tensor(infos[f"t.{f}"])
        assert isinstance(value, spec.QuantizedWeight) and value.format == f and value.shape == (4, 512)
        assert torch.equal(value.blocks, kq[f].blocks)
    # a ggml type no backend computes natively: fp32, once, gguf's values
    value = loader._gguf_tensor(infos["t.q5_0"])
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.shape == (4, 64)
    np.testing.assert_array_equal(value.numpy(), gguf.quants.dequantize(q5_0, gguf.GGMLQuantizationType.Q5_0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = loader._gguf_tensor(infos["t.odd"])
    assert any("not a matrix whose rows are whole blocks of 256" in str(w.message) for w in caught)
    assert isinstance(value, torch.Tensor) and value.shape == (2, 128)
    np.testing.assert_array_equal(value.reshape(-1).numpy(), quant.dequantize(odd).reshape(-1).numpy())


# ---------------------------------------------------------------------------- a Q4_K_M-style model

def use_more_bits(layer, layers):
    """llama.cpp (llama-quant.cpp): the layers whose attn_v / ffn_down get Q6_K in a Q4_K_M file."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_q4_k_m(hf, path):
    """A llama GGUF laid out as llama.cpp's Q4_K_M: Q6_K for output and for attn_v / ffn_down in the
    use_more_bits layers, Q4_K for every other matrix (token_embd included), f32 norms."""
    import gguf

    from test_gguf_models import llama_cpp_permute

    c = hf.config
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    formats = {}

    def add(name, hf_name, fmt=None, permute_heads=None):
        t = sd[hf_name]
        if fmt is None:
            w.add_tensor(name, t.numpy())
            return
        formats[name] = fmt
        blocks = quant.quantize(t, fmt).blocks.numpy()
        if permute_heads:  # blocks run along rows: permuting rows of blocks = permuting rows of weights
            blocks = np.ascontiguousarray(llama_cpp_permute(blocks, permute_heads))
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=QTYPE[fmt])

    add("token_embd.weight", "model.embed_tokens.weight", "q4_k")
    add("output_norm.weight", "model.norm.weight")
    add("output.weight", "lm_head.weight", "q6_k")
    n = c.num_hidden_layers
    for i in range(n):
        p = f"model.layers.{i}."
        more = "q6_k" if use_more_bits(i, n) else "q4_k"
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", "q4_k", c.num_attention_heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", "q4_k", c.num_key_value_heads)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", more)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", "q4_k")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", "q4_k")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", "q4_k")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", more)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return formats


def small_llama(hidden=256, intermediate=512, layers=3, vocab=320, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                                      eos_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights of a trained model's scale, so the logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module")
def q4_k_m_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq") / "llama-q4_k_m.gguf"
    formats = write_q4_k_m(small_llama(), path)
    assert set(formats.values()) == {"q4_k", "q6_k"} and formats["blk.1.attn_v.weight"] == "q4_k"
    return path


PROMPT = [1, 5, 9, 33, 2, 71, 100, 7, 7, 120]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_q4_k_m_model_gives_transformers_greedy_tokens(q4_k_m_file, backend):
    from transformers import AutoModelForCausalLM

    import hf_models

    hf = AutoModelForCausalLM.from_pretrained(str(q4_k_m_file.parent), gguf_file=q4_k_m_file.name,
                                              dtype=torch.float32).eval()
    ours = portinfer.load(q4_k_m_file, backend=backend, dtype="fp32", fallback="error")
    # the loader kept every matrix as K-quant blocks (model.py may still fuse or dequantize them)
    ckpt = loader.load_checkpoint(q4_k_m_file)
    kept = {v.format for v in ckpt.weights.values() if isinstance(v, spec.QuantizedWeight)}
    assert kept == {"q4_k", "q6_k"}
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf(ids).logits
    err = float((ours.logits(ids).double() - ref.double()).norm() / ref.double().norm())
    assert err <= 1e-4, f"{backend}: logits relative L2 error {err:.2e}"
    assert ours.generate(PROMPT, max_new_tokens=16, eos_token_id=[]).token_ids == hf_models.hf_greedy(hf, PROMPT, 16)


def test_q4_k_m_model_on_the_int8_route(q4_k_m_file):
    """The cpu backend's int8 route runs Q4_K and Q6_K through its integer kernels (repacked from the
    super-blocks): logits near transformers' (the int8 route's model budget) and every greedy token
    among transformers' top 5 at that step, teacher-forced on ours."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(q4_k_m_file.parent), gguf_file=q4_k_m_file.name,
                                              dtype=torch.float32).eval()
    ours = portinfer.load(q4_k_m_file, backend="cpu[int8]", dtype="fp32", fallback="error")
    primary = ours._placement.primary
    assert primary.quantizes_activations
    repacked = {w.format for layer in ours.decoder.layers for w in layer.values()
                if getattr(w, "extra", {}).get("layout") == "int8x16"}
    assert {"q4_k", "q6_k"} <= repacked, repacked
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf(ids).logits
    err = float((ours.logits(ids).double() - ref.double()).norm() / ref.double().norm())
    # measured 2.7e-2 on this random-weight model (SmolLM2's real weights on Q4_1: ~5e-3 full forward):
    # the int8 activations' error, as in test_smollm2's INT8_DECODE_LOGITS_BUDGET
    assert err <= 5e-2, f"int8 route: logits relative L2 error {err:.2e}"
    tokens = ours.generate(PROMPT, max_new_tokens=16, eos_token_id=[]).token_ids
    with torch.no_grad():
        steps = hf(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:-1]
    top5 = steps.topk(5, dim=-1).indices
    for i, token in enumerate(tokens):
        assert token in top5[i].tolist(), f"step {i}: token {token} not in transformers' top 5 {top5[i].tolist()}"


# ---------------------------------------------------------------------------- cpu kernels

@pytest.fixture
def cpu_paths():
    from portinfer.backends.cpu import CpuBackend

    if not CpuBackend.probe()[0]:
        pytest.skip(CpuBackend.probe()[1])
    backend = CpuBackend()
    before = backend.simd()
    yield backend, backend.simd_paths()
    backend.set_simd(before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_kernels_match_reference_on_every_simd_path(cpu_paths, fmt):
    """GEMV (M = 1..16, decode: on AVX-512, 3..16 rows take tiles of 4 weight rows dequantized once, in
    passes over the rows of x; N = 70 leaves a tile of 2 rows) and GEMM (prefill) on each
    instruction-set path, against float64; random block bytes (every scale / min / high-bit pattern),
    a bias, x rows with padding, bf16 activations at 2 and 6 rows."""
    cpu, paths = cpu_paths
    ref = portinfer.backends.get("reference")
    qw = random_blocks(fmt, 70, 768, seed=11)  # N = 70: two full 32-row panels and a partial one
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(70, generator=g)
    wr = ref.prepare_linear(qw, torch.float32)
    assert wr.source_format == fmt
    for path in paths:
        cpu.set_simd(path)
        w = cpu.prepare_linear(qw, torch.float32)
        assert w.format == fmt  # computed from the blocks, not dequantized at prepare
        for m in (1, 2, 3, 4, 5, 8, 9, 10, 13, 16, 17):
            x = torch.randn(m, 768 + 5, generator=g)[:, :768]  # row stride 773
            y = cpu.linear(x, w, bias)
            expected = ref.linear(x, wr, bias).double()
            err = float((y.double() - expected).norm() / expected.norm())
            assert err < 2e-6, f"{fmt} {path} M={m}: relative error {err:.2e}"
        for m in (2, 6):
            x = torch.randn(m, 768, generator=g).bfloat16()
            y = cpu.linear(x, cpu.prepare_linear(qw, torch.bfloat16))
            expected = ref.linear(x, ref.prepare_linear(qw, torch.bfloat16)).double()
            assert y.dtype == torch.bfloat16
            assert float((y.double() - expected).norm() / expected.norm()) < 8e-3


def test_backends_command_lists_k_quants_as_native():
    from portinfer.commands import backends as command

    rows = {r["name"]: r for r in command.describe() if r["available"]}
    for name in ("reference", "cpu", "npu-sim", "triton"):
        if name in rows:
            assert set(FORMATS) <= set(rows[name]["native_weight_formats"]), name
    if "torch" in rows:  # plain torch dequantizes them at prepare time (still listed as supported)
        assert set(FORMATS) <= set(rows["torch"]["weight_formats"])
        assert not set(FORMATS) & set(rows["torch"]["native_weight_formats"])
    assert "q4_k*" in command.format_table(list(rows.values()))


def test_dequantize_rows_is_the_rows_of_dequantize():
    qw = random_blocks("q6_k", 9, 512, seed=2)
    ids = torch.tensor([8, 0, 3, 3])
    assert torch.equal(quant.dequantize_rows(qw, ids), quant.dequantize(qw)[ids])


# ---------------------------------------------------------------------------- resident memory

def write_random_q4_k_m(path, hidden=1024, intermediate=2816, layers=8, vocab=8192, heads=16, kv_heads=2):
    """A llama GGUF of real-looking shapes in llama.cpp's Q4_K_M mix, random block bytes (no weights to
    quantize: memory is what is measured)."""
    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e4)
    w.add_vocab_size(vocab)

    def add(name, fmt, n, k):
        if fmt is None:
            w.add_tensor(name, np.ones(n, dtype=np.float32))
            return
        blocks = random_blocks(fmt, n, k, seed=int(torch.randint(0, 2 ** 30, (1,), generator=g))).blocks.numpy()
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=QTYPE[fmt])

    kv = kv_heads * hidden // heads
    add("token_embd.weight", "q4_k", vocab, hidden)
    add("output_norm.weight", None, hidden, 0)
    add("output.weight", "q6_k", vocab, hidden)
    for i in range(layers):
        more = "q6_k" if use_more_bits(i, layers) else "q4_k"
        add(f"blk.{i}.attn_norm.weight", None, hidden, 0)
        add(f"blk.{i}.ffn_norm.weight", None, hidden, 0)
        for name, fmt, n, k in (("attn_q", "q4_k", hidden, hidden), ("attn_k", "q4_k", kv, hidden),
                                ("attn_v", more, kv, hidden), ("attn_output", "q4_k", hidden, hidden),
                                ("ffn_gate", "q4_k", intermediate, hidden), ("ffn_up", "q4_k", intermediate, hidden),
                                ("ffn_down", more, hidden, intermediate)):
            add(f"blk.{i}.{name}.weight", fmt, n, k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


RSS_SCRIPT = """
import gc, json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
import torch, portinfer
from portinfer.runtime import loader
# warm-up on a tiny file of the same kind (as portinfer/bench/memory.py): lazy imports, the thread pool, its
# scratch and the allocator's arenas are the process's, not the model's
warm = portinfer.load(sys.argv[2], backend="cpu", dtype="fp32")
c = warm.new_cache(1, 8)
warm.step(warm.step(torch.tensor([[1, 2, 3, 4]]), c).argmax(-1).view(1, 1), c)
del warm, c
gc.collect()
base = rss()
ckpt = loader.load_checkpoint(sys.argv[1])
gc.collect()
checkpoint = rss() - base
del ckpt
gc.collect()
base = rss()
model = portinfer.load(sys.argv[1], backend="cpu", dtype="fp32")
gc.collect()
loaded = rss() - base
cache = model.new_cache(1, 64)
kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
model.step(model.step(torch.tensor([[1, 2, 3, 4]]), cache).argmax(-1).view(1, 1), cache)  # prefill + decode
gc.collect()
print(json.dumps({"checkpoint": checkpoint, "model": loaded, "step": rss() - base - kv}))
"""


@pytest.fixture(scope="module")
def resident_bytes(tmp_path_factory, ):
    """Growth of the resident set of a fresh process (cpu backend) by loading a ~64 MB Q4_K_M-style file:
    the checkpoint alone, then the model."""
    import json
    import os
    import subprocess
    import sys

    from portinfer.backends.cpu import CpuBackend

    if not CpuBackend.probe()[0]:
        pytest.skip(CpuBackend.probe()[1])
    path = tmp_path_factory.mktemp("rss") / "q4_k_m.gguf"
    write_random_q4_k_m(path)
    warm = path.with_name("warm.gguf")
    write_random_q4_k_m(warm, hidden=256, intermediate=512, layers=1, vocab=256, heads=4, kv_heads=2)
    env = dict(os.environ, PORTINFER_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(warm)], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: v / path.stat().st_size for k, v in measured.items()}


def test_checkpoint_of_a_q4_k_m_file_is_resident_in_its_size(resident_bytes):
    assert resident_bytes["checkpoint"] <= 1.15, resident_bytes


def test_model_of_a_q4_k_m_file_is_resident_in_115_percent_of_its_size(resident_bytes):
    """After load and after a prefill + a decode step (every page read; the KV cache not counted): K-quant
    embedding rows gathered from blocks, mixed-format q/k/v kept as three linears in blocks."""
    assert resident_bytes["model"] <= 1.15, resident_bytes
    assert resident_bytes["step"] <= 1.15, resident_bytes
