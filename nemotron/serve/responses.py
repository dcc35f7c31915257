"""The OpenAI Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`) over the
server's one chat path.

A Responses request is read into the chat-completions body it means (`ResponsesRequest.chat_body`:
input items -> chat messages, flat function tools -> chat tools, `text.format` -> `response_format`,
`reasoning.effort` -> thinking on or off, `max_output_tokens` -> `max_completion_tokens`), which then
goes through `parse_chat_request`, the server's `prepare_chat_turn` and the engine exactly as a chat
completion does. The turn's typed deltas become output items (`Output`): `reasoning` items
(`reasoning_text` content), `message` items (`output_text` parts) and `function_call` items, and, when
streamed, the Responses events that build them, each with its `sequence_number`.

Input items: messages (user / system / developer / assistant; text or `input_text` / `output_text`
parts), `function_call` and `function_call_output` (tool round trips), `reasoning` (replayed as the
assistant's reasoning) and `item_reference` (an item of a stored response). Consecutive reasoning,
assistant message and function-call items form one assistant message, as the chat templates render
a turn.

Responses are remembered in memory (`ResponseStore`, least recently used first out, bounded in count
and text) unless `store` is false: `previous_response_id` continues one (its input and output items
come before the new input; its instructions do not, as in OpenAI's API), and `GET` / `DELETE` read and
remove one.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from nemotron.chat.parsers import Delta
from nemotron.chat.turn import ChatResult, ChatTurn
from nemotron.serve.protocol import (APIError, check_field_text, get, json_kind, now, parse_chat_request,
                                     text_chars)

if TYPE_CHECKING:
    from nemotron.serve.app import Server

__all__ = ["Output", "ResponseStore", "Responses", "ResponsesRequest", "parse_responses_request"]

# effort values that turn thinking off; any other known effort turns it on
THINKING_OFF = ("none", "minimal")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning", "item_reference")
TEXT_PARTS = ("input_text", "output_text", "text")

# Responses fields served as they are by the chat path (sampling extensions as in chat completions)
PASSED_THROUGH = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "stop", "stop_token_ids", "ignore_eos", "thinking_token_budget",
                  "parallel_tool_calls", "logit_bias")

# chat-completions names in the chat path's errors -> the Responses fields they came from
RENAMED = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}

UNSUPPORTED = {"background": "background responses are not supported",
               "conversation": "conversations are not supported (use previous_response_id)",
               "prompt": "prompt templates are not supported"}


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _bad(message: str, param: str, status: int = 400, code: str | None = None) -> APIError:
    return APIError(status, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------
# stored responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Stored:
    response: dict                 # the response object, as returned
    conversation: list[dict]       # every input item (those of the responses it continues too), then its output
    chars: int                     # the text it adds (what the store's text bound counts)


class ResponseStore:
    """The responses this process remembers: at most `max_responses`, holding at most `max_chars` of
    text they added; the least recently used go first."""

    def __init__(self, max_responses: int = 1024, max_chars: int = 64 << 20) -> None:
        self.max_responses, self.max_chars = max_responses, max_chars
        self._responses: OrderedDict[str, Stored] = OrderedDict()
        self._items: dict[str, dict] = {}            # item id -> item, for item_reference
        self._added: dict[str, list[str]] = {}       # response id -> the ids of the items it added
        self.chars = 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, stored: Stored, new_items: list[dict]) -> None:
        rid = stored.response["id"]
        self._responses[rid] = stored
        self.chars += stored.chars
        added = [item["id"] for item in new_items if isinstance(item.get("id"), str)]
        self._items.update((item["id"], item) for item in new_items if isinstance(item.get("id"), str))
        self._added[rid] = added
        while self._responses and (len(self._responses) > self.max_responses or self.chars > self.max_chars):
            self.delete(next(iter(self._responses)))

    def get(self, rid: str) -> Stored | None:
        stored = self._responses.get(rid)
        if stored is not None:
            self._responses.move_to_end(rid)
        return stored

    def item(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    def delete(self, rid: str) -> bool:
        stored = self._responses.pop(rid, None)
        if stored is None:
            return False
        self.chars -= stored.chars
        for item_id in self._added.pop(rid):
            self._items.pop(item_id, None)
        return True


# --------------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------------


@dataclass
class ResponsesRequest:
    items: list[dict]                # this request's input items, checked and normalized
    history: list[dict]              # the conversation of previous_response_id (empty without one)
    instructions: str | None
    tools: list[dict]                # function tools in the Responses (flat) shape, as echoed back
    tool_choice: str | dict          # as echoed back
    parallel_tool_calls: bool
    effort: str | None
    text_format: dict                # the Responses `text.format`
    stream: bool
    store: bool
    previous_response_id: str | None
    chat_body: dict                  # the chat-completions request this one is served as
    body: dict = field(repr=False, default_factory=dict)


def _text_parts(where: str, parts: list, allowed: tuple[str, ...]) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise _bad(f"{at} must be a content part object, got {json_kind(part)}", "input")
        kind = part.get("type")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in allowed:
            raise _bad(f"{at}.type {kind!r} is not supported (text only: {', '.join(allowed)})", "input")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{at}.text must be a string, got {json_kind(part.get('text'))}", "input")
        texts.append(part["text"])
    return texts


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"{where}.{key} must be a string, got {json_kind(value)}", "input")
    return value


def _input_item(item: Any, where: str, store: ResponseStore) -> dict:
    """One input item checked and normalized (text parts as plain strings or lists of them)."""
    if not isinstance(item, dict):
        raise _bad(f"{where} must be an input item object, got {json_kind(item)}", "input")
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind not in ITEM_TYPES:
        raise _bad(f"{where}.type {kind!r} is not supported (one of {', '.join(ITEM_TYPES)})", "input")
    if kind == "message":
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", "input")
        content = item.get("content")
        if isinstance(content, list):
            content = _text_parts(f"{where}.content", content, TEXT_PARTS)
        elif not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or an array of text parts, got {json_kind(content)}", "input")
        out = {"type": "message", "role": role, "content": content}
    elif kind == "function_call":
        out = {"type": "function_call", "call_id": _string(item, "call_id", where),
               "name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = "\n".join(_text_parts(f"{where}.output", output, ("input_text", "output_text", "text")))
        elif not isinstance(output, str):
            raise _bad(f"{where}.output must be a string or an array of text parts, got {json_kind(output)}", "input")
        out = {"type": "function_call_output", "call_id": _string(item, "call_id", where), "output": output}
    elif kind == "reasoning":
        content, summary = item.get("content") or [], item.get("summary") or []
        if not isinstance(content, list) or not isinstance(summary, list):
            raise _bad(f"{where}.content and .summary must be arrays of text parts", "input")
        texts = _text_parts(f"{where}.content", content, ("reasoning_text", "text"))
        if not texts:   # a client that keeps only the summary passes that back
            texts = _text_parts(f"{where}.summary", summary, ("summary_text", "text"))
        out = {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "\n".join(texts)}]
               if texts else []}
    else:  # item_reference
        ref = _string(item, "id", where)
        found = store.item(ref)
        if found is None:
            raise _bad(f"{where}: no stored item has the id {ref!r}", "input", status=404, code="item_not_found")
        return found
    if isinstance(item.get("id"), str):
        out["id"] = item["id"]
    check_field_text("input", out, where)
    return out


def _input_items(value: Any, store: ResponseStore) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad(f"'input' must be a string or an array of input items, got {json_kind(value)}", "input")
    return [_input_item(item, f"input[{i}]", store) for i, item in enumerate(value)]


def _content(content: str | list[str]) -> str | list[dict]:
    if isinstance(content, str):
        return content
    return content[0] if len(content) == 1 else [{"type": "text", "text": t} for t in content]


def to_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Chat messages of normalized input items. Reasoning, an assistant message and function calls in a
    row are one assistant turn; a function call's output is a tool message."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions is not None else []
    turn: dict | None = None   # the assistant turn being gathered

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            if turn["content"] is None and not turn.get("tool_calls"):
                turn["content"] = ""
            messages.append(turn)
            turn = None

    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            text = "".join(part["text"] for part in item["content"])
            if turn is not None and (turn["content"] is not None or turn.get("tool_calls")):
                flush()
            if turn is None:
                turn = {"role": "assistant", "content": None}
            if text:
                turn["reasoning_content"] = turn.get("reasoning_content", "") + text
        elif kind == "message" and item["role"] == "assistant":
            content = item["content"]
            text = content if isinstance(content, str) else "\n".join(content)
            if turn is not None and (turn["content"] is not None or turn.get("tool_calls")):
                flush()
            if turn is None:
                turn = {"role": "assistant", "content": None}
            turn["content"] = text
        elif kind == "function_call":
            if turn is None:
                turn = {"role": "assistant", "content": None}
            turn.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        else:
            flush()
            if kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            else:
                role = "system" if item["role"] == "developer" else item["role"]
                messages.append({"role": role, "content": _content(item["content"])})
    flush()
    return messages


def _tools(body: dict) -> tuple[list[dict], list[dict] | None]:
    """(the function tools in the Responses shape, the same as chat tools)."""
    tools = get(body, "tools", list, [])
    flat, chat = [], []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _bad(f"tools[{i}] must be an object, got {json_kind(tool)}", "tools")
        kind = tool.get("type", "function")
        if kind != "function":
            raise _bad(f"tools[{i}].type {kind!r} is not supported: this server runs function tools only", "tools")
        fn = tool["function"] if isinstance(tool.get("function"), dict) else \
            {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        check_field_text("tools", fn, f"tools[{i}]")
        flat.append({"type": "function", "name": fn.get("name"), "description": fn.get("description"),
                     "parameters": fn.get("parameters"), "strict": fn.get("strict")})
        chat.append({"type": "function", "function": fn})
    return flat, chat or None


def _tool_choice(body: dict) -> tuple[str | dict, str | dict | None]:
    """(the tool_choice as echoed back, the chat tool_choice; None leaves the chat default)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        return choice, choice   # checked by the chat path
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad(f"tool_choice type {choice.get('type')!r} is not supported (only 'function')", "tool_choice")
        name = choice.get("name")
        if name is None and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
        if not isinstance(name, str):
            raise _bad('a named tool_choice is {"type": "function", "name": ...}', "tool_choice")
        return {"type": "function", "name": name}, {"type": "function", "function": {"name": name}}
    raise _bad(f"'tool_choice' must be a string or an object, got {json_kind(choice)}", "tool_choice")


