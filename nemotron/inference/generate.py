"""Transitional: `Generator` runs a list of requests to completion on an engine sized for them.
New code uses `Engine.for_requests(...).run(requests)` and the modules named below directly."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from nemotron.inference.engine import Engine
from nemotron.inference.requests import (PARSER_TAGS, Request, ThinkingBudget, TokenEvent, accept_token,  # noqa: F401
                                         check_prompt, start_request, token_logprob)
from nemotron.inference.speculative import SpecStats, check_speculation, speculation_ok  # noqa: F401
from nemotron.inference.steps import decode_step, greedy_generate, prefill  # noqa: F401
from nemotron.layers.cache import CacheOptions


class Generator:
    def __init__(self, model: nn.Module, tokenizer=None, stop_ids: set[int] | None = None,
                 prefill_chunk: int = 512, speculative_tokens: int = 0, compile: bool = False,
                 cache_options: CacheOptions | None = None) -> None:
        check_speculation(model, speculative_tokens)
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids or ())
        self.prefill_chunk, self.k, self.compile, self.cache_options = prefill_chunk, speculative_tokens, compile, cache_options
        self.stats = SpecStats()

    def stream(self, requests: list[Request]) -> Iterator:
        engine = Engine.for_requests(self.model, requests, self.tokenizer, self.stop_ids, self.k, self.compile,
                                     self.cache_options, self.prefill_chunk)
        engine.spec_stats = self.stats
        yield from engine.run(requests)
