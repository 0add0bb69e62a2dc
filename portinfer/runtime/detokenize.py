"""Incremental detokenization with stop strings: per-token host work that does not grow with the text.

Decoding a sequence's whole text after every token costs O(length) per token (0.26 ms per step at
2,000 tokens, times every sequence in a batch). Here each token decodes only a window of recent
ids (vLLM's and text-generation-inference's "prefix offset / read offset" technique):

    ids:  ... | prefix_offset ... read_offset | read_offset ... end |
                 already shown (context)          not yet shown

    new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

The context tokens make the decoder see the same neighbourhood it would see in the whole text (a
leading space, a byte sequence split across tokens). A window that ends in U+FFFD (an
incomplete UTF-8 character: byte-level BPE splits characters across tokens) is not shown yet.

Stop strings: the text that could still become a stop string is held back, and the stop string
that occurs first in the text wins, whichever is listed first. Held-back text is always shorter
than the longest stop string, and any stop string can only start inside it (a start in text
already shown would have made that text a held-back prefix), so the search is bounded too.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids one at a time; each `add` returns the text that became final.

    `finished` is set once a stop string appeared (`stop_string` says which); `flush()` returns
    the held-back text when the sequence ends otherwise (eos, length). `text` is everything
    returned so far (kept as pieces: joining happens once, on read).
    """

    def __init__(self, tokenizer, stops=(), skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops]
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop: expected non-empty strings, got {stops!r}")
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.held = ""  # decoded, not yet returned: could still be (the start of) a stop string
        self.finished = False
        self.stop_string: str | None = None
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self, final: bool) -> str:
        """Text of the ids after read_offset, decoded against the window's context."""
        if self.read_offset >= len(self.ids):
            return ""
        window = self.ids[self.prefix_offset:]
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset]) if self.read_offset > self.prefix_offset \
            else ""
        full = self._decode(window)
        if not final and (len(full) <= len(prefix) or full.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet, or an incomplete UTF-8 character: wait for more ids
        # the window's context becomes the ids just shown (a constant-size window)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def add(self, token_id: int) -> str:
        """Account for one generated id; returns the text that became final (may be "")."""
        if self.finished:
            raise ValueError("detokenizer: a stop string already ended this sequence")
        self.ids.append(int(token_id))
        return self._emit(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """The sequence ended without a stop string: everything held back is final now."""
        if self.finished:
            return ""
        return self._emit(self._new_text(final=True), final=True)

    def _emit(self, new: str, final: bool) -> str:
        pending = self.held + new
        if self.stops and pending:
            first, which = -1, None
            for stop in self.stops:
                at = pending.find(stop)
                if at >= 0 and (first < 0 or at < first):
                    first, which = at, stop
            if which is not None:
                self.finished, self.stop_string, self.held = True, which, ""
                return self._take(pending[:first])
        if final:
            self.held = ""
            return self._take(pending)
        keep = _held_back(pending, self.stops)
        self.held = pending[len(pending) - keep:] if keep else ""
        return self._take(pending[:len(pending) - keep])

    def _take(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece


def _held_back(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
