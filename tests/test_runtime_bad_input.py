"""Bad input to the runtime gets a clear error naming the input and what was expected, before any
kernel runs: never a crash or a silent NaN."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import portinfer
from portinfer import cli
from portinfer.runtime import CheckpointError, ConfigError, NonFiniteError, default_model_path

import hf_models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_models.build("llama_gqa", path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return portinfer.load(tiny_dir, backend="torch")


def copy_of(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edited_config(src, tmp_path, **changes):
    """A copy of the checkpoint whose config.json has `changes` applied."""
    path = copy_of(src, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def edited_weights(src, tmp_path, edit):
    """A copy of the checkpoint whose safetensors dict went through `edit(weights)`."""
    path = copy_of(src, tmp_path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors")
    return path


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_or_ids=[1] * 300), r"300 tokens do not fit the model's context of 256"),
    (dict(prompt_or_ids=""), r"prompt: expected a non-empty prompt"),
    (dict(prompt_or_ids=[]), r"expected at least one prompt|expected at least one token"),
    (dict(prompt_or_ids=[1, 5, 160]), r"token id 160 is outside the vocabulary \[0, 160\)"),
    (dict(prompt_or_ids=[[1, 2], [1, -3]]), r"prompt_or_ids\[1\]: token id -3 is outside the vocabulary"),
    (dict(prompt_or_ids=[1, 2], max_new_tokens=0), r"max_new_tokens: expected an integer >= 1, got 0"),
    (dict(prompt_or_ids=[1, 2], temperature=-0.5), r"temperature: expected >= 0"),
    (dict(prompt_or_ids=[1, 2], temperature=1.0, top_p=0.0), r"top_p: expected a value in \(0, 1\]"),
    (dict(prompt_or_ids=[1, 2], temperature=1.0, top_p=1.5), r"top_p: expected a value in \(0, 1\]"),
    (dict(prompt_or_ids=[1, 2], temperature=1.0, top_k=-1), r"top_k: expected an integer >= 0"),
    (dict(prompt_or_ids=[1, 2], temperature=float("nan")), r"temperature: expected a finite number"),
    (dict(prompt_or_ids="hello"), r"no tokenizer"),
    (dict(prompt_or_ids=[[1, 2], [3]], stream=True), r"stream: expected a single prompt"),
])
def test_generate_rejects_bad_input(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(**kwargs)


def test_logits_rejects_bad_ids(tiny):
    with pytest.raises(ValueError, match=r"input_ids: expected an int64 tensor"):
        tiny.logits(torch.ones(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"token id 999 is outside the vocabulary \[0, 160\)"):
        tiny.logits(torch.tensor([[1, 999]]))
    with pytest.raises(ValueError, match=r"300 tokens exceed the model's context of 256"):
        tiny.logits(torch.ones(1, 300, dtype=torch.int64))


def test_unknown_architecture_lists_the_supported_ones(tiny_dir, tmp_path):
    path = edited_config(tiny_dir, tmp_path, model_type="gpt_neox")
    with pytest.raises(ConfigError, match=r"model_type 'gpt_neox'.*supported are llama, qwen2, mistral"):
        portinfer.load(path, backend="torch")


def test_unsupported_rope_scaling_is_refused(tiny_dir, tmp_path):
    path = edited_config(tiny_dir, tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope scaling: type 'yarn' is not supported; supported are default, "
                                          r"linear, llama3"):
        portinfer.load(path, backend="torch")


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    path = edited_weights(tiny_dir, tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' "
                                              r"\(expected shape \[96, 64\]\)"):
        portinfer.load(path, backend="torch")


def test_misshaped_tensor_names_expected_and_found(tiny_dir, tmp_path):
    path = edited_weights(tiny_dir, tmp_path,
                          lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[16, 64\], "
                                              r"expected \[32, 64\]"):
        portinfer.load(path, backend="torch")


def test_truncated_safetensors(tiny_dir, tmp_path):
    path = copy_of(tiny_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors \(truncated or corrupt"):
        portinfer.load(path, backend="torch")


def test_pickle_checkpoints_are_never_loaded(tmp_path, tiny_dir):
    path = copy_of(tiny_dir, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are never loaded"):
        portinfer.load(path, backend="torch")


@pytest.mark.parametrize("cut", ["header", "tensors"])
def test_truncated_or_corrupt_gguf(tmp_path, cut):
    try:
        src = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"needs the SmolLM2 GGUF: {exc}")
    bad = tmp_path / "bad.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(4096 if cut == "header" else 20_000_000))
    with pytest.raises(CheckpointError, match=r"bad.gguf: (cannot read GGUF|tensor '.*' cannot be read)"):
        portinfer.load(bad, backend="torch")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"junk.gguf: cannot read GGUF"):
        portinfer.load(tmp_path / "junk.gguf", backend="torch")


def test_non_finite_logits_name_the_first_layer(tiny_dir, tmp_path):
    path = edited_weights(tiny_dir, tmp_path,
                          lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__((3, 5), float("inf")))
    model = portinfer.load(path, backend="torch")
    with pytest.raises(NonFiniteError, match=r"first layer that produced NaN/Inf is layer 1 \(of 2\)"):
        model.generate([1, 2, 3], max_new_tokens=2)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        portinfer.load(tmp_path / "nope", backend="torch")


def test_cli_reports_bad_flags_before_loading(tmp_path, capsys):
    # the model path does not exist: a bad flag must be reported first, without loading anything
    assert cli.main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p: expected a value in (0, 1], got 2.0" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_catches_each_kind_of_non_finite_value(dtype):
    """The per-step logits check (model.all_finite): a single NaN, +inf or -inf anywhere in a batch of
    logits is caught, and finite values whose sum would overflow are not mistaken for an infinity."""
    from portinfer.runtime.model import all_finite

    big = torch.full((4, 1000), 3e38 if dtype == torch.float32 else 1.7e308, dtype=dtype)
    assert all_finite(big) and all_finite(torch.randn(16, 4096, dtype=dtype))
    assert all_finite(big[:, ::3])  # a strided view
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(16, 4096, dtype=dtype)
        t[11, 4001] = bad
        assert not all_finite(t), bad
