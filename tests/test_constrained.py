"""Constrained decoding through the grammar engine: structured answers and forced tool calls always
parse and validate, whatever the weights; constrained and free requests share a batch; MTP
speculation and reasoning budgets keep the constraint."""

from __future__ import annotations

import json
import random

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import nemotron  # noqa: E402
from nemotron.chat.template import prepare_chat  # noqa: E402
from nemotron.chat.turn import ChatTurn, make_thinking_budget  # noqa: E402
from nemotron.inference.constraint import ConstraintError, Grammar, StructuredOutput, grammar_compiler  # noqa: E402
from nemotron.inference.engine import Engine  # noqa: E402
from nemotron.inference.requests import Request  # noqa: E402
from nemotron.inference.sampling import SamplingParams  # noqa: E402
from nemotron.io.random_checkpoint import init_checkpoint  # noqa: E402

ASK = [{"role": "user", "content": "Describe one item as JSON."}]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return nemotron.load(init_checkpoint(tmp_path_factory.mktemp("random"), seed=3))


@pytest.fixture(scope="module")
def tiny():
    return nemotron.load("tiny")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of the kinds tools and structured outputs use: nested objects, arrays, enums,
    bounded numbers and strings, required and optional properties, nullable types."""
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 8)}
        if rng.random() < 0.3:
            s["minLength"] = 1
    elif kind == "integer":
        lo = rng.randint(-50, 50)
        s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    elif kind == "number":
        lo = rng.uniform(-10, 10)
        s = {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 100), 2)}
    elif kind == "boolean":
        s = {"type": "boolean"}
    elif kind == "enum":
        s = rng.choice([{"type": "string", "enum": ["red", "green", "blue"][:rng.randint(1, 3)]},
                        {"enum": [1, 2, 3]}, {"type": "integer", "enum": [10, 20]}])
    elif kind == "array":
        s = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    else:
        s = random_object(rng, depth + 1)
    if kind in ("string", "integer", "boolean") and rng.random() < 0.15:
        s["type"] = [s["type"], "null"]
    return s


def random_object(rng: random.Random, depth: int = 0) -> dict:
    props = {f"k{i}_{rng.randint(0, 99)}": random_schema(rng, depth) for i in range(rng.randint(1, 4))}
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [random_object(random.Random(seed)) for seed in range(200)]


def test_200_random_schemas_always_validate(random_model):
    """Random weights, sampled at temperature 1: every answer is JSON that validates."""
    turns = [random_model._turn(ASK, None, False, None, 500, None, {"temperature": 1.0, "seed": i},
                                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": s}})
             for i, s in enumerate(SCHEMAS)]
    results = _run_turns(random_model, turns)
    for schema, r in zip(SCHEMAS, results):
        assert r.finish_reason == "stop", (r.finish_reason, r.text[-200:])
        jsonschema.validate(json.loads(r.content), schema)
    assert results


def _run_turns(loaded, turns: list[ChatTurn]):
    """Every turn's requests in one engine batch; their ChatResults."""
    reqs = [r for t in turns for r in t.reqs]
    engine = loaded._engine(reqs)
    owner = {id(r): t for t in turns for r in t.reqs}
    for event in engine.run(reqs):
        owner[id(event.request)].feed(event)
    return [t.results()[0] for t in turns]


@pytest.mark.parametrize("thinking", [False, True])
def test_forced_tool_calls_follow_their_parameter_schemas(random_model, thinking):
    """tool_choice "required" over several tools, and named: the call names an offered tool and its
    arguments, read back by the output parser, validate against that tool's parameters."""
    rng = random.Random(1)
    turns, expected = [], []
    for i in range(100):   # 200 random parameter schemas over the two cases
        tools = [{"type": "function", "function": {"name": f"tool_{j}", "description": "A tool.",
                                                   "parameters": random_object(rng)}} for j in range(3)]
        choice = "required" if i % 2 else {"type": "function", "function": {"name": "tool_2"}}
        turns.append(random_model._turn(ASK, tools, thinking, 12 if thinking else None, 500, None,
                                        {"temperature": 1.0, "seed": i}, tool_choice=choice,
                                        parallel_tool_calls=False))
        expected.append(tools)
    for tools, r in zip(expected, _run_turns(random_model, turns)):
        assert r.finish_reason == "tool_calls", r.text[-300:]
        assert len(r.tool_calls) == 1
        call = r.tool_calls[0]["function"]
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), schema)


