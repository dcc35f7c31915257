"""The OpenAI-compatible HTTP server: FastAPI routes over one continuous-batching Engine.

Each HTTP request becomes one engine Request per choice; the engine thread hands token events to
the request's asyncio queue (`call_soon_threadsafe`). Streams are Server-Sent Events in OpenAI's
chunk shape. A client that disconnects has its requests cancelled, which frees their cache rows
before the engine's next step.
"""

from __future__ import annotations

import asyncio
import os
import hmac
import json
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import torch

from nemotron.api import LoadedModel, release_freed_memory, load
from nemotron.chat.template import ChatInputError, ChatTemplateError, chat_template_for
from nemotron.chat.turn import ChatTurn
from nemotron.inference.engine import Engine, EngineStopped, QueueFull
from nemotron.inference.requests import Request, TokenEvent
from nemotron.serve.metrics import Metrics
from nemotron.serve.protocol import (structured_output, APIError, ChatRequest, Limits, TokenizeRequest, error_body, new_id, now,
                                     parse_chat_request, parse_completion_request, parse_detokenize_request,
                                     parse_tokenize_request, prompt_logprobs, sampling_params, text_chars, usage)
from nemotron.serve.responses import Responses

# a request body at least this large has its freed memory handed back to the OS once it is answered
LARGE_BODY_BYTES = 1 << 20


def max_prompt_chars(tokenizer, max_len: int) -> int:
    """The most characters of text that could fit in `max_len` tokens, checked before any rendering
    or tokenization. A token spells at most its longest vocabulary entry (byte-level BPE: one character
    per byte), doubled for what a normalizer may fold."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True) if tokenizer is not None else {}
    return 2 * max(map(len, vocab), default=64) * max_len


def _choice_params(params, i: int):
    """Choice i of a request: with a seed, each choice draws from seed + i (n > 1 gives n samples)."""
    return params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    limits: Limits | None = None
    default_template_kwargs: dict | None = None
    allow_special_tokens_in_content: bool = False  # message text may spell control tokens (transformers, vLLM)


class _Tracker:
    """Per-request timing for the latency histograms."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None

    def token(self, event: TokenEvent) -> None:
        t = time.perf_counter()
        if self.last is None:
            self.metrics.observe("time_to_first_token_seconds", t - self.arrival)
            self.metrics.inc("prompt_tokens_total", len(event.request.prompt_ids))
        else:
            self.metrics.observe("inter_token_latency_seconds", t - self.last)
        self.last = t
        if event.token_id >= 0:
            self.metrics.inc("generation_tokens_total")
        if event.finished:
            self.metrics.observe("e2e_request_latency_seconds", t - self.arrival)
            self.metrics.finished(event.request.finish_reason or "stop")


