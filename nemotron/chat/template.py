"""Chat templates: render a checkpoint's Jinja chat template the way Hugging Face transformers does.

`render_chat` compiles a template in jinja2's `ImmutableSandboxedEnvironment` with the settings of
transformers' `_compile_jinja_template` (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, the
`{% generation %}` block, a `tojson` filter that does not escape HTML or non-ASCII, the globals
`raise_exception` and `strftime_now`, and the guarded `dict`/`namespace` globals), and passes the template
the same variables `tokenizer.apply_chat_template(..., tokenize=False)` does.

Messages are normalised first, as transformers and vLLM do before rendering:
* keys whose value is None are dropped (transformers: OpenAI clients send `content: null`);
* `reasoning` / `thinking` fill `reasoning_content` (and `thinking`) when it is missing (transformers);
* tool-call `arguments` given as a JSON string are decoded to an object, and empty or undecodable ones
  become `{}`; an empty `tool_calls` list is dropped (vLLM's `_postprocess_messages`; the Nemotron 3
  template iterates `arguments|items` and fails on a string);
* content given as a list of text parts becomes one string, the texts joined by newlines (vLLM's
  "string" content format, which it picks for these text-only templates).

`validate_messages` / `validate_tools` reject malformed requests with a one-line `ChatInputError`
(a `ValueError`); template failures (including the template's own `raise_exception`) become a
`ChatTemplateError` (also a `ValueError`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from nemotron.chat.formats import ChatFormat, ToolCallPrefix, detect_format, get_format, reasoning_mode, \
    tool_call_prefix
from nemotron.errors import NemotronError
from nemotron.files import is_present, read_json, read_text

__all__ = [
    "ChatPrompt",
    "prepare_chat",
    "ChatInputError",
    "ChatTemplateError",
    "MESSAGE_ROLES",
    "apply_chat_template",
    "chat_template_for",
    "normalize_messages",
    "render_chat",
    "validate_messages",
    "validate_tools",
]

MESSAGE_ROLES = ("system", "user", "assistant", "tool", "developer")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' order


class ChatInputError(NemotronError, ValueError):
    """Malformed chat messages or tools (a 400 for the server)."""


class ChatTemplateError(NemotronError, ValueError):
    """A chat template that is missing, does not compile, or fails (or refuses) to render the input."""


# --------------------------------------------------------------------------------------------------
# the Jinja environment (transformers' `_compile_jinja_template`)
# --------------------------------------------------------------------------------------------------

def _raise_exception(message):
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (as transformers does)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _make_namespace_class():
    import jinja2.exceptions
    import jinja2.utils

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # Namespace's signature trick: `namespace(self=...)` still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""
    import jinja2.nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    return GenerationBlock


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _make_namespace_class()
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None


# --------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Copy into plain JSON-like Python types (transformers' `_plain_template_data`): the sandbox then
    never sees a caller's rich objects, and the caller's messages are never modified."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    if callable(getattr(value, "item", None)) and type(value).__module__ == "numpy":
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _text_of_parts(parts: list) -> str | None:
    """The text of a content list made only of text parts, else None (left for the template)."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return "\n".join(texts)


def _decode_arguments(arguments: Any) -> Any:
    if not arguments:  # None, "" (and {}): no arguments
        return {}
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {}
    return arguments if isinstance(arguments, dict) else {}


def normalize_messages(messages: list[dict]) -> list[dict]:
    """A normalised copy of `messages` (see the module docstring); the input is not modified."""
    if not isinstance(messages, (list, tuple)):
        raise ChatInputError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ChatInputError(f"messages[{i}] must be an object, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if isinstance(message.get("content"), list):
            text = _text_of_parts(message["content"])
            if text is not None:
                message["content"] = text
        if message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list):
            if not message["tool_calls"]:
                del message["tool_calls"]
            for call in message.get("tool_calls", ()):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    fn["arguments"] = _decode_arguments(fn.get("arguments"))
        out.append(message)
    return out


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
                **kwargs) -> str:
    """Render `template` for `messages` (and `tools`) as transformers' `apply_chat_template(...,
    tokenize=False)` does; every extra keyword (`enable_thinking`, `truncate_history_thinking`,
    `reasoning_effort`, `documents`, ...) is passed to the template. A `bos_token`/`eos_token` of None is
    left undefined in the template (as transformers does for a tokenizer without that token)."""
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    variables = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    variables.update(kwargs)
    variables = _plain(variables)
    variables.setdefault("documents", None)
    try:
        return compiled.render(messages=normalize_messages(messages), tools=_plain(tools),
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        if type(e) is jinja2.TemplateError:  # the template's raise_exception(...)
            raise ChatTemplateError(f"the chat template rejected the conversation: {e.message}") from None
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, NemotronError):
            raise
        raise ChatTemplateError(f"the chat template failed on this input: {type(e).__name__}: {e}") from None


