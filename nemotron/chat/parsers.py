"""Split a Nemotron model's generated text into reasoning, content and OpenAI-shaped tool calls.

Two output formats:

``"nemotron3"`` (Nemotron 3 Nano / Super / Ultra)
    Reasoning ends with ``</think>`` (the generation prompt already opened ``<think>``); tool calls are
    Qwen3-Coder XML blocks in the content::

        <tool_call>
        <function=NAME>
        <parameter=KEY>
        VALUE
        </parameter>
        </function>
        </tool_call>

    Each VALUE loses one leading and one trailing newline and is typed by the tool's JSON schema.

``"nemotron_json"`` (Nemotron Nano 2, Llama-Nemotron)
    Optional ``<think>...</think>`` reasoning, tool calls as
    ``<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>``.

Entry points: :func:`parse_output` for a finished generation and :class:`StreamingParser` for text that
arrives in pieces (any split, down to one character, even inside a tag).  ``parse_output(text)`` is
exactly what a :class:`StreamingParser` fed ``text`` produces, so streamed deltas always concatenate to
the non-streamed result (apart from the random call ids).

Behaviour (the decisions a caller may care about):

* ``thinking=True``, ``prompt_opens_think=True`` (the default): the output starts inside the reasoning.
  Text before the first ``</think>`` is reasoning, text after it content.  No ``</think>`` at all means
  the whole output is reasoning (vLLM ``nemotron_v3``).  A ``<think>`` the model emits anyway is dropped.
* ``thinking=True``, ``prompt_opens_think=False`` (e.g. Llama-Nemotron "detailed thinking on"): the
  reasoning only starts if the output begins (after whitespace) with ``<think>``; otherwise everything
  is content.
* ``thinking=False`` (prompt ended with ``<think></think>``): everything is content.
* ``<think>`` / ``</think>`` tags met in the content are dropped (they are template tokens, never answer
  text).
* Reasoning and content are each stripped of leading and trailing whitespace as a whole (the chat
  templates render them as ``<think>\\n{reasoning}\\n</think>\\n{content | trim}``); an empty one is
  ``None``.  Streaming therefore also holds back a run of whitespace until non-whitespace text follows
  it; everything else is emitted as soon as it cannot be the start of a tag.
* Tool calls are recognised in the content and also inside the reasoning: a *complete and valid*
  call block inside the reasoning is hoisted out (removed from the reasoning, returned as a tool call);
  the known failure of Nemotron 3 emitting its call before ``</think>`` therefore still yields the call.
  If the same call (same name, JSON-equal arguments) then appears again in the content, that repeat is
  dropped, so a call drafted in the reasoning and then made for real is returned once.
  While a tool-call block is open its text is held back (in the reasoning too) until it closes.
* A block that cannot be used becomes plain text of the span it was found in (content, or reasoning if
  it was inside the reasoning), kept verbatim tags included, and a :class:`ToolCallWarning` is issued
  (``warnings.warn``; also listed in ``ParsedOutput.warnings`` / ``StreamingParser.warnings``).  This
  covers: malformed JSON; no ``<function=NAME>``; an empty or non-identifier name; a function name that
  is not in ``tools`` (when ``tools`` is a non-empty list; vLLM would return such a call, we do not,
  because a client cannot execute it and would loop; the text shows the user what the model tried);
  a block still open at the end of the output, at a ``</think>``, or when a new opening tag starts.
  ``<TOOLCALL>`` lists are all-or-nothing: one bad entry keeps the whole block as text.
* A block ends at the first closing tag after it (``</tool_call>`` / ``</TOOLCALL>``); a literal closing
  tag inside an argument value is not supported.
* Parsing never raises on any model output.

Qwen3-Coder parameter typing (``"nemotron3"``), by the property's schema ``type`` (a string, a list of
types, or ``anyOf``/``oneOf`` alternatives, tried in order):
``string`` (or any string-like alias) keeps the raw text, even ``"123"`` or ``"null"``; ``integer``
(``"5"``, or an integral ``"5.0"``) -> int; ``number`` -> int if written as an integer, else float
(finite only); ``boolean`` -> ``true``/``false`` case-insensitively (``True`` from a Python-rendered
template too); ``object``/``array`` -> ``json.loads`` (falling back to a Python literal such as
``{'a': 1}``) of the matching container type; ``null`` or a nullable type -> ``None`` for ``null`` /
``None``.  A value that fits none of its types stays a string (vLLM turns a bad boolean into ``false``;
we keep the text).  A parameter with no schema (no tools, a function without ``parameters``, a key not in
``properties``, or no usable ``type``) is parsed as JSON only when it obviously is a JSON object or array
(starts with ``{`` or ``[``), otherwise it stays a string.  Tolerated malformations: a missing final
``</parameter>`` (the value then ends at the next ``\\n<parameter=`` or at ``</function>``) and a
missing ``</function>``.  Text outside ``<function=...>`` and the parameters is ignored, like vLLM.

``"nemotron_json"`` entries: ``arguments`` (or ``parameters``) may be an object, a JSON string of an
object, empty/absent (-> ``{}``); a single object instead of a list is accepted.  Arguments are not
re-typed (they are already JSON).

Streaming tool calls: each call is emitted whole, in one delta entry, when its closing tag arrives::

    {"index": i, "id": "call_...", "type": "function",
     "function": {"name": NAME, "arguments": "<complete JSON object>"}}

OpenAI clients accept a call delivered in one chunk as well as in fragments.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nemotron.chat.formats import CHAT_FORMATS, get_format

__all__ = [
    "FORMATS", "ParsedOutput", "Delta", "StreamingParser", "ToolCallWarning", "parse_output",
]

FORMATS = tuple(CHAT_FORMATS)   # the format names; their tags live in nemotron.chat.formats

# states
_START, _REASONING, _CONTENT, _BLOCK = "start", "reasoning", "content", "block"


class ToolCallWarning(UserWarning):
    """A tool-call block in the model output could not be used; its text was kept as plain text."""


class _Malformed(Exception):
    pass


# ----------------------------------------------------------------------------------------- results


@dataclass
class ParsedOutput:
    """A finished generation split into its parts (``None`` where a part is empty)."""

    reasoning: str | None = None
    content: str | None = None
    # [{"id": "call_...", "type": "function", "function": {"name": str, "arguments": JSON str}}]
    tool_calls: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_message(self) -> dict:
        """OpenAI chat ``message`` dict; reasoning under both ``reasoning`` and ``reasoning_content``."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning"] = self.reasoning
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [dict(c, function=dict(c["function"])) for c in self.tool_calls]
        return msg