class Server:
    def __init__(self, loaded: LoadedModel, engine: Engine, config: ServerConfig) -> None:
        self.loaded, self.engine, self.config = loaded, engine, config
        self.tokenizer = loaded.tokenizer
        self.limits = config.limits or Limits()
        self.metrics = Metrics(config.model_name)
        self.created = now()
        # events from the engine thread are batched: one event-loop wake-up per engine step, not per token
        self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, engine.max_len)
        self._trim_scheduled = False
        self.responses = Responses(self)   # POST /v1/responses and the responses it remembers

    def _deliver(self, queue: asyncio.Queue, event: TokenEvent) -> None:  # engine thread
        with self._pending_lock:
            self._pending.append((queue, event))
            wake = len(self._pending) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self._pending_lock:
            events, self._pending = self._pending, []
        for queue, event in events:
            queue.put_nowait(event)

    # ---- plumbing ----

    def check_auth(self, request: HTTPRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(self, request: HTTPRequest) -> Any:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > 16 * limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > 16 * limit:
                break  # past this, the connection is dropped rather than drained
        request.state.body_bytes = size
        if size > limit:  # drained (up to a bound) so that the client reads the answer, not a reset
            raise APIError(413, f"request body of {size}+ bytes exceeds the {limit}-byte limit")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None

    async def handle(self, http: HTTPRequest, handler):
        """Run a route's handler; after a large body, its freed memory goes back to the OS."""
        try:
            return await handler(http)
        finally:
            if getattr(http.state, "body_bytes", 0) >= LARGE_BODY_BYTES:
                self._release_memory_soon()

    def _release_memory_soon(self) -> None:
        """malloc_trim in a worker thread (it walks the heap) a moment from now, once the request's
        objects (its body, the exception and response that referenced them) are gone; repeated calls
        before then share one trim. Without it, glibc keeps the freed pages of every large request."""
        if self._trim_scheduled:
            return
        self._trim_scheduled = True
        loop = asyncio.get_running_loop()

        def trim() -> None:
            self._trim_scheduled = False
            loop.run_in_executor(None, release_freed_memory)

        loop.call_later(0.2, trim)

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def submit(self, reqs: list[Request]) -> asyncio.Queue:
        """Queue the requests on the engine; their events arrive on the returned asyncio queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

        def deliver(event: TokenEvent) -> None:
            self._deliver(queue, event)

        submitted = []
        try:
            for r in reqs:
                self.engine.submit(r, deliver)
                submitted.append(r)
        except QueueFull as e:
            for r in submitted:
                self.engine.cancel(r)
            raise APIError(429, f"the server is at capacity ({e}); retry shortly", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            for r in submitted:
                self.engine.cancel(r)
            raise APIError(400, str(e)) from None
        return queue

    def cancel_unfinished(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.finish_reason is None:
                self.engine.cancel(r)

    async def events(self, reqs: list[Request], queue: asyncio.Queue, http: HTTPRequest | None = None):
        """Yield (choice index, event) until every request finished; cancels the rest on exit
        (a disconnect, an error). With `http`, a watcher cancels them when the client goes away."""
        index = {id(r): i for i, r in enumerate(reqs)}
        trackers = [_Tracker(self.metrics) for _ in reqs]
        left = len(reqs)
        watcher = asyncio.create_task(self._watch(http, reqs)) if http is not None else None
        try:
            while left:
                event = await queue.get()
                i = index[id(event.request)]
                trackers[i].token(event)
                if event.finished:
                    left -= 1
                    if event.request.finish_reason == "error":
                        raise APIError(500, f"generation failed: {event.request.error or 'internal error'}")
                yield i, event
        finally:
            if watcher is not None:
                watcher.cancel()
            self.cancel_unfinished(reqs)

    async def finish(self, reqs: list[Request], queue: asyncio.Queue, http: HTTPRequest) -> list[list[dict]]:
        """Wait until every request finished (non-streaming); returns each one's log-prob entries."""
        logprobs: list[list[dict]] = [[] for _ in reqs]
        async for i, event in self.events(reqs, queue, http):
            if event.logprob is not None:
                logprobs[i].append(event.logprob)
        return logprobs

    async def _watch(self, http: HTTPRequest, reqs: list[Request]) -> None:
        while True:
            if await http.is_disconnected():
                for r in reqs:
                    self.engine.cancel(r)
                return
            await asyncio.sleep(0.05)

    def logprob_entry(self, lp: dict) -> dict:
        def one(token_id: int, value: float) -> dict:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        entry = one(lp["token_id"], lp["logprob"])
        entry["top_logprobs"] = [one(t, v) for t, v in lp.get("top", [])]
        return entry

    # ---- chat completions ----

    def _chat_turn(self, cr: ChatRequest) -> ChatTurn:
        """The request's ChatTurn (prompt rendered, tool_choice and thinking budget applied) with one
        engine Request per choice."""
        tok = self.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer; use /v1/completions with token ids")
        try:
            turn = ChatTurn.prepare(tok, cr.messages, cr.tools, tool_choice=cr.tool_choice,
                                    enable_thinking=cr.enable_thinking, thinking_budget=cr.thinking_budget,
                                    template_kwargs=cr.template_kwargs,
                                    special_tokens_in_content=self.config.allow_special_tokens_in_content,
                                    answer=cr.answer, parallel_tool_calls=cr.parallel_tool_calls)
        except (ChatInputError, ChatTemplateError) as e:
            raise APIError(400, str(e), param="messages") from None
        except RecursionError:
            raise APIError(400, "the messages or tools are nested too deeply", param="messages") from None
        n_prompt = len(turn.prompt.ids)
        context_left = self.engine.max_len - n_prompt
        if context_left < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens; this model's context holds "
                                f"{self.engine.max_len}", param="messages", code="context_length_exceeded")
        params = sampling_params(cr.body, self.limits, context_left, chat=True, choices=cr.n,
                                 vocab_size=self.engine.vocab_size)
        try:
            turn.requests([_choice_params(params, i) for i in range(cr.n)])
        except ChatInputError as e:
            raise APIError(400, str(e), param="response_format") from None
        turn.reqs[0].prompt_logprobs = prompt_logprobs(cr.body, cr.stream)   # the choices share the prompt
        return turn

    async def prepare_chat_turn(self, cr: ChatRequest) -> ChatTurn:
        """The ChatTurn of a parsed chat request (chat completions and the Responses API)."""
        # refused before any rendering or tokenization. Every string counts, though a template may drop
        # some (old reasoning): text this far past the context is no prompt to serve either way
        chars = text_chars(cr.messages, cr.tools, cr.template_kwargs)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the messages and tools hold {chars} characters, more than this model's context of "
                                f"{self.engine.max_len} tokens can hold", param="messages",
                           code="context_length_exceeded")
        # rendering and tokenizing a long prompt takes a while: not on the event loop
        return await asyncio.to_thread(self._chat_turn, cr)

    async def chat(self, http: HTTPRequest):
        self.check_auth(http)
        body = await self.read_json(http)
        cr = parse_chat_request(body, self.limits, self.config.default_template_kwargs)
        self.check_model(body)
        turn = await self.prepare_chat_turn(cr)
        reqs = turn.reqs
        queue = self.submit(reqs)
        rid, created = new_id("chatcmpl"), now()
        n_prompt = len(turn.prompt.ids) * len(reqs)
        if cr.stream:
            return StreamingResponse(
                self.sse(self._chat_choices(turn, queue), reqs, rid, created, "chat.completion.chunk",
                         cr.include_usage, n_prompt),
                media_type="text/event-stream")
        async for _, event in self.events(reqs, queue, http):
            turn.feed(event)
        choices = []
        for i, (r, result) in enumerate(zip(reqs, turn.results())):
            logprobs = {"content": [self.logprob_entry(lp) for lp in result.logprobs]} if r.params.logprobs else None
            choices.append({"index": i, "message": result.message(), "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
        out = {"id": rid, "object": "chat.completion", "created": created, "model": self.config.model_name,
               "choices": choices,
               "usage": usage(n_prompt, sum(len(r.output_ids) for r in reqs), sum(r.cached_tokens for r in reqs))}
        if reqs[0].prompt_logprobs is not None:   # vLLM: one list for the (shared) prompt
            out["prompt_logprobs"] = self.prompt_logprobs_list(reqs[0], reqs[0].prompt_logprobs)
        return out

    async def sse(self, choices, reqs: list[Request], rid: str, created: int, obj: str, include_usage: bool,
                  n_prompt: int):
        """Server-Sent Events framing: one `data:` chunk per list of choices from `choices`, the usage
        chunk when asked for, `[DONE]`; an error mid-stream is sent as an error event."""
        model = self.config.model_name

        def chunk(choice_list: list[dict], usage_: dict | None = None) -> str:
            out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choice_list}
            if include_usage:
                out["usage"] = usage_
            return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

        try:
            async for choice_list in choices:
                yield chunk(choice_list)
            if include_usage:
                yield chunk([], usage(n_prompt, sum(len(r.output_ids) for r in reqs),
                                      sum(r.cached_tokens for r in reqs)))
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            self.cancel_unfinished(reqs)

    async def _chat_choices(self, turn: ChatTurn, queue: asyncio.Queue):
        reqs = turn.reqs
        for i in range(len(reqs)):
            yield [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        async for _, event in self.events(reqs, queue):
            for out in turn.feed(event):
                if out.kind == "delta":
                    lp = {"content": [self.logprob_entry(out.logprob)]} if out.logprob is not None else None
                    yield [{"index": out.index, "delta": out.delta.to_openai(), "logprobs": lp, "finish_reason": None}]
                else:
                    yield [{"index": out.index, "delta": {}, "logprobs": None,
                            "finish_reason": out.result.finish_reason}]

    # ---- completions ----

    async def completions(self, http: HTTPRequest):
        self.check_auth(http)
        body = await self.read_json(http)
        cr = parse_completion_request(body, self.limits, self.engine.vocab_size)
        self.check_model(body)
        if any(isinstance(p, str) for p in cr.prompts) and self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        chars = max(len(p) if isinstance(p, str) else 0 for p in cr.prompts)
        if chars > self.max_prompt_chars:   # refused before any tokenization
            raise APIError(400, f"the prompt holds {chars} characters, more than this model's context of "
                                f"{self.engine.max_len} tokens can hold", param="prompt",
                           code="context_length_exceeded")
        prompts = await asyncio.to_thread(self._completion_prompts, cr)
        longest = max(len(ids) for _, ids in prompts)
        if longest >= self.engine.max_len:
            raise APIError(400, f"the prompt is {longest} tokens; this model's context holds {self.engine.max_len}",
                           param="prompt", code="context_length_exceeded")
        params = sampling_params(body, self.limits, self.engine.max_len - longest, chat=False,
                                 choices=len(cr.prompts) * cr.n, vocab_size=self.engine.vocab_size)
        answer = structured_output(body, chat=False)
        grammar = answer.grammar() if answer is not None else None
        n_prompt_lp = prompt_logprobs(body, cr.stream)
        # echo with logprobs scores the prompt too (OpenAI's legacy API, vLLM)
        echo_lp = params.top_logprobs if cr.echo and params.logprobs else None
        scored = None if n_prompt_lp is None and echo_lp is None else max(n_prompt_lp or 0, echo_lp or 0)
        reqs, texts = [], []
        for text, ids in prompts:
            for j in range(cr.n):
                reqs.append(Request(list(ids), _choice_params(params, len(reqs)), prompt_logprobs=scored,
                                    grammar=grammar))
                texts.append(text if cr.echo else "")
        queue = self.submit(reqs)
        rid, created = new_id("cmpl"), now()
        n_prompt = sum(len(r.prompt_ids) for r in reqs)
        if cr.stream:
            return StreamingResponse(
                self.sse(self._completion_choices(reqs, texts, queue, echo_lp), reqs, rid, created, "text_completion",
                         cr.include_usage, n_prompt),
                media_type="text/event-stream")
        lps = await self.finish(reqs, queue, http)
        choices = []
        for i, r in enumerate(reqs):
            logprobs = None
            if r.params.logprobs:
                logprobs = self._completion_logprobs(lps[i], len(texts[i]))
                if echo_lp is not None:
                    logprobs = self._echo_logprobs(r, echo_lp, logprobs)
            choices.append({"index": i, "text": texts[i] + r.text, "finish_reason": r.finish_reason,
                            "logprobs": logprobs})
            if n_prompt_lp is not None:
                choices[-1]["prompt_logprobs"] = self.prompt_logprobs_list(r, n_prompt_lp)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.config.model_name,
                "choices": choices, "usage": usage(n_prompt, sum(len(r.output_ids) for r in reqs),
                                                   sum(r.cached_tokens for r in reqs))}

    def _completion_prompts(self, cr) -> list[tuple[str, list[int]]]:
        """(text, token ids) per prompt: strings tokenized, id lists decoded when echoed."""
        prompts = []
        for p in cr.prompts:
            if isinstance(p, str):
                prompts.append((p, self.tokenizer.encode(p)))
            else:
                prompts.append((self.tokenizer.decode(p) if self.tokenizer is not None and cr.echo else "", p))
        return prompts

    def _completion_logprobs(self, lps: list[dict], offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            entry = self.logprob_entry(lp)
            out["tokens"].append(entry["token"])
            out["token_logprobs"].append(entry["logprob"])
            out["top_logprobs"].append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
            out["text_offset"].append(offset)
            offset += len(entry["token"])
        return out

    def _token_texts(self, ids) -> dict[int, str]:
        """Each token's own text (as logprobs show it), by id; each distinct id decoded once."""
        if self.tokenizer is None:
            return {t: str(t) for t in set(ids)}
        return {t: self.tokenizer.decode([t]) for t in set(ids)}

    def _echo_logprobs(self, r: Request, top: int, generated: dict | None = None) -> dict:
        """The echoed prompt's logprobs in the legacy completions shape (the first token has none: no
        context precedes it), followed by `generated`'s lists."""
        entries = r.prompt_logprob_entries
        texts = self._token_texts(r.prompt_ids + [t for e in entries if e is not None for t, _ in e["top"][:top]])
        out = {"tokens": [texts[t] for t in r.prompt_ids],
               "token_logprobs": [None if e is None else e["logprob"] for e in entries],
               "top_logprobs": [None if e is None else {texts[t]: v for t, v in e["top"][:top]} for e in entries],
               "text_offset": []}
        offset = 0
        for text in out["tokens"]:
            out["text_offset"].append(offset)
            offset += len(text)
        for key, values in (generated or {}).items():
            out[key] = out[key] + values
        return out

    def prompt_logprobs_list(self, r: Request, top: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: None for the first token, then per prompt token
        {token id: {"logprob", "rank", "decoded_token"}} for the token itself and the `top` most likely."""
        entries = r.prompt_logprob_entries
        texts = self._token_texts([t for e in entries if e is not None
                                   for t in [e["token_id"], *(t for t, _ in e["top"][:top])]])
        out = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            entry = {str(e["token_id"]): {"logprob": e["logprob"], "rank": e["rank"],
                                          "decoded_token": texts[e["token_id"]]}}
            for rank, (t, v) in enumerate(e["top"][:top], 1):
                entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": texts[t]})
            out.append(entry)
        return out

    async def _completion_choices(self, reqs, texts, queue, echo_lp: int | None = None):
        # the echoed prompt leads each choice; with log-probs it waits for them (made by the prefill,
        # they are on the request by its first event)
        waiting = set(range(len(reqs))) if echo_lp is not None else set()
        for i, text in enumerate(texts):
            if text and i not in waiting:
                yield [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]
        async for i, event in self.events(reqs, queue):
            if i in waiting:
                waiting.discard(i)
                yield [{"index": i, "text": texts[i], "logprobs": self._echo_logprobs(reqs[i], echo_lp),
                        "finish_reason": None}]
            lp = self._completion_logprobs([event.logprob], 0) if event.logprob is not None else None
            if event.text or lp is not None or event.finished:
                yield [{"index": i, "text": event.text, "logprobs": lp,
                        "finish_reason": event.request.finish_reason if event.finished else None}]

    # ---- the rest ----

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "nemotron",
                "root": str(self.loaded.path) if self.loaded.path else self.config.model_name, "parent": None,
                "max_model_len": self.engine.max_len, "permission": []}

    def models(self, http: HTTPRequest) -> dict:
        self.check_auth(http)
        return {"object": "list", "data": [self._model_card()]}

    def model(self, http: HTTPRequest, model_id: str) -> dict:
        """GET /v1/models/{id} (the openai client's models.retrieve)."""
        self.check_auth(http)
        if model_id != self.config.model_name:
            shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
            raise APIError(404, f"the model {shown!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")
        return self._model_card()

    # ---- the tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info) ----

    def _tokenizer_or_400(self):
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return self.tokenizer

    def _tokenize_ids(self, tr: TokenizeRequest) -> list[int]:
        tok = self.tokenizer
        if tr.prompt is not None:
            return tok.encode(tr.prompt, add_special_tokens=tr.add_special_tokens)
        cr = tr.chat
        try:   # the ids /v1/chat/completions would prefill for this conversation
            turn = ChatTurn.prepare(tok, cr.messages, cr.tools, tool_choice=cr.tool_choice,
                                    enable_thinking=cr.enable_thinking, template_kwargs=cr.template_kwargs,
                                    special_tokens_in_content=self.config.allow_special_tokens_in_content)
        except (ChatInputError, ChatTemplateError) as e:
            raise APIError(400, str(e), param="messages") from None
        except RecursionError:
            raise APIError(400, "the messages or tools are nested too deeply", param="messages") from None
        return turn.prompt.ids

    async def tokenize(self, http: HTTPRequest) -> dict:
        self.check_auth(http)
        body = await self.read_json(http)
        tr = parse_tokenize_request(body, self.limits, self.config.default_template_kwargs)
        self.check_model(body)
        tok = self._tokenizer_or_400()
        ids = await asyncio.to_thread(self._tokenize_ids, tr)   # a long text takes a while: not on the event loop
        strs = [tok.backend.id_to_token(t) for t in ids] if tr.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.max_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, http: HTTPRequest) -> dict:
        self.check_auth(http)
        body = await self.read_json(http)
        ids = parse_detokenize_request(body, self.engine.vocab_size)
        self.check_model(body)
        tok = self._tokenizer_or_400()
        return {"prompt": await asyncio.to_thread(tok.decode, ids)}

    def tokenizer_info(self, http: HTTPRequest) -> dict:
        """vLLM's shape: the tokenizer's class and configuration (lm-eval's remote tokenizer reads the
        special tokens and the chat template from it)."""
        self.check_auth(http)
        tok = self._tokenizer_or_400()
        # the configuration's plain entries (the added-token table is the tokenizer's, not needed here)
        info = {k: v for k, v in tok.config.items() if k != "added_tokens_decoder"}
        try:
            template = chat_template_for(tok)
        except ChatTemplateError:
            template = None
        info.update(tokenizer_class=tok.config.get("tokenizer_class") or "PreTrainedTokenizerFast",
                    model_max_length=self.engine.max_len, chat_template=template,
                    **{k: getattr(tok, k, None) or _special_token(tok.config.get(k))
                       for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
        return info

    def render_metrics(self) -> str:
        e = self.engine
        gauges = {"num_requests_running": e.num_running, "num_requests_waiting": e.num_waiting}
        counters = {}
        if e.prefix_cache is not None:
            gauges["prefix_cache_bytes"] = e.prefix_cache.bytes
            counters["prefix_cache_queries_total"] = e.prefix_cache.queries
            counters["prefix_cache_hits_total"] = e.prefix_cache.hits
        if e.speculative_tokens:
            counters["spec_decode_num_drafts_total"] = e.spec_stats.rounds
            counters["spec_decode_num_draft_tokens_total"] = e.spec_stats.drafted
            counters["spec_decode_num_accepted_tokens_total"] = e.spec_stats.accepted
        return self.metrics.render(gauges, counters)


def _special_token(value: Any) -> str | None:
    """A tokenizer_config special token: a string, or {"content": string} in older files."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _handler(server: Server, method):
    async def route(request: HTTPRequest):
        return await server.handle(request, method)
    return route


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="nemotron", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await server.handle(request, server.chat)

    @app.post("/v1/responses")
    async def responses_create(request: HTTPRequest):
        return await server.handle(request, server.responses.create)

    @app.get("/v1/responses/{response_id}")
    async def responses_retrieve(request: HTTPRequest, response_id: str):
        return server.responses.retrieve(request, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def responses_delete(request: HTTPRequest, response_id: str):
        return server.responses.delete(request, response_id)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await server.handle(request, server.completions)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        return server.models(request)

    @app.get("/v1/models/{model_id:path}")   # served names may hold a slash ("nvidia/...")
    async def model(request: HTTPRequest, model_id: str):
        return server.model(request, model_id)

    for prefix in ("", "/v1"):   # vLLM serves these at the root; some clients look under /v1
        app.add_api_route(prefix + "/tokenize", _handler(server, server.tokenize), methods=["POST"])
        app.add_api_route(prefix + "/detokenize", _handler(server, server.detokenize), methods=["POST"])

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: HTTPRequest):
        return server.tokenizer_info(request)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse(error_body("the engine has stopped", "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.render_metrics(), media_type="text/plain; version=0.0.4")

    return app


# Weights at least this large are read from memory at every decode step (they are past any CPU cache)
STREAMED_WEIGHT_BYTES = 128 << 20


def decode_threads(model, cores: int) -> int:
    """The default count of torch threads for decode steps. A model whose weights stream from memory
    takes long steps and yields few tokens per second, so the HTTP side needs little CPU: decode takes
    every core. A smaller model's fast steps feed the HTTP side many events per second: it keeps a core
    (on 2 cores, 8 streams of the embedded model ran at 1531 tokens/s with one decode thread and 484
    with two, while the 146M model ran 13-25% faster at 1, 8 and 32 streams with two: BENCHMARKS.md)."""
    # quantized layers keep their packed weights as buffers
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return cores if weight_bytes >= STREAMED_WEIGHT_BYTES else max(1, cores - 1)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_batch: int = 32, max_model_len: int = 4096,
          prefill_chunk: int = 256, max_waiting: int = 256, prefix_cache_mb: int = 256,
          max_tokens: int = 4096, default_template_kwargs: dict | None = None, dtype: str | None = None,
          device: str = "cpu", threads: int | None = None, speculative_tokens: int = 0,
          cache_options=None, prefill_threads: int | None = None,
          allow_special_tokens_in_content: bool = False, prefix_block: int | None = None,
          compile: bool | None = None) -> None:
    """Load `model` and serve it until interrupted. threads: torch's CPU threads for decode steps
    (default: `decode_threads`). prefill_threads: for prefill chunks, which stream nothing (default:
    every core).
    cache_options: a CacheOptions (FP8 KV cache, SSM state dtype and rounding).
    allow_special_tokens_in_content: parse control-token spellings inside messages and tools (by
    default they are ordinary text).
    prefix_block: the prefix cache's block, a divisor of prefill_chunk (default: the model's Mamba scan
    chunk; see Engine).
    compile: the decode step compiled before serving (None: where `use_compiled_decode` allows a long
    run; False: never)."""
    import uvicorn   # imported when serving: the server's other users (tests, benchmarks) build the app only

    cores = os.cpu_count() or 2
    loaded = load(model, dtype=dtype, device=device, progress=True, cache=cache_options)
    threads = threads or decode_threads(loaded.model, cores)
    torch.set_num_threads(threads)
    max_len = min(max_model_len, getattr(loaded.config, "max_position_embeddings", None) or max_model_len)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.stop_ids, max_batch=max_batch, max_len=max_len,
                    prefill_chunk=prefill_chunk, max_waiting=max_waiting, prefix_cache_bytes=prefix_cache_mb << 20,
                    speculative_tokens=speculative_tokens, threads=threads, cache_options=loaded.cache_options,
                    prefill_threads=prefill_threads or max(threads, cores), prefix_block=prefix_block,
                    compile=compile)
    if compile is not False:
        engine.warm_up()   # each compile is logged with its seconds (the CLI shows them on stderr)
    engine.start()
    # a directory is served under its name; the embedded model under the name it was asked by ("tiny")
    name = served_model_name or (loaded.path.name if Path(str(model)).exists() else str(model))
    server = Server(loaded, engine, ServerConfig(name, api_key, Limits(max_tokens=max_tokens), default_template_kwargs,
                                                 allow_special_tokens_in_content))
    print(f"serving {name} on http://{host}:{port}/v1 (max batch {max_batch}, context {max_len}, "
          f"{threads} decode threads)", flush=True)
    # the engine thread and the event loop share the GIL: hand it over sooner than the 5 ms default so
    # neither waits long for the other (token streams stay smooth)
    sys.setswitchinterval(0.0005)
    try:
        uvicorn.run(build_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        engine.shutdown()
