"""OpenAI request validation and response shapes.

Requests are plain JSON objects checked field by field here, so that every bad input becomes a
one-line `APIError` in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) with
a 4xx status, never a 500. Unknown fields are ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nemotron.chat.template import ChatInputError, check_text, tool_function, validate_messages, validate_tools
from nemotron.inference.constraint import ConstraintError, StructuredOutput
from nemotron.inference.sampling import LOGIT_BIAS_MAX, MAX_TOP_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Limits:
    max_body_bytes: int = 4 << 20
    max_messages: int = 1024
    max_tokens: int = 4096          # per request; also capped by the context length
    max_n: int = 16
    max_stop: int = 16
    max_stop_token_ids: int = 256


# --------------------------------------------------------------------------------------------------
# field readers: each names the offending field in its error
# --------------------------------------------------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def json_kind(value: Any) -> str:
    """The JSON type name of a parsed value, for error messages."""
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


# integer fields end up in int64 tensors or loops: none may be larger
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def get(body: dict, key: str, typ: type | tuple[type, ...], default: Any = None,
        lo: int = INT_MIN, hi: int = INT_MAX) -> Any:
    """body[key] checked against typ (None -> default). ints are accepted where numbers are, bools
    are not accepted as numbers; an integer must be in [lo, hi] (by default, int64's range)."""
    value = body.get(key)
    if value is None:
        return default
    types = typ if isinstance(typ, tuple) else (typ,)
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types) or \
        (float in types and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise APIError(400, f"'{key}' must be {want}, got {json_kind(value)}", param=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a finite number", param=key)
    if isinstance(value, int) and not isinstance(value, bool) and not lo <= value <= hi:
        shown = str(value) if len(str(value)) <= 40 else f"an integer of {len(str(value))} digits"
        raise APIError(400, f"'{key}' must be in [{lo}, {hi}], got {shown}", param=key)
    return value


def _stop_list(body: dict, limits: Limits) -> list[str]:
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits.max_stop or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or at most {limits.max_stop} non-empty strings", param="stop")
    check_field_text("stop", stop)
    return stop


def check_field_text(param: str, value: Any, where: str | None = None) -> None:
    """A 400 for field `param` when a string in `value` (at `where`, by default the field itself) is
    not valid Unicode (the tokenizer's input)."""
    try:
        check_text(where or param, value)
    except ChatInputError as e:
        raise APIError(400, str(e), param=param) from None


def _stop_token_ids(body: dict, limits: Limits, vocab_size: int | None) -> list[int]:
    ids = get(body, "stop_token_ids", list, [])
    top = INT_MAX if vocab_size is None else vocab_size - 1
    if len(ids) > limits.max_stop_token_ids or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= top for t in ids):
        raise APIError(400, f"'stop_token_ids' must be an array of at most {limits.max_stop_token_ids} token ids "
                            f"in [0, {top}]", param="stop_token_ids")
    return ids


def _seed(body: dict, choices: int) -> int | None:
    """Choice i draws from seed + i: every one of them must be a seed torch accepts."""
    seed = get(body, "seed", int, lo=SEED_MIN, hi=SEED_MAX)
    if seed is not None and seed + choices - 1 > SEED_MAX:
        raise APIError(400, f"'seed' must be <= {SEED_MAX - choices + 1} for {choices} choices (choice i uses "
                            f"seed + i), got {seed}", param="seed")
    return seed


def _logit_bias(body: dict, vocab_size: int | None) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} -> {token id: bias}."""
    bias = get(body, "logit_bias", dict, {})
    top = INT_MAX if vocab_size is None else vocab_size - 1
    out = {}
    for key, value in bias.items():
        # at most 19 digits: int() of a longer string is slow or refused, and no such id exists
        if not (key.isascii() and key.isdigit() and len(key) <= 19) or int(key) > top:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise APIError(400, f"'logit_bias' keys must be token ids in [0, {top}] (as strings), got {shown!r}",
                           param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:   # NaN fails the comparison too
            raise APIError(400, f"'logit_bias' values must be numbers in [{-LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], "
                                f"got {json_kind(value) if not isinstance(value, (int, float)) else value} for {key}",
                           param="logit_bias")
        out[int(key)] = float(value)
    return out


def prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's prompt_logprobs: the number of top alternatives per prompt token (0: the token alone)."""
    n = get(body, "prompt_logprobs", int)
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'prompt_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {n}", param="prompt_logprobs")
    if n is not None and stream:   # as vLLM
        raise APIError(400, "'prompt_logprobs' is not available with stream=true", param="prompt_logprobs")
    return n