@dataclass
class Delta:
    """What one :meth:`StreamingParser.feed` / :meth:`~StreamingParser.finish` call adds.

    ``tool_calls`` entries have the OpenAI streaming shape
    ``{"index": i, "id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}``.
    """

    kind: ClassVar[str] = "delta"   # tells a Delta from the ChatResult that ends a stream

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def to_openai(self) -> dict:
        """OpenAI ``choices[].delta`` dict holding only the non-empty fields."""
        d: dict[str, Any] = {}
        if self.reasoning:
            d["reasoning"] = self.reasoning
            d["reasoning_content"] = self.reasoning
        if self.content:
            d["content"] = self.content
        if self.tool_calls:
            d["tool_calls"] = [dict(c, function=dict(c["function"])) for c in self.tool_calls]
        return d


# ---------------------------------------------------------------------------------- tool schemas


def _tool_index(tools: list[dict] | None) -> dict[str, dict | None] | None:
    """name -> JSON-schema ``properties`` (None if the tool declares none); None when no tools given."""
    if not tools:
        return None
    index: dict[str, dict | None] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if not isinstance(name, str):
            continue
        params = resolve_refs(fn.get("parameters"))
        props = params.get("properties") if isinstance(params, dict) else None
        index[name] = props if isinstance(props, dict) else None
    return index


_MAX_REF_DEPTH = 8