def _named_templates(value: Any) -> dict[str, str] | None:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (list, tuple)):
        try:
            return {t["name"]: t["template"] for t in value}
        except (TypeError, KeyError):
            raise ChatTemplateError(
                'a list of chat templates must hold {"name": ..., "template": ...} objects') from None
    return None


def _templates_in_dir(path: Path) -> str | dict[str, str] | None:
    """transformers' priority: chat_template.jinja (and additional_chat_templates/*.jinja) over the
    tokenizer_config.json entry."""
    named = {}
    if is_present(path / "chat_template.jinja"):
        named["default"] = read_text(path / "chat_template.jinja", error=ChatTemplateError)
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            named[f.name.removesuffix(".jinja")] = read_text(f, error=ChatTemplateError)
    if named:
        return named["default"] if list(named) == ["default"] else named
    cfg = path / "tokenizer_config.json"
    if is_present(cfg):
        return read_json(cfg, error=ChatTemplateError).get("chat_template")
    return None


def chat_template_for(tokenizer, tools: list[dict] | None = None, name: str | None = None) -> str:
    """The checkpoint's chat template. `tokenizer` is our `Tokenizer` (or anything with `.chat_template`
    or a `.config` dict), or a checkpoint directory. With several named templates (a tokenizer_config
    list `[{"name": ..., "template": ...}]` or a dict), `name` picks one; otherwise "tool_use" when
    `tools` is not None and there is one, else "default" (transformers' `get_chat_template`)."""
    if isinstance(tokenizer, (str, Path)):
        where = str(tokenizer)
        value = _templates_in_dir(Path(tokenizer))
    else:
        where = "the tokenizer"
        value = getattr(tokenizer, "chat_template", None)
        if value is None:
            value = (getattr(tokenizer, "config", None) or {}).get("chat_template")
    named = _named_templates(value)
    if named is not None:
        if name is not None:
            if name not in named:
                raise ChatTemplateError(f"no chat template named {name!r} (available: {', '.join(sorted(named))})")
            return named[name]
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(
            f"{where} has several chat templates and none is named 'default' (available: {', '.join(sorted(named))})")
    if isinstance(value, str) and value:
        if name is not None and name not in ("default", "tool_use"):
            raise ChatTemplateError(f"no chat template named {name!r} ({where} has a single template)")
        return value
    raise ChatTemplateError(
        f"{where} has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja)")


def _special_tokens(tokenizer) -> dict[str, str]:
    config = getattr(tokenizer, "config", None) or {}
    out = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = getattr(tokenizer, key, None)
        if value is None:
            value = config.get(key)
        if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def apply_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                        add_generation_prompt: bool = True, *, chat_template_name: str | None = None,
                        **kwargs) -> str:
    """Render the tokenizer's own template (see `chat_template_for`), with its special tokens (bos_token,
    eos_token, unk_token, pad_token, ... as transformers passes them); explicit keywords win over the
    tokenizer's tokens, and every other keyword goes to the template."""
    template = chat_template_for(tokenizer, tools=tools, name=chat_template_name)
    variables = {**_special_tokens(tokenizer), **kwargs}
    return render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables)


# --------------------------------------------------------------------------------------------------
# validation (the server's 400s)
# --------------------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# A code point in U+D800..U+DFFF left in a str is a lone surrogate (JSON's escaped pairs decode to one
# character): not valid Unicode, so the tokenizer cannot take it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(where: str, value: Any) -> str | None:
    """The path (`where` extended by keys and indices) of the first string in `value`, a JSON-like
    value, or dict key that holds a lone surrogate; None when there is none. Walked without
    recursion: a request body may nest as deep as the JSON parser allows."""
    stack = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, Mapping):
            children = []
            for key, child in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    children.append((f"{path} (a key)", key))
                    break
                children.append((f"{path}.{key}", child))
            stack.extend(reversed(children))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(item)]))
    return None