def test_required_picks_only_offered_names(tiny):
    """Offered only `final_result`, the embedded model (trained on calculator calls) still calls it."""
    tools = [{"type": "function", "function": {"name": "final_result", "parameters": {
        "type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]}}}]
    r = tiny.chat([{"role": "user", "content": "What is 7 * 3 - 4?"}], tools=tools, tool_choice="required",
                  max_new_tokens=200)
    assert r.finish_reason == "tool_calls" and r.tool_calls[0]["function"]["name"] == "final_result"
    assert isinstance(json.loads(r.tool_calls[0]["function"]["arguments"])["answer"], (int, float))


def test_forced_call_starts_as_the_template_renders_it(tiny):
    """After `</think>` the grammar forces exactly the tokens the template renders before the
    function name: `</think>\\n<tool_call>\\n<function=`."""
    tok = tiny.tokenizer
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    prompt = prepare_chat(tok, ASK, tools)
    (req,) = ChatTurn(prompt, tools, "required", tokenizer=tok).requests(SamplingParams())
    compiler = grammar_compiler(tok, tiny.model.lm_head.weight.shape[0], tiny.stop_ids)
    matcher = compiler.matcher(req.grammar.lark)
    assert req.grammar.starts_after == tok.token_id("</think>")
    forced = matcher.compute_ff_tokens()
    expected = tok.encode("\n<tool_call>\n<function=calculator>\n<parameter=expression>\n", add_special_tokens=False)
    assert forced == expected


def test_constrained_and_free_requests_share_a_batch(tiny):
    """A free request decodes exactly as alone while a constrained one runs beside it."""
    tok = tiny.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    free_ids = prepare_chat(tok, [{"role": "user", "content": "What is 2 + 2?"}], enable_thinking=False).ids
    alone = Request(list(free_ids), SamplingParams(max_new_tokens=30, temperature=0))
    list(Engine.for_requests(tiny.model, [alone], tok, tiny.stop_ids).run([alone]))
    free = Request(list(free_ids), SamplingParams(max_new_tokens=30, temperature=0))
    constrained = Request(prepare_chat(tok, ASK, enable_thinking=False).ids, SamplingParams(max_new_tokens=60, temperature=0),
                          grammar=StructuredOutput("json_schema", schema).grammar())
    list(Engine.for_requests(tiny.model, [free, constrained], tok, tiny.stop_ids).run([free, constrained]))
    assert free.output_ids == alone.output_ids
    jsonschema.validate(json.loads(constrained.text), schema)


def test_speculation_keeps_the_constraint_and_the_greedy_output(tiny):
    """With MTP drafts, a constrained greedy answer is the same as without, and valid."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}
    question = [{"role": "user", "content": "Plan a trip as JSON."}]
    plain = tiny.chat(question, max_new_tokens=150, response_format=fmt, enable_thinking=False)
    fast = tiny.chat(question, max_new_tokens=150, response_format=fmt, enable_thinking=False, speculative_tokens=2)
    assert fast.text == plain.text and fast.speculation is not None
    jsonschema.validate(json.loads(fast.content), schema)


def test_drafts_during_reasoning_may_not_end_the_turn(tiny):
    """Speculative drafts of a request whose grammar waits for the reasoning to end are cut before an
    end-of-turn id (as the sampled tokens are masked: the answer must come after the reasoning), and
    after the closing tag the grammar checks them."""
    tok = tiny.tokenizer
    close, stop = tok.token_id("</think>"), min(tiny.stop_ids)
    grammar = Grammar(StructuredOutput("choice", ["yes", "no"]).grammar().lark, starts_after=close)
    req = Request(tok.encode("Answer:"), SamplingParams(max_new_tokens=8), grammar=grammar)
    tiny._engine([req]).submit(req)
    think, yes = tok.encode("Let me think", add_special_tokens=False), tok.encode("yes", add_special_tokens=False)
    c = req.constraint
    assert c.valid_prefix(think + [stop] + think) == len(think)
    assert c.valid_prefix([stop]) == 0
    assert c.valid_prefix(think + [close] + yes) == len(think) + 1 + len(yes)
    assert c.valid_prefix(think + [close] + [stop]) == len(think) + 1   # an empty answer is no choice
    assert c.valid_prefix(think) == len(think) and not c.active


def test_thinking_budget_then_schema(tiny):
    """Reasoning stays free under a budget; the answer after it validates."""
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": -999, "maximum": 999}},
              "required": ["answer"], "additionalProperties": False}
    r = tiny.chat([{"role": "user", "content": "What is 7 * 3 - 4?"}], thinking_budget=8, max_new_tokens=100,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert r.reasoning
    jsonschema.validate(json.loads(r.content), schema)


def test_a_spent_budget_closes_bare_before_a_grammar(tiny):
    tok = tiny.tokenizer
    assert tok.decode(make_thinking_budget(tok, 0, True, bare_close=True).force(),
                      skip_special_tokens=False) == "</think>"
    assert tok.decode(make_thinking_budget(tok, 0, True).force(), skip_special_tokens=False) == "</think>\n"


@pytest.mark.parametrize("kind, value, check", [
    ("regex", r"[0-9]{3}-[a-z]{2}", lambda t: len(t) == 6 and t[3] == "-"),
    ("choice", ["yes", "no", "maybe"], lambda t: t in ("yes", "no", "maybe")),
    ("grammar", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/', lambda t: t.startswith("(") and t.endswith(")")),
])
def test_other_kinds_of_structure(random_model, kind, value, check):
    tok = random_model.tokenizer
    grammar = StructuredOutput(kind, value).grammar()
    reqs = [Request(tok.encode("Answer:"), SamplingParams(max_new_tokens=300, temperature=1.0, seed=s), grammar=grammar)
            for s in range(8)]
    list(random_model._engine(reqs).run(reqs))
    for r in reqs:
        assert r.finish_reason == "stop" and check(r.text), r.text


def test_bad_structures_are_one_line_errors(tiny):
    with pytest.raises(ConstraintError, match="response_format type"):
        StructuredOutput.from_response_format({"type": "xml"})
    with pytest.raises(ConstraintError, match="choice"):
        StructuredOutput("choice", [])
    with pytest.raises(ConstraintError, match="one structured output"):
        StructuredOutput.from_request({"guided_regex": "a", "guided_choice": ["a"]})
    req = Request(tiny.tokenizer.encode("x"), SamplingParams(max_new_tokens=4),
                  grammar=StructuredOutput("grammar", "start: undefined_rule").grammar())
    with pytest.raises(ValueError, match="does not compile"):
        Engine(tiny.model, tiny.tokenizer, tiny.stop_ids).submit(req)
