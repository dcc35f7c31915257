"""The engine: the one batch loop. Every caller generates through it: the Python API (`generate`,
`chat`, `chat_batch`), the CLI, GRPO's sampling and the HTTP server.

The cache has `max_batch` rows. Rows 0..n-1 hold the running requests, which decode together, one
token each per step; the rows after them hold the prompts being prefilled, one chunk per step, so a
long prompt never stalls the running streams for more than a chunk. Up to `prefill_batch` waiting
prompts of one length are prefilled together in one forward. New requests wait in a bounded queue
and join between steps; a finished or cancelled request leaves at once (the last running row moves
into its slot, keeping the running rows packed for a zero-copy decode view).

Prefill chunks end on multiples of `prefill_chunk` (absolute positions). The optional prefix cache
saves finer blocks (`prefix_block`, which divides the chunk): the Mamba states at the block ends
inside a chunk are captured by its forward, and a prompt whose cached blocks end inside a chunk
resumes there and runs to the chunk's end (see prefix_cache.py for why that is exact).

`Engine.step()` does one round and returns its TokenEvents. `Engine.run(requests)` steps on the
calling thread until the given requests are done (offline generation); `Engine.start()` runs rounds
on a background thread and hands each event to its request's `on_event` callback (the HTTP server's
bridge into asyncio).

One request never hurts another: a failure while admitting, prefilling or finishing one request ends
the requests it touched alone (finish_reason "error", `Request.error` says why, their final event is
sent); a failure of a batched decode forward ends the requests of that batch. The engine goes on
serving either way; `Engine.error` is set only when its thread died. `run` raises a failed
request's exception instead.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nemotron.errors import NemotronWarning
from nemotron.inference.constraint import Constraint, allowed_tokens, grammar_compiler
from nemotron.inference.prefix_cache import PrefixCache, block_keys, choose_block
from nemotron.inference.requests import (Request, TokenEvent, accept_token, check_prompt, score_tokens, start_request,
                                         token_logprob)
from nemotron.inference.sampling import Sampler
from nemotron.inference.speculative import (OwedPairs, SpecStats, check_speculation, draft_and_verify, extend_owed,
                                            speculation_ok)
from nemotron.inference.steps import compile_failed, compiled_decode_step, note_eager_decode, use_compiled_decode
from nemotron.layers.cache import CacheOptions


log = logging.getLogger(__name__)

# prompt log-probs: at most this many fp32 logits at once (256 MiB)
PROMPT_LOGITS_ELEMENTS = 1 << 26
# the compiled decode step attends over the cache's first positions, a multiple of this many
STATIC_WINDOW = 128


class QueueFull(Exception):
    """The waiting queue is at its limit (the server answers 429)."""


class EngineStopped(Exception):
    """The engine's thread has died (`Engine.error`): nothing can be served any more."""


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)   # finish reason -> count
    steps: int = 0


