"""Token ids -> text deltas for streaming, with stop strings found on the decoded text.

A byte-level tokenizer can end a token in the middle of a UTF-8 character (decoded as U+FFFD until the
next token completes it), and a stop string can span tokens. So each new token re-decodes the whole
completion, emits only text that can no longer change, and holds back a tail that could still be the
start of a stop string. Concatenating every delta gives exactly `tokenizer.decode(new_ids)` (trimmed at
the first stop string): the same text `hotcold run` prints.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out (always a prefix of the final text)
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith(REPLACEMENT):  # an incomplete character: the next token may complete it
            return ""
        return self._advance(text, final=False)

    def finish(self) -> str:
        """No more tokens: return the rest of the text (up to a stop string, if one was found)."""
        if self.stopped:
            return ""
        return self._advance(self.tok.decode(self.ids), final=True)

    @property
    def text(self) -> str:
        return self.emitted

    def _advance(self, text: str, final: bool) -> str:
        if not text.startswith(self.emitted):
            # The decoder rewrote text it had already produced (not seen with the byte-level and
            # SentencePiece decoders hotcold builds); wait for it to settle rather than emit a wrong delta.
            if not final:
                return ""
            text = self.emitted + text[len(self.emitted):]
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        if final:
            return self._emit(text)
        return self._emit(text[:len(text) - self._held_tail(text)])

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        delta = upto[len(self.emitted):]
        self.emitted = upto
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string (it may yet complete it)."""
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
