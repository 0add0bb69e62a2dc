"""Sampling against transformers' own logits processors (the independent reference for what
temperature, top_k, top_p, min_p and repetition_penalty mean), seeds, stop strings, streaming."""
import pytest
import torch

import portinfer
from portinfer.runtime.sampling import Sampler, SamplingParams

import hf_models


def our_distribution(logits, seen, **params):
    """The frequencies of 4000 draws of our sampler (seeded)."""
    sampler = Sampler(SamplingParams(**params))
    counts = torch.zeros(logits.shape[-1])
    for _ in range(4000):
        counts[sampler(logits[None], [seen])[0]] += 1
    return counts / counts.sum()


def hf_distribution(logits, seen, temperature, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    ids = torch.tensor([seen])
    scores = logits[None].clone()
    if repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, repetition_penalty=1.5),
    dict(temperature=1.0, top_k=5, top_p=0.9, repetition_penalty=1.2),
])
def test_sampled_distribution_matches_transformers(params):
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, -3.0])
    seen = [0, 3, 5]
    ref = hf_distribution(logits, seen, **params)
    ours = our_distribution(logits, seen, seed=1234, **params)
    assert (ours[ref == 0] == 0).all(), f"a filtered token was drawn: {ours} vs {ref}"
    # 4000 draws: each frequency within ~4 standard deviations of the reference probability
    tolerance = 4 * (ref * (1 - ref) / 4000).sqrt() + 1e-3
    assert ((ours - ref).abs() <= tolerance).all(), (ours, ref)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams())(logits, [[], [], []]) == logits.argmax(-1).tolist()
    assert Sampler(SamplingParams(temperature=2.0, top_k=1, seed=5))(logits, [[], [], []]) == logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_models.build("llama_gqa", path)
    return portinfer.load(path, backend="torch")


def test_same_seed_same_tokens(tiny):
    a = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=7, eos_token_id=[])
    b = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=7, eos_token_id=[])
    c = tiny.generate([1, 2, 3], max_new_tokens=16, temperature=1.0, seed=8, eos_token_id=[])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # 16 draws at temperature 1 from a 160-token vocabulary


def test_eos_ids_stop_generation(tiny):
    free = tiny.generate([1, 2, 3], max_new_tokens=12, eos_token_id=[])
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    stopped = tiny.generate([1, 2, 3], max_new_tokens=12, eos_token_id=[stop_at, 10_000])
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[:first + 1]


def test_stop_string_and_streaming(smollm2_torch):
    model = smollm2_torch
    prompt = model.apply_chat_template([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    free = model.generate(prompt, max_new_tokens=40)
    assert "5" in free.text, free.text
    cut = model.generate(prompt, max_new_tokens=40, stop=["5"])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index("5")]
    stream = model.generate(prompt, max_new_tokens=40, stream=True)
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == free.text == stream.result.text
    assert stream.result.token_ids == free.token_ids


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_top_p_over_a_large_vocabulary_keeps_the_full_sort_set(top_p, scale):
    """Sampler's top_p sorts only the head of the distribution (k most probable tokens, k growing):
    the kept set must be the one a full sort gives (transformers' TopPLogitsWarper), for flat and
    peaked distributions over 5000 tokens."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from portinfer.runtime.sampling import _softmax, _top_p

    z = (torch.randn(5000, generator=torch.Generator().manual_seed(int(top_p * 1000))) * scale).double()
    ours = _top_p(z.numpy(), _softmax(z.numpy()), top_p)
    ref = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), z[None].clone())[0]
    assert torch.equal(torch.from_numpy(ours).isinf(), ref.isinf()), (top_p, scale)
    assert int((~ref.isinf()).sum()) >= 1


def test_negative_and_large_seeds_are_seeds():
    """Any integer seeds the sampler (OpenAI clients send negative ones too): the same seed, the same draws."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    draws = {}
    for seed in (-1, -2 ** 70, 2 ** 80, 0):
        a, b = Sampler(SamplingParams(temperature=1.0, seed=seed)), Sampler(SamplingParams(temperature=1.0, seed=seed))
        draws[seed] = [a(logits, None) for _ in range(5)]
        assert draws[seed] == [b(logits, None) for _ in range(5)]
    assert draws[-1] != draws[0]  # 10 draws at temperature 1 from 300 tokens: another seed, other tokens