class Engine:
    def __init__(self, model: nn.Module, tokenizer=None, stop_ids: set[int] | None = None,
                 max_batch: int = 16, max_len: int = 4096, prefill_chunk: int = 256,
                 max_waiting: int = 256, prefix_cache_bytes: int = 0, speculative_tokens: int = 0,
                 threads: int | None = None, prefill_threads: int | None = None,
                 cache_options: CacheOptions | None = None, prefill_batch: int = 1, compile: bool | None = None,
                 prefix_block: int | None = None) -> None:
        self.model = model
        # torch's CPU threads for decode steps and for prefill chunks. OpenMP keeps the setting per OS
        # thread, so the engine thread applies them itself (by default, the creator's setting)
        self.threads = threads or torch.get_num_threads()
        self.prefill_threads = prefill_threads or self.threads
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids or ())
        self._stop_index = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = max(1, prefill_batch)
        self.max_waiting = max_waiting
        self.vocab_size = model.lm_head.weight.shape[0]
        self.device = model.lm_head.weight.device
        check_speculation(model, speculative_tokens)
        self.speculative_tokens = speculative_tokens
        if speculative_tokens and prefix_cache_bytes:
            # a cached prefix has no target hidden states for the MTP block to start from
            warnings.warn("MTP speculation is on, so the prefix cache is off (they cannot be combined yet)",
                          NemotronWarning, stacklevel=2)
            prefix_cache_bytes = 0
        # speculation verifies k+1 tokens per row past the request's own budget; one position more is
        # never read, so the compiled step's KV window is never the whole buffer (`_compiled_decode`)
        self.cache = model.new_cache(max_batch, max_len + speculative_tokens + 2, cache_options)
        # the prefix cache's block: a divisor of the prefill chunk (default: the Mamba scan chunk)
        self.prefix_block = choose_block(model, self.cache, prefill_chunk, prefix_block)
        self.prefix_cache = PrefixCache(self.prefix_block, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # torch.compile of the one-token decode step (a KV window under a mask, positions as a tensor,
        # symbolic shapes): the first step compiles (seconds), later ones run fused kernels.
        # compile None: by the default rule of `use_compiled_decode`, checked again whenever a batch
        # starts, so one request runs on one path
        self.compile = compile
        self.compiled_step = compiled_decode_step(model) if use_compiled_decode(model, compile) else None
        self.spec_stats = SpecStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.sampler: Sampler | None = None
        self.tokens: torch.Tensor | None = None       # [n] the token each running row feeds next
        self.owed: list[OwedPairs] = []               # per running row, when speculating
        self.prefilling: list[Request] = []           # the prompts being prefilled, in the rows after the running ones
        self._prefill_hidden: list[torch.Tensor] = []  # their final hidden states so far, when speculating
        self._prefill_keys: list[bytes] = []
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    @classmethod
    def for_requests(cls, model: nn.Module, requests: list[Request], tokenizer=None, stop_ids: set[int] | None = None,
                     speculative_tokens: int = 0, compile: bool | None = None, cache_options: CacheOptions | None = None,
                     prefill_chunk: int = 512) -> "Engine":
        """An engine sized to run `requests` at once: a row for each, prompts of one length
        prefilled together."""
        longest = max((len(r.prompt_ids) + r.params.max_new_tokens for r in requests), default=1)
        n = max(1, len(requests))
        return cls(model, tokenizer, stop_ids, max_batch=n, max_len=longest, prefill_chunk=prefill_chunk,
                   max_waiting=n, speculative_tokens=speculative_tokens, cache_options=cache_options,
                   prefill_batch=n, compile=compile)

    # ---- the client side (any thread) ----

    def submit(self, req: Request, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        """Queue a request. Raises ValueError for a bad one, QueueFull when the queue is at its limit,
        EngineStopped when the engine's thread has died."""
        if self.error is not None:
            raise EngineStopped(f"the engine has stopped: {self.error!r}")
        check_prompt(req, self.vocab_size)
        if req.grammar is not None and req.constraint is None:
            req.constraint = self._compile(req)
        need = len(req.prompt_ids) + req.params.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_new_tokens}) "
                             f"exceeds the context length of {self.max_len}")
        req.on_event = on_event
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(req)
            self._wake.notify()

    def _compile(self, req: Request) -> Constraint:
        """The request's grammar as a Constraint, compiled on the submitting thread (a bad grammar is
        the caller's ValueError, and compiling never holds up the batch)."""
        if self.tokenizer is None:
            raise ValueError("constrained decoding needs the model's tokenizer")
        compiler = grammar_compiler(self.tokenizer, self.vocab_size, self.stop_ids)
        return Constraint(compiler.matcher(req.grammar.lark), self.vocab_size, req.grammar.starts_after,
                          frozenset(self.stop_ids))

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away): it leaves before the next step, its row freed."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        """Nothing is waiting, prefilling or running."""
        return not (self.waiting or self.running or self.prefilling)

    @property
    def alive(self) -> bool:
        """It can serve: no error, and its background thread (if started) has not ended. An engine
        stepped on the caller's thread (`run`, `step`) is alive until a step fails fatally."""
        return self.error is None and (self._thread is None or self._thread.is_alive())

    def run(self, requests: list[Request]) -> Iterator[TokenEvent]:
        """Generate for `requests` on the calling thread until each is finished; each event's `index`
        is its request's position in `requests`. Prompts are checked before anything runs; a request
        that fails raises its exception."""
        for r in requests:
            check_prompt(r, self.vocab_size)
        index = {id(r): i for i, r in enumerate(requests)}
        for r in requests:
            if r.params.max_new_tokens == 0:
                r.finish_reason = "length"
            else:
                self.submit(r)
        with torch.inference_mode():
            while not self.idle:
                for event in self.step():
                    if event.request.failure is not None:
                        raise event.request.failure
                    event.index = index[id(event.request)]
                    yield event

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="nemotron-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stop and self.idle:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                events = self.step()
            except BaseException as exc:  # step() contains every Exception itself: the engine is broken
                log.critical("the engine has stopped", exc_info=exc)
                self.error = exc
                self._fail_all(exc)
                return
            self._deliver(events)

    @staticmethod
    def _deliver(events: list[TokenEvent]) -> None:
        for event in events:
            r = event.request
            if r.on_event is None:
                continue
            try:
                r.on_event(event)
            except Exception:  # its consumer is broken: drop the request, keep serving the others
                log.exception("a request's event callback failed; the request is dropped")
                r.cancelled = True

    def _fail_all(self, exc: BaseException) -> None:
        """The thread is dying: end every request (best effort) rather than hang its client."""
        with self._wake:
            reqs = list(self.waiting) + self.running + self.prefilling
            self.waiting.clear()
        self.running, self.prefilling, self.sampler, self.tokens, self.owed = [], [], None, None, []
        events = []
        for r in reqs:
            r.finish_reason, r.error, r.failure = "error", f"the engine has stopped: {exc!r}", exc
            events.append(TokenEvent(r, -1, -1, "", True))
        self._deliver(events)

    def _failed(self, req: Request, exc: Exception, stage: str) -> TokenEvent:
        """End `req` alone with finish_reason "error"; returns its final event."""
        log.error("a request failed during %s: %r", stage, exc, exc_info=exc)
        req.finish_reason, req.error = "error", f"{stage} failed: {type(exc).__name__}: {exc}"[:500]
        req.failure = exc
        self._count_finished(req)
        return TokenEvent(req, -1, -1, "", True)

    def _count_finished(self, req: Request) -> None:
        self.stats.finished[req.finish_reason] = self.stats.finished.get(req.finish_reason, 0) + 1

    # ---- one round ----

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Drop cancelled requests, decode one token for every running request, then prefill one chunk
        of the next prompts (admitting them from the queue if needed)."""
        self.stats.steps += 1
        events: list[TokenEvent] = []
        try:
            self._drop_cancelled()
            if self.running:
                events += self._decode()
            if not self.prefilling:
                events += self._admit()
            if self.prefilling:
                events += self._with_threads(self.prefill_threads, self._prefill_chunk)
        except Exception as exc:
            events += self._reset(exc)
        return events

    def _reset(self, exc: Exception) -> list[TokenEvent]:
        """A failure outside the per-request guards below (the engine's own bookkeeping): its state
        cannot be trusted, so the admitted requests fail and every cache row starts empty. The queue
        is kept and served next. If even this fails, the exception ends the engine thread."""
        log.error("an engine step failed; the running requests are dropped", exc_info=exc)
        reqs = self.running + self.prefilling
        self.running, self.prefilling, self.sampler, self.tokens, self.owed = [], [], None, None, []
        self._prefill_hidden, self._prefill_keys = [], []
        for row in range(self.max_batch):
            self.cache.reset_row(row)
        return [self._failed(r, exc, "an engine step") for r in reqs]

    def _with_threads(self, n: int, fn: Callable[[], list[TokenEvent]]) -> list[TokenEvent]:
        if n == self.threads:
            return fn()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(self.threads)

    def _drop_cancelled(self) -> None:
        with self._lock:
            if any(r.cancelled for r in self.waiting):
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        if any(r.cancelled for r in self.prefilling):
            keep = [i for i, r in enumerate(self.prefilling) if not r.cancelled]
            first = len(self.running)
            for new, old in enumerate(keep):
                if new != old:
                    self.cache.move_row(first + old, first + new)
            self.prefilling = [self.prefilling[i] for i in keep]
            self._prefill_hidden = [h[keep] for h in self._prefill_hidden] if keep else []
        gone = [row for row, r in enumerate(self.running) if r.cancelled]
        if gone:
            self._remove_rows(gone)

    def _admit(self) -> list[TokenEvent]:
        """Take the next waiting prompt, and up to `prefill_batch` - 1 more of the same length (not
        with the prefix cache, whose hits differ per prompt), into the rows after the running ones."""
        free = min(self.max_batch - len(self.running), self.prefill_batch if self.prefix_cache is None else 1)
        if free <= 0:
            return []
        with self._lock:
            if not self.waiting:
                return []
            group = [self.waiting.popleft()]
            if free > 1:
                length, skipped = len(group[0].prompt_ids), deque()
                while self.waiting and len(group) < free:
                    r = self.waiting.popleft()
                    (group if len(r.prompt_ids) == length else skipped).append(r)
                self.waiting = skipped + self.waiting
        first = len(self.running)
        self._prefill_keys, self._prefill_hidden = [], []
        events, admitted = [], []
        for i, req in enumerate(group):
            row = first + len(admitted)
            try:
                self.cache.reset_row(row)
                req.prompt_logprob_entries = [] if req.prompt_logprobs is None else [None]  # token 0: no context
                if self.prefix_cache is not None:
                    # prompt log-probs need every position's logits, which restored blocks would skip
                    keys = self.prefix_cache.lookup(req.prompt_ids) if req.prompt_logprobs is None else []
                    req.cached_tokens = self.prefix_cache.restore(keys, self.cache, row)
                    self._prefill_keys = block_keys(req.prompt_ids, self.prefix_block)
            except Exception as exc:  # the row is reset again by the next admission
                self._prefill_keys = []
                events.append(self._failed(req, exc, "admission"))
                continue
            self.stats.prompt_tokens += len(req.prompt_ids)
            admitted.append(req)
        self.prefilling = admitted
        return events

    def _prefill_chunk(self) -> list[TokenEvent]:
        """One chunk of the prefilling prompts; after their last chunk, they join the running batch
        with their first tokens. A failure ends those requests alone: the forward only touched their
        own rows, which the next admission resets."""
        reqs, stage = self.prefilling, "prefill"
        try:
            logits = self._prefill_forward(reqs)
            if logits is None:
                return []
            stage = "joining the batch"
            sampler = self._join(reqs)
        except Exception as exc:
            self.prefilling, self._prefill_hidden = [], []
            return [self._failed(r, exc, stage) for r in reqs]
        first = len(self.running) - len(reqs)
        return self._emit(logits, sampler, list(range(first, first + len(reqs))))

    def _prefill_forward(self, reqs: list[Request]) -> torch.Tensor | None:
        """Run the next chunk; the last position's logits once the prompts are done, else None."""
        first = len(self.running)
        view = self.cache.rows(first, first + len(reqs))
        pos = int(view.seq_lens[0])
        length = len(reqs[0].prompt_ids)
        end = min(length, (pos // self.prefill_chunk + 1) * self.prefill_chunk)
        ids = torch.tensor([r.prompt_ids[pos:end] for r in reqs], device=self.device)
        # the Mamba states at the prefix-cache blocks ending in this chunk
        capture = None if self.prefix_cache is None else self.prefix_cache.capture(pos, end)
        scored = [i for i, r in enumerate(reqs) if r.prompt_logprobs is not None]
        if self.speculative_tokens:  # the MTP block drafts from the target's hidden states: keep them
            h = self.model.hidden_states(ids, view, capture=capture)
            self._prefill_hidden.append(h)
            logits = self.model.lm_head(h[:, -1]).float()
        elif scored:  # every position's hidden state too; the last logits are computed as without
            logits, h = self.model(ids, view, logits_to_keep=1, return_hidden=True, capture=capture)
            logits = logits[:, -1]
        else:
            logits = self.model(ids, view, logits_to_keep=1, capture=capture)[:, -1]
        if scored:
            self._score_prompts([reqs[i] for i in scored], h[scored], pos, end)
        if capture is not None:
            self.prefix_cache.save(self._prefill_keys, view, 0, pos, capture)
        return None if end < length else logits

    def _score_prompts(self, reqs: list[Request], hidden: torch.Tensor, pos: int, end: int) -> None:
        """Prompt log-probs of the tokens this chunk (positions pos..end-1, final hidden states
        `hidden`) predicts: position t scores token t+1, so the chunk's last position scores the next
        chunk's first token, and the prompt's last position (the first generated token's) none. The
        logits are made a slice of positions at a time, to bound their memory."""
        n = min(end + 1, len(reqs[0].prompt_ids)) - pos - 1
        targets = torch.tensor([r.prompt_ids[pos + 1:pos + 1 + n] for r in reqs], device=self.device)
        step = max(1, PROMPT_LOGITS_ELEMENTS // (len(reqs) * self.vocab_size))
        for lo in range(0, n, step):
            logits = self.model.lm_head(hidden[:, lo:min(n, lo + step)]).float()
            rows = score_tokens(logits, targets[:, lo:lo + step], [r.prompt_logprobs for r in reqs])
            for r, entries in zip(reqs, rows):
                r.prompt_logprob_entries.extend(entries)

    def _join(self, reqs: list[Request]) -> Sampler:
        """The prompts are done: `reqs` join the running batch (their first tokens come from the last
        chunk's logits); returns their own sampler. Everything that can fail is built before the
        engine's state changes, so a failure leaves the batch as it was."""
        for req in reqs:
            start_request(req, self.tokenizer)
        sampler = Sampler([r.params for r in reqs], self.vocab_size, self.device, [r.prompt_ids for r in reqs])
        if self.sampler is None and self.compiled_step is None and use_compiled_decode(self.model, self.compile):
            self.compiled_step = compiled_decode_step(self.model)
        elif self.sampler is None and self.compiled_step is not None:
            self.compiled_step.prepare()
        batch = sampler if self.sampler is None else Sampler.concat([self.sampler, sampler])
        new = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        tokens = new if self.tokens is None else torch.cat([self.tokens, new])
        owed = []
        if self.speculative_tokens:
            hidden = torch.cat(self._prefill_hidden, 1)
            owed = [OwedPairs.after_prompt(hidden[i:i + 1], r.prompt_ids) for i, r in enumerate(reqs)]
        self.prefilling, self._prefill_hidden = [], []
        self.running.extend(reqs)
        self.sampler, self.tokens = batch, tokens
        self.owed.extend(owed)
        return sampler

    def _decode(self) -> list[TokenEvent]:
        n = len(self.running)
        view = self.cache.rows(0, n)
        if self.speculative_tokens and all(speculation_ok(r) for r in self.running):
            return self._speculative_decode(view)
        try:
            if self.speculative_tokens:
                h = self.model.hidden_states(self.tokens[:, None], view)
                extend_owed(self.owed, h, self.tokens)
                logits = self.model.lm_head(h[:, -1]).float()
            else:
                logits = self._compiled_decode(view, self.tokens[:, None]) if self.compiled_step is not None else None
                if logits is None:
                    start = time.perf_counter()
                    logits = self.model(self.tokens[:, None], view)[:, -1]
                    note_eager_decode(self.model, time.perf_counter() - start)
        except Exception as exc:
            return self._fail_batch(exc)
        return self._emit(logits, self.sampler, list(range(n)))

    def warm_up(self) -> dict[str, float]:
        """For a long-lived engine (a server), before it starts: compile the decode step now for batch
        1 and for larger batches, where `use_compiled_decode` allows it for a long run, so no request
        waits for a compile. Runs on the cache's first rows, which are emptied after. Returns the
        seconds each compile took (empty when the step stays eager)."""
        if self._thread is not None or self.running or self.prefilling:
            raise RuntimeError("warm_up runs before the engine starts")
        if not use_compiled_decode(self.model, self.compile, long_run=True):
            return {}
        self.compiled_step = compiled_decode_step(self.model)
        rows = 2 if self.max_batch > 1 else 1
        try:
            with torch.inference_mode():
                for n in range(1, rows + 1):
                    ids = torch.zeros(n, 1, dtype=torch.long, device=self.device)
                    if self._compiled_decode(self.cache.rows(0, n), ids) is None:
                        break
        finally:
            for row in range(rows):
                self.cache.reset_row(row)
        return dict(self.compiled_step.compile_seconds) if self.compiled_step is not None else {}

    def _compiled_decode(self, view, ids: torch.Tensor) -> torch.Tensor | None:
        """The compiled step's logits for ids [B, 1] on the rows of `view` (advanced by one); None when
        compiling it failed under the default rule (then the model decodes eagerly from now on, and a
        compile that was asked for raises)."""
        # attention reads the positions up to the longest row's, rounded up to a multiple of
        # STATIC_WINDOW, not the cache's whole capacity. The window is a symbolic size, and always short
        # of the capacity: a view of the whole buffer (contiguous) would take a graph of its own
        window = min(self.cache.capacity - 1, -(-(int(view.seq_lens.max()) + 1) // STATIC_WINDOW) * STATIC_WINDOW)
        try:
            logits = self.compiled_step(ids, view.first(window), view.seq_lens.to(self.device), source=self.cache)
        except Exception as exc:
            # a failed compile raises before the graph runs, so the cache is as it was
            if self.compile is not None or not self.compiled_step.compiles(ids):
                raise
            compile_failed(self.model, exc)
            self.compiled_step = None
            return None
        view.seq_lens += 1
        return logits

    def _fail_batch(self, exc: Exception) -> list[TokenEvent]:
        """A batched decode forward failed. No single request can be blamed, and the batch's cache
        rows may be half-updated (some layers stepped, others not), so every request of the batch
        fails and its row is emptied. The prompts being prefilled (their rows were not part of the
        forward) and the queue go on, and the engine keeps serving."""
        events = [self._failed(r, exc, "decode") for r in self.running]
        n, prefilling = len(self.running), len(self.prefilling)
        self._remove_rows(list(range(n)))   # the prefilling rows move down to row 0
        for row in range(prefilling, n + prefilling):
            self.cache.reset_row(row)
        return events

    def _speculative_decode(self, view) -> list[TokenEvent]:
        """One MTP round for every running row: the accepted drafts are reported, then each row's next
        token is sampled from the logits after its last accepted one."""
        n = len(self.running)
        try:
            accepted, logits, self.owed = draft_and_verify(self.model, self.speculative_tokens, view, self.tokens,
                                                           self.owed, self.spec_stats,
                                                           [r.constraint for r in self.running])
        except Exception as exc:
            return self._fail_batch(exc)
        events, finished = [], set()
        for row, r in enumerate(self.running):
            for token in accepted[row]:
                event, done = self._record(r, token)
                events.append(event)
                if done:
                    finished.add(row)
                    break
        return events + self._emit(logits, self.sampler, list(range(n)), done_rows=finished)

    def _emit(self, logits: torch.Tensor, sampler: Sampler, rows: list[int],
              done_rows: set[int] = frozenset()) -> list[TokenEvent]:
        """Sample for `rows` (logits/sampler rows in that order), record and report the tokens, set
        each row's next input, and remove the rows that finished (`done_rows` already had). A failed
        draw fails every row of it (one draw serves them all); a failure while recording one row's
        token (log-probs, detokenization, stop strings, thinking budget) fails that row alone."""
        reqs = [self.running[row] for row in rows]
        try:
            _mask_constrained(logits, reqs, self._stop_index)
            out = sampler(logits)
            tokens = out.tokens.clone()
            for i, r in enumerate(reqs):
                if r.forced:
                    tokens[i] = r.forced.pop(0)
            sampler.update(tokens)
            self.tokens[rows[0]:rows[-1] + 1] = tokens
            token_ids = tokens.tolist()
        except Exception as exc:
            events = [self._failed(r, exc, "sampling") for row, r in zip(rows, reqs) if row not in done_rows]
            self._remove_rows(sorted(set(rows) | set(done_rows)))
            return events
        events, finished = [], sorted(done_rows)
        for i, (row, r, token) in enumerate(zip(rows, reqs, token_ids)):
            if row in done_rows:
                continue
            logprob = ((lambda i=i, token=token, top=r.params.top_logprobs: token_logprob(logits, out, i, token, top))
                       if r.params.logprobs else None)
            event, done = self._record(r, token, logprob)
            events.append(event)
            if done:
                finished.append(row)
        if finished:
            self._remove_rows(finished)
        return events

    def _record(self, r: Request, token: int,
                logprob: Callable[[], dict] | None = None) -> tuple[TokenEvent, bool]:
        """Record one token of `r` (its log-prob from `logprob`, when asked for) and make its event; a
        failure there (log-probs, detokenization, stop strings, thinking budget) ends `r` alone.
        Returns (the event, whether `r` is finished)."""
        try:
            lp = logprob() if logprob is not None else None
            text, done = accept_token(r, token, lp, self.stop_ids)
        except Exception as exc:
            return self._failed(r, exc, "token acceptance"), True
        self.stats.generation_tokens += 1
        if done:
            self._count_finished(r)
        return TokenEvent(r, -1, token, text, done, lp), done

    def _remove_rows(self, rows: list[int]) -> None:
        """Free running rows: each hole is filled by the last running row; the rows being prefilled
        (just past the running ones) move down to stay adjacent."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self.cache.move_row(last, row)
                self.running[row] = self.running[last]
                self.tokens[row] = self.tokens[last]
                if self.owed:
                    self.owed[row] = self.owed[last]
            self.running.pop()
            if self.owed:
                self.owed.pop()
            keep = list(range(len(self.running)))
            if row != last:
                keep[row] = last
            self.sampler = self.sampler.select_rows(keep) if keep else None
            self.tokens = self.tokens[:len(self.running)] if self.running else None
            for i in range(len(self.prefilling)):
                self.cache.move_row(last + 1 + i, last + i)


def _mask_constrained(logits: torch.Tensor, reqs: list[Request], stop_index: torch.Tensor) -> None:
    """In place: each row whose request has an active grammar (and no forced token) keeps only the
    tokens the grammar allows next. The log-probs reported are then those of the masked distribution,
    as vLLM reports them. A row whose grammar waits for the reasoning to end may not end the turn
    before (`stop_index`: the end-of-turn ids): the answer it must give comes after the reasoning."""
    pending, rows = [], []
    for i, r in enumerate(reqs):
        if r.constraint is not None:
            if not r.constraint.active:
                pending.append(i)
            elif not r.forced:
                rows.append(i)
    if pending and len(stop_index):
        logits[torch.tensor(pending, device=logits.device)[:, None], stop_index.to(logits.device)] = float("-inf")
    if not rows:
        return
    allowed = allowed_tokens([reqs[i].constraint for i in rows]).to(logits.device)
    if len(rows) == len(reqs):
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
