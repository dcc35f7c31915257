"""One assistant turn: the Request(s) a conversation becomes, and the typed events and final message
its generated tokens become. The Python API (`LoadedModel.chat` / `chat_batch`), the server's chat
route, the CLI and GRPO all go through `ChatTurn`, so they agree on everything below.

Building the requests (`ChatTurn.prepare`, then `ChatTurn.requests`):
* the prompt is rendered and tokenized by `prepare_chat` (with no tools for tool_choice "none");
* a thinking budget (`make_thinking_budget`) caps the reasoning when one is asked for;
* what follows the reasoning may be constrained by a grammar (chat/grammar.py, enforced by the
  engine): tool_choice "required" makes it one or more calls to the offered tools (one with
  parallel_tool_calls=False), a named function `{"type": "function", "function": {"name": ...}}` a
  call to that function, both in the exact syntax the checkpoint's template writes
  (`ChatPrompt.tool_call_prefix`) with the arguments following each tool's schema; a structured
  answer (`answer`, e.g. from response_format) makes it that answer or, with tools offered, a call;
  strict tools make any call follow its schema. The reasoning stays free;
* "none" leaves tool-call markup in the content as text; "auto" parses calls.

Reading the tokens (`ChatTurn.feed` for each TokenEvent, or `ChatTurn.run` with an engine): each
event becomes a `ChoiceDelta` (the new reasoning / content / tool-call pieces of one choice, with the
log-prob of its token) and, when the choice finishes, a `ChoiceDone` carrying its `ChatResult`. Tell
them apart by `kind` ("delta" / "done") or isinstance.

The finish reason, one rule everywhere (`finish_reason`): "tool_calls" when a tool call was parsed
and generation ended with "stop"; otherwise the request's own finish reason ("length", "stop",
"error").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nemotron.chat.formats import NEMOTRON3, ChatFormat
from nemotron.chat.grammar import turn_grammar
from nemotron.chat.parsers import Delta, StreamingParser
from nemotron.chat.template import ChatInputError, ChatPrompt, prepare_chat, tool_function, validate_tools
from nemotron.inference.constraint import Grammar, StructuredOutput
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request, ThinkingBudget, TokenEvent
from nemotron.inference.sampling import SamplingParams

__all__ = [
    "ChatResult", "ChatTurn", "ChoiceDelta", "ChoiceDone", "TOOL_CHOICES", "finish_reason", "make_thinking_budget",
    "resolve_tool_choice",
]

TOOL_CHOICES = ("auto", "none", "required")


# --------------------------------------------------------------------------------------------------
# results and events
# --------------------------------------------------------------------------------------------------


@dataclass
class ChatResult:
    """One assistant turn: the raw text and its parts (reasoning, answer, tool calls)."""

    kind: ClassVar[str] = "result"   # tells the ChatResult that ends a stream from its Deltas

    text: str
    reasoning: str | None
    content: str | None
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    speculation: dict | None = None  # MTP acceptance statistics when speculative decoding ran

    def message(self) -> dict:
        """The OpenAI assistant message (reasoning under both `reasoning` and `reasoning_content`)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning"] = msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


@dataclass
class ChoiceDelta:
    """What one token added to choice `index`: reasoning / content / whole tool calls (`delta`, possibly
    empty) and the token's log-prob entry (None unless log-probs were asked for)."""

    kind: ClassVar[str] = "delta"

    index: int
    delta: Delta
    logprob: dict | None = None


@dataclass
class ChoiceDone:
    """Choice `index` finished; `result` is its whole turn."""

    kind: ClassVar[str] = "done"

    index: int
    result: ChatResult


def finish_reason(tool_calls: bool, request_finish_reason: str | None) -> str:
    """The turn's finish reason: "tool_calls" when a call was parsed and generation stopped by itself
    ("stop"); otherwise the request's own reason ("length", "stop", "error")."""
    reason = request_finish_reason or "stop"
    return "tool_calls" if tool_calls and reason == "stop" else reason


# --------------------------------------------------------------------------------------------------
# what a turn forces: the thinking budget
# --------------------------------------------------------------------------------------------------


def make_thinking_budget(tokenizer, budget: int, prompt_opens_think: bool, grace: int = 0, *,
                         bare_close: bool = False, fmt: ChatFormat = NEMOTRON3) -> ThinkingBudget:
    """A ThinkingBudget with this tokenizer's spellings of the format's reasoning tags. It closes the
    reasoning with the closing tag and a newline, as the templates render it before an answer, or with
    the bare closing tag (`bare_close`: a grammar writes what follows, separator included)."""
    if budget < 0:
        raise ValueError("thinking_budget must be >= 0")
    close = fmt.think_close if bare_close else fmt.think_close + "\n"
    return ThinkingBudget(
        budget=budget,
        close_ids=tokenizer.encode(close, add_special_tokens=False),
        newline_close_ids=tokenizer.encode("\n" + close, add_special_tokens=False),
        end_think_id=tokenizer.token_id(fmt.think_close),
        start_think_id=tokenizer.token_id(fmt.think_open),
        grace=grace,
        active=prompt_opens_think,
    )