def sampling_params(body: dict, limits: Limits, context_left: int, chat: bool, choices: int = 1,
                    vocab_size: int | None = None) -> SamplingParams:
    """The sampling fields of a chat or completions request. context_left: tokens the prompt leaves;
    choices: how many requests share these params (choice i seeds with seed + i); vocab_size: the
    bound of token ids."""
    max_tokens = get(body, "max_completion_tokens", int) if chat else None
    max_tokens = get(body, "max_tokens", int, max_tokens)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, context_left)
    elif max_tokens < 1:
        raise APIError(400, f"'{key}' must be >= 1, got {max_tokens}", param=key)
    elif max_tokens > limits.max_tokens:
        raise APIError(400, f"'{key}' must be <= {limits.max_tokens} on this server, got {max_tokens}", param=key)
    elif max_tokens > context_left:
        raise APIError(400, f"the prompt leaves room for {context_left} tokens in the context, "
                            f"but '{key}' asks for {max_tokens}", param=key)
    if chat:
        logprobs = get(body, "logprobs", bool, False)
        top = get(body, "top_logprobs", int, 0)
    else:  # completions: logprobs is the number of top alternatives (0..5 in OpenAI, 0..20 here)
        n_top = get(body, "logprobs", int)
        logprobs, top = n_top is not None, n_top or 0
        if n_top is not None and not 0 <= n_top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
    stop_ids = _stop_token_ids(body, limits, vocab_size)
    top_k = get(body, "top_k", int, 0)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=get(body, "temperature", float, 1.0),
        top_k=0 if top_k == -1 else top_k,   # vLLM spells "off" as -1
        top_p=get(body, "top_p", float, 1.0),
        min_p=get(body, "min_p", float, 0.0),
        repetition_penalty=get(body, "repetition_penalty", float, 1.0),
        presence_penalty=get(body, "presence_penalty", float, 0.0),
        frequency_penalty=get(body, "frequency_penalty", float, 0.0),
        seed=_seed(body, choices),
        stop=_stop_list(body, limits),
        stop_token_ids=stop_ids,
        logprobs=logprobs,
        top_logprobs=top,
        ignore_eos=get(body, "ignore_eos", bool, False),
        logit_bias=_logit_bias(body, vocab_size),
    )
    if params.temperature > 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {params.temperature}", param="temperature")
    try:
        params.validate()
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(name, name)) from None
    return params


