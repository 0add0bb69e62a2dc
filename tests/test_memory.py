"""Resident memory after load (issue 12) and the embedding rows read out of prepared weights that make it
possible: a tied output head is the only copy of its matrix, GGUF blocks stay blocks.

RSS is measured in a fresh process (portinfer/bench/memory.py): growth after load against the file's
tensor bytes, on the cpu backend, for an fp32 and a Q4_0 file whose 32000 x 512 embedding dominates (as
in small real models), so a second copy of it, or a dequantized one, is far outside the margin."""
import pytest
import torch

import portinfer
from portinfer.backends import quant, registry, spec
from portinfer.backends.reference import ReferenceBackend
from portinfer.bench import memory

# allocator and interpreter noise beyond 1.15 x the tensor bytes: scratch buffers, the plan's activations,
# small Python objects; far below the 62 MiB a second copy of the test file's fp32 embedding would add
NOISE_BYTES = 6 << 20


def _backend(name):
    if not registry.available(name):
        pytest.skip(f"backend {name} is not available here: {registry.entry(name).status()[1]}")
    return registry.get(name)


# ---------------------------------------------------------------------------- rows of prepared weights

FORMATS = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")


def _weight(fmt, V=70, H=96, seed=0):
    if fmt in spec.K_QUANT_FORMATS:
        H = 512  # super-blocks of 256
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(seed))
    if fmt in spec.QUANT_FORMATS:
        return quant.quantize(w, fmt), quant.dequantize(quant.quantize(w, fmt), torch.float64)
    dense = w.to(spec.DTYPES_BY_NAME[fmt])
    return dense, dense.double()


@pytest.mark.parametrize("backend_name", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embedding_rows_of_a_prepared_weight(backend_name, fmt, dtype):
    """Rows gathered out of the backend's own prepared layout (panels, blocks) are the weight's rows,
    exactly dequantized, rounded once to the activation dtype (q4_1 in fp16/bf16: d * q + m is rounded
    to fp32 first, as ggml's get_rows does, so within one unit of the output dtype)."""
    backend = _backend(backend_name)
    weight, exact = _weight(fmt)
    if fmt in spec.DENSE_FORMATS and weight.dtype != dtype:
        weight = weight.to(dtype)
        exact = weight.double()
    prepared = backend.prepare_linear(weight, dtype)
    meta = spec.validate_embedding(torch.tensor([0]), prepared)
    if not backend.supports("embedding", **meta):
        assert prepared.format not in backend.embedding_table_formats
        pytest.skip(f"{backend_name} gathers no rows from {prepared.format} weights")
    ids = torch.tensor([69, 0, 3, 3, 41])
    rows = backend.embedding(ids, prepared)
    assert rows.dtype == dtype and rows.shape == (5, weight.shape[1])
    expected = exact[ids].to(dtype)
    if fmt in ("q4_1", "q4_k", "q5_k") and dtype != torch.float32:  # d sc q - dmin m: an fp32 rounding first
        torch.testing.assert_close(rows.float(), expected.float(), rtol=spec_u(dtype), atol=0)
    else:
        assert torch.equal(rows, expected)


def spec_u(dtype):
    return {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]


def test_a_prepared_table_is_refused_by_another_backend():
    weight, _ = _weight("q4_0")
    prepared = ReferenceBackend().prepare_linear(weight)
    torch_backend = registry.get("torch")
    with pytest.raises(spec.UnsupportedOpError, match="embedding"):
        torch_backend.embedding(torch.tensor([1]), prepared)


def test_prepared_table_ids_are_checked_against_its_vocabulary():
    weight, _ = _weight("q8_0")
    prepared = ReferenceBackend().prepare_linear(weight)
    with pytest.raises(ValueError, match=r"ids: expected every id in \[0, 70\)"):
        ReferenceBackend().embedding(torch.tensor([70]), prepared)


@pytest.mark.parametrize("fmt", ["f32", "q4_0"])
def test_tied_model_embeds_from_its_output_head(tmp_path, fmt):
    """One copy of a tied matrix on the cpu backend: the decoder's embedding table is the prepared head;
    logits match the reference backend, through step plans and the op path."""
    _backend("cpu")
    path = memory.write_gguf(tmp_path / f"tied-{fmt}.gguf", memory.SHAPES["tiny"], fmt)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    reference = portinfer.load(path, backend="reference", dtype="fp32").logits(ids)
    for plans in (True, False):
        model = portinfer.load(path, backend="cpu", dtype="fp32", plans=plans)
        assert model.decoder.embed is model.decoder.lm_head
        assert model.generate(ids[0].tolist(), max_new_tokens=4)  # plan built and replayed
        got = model.logits(ids)
        err = float(torch.linalg.vector_norm(got.double() - reference.double()) / torch.linalg.vector_norm(reference.double()))
        assert err < 1e-5, err


# ---------------------------------------------------------------------------- resident memory

@pytest.fixture(scope="module")
def cpu_only():
    _backend("cpu")


@pytest.mark.parametrize("fmt,shape,backend", [("f32", "test", "cpu"), ("q4_0", "test", "cpu"),
                                               ("q4_0", "test-layers", "cpu"), ("q4_0", "test", "cpu[int8]")])
def test_resident_memory_after_load_is_the_tensor_bytes(tmp_path, cpu_only, fmt, shape, backend):
    """test-layers: a Q4_0 file whose blocks stay mapped while q/k/v and gate/up are concatenated
    into copies; the sources' pages, read once for the copy, must not stay resident (1.5x before).
    cpu[int8]: every block matrix repacked into the int8 route's panels (a copy), the file's pages not
    kept beside them."""
    path = memory.write_gguf(tmp_path / f"model-{fmt}.gguf", memory.SHAPES[shape], fmt)
    r = memory.measure(path, backend=backend, dtype="fp32", max_len=256, threads=1)
    tensor_bytes = r["tensor_bytes"]
    assert r["load_bytes"] <= 1.15 * tensor_bytes + NOISE_BYTES, r
    assert r["step_bytes"] <= 1.15 * tensor_bytes + r["kv_cache_bytes"] + NOISE_BYTES, r
