"""Constrained decoding through the real client libraries, chat-completions side: the `openai` client's
structured outputs (`parse`, `stream`), LangChain's ChatOpenAI (`with_structured_output` in its three
methods, `bind_tools`), pydantic-ai's OpenAIChatModel (a tool, NativeOutput, tool output) and the
OpenAI Agents SDK's OpenAIChatCompletionsModel (output_type, a forced function tool), all against one
real `nemotron serve` on the embedded model.

The embedded model is tiny and says silly things: the tests assert what the protocol promises (the
client parses the answer; a schema or a forced tool's parameters validate), never the content. Its
strings are bounded (maxLength) so that an answer ends well before max_tokens whatever it writes."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

import httpx  # noqa: E402  (a dependency of openai)
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from serving import running_server  # noqa: E402

MODEL = "tiny"
MAX_TOKENS = 160


class City(BaseModel):
    """A city."""

    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10_000_000)
    capital: bool


class FinalResult(BaseModel):
    """The final answer."""

    answer: int = Field(ge=0, le=1000)
    unit: Literal["m", "kg", "s"]


@pytest.fixture(scope="module", autouse=True)
def no_telemetry():
    """No network: no LangSmith tracing (the Agents SDK's tracing is switched off where it is made)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def server():
    with running_server(MODEL) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)


def _token_ids(server: str, text: str) -> list[int]:
    r = httpx.post(server + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


def _short_json_bias(server: str) -> dict[str, int]:
    """A logit bias towards `"` and `}`. A free JSON object (json_object, LangChain's json_mode) binds
    no string's length, and the embedded model never closes one by itself: this bias makes it close
    its strings and the object within a few tokens, so the answer ends and parses."""
    (quote,), (brace,) = _token_ids(server, '"'), _token_ids(server, "}")
    return {str(quote): 15, str(brace): 15}


NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


# --------------------------------------------------------------------------------------------------
# the openai client
# --------------------------------------------------------------------------------------------------


def test_openai_parse_returns_the_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Give me a city."}],
                                      response_format=City, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City)


def test_openai_parse_after_budgeted_reasoning(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a city with 21 people."}], response_format=City,
        max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 16})
    msg = r.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning_content")
    assert reasoning   # free, then closed by the budget: the answer after it follows the schema
    assert isinstance(msg.parsed, City)
    assert City.model_validate_json(msg.content) == msg.parsed


def test_openai_json_object(client, server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                       response_format={"type": "json_object"}, max_tokens=60, temperature=0,
                                       logit_bias=_short_json_bias(server), extra_body=NO_THINKING)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_streamed_json_schema(client):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Give me a city."}],
                                        response_format=City, max_tokens=MAX_TOKENS, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1   # streamed, not one piece
    city = City.model_validate_json("".join(deltas))
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.parsed == city


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
])
def test_openai_vllm_structured_outputs_in_extra_body(client, extra, check):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}],
                                       max_tokens=60, temperature=0, extra_body={**extra, **NO_THINKING})
    assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content)


@pytest.mark.parametrize("parallel", [None, False])
def test_openai_required_tool_call_follows_the_schema(client, parallel):
    tool = openai.pydantic_function_tool(FinalResult, name="final_result")
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "What is 7 * 3 - 4?"}],
                                      tools=[tool], tool_choice="required", max_tokens=MAX_TOKENS, temperature=0,
                                      **extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and all(c.function.name == "final_result" for c in calls)
    if parallel is False:
        assert len(calls) == 1
    for c in calls:
        assert isinstance(c.function.parsed_arguments, FinalResult)   # the client parsed the strict tool's arguments
        FinalResult.model_validate_json(c.function.arguments)


@pytest.mark.parametrize("fmt", [{"type": "xml"},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}])
def test_openai_bad_response_format_is_a_bad_request(client, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format=fmt, max_tokens=8)
    assert e.value.status_code == 400


# --------------------------------------------------------------------------------------------------
# LangChain's ChatOpenAI
# --------------------------------------------------------------------------------------------------


class Note(BaseModel):
    """Any JSON object (json_mode promises JSON, not a schema)."""

    model_config = ConfigDict(extra="allow")
    title: str | None = None


def _chat_openai(server, **kw):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server + "/v1", api_key="x", model=MODEL, temperature=0,
                                       max_retries=0, max_tokens=MAX_TOKENS, timeout=120, **kw)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, method):
    out = _chat_openai(server).with_structured_output(City, method=method).invoke("Give me a city as JSON.")
    assert isinstance(out, City)


