"""The real `nemotron serve` process on a loopback port, driven by the official `openai` client and
raw HTTP: chat (plain, streaming, reasoning, tools, thinking off, budget), completions, continuous
batching, prefix caching, metrics, and hostile input."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from scripted import ASK, CALL, HI, RESULT, TOOLS  # noqa: E402
from serving import running_server  # noqa: E402


def http(base: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         method: str | None = None, timeout: float = 60) -> tuple[int, dict, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


@pytest.fixture(scope="module")
def scripted(scripted_checkpoint):
    return scripted_checkpoint   # trained once per session (conftest), shared with test_responses


@pytest.fixture(scope="module")
def server(scripted):
    with running_server(scripted, "--prefill-chunk", "64", "--max-batch", "8") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(client, server, scripted):
    models = client.models.list()
    assert [m.id for m in models.data] == [scripted.name]
    assert models.data[0].model_dump()["max_model_len"] == 4096
    assert http(server, "/health")[0] == 200


def _name(client) -> str:
    return client.models.list().data[0].id


def test_chat_reasoning_apart_from_content(client):
    r = client.chat.completions.create(model=_name(client), messages=HI, temperature=0)
    msg = r.choices[0].message.model_dump()
    assert msg["reasoning_content"] == msg["reasoning"] == "A greeting."
    assert msg["content"] == "Hi!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 12 + 1 + 4 + 1  # "A greeting.\n", </think>, "\nHi!", <|im_end|>


def test_chat_thinking_off(client):
    r = client.chat.completions.create(model=_name(client), messages=HI, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message.model_dump()
    assert msg["content"] == "Hello there!" and not msg.get("reasoning_content")


def test_tool_call_round_trip(client):
    r = client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I should call the tool."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the client sends the call back with the tool's result; the model answers from it
    history = ASK + [{"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                      "tool_calls": [{"id": "call_1", "type": "function",
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                     RESULT]
    assert history[1]["tool_calls"][0]["function"] == CALL["tool_calls"][0]["function"]
    r2 = client.chat.completions.create(model=_name(client), messages=history, tools=TOOLS, temperature=0)
    assert r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client):
    stream = client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    reasoning, content, calls, finish, usage = "", "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta.model_dump()
            reasoning += d.get("reasoning_content") or ""
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                entry["name"] += tc["function"].get("name") or ""
                entry["arguments"] += tc["function"].get("arguments") or ""
            finish = c.finish_reason or finish
    assert reasoning == "I should call the tool." and content == ""
    assert calls == {0: {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    assert finish == "tool_calls"
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_thinking_budget_honoured(client):
    r = client.chat.completions.create(model=_name(client), messages=HI, temperature=0, max_tokens=40,
                                       extra_body={"thinking_token_budget": 4})
    msg = r.choices[0].message.model_dump()
    # 4 tokens, then the line is closed within the grace window (8): "A greeting." is 11 bytes
    assert msg["reasoning_content"] and "A greeting.".startswith(msg["reasoning_content"])
    assert len(msg["reasoning_content"]) <= 4 + 8
    assert msg["content"] is not None or msg.get("tool_calls")


def test_named_tool_choice_forces_the_call(client):
    r = client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"


def test_completions_endpoint(client):
    r = client.completions.create(model=_name(client), prompt="The weather", max_tokens=5, temperature=0,
                                  logprobs=2, echo=True, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text.startswith("The weather") and r.usage.completion_tokens == 5
    # echo scores the prompt too (OpenAI's legacy API): its first token has no log-prob
    lp, n_prompt = choice.logprobs, r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 5 and "".join(lp.tokens[:n_prompt]) == "The weather"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=_name(client), prompt="The weather", max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert "The weather" + streamed == choice.text


def test_sampling_seed_and_n(client):
    kw = dict(model=_name(client), messages=HI, temperature=1.0, max_tokens=8, seed=7, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.model_dump() for c in a.choices] == [c.message.model_dump() for c in b.choices]
    assert len(a.choices) == 2


def test_concurrent_streams_equal_their_solo_runs(client):
    prompts = [[{"role": "user", "content": f"Tell me about number {i} and {i * 7 % 13}"}] for i in range(32)]

    def run(msgs, stream):
        kw = dict(model=_name(client), messages=msgs, temperature=0, max_tokens=12)
        if not stream:
            r = client.chat.completions.create(**kw)
            return (r.choices[0].message.reasoning_content or "") + "|" + (r.choices[0].message.content or "")
        reasoning = content = ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                d = c.delta.model_dump()
                reasoning += d.get("reasoning_content") or ""
                content += d.get("content") or ""
        return reasoning + "|" + content

    alone = [run(p, False) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: run(p, True), prompts))
    assert together == alone


def test_prefix_cache_hits_and_is_exact(client, server):
    long_system = {"role": "system", "content": "You are a weather assistant. " * 12}
    msgs = [long_system] + HI
    kw = dict(model=_name(client), messages=msgs, temperature=0, max_tokens=10, logprobs=True)
    first = client.chat.completions.create(**kw)
    second = client.chat.completions.create(**kw)
    assert second.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details.cached_tokens >= 64
    assert [t.logprob for t in second.choices[0].logprobs.content] == \
        [t.logprob for t in first.choices[0].logprobs.content]
    metrics = http(server, "/metrics")[2]
    hits = [line for line in metrics.splitlines() if line.startswith("nemotron:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 64


def test_metrics_exposition(server, client):
    client.chat.completions.create(model=_name(client), messages=HI, temperature=0, max_tokens=3)
    status, headers, text = http(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_sum", "prefix_cache_queries_total", "request_success_total"):
        assert f"nemotron:{name}" in text, name


def _metric(server: str, name: str) -> float:
    text = http(server, "/metrics")[2]
    return float(next(ln for ln in text.splitlines() if ln.startswith(f"nemotron:{name}")).split()[-1])


def test_disconnect_frees_the_slot(server):
    before = _metric(server, "generation_tokens_total")
    body = {"messages": HI, "max_tokens": 3000, "stream": True, "temperature": 1.0, "ignore_eos": True}
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    resp.readline()
    resp.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while _metric(server, "num_requests_running") != 0:
        assert time.time() < deadline, "the disconnected request kept running"
        time.sleep(0.1)
    time.sleep(0.3)
    assert _metric(server, "generation_tokens_total") - before < 3000   # cut short, not run to the end


BAD_BODIES = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    ({"messages": "hi"}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": 5}]}, 400),
    ({"messages": HI, "temperature": "hot"}, 400),
    ({"messages": HI, "temperature": -1}, 400),
    ({"messages": HI, "top_p": 0}, 400),
    ({"messages": HI, "max_tokens": 0}, 400),
    ({"messages": HI, "max_tokens": 10 ** 9}, 400),
    ({"messages": HI, "n": 1000}, 400),
    ({"messages": HI, "stop": [""]}, 400),
    ({"messages": HI, "logprobs": True, "top_logprobs": 99}, 400),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": 3}}]}, 400),
    ({"messages": HI, "tools": "all"}, 400),
    ({"messages": HI, "tool_choice": "sometimes", "tools": TOOLS}, 400),
    ({"messages": HI, "tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, 400),
    ({"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}}, 400),
    ({"messages": HI, "stream_options": {"include_usage": True}}, 400),
    ({"messages": HI, "model": "some-other-model"}, 404),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, 400),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 400),   # longer than this server's context
    ({"messages": HI, "logit_bias": {"hi": 1}}, 400),
    ({"messages": HI, "logit_bias": {"5": 1e9}}, 400),
    ({"messages": HI, "prompt_logprobs": 99}, 400),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(scripted):
    with running_server(scripted, "--max-model-len", "2048", "--max-tokens", "512") as base:
        for body, status in BAD_BODIES:
            got, _, err = http(base, "/v1/chat/completions", body)
            assert got == status, (body, got, err)
            assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], body
        for body in (b"", {"prompt": 5}, {"prompt": [[]]}, {"prompt": [10 ** 9]}, {"prompt": "hi", "logprobs": 50}):
            got, _, err = http(base, "/v1/completions", body)
            assert got == 400 and "error" in err, (body, got, err)
        assert http(base, "/v1/nowhere")[0] == 404
        assert http(base, "/v1/chat/completions", method="GET")[0] == 405
        assert http(base, "/health")[0] == 200
        ok, _, r = http(base, "/v1/chat/completions", {"messages": HI, "temperature": 0})
        assert ok == 200 and r["choices"][0]["message"]["content"] == "Hi!"


# requests aimed at the ways one request once broke the server (seeds, token ids, template
# arguments, bare tools, lone surrogates, huge integers): each replaces or adds a field of a valid body
_BARE_TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
_NAMED = {"type": "function", "function": {"name": "get_weather"}}
_LONE = ["a\ud800b", "\udc00", "\ud83d", "ok\udfff"]
_HUGE_INTS = [2 ** 63, 2 ** 64, 2 ** 64 - 1, 2 ** 70, -(2 ** 63) - 1, -(2 ** 70), 10 ** 30]
_CHAT_TARGETED = [
    lambda r: {"seed": r.choice([2 ** 64, 2 ** 64 - 1, 2 ** 64 - 2, -(2 ** 63), -(2 ** 63) - 1, -1, 2 ** 70]),
               "n": r.choice([1, 2, 3, 16])},
    lambda r: {"stop_token_ids": r.choice([[2 ** 63], [2 ** 64], [-1], [10 ** 6], [5, 2 ** 70], [1] * 1000,
                                           [True], [1.5], [320], [319]])},
    lambda r: {"chat_template_kwargs": r.choice([
        {"add_generation_prompt": False}, {"messages": []}, {"tools": 1}, {"tokenizer": None},
        {"template": "x"}, {"chat_template_name": []}, {"enable_thinking": "x"}, {"x": "\ud800"},
        {"\udc00": 1}, {"bos_token": "a\ud800"}, {"a": {"b": [{"c": "\udfff"}]}}])},
    lambda r: {"tools": [dict(_BARE_TOOL)], "tool_choice": r.choice([_NAMED, "required", "auto", "none"])},
    lambda r: {"tools": [{"name": "f"}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    lambda r: {"messages": [{"role": "user", "content": r.choice(_LONE)}]},
    lambda r: {"messages": [{"role": "user", "content": [{"type": "text", "text": r.choice(_LONE)}]}]},
    lambda r: {"messages": [{"role": "user", "content": "hi", "name": r.choice(_LONE)}]},
    lambda r: {"messages": HI + [{"role": "assistant", "content": "x", "reasoning_content": r.choice(_LONE)}]
               + HI},
    lambda r: {"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [{"type": "function",
               "function": {"name": "get_weather",
                            "arguments": r.choice([json.dumps({"city": r.choice(_LONE)}),
                                                   {"city": r.choice(_LONE)}, {r.choice(_LONE): 1}])}}]},
               RESULT], "tools": TOOLS},
    lambda r: {"tools": [{"type": "function", "function": {"name": "f", "description": r.choice(_LONE)}}]},
    lambda r: {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {r.choice(_LONE): {"type": "string"}}}}}]},
    lambda r: {"tools": [{"type": "function", "function": {"name": r.choice(_LONE)}}]},
    lambda r: {"stop": r.choice([_LONE[0], [_LONE[1]], ["ok", _LONE[2]]])},
    lambda r: {r.choice(["max_tokens", "max_completion_tokens", "top_logprobs", "n", "top_k",
                         "thinking_token_budget", "seed"]): r.choice(_HUGE_INTS),
               "logprobs": r.choice([True, False])},
    lambda r: {"messages": [{"role": "user", "content": "hi " * r.choice([10, 1000, 3000])}],
               "max_tokens": r.choice([1, 512, 2000, 4096])},
]
_COMPLETION_TARGETED = [
    lambda r: {"prompt": r.choice([[-1], [2 ** 70], [2 ** 63], [[5, -3]], [[2 ** 64]], [320], [319, 5], [[1], [2]]]),
               "echo": r.choice([True, False])},
    lambda r: {"prompt": r.choice([_LONE[0], [_LONE[1], "ok"], "x" + _LONE[3]])},
    lambda r: {"seed": r.choice([2 ** 64 - 1, 2 ** 64, -(2 ** 63) - 1]), "n": r.choice([1, 2]),
               "prompt": r.choice(["hi", ["a", "b"]])},
    lambda r: {"stop_token_ids": r.choice([[2 ** 63], [-1], [320], [5]])},
    lambda r: {"stop": r.choice([_LONE[0], [_LONE[2]]])},
    lambda r: {r.choice(["max_tokens", "logprobs", "n", "top_k", "seed"]): r.choice(_HUGE_INTS)},
]


def _hostile_bodies(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n (endpoint, raw body) pairs: valid chat and completion requests with one to three fields
    replaced by values of the wrong type, shape or range, messages and tools mangled, the targeted
    requests above, streamed or not, and raw payloads that are not a JSON object at all. Seeded: the
    same bodies every run."""
    import random

    rng = random.Random(seed)
    odd_values = [None, True, False, 0, -1, 1.5, -1e308, 1e308, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 2 ** 70, "",
                  "x" * 3000, "\u0000", "\ud7ff\ufffe", "\ud800", [], [None], [[[]]], {}, {"a": {"b": {"c": []}}},
                  [1, "two", None], "NaN", -0.0]
    chat_fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                   "min_p", "n", "stop", "stream", "stream_options", "seed", "logprobs", "top_logprobs", "tools",
                   "tool_choice", "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format",
                   "chat_template_kwargs", "thinking_token_budget", "ignore_eos", "user", "logit_bias",
                   "stop_token_ids"]
    completion_fields = ["model", "prompt", "max_tokens", "temperature", "echo", "logprobs", "stop", "stream", "n",
                         "suffix", "best_of", "seed", "stop_token_ids"]
    odd_messages = [
        [{"role": "user"}], [{"content": "hi"}], [{"role": "tool", "content": "x"}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
        [{"role": "assistant", "tool_calls": "call"}], [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "system", "content": None}], [{"role": "user", "content": "hi", "name": ["x"]}],
        [{"role": "USER", "content": "hi"}], [{"role": "user", "content": "hi"}] * 10_000, ["hi"], [None], [[]],
    ]
    odd_tools = [
        [{"type": "function"}], [{"type": "retrieval", "function": {"name": "f"}}], [{"function": {"name": "f"}}],
        [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
        [{"type": "function", "function": {"name": "", "parameters": {}}}], [None], {"type": "function"},
        [{"name": "f"}],
    ]
    raw = [b"", b"null", b"0", b'"text"', b"[]", b"{", b"}", b'{"messages": [', b"\xff\xfe\x00", b"{" * 5000 + b"}" * 5000,
           b'{"messages": NaN}', b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
           b'{"a": 1, "a": 2}', b'{"messages": "' + b"\\u" * 100 + b'"}',
           b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"prompt": "\\udfff x"}']
    bodies: list[tuple[str, bytes]] = [("/v1/chat/completions", r) for r in raw] + [("/v1/completions", r) for r in raw]
    while len(bodies) < n:
        chat = rng.random() < 0.7
        body = ({"messages": HI, "max_tokens": 4, "temperature": 0} if chat else {"prompt": "hi", "max_tokens": 4})
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.35:
                body.update(rng.choice(_CHAT_TARGETED if chat else _COMPLETION_TARGETED)(rng))
            elif chat and roll < 0.45:
                body["messages"] = rng.choice(odd_messages)
            elif chat and roll < 0.55:
                body["tools"] = rng.choice(odd_tools)
                if rng.random() < 0.5:
                    body["tool_choice"] = rng.choice(["required", "auto", {"type": "function"}, {"function": None},
                                                      {"type": "function", "function": {"name": "f"}}])
            else:
                body[rng.choice(chat_fields if chat else completion_fields)] = rng.choice(odd_values)
        if rng.random() < 0.25:   # streamed: a 4xx before the stream starts, or a stream that ends well
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        bodies.append(("/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode()))
    return bodies


def _stream_events(raw: str) -> list:
    """The JSON payloads of a Server-Sent Events body, up to `[DONE]` (which must end it)."""
    lines = [ln[len("data: "):] for ln in raw.splitlines() if ln.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", raw[-300:]
    return [json.loads(ln) for ln in lines[:-1]]


def _fuzz(scripted, count: int) -> dict[int, int]:
    """Send `count` hostile bodies to a fresh server; returns how many got each status. Every answer
    is a 2xx (a stream that ends with [DONE] and holds no error) or a 4xx in OpenAI's error shape,
    each within the client's timeout; the server still answers /health and a normal request."""
    bodies = _hostile_bodies(count)
    assert len(bodies) >= count
    statuses: dict[int, int] = {}
    with running_server(scripted, "--max-model-len", "2048", "--max-tokens", "512") as base:
        for path, body in bodies:
            got, headers, answer = http(base, path, body, timeout=30)
            assert got < 500, (path, body[:200], got, answer)
            if got >= 400:
                assert isinstance(answer, dict) and set(answer["error"]) == {"message", "type", "param", "code"}, \
                    (path, body[:200], got, answer)
            elif headers.get("content-type", "").startswith("text/event-stream"):
                assert not any("error" in e for e in _stream_events(answer)), (path, body[:200], answer[-500:])
            else:
                assert isinstance(answer, dict) and answer["choices"], (path, body[:200], answer)
            statuses[got] = statuses.get(got, 0) + 1
        assert http(base, "/health")[0] == 200
        ok, _, r = http(base, "/v1/chat/completions", {"messages": HI, "temperature": 0})
        assert ok == 200 and r["choices"][0]["message"]["content"] == "Hi!"
    print(f"{count} hostile bodies: statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(400, 0) + statuses.get(422, 0) > count // 2   # mostly refused, not ignored
    assert statuses.get(200, 0) > count // 20                          # and valid ones still served
    return statuses


@pytest.mark.parametrize("count", [300, pytest.param(1200, marks=pytest.mark.slow)])
def test_fuzzed_hostile_bodies_never_get_a_5xx(scripted, count):
    """Seeded hostile bodies (a few hundred by default, 1,200 with -m slow): never a 5xx, errors in
    OpenAI's shape, and the server still serves afterwards."""
    _fuzz(scripted, count)


def test_api_key_body_limit_and_queue_limit(scripted):
    with running_server(scripted, "--api-key", "sekret", "--max-batch", "1", "--max-waiting", "1") as base:
        assert http(base, "/v1/models")[0] == 401
        status, _, err = http(base, "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sekret"}
        assert http(base, "/v1/models", headers=auth)[0] == 200
        assert http(base, "/health")[0] == 200           # health and metrics stay open, as in vLLM
        big = {"messages": [{"role": "user", "content": "x" * (5 << 20)}]}
        assert http(base, "/v1/chat/completions", big, headers=auth)[0] == 413
        # one running + one waiting fill the server: more requests are told to come back later
        body = {"messages": HI, "max_tokens": 400, "temperature": 1.0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: http(base, "/v1/chat/completions", body, headers=auth), range(6)))
        statuses = sorted(s for s, _, _ in results)
        assert 200 in statuses and 429 in statuses, statuses
        rejected = next(h for s, h, _ in results if s == 429)
        assert rejected.get("retry-after") == "1"
        assert http(base, "/v1/chat/completions", {"messages": HI, "temperature": 0}, headers=auth)[0] == 200


def test_mtp_speculation_through_the_server(scripted):
    with running_server(scripted, "--speculative-tokens", "2") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0)
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
        r = client.chat.completions.create(model=_name(client), messages=HI, temperature=0)
        assert r.choices[0].message.content == "Hi!"
        drafts = _metric(base, "spec_decode_num_draft_tokens_total")
        accepted = _metric(base, "spec_decode_num_accepted_tokens_total")
        assert drafts > 0 and 0 <= accepted <= drafts


# --------------------------------------------------------------------------------------------------
# one request never hurts another (each case once took the server down or answered a 500)
# --------------------------------------------------------------------------------------------------

def _assert_refused(base: str, path: str, body: dict, param: str, status: int = 400) -> dict:
    got, _, err = http(base, path, body, timeout=30)
    assert got == status, (body, got, err)
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["param"] == param, (body, err)
    return err["error"]


def _assert_still_serving(base: str) -> None:
    assert http(base, "/health")[0] == 200
    ok, _, r = http(base, "/v1/chat/completions", {"messages": HI, "temperature": 0})
    assert ok == 200 and r["choices"][0]["message"]["content"] == "Hi!"


def test_seeds_and_token_ids_out_of_range_are_refused_and_hurt_no_stream(server):
    """A seed torch cannot take (for any of the n choices: choice i uses seed + i) or a stop token id
    past the vocabulary once crashed the engine thread: every stream in flight got a 500 and /health
    a 503 from then on. Now each is a 400 naming the field, and a stream running meanwhile ends well."""
    body = {"messages": HI, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(http, server, "/v1/chat/completions", body)
        time.sleep(0.3)   # the stream is under way
        for bad, param in [({"seed": 2 ** 64}, "seed"), ({"seed": -(2 ** 63) - 1}, "seed"),
                           ({"seed": 2 ** 64 - 1, "n": 2}, "seed"), ({"stop_token_ids": [2 ** 63]}, "stop_token_ids"),
                           ({"stop_token_ids": [10 ** 6]}, "stop_token_ids")]:
            _assert_refused(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, **bad}, param)
        _assert_refused(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2 ** 64 - 1, "n": 2},
                        "seed")
        ok, _, raw = stream.result(timeout=120)
    events = _stream_events(raw)
    assert ok == 200 and not any("error" in e for e in events)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    # the edges of the range are served
    for edge in ({"seed": 2 ** 64 - 1}, {"seed": -(2 ** 63)}, {"seed": 2 ** 64 - 2, "n": 2}):
        ok, _, r = http(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, **edge})
        assert ok == 200 and len(r["choices"]) == edge.get("n", 1), (edge, r)
    _assert_still_serving(server)


def test_template_arguments_echo_bare_tools_and_lone_surrogates_get_a_4xx(server):
    """Inputs that once answered a 500 (dropped connection, traceback logged): template arguments
    that collide with the server's own, echoed token ids outside the vocabulary, bare tools with a
    named tool_choice (now served), and lone surrogates in any text that reaches the tokenizer."""
    chat, completions = "/v1/chat/completions", "/v1/completions"
    for key in ("add_generation_prompt", "messages", "tools", "tokenizer"):
        err = _assert_refused(server, chat, {"messages": HI, "chat_template_kwargs": {key: False}},
                              "chat_template_kwargs")
        assert key in err["message"]
    for prompt in ([-1], [2 ** 70], [[5, 2 ** 63]]):
        _assert_refused(server, completions, {"prompt": prompt, "echo": True, "max_tokens": 2}, "prompt")
    bare = {k: v for k, v in TOOLS[0]["function"].items()}
    ok, _, r = http(server, chat, {"messages": ASK, "tools": [bare], "temperature": 0,
                                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert ok == 200 and r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather", r
    lone = "a\ud800b"
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": lone})}}]}
    cases = [
        (chat, {"messages": [{"role": "user", "content": lone}]}, "messages", "messages[0].content"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]}, "messages",
         "messages[0].content[0].text"),
        (chat, {"messages": [{"role": "user", "content": "hi", "name": lone}]}, "messages", "messages[0].name"),
        (chat, {"messages": ASK + [call, RESULT], "tools": TOOLS}, "messages",
         "messages[1].tool_calls[0].function.arguments"),
        (chat, {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "description": lone}}]},
         "tools", "tools[0].function.description"),
        (chat, {"messages": HI, "chat_template_kwargs": {"documents": [lone]}}, "chat_template_kwargs",
         "chat_template_kwargs.documents[0]"),
        (chat, {"messages": HI, "stop": [lone]}, "stop", "stop[0]"),
        (completions, {"prompt": lone}, "prompt", "prompt[0]"),
        (completions, {"prompt": "hi", "stop": lone}, "stop", "stop[0]"),
    ]
    for path, body, param, where in cases:
        err = _assert_refused(server, path, body, param)
        assert err["message"].startswith(where) and "surrogate" in err["message"], (where, err)
    _assert_still_serving(server)


