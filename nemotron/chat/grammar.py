"""The grammar of an assistant turn: what may follow the reasoning when the caller constrains it.

Three things constrain a turn, alone or together:
- a forced tool call (tool_choice "required" or a named function): the answer is one call (or several,
  unless parallel_tool_calls is false) in the template's exact syntax, from the separator after the
  reasoning to the closing tag, naming an offered tool, its arguments following the tool's schema;
- a structured answer (response_format json_schema / json_object, vLLM's regex / choice / grammar);
- strict tools offered with tool_choice "auto": the answer is free text or calls as above.
With tools offered and a structured answer, the turn is either well-formed calls or the structured
answer, so a tool can still be called (constraining the whole turn to the answer would forbid it).

The rules are Lark text for the grammar engine (inference/constraint.py). They write what the output
parser (chat/parsers.py) reads back into the intended values: a Nemotron 3 XML parameter whose schema
admits a string is raw text (it may not contain "<", so that no tag can start inside it), any other is
compact JSON; a JSON-format call's arguments are one JSON object.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nemotron.chat.formats import ChatFormat, ToolCallPrefix
from nemotron.chat.parsers import resolve_refs, schema_types
from nemotron.chat.template import tool_function
from nemotron.inference.constraint import StructuredOutput, json_rule, lark_string

__all__ = ["turn_grammar"]

_EMPTY_OBJECT = {"type": "object", "properties": {}, "additionalProperties": False}


def turn_grammar(fmt: ChatFormat, prefix: ToolCallPrefix, after_reasoning: bool, tools: list[dict] | None,
                 tool_choice: str, forced_function: str | None, answer: StructuredOutput | None,
                 parallel_tool_calls: bool = True, special_tokens: dict[str, int] | None = None) -> str | None:
    """Lark text for the turn's output after the reasoning (`after_reasoning`: the grammar starts at
    the reasoning's closing tag; else at the start of the answer), or None when nothing constrains it.
    tool_choice: "auto", "none", "required" or "function" (then `forced_function` names it).
    special_tokens: the tokenizer's control tokens (spelling -> id); the tags among them (such as
    `<tool_call>`) must be written as those tokens, not spelled out in text."""
    lit = _Literals(special_tokens or {})
    calls_allowed = tool_choice != "none" and bool(tools)
    strict = calls_allowed and any(tool_function(t).get("strict") is True for t in tools)
    forced = tool_choice in ("required", "function")
    if not (forced or answer is not None or strict):
        return None
    head = prefix.after_reasoning if after_reasoning else prefix.without_reasoning
    separator = head[:head.find(fmt.call_open)] if fmt.call_open in head else ""
    rules: list[str] = []
    alternatives = []
    if calls_allowed:
        offered = [tool_function(t) for t in tools]
        if tool_choice == "function":
            offered = [f for f in offered if f["name"] == forced_function]
        rules.append(_calls(lit, fmt, head, prefix.name_tail, offered, parallel_tool_calls))
        alternatives.append("calls")
    if not forced:
        if answer is not None:
            rules.append(answer.rules("answer"))
            alternatives.append(f"{lit(separator)} answer" if separator else "answer")
        else:  # strict tools, free answer: text (no special token, so no call tag) or calls
            alternatives.append("/(?s:.*)/")
    return "start: " + " | ".join(alternatives) + "\n" + "".join(rules)


class _Literals:
    """Lark for literal text: string literals, with the control tokens in it as token references
    (the grammar engine matches a spelled-out `<tool_call>` as text, never as the control token)."""

    def __init__(self, special_tokens: dict[str, int]) -> None:
        self.special = {t: i for t, i in special_tokens.items() if t}
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True))) \
            if self.special else None

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return lark_string(text)
        parts, pos = [], 0
        for m in self.pattern.finditer(text):
            if m.start() > pos:
                parts.append(lark_string(text[pos:m.start()]))
            parts.append(f"<[{self.special[m.group()]}]>")
            pos = m.end()
        if pos < len(text) or not parts:
            parts.append(lark_string(text[pos:]))
        return " ".join(parts)


def _calls(lit: _Literals, fmt: ChatFormat, head: str, name_tail: str, functions: list[dict], parallel: bool) -> str:
    """`calls`: one or more tool calls of `functions` in the format's syntax."""
    body = {"nemotron3": _xml_function, "nemotron_json": _json_function}[fmt.name]
    rules = [f"fn: {' | '.join(f'fn_{i}' for i in range(len(functions)))}\n"]
    for i, f in enumerate(functions):
        rules.append(body(lit, f"fn_{i}", f, name_tail))
    if fmt.name == "nemotron3":
        # each call closes its block; the next one opens a new block on a new line
        first = f"{lit(head)} fn {lit(_XML_END + fmt.call_close)}"
        more = f"{lit(chr(10) + fmt.call_head)} fn {lit(_XML_END + fmt.call_close)}"
        tail = ' "\\n"?'
    else:
        # one <TOOLCALL>[...] list: entries separated by ", "
        first = f"{lit(head)} fn"
        more = f"{lit(', ' + fmt.call_head[fmt.call_head.index('{'):])} fn"
        tail = f" {lit(']' + fmt.call_close)}"
    repeat = f" ({more})*" if parallel else ""
    return f"calls: {first}{repeat}{tail}\n" + "".join(rules)


