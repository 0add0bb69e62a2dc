"""Incremental detokenization and stop strings (runtime/detokenize.py), against the whole-text decode.

Two real tokenizers: a byte-level BPE without merges (every UTF-8 byte is its own token, so
every non-ASCII character is split across tokens) and SmolLM2's (the embedded model's GGUF).
"""
import pytest
from hypothesis import given, settings, strategies as st

from portinfer.runtime.detokenize import IncrementalDetokenizer
from portinfer.runtime.tokenizer import Tokenizer


def byte_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


BYTES = byte_tokenizer()


def stream(tokenizer, text, stops=()):
    """Pieces as a stream would send them, and the detokenizer at the end."""
    d = IncrementalDetokenizer(tokenizer, stops)
    pieces = []
    for t in tokenizer.encode(text):
        pieces.append(d.add(t))
        if d.finished:
            break
    pieces.append(d.flush())
    return [p for p in pieces if p], d


def expected(text, stops):
    """The reference: cut the whole text at the first stop-string occurrence (earliest in the text)."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    at, which = min(hits, key=lambda h: h[0])
    return text[:at], which


def test_utf8_split_across_tokens_is_never_shown_half():
    text = "héllo 日本語 wörld 🙂!"
    ids = BYTES.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: every non-ASCII character is split
    pieces, d = stream(BYTES, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == d.text == text
    assert "日" in pieces and "🙂" in pieces[-2:]  # shown whole, as soon as its last byte came


def test_stop_string_spanning_tokens_and_characters():
    text = "abc 日本語 def"
    pieces, d = stream(BYTES, text, ["本語"])  # 6 byte tokens, starting mid-sequence
    assert d.finished and d.stop_string == "本語"
    assert "".join(pieces) == d.text == "abc 日"


def test_the_stop_string_first_in_the_text_wins_not_the_first_listed():
    # "world" is listed first but "lo" occurs first: the output must not contain any stop string
    pieces, d = stream(BYTES, "hello world", ["world", "lo"])
    assert d.text == "hel" and d.stop_string == "lo"
    # both complete within one step of text (a multi-character token): still the earliest wins
    d = IncrementalDetokenizer(_WholeWords(), ["cd", "ab"])
    assert d.add(0) == "x" and d.finished and d.stop_string == "ab"


def test_possible_stop_prefix_is_held_back_then_released():
    d = IncrementalDetokenizer(BYTES, ["abc"])
    out = [d.add(t) for t in BYTES.encode("xab")]
    assert out == ["x", "", ""] and d.held == "ab"
    assert [d.add(t) for t in BYTES.encode("d")] == ["abd"]
    assert d.flush() == "" and d.text == "xabd"
    d = IncrementalDetokenizer(BYTES, ["abc"])
    for t in BYTES.encode("xab"):
        d.add(t)
    assert d.flush() == "ab" and not d.finished  # the sequence ended (eos/length): held text is final


def test_host_work_per_token_does_not_grow_with_the_text():
    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            self.widths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Counting(BYTES.backend)
    tok.widths = []
    text = ("ab日本 " * 400)[:2000]
    d = IncrementalDetokenizer(tok, ["zzz", "日本語"])
    for t in tok.encode(text):
        d.add(t)
    d.flush()
    assert d.text == text
    assert max(tok.widths) <= 6  # a window of recent ids (a 3-byte character plus context), never the text


@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.sampled_from(list("ab c\n日é🙂")), max_size=30),
       stops=st.lists(st.text(alphabet=st.sampled_from(list("ab c日é")), min_size=1, max_size=3), max_size=3))
def test_streamed_text_equals_the_whole_text_cut_at_the_first_stop(text, stops):
    pieces, d = stream(BYTES, text, stops)
    want, which = expected(text, stops)
    assert "".join(pieces) == d.text == want
    assert all("\ufffd" not in p for p in pieces)
    if which is not None:
        assert d.finished and text.find(d.stop_string) == text.find(which)


def test_smollm2_tokenizer_streams_the_same_text_as_a_whole_decode(smollm2_torch):
    tok = smollm2_torch.tokenizer
    text = "The café's ünïcode — 日本語のテキスト, emoji 🙂🙃 and   spaces\n\tend. 12345"
    ids = tok.encode(text)
    pieces, d = stream(tok, text)
    assert d.text == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
    pieces, d = stream(tok, text, ["テキ", "ünï"])
    assert d.text == "The café's " and d.stop_string == "ünï"


class _WholeWords:
    """A one-token tokenizer whose token 0 decodes to a text holding two stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "xabcd" * len(ids)