def test_langchain_json_mode(server):
    llm = _chat_openai(server, logit_bias=_short_json_bias(server), extra_body=NO_THINKING)
    out = llm.with_structured_output(Note, method="json_mode").invoke("Describe a cat in JSON.")
    assert isinstance(out, Note) or (isinstance(out, dict) and Note.model_validate(out))


def test_langchain_bind_tools_forced(server):
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    # LangChain's "any" is OpenAI's "required"
    msg = _chat_openai(server).bind_tools([add], tool_choice="any").invoke("What is 2 + 3?")
    assert msg.tool_calls and all(c["name"] == "add" for c in msg.tool_calls)
    for c in msg.tool_calls:
        assert add.args_schema.model_validate(c["args"])


# --------------------------------------------------------------------------------------------------
# pydantic-ai
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pydantic_ai_model(server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server + "/v1", api_key="x"))


def _pydantic_ai_agent(model, **kw):
    from pydantic_ai import Agent
    return Agent(model, model_settings={"temperature": 0, "max_tokens": MAX_TOKENS}, retries=1, **kw)


def _limits():
    from pydantic_ai.usage import UsageLimits
    return UsageLimits(request_limit=4)


def test_pydantic_ai_tool_run(pydantic_ai_model):
    agent = _pydantic_ai_agent(pydantic_ai_model)
    calls = []

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    result = agent.run_sync("What is 2 + 3? Use the add tool.", usage_limits=_limits())
    assert calls and all(isinstance(a, int) and isinstance(b, int) for a, b in calls)
    assert isinstance(result.output, str)


def test_pydantic_ai_native_output(pydantic_ai_model):
    from pydantic_ai import NativeOutput
    result = _pydantic_ai_agent(pydantic_ai_model, output_type=NativeOutput(City)).run_sync(
        "Give me a city.", usage_limits=_limits())
    assert isinstance(result.output, City)


def test_pydantic_ai_tool_output(pydantic_ai_model):
    """The default output mode: pydantic-ai offers a `final_result` tool and, allowing no text
    output, forces it with tool_choice "required"."""
    result = _pydantic_ai_agent(pydantic_ai_model, output_type=City).run_sync("Give me a city.",
                                                                             usage_limits=_limits())
    assert isinstance(result.output, City)


class Mode(str, Enum):
    ROAD = "road"
    RAIL = "rail"


class Stop(BaseModel):
    city: str = Field(max_length=10)
    nights: int = Field(ge=1, le=9)


class Trip(BaseModel):
    """A trip."""

    mode: Mode
    first: Stop


# pydantic writes an Enum or a nested model as {"$ref": "#/$defs/..."} with the definitions at the root
# of the schema; both libraries below send such tools as they are (and mark them strict)


def test_pydantic_ai_tool_output_with_defs(pydantic_ai_model):
    result = _pydantic_ai_agent(pydantic_ai_model, output_type=Trip).run_sync("Plan a trip.", usage_limits=_limits())
    assert isinstance(result.output, Trip)


# --------------------------------------------------------------------------------------------------
# the OpenAI Agents SDK, chat-completions model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agents_model(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    return agents.OpenAIChatCompletionsModel(
        model=MODEL, openai_client=openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120))


def test_agents_sdk_output_type(agents_model):
    from agents import Agent, ModelSettings, Runner
    agent = Agent(name="cities", instructions="Answer with a city.", model=agents_model, output_type=City,
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))
    assert isinstance(Runner.run_sync(agent, "Give me a city.", max_turns=2).final_output, City)


def test_agents_sdk_forced_function_tool(agents_model):
    from agents import Agent, ModelSettings, Runner, function_tool
    calls = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    # a tool_choice "required" forever would call tools forever: the run ends with the first tool's result
    agent = Agent(name="adder", model=agents_model, tools=[add], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS, tool_choice="required"))
    result = Runner.run_sync(agent, "What is 2 + 3?", max_turns=2)
    assert len(calls) >= 1 and all(isinstance(a, int) and isinstance(b, int) for a, b in calls)
    assert result.final_output == str(sum(calls[0]))


def test_agents_sdk_strict_tool_with_defs(agents_model):
    """The SDK marks function tools strict; with tool_choice "auto" the server constrains a call the
    model makes to the tool's schema, here one with an Enum argument ($defs)."""
    from agents import Agent, ModelSettings, Runner, function_tool
    modes = []

    @function_tool
    def book(mode: Mode, nights: int) -> str:
        """Book a trip."""
        modes.append(mode)
        return "booked"

    agent = Agent(name="booker", model=agents_model, tools=[book], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))
    result = Runner.run_sync(agent, "Book a rail trip for 2 nights.", max_turns=2)
    assert isinstance(result.final_output, str)
    assert all(isinstance(m, Mode) for m in modes)
