"""Streaming text out of a token stream: incremental detokenization and stop-string matching."""

from __future__ import annotations

from collections.abc import Iterable

# Prompt tokens kept as decoding context, as vLLM: enough for a leading space or a multi-token
# character to come out right, few enough that each step decodes a short window.
PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def _special_ids(tok) -> frozenset[int]:
    """Ids that decode(skip_special_tokens=True) drops."""
    if hasattr(tok, "get_added_tokens_decoder"):  # tokenizers.Tokenizer
        return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    return frozenset(getattr(tok, "all_special_ids", ()))  # transformers tokenizers


class IncrementalDetokenizer:
    """Streaming detokenization: feed token ids one by one, get text deltas that are always valid
    UTF-8 and never split a character that spans several tokens (held back while the decoded tail
    ends with U+FFFD), and that concatenate to exactly tokenizer.decode(all_ids) -- or, with
    prompt_ids, to decode(prompt + ids) minus decode(prompt), the continuation in context.

    Prefix-offset technique (vLLM, HF TextStreamer): decode a window that starts a few tokens back
    and diff it against the same window without the new tokens. Decoding a suffix alone would lose
    context-dependent text, e.g. the leading space a Metaspace (SentencePiece) decoder strips from
    the first token; both decodes of the window start at the same token, so such edits cancel.

    `tokenizer` is nemotron's Tokenizer, a `tokenizers.Tokenizer`, or anything with
    decode(ids, skip_special_tokens=...)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, prompt_ids: Iterable[int] | None = None,
                 keep: Iterable[str] = ()) -> None:
        """keep: special tokens to keep in the text even when skipping specials (e.g. the reasoning
        and tool-call tags an output parser needs, in tokenizers that mark them special)."""
        self._tok = getattr(tokenizer, "backend", tokenizer)
        # Skipped specials never enter the window: decode(skip_special_tokens=True) drops them before
        # the decoder runs anyway, so leaving them out changes no text and keeps the window short.
        self._skip = _special_ids(self._tok) if skip_special_tokens else frozenset()
        kept = {self._tok.token_to_id(t) for t in keep} if hasattr(self._tok, "token_to_id") else set()
        self._skip -= kept
        # with tokens to keep, filtering is done here and the decoder must not drop them again
        self.skip_special_tokens = skip_special_tokens and not kept
        context = [t for t in (prompt_ids or ()) if t not in self._skip][-PROMPT_CONTEXT:]
        self._window: list[int] = context  # decoded each step; [:_read] is already emitted
        self._read = len(context)
        self.token_ids: list[int] = []
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self._window[:self._read])
        full = self._decode(self._window)
        # hold back while nothing new appeared or a multi-token character is incomplete
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        delta = full[len(prefix):]
        self._window = self._window[self._read:]  # the emitted tokens become the next prefix
        self._read = len(self._window)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        if token_id in self._skip:
            return ""
        self._window.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever was held back (an incomplete character decodes to
        U+FFFD, exactly as tokenizer.decode renders it)."""
        return self._advance(final=True) if self._read < len(self._window) else ""


class StopStrings:
    """Stop-string matching on streamed text: `push(delta) -> (emit, stopped)` emits only text that
    can no longer be part of a stop string (holds back a suffix that is a prefix of any stop
    string) and stops at the first occurrence; the stop string itself is not emitted (OpenAI, vLLM).
    After a stop every push returns ("", True). `flush()` returns the held-back text at the end of
    a stream that did not stop."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = list(stops)
        if not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError("stop strings must be non-empty strings")
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        # earliest occurrence wins; nothing before the held-back suffix can start a stop string
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits, key=lambda h: (h[0], len(h[1])))
            self.stopped, self._held = True, ""
            return text[:i], True
        n = self._held_back(text)
        self._held = text[len(text) - n:]
        return text[:len(text) - n], False

    def flush(self) -> str:
        held, self._held = self._held, ""  # empty after a stop
        return held
