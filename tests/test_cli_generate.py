"""`portinfer generate` and `portinfer chat` on the embedded default model: the CLI prints what the
Python API computes (same tokens), streams text, and ends with prefill/decode tokens/s."""
import io
import json

import pytest

import portinfer
from portinfer import cli


QUESTION = "What is the capital of France?"


def test_generate_json_equals_the_api(smollm2_torch, capsys):
    assert cli.main(["generate", "--backend", "torch", "--chat", "--prompt", QUESTION, "--max-new-tokens", "12",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = smollm2_torch.generate(smollm2_torch.apply_chat_template([{"role": "user", "content": QUESTION}]),
                               max_new_tokens=12)
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert "Paris" in out["text"]
    assert out["prefill_tok_s"] > 0 and out["backend"] == "torch"
    assert {r["op"] for r in out["placement"]["ops"]} >= {"linear", "attention", "rms_norm"}


def test_generate_streams_text_and_ends_with_speeds(smollm2_torch, capsys):
    assert cli.main(["generate", "--backend", "torch", "--prompt", "The capital of France is",
                     "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    expected = smollm2_torch.generate("The capital of France is", max_new_tokens=6)
    assert captured.out == expected.text + "\n"
    assert "prefill: 5 tokens" in captured.err and "tok/s" in captured.err and "generated: 6 tokens, decode" in captured.err


def test_chat_reads_turns_until_end_of_input(smollm2_torch, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    assert cli.main(["chat", "--backend", "torch", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert captured.err.count("tok/s") == 2  # one line per turn: prefill and decode speeds


def test_generate_json_with_one_token_has_no_decode_rate(capsys):
    """One new token means no decode step: the rate is null in JSON (never NaN, which JSON lacks)."""
    assert cli.main(["generate", "--backend", "torch", "--prompt", "Hello", "--max-new-tokens", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 1 and out["decode_tok_s"] is None and out["prefill_tok_s"] > 0
