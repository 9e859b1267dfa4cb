"""A reply's text as its tokens arrive: what may be sent now, and where a stop sequence cuts it.

The text is always the decoding of all tokens so far (so the streamed pieces join to exactly the whole reply's
text), cut before the first stop sequence (OpenAI's rule: the stop sequence is not returned). A piece is held
back while it ends in an incomplete UTF-8 character, or in what may be the start of a stop sequence."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not complete yet


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False  # a stop sequence ended the text
        self._cut: int | None = None  # tokens whose text the reply kept (set at a stop sequence)

    def add(self, token: int) -> str:
        """Take one more token; return the text that can be sent now (maybe empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._decoded()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.stopped, self._cut = True, len(self.tokens)
            return self._send(text[:cut])
        safe = len(text.rstrip(REPLACEMENT))
        for stop in self.stops:  # hold back a tail that a stop sequence may still complete
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        return self._send(text[:safe])

    def finish(self) -> str:
        """The reply ended: whatever was held back."""
        text = self.text()
        return self._send(text)

    def text(self) -> str:
        """The whole reply so far, cut before any stop sequence."""
        text = self._decoded()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:cut]

    def kept_tokens(self) -> int:
        """How many tokens the reply's text comes from (the tokens up to the one that completed a stop sequence)."""
        return self._cut if self._cut is not None else len(self.tokens)

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens)

    def _send(self, text: str) -> str:
        piece = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return piece