def _text_format(body: dict) -> tuple[dict, dict | None]:
    """(the `text.format` as echoed back, the chat response_format it means; None for plain text)."""
    text = get(body, "text", dict, {})
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}, None
    if not isinstance(fmt, dict):
        raise _bad(f"'text.format' must be an object, got {json_kind(fmt)}", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return {"type": "text"}, None
    if kind == "json_object":
        return {"type": "json_object"}, {"type": "json_object"}
    if kind == "json_schema":
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise _bad("'text.format.name' must be a non-empty string", "text.format")
        if not isinstance(schema, dict):
            raise _bad(f"'text.format.schema' must be an object, got {json_kind(schema)}", "text.format")
        json_schema = {"name": name, "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                json_schema[key] = fmt[key]
        return {"type": "json_schema", **json_schema}, {"type": "json_schema", "json_schema": json_schema}
    raise _bad(f"'text.format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}", "text.format")


def parse_responses_request(body: Any, store: ResponseStore) -> ResponsesRequest:
    """Check a Responses create body field by field (4xx naming the field) and build the chat body it
    is served as; an unknown previous_response_id is a 404."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False):
            raise _bad(f"'{key}': {why}", key)
    previous = get(body, "previous_response_id", str)
    history: list[dict] = []
    if previous is not None:
        stored = store.get(previous)
        if stored is None:
            raise _bad(f"no stored response has the id {previous!r} (previous_response_id)", "previous_response_id",
                       status=404, code="previous_response_not_found")
        history = stored.conversation
    if body.get("input") is None and previous is None:
        raise _bad("'input' is required", "input")
    items = _input_items(body["input"], store) if body.get("input") is not None else []
    instructions = get(body, "instructions", str)
    check_field_text("instructions", instructions, "instructions")
    get(body, "metadata", dict)
    get(body, "user", str)
    if not items and not history:
        raise _bad("'input' must not be empty", "input")
    flat_tools, chat_tools = _tools(body)
    echoed_choice, chat_choice = _tool_choice(body)
    echoed_format, response_format = _text_format(body)
    reasoning = get(body, "reasoning", dict, {})
    effort = reasoning.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise _bad(f"'reasoning.effort' must be one of {', '.join(EFFORTS)}, got {effort!r}", "reasoning.effort")
    chat: dict[str, Any] = {"messages": to_messages(instructions, history + items)}
    if chat_tools:
        chat["tools"] = chat_tools
    if chat_choice is not None:
        chat["tool_choice"] = chat_choice
    max_output = get(body, "max_output_tokens", int)
    if max_output is not None:
        chat["max_completion_tokens"] = max_output
    for key in PASSED_THROUGH:
        if key in body:
            chat[key] = body[key]
    kwargs = dict(get(body, "chat_template_kwargs", dict, {}))
    if effort is not None:
        kwargs["enable_thinking"] = effort not in THINKING_OFF
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    if response_format is not None:
        chat["response_format"] = response_format   # structured outputs: the chat path's response_format
    return ResponsesRequest(items, history, instructions, flat_tools, echoed_choice,
                            get(body, "parallel_tool_calls", bool, True), effort, echoed_format,
                            get(body, "stream", bool, False), get(body, "store", bool, True), previous, chat, body)


@contextmanager
def chat_field_names() -> Iterator[None]:
    """Errors of the chat path name the Responses fields the chat fields came from."""
    try:
        yield
    except APIError as e:
        message = e.message
        for chat_name, name in RENAMED.items():
            message = message.replace(f"'{chat_name}'", f"'{name}'").replace(f"{chat_name} ", f"{name} ")
        if e.param == "tools":
            message = re.sub(r"tools\[(\d+)\]\.function\.", r"tools[\1].", message)
        raise APIError(e.status, message, param=RENAMED.get(e.param, e.param), type=e.type, code=e.code,
                       headers=e.headers) from None


# --------------------------------------------------------------------------------------------------
# output items and their events
# --------------------------------------------------------------------------------------------------


class Output:
    """The output items of one response, built from its chat turn's deltas. `add` and `close` return
    the stream events (without sequence numbers) that build the items: an item is added, its text
    arrives in deltas, and it is done when an item of another kind starts or the response ends."""

    def __init__(self, parallel_tool_calls: bool = True) -> None:
        self.items: list[dict] = []
        self.open: dict | None = None      # the reasoning or message item being written
        self.parallel_tool_calls = parallel_tool_calls

    @property
    def calls(self) -> list[dict]:
        return [item for item in self.items if item["type"] == "function_call"]

    def add(self, delta: Delta) -> list[dict]:
        events: list[dict] = []
        if delta.reasoning:
            events += self._text("reasoning", delta.reasoning)
        if delta.content:
            events += self._text("message", delta.content)
        for call in delta.tool_calls:
            if self.parallel_tool_calls or not self.calls:
                events += self._call(call)
        return events

    def close(self, status: str = "completed") -> list[dict]:
        """End the item being written with `status` ("incomplete" when the response was cut short)."""
        return self._close_open(status)

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _text(self, kind: str, text: str) -> list[dict]:
        events: list[dict] = []
        if self.open is None or self.open["type"] != kind:
            events += self._close_open("completed")
            events += self._open(kind)
        item = self.open
        part = item["content"][0]
        part["text"] += text
        if kind == "reasoning":
            events.append({"type": "response.reasoning_text.delta", **self._where(item), "content_index": 0,
                           "delta": text})
        else:
            events.append({"type": "response.output_text.delta", **self._where(item), "content_index": 0,
                           "delta": text, "logprobs": []})
        return events

    def _open(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"id": new_item_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        self.open = item
        events = [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": _copy(item)},
                  {"type": "response.content_part.added", **self._where(item), "content_index": 0,
                   "part": dict(part)}]
        item["content"].append(part)
        return events

    def _close_open(self, status: str) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        part = item["content"][0]
        where = self._where(item)
        if item["type"] == "reasoning":
            done = {"type": "response.reasoning_text.done", **where, "content_index": 0, "text": part["text"]}
        else:
            done = {"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"],
                    "logprobs": []}
        return [done, {"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": where["output_index"], "item": _copy(item)}]

    def _call(self, call: dict) -> list[dict]:
        events = self._close_open("completed")
        fn = call["function"]
        item = {"id": new_item_id("fc"), "type": "function_call", "call_id": call["id"], "name": fn["name"],
                "arguments": "", "status": "in_progress"}
        self.items.append(item)
        where = self._where(item)
        events.append({"type": "response.output_item.added", "output_index": where["output_index"],
                       "item": dict(item)})
        item["arguments"], item["status"] = fn["arguments"], "completed"
        events += [{"type": "response.function_call_arguments.delta", **where, "delta": fn["arguments"]},
                   {"type": "response.function_call_arguments.done", **where, "name": fn["name"],
                    "arguments": fn["arguments"]},
                   {"type": "response.output_item.done", "output_index": where["output_index"], "item": dict(item)}]
        return events


def _copy(item: dict) -> dict:
    return {**item, "content": [dict(part) for part in item["content"]]}


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------------------
# the routes
# --------------------------------------------------------------------------------------------------


class Responses:
    """The Responses routes of one server, and the responses it remembers."""

    def __init__(self, server: "Server", store: ResponseStore | None = None) -> None:
        self.server = server
        self.store = store or ResponseStore()

    async def create(self, http: HTTPRequest):
        server = self.server
        server.check_auth(http)
        body = await server.read_json(http)
        rr = parse_responses_request(body, self.store)
        server.check_model(body)
        with chat_field_names():
            cr = parse_chat_request(rr.chat_body, server.limits, server.config.default_template_kwargs)
            turn = await server.prepare_chat_turn(cr)
        queue = server.submit(turn.reqs)
        rid, created = new_item_id("resp"), now()
        output = Output(rr.parallel_tool_calls)
        if rr.stream:
            return StreamingResponse(self._stream(rr, turn, queue, output, rid, created),
                                     media_type="text/event-stream")
        async for _, event in server.events(turn.reqs, queue, http):
            for out in turn.feed(event):
                if out.kind == "delta":
                    output.add(out.delta)
        _, response = self._finish(rr, turn, output, rid, created)
        return response

    async def _stream(self, rr: ResponsesRequest, turn: ChatTurn, queue, output: Output, rid: str, created: int):
        server, reqs = self.server, turn.reqs
        seq = itertools.count()

        def event(e: dict) -> str:
            return _sse({**e, "sequence_number": next(seq)})

        try:
            started = self._response(rr, rid, created, "in_progress", [], None)
            yield event({"type": "response.created", "response": started})
            yield event({"type": "response.in_progress", "response": started})
            async for _, token in server.events(reqs, queue):
                for out in turn.feed(token):
                    if out.kind == "delta":
                        for e in output.add(out.delta):
                            yield event(e)
            events, response = self._finish(rr, turn, output, rid, created)
            for e in events:
                yield event(e)
            kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
            yield event({"type": kind, "response": response})
        except APIError as e:
            yield event({"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param})
            failed = self._response(rr, rid, created, "failed", output.items, None)
            failed["error"] = {"code": "server_error", "message": e.message}
            yield event({"type": "response.failed", "response": failed})
        finally:
            server.cancel_unfinished(reqs)

    def _finish(self, rr: ResponsesRequest, turn: ChatTurn, output: Output, rid: str,
                created: int) -> tuple[list[dict], dict]:
        """The events that end the output and the finished response (remembered unless store=false)."""
        events: list[dict] = []
        for out in turn.close():
            if out.kind == "delta":
                events += output.add(out.delta)
        (result,) = turn.results()
        (req,) = turn.reqs
        status = "incomplete" if result.finish_reason == "length" else "completed"
        events += output.close(status)
        usage = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": req.cached_tokens},
                 "output_tokens": result.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": self._reasoning_tokens(turn, result)},
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        response = self._response(rr, rid, created, status, output.items, usage)
        if rr.store:
            conversation = rr.history + rr.items + output.items
            self.store.put(Stored(response, conversation, text_chars(rr.items, output.items)),
                           rr.items + output.items)
        return events, response

    def _reasoning_tokens(self, turn: ChatTurn, result: ChatResult) -> int:
        """The generated tokens up to and with the one that closes the reasoning (all of them when it
        never closed)."""
        if not result.reasoning:
            return 0
        ids = turn.reqs[0].output_ids
        close = self.server.tokenizer.token_id(turn.prompt.chat_format.think_close)
        return ids.index(close) + 1 if close in ids else len(ids)

    def _response(self, rr: ResponsesRequest, rid: str, created: int, status: str, output: list[dict],
                  usage: dict | None) -> dict:
        body = rr.body
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            "completed_at": now() if status == "completed" else None, "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": rr.instructions, "max_output_tokens": body.get("max_output_tokens"),
            "model": self.server.config.model_name, "output": [_copy(i) if "content" in i else dict(i) for i in output],
            "parallel_tool_calls": rr.parallel_tool_calls, "previous_response_id": rr.previous_response_id,
            "reasoning": {"effort": rr.effort, "summary": None}, "store": rr.store,
            "temperature": body.get("temperature", 1.0), "text": {"format": rr.text_format},
            "tool_choice": rr.tool_choice, "tools": rr.tools, "top_p": body.get("top_p", 1.0),
            "truncation": "disabled", "usage": usage, "user": body.get("user"), "metadata": body.get("metadata") or {},
        }

    def _stored(self, http: HTTPRequest, rid: str) -> Stored:
        self.server.check_auth(http)
        stored = self.store.get(rid)
        if stored is None:
            raise APIError(404, f"no stored response has the id {rid!r}", param="response_id",
                           code="response_not_found")
        return stored

    def retrieve(self, http: HTTPRequest, rid: str) -> dict:
        return self._stored(http, rid).response

    def delete(self, http: HTTPRequest, rid: str) -> dict:
        self._stored(http, rid)
        self.store.delete(rid)
        return {"id": rid, "object": "response", "deleted": True}