def check_text(where: str, value: Any) -> None:
    """Raise a one-line `ChatInputError` when a string in `value` (nested, keys too) is not valid
    Unicode (a lone surrogate such as "\\ud800"), naming where."""
    found = lone_surrogate_at(where, value)
    if found:
        raise ChatInputError(f"{found} holds a lone surrogate (text must be valid Unicode)")


def tool_function(tool: dict) -> dict:
    """The function object of a tool given OpenAI-shaped (`{"type": "function", "function": {...}}`)
    or bare (`{"name": ..., ...}`); `tool` must have passed `validate_tools`."""
    return tool["function"] if "function" in tool or "type" in tool else tool


def _check_content(where: str, content: Any) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ChatInputError(f"{where}[{j}] must be a content part object, got {_kind(part)}")
            kind = part.get("type")
            if kind != "text":
                raise ChatInputError(f"{where}[{j}].type must be 'text' (only text content is supported), got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ChatInputError(f"{where}[{j}].text must be a string, got {_kind(part.get('text'))}")
        return
    raise ChatInputError(f"{where} must be a string or a list of text parts, got {_kind(content)}")


def _check_tool_calls(where: str, calls: Any) -> None:
    if not isinstance(calls, list):
        raise ChatInputError(f"{where} must be a list, got {_kind(calls)}")
    for j, call in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise ChatInputError(f"{w} must be an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise ChatInputError(f"{w}.type must be 'function', got {call.get('type')!r}")
        if "id" in call and call["id"] is not None and not isinstance(call["id"], str):
            raise ChatInputError(f"{w}.id must be a string, got {_kind(call['id'])}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ChatInputError(f"{w}.function must be an object, got {_kind(fn)}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatInputError(f"{w}.function.name must be a non-empty string")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise ChatInputError(f"{w}.function.arguments must be a JSON string or an object, got {_kind(args)}")
        if isinstance(args, str):   # rendered decoded: its escapes ("\\ud800") must be valid text too
            try:
                check_text(f"{w}.function.arguments", json.loads(args))
            except (ValueError, RecursionError) as e:
                if isinstance(e, ChatInputError):
                    raise


def validate_messages(messages: Any) -> None:
    """Raise a one-line `ChatInputError` when `messages` is not a non-empty list of OpenAI-style chat
    messages: a role among system/user/assistant/tool/developer; string (or text-part list) content,
    which only an assistant message may omit or set to null; assistant `tool_calls` of type function
    with a name and arguments given as a JSON string or an object; string `reasoning_content`/`name`/
    `tool_call_id`."""
    if not isinstance(messages, list):
        raise ChatInputError(f"messages must be a list of message objects, got {_kind(messages)}")
    if not messages:
        raise ChatInputError("messages must not be empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatInputError(f"{where} must be an object, got {_kind(message)}")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            if role is None:
                raise ChatInputError(f"{where} has no role (one of {', '.join(MESSAGE_ROLES)})")
            raise ChatInputError(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise ChatInputError(f"{where} ({role}) needs a content string")
        else:
            _check_content(f"{where}.content", content)
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise ChatInputError(f"{where}: only assistant messages can have tool_calls")
            _check_tool_calls(f"{where}.tool_calls", message["tool_calls"])
        for key in ("reasoning_content", "reasoning", "thinking", "name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ChatInputError(f"{where}.{key} must be a string, got {_kind(message[key])}")
        check_text(where, message)   # every string a template may render reaches the tokenizer


def validate_tools(tools: Any) -> None:
    """Raise a one-line `ChatInputError` unless `tools` is None or a list of function tools, OpenAI-shaped
    (`{"type": "function", "function": {...}}`) or bare (`{"name": ..., ...}`), each with a non-empty
    name, an optional string description and optional JSON-schema `parameters` of type object."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ChatInputError(f"tools must be a list of tool objects, got {_kind(tools)}")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ChatInputError(f"{where} must be an object, got {_kind(tool)}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise ChatInputError(f"{where}.type must be 'function', got {tool.get('type')!r}")
            fn, where = tool.get("function"), f"{where}.function"
            if not isinstance(fn, dict):
                raise ChatInputError(f"{where} must be an object, got {_kind(fn)}")
        else:
            fn = tool
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ChatInputError(f"{where}.name must be a non-empty string")
        if name in seen:
            raise ChatInputError(f"{where}.name {name!r} is given twice")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ChatInputError(f"{where}.description must be a string, got {_kind(fn['description'])}")
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ChatInputError(f"{where}.parameters must be a JSON schema object, got {_kind(params)}")
        if params.get("type", "object") != "object":
            raise ChatInputError(
                f"{where}.parameters must be a schema of type 'object', got type {params.get('type')!r}")
        if "properties" in params and not isinstance(params["properties"], dict):
            raise ChatInputError(f"{where}.parameters.properties must be an object, got {_kind(params['properties'])}")
        for key, schema in (params.get("properties") or {}).items():
            if not isinstance(schema, dict):
                raise ChatInputError(
                    f"{where}.parameters.properties.{key} must be a schema object, got {_kind(schema)}")
        required = params.get("required")
        if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise ChatInputError(f"{where}.parameters.required must be a list of strings")
    check_text("tools", tools)   # names, descriptions and schemas are rendered into the prompt


# --------------------------------------------------------------------------------------------------
# caller text cannot spell control tokens
# --------------------------------------------------------------------------------------------------
#
# The template's output is one string, and a tokenizer turns every spelling of an added token in it
# into that token, wherever the characters came from. To keep the caller's text ordinary text, each
# caller string gets an invisible marker character (a private-use code point absent from the
# conversation and the template) wherever a control token could start or continue inside it:
# * after every character that starts a control token (`<` of `<|im_start|>`), and after the first
#   character of every other control-token spelling;
# * at its start and end (and those of its whitespace-trimmed core) when the adjacent template text
#   could complete a token there (`<function=` NAME `>` with NAME = `x<tool_call`, `<` KEY `>` with
#   KEY = `think`).
# The template renders the marked data; removing the markers leaves exactly the usual text unless
# the template's logic looked at the caller's control-token spellings (`'</think>' in content`), which
# it then treats as text. A control token in the result whose span has a marker strictly inside it
# came (wholly or partly) from the caller, and the stretch between the template's own control tokens
# around it is tokenized as text. Ordinary conversations need no marker, or only transparent ones:
# their ids are exactly the usual ones.

# keys and values that are the messages' and tools' own schema, not caller text
_SCHEMA_KEYS = frozenset({
    "role", "content", "name", "type", "function", "arguments", "parameters", "properties", "required",
    "description", "enum", "items", "default", "tool_calls", "tool_call_id", "id", "reasoning_content",
    "reasoning", "thinking", "text"})
_SCHEMA_VALUES = {"role": frozenset(MESSAGE_ROLES), "type": frozenset(
    {"function", "text", "object", "string", "integer", "number", "boolean", "array", "null"})}
_MARKERS = range(0xE000, 0xF900)  # the private-use area


class _ContentGuard:
    """Where a caller string needs markers, for one tokenizer's control-token spellings."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        starts = sorted({t[0] for t in tokens if not (t[0].isalnum() or t[0].isspace())})
        others = sorted((t for t in tokens if t[0] not in starts), key=len, reverse=True)
        self.starts = re.compile("[" + "".join(map(re.escape, starts)) + "]") if starts else None
        self.others = re.compile("(?=" + "|".join(map(re.escape, others)) + ")") if others else None
        self.prefixes = {t[:k] for t in tokens for k in range(1, len(t))}
        self.suffixes = {t[j:] for t in tokens for j in range(1, len(t))}
        # every token without its first / last character, joined: a short string inside a token
        self.tails = "\0".join(t[1:] for t in tokens)
        self.heads = "\0".join(t[:-1] for t in tokens)
        self.longest = max(map(len, tokens))

    def _continues(self, rest: str) -> bool:
        """Could text ending in a proper prefix of a control token go on into `rest`?"""
        if any(rest[:n] in self.suffixes for n in range(1, min(len(rest), self.longest) + 1)):
            return True
        return len(rest) < self.longest and "\0" not in rest and rest in self.tails

    def _completed(self, head: str) -> bool:
        """Could text that starts with the rest of a control token follow `head`?"""
        if any(head[-n:] in self.prefixes for n in range(1, min(len(head), self.longest) + 1)):
            return True
        return len(head) < self.longest and "\0" not in head and head in self.heads

    def positions(self, s: str) -> list[int]:
        """The offsets in `s` before which a marker goes."""
        at = set()
        if self.starts is not None:
            at.update(m.end() for m in self.starts.finditer(s))
        if self.others is not None:
            at.update(m.start() + 1 for m in self.others.finditer(s))
        if s.strip():  # both ends, as given and as a template's `trim` leaves them
            start, end = len(s) - len(s.lstrip()), len(s.rstrip())
            at.update(p for p in {0, start} if self._continues(s[p:]))
            at.update(q for q in {end, len(s)} if self._completed(s[:q]))
        return sorted(at)

    def mark(self, value: Any, marker: str, key: Any = None) -> tuple[Any, bool]:
        """A copy of messages/tools data with markers in its caller strings; and whether any went in."""
        if isinstance(value, str):
            at = [] if value in _SCHEMA_VALUES.get(key, ()) else self.positions(value)
            if not at:
                return value, False
            pieces = [value[i:j] for i, j in zip([0, *at], [*at, len(value)])]
            return marker.join(pieces), True
        if isinstance(value, dict):
            out, any_marked = {}, False
            for k, v in value.items():
                new_k, marked_k = (k, False) if k in _SCHEMA_KEYS else self.mark(k, marker)
                out[new_k], marked_v = self.mark(v, marker, k)
                any_marked |= marked_k or marked_v
            return out, any_marked
        if isinstance(value, (list, tuple)):
            items = [self.mark(v, marker) for v in value]
            return type(value)(v for v, _ in items), any(m for _, m in items)
        return value, False


@lru_cache(maxsize=8)
def _guard(tokens: tuple[str, ...]) -> _ContentGuard:
    return _ContentGuard(tokens)


def _pick_marker(haystack: str) -> str | None:
    """A private-use character that occurs in `haystack` neither as itself nor escaped (`\\ue000`, as
    a template's `tojson(ensure_ascii=True)` or a repr would write it)."""
    lowered = haystack.lower()
    for code in _MARKERS:
        if chr(code) not in haystack and f"\\u{code:04x}" not in lowered:
            return chr(code)
    return None


def _strip_markers(text: str, marker: str) -> tuple[str, list[int]]:
    """`text` without its markers (raw or escaped), and the offsets in the result where they stood."""
    pattern = re.compile(re.escape(marker) + "|" + re.escape(f"\\u{ord(marker):04x}"), re.IGNORECASE)
    pieces, positions, last, length = [], [], 0, 0
    for m in pattern.finditer(text):
        pieces.append(text[last:m.start()])
        length += m.start() - last
        positions.append(length)
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), positions


def _encode_apart(tokenizer, text: str, positions: list[int]) -> list[int]:
    """Token ids of `text` in which no control token that has a marker position strictly inside its
    span is recognised: each stretch between the remaining control tokens that holds one is tokenized
    as text; everything else keeps its usual ids."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    control = set(tokenizer.control_tokens.values())

    def from_caller(i: int) -> bool:
        start, end = offsets[i]
        k = bisect.bisect_right(positions, start)
        return k < len(positions) and positions[k] < end

    forged = [i for i, t in enumerate(ids) if t in control and from_caller(i)]
    if not forged:
        return ids
    forged_set = set(forged)
    kept = [i for i, t in enumerate(ids) if t in control and i not in forged_set]
    out, prev = [], -1  # prev: index of the last kept control token
    for nxt in [*kept, len(ids)]:
        k = bisect.bisect_right(forged, prev)
        if k < len(forged) and forged[k] < nxt:  # a forged token between the two kept ones
            start = offsets[prev][1] if prev >= 0 else 0
            end = offsets[nxt][0] if nxt < len(ids) else len(text)
            out.extend(tokenizer.encode_as_text(text[start:end], after_token=prev >= 0))
        else:
            out.extend(ids[prev + 1:nxt])
        if nxt < len(ids):
            out.append(ids[nxt])
        prev = nxt
    return out


def _render_and_encode(tokenizer, messages: list[dict], tools: list[dict] | None, special_tokens_in_content: bool,
                       **kwargs: Any) -> tuple[str, list[int]]:
    """The rendered prompt and its ids; unless special_tokens_in_content, caller text stays text."""
    tokens = () if special_tokens_in_content else tuple(tokenizer.control_tokens)
    if not tokens:
        text = apply_chat_template(tokenizer, messages, tools=tools, **kwargs)
        return text, tokenizer.encode(text, add_special_tokens=False)
    guard = _guard(tokens)
    messages, tools = normalize_messages(messages), _plain(tools)
    marker = chr(_MARKERS[0])
    (marked_messages, marked_tools), marked = guard.mark((messages, tools), marker)
    if not marked:  # the usual rendering and ids
        text = apply_chat_template(tokenizer, messages, tools=tools, **kwargs)
        return text, tokenizer.encode(text, add_special_tokens=False)
    # a marker that the conversation, the template and its variables do not hold
    haystack = chat_template_for(tokenizer, tools=tools) + json.dumps([messages, tools, kwargs], ensure_ascii=False,
                                                                      default=str)
    free = _pick_marker(haystack)
    if free is None:
        raise ChatInputError("the conversation holds every private-use character (raw or escaped); its text "
                             "cannot be told apart from the template's")
    if free != marker:
        marker = free
        (marked_messages, marked_tools), _ = guard.mark((messages, tools), marker)
    rendered = apply_chat_template(tokenizer, marked_messages, tools=marked_tools, **kwargs)
    text, positions = _strip_markers(rendered, marker)
    return text, _encode_apart(tokenizer, text, positions)


# --------------------------------------------------------------------------------------------------
# a rendered chat prompt and how to read the model's answer to it
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatPrompt:
    """A rendered conversation plus what the output parser needs to know about it."""

    text: str
    ids: list[int]
    fmt: str                  # "nemotron3" (XML tool calls) or "nemotron_json" (<TOOLCALL>[...])
    thinking: bool            # reasoning expected before the answer
    prompt_opens_think: bool  # the prompt already ends inside <think> (Nemotron 3, Nano 2)
    template: str = dataclasses.field(default="", repr=False)   # the chat template it was rendered with
    # the template's other variables (bos_token, eos_token, ... as transformers passes them)
    template_variables: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def chat_format(self) -> ChatFormat:
        return get_format(self.fmt)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """Render other messages with this prompt's template and variables."""
        return render_chat(self.template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           **{**self.template_variables, **kwargs})

    def tool_call_prefix(self) -> ToolCallPrefix:
        """How this prompt's template starts an assistant tool call (see `formats.tool_call_prefix`)."""
        if not self.template:
            return tool_call_prefix(self.fmt)
        key = (self.template, tuple(sorted(self.template_variables.items())))
        return tool_call_prefix(self.fmt, self.render, key)


def prepare_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool = True, *, special_tokens_in_content: bool = False,
                 **template_kwargs: Any) -> ChatPrompt:
    """Validate, render with the checkpoint's template (kwargs such as low_effort pass through),
    tokenize, and classify the format from the template and the rendered generation prompt
    (`formats.detect_format`, `formats.reasoning_mode`).

    By default the caller's text (contents, reasoning, names, tool calls and results, tool
    definitions) cannot produce a control token: `<|im_start|>` typed in a message is tokenized as
    ordinary text, and only the template's own control tokens are special. special_tokens_in_content=True
    parses control-token spellings anywhere, as transformers and vLLM do."""
    validate_messages(messages)
    validate_tools(tools)
    template = chat_template_for(tokenizer, tools=tools)
    text, ids = _render_and_encode(tokenizer, messages, tools, special_tokens_in_content, add_generation_prompt=True,
                                   enable_thinking=enable_thinking, **template_kwargs)
    fmt = detect_format(template)
    thinking, opens = reasoning_mode(fmt, text, enable_thinking)
    return ChatPrompt(text, ids, fmt.name, thinking, opens, template, _special_tokens(tokenizer))