def resolve_refs(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """`schema` with its local references (`{"$ref": "#/$defs/Name"}`, as pydantic writes nested
    models and enums) replaced by what they point to, so that each property's schema stands alone.
    A reference nested deeper than a few levels (a recursive model) is left as it is."""
    root = schema if root is None else root
    if isinstance(schema, list):
        return [resolve_refs(x, root, depth) for x in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and depth < _MAX_REF_DEPTH:
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            return resolve_refs({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, root, depth + 1)
    return {k: v if k in ("$defs", "definitions") else resolve_refs(v, root, depth) for k, v in schema.items()}


_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


def _canonical_type(t: str) -> str | None:
    t = t.strip().lower()
    if t in _STRING_TYPES:
        return "string"
    if t == "null" or t == "none":
        return "null"
    if t.startswith(("bool", "binary")):
        return "boolean"
    if t.startswith(("int", "uint", "long", "short", "unsigned")):
        return "integer"
    if t.startswith(("num", "float", "double", "decimal")):
        return "number"
    if t.startswith(("object", "dict", "map")):
        return "object"
    if t.startswith(("array", "arr", "list")):
        return "array"
    return None


def schema_types(schema: Any, depth: int = 0) -> list[str]:
    if not isinstance(schema, dict) or depth > 8:
        return []
    out: list[str] = []
    t = schema.get("type")
    for x in ([t] if isinstance(t, str) else t if isinstance(t, list) else []):
        if isinstance(x, str) and (c := _canonical_type(x)) is not None:
            out.append(c)
    for key in ("anyOf", "oneOf"):
        opts = schema.get(key)
        if isinstance(opts, list):
            for opt in opts:
                out.extend(schema_types(opt, depth + 1))
    if not out:
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
            out.append("string")
        elif isinstance(schema.get("properties"), dict):
            out.append("object")
        elif "items" in schema:
            out.append("array")
    return out


_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_LITERAL = 100_000


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, OverflowError, RecursionError):
        return False


def _load_container(text: str) -> Any:
    s = text.strip()
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        pass
    if len(s) <= _MAX_LITERAL:
        try:
            return ast.literal_eval(s)
        except Exception:  # literal_eval raises many kinds (ValueError, SyntaxError, MemoryError, ...)
            pass
    raise _Malformed("not a JSON/Python literal")


def _convert_as(value: str, typ: str) -> Any:
    """Value typed as ``typ``; raises _Malformed when it does not fit."""
    s = value.strip()
    if typ == "integer":
        if _INT_RE.fullmatch(s):
            return int(s)
        if _FLOAT_RE.fullmatch(s):
            f = float(s)
            if math.isfinite(f) and f == int(f):
                return int(f)
    elif typ == "number":
        if _INT_RE.fullmatch(s):
            return int(s)
        if _FLOAT_RE.fullmatch(s):
            f = float(s)
            if math.isfinite(f):
                return f
    elif typ == "boolean":
        if s.lower() in ("true", "false"):
            return s.lower() == "true"
    elif typ == "null":
        if s in ("null", "None"):
            return None
    elif typ in ("object", "array"):
        v = _load_container(s)
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, dict if typ == "object" else list) and _json_safe(v):
            return v
    raise _Malformed(typ)


def _guess(value: str) -> Any:
    """No schema: JSON only when it obviously is an object or array, else the string."""
    s = value.strip()
    if s[:1] in ("{", "["):
        try:
            v = json.loads(s)
        except (ValueError, RecursionError):
            return value
        if isinstance(v, (dict, list)) and _json_safe(v):
            return v
    return value


def _convert_param(value: str, schema: Any) -> Any:
    types = schema_types(schema)
    if not types:
        if isinstance(schema, dict) and ("enum" in schema or "const" in schema):
            allowed = schema["enum"] if "enum" in schema else [schema["const"]]
            try:   # an untyped enum of numbers, booleans...: the JSON value that is one of them
                v = json.loads(value.strip())
            except (ValueError, RecursionError):
                v = value
            if isinstance(allowed, list) and any(v == a and type(v) is type(a) for a in allowed):
                return v
        return _guess(value)
    if "null" in types and value.strip() in ("null", "None"):
        return None
    if "string" in types:
        return value
    for typ in types:
        try:
            return _convert_as(value, typ)
        except _Malformed:
            continue
    return value


# ------------------------------------------------------------------------------ block parsers

_FORBIDDEN_NAME_CHARS = set("{}<>\"'") | set(" \t\r\n")


def _check_name(name: Any, index: dict | None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _Malformed("missing function name")
    name = name.strip()
    if any(c in _FORBIDDEN_NAME_CHARS for c in name):
        raise _Malformed(f"invalid function name {name!r}")
    if index is not None and name not in index:
        raise _Malformed(f"unknown function {name!r} (not in the tool list)")
    return name


_FUNC, _FUNC_END = "<function=", "</function>"
_PARAM, _PARAM_END = "<parameter=", "</parameter>"


def _parse_xml_block(inner: str, index: dict | None) -> list[tuple[str, str]]:
    """Body of one ``<tool_call>`` block -> [(name, arguments JSON)]."""
    i = inner.find(_FUNC)
    if i < 0:
        raise _Malformed("no <function=NAME> in <tool_call>")
    j = inner.find(">", i + len(_FUNC))
    if j < 0:
        raise _Malformed("unterminated <function=NAME>")
    name = _check_name(inner[i + len(_FUNC):j], index)
    props = index.get(name) if index is not None else None
    body = inner[j + 1:]
    k = body.rfind(_FUNC_END)
    if k >= 0:
        body = body[:k]
    args: dict[str, Any] = {}
    pos = 0
    while True:
        p = body.find(_PARAM, pos)
        if p < 0:
            break
        q = body.find(">", p + len(_PARAM))
        if q < 0:
            raise _Malformed("unterminated <parameter=NAME>")
        key = body[p + len(_PARAM):q].strip()
        if not key:
            raise _Malformed("empty parameter name")
        start = q + 1
        end = body.find(_PARAM_END, start)
        nxt = body.find("\n" + _PARAM, start)
        if nxt >= 0 and (end < 0 or nxt < end):  # missing </parameter>: the next parameter ends it
            value, pos = body[start:nxt + 1], nxt + 1
        elif end >= 0:
            value, pos = body[start:end], end + len(_PARAM_END)
        else:  # missing final </parameter>
            value, pos = body[start:], len(body)
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        schema = props.get(key) if isinstance(props, dict) else None
        v = _convert_param(value, schema)
        args[key] = v if _json_safe(v) else value
    return [(name, json.dumps(args, ensure_ascii=False))]


def _parse_json_block(inner: str, index: dict | None) -> list[tuple[str, str]]:
    """Body of one ``<TOOLCALL>`` block -> [(name, arguments JSON)]."""
    try:
        data = json.loads(inner.strip())
    except (ValueError, RecursionError) as e:
        raise _Malformed(f"invalid JSON in <TOOLCALL>: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise _Malformed("<TOOLCALL> must hold a JSON list of calls")
    calls = []
    for item in data:
        if not isinstance(item, dict):
            raise _Malformed("tool call entry is not a JSON object")
        name = _check_name(item.get("name"), index)
        args = item.get("arguments", item.get("parameters"))
        if args is None:
            args = {}
        if isinstance(args, str):
            if not args.strip():
                args = {}
            else:
                try:
                    args = json.loads(args)
                except (ValueError, RecursionError):
                    raise _Malformed(f"arguments of {name!r} are not JSON") from None
        if not isinstance(args, dict):
            raise _Malformed(f"arguments of {name!r} are not a JSON object")
        try:
            calls.append((name, json.dumps(args, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, RecursionError):
            raise _Malformed(f"arguments of {name!r} are not valid JSON") from None
    return calls


_BLOCK_PARSERS = {"nemotron3": _parse_xml_block, "nemotron_json": _parse_json_block}


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --------------------------------------------------------------------------------- streaming


class StreamingParser:
    """Incremental parser; feed it the generated text in any pieces.

    ``feed`` returns the new reasoning / content / tool calls that are certain given the text so far;
    only a possible tag prefix (``<``, ``</thi``, ``<tool_c`` ...), a run of whitespace, or an open
    tool-call block is held back.  ``finish`` flushes the rest (an unclosed block becomes text with a
    warning).  Tool calls are emitted whole when their closing tag arrives.
    """

    def __init__(self, fmt: str = "nemotron3", thinking: bool = True, tools: list[dict] | None = None,
                 prompt_opens_think: bool = True, tool_calls: bool = True) -> None:
        chat_format = get_format(fmt)
        self.fmt = chat_format.name
        self.thinking = bool(thinking)
        self.prompt_opens_think = bool(prompt_opens_think)
        self._open, self._close = chat_format.call_open, chat_format.call_close
        self._think_open, self._think_close = chat_format.think_open, chat_format.think_close
        self._parse_block = _BLOCK_PARSERS[self.fmt]
        self._index = _tool_index(tools)
        if not self.thinking:
            self._state = _CONTENT
        else:
            self._state = _REASONING if self.prompt_opens_think else _START
        self._buf = ""
        self._origin = _CONTENT  # span a tool-call block was opened in
        self._scan = 0  # block state: where the search for its end resumes
        # tool_calls=False (tool_choice "none"): tool-call markup is left in the text as it is
        think = (self._think_open, self._think_close)
        self._text_tags = (*think, self._open) if tool_calls else think
        self._maxtag = max(len(t) for t in self._text_tags + (self._close,))
        self._started = {_REASONING: False, _CONTENT: False}
        self._ws = {_REASONING: "", _CONTENT: ""}
        self._n_calls = 0
        self._hoisted: list[tuple[str, Any]] = []  # calls taken out of the reasoning, not yet repeated
        self._finished = False
        self._out: Delta = Delta()
        self.warnings: list[str] = []

    # -- public ---------------------------------------------------------------------------

    def feed(self, text_delta: str) -> Delta:
        if self._finished:
            raise RuntimeError("StreamingParser.feed() called after finish()")
        if text_delta:
            self._buf += str(text_delta)
            self._process(final=False)
        return self._take()

    def finish(self) -> Delta:
        if not self._finished:
            self._finished = True
            self._process(final=True)
        return self._take()

    # -- emission ---------------------------------------------------------------------------

    def _take(self) -> Delta:
        out, self._out = self._out, Delta()
        return out

    def _emit(self, channel: str, text: str) -> None:
        """Append text to reasoning/content, trimming the span's leading and trailing whitespace."""
        if not text:
            return
        text = self._ws[channel] + text
        if not self._started[channel]:
            text = text.lstrip()
        body = text.rstrip()
        self._ws[channel] = text[len(body):]
        if body:
            self._started[channel] = True
            if channel == _REASONING:
                self._out.reasoning += body
            else:
                self._out.content += body

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, ToolCallWarning, stacklevel=2)

    def _finish_block(self, raw: str, inner: str | None, why: str | None = None) -> None:
        """A block ended: emit its calls, or its raw text to the span it came from."""
        if inner is not None:
            try:
                calls = self._parse_block(inner, self._index)
            except _Malformed as e:
                why = str(e)
            except Exception as e:  # any parser slip must not take the request down
                why = f"{type(e).__name__}: {e}"
            else:
                for name, arguments in calls:
                    key = (name, json.loads(arguments))
                    if self._origin == _REASONING:
                        self._hoisted.append(key)
                    elif key in self._hoisted:  # the call drafted in the reasoning, now made for real
                        self._hoisted.remove(key)
                        continue
                    self._out.tool_calls.append({
                        "index": self._n_calls, "id": _new_call_id(), "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    })
                    self._n_calls += 1
                return
        where = "reasoning" if self._origin == _REASONING else "content"
        self._warn(f"tool call kept as {where} text: {why}: {raw[:200]!r}")
        self._emit(self._origin, raw)

    # -- state machine ------------------------------------------------------------------------

    def _process(self, final: bool) -> None:
        while True:
            if self._state == _START:
                stripped = self._buf.lstrip()
                if stripped.startswith(self._think_open):
                    self._buf = stripped[len(self._think_open):]
                    self._state = _REASONING
                elif stripped and not self._think_open.startswith(stripped):
                    self._state = _CONTENT
                elif final:
                    self._state = _CONTENT
                else:
                    self._buf = stripped
                    return
            elif self._state == _BLOCK:
                if not self._step_block(final):
                    return
            else:
                if not self._step_text(final):
                    return

    def _step_text(self, final: bool) -> bool:
        """Reasoning/content: emit up to the next tag and act on it. False when waiting for text."""
        buf, channel = self._buf, self._state
        best, tag = -1, None
        for t in self._text_tags:
            i = buf.find(t)
            if i >= 0 and (best < 0 or i < best):
                best, tag = i, t
        if tag is None:
            keep = 0 if final else self._partial_tag_len(buf)
            self._emit(channel, buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._emit(channel, buf[:best])
        if tag == self._open:
            self._buf = buf[best:]
            self._origin, self._state, self._scan = channel, _BLOCK, len(self._open)
        else:
            self._buf = buf[best + len(tag):]
            if tag == self._think_close and channel == _REASONING:
                self._state = _CONTENT
            # any other <think> / </think> is dropped
        return True

    def _partial_tag_len(self, buf: str) -> int:
        for k in range(min(len(buf), self._maxtag - 1), 0, -1):
            tail = buf[-k:]
            if any(t.startswith(tail) for t in self._text_tags):
                return k
        return 0

    def _step_block(self, final: bool) -> bool:
        buf, n_open = self._buf, len(self._open)
        ends = [(buf.find(self._close, self._scan), "close"), (buf.find(self._open, self._scan), "reopen")]
        if self._origin == _REASONING:
            ends.append((buf.find(self._think_close, self._scan), "think_end"))
        found = [(i, kind) for i, kind in ends if i >= 0]
        if not found:
            if final:
                self._buf = ""
                self._state = self._origin
                self._finish_block(buf, None, f"{self._open} never closed")
                return False
            self._scan = max(n_open, len(buf) - self._maxtag + 1)
            return False
        i, kind = min(found)
        if kind == "close":
            end = i + len(self._close)
            self._buf = buf[end:]
            self._state = self._origin
            self._finish_block(buf[:end], buf[n_open:i])
        elif kind == "reopen":
            self._buf = buf[i:]
            self._scan = n_open
            self._finish_block(buf[:i], None, f"{self._open} not closed before the next {self._open}")
        else:  # </think> ends the reasoning and the unfinished block in it
            self._buf = buf[i + len(self._think_close):]
            self._state = _CONTENT
            self._finish_block(buf[:i], None, f"{self._open} not closed before {self._think_close}")
        return True


# ------------------------------------------------------------------------------- one-shot


def parse_output(text: str, fmt: str = "nemotron3", thinking: bool = True, tools: list[dict] | None = None,
                 prompt_opens_think: bool = True, tool_calls: bool = True) -> ParsedOutput:
    """Split a finished generation (the text after the prompt) into reasoning, content and tool calls.

    ``thinking``: whether the prompt enabled reasoning (``enable_thinking`` / ``/think`` / "detailed
    thinking on"); ``prompt_opens_think``: whether the generation prompt already ends with ``<think>``
    (Nemotron 3, Nano 2) rather than leaving the model to open it (Llama-Nemotron).  ``tools``: the
    request's OpenAI tool list; it types Qwen3-Coder parameters and rejects calls to other functions.
    ``tool_calls=False`` leaves tool-call markup in the content (OpenAI's ``tool_choice="none"``).
    """
    p = StreamingParser(fmt, thinking=thinking, tools=tools, prompt_opens_think=prompt_opens_think,
                        tool_calls=tool_calls)
    a = p.feed(text or "")
    b = p.finish()
    calls = [{"id": c["id"], "type": c["type"], "function": dict(c["function"])}
             for c in a.tool_calls + b.tool_calls]
    return ParsedOutput(reasoning=(a.reasoning + b.reasoning) or None, content=(a.content + b.content) or None,
                        tool_calls=calls, warnings=list(p.warnings))
