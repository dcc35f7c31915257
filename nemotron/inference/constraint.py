"""Constrained decoding: a request's output (or the part after its reasoning) follows a grammar.

The grammar engine is llguidance: grammars are Lark text with JSON schemas embedded (`%json{...}`),
compiled against the tokenizer's vocabulary into a matcher that gives, before each token, the set of
tokens that keep the output inside the grammar (a bitmask, computed lazily per step: a few
microseconds to tens of microseconds per row), and that follows the tokens actually emitted.

A `Constraint` sits on one engine Request. It may wait for a token before it starts (the end of the
reasoning, `</think>`: reasoning stays free, the constraint starts where the answer starts). While it
is active, the engine masks the row's logits with `allowed` before sampling and feeds every emitted
token (sampled, forced or an accepted speculative draft) to `observe`. When the grammar is complete
only the end-of-turn tokens are allowed, so the request stops by itself.

`StructuredOutput` turns the ways a request asks for structure (OpenAI's `response_format`, vLLM's
`structured_outputs` / `guided_*` fields) into the grammar rule of the answer.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Constraint", "ConstraintError", "Grammar", "GrammarCompiler", "allowed_tokens", "StructuredOutput", "grammar_compiler",
           "json_rule", "lark_string"]


class ConstraintError(ValueError):
    """A grammar, schema or structured-output request that cannot be used (one line)."""


# compact JSON as json.dumps writes it (", " and ": "), no free whitespace: a free-whitespace JSON
# grammar lets a model pad its output with blanks until max_tokens
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict | bool) -> str:
    """The Lark expression of a JSON value that validates against `schema` (compact separators)."""
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError("a JSON schema must be an object")
    return "%json" + json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def lark_string(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=True)


@dataclass(frozen=True)
class Grammar:
    """What a request asks to be constrained by: Lark text (its `start` rule is the output), and the
    token id after which it starts (None: from the first token)."""

    lark: str
    starts_after: int | None = None


@dataclass(frozen=True)
class StructuredOutput:
    """What the answer must be. kind: "json_schema" (value: the schema), "json_object" (any JSON
    object), "regex" (a pattern the whole answer matches), "choice" (one of a list of strings) or
    "grammar" (a Lark grammar whose `start` rule is the answer)."""

    kind: str
    value: Any = None

    KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ConstraintError(f"unknown structured output kind {self.kind!r}; expected one of {self.KINDS}")
        if self.kind == "json_schema" and not isinstance(self.value, (dict, bool)):
            raise ConstraintError("a json_schema structured output needs the schema (an object)")
        if self.kind == "regex" and not (isinstance(self.value, str) and self.value):
            raise ConstraintError("a regex structured output needs a non-empty pattern")
        if self.kind == "choice" and not (isinstance(self.value, list) and self.value
                                          and all(isinstance(c, str) and c for c in self.value)):
            raise ConstraintError("a choice structured output needs a non-empty list of non-empty strings")
        if self.kind == "grammar" and not (isinstance(self.value, str) and self.value.strip()):
            raise ConstraintError("a grammar structured output needs a Lark grammar")

    def rules(self, name: str = "answer") -> str:
        """Lark rules defining `name` as the answer (a grammar's rules are renamed under `name`)."""
        if self.kind == "json_schema":
            return f"{name}: {json_rule(self.value)}\n"
        if self.kind == "json_object":
            return f"{name}: {json_rule({'type': 'object'})}\n"
        if self.kind == "regex":
            return f"{name}: /{self.value.replace('/', chr(92) + '/')}/\n"
        if self.kind == "choice":
            return f"{name}: " + " | ".join(lark_string(c) for c in self.value) + "\n"
        # a user grammar: its `start` becomes `name`, its other rules keep their names
        return f"{name}: {name}_start\n" + _rename_start(self.value, f"{name}_start")

    def grammar(self, starts_after: int | None = None) -> Grammar:
        """The whole output is this answer."""
        return Grammar("start: answer\n" + self.rules("answer"), starts_after)

    @classmethod
    def from_response_format(cls, fmt: Any) -> "StructuredOutput | None":
        """OpenAI's chat `response_format`: {"type": "text"} (None), {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise ConstraintError("response_format must be an object")
        kind = fmt.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise ConstraintError("response_format json_schema needs 'json_schema': {\"name\", \"schema\"}")
            schema = spec.get("schema", {})
            if not isinstance(schema, (dict, bool)):
                raise ConstraintError("response_format json_schema.schema must be an object")
            return cls("json_schema", schema)
        raise ConstraintError(f"response_format type {kind!r} is not supported "
                              "(expected 'text', 'json_object' or 'json_schema')")

    @classmethod
    def from_request(cls, body: dict) -> "StructuredOutput | None":
        """vLLM's request fields: `structured_outputs` ({"json" | "regex" | "choice" | "grammar" |
        "json_object": ...}) and the older `guided_json`, `guided_regex`, `guided_choice`,
        `guided_grammar`. At most one kind may be given."""
        found: list[StructuredOutput] = []
        so = body.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise ConstraintError("structured_outputs must be an object")
            for key, kind in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"),
                              ("grammar", "grammar")):
                if so.get(key) is not None:
                    found.append(cls(kind, _schema(so[key]) if kind == "json_schema" else so[key]))
            if so.get("json_object"):
                found.append(cls("json_object"))
        for key, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if body.get(key) is not None:
                found.append(cls(kind, _schema(body[key]) if kind == "json_schema" else body[key]))
        if len(found) > 1:
            raise ConstraintError("give one structured output (json, regex, choice or grammar), not several")
        return found[0] if found else None


def _schema(value: Any) -> Any:
    """A schema given as an object or as its JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ConstraintError("the JSON schema is not valid JSON") from None
    return value