def _server_process(base: str):
    import psutil

    port = base.rsplit(":", 1)[1]
    return next(p for p in psutil.Process().children() if port in p.cmdline())


def test_huge_prompts_are_refused_before_rendering_without_stalling_or_keeping_memory(scripted):
    """3.9 MB prompts to a 1024-token context were rendered and tokenized on the event loop (/health
    stalled ~2 s each) and kept ~400 MB each. Now they are refused (400 context_length_exceeded)
    before that work, /health answers throughout, and the server's memory returns to its baseline."""
    import threading

    big = "x" * 3_900_000
    probes = [("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": big}]}]}),
              ("/v1/completions", {"prompt": big}), ("/v1/chat/completions", {"messages": HI + [
                  {"role": "assistant", "content": "x"}, {"role": "user", "content": big}]}),
              # text outside the contents is rendered too: a tool description, old reasoning
              ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
                  "name": "f", "description": big, "parameters": {"type": "object", "properties": {}}}}]}),
              ("/v1/chat/completions", {"messages": HI + [{"role": "assistant", "content": "x",
                                                           "reasoning_content": big}] + HI})] * 2
    with running_server(scripted, "--max-model-len", "1024") as base:
        proc = _server_process(base)
        _assert_still_serving(base)
        baseline = proc.memory_info().rss
        health, done = [], threading.Event()

        def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                status = http(base, "/health", timeout=10)[0]
                health.append((status, time.perf_counter() - t))
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for path, body in probes:
                got, _, err = http(base, path, body, timeout=60)
                assert got in (400, 413), (path, got, err)
                assert got == 413 or err["error"]["code"] == "context_length_exceeded", err
        finally:
            done.set()
            poller.join()
        assert len(health) >= len(probes) and all(s == 200 for s, _ in health)
        assert max(t for _, t in health) < 0.5, sorted(t for _, t in health)[-5:]   # a liveness bound
        time.sleep(1.0)   # the freed memory is handed back a moment after each large request
        grown = proc.memory_info().rss - baseline
        assert grown < 50 << 20, f"RSS grew {grown >> 20} MB"
        _assert_still_serving(base)


