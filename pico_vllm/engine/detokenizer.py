"""Incremental detokenization with stop strings, one instance per request."""

from __future__ import annotations

from mlx_lm.tokenizer_utils import TokenizerWrapper

# Prompt tokens decoded ahead of the output as context: tokenizers drop or change a token's leading
# space at the start of a text (SentencePiece's "▁Paris" decodes alone to "Paris"), never mid-text.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a request's tokens into text as they arrive and watches for stop strings.

    ``text`` always equals ``tokenizer.decode(output_ids)`` (special tokens skipped), built in
    O(1) work per token with vLLM's two offsets: ``_prefix`` starts a short window of ids decoded
    for context, ``_read`` ends the ids whose text is already in ``text``. A new token's text is
    ``decode(window + token) - decode(window)``, held back while it ends in an incomplete UTF-8
    character (U+FFFD).

    Streaming holds back the last ``len(longest stop) - 1`` characters: they might be the start
    of a stop string, which must never reach the client.
    """

    def __init__(self, tokenizer: TokenizerWrapper, stop: list[str], prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix, self._read = 0, len(self._ids)
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._searched = 0  # text before this index holds no stop string
        self._emitted = 0
        self._decoded = ""  # the output's text so far, before any stop-string cut
        self.text = ""
        self.matched_stop: str | None = None  # the stop string the text was cut at

    def add_token(self, token_id: int) -> bool:
        """Append one token; True if the text now contains a stop string (cut at its start)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def finalize(self) -> bool:
        """Flush what was held back waiting for the rest of a UTF-8 character."""
        return self._advance(final=True)

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus the possible start of a stop string unless finished."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._holdback)
        delta, self._emitted = self.text[self._emitted : end], end
        return delta

    def _advance(self, final: bool) -> bool:
        if len(self._ids) > self._read:
            decode = self._tokenizer.decode
            before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
            after = decode(self._ids[self._prefix :], skip_special_tokens=True)
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                self._decoded += after[len(before) :]
                self._prefix, self._read = self._read, len(self._ids)
        return self._search(self._decoded)

    def _search(self, text: str) -> bool:
        start = max(0, self._searched - self._holdback)
        hits = [(i, s) for s in self._stop if (i := text.find(s, start)) >= 0]
        if hits:
            at, self.matched_stop = min(hits)
            self.text = text[:at]
            return True
        self.text, self._searched = text, len(text)
        return False
