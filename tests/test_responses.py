"""The OpenAI Responses API (`/v1/responses`) of the real `nemotron serve` process, driven by the
official `openai` client and by the agent frameworks that speak it (the OpenAI Agents SDK, LangChain,
pydantic-ai), on the scripted checkpoint's deterministic answers: text, reasoning items, function
calls and their round trips, stored responses, streaming events, errors."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from scripted import ASK, HI, RESULT, TOOLS  # noqa: E402
from serving import running_server  # noqa: E402

# the scripted tool in the Responses (flat) shape
TOOL = {"type": "function", **TOOLS[0]["function"]}
SAY_HI, ASK_WEATHER = HI[0]["content"], ASK[0]["content"]


@pytest.fixture(scope="module")
def server(scripted_checkpoint):
    with running_server(scripted_checkpoint) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def name(client):
    return client.models.list().data[0].id


def _items(response) -> list[dict]:
    return [item.model_dump(exclude_none=True) for item in response.output]


def _without_ids(value):
    """A response dict with its random ids and clock readings blanked, to compare two runs."""
    if isinstance(value, dict):
        blank = ("id", "call_id", "created_at", "completed_at")
        return {k: "-" if k in blank else _without_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# the official client
# --------------------------------------------------------------------------------------------------


def test_create_answers_with_a_reasoning_item_and_a_message(client, name):
    r = client.responses.create(model=name, input=SAY_HI, temperature=0)
    assert r.object == "response" and r.status == "completed" and r.model == name
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", "A greeting.")]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert [(c.type, c.text, c.annotations) for c in message.content] == [("output_text", "Hi!", [])]
    assert r.output_text == "Hi!"
    # "A greeting.\n" (12 tokens), </think>, "\nHi!" (4), <|im_end|>: as chat completions counts them
    assert r.usage.output_tokens == 18 and r.usage.output_tokens_details.reasoning_tokens == 13
    chat = client.chat.completions.create(model=name, messages=HI, temperature=0)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_reasoning_effort_none_turns_thinking_off(client, name):
    r = client.responses.create(model=name, input=[{"role": "user", "content": SAY_HI}], temperature=0,
                                reasoning={"effort": "none"})
    assert [item.type for item in r.output] == ["message"] and r.output_text == "Hello there!"
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.reasoning.effort == "none"
    on = client.responses.create(model=name, input=SAY_HI, temperature=0, reasoning={"effort": "high"})
    assert on.output_text == "Hi!" and on.output[0].type == "reasoning"


def test_instructions_and_content_parts_render_as_chat_does(client, name):
    """instructions are the system message; developer is system; input_text parts are text: the same
    prompt (token count) and greedy answer as the equivalent chat completion."""
    system = "You answer briefly."
    chat = client.chat.completions.create(model=name, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": SAY_HI}])
    for kw in ({"instructions": system, "input": SAY_HI},
               {"input": [{"type": "message", "role": "developer", "content": system},
                          {"type": "message", "role": "user",
                           "content": [{"type": "input_text", "text": SAY_HI}]}]}):
        r = client.responses.create(model=name, temperature=0, max_output_tokens=12, **kw)
        assert r.usage.input_tokens == chat.usage.prompt_tokens, kw
        assert r.output_text == (chat.choices[0].message.content or "")
        assert r.instructions == kw.get("instructions")


def test_function_tool_round_trip(client, name):
    r = client.responses.create(model=name, input=ASK_WEATHER, tools=[TOOL], temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id and call.id and call.status == "completed" and r.output_text == ""
    assert r.output[0].content[0].text == "I should call the tool."
    # the client runs the tool and sends its output back with the conversation so far
    history = [{"role": "user", "content": ASK_WEATHER}] + _items(r) + [
        {"type": "function_call_output", "call_id": call.call_id, "output": RESULT["content"]}]
    r2 = client.responses.create(model=name, input=history, tools=[TOOL], temperature=0)
    assert r2.output_text == "It is sunny in Paris." and r2.status == "completed"
    # the same turn rendered by the chat route: the same prompt
    chat = client.chat.completions.create(model=name, tools=TOOLS, temperature=0, max_tokens=1, messages=ASK + [
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": call.call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": call.arguments}}]}, RESULT])
    assert r2.usage.input_tokens == chat.usage.prompt_tokens


def test_previous_response_id_continues_and_stored_responses_are_read_and_deleted(client, name):
    r = client.responses.create(model=name, input=ASK_WEATHER, tools=[TOOL], temperature=0)
    call = r.output[-1]
    r2 = client.responses.create(model=name, previous_response_id=r.id, tools=[TOOL], temperature=0, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": RESULT["content"]}])
    assert r2.output_text == "It is sunny in Paris." and r2.previous_response_id == r.id
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    # an item of a stored response can be referenced instead of repeated
    r3 = client.responses.create(model=name, tools=[TOOL], temperature=0, input=[
        {"role": "user", "content": ASK_WEATHER}, {"type": "item_reference", "id": r.output[0].id},
        {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": RESULT["content"]}])
    assert r3.output_text == "It is sunny in Paris." and r3.usage.input_tokens == r2.usage.input_tokens
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=name, previous_response_id=r.id, input="Thanks")
    # store=false: answered, not remembered
    r4 = client.responses.create(model=name, input=SAY_HI, temperature=0, store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r4.id)


HI_EVENTS = (["response.created", "response.in_progress",
              "response.output_item.added", "response.content_part.added"] + ["response.reasoning_text.delta"] +
             ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
              "response.output_item.added", "response.content_part.added"] + ["response.output_text.delta"] +
             ["response.output_text.done", "response.content_part.done", "response.output_item.done",
              "response.completed"])
CALL_EVENTS = (["response.created", "response.in_progress",
                "response.output_item.added", "response.content_part.added"] + ["response.reasoning_text.delta"] +
               ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                "response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done", "response.completed"])


def _squeeze(types: list[str]) -> list[str]:
    """Event types with runs of deltas counted once."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


