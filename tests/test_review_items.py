"""Review items of issue 16 outside the loaders: iterating a Stream twice keeps `.result`;
eos_token_id=True is refused (it is not token 1); `bench ops --plot` without matplotlib fails before the
benchmark starts and names the extra; sampling finite logits near fp32's maximum gives no NaN; a
config.json whose `architectures` holds non-strings is a ConfigError."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: fuzz/ (seed corpus)

import portinfer  # noqa: E402
from portinfer.runtime import ConfigError, load_checkpoint  # noqa: E402
from portinfer.runtime.sampling import Sampler, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fuzz import seeds as corpus

    try:
        path = corpus.llama3_hf_dir(tmp_path_factory.mktemp("llama3"))
    except FileNotFoundError as exc:
        pytest.skip(f"the tiny Llama 3 directory is built from the SmolLM2 GGUF's vocabulary: {exc}")
    return portinfer.load(path, backend="torch")


def test_iterating_a_stream_twice_keeps_its_result(model):
    stream = model.generate("Hello there", max_new_tokens=4, temperature=0.0, stream=True)
    first = list(stream)
    result = stream.result
    assert result is not None and result.text == "".join(first)
    assert list(stream) == []  # the second pass: nothing new, and .result is not reset to None
    assert stream.result is result


@pytest.mark.parametrize("eos", [True, [2, False], -1, "2"])
def test_eos_token_id_must_be_token_ids(model, eos):
    with pytest.raises(ValueError, match=r"eos_token_id: expected a token id"):
        model.generate("Hello", max_new_tokens=2, eos_token_id=eos)


def test_eos_token_id_list_still_stops(model):
    greedy = model.generate("Hello", max_new_tokens=3, temperature=0.0)
    stopped = model.generate("Hello", max_new_tokens=3, temperature=0.0, eos_token_id=[greedy.token_ids[0]])
    assert stopped.finish_reason == "eos" and stopped.token_ids == greedy.token_ids[:1]


def test_bench_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path, capsys):
    from portinfer import cli
    from portinfer.bench import ops

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(ops, "run_ops", no_run)
    assert cli.main(["bench", "ops", "--plot", str(tmp_path / "roofline.png")]) != 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "portinfer[bench]" in err


def test_sampling_finite_logits_near_the_fp32_maximum():
    logits = torch.full((2, 8), -3e38)
    logits[:, 3] = 3.3e38
    logits[1, 5] = 3.3e38
    ids = Sampler(SamplingParams(temperature=0.6, top_p=0.9, seed=0))(logits, None)
    assert ids[0] == 3 and ids[1] in (3, 5)


def test_config_architectures_of_the_wrong_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt9", "architectures": [["x"], 2.5]}))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'gpt9' \(\['x'\], 2.5\) is not supported"):
        load_checkpoint(tmp_path)