def resolve_tool_choice(tool_choice: str | dict | None, tools: list[dict] | None) -> tuple[str, str | None]:
    """(mode, forced function name) of an OpenAI tool_choice: "auto" (None too), "none", "required",
    or {"type": "function", "function": {"name": NAME}} -> ("function", NAME). A one-line
    ChatInputError when it is malformed or asks for a tool that `tools` does not hold."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ChatInputError(f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                                 f"got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise ChatInputError("tool_choice='required' needs tools")
        return tool_choice, None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ChatInputError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
        validate_tools(tools)
        if not tools or name not in {tool_function(t)["name"] for t in tools}:
            raise ChatInputError(f"tool_choice names {name!r}, which is not among the tools")
        return "function", name
    raise ChatInputError(f"tool_choice must be a string or an object, got {type(tool_choice).__name__}")


# --------------------------------------------------------------------------------------------------
# the turn
# --------------------------------------------------------------------------------------------------


class _Choice:
    """One choice being generated: its request and the parser that splits its text."""

    def __init__(self, request: Request, parser: StreamingParser) -> None:
        self.request, self.parser = request, parser
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list[dict] = []
        self.fed = False      # token events were fed (else the request's text is parsed at the end)
        self.result: ChatResult | None = None

    def take(self, delta: Delta) -> Delta:
        if delta:
            self.reasoning.append(delta.reasoning)
            self.content.append(delta.content)
            self.calls.extend(delta.tool_calls)
        return delta

    def feed(self, text: str) -> Delta:
        return self.take(self.parser.feed(text)) if text else Delta()

    def finish(self) -> Delta:
        head = Delta() if self.fed else self.feed(self.request.text)
        tail = self.take(self.parser.finish())
        return Delta(head.reasoning + tail.reasoning, head.content + tail.content, head.tool_calls + tail.tool_calls)


class ChatTurn:
    """One assistant turn of a conversation, for one or more choices (n)."""

    def __init__(self, prompt: ChatPrompt, tools: list[dict] | None = None, tool_choice: str | dict | None = "auto",
                 thinking_budget: int | None = None, tokenizer=None, answer: StructuredOutput | None = None,
                 parallel_tool_calls: bool = True) -> None:
        """`prompt`: the conversation as `prepare_chat` rendered it (with no tools for tool_choice
        "none"); `tools`: the request's tools (they type the parsed arguments and bound the callable
        names); `tokenizer`: needed to build requests that force tokens or follow a grammar (a budget,
        a forced tool call, a structured answer); `answer`: what the answer must be (a JSON schema...);
        `parallel_tool_calls`: False allows one call per turn where calls are constrained."""
        self.prompt = prompt
        self.tool_choice, self.forced_function = resolve_tool_choice(tool_choice, tools)
        self.tools = None if self.tool_choice == "none" else tools
        self.thinking_budget = thinking_budget
        self.answer = answer
        self.parallel_tool_calls = parallel_tool_calls
        self.tokenizer = tokenizer
        self.engine: Engine | None = None   # the engine that runs it, for its speculation statistics
        self.choices: list[_Choice] = []
        self._index: dict[int, int] = {}

    @classmethod
    def prepare(cls, tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                tool_choice: str | dict | None = "auto", enable_thinking: bool = True,
                thinking_budget: int | None = None, template_kwargs: dict[str, Any] | None = None,
                special_tokens_in_content: bool = False, answer: StructuredOutput | None = None,
                parallel_tool_calls: bool = True) -> "ChatTurn":
        """Validate and render the conversation (ChatInputError / ChatTemplateError when it cannot be)."""
        mode, _ = resolve_tool_choice(tool_choice, tools)
        prompt = prepare_chat(tokenizer, messages, None if mode == "none" else tools, enable_thinking,
                              special_tokens_in_content=special_tokens_in_content, **(template_kwargs or {}))
        return cls(prompt, tools, tool_choice, thinking_budget, tokenizer, answer, parallel_tool_calls)

    # ---- building the requests ----

    def grammar(self) -> Grammar | None:
        """What constrains the output after the reasoning (None: nothing). With reasoning in the
        prompt's `<think>`, it starts at the closing tag."""
        p = self.prompt
        after_reasoning = p.thinking and p.prompt_opens_think
        lark = turn_grammar(p.chat_format, p.tool_call_prefix(), after_reasoning, self.tools, self.tool_choice,
                            self.forced_function, self.answer, self.parallel_tool_calls,
                            self.tokenizer.control_tokens if self.tokenizer is not None else None)
        if lark is None:
            return None
        if self.tokenizer is None:
            raise ValueError("a ChatTurn needs the tokenizer to constrain its output")
        starts_after = None
        if after_reasoning:
            starts_after = self.tokenizer.token_id(p.chat_format.think_close)
            if starts_after is None:
                raise ChatInputError(f"this tokenizer has no {p.chat_format.think_close} token: the answer after the "
                                     "reasoning cannot be constrained; turn thinking off")
        return Grammar(lark, starts_after)

    def _parser(self) -> StreamingParser:
        p = self.prompt
        return StreamingParser(p.fmt, p.thinking, self.tools, p.prompt_opens_think,
                               tool_calls=self.tool_choice != "none")

    def requests(self, params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
        """The engine Requests of this turn, one per choice (`params`: one SamplingParams, or one per
        choice). Replaces any requests made before."""
        plist = [params] if isinstance(params, SamplingParams) else list(params)
        p, tok = self.prompt, self.tokenizer
        grammar = self.grammar()
        reqs = []
        for sp in plist:
            budget = None
            if p.thinking and self.thinking_budget is not None:
                if tok is None:
                    raise ValueError("a ChatTurn needs the tokenizer to force tokens")
                budget = make_thinking_budget(tok, self.thinking_budget, p.prompt_opens_think,
                                              bare_close=grammar is not None, fmt=p.chat_format)
            reqs.append(Request(list(p.ids), sp, budget, grammar=grammar))
        self.attach(reqs)
        return reqs

    def attach(self, reqs: Sequence[Request]) -> None:
        """Read these requests (made from this turn's prompt) as the turn's choices."""
        self.choices = [_Choice(r, self._parser()) for r in reqs]
        self._index = {id(r): i for i, r in enumerate(reqs)}

    @property
    def reqs(self) -> list[Request]:
        return [c.request for c in self.choices]

    # ---- reading the tokens ----

    def owns(self, event: TokenEvent) -> bool:
        return id(event.request) in self._index

    def feed(self, event: TokenEvent) -> list[ChoiceDelta | ChoiceDone]:
        """The typed events one TokenEvent of this turn's requests makes: a ChoiceDelta when it adds
        text, a tool call or a log-prob, and a ChoiceDone when its choice finished."""
        i = self._index.get(id(event.request))
        if i is None:
            raise ValueError("a TokenEvent of a request that is not this turn's")
        c = self.choices[i]
        if c.result is not None:
            return []
        c.fed = True
        delta = c.feed(event.text)
        if event.logprob is not None:
            c.logprobs.append(event.logprob)
        if event.finished:
            tail = c.finish()
            delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content,
                          delta.tool_calls + tail.tool_calls)
        out: list[ChoiceDelta | ChoiceDone] = []
        if delta or event.logprob is not None:
            out.append(ChoiceDelta(i, delta, event.logprob))
        if event.finished:
            c.result = self._result(c)
            out.append(ChoiceDone(i, c.result))
        return out

    def close(self) -> list[ChoiceDelta | ChoiceDone]:
        """Finish the choices no finishing event reached (a request generated nothing, or its events
        were not fed: its text is parsed whole)."""
        out: list[ChoiceDelta | ChoiceDone] = []
        for i, c in enumerate(self.choices):
            if c.result is None:
                delta = c.finish()
                if delta:
                    out.append(ChoiceDelta(i, delta))
                c.result = self._result(c)
                out.append(ChoiceDone(i, c.result))
        return out

    def stream(self, events: Iterable[TokenEvent]) -> Iterator[ChoiceDelta | ChoiceDone]:
        """The typed events of this turn's TokenEvents, then those of `close`."""
        for event in events:
            yield from self.feed(event)
        yield from self.close()

    def run(self, engine: Engine) -> Iterator[ChoiceDelta | ChoiceDone]:
        """Generate this turn's requests on `engine` (on the calling thread), yielding its typed events."""
        self.engine = engine
        return self.stream(engine.run(self.reqs))

    def results(self) -> list[ChatResult]:
        """Every choice's ChatResult (finishing any still open)."""
        self.close()
        return [c.result for c in self.choices]

    def result_for(self, request: Request) -> ChatResult:
        """The ChatResult of a finished request generated from this turn's prompt elsewhere (its text is
        parsed whole)."""
        c = _Choice(request, self._parser())
        c.finish()
        return self._result(c)

    def _result(self, c: _Choice) -> ChatResult:
        req = c.request
        tool_calls = [{"id": t["id"], "type": "function", "function": dict(t["function"])} for t in c.calls]
        return ChatResult(req.text, "".join(c.reasoning) or None, "".join(c.content) or None, tool_calls,
                          finish_reason(bool(tool_calls), req.finish_reason), len(self.prompt.ids),
                          len(req.output_ids), c.logprobs if c.fed else list(req.logprobs), list(c.parser.warnings),
                          self.engine.spec_stats.summary(self.engine.speculative_tokens)
                          if self.engine is not None and self.engine.speculative_tokens else None)