def test_an_out_of_range_integer_is_named_not_printed_in_full():
    from nemotron.serve.protocol import APIError, get

    with pytest.raises(APIError, match="got an integer of 401 digits") as e:
        get({"seed": 10 ** 400}, "seed", int)
    assert e.value.status == 400 and len(e.value.message) < 200


def test_a_length_cut_tool_call_ends_alike_in_the_api_the_server_and_grpo(client, scripted, tmp_path, monkeypatch):
    """One finish-reason rule (nemotron.chat.turn): a turn cut by max tokens just after a complete tool
    call has its call parsed and ends with "length" in the Python API, the server (plain and streamed)
    and GRPO's reading of its samples; the same turn left to stop by itself ends with "tool_calls"."""
    import nemotron
    from nemotron.chat.turn import ChatTurn
    from nemotron.train import load_recipe
    from nemotron.train.stages import make_stage
    from scripted import EXAMPLES

    m = nemotron.load(scripted)
    assert EXAMPLES[0][0] == ASK and EXAMPLES[0][3].endswith("</tool_call>\n<|im_end|>")
    n = len(m.tokenizer.encode(EXAMPLES[0][3], add_special_tokens=False))   # the last token ends the turn
    grpo_results = []
    result_for = ChatTurn.result_for

    def recording(self, request):
        grpo_results.append(result_for(self, request))
        return grpo_results[-1]

    monkeypatch.setattr(ChatTurn, "result_for", recording)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": ASK, "tools": TOOLS, "answer": ""}) + "\n")
    for limit, expected in ((n - 1, "length"), (n, "tool_calls")):
        api = m.chat(ASK, tools=TOOLS, max_new_tokens=limit)
        served = client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0,
                                                max_tokens=limit).choices[0]
        streamed, stream_calls = None, []
        for chunk in client.chat.completions.create(model=_name(client), messages=ASK, tools=TOOLS, temperature=0,
                                                    max_tokens=limit, stream=True):
            for c in chunk.choices:
                streamed = c.finish_reason or streamed
                stream_calls += c.delta.tool_calls or []
        cfg = load_recipe(None, [f"data=[{data}]", f"model={scripted}", f"out_dir={tmp_path / 'grpo'}", "group_size=2",
                                 "batch_size=1", f"max_new_tokens={limit}", "temperature=0", "grpo_reward=exact"], "grpo")
        grpo_results.clear()
        make_stage(cfg, m.model, m.tokenizer)._generate(m.model, [0])
        assert len(grpo_results) == 2
        assert [c["function"]["name"] for c in api.tool_calls] == ["get_weather"]
        assert [c.function.name for c in served.message.tool_calls] == ["get_weather"] and len(stream_calls) == 1
        assert all(len(r.tool_calls) == 1 for r in grpo_results)
        assert api.finish_reason == served.finish_reason == streamed == expected
        assert [r.finish_reason for r in grpo_results] == [expected, expected]
