"""The chat formats: for each, how it is recognised, its tags, and how an assistant tool call starts.

``"nemotron3"`` (Nemotron 3 Nano / Super / Ultra and the embedded model)
    Reasoning in ``<think>...</think>``; tool calls as Qwen3-Coder XML blocks
    ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``.
``"nemotron_json"`` (Nemotron Nano 2, Llama-Nemotron)
    Reasoning in ``<think>...</think>``; tool calls as ``<TOOLCALL>[{"name": ..., "arguments": {...}}]</TOOLCALL>``.

A template is of the JSON format when it spells ``<TOOLCALL>``, else of the XML one (`detect_format`).
Whether the answer starts inside the reasoning is read from the rendered generation prompt
(`reasoning_mode`).

Forcing a tool call (OpenAI's ``tool_choice`` "required" or a named function) means forcing the text
the checkpoint's template writes between the end of the reasoning and the function name (for a named
function: up to its arguments). `tool_call_prefix` reads that text off the template itself by
rendering a probe conversation whose assistant turn is one tool call, once with reasoning and once
without; where the template does not show it (it renders no reasoning, or its assistant turn does
not continue its generation prompt), the format's defaults below are used. For the Nemotron 3
templates the call follows the reasoning on a new line: ``</think>\\n<tool_call>\\n<function=``.

The code has no Llama-Nemotron "detailed thinking on/off" system-prompt switch of its own: those
checkpoints' templates read the switch from the messages the caller writes, and `reasoning_mode`
falls back to the caller's ``enable_thinking`` when the generation prompt does not open ``<think>``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatFormat", "CHAT_FORMATS", "NEMOTRON3", "NEMOTRON_JSON", "ToolCallPrefix", "detect_format",
    "get_format", "reasoning_mode", "tool_call_prefix",
]


@dataclass(frozen=True)
class ChatFormat:
    """One output format: its tags, and the defaults for the start of a forced tool call."""

    name: str
    call_open: str              # opens a tool-call block
    call_close: str             # closes it
    args_open: str              # what starts the arguments after the function name
    call_head: str              # from call_open up to the function name
    name_tail: str              # after the function name, up to its arguments
    after_reasoning: str        # between the end of the reasoning (after think_close) and call_open
    without_reasoning: str = ""  # between a generation prompt without reasoning and call_open
    think_open: str = "<think>"
    think_close: str = "</think>"

    def default_prefix(self) -> "ToolCallPrefix":
        return ToolCallPrefix(self.after_reasoning + self.call_head, self.without_reasoning + self.call_head,
                              self.name_tail, derived=False)


NEMOTRON3 = ChatFormat("nemotron3", "<tool_call>", "</tool_call>", args_open="<parameter=",
                       call_head="<tool_call>\n<function=", name_tail=">\n", after_reasoning="\n")
# Nano 2's template renders no reasoning in assistant turns: nothing shows what follows </think>
NEMOTRON_JSON = ChatFormat("nemotron_json", "<TOOLCALL>", "</TOOLCALL>", args_open='{"',
                           call_head='<TOOLCALL>[{"name": "', name_tail='", "arguments": ', after_reasoning="")

CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (NEMOTRON3, NEMOTRON_JSON)}


def get_format(fmt: str | ChatFormat) -> ChatFormat:
    """The ChatFormat of a name ("nemotron3", "nemotron_json"); ValueError for any other."""
    if isinstance(fmt, ChatFormat):
        return fmt
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {tuple(CHAT_FORMATS)}")
    return CHAT_FORMATS[fmt]


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------


def detect_format(template: str) -> ChatFormat:
    """The format a chat template writes tool calls in: JSON lists when it spells `<TOOLCALL>`, else XML."""
    return NEMOTRON_JSON if NEMOTRON_JSON.call_open in template else NEMOTRON3


def reasoning_mode(fmt: ChatFormat, prompt_text: str, enable_thinking: bool) -> tuple[bool, bool]:
    """(thinking, prompt_opens_think) of a rendered prompt: a generation prompt ending in an empty
    `<think></think>` turns reasoning off; one ending in `<think>` starts the answer inside the
    reasoning; otherwise (Llama-Nemotron) the model opens `<think>` itself when reasoning is on."""
    tail = prompt_text.rstrip(" ")
    empty = fmt.think_open + fmt.think_close
    if tail.endswith(empty) or tail.endswith(fmt.think_open + "\n" + fmt.think_close):
        return False, True
    if tail.rstrip("\n").endswith(fmt.think_open):
        return True, True
    return enable_thinking, False


# --------------------------------------------------------------------------------------------------
# the start of a forced tool call, as the template renders it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallPrefix:
    """The text that starts an assistant tool call: after the reasoning's closing tag, or at the start
    of an answer without reasoning, up to the function name; and after the name up to the arguments."""

    after_reasoning: str     # e.g. "\n<tool_call>\n<function="
    without_reasoning: str   # e.g. "<tool_call>\n<function="
    name_tail: str           # e.g. ">\n"
    derived: bool = True     # read off the template (False: the format's defaults)

    def text(self, name: str | None = None, after_reasoning: bool = True) -> str:
        """The forced text: up to the name for tool_choice "required" (name None: the model picks it),
        up to the arguments for a named function."""
        head = self.after_reasoning if after_reasoning else self.without_reasoning
        return head if name is None else head + name + self.name_tail


# a probe conversation: one user question, one assistant turn that is a single tool call
_NAME = "probe_function"
_ARG = "probe_argument"
_REASONING = "Probe reasoning."
_PROBE_TOOL = {"type": "function", "function": {
    "name": _NAME, "description": "A probe.",
    "parameters": {"type": "object", "properties": {_ARG: {"type": "string"}}, "required": [_ARG]}}}
_PROBE_CALL = {"id": "call_probe", "type": "function", "function": {"name": _NAME, "arguments": {_ARG: "probe"}}}
_PROBE_USER = {"role": "user", "content": "Probe question."}

Render = Callable[..., str]   # render(messages, tools=..., add_generation_prompt=..., **template_kwargs)


def _call_start(fmt: ChatFormat, text: str, start: int) -> tuple[str, str] | None:
    """(text before the probe's function name, text from the name to its arguments) for the first call
    at or after `start`; None unless it is a call of this format."""
    at = text.find(_NAME, start)
    if at < 0:
        return None
    head = text[start:at]
    args = text.find(fmt.args_open + _ARG, at + len(_NAME))
    if fmt.call_open not in head or fmt.think_open in head or fmt.think_close in head or args < 0:
        return None
    tail = text[at + len(_NAME):args]
    return (head, tail) if tail.strip() and "\n\n" not in tail else None


def _derive(fmt: ChatFormat, render: Render) -> ToolCallPrefix:
    default = fmt.default_prefix()
    after = without = tail = None
    try:   # with reasoning: the text after the reasoning's closing tag
        text = render([_PROBE_USER, {"role": "assistant", "content": "", "reasoning_content": _REASONING,
                                     "tool_calls": [_PROBE_CALL]}], tools=[_PROBE_TOOL], add_generation_prompt=False)
        r = text.find(_REASONING)
        close = text.find(fmt.think_close, r) if r >= 0 else -1
        if close >= 0 and (found := _call_start(fmt, text, close + len(fmt.think_close))):
            after, tail = found
    except Exception:  # a template that cannot render the probe: the defaults
        pass
    try:   # without reasoning: the assistant turn continues the generation prompt
        prompt = render([_PROBE_USER], tools=[_PROBE_TOOL], add_generation_prompt=True, enable_thinking=False)
        text = render([_PROBE_USER, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                      tools=[_PROBE_TOOL], add_generation_prompt=False, enable_thinking=False)
        if text.startswith(prompt) and (found := _call_start(fmt, text, len(prompt))):
            without, tail = found[0], tail or found[1]
    except Exception:
        pass
    if after is None and without is None:
        return default
    return ToolCallPrefix(default.after_reasoning if after is None else after,
                          default.without_reasoning if without is None else without,
                          default.name_tail if tail is None else tail)


_PREFIXES: dict[Hashable, ToolCallPrefix] = {}
_MAX_PREFIXES = 64


def tool_call_prefix(fmt: str | ChatFormat, render: Render | None = None, key: Hashable | None = None) -> ToolCallPrefix:
    """How the checkpoint's template starts an assistant tool call. `render(messages, tools=...,
    add_generation_prompt=..., **template_kwargs)` renders with that template; `key` (the template
    and its variables) caches the answer. Without `render`: the format's defaults."""
    fmt = get_format(fmt)
    if render is None:
        return fmt.default_prefix()
    cache_key: Any = (fmt.name, key) if key is not None else None
    if cache_key is not None and cache_key in _PREFIXES:
        return _PREFIXES[cache_key]
    prefix = _derive(fmt, render)
    if cache_key is not None:
        if len(_PREFIXES) >= _MAX_PREFIXES:
            _PREFIXES.clear()
        _PREFIXES[cache_key] = prefix
    return prefix
