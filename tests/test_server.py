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

from scripted import ASK, CALL, HI, RESULT, TOOLS, make_scripted_checkpoint  # noqa: E402
from serving import running_server  # noqa: E402


def http(base: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, dict, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))


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
    assert len(choice.logprobs.tokens) == 5 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
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


def _hostile_bodies(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n (endpoint, raw body) pairs: valid chat and completion requests with one to three fields
    replaced by values of the wrong type, shape or range, messages and tools mangled, and raw
    payloads that are not a JSON object at all. Seeded: the same bodies every run."""
    import random

    rng = random.Random(seed)
    odd_values = [None, True, False, 0, -1, 1.5, -1e308, 1e308, 2 ** 63, -(2 ** 63) - 1, "", "x" * 3000, "\u0000",
                  "\ud7ff\ufffe", [], [None], [[[]]], {}, {"a": {"b": {"c": []}}}, [1, "two", None], "NaN", -0.0]
    chat_fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                   "min_p", "n", "stop", "stream", "stream_options", "seed", "logprobs", "top_logprobs", "tools",
                   "tool_choice", "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format",
                   "chat_template_kwargs", "thinking_token_budget", "ignore_eos", "user", "logit_bias"]
    completion_fields = ["model", "prompt", "max_tokens", "temperature", "echo", "logprobs", "stop", "stream", "n",
                         "suffix", "best_of", "seed"]
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
    ]
    raw = [b"", b"null", b"0", b'"text"', b"[]", b"{", b"}", b'{"messages": [', b"\xff\xfe\x00", b"{" * 5000 + b"}" * 5000,
           b'{"messages": NaN}', b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
           b'{"a": 1, "a": 2}', b'{"messages": "' + b"\\u" * 100 + b'"}']
    bodies: list[tuple[str, bytes]] = [("/v1/chat/completions", r) for r in raw] + [("/v1/completions", r) for r in raw]
    while len(bodies) < n:
        chat = rng.random() < 0.7
        body = ({"messages": HI, "max_tokens": 4, "temperature": 0} if chat else {"prompt": "hi", "max_tokens": 4})
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if chat and roll < 0.15:
                body["messages"] = rng.choice(odd_messages)
            elif chat and roll < 0.25:
                body["tools"] = rng.choice(odd_tools)
                if rng.random() < 0.5:
                    body["tool_choice"] = rng.choice(["required", "auto", {"type": "function"}, {"function": None}])
            else:
                body[rng.choice(chat_fields if chat else completion_fields)] = rng.choice(odd_values)
        if body.get("stream") is True:
            body["stream"] = False   # a valid streamed body would answer 200 with SSE: covered elsewhere
        bodies.append(("/v1/chat/completions" if chat else "/v1/completions", json.dumps(body).encode()))
    return bodies


def test_fuzzed_hostile_bodies_never_get_a_5xx(scripted):
    """>= 200 malformed or hostile bodies: every answer is a 2xx or a 4xx in OpenAI's error shape,
    never a 5xx, and the server still answers /health and a normal request afterwards."""
    bodies = _hostile_bodies(240)
    assert len(bodies) >= 200
    statuses = []
    with running_server(scripted, "--max-model-len", "2048", "--max-tokens", "512") as base:
        for path, body in bodies:
            got, _, answer = http(base, path, body)
            assert got < 500, (path, body[:200], got, answer)
            if got >= 400:
                assert isinstance(answer, dict) and set(answer["error"]) == {"message", "type", "param", "code"}, \
                    (path, body[:200], got, answer)
            statuses.append(got)
        assert http(base, "/health")[0] == 200
        ok, _, r = http(base, "/v1/chat/completions", {"messages": HI, "temperature": 0})
        assert ok == 200 and r["choices"][0]["message"]["content"] == "Hi!"
    assert statuses.count(400) + statuses.count(422) > len(bodies) // 2   # mostly refused, not ignored


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
