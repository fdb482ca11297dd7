"""Incremental detokenization with stop strings, one instance per request."""

from __future__ import annotations

from mlx_lm.tokenizer_utils import TokenizerWrapper


class IncrementalDetokenizer:
    """Turns a request's tokens into text as they arrive and watches for stop strings.

    Streaming holds back the last ``len(longest stop) - 1`` characters: they might be the start
    of a stop string, which must never reach the client.
    """

    def __init__(self, tokenizer: TokenizerWrapper, stop: list[str]) -> None:
        self._stream = tokenizer.detokenizer  # mlx-lm's streaming detokenizer (a fresh copy)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._searched = 0  # text before this index holds no stop string
        self._emitted = 0
        self.text = ""

    def add_token(self, token_id: int) -> bool:
        """Append one token; True if the text now contains a stop string (cut at its start)."""
        self._stream.add_token(token_id)
        return self._update(self._stream.text)

    def finalize(self) -> bool:
        """Flush bytes the streaming detokenizer held back (e.g. half a UTF-8 character)."""
        self._stream.finalize()
        return self._update(self._stream.text)

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus the possible start of a stop string unless finished."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._holdback)
        delta, self._emitted = self.text[self._emitted : end], end
        return delta

    def _update(self, text: str) -> bool:
        start = max(0, self._searched - self._holdback)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return True
        self.text, self._searched = text, len(text)
        return False