def n_choices(body: dict, limits: Limits) -> int:
    n = get(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"'n' must be in [1, {limits.max_n}], got {n}", param="n")
    return n


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)"""
    stream = get(body, "stream", bool, False)
    opts = get(body, "stream_options", dict, {})
    if opts and not stream:
        raise APIError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
    return stream, bool(get(opts, "include_usage", bool, False))


# --------------------------------------------------------------------------------------------------
# chat completions
# --------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: str | dict           # "auto" | "none" | "required" | {"type": "function", "function": {...}}
    template_kwargs: dict[str, Any]
    enable_thinking: bool
    thinking_budget: int | None
    n: int
    stream: bool
    include_usage: bool
    body: dict = field(repr=False, default_factory=dict)
    answer: StructuredOutput | None = None   # response_format or vLLM's structured_outputs / guided_*
    parallel_tool_calls: bool = True


def structured_output(body: dict, chat: bool) -> StructuredOutput | None:
    """What the request's answer must be: `response_format` (chat) or vLLM's `structured_outputs` /
    `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (chat and completions)."""
    param = "response_format"
    try:
        answer = StructuredOutput.from_response_format(body.get("response_format")) if chat else None
        param = "structured_outputs"
        extra = StructuredOutput.from_request(body)
    except ConstraintError as e:
        raise APIError(400, str(e), param=param) from None
    if answer is not None and extra is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    return answer or extra


# chat_template_kwargs that would collide with what prepare_chat, apply_chat_template and render_chat
# are given by the server itself
RESERVED_TEMPLATE_KWARGS = frozenset({"tokenizer", "messages", "tools", "add_generation_prompt", "template",
                                      "chat_template_name", "special_tokens_in_content"})


def parse_chat_request(body: Any, limits: Limits, default_template_kwargs: dict | None = None) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise APIError(400, f"at most {limits.max_messages} messages per request, got {len(messages)}",
                       param="messages")
    try:
        validate_messages(messages)
    except ChatInputError as e:
        raise APIError(400, str(e), param="messages") from None
    tools = get(body, "tools", list)
    if tools is not None and not tools:
        tools = None
    try:
        validate_tools(tools)
    except ChatInputError as e:
        raise APIError(400, str(e), param="tools") from None
    choice = body.get("tool_choice")
    choice = ("auto" if tools else "none") if choice is None else choice
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(400, f"'tool_choice' must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                           param="tool_choice")
        if choice in ("auto", "required") and not tools:
            raise APIError(400, f"tool_choice={choice!r} needs 'tools'", param="tool_choice")
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, "a named 'tool_choice' is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param="tool_choice")
        if not tools or name not in {tool_function(t)["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {name!r}, which is not among 'tools'", param="tool_choice")
    else:
        raise APIError(400, f"'tool_choice' must be a string or an object, got {json_kind(choice)}", param="tool_choice")
    kwargs = dict(default_template_kwargs or {})
    kwargs.update(get(body, "chat_template_kwargs", dict, {}))
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)} (the server sets it from the "
                            "request)", param="chat_template_kwargs")
    check_field_text("chat_template_kwargs", kwargs)
    enable_thinking = kwargs.pop("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
    budget = get(body, "thinking_token_budget", int, lo=0)
    get(body, "response_format", dict)
    answer = structured_output(body, chat=True)
    parallel = get(body, "parallel_tool_calls", bool, True)
    stream, include_usage = stream_options(body)
    return ChatRequest(messages, tools, choice, kwargs, enable_thinking, budget,
                       n_choices(body, limits), stream, include_usage, body, answer, parallel)


def text_chars(*values: Any) -> int:
    """The characters of every string (keys too) in JSON-like values: the caller's text that a chat
    template may render. Walked without recursion, so any nesting the JSON parser accepted is fine."""
    total, stack = 0, list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


# --------------------------------------------------------------------------------------------------
# completions
# --------------------------------------------------------------------------------------------------


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]
    echo: bool
    n: int
    stream: bool
    include_usage: bool
    body: dict = field(repr=False, default_factory=dict)


def parse_completion_request(body: Any, limits: Limits, vocab_size: int | None = None) -> CompletionRequest:
    """vocab_size: the bound of token-id prompts (checked before anything decodes them)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    prompt = body.get("prompt")
    bad = APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array "
                        "of such arrays", param="prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [list(prompt)]
        elif all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                 for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise bad
    elif prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    else:
        raise bad
    if len(prompts) > limits.max_n:
        raise APIError(400, f"at most {limits.max_n} prompts per request", param="prompt")
    if any(p == "" for p in prompts):
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if vocab_size is not None and any(not 0 <= t < vocab_size for p in prompts if isinstance(p, list) for t in p):
        raise APIError(400, f"'prompt' token ids must be in [0, {vocab_size})", param="prompt")
    check_field_text("prompt", prompts)
    if body.get("suffix") is not None:
        raise APIError(400, "'suffix' is not supported", param="suffix")
    stream, include_usage = stream_options(body)
    n = n_choices(body, limits)
    if n * len(prompts) > limits.max_n:
        raise APIError(400, f"n x prompts must be <= {limits.max_n}", param="n")
    return CompletionRequest(prompts, get(body, "echo", bool, False), n, stream, include_usage, body)


# --------------------------------------------------------------------------------------------------
# tokenize / detokenize (vLLM's shapes)
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizeRequest:
    prompt: str | None                # a completion prompt, or
    chat: ChatRequest | None          # a conversation, rendered as /v1/chat/completions renders it
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize_request(body: Any, limits: Limits, default_template_kwargs: dict | None = None) -> TokenizeRequest:
    """POST /tokenize: {"prompt": str, "add_special_tokens": bool} or {"messages": [...], "tools",
    "chat_template_kwargs"}; "return_token_strs" either way."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    strs = get(body, "return_token_strs", bool, False)
    if body.get("messages") is None:
        prompt = get(body, "prompt", str)
        if prompt is None:
            raise APIError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
        check_field_text("prompt", prompt)
        return TokenizeRequest(prompt, None, get(body, "add_special_tokens", bool, True), strs)
    if body.get("prompt") is not None:
        raise APIError(400, "send either 'prompt' or 'messages', not both", param="prompt")
    # the chat template adds the special tokens itself: add_special_tokens does not apply
    get(body, "add_special_tokens", bool)
    if not get(body, "add_generation_prompt", bool, True):
        raise APIError(400, "add_generation_prompt=false is not supported", param="add_generation_prompt")
    for key in ("continue_final_message", "chat_template"):
        if body.get(key) not in (None, False):
            raise APIError(400, f"'{key}' is not supported", param=key)
    chat = parse_chat_request({k: body[k] for k in ("messages", "tools", "tool_choice", "chat_template_kwargs")
                               if k in body}, limits, default_template_kwargs)
    return TokenizeRequest(None, chat, False, strs)


def parse_detokenize_request(body: Any, vocab_size: int) -> list[int]:
    """POST /detokenize: {"tokens": [token ids]} -> the ids."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_kind(body)}")
    tokens = body.get("tokens")
    if tokens is None:
        raise APIError(400, "'tokens' is required", param="tokens")
    if not isinstance(tokens, list) or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens):
        raise APIError(400, f"'tokens' must be an array of token ids in [0, {vocab_size})", param="tokens")
    return tokens


# --------------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