# --------------------------------------------------------------------------------------------------
# Nemotron 3: <function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...</function>\n
# --------------------------------------------------------------------------------------------------

_XML_END = "</function>\n"


def _xml_function(lit: _Literals, rule: str, f: dict, name_tail: str) -> str:
    params = resolve_refs(f.get("parameters")) if isinstance(f.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    # references left unresolved (recursive models) still find their definitions
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    required = set(params.get("required") or ())
    parts, rules = [], []
    for j, (key, schema) in enumerate(props.items()):
        value = f"{rule}_v{j}"
        rules.append(f"{value}: {_xml_value(lit, {**schema, **defs} if isinstance(schema, dict) else schema)}\n")
        part = f'{lit(f"<parameter={key}>" + chr(10))} {value}'
        parts.append(part if key in required else f"({part})?")
    return f"{rule}: {lit(f['name'] + name_tail)} {' '.join(parts)}\n" + "".join(rules)


_VALUE_END = "\n</parameter>\n"
# raw text and its closing tag in one lexeme: as separate lexemes, the text would take the newline the
# tag starts with (the longest match), and the value could never end
_RAW_TEXT = r"/[^<]*\n<\/parameter>\n/"


def _xml_value(lit: _Literals, schema: Any) -> str:
    """A parameter's value and its closing tag, the value as the parser reads it back: raw text where
    the schema admits a string, compact JSON otherwise."""
    if not isinstance(schema, dict):
        return _RAW_TEXT
    types = schema_types(schema)
    if "string" in types:
        return _raw_string(lit, _string_branch(schema))
    if not types and ("enum" in schema or "const" in schema):
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return "(" + " | ".join(lit(v if isinstance(v, str) else json.dumps(v)) for v in values) + f") {lit(_VALUE_END)}"
    return f"{json_rule(schema)} {lit(_VALUE_END)}"


def _string_branch(schema: dict) -> dict:
    """The part of `schema` a raw string must satisfy: itself when its type admits a string, else its
    first string-typed anyOf / oneOf alternative."""
    t = schema.get("type")
    if t == "string" or (isinstance(t, list) and "string" in t) or ("enum" in schema and "type" not in schema):
        return schema
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            if isinstance(option, dict) and "string" in schema_types(option):
                return _string_branch(option)
    return schema


def _raw_string(lit: _Literals, schema: dict) -> str:
    if "const" in schema and isinstance(schema["const"], str):
        return f"{lit(schema['const'])} {lit(_VALUE_END)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        options = [v if isinstance(v, str) else json.dumps(v) for v in enum]
        return "(" + " | ".join(lit(v) for v in options) + f") {lit(_VALUE_END)}"
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and pattern:
        inner = re.sub(r"^\^|(?<!\\)\$$", "", pattern).replace("/", "\\/")
        return f"/(?:{inner})\\n<\\/parameter>\\n/"
    lo = schema.get("minLength", 0)
    hi = schema.get("maxLength")
    if isinstance(lo, int) and lo > 0 or isinstance(hi, int):
        return f"/[^<]{{{max(0, int(lo or 0))},{'' if hi is None else int(hi)}}}\\n<\\/parameter>\\n/"
    return _RAW_TEXT


# --------------------------------------------------------------------------------------------------
# Nano 2 / Llama-Nemotron: <TOOLCALL>[{"name": "NAME", "arguments": {...}}]</TOOLCALL>
# --------------------------------------------------------------------------------------------------


def _json_function(lit: _Literals, rule: str, f: dict, name_tail: str) -> str:
    params = f.get("parameters") if isinstance(f.get("parameters"), dict) else _EMPTY_OBJECT
    return f"{rule}: {lit(f['name'] + name_tail)} {json_rule(params)} \"}}\"\n"
