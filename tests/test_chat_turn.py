"""nemotron.chat.turn and nemotron.chat.formats: one chat turn for the Python API, the server, the CLI
and GRPO: the requests it builds (tool_choice forcing exactly what the template renders), the typed
events it yields, and the one finish-reason rule."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

import nemotron
from nemotron.chat.formats import NEMOTRON3, NEMOTRON_JSON, detect_format, reasoning_mode, tool_call_prefix
from nemotron.chat.parsers import Delta
from nemotron.chat.template import ChatInputError, apply_chat_template, prepare_chat, render_chat
from nemotron.chat.turn import (ChatResult, ChatTurn, ChoiceDelta, ChoiceDone, finish_reason, make_thinking_budget,
                                resolve_tool_choice)
from nemotron.inference.requests import Request, TokenEvent
from nemotron.inference.sampling import SamplingParams
from nemotron.io.tokenizer import Tokenizer
from nemotron.tiny import MODEL_DIR
from nemotron.tiny.tasks import CALCULATOR, LOOKUP, problems

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat_templates"
QUESTION = [{"role": "user", "content": "What is 12 * 3 - 9?"}]
NAMED = {"type": "function", "function": {"name": "lookup"}}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def tiny():
    return nemotron.load("tiny")


def _assistant_call(name: str, reasoning: str | None) -> dict:
    msg = {"role": "assistant", "content": "",
           "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": {"expression": "1"}}}]}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return msg


# --------------------------------------------------------------------------------------------------
# formats: detection and the forced tool-call prefix
# --------------------------------------------------------------------------------------------------

def test_detection_lives_in_formats():
    assert detect_format("... <TOOLCALL>[...] ...") is NEMOTRON_JSON and detect_format("<tool_call>") is NEMOTRON3
    assert reasoning_mode(NEMOTRON3, "<|im_start|>assistant\n<think>\n", False) == (True, True)
    assert reasoning_mode(NEMOTRON3, "<|im_start|>assistant\n<think></think>", True) == (False, True)
    assert reasoning_mode(NEMOTRON3, "<|start_header_id|>assistant<|end_header_id|>\n\n", True) == (True, False)


def test_forced_prefix_is_what_the_template_renders_after_the_reasoning(tok):
    """The text and the token ids a forced call puts after `</think>` are those of the embedded
    model's template rendering an assistant tool call after its reasoning (`</think>\\n<tool_call>`,
    not `</think><tool_call>`)."""
    tools = [CALCULATOR, LOOKUP]
    prompt = prepare_chat(tok, QUESTION, tools)
    assert prompt.thinking and prompt.prompt_opens_think
    prefix = prompt.tool_call_prefix()
    assert prefix.derived and prefix.text() == "\n<tool_call>\n<function="
    rendered = apply_chat_template(tok, QUESTION + [_assistant_call("lookup", "Look it up.")], tools=tools,
                                   add_generation_prompt=False)
    assert rendered.startswith(prompt.text)
    after = rendered.split("</think>", 1)[1]
    assert after.startswith(prefix.text()) and after.startswith(prefix.text("lookup"))
    # as token ids: the tokens the grammar forces follow the </think> token exactly as in the rendered turn
    for choice, name in (("required", None), (NAMED, "lookup")):
        (req,) = ChatTurn(prompt, tools, choice, tokenizer=tok).requests(SamplingParams())
        assert req.grammar.starts_after == tok.token_id("</think>") and not req.forced
        head = tok.encode(prefix.text(name), add_special_tokens=False)
        forced = _forced_tokens(tok, req.grammar.lark)[:len(head)]
        assert forced == head
        ids = tok.encode(rendered, add_special_tokens=False)
        at = ids.index(tok.token_id("</think>"))
        assert ids[at + 1:at + 1 + len(forced)] == forced


def test_forced_prefix_without_reasoning_continues_the_generation_prompt(tok):
    tools = [CALCULATOR]
    prompt = prepare_chat(tok, QUESTION, tools, enable_thinking=False)
    assert not prompt.thinking
    rendered = apply_chat_template(tok, QUESTION + [_assistant_call("calculator", None)], tools=tools,
                                   add_generation_prompt=False, enable_thinking=False)
    text = prompt.tool_call_prefix().text("calculator", after_reasoning=False)
    assert rendered.startswith(prompt.text + text) and text == "<tool_call>\n<function=calculator>\n"
    (req,) = ChatTurn(prompt, tools, {"type": "function", "function": {"name": "calculator"}},
                      tokenizer=tok).requests(SamplingParams())
    assert req.thinking_budget is None and req.grammar.starts_after is None
    head = tok.encode(text, add_special_tokens=False)
    forced = _forced_tokens(tok, req.grammar.lark)[:len(head)]
    assert forced == head == tok.encode(rendered[len(prompt.text):], add_special_tokens=False)[:len(head)]


def _forced_tokens(tok, lark: str) -> list[int]:
    """The tokens a grammar forces from its start (the grammar engine's fast-forward)."""
    from nemotron.inference.constraint import grammar_compiler
    return grammar_compiler(tok, tok.vocab_size, {tok.eos_token_id}).matcher(lark).compute_ff_tokens()


@pytest.mark.parametrize("name, after, without", [
    ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", "\n<tool_call>\n<function=", "\n<tool_call>\n<function="),
    ("NVIDIA-Nemotron-Nano-v2.jinja", '<TOOLCALL>[{"name": "', '<TOOLCALL>[{"name": "'),   # format defaults
])
def test_forced_prefix_of_the_released_templates(name, after, without):
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{FIXTURES} is absent (fixtures live outside the project)")
    template = path.read_text(encoding="utf-8")
    fmt = detect_format(template)
    render = partial(render_chat, template, bos_token="<s>", eos_token="<|im_end|>")
    prefix = tool_call_prefix(fmt, render)
    assert (prefix.after_reasoning, prefix.without_reasoning) == (after, without)
    if prefix.derived:   # the Nano 2 template renders no reasoning: nothing to compare with
        tools = [CALCULATOR]
        text = render(QUESTION + [_assistant_call("calculator", "Compute it.")], tools=tools, add_generation_prompt=False)
        assert text.split("</think>")[-1].startswith(prefix.text("calculator"))


def test_a_forced_call_after_a_spent_budget_has_no_blank_line(tok):
    """The budget closes with the bare `</think>` when a grammar writes what follows (a forced call
    brings its own newline), with `</think>\\n` otherwise."""
    budget = make_thinking_budget(tok, 0, True, bare_close=True)
    assert tok.decode(budget.force(), skip_special_tokens=False) == "</think>"
    plain = make_thinking_budget(tok, 0, True)
    assert tok.decode(plain.force(), skip_special_tokens=False) == "</think>\n"


# --------------------------------------------------------------------------------------------------
# the turn: tool_choice, events, the finish-reason rule
# --------------------------------------------------------------------------------------------------

def test_one_finish_reason_rule():
    assert finish_reason(True, "stop") == "tool_calls"
    assert finish_reason(True, "length") == "length" and finish_reason(True, "error") == "error"
    assert finish_reason(False, "stop") == "stop" and finish_reason(False, "length") == "length"
    assert finish_reason(False, None) == "stop"


def test_tool_choice_is_checked():
    tools = [CALCULATOR]
    assert resolve_tool_choice(None, None) == ("auto", None)
    assert resolve_tool_choice("auto", None) == ("auto", None)   # the Python API parses calls without tools too
    assert resolve_tool_choice(NAMED, [CALCULATOR, LOOKUP]) == ("function", "lookup")
    for bad, match in (("sometimes", "tool_choice must be"), ({"type": "function"}, "named tool_choice"),
                       (NAMED, "not among the tools"), (3, "string or an object")):
        with pytest.raises(ChatInputError, match=match):
            resolve_tool_choice(bad, tools)
    with pytest.raises(ChatInputError, match="needs tools"):
        resolve_tool_choice("required", None)


CALL_TEXT = "Use it.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n1+1\n</parameter>\n" \
            "</function>\n</tool_call>\n"


def _events(req: Request, pieces: list[str], reason: str) -> list[TokenEvent]:
    out = []
    for k, piece in enumerate(pieces):
        req.output_ids.append(k)
        req.text += piece
        last = k == len(pieces) - 1
        if last:
            req.finish_reason = reason
        out.append(TokenEvent(req, 0, k, piece, last, {"token_id": k, "logprob": -0.5} if k == 0 else None))
    return out


@pytest.mark.parametrize("reason, expected", [("stop", "tool_calls"), ("length", "length")])
def test_typed_events_and_the_finish_reason_of_a_parsed_call(tok, reason, expected):
    prompt = prepare_chat(tok, QUESTION, [CALCULATOR])
    turn = ChatTurn(prompt, [CALCULATOR], tokenizer=tok)
    (req,) = turn.requests(SamplingParams(max_new_tokens=99))
    pieces = [CALL_TEXT[i:i + 7] for i in range(0, len(CALL_TEXT), 7)]
    out = list(turn.stream(_events(req, pieces, reason)))
    assert all(isinstance(e, (ChoiceDelta, ChoiceDone)) for e in out)
    deltas, (done,) = [e for e in out if e.kind == "delta"], [e for e in out if e.kind == "done"]
    assert out[-1] is done and isinstance(done.result, ChatResult) and all(isinstance(e.delta, Delta) for e in deltas)
    assert deltas[0].logprob == {"token_id": 0, "logprob": -0.5} and done.result.logprobs == [deltas[0].logprob]
    r = done.result
    assert r.reasoning == "Use it." and r.content is None and r.finish_reason == expected
    assert [json.loads(c["function"]["arguments"]) for c in r.tool_calls] == [{"expression": "1+1"}]
    assert sum(len(d.delta.tool_calls) for d in deltas) == 1
    # the same request read whole (GRPO's way) ends the same way
    again = ChatTurn(prompt, [CALCULATOR]).result_for(req)
    assert (again.reasoning, again.content, again.finish_reason) == (r.reasoning, r.content, r.finish_reason)
    # tool_choice "none": the markup is content, and the turn just stops
    none = ChatTurn(prepare_chat(tok, QUESTION, None), [CALCULATOR], "none").result_for(req)
    assert not none.tool_calls and "<tool_call>" in none.content and none.finish_reason == reason


# --------------------------------------------------------------------------------------------------
# the Python API with the embedded model
# --------------------------------------------------------------------------------------------------

def test_python_chat_tool_choice_required_and_named(tiny):
    question = [{"role": "user", "content": problems(1, "eval", seed=2, families=("arithmetic",))[0].question}]
    required = tiny.chat(question, tools=[CALCULATOR, LOOKUP], tool_choice="required", max_new_tokens=64)
    assert isinstance(required, ChatResult) and required.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in required.tool_calls] == ["calculator"]
    assert "</think>\n<tool_call>\n<function=calculator>" in required.text
    # a named function is forced even where the model would pick another one
    (named,) = tiny.chat_batch([question], tools=[CALCULATOR, LOOKUP], tool_choice=NAMED, max_new_tokens=128)
    assert named.finish_reason == "tool_calls" and [c["function"]["name"] for c in named.tool_calls] == ["lookup"]
    assert "</think>\n<tool_call>\n<function=lookup>\n" in named.text
    with pytest.raises(ChatInputError, match="not among the tools"):
        tiny.chat(question, tools=[CALCULATOR], tool_choice=NAMED)