@pytest.mark.parametrize("kw, expected", [({"input": SAY_HI}, HI_EVENTS),
                                          ({"input": ASK_WEATHER, "tools": [TOOL]}, CALL_EVENTS)])
def test_stream_events_in_order_end_in_the_non_streamed_response(client, name, kw, expected):
    plain = client.responses.create(model=name, temperature=0, **kw)
    events = list(client.responses.create(model=name, temperature=0, stream=True, **kw))
    types = [e.type for e in events]
    assert _squeeze(types) == expected
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert _without_ids(final.model_dump()) == _without_ids(plain.model_dump())
    # the deltas spell the items; added / done events carry the item ids of the final output
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == final.output[0].content[0].text
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    done = [e.item.id for e in events if e.type == "response.output_item.done"]
    assert done == [item.id for item in final.output]
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_stream_helper_accumulates_the_final_response(client, name):
    with client.responses.stream(model=name, input=ASK_WEATHER, tools=[TOOL], temperature=0) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    with client.responses.stream(model=name, input=SAY_HI, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert text == stream.get_final_response().output_text == "Hi!"


def test_a_length_cut_is_incomplete(client, name):
    r = client.responses.create(model=name, input=SAY_HI, temperature=0, max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[-1].status == "incomplete"
    events = list(client.responses.create(model=name, input=SAY_HI, temperature=0, max_output_tokens=5,
                                          stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_tool_choice_and_parallel_tool_calls(client, name):
    r = client.responses.create(model=name, input=ASK_WEATHER, tools=[TOOL], temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    assert [item.name for item in r.output if item.type == "function_call"] == ["get_weather"]
    assert r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"
    r = client.responses.create(model=name, input=ASK_WEATHER, tools=[TOOL], temperature=0, tool_choice="none",
                                parallel_tool_calls=False)
    # "none": the prompt offers no tools (as chat completions renders it), and no call is parsed
    chat = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, temperature=0, tool_choice="none")
    assert not [item for item in r.output if item.type == "function_call"]
    assert r.output_text == chat.choices[0].message.content and r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.parallel_tool_calls is False and r.tool_choice == "none"


@pytest.mark.parametrize("kw, status, field", [
    ({"previous_response_id": "resp_unknown", "input": "hi"}, 404, "previous_response_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "hi", "tools": [{"type": "function", "name": ""}]}, 400, "tools"),
    ({"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"input": [{"type": "message", "role": "wizard", "content": "hi"}]}, 400, "input"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input"),
    ({"input": [{"type": "computer_call_output"}]}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_nowhere"}]}, 404, "input"),
    ({"input": 5}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"input": "hi", "background": True}, 400, "background"),
    ({"input": "hi", "model": "another-model"}, 404, "model"),
])
def test_bad_requests_get_openai_errors_naming_the_field(client, name, kw, status, field):
    kw = {"model": name, **kw}
    kind = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(kind) as e:
        client.responses.create(**kw)
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == field, err
    assert "\n" not in err["message"] and (field.split(".")[0] in err["message"] or status == 404), err


def test_hostile_bodies_never_get_a_5xx(server, name):
    """Seeded bodies with fields of the wrong type, shape or range (streamed or not): a 4xx in OpenAI's
    error shape or an answer, never a 5xx, and the server still answers afterwards."""
    import random

    from test_server import http

    rng = random.Random(0)
    odd = [None, True, 0, -1, 1.5, 2 ** 64, "", "\ud800", "x" * 3000, [], [None], [[]], {}, {"type": "function"},
           {"a": {"b": []}}, [{"type": "message"}], [{"role": "user", "content": [{"type": "input_text"}]}],
           [{"type": "function_call", "call_id": 1}], [{"type": "function_call_output", "call_id": "c", "output": 5}],
           [{"type": "reasoning", "content": "x"}], [{"type": "item_reference"}], [{"role": "tool", "content": "x"}],
           [{"type": "function", "name": "f", "parameters": "object"}], [{"type": "function"}],
           {"effort": None}, {"effort": 5}, {"format": {"type": "json_schema", "name": "n", "schema": 5}},
           {"format": []}, {"type": "function", "name": 5}, "required", "sometimes"]
    fields = ["input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
              "temperature", "top_p", "reasoning", "text", "previous_response_id", "store", "stream", "metadata",
              "user", "seed", "model"]
    statuses = {}
    for _ in range(150):
        body = {"model": name, "input": SAY_HI, "max_output_tokens": 4, "temperature": 0}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(odd)
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
        got, headers, answer = http(server, "/v1/responses", raw, timeout=30)
        assert got < 500, (body, got, answer)
        if got >= 400:
            assert set(answer["error"]) == {"message", "type", "param", "code"}, (body, answer)
            assert answer["error"]["message"] and "\n" not in answer["error"]["message"], (body, answer)
        elif headers.get("content-type", "").startswith("text/event-stream"):
            assert '"type": "response.failed"' not in answer and "event: error" not in answer, (body, answer)
        else:
            assert answer["object"] == "response", (body, answer)
        statuses[got] = statuses.get(got, 0) + 1
    assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 3, statuses   # mostly refused, the valid served
    ok, _, r = http(server, "/v1/responses", {"model": name, "input": SAY_HI, "temperature": 0})
    assert ok == 200 and r["output"][-1]["content"][0]["text"] == "Hi!"


def test_structured_output_json_schema(client, name):
    """text.format json_schema: the answer parses into the schema (constrained decoding: the chat
    path's response_format)."""

    class Weather(pydantic.BaseModel):
        sunny: bool

    r = client.responses.parse(model=name, input=ASK_WEATHER, text_format=Weather, temperature=0,
                               reasoning={"effort": "none"}, max_output_tokens=64)
    assert isinstance(r.output_parsed, Weather)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"


# --------------------------------------------------------------------------------------------------
# agent frameworks over the Responses API
# --------------------------------------------------------------------------------------------------


def test_openai_agents_sdk_runs_a_tool_round_trip(server, name):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city"""
        calls.append(city)
        return RESULT["content"]

    model = agents.OpenAIResponsesModel(model=name, openai_client=AsyncOpenAI(
        base_url=server + "/v1", api_key="unused", max_retries=0))
    agent = agents.Agent(name="weather", model=model, tools=[get_weather],
                         model_settings=agents.ModelSettings(temperature=0))
    result = agents.Runner.run_sync(agent, ASK_WEATHER, max_turns=3)
    assert calls == ["Paris"]
    assert result.final_output == "It is sunny in Paris."


def test_openai_agents_sdk_structured_output_type(server, name):
    """An Agent with output_type: the Responses text.format json_schema (constrained decoding)."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI
    from openai.types.shared import Reasoning

    agents.set_tracing_disabled(True)

    class Weather(pydantic.BaseModel):
        sunny: bool

    model = agents.OpenAIResponsesModel(model=name, openai_client=AsyncOpenAI(
        base_url=server + "/v1", api_key="unused", max_retries=0))
    agent = agents.Agent(name="weather", model=model, output_type=Weather, model_settings=agents.ModelSettings(
        temperature=0, max_tokens=64, reasoning=Reasoning(effort="none")))
    result = agents.Runner.run_sync(agent, ASK_WEATHER, max_turns=1)
    assert isinstance(result.final_output, Weather)


def test_langchain_chat_openai_over_responses(server, name):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model=name, base_url=server + "/v1", api_key="unused", use_responses_api=True,
                        temperature=0, max_retries=0)
    msg = llm.invoke(SAY_HI)
    assert msg.text == "Hi!"
    called = llm.bind_tools([TOOLS[0]]).invoke(ASK_WEATHER)
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_pydantic_ai_responses_model_runs_a_tool(server, name):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent, Tool
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    calls = []

    def get_weather(city: str) -> str:
        calls.append(city)
        return RESULT["content"]

    tool = Tool.from_schema(get_weather, name="get_weather", description=TOOL["description"],
                            json_schema=TOOL["parameters"])
    model = OpenAIResponsesModel(name, provider=OpenAIProvider(base_url=server + "/v1", api_key="unused"))
    agent = Agent(model, tools=[tool], model_settings={"temperature": 0})
    result = agent.run_sync(ASK_WEATHER)
    assert calls == ["Paris"]
    assert result.output == "It is sunny in Paris."


# --------------------------------------------------------------------------------------------------
# the pieces on their own
# --------------------------------------------------------------------------------------------------


def test_parallel_tool_calls_false_keeps_the_first_call():
    from nemotron.chat.parsers import Delta
    from nemotron.serve.responses import Output

    calls = [{"index": i, "id": f"call_{i}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
             for i, city in enumerate(["Paris", "Rome"])]
    for parallel, expected in ((True, ["call_0", "call_1"]), (False, ["call_0"])):
        out = Output(parallel)
        events = out.add(Delta("hmm", "", calls)) + out.close()
        assert [item["call_id"] for item in out.calls] == expected
        assert [e["type"] for e in events].count("response.function_call_arguments.done") == len(expected)
        assert [item["type"] for item in out.items] == ["reasoning"] + ["function_call"] * len(expected)


def test_the_store_forgets_the_least_recently_used_within_its_bounds():
    from nemotron.serve.responses import ResponseStore, Stored

    store = ResponseStore(max_responses=3, max_chars=100)

    def put(rid: str, chars: int = 10) -> None:
        item = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "content": "x"}
        store.put(Stored({"id": rid}, [item], chars), [item])

    for rid in "abc":
        put(rid)
    assert store.get("a") is not None   # now the most recently used
    put("d")
    assert store.get("b") is None and store.item("msg_b") is None
    assert [rid for rid in "acd" if store.get(rid)] == ["a", "c", "d"] and store.item("msg_a") is not None
    put("e", chars=95)   # past the text bound: the older ones go until it fits
    assert len(store) == 1 and store.get("e") is not None and store.chars == 95
    assert store.delete("e") and not store.delete("e") and store.chars == 0