def _rename_start(grammar: str, new: str) -> str:
    lines = []
    for line in grammar.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("start:") or stripped.startswith("start :"):
            line = line[:len(line) - len(stripped)] + new + stripped[len("start"):]
        lines.append(line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the compiler: one per tokenizer
# --------------------------------------------------------------------------------------------------


class GrammarCompiler:
    """Compiles Lark grammars into matchers over one tokenizer's vocabulary. Building the vocabulary
    index takes tens of milliseconds (a second for a 256k vocabulary): share one per tokenizer
    (`grammar_compiler`)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int] | list[int]) -> None:
        import llguidance

        self._llguidance = llguidance
        eos = sorted(stop_ids)
        if not eos:
            raise ConstraintError("constrained decoding needs the model's end-of-turn token ids")
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)

    def matcher(self, grammar: str):
        """A fresh matcher for Lark `grammar`; ConstraintError (one line) when it does not compile."""
        llg = self._llguidance
        m = llg.LLMatcher(self.tokenizer, llg.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if m.is_error():
            raise ConstraintError("the grammar does not compile: " + _one_line(m.get_error()))
        return m


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


_compilers: "weakref.WeakKeyDictionary[Any, GrammarCompiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer, vocab_size: int, stop_ids: set[int] | list[int]) -> GrammarCompiler:
    """The GrammarCompiler of `tokenizer` (built once, kept while the tokenizer lives)."""
    with _compilers_lock:
        c = _compilers.get(tokenizer)
        if c is None or c.vocab_size != vocab_size:
            c = _compilers[tokenizer] = GrammarCompiler(tokenizer, vocab_size, stop_ids)
        return c


# --------------------------------------------------------------------------------------------------
# the per-request constraint
# --------------------------------------------------------------------------------------------------

_BITS = torch.arange(32, dtype=torch.int32)


class Constraint:
    """A grammar on one request's output. `starts_after`: a token id (the reasoning's closing tag)
    before which the output is free, except that it may not end the turn (`stop_ids`): the answer
    comes after the reasoning; None: the grammar applies from the first token."""

    def __init__(self, matcher, vocab_size: int, starts_after: int | None = None,
                 stop_ids: frozenset[int] = frozenset()) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.starts_after = starts_after
        self.stop_ids = frozenset(stop_ids)
        self.active = starts_after is None

    def observe(self, token: int) -> None:
        """Follow one emitted token. Raises ConstraintError if the grammar does not allow it (the engine
        then ends the request alone)."""
        if not self.active:
            if token == self.starts_after:
                self.active = True
            return
        if not self.matcher.consume_token(token):
            raise ConstraintError("a token outside the grammar was emitted: " + _one_line(self.matcher.get_error()))

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, emitted in order from here, the grammar allows (speculative drafts are
        cut there); the matcher's state is unchanged."""
        if not self.active:
            for at, token in enumerate(tokens):
                if token == self.starts_after:
                    return at + 1 + self.matcher.validate_tokens(tokens[at + 1:])
                if token in self.stop_ids:   # the turn may not end before the answer
                    return at
            return len(tokens)
        return self.matcher.validate_tokens(tokens)


def allowed_tokens(constraints: list[Constraint]) -> torch.Tensor:
    """[n, V] bool: the tokens each (active) constraint allows next. One row after another: the grammar
    engine's thread pool (`fill_next_token_bitmask_par`) cost 170 us a row against 20 us here on a
    2-core CPU, where its threads contend with torch's (benchmarks/structured.py)."""
    import llguidance.torch as llt

    vocab = constraints[0].vocab_size
    bitmask = torch.empty(len(constraints), (vocab + 31) // 32, dtype=torch.int32)
    for i, c in enumerate(constraints):
        llt.fill_next_token_bitmask(c.matcher, bitmask, i)
    return ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(len(constraints), -1)[:, :vocab]
