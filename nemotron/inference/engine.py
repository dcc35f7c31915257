"""Continuous batching: one loop serves every request.

The cache has `max_batch` rows. Rows 0..n-1 hold the running requests, which decode together, one
token each per step; row n holds the request being prefilled, one chunk per step, so a long prompt
never stalls the running streams for more than a chunk. New requests wait in a bounded queue and
join between steps; a finished or cancelled request leaves at once (the last running row moves into
its slot, keeping the running rows packed for a zero-copy decode view).

Prefill chunks end on multiples of `prefill_chunk` (absolute positions), which is what makes the
optional prefix cache exact (see prefix_cache.py).

`Engine.step()` does one round and returns its TokenEvents; `Engine.start()` runs rounds on a
background thread and hands each event to its request's `on_event` callback (the HTTP server's
bridge into asyncio).

One request never hurts another: a failure while admitting, prefilling or finishing one request ends
that request alone (finish_reason "error", `Request.error` says why, its final event is sent); a
failure of a batched decode forward ends the requests of that batch. The engine goes on serving
either way; `Engine.error` is set only when its thread died.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nemotron.inference.generate import (Request, SpecStats, TokenEvent, accept_token, check_prompt, draft_and_verify, extend_pending,
                       speculation_ok, start_request, token_logprob)
from nemotron.layers.cache import CacheOptions
from nemotron.inference.prefix_cache import PrefixCache, block_keys
from nemotron.inference.sampling import Sampler


log = logging.getLogger(__name__)


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
                 cache_options: CacheOptions | None = None) -> None:
        self.model = model
        # torch's CPU threads for decode steps and for prefill chunks. OpenMP keeps the setting per OS
        # thread, so the engine thread applies them itself (by default, the creator's setting)
        self.threads = threads or torch.get_num_threads()
        self.prefill_threads = prefill_threads or self.threads
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids or ())
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.vocab_size = model.lm_head.weight.shape[0]
        self.device = model.lm_head.weight.device
        self.k = speculative_tokens
        if self.k and getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding needs a checkpoint with MTP weights (num_nextn_predict_layers > 0)")
        if self.k and prefix_cache_bytes:
            # a cached prefix has no target hidden states for the MTP block to start from
            raise ValueError("the prefix cache and MTP speculation cannot be combined yet; turn one off")
        # speculation verifies k+1 tokens per row past the request's own budget
        self.cache = model.new_cache(max_batch, max_len + self.k + 1, cache_options)
        self.prefix_cache = PrefixCache(prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.spec_stats = SpecStats()
        self.pending: list = []                       # per running row: MTP pairs still owed (speculation)
        self._prefill_hidden: list[torch.Tensor] = []
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.sampler: Sampler | None = None
        self.tokens: torch.Tensor | None = None       # [n] the token each running row feeds next
        self.prefilling: Request | None = None
        self._prefill_keys: list[bytes] = []
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # ---- the client side (any thread) ----

    def submit(self, req: Request, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        """Queue a request. Raises ValueError for a bad one, QueueFull when the queue is at its limit,
        EngineStopped when the engine's thread has died."""
        if self.error is not None:
            raise EngineStopped(f"the engine has stopped: {self.error!r}")
        check_prompt(req, self.vocab_size)
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

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away): it leaves before the next step, its row freed."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

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
                while not self._stop and not (self.waiting or self.running or self.prefilling):
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
            reqs = list(self.waiting) + self.running + ([self.prefilling] if self.prefilling else [])
            self.waiting.clear()
        self.running, self.prefilling, self.sampler, self.tokens, self.pending = [], None, None, None, []
        events = []
        for r in reqs:
            r.finish_reason, r.error = "error", f"the engine has stopped: {exc!r}"
            events.append(TokenEvent(r, -1, -1, "", True))
        self._deliver(events)

    def _failed(self, req: Request, exc: Exception, stage: str) -> TokenEvent:
        """End `req` alone with finish_reason "error"; returns its final event."""
        log.error("a request failed during %s: %r", stage, exc, exc_info=exc)
        req.finish_reason, req.error = "error", f"{stage} failed: {type(exc).__name__}: {exc}"[:500]
        self._count_finished(req)
        return TokenEvent(req, -1, -1, "", True)

    def _count_finished(self, req: Request) -> None:
        self.stats.finished[req.finish_reason] = self.stats.finished.get(req.finish_reason, 0) + 1

    # ---- one round ----

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Drop cancelled requests, decode one token for every running request, then prefill one chunk
        of the next prompt (admitting it from the queue if needed)."""
        self.stats.steps += 1
        events: list[TokenEvent] = []
        try:
            self._drop_cancelled()
            if self.running:
                events += self._decode()
            if self.prefilling is None:
                events += self._admit()
            if self.prefilling is not None:
                events += self._with_threads(self.prefill_threads, self._prefill_chunk)
        except Exception as exc:
            events += self._reset(exc)
        return events

    def _reset(self, exc: Exception) -> list[TokenEvent]:
        """A failure outside the per-request guards below (the engine's own bookkeeping): its state
        cannot be trusted, so the admitted requests fail and every cache row starts empty. The queue
        is kept and served next. If even this fails, the exception ends the engine thread."""
        log.error("an engine step failed; the running requests are dropped", exc_info=exc)
        reqs = self.running + ([self.prefilling] if self.prefilling is not None else [])
        self.running, self.prefilling, self.sampler, self.tokens, self.pending = [], None, None, None, []
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
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling = None
            self._prefill_hidden = []
        gone = [row for row, r in enumerate(self.running) if r.cancelled]
        if gone:
            self._remove_rows(gone)

    def _admit(self) -> list[TokenEvent]:
        if len(self.running) >= self.max_batch:
            return []
        with self._lock:
            if not self.waiting:
                return []
            req = self.waiting.popleft()
        row = len(self.running)
        self._prefill_keys = []
        self._prefill_hidden = []
        try:
            self.cache.reset_row(row)
            if self.prefix_cache is not None:
                keys = self.prefix_cache.lookup(req.prompt_ids)
                self.prefix_cache.restore(keys, self.cache, row)
                req.cached_tokens = len(keys) * self.prefill_chunk
                self._prefill_keys = block_keys(req.prompt_ids, self.prefill_chunk)
        except Exception as exc:  # the row is reset again by the next admission
            self._prefill_keys = []
            return [self._failed(req, exc, "admission")]
        self.stats.prompt_tokens += len(req.prompt_ids)
        self.prefilling = req
        return []

    def _prefill_chunk(self) -> list[TokenEvent]:
        """One chunk of the prefilling request's prompt; after its last chunk, the request joins the
        running batch with its first token. A failure ends that request alone: the forward only
        touched its own row, which the next admission resets."""
        req, stage = self.prefilling, "prefill"
        try:
            logits = self._prefill_forward(req)
            if logits is None:
                return []
            stage = "joining the batch"
            sampler = self._join(req)
        except Exception as exc:
            self.prefilling, self._prefill_hidden = None, []
            return [self._failed(req, exc, stage)]
        return self._emit(logits, sampler, [len(self.running) - 1])

    def _prefill_forward(self, req: Request) -> torch.Tensor | None:
        """Run the next chunk; the last position's logits once the prompt is done, else None."""
        row = len(self.running)
        view = self.cache.rows(row)
        pos = int(view.seq_lens[0])
        end = min(len(req.prompt_ids), (pos // self.prefill_chunk + 1) * self.prefill_chunk)
        ids = torch.tensor([req.prompt_ids[pos:end]], device=self.device)
        if self.k:  # the MTP block drafts from the target's hidden states: keep them
            h = self.model.hidden_states(ids, view)
            self._prefill_hidden.append(h)
            logits = self.model.lm_head(h[:, -1]).float()
        else:
            logits = self.model(ids, view, logits_to_keep=1)[:, -1]
        if self.prefix_cache is not None and end % self.prefill_chunk == 0:
            self.prefix_cache.save(self._prefill_keys[end // self.prefill_chunk - 1], self.cache, row, end)
        return None if end < len(req.prompt_ids) else logits

    def _join(self, req: Request) -> Sampler:
        """The prompt is done: `req` joins the running batch (its first token comes from the last
        chunk's logits); returns its own one-row sampler. Everything that can fail is built before
        the engine's state changes, so a failure leaves the batch as it was."""
        start_request(req, self.tokenizer)
        sampler = Sampler([req.params], self.vocab_size, self.device, [req.prompt_ids])
        batch = sampler if self.sampler is None else Sampler.concat([self.sampler, sampler])
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        tokens = token if self.tokens is None else torch.cat([self.tokens, token])
        owed = (torch.cat(self._prefill_hidden, 1),
                torch.tensor([req.prompt_ids[1:]], dtype=torch.long, device=self.device)) if self.k else None
        self.prefilling, self._prefill_hidden = None, []
        self.running.append(req)
        self.sampler, self.tokens = batch, tokens
        if self.k:
            self.pending.append(owed)
        return sampler

    def _decode(self) -> list[TokenEvent]:
        n = len(self.running)
        view = self.cache.rows(0, n)
        if self.k and all(speculation_ok(r) for r in self.running):
            return self._speculative_decode(view)
        try:
            if not self.k:
                logits = self.model(self.tokens[:, None], view)[:, -1]
            else:
                h = self.model.hidden_states(self.tokens[:, None], view)
                extend_pending(self.pending, h, self.tokens)
                logits = self.model.lm_head(h[:, -1]).float()
        except Exception as exc:
            return self._fail_batch(exc)
        return self._emit(logits, self.sampler, list(range(n)))

    def _fail_batch(self, exc: Exception) -> list[TokenEvent]:
        """A batched decode forward failed. No single request can be blamed, and the batch's cache
        rows may be half-updated (some layers stepped, others not), so every request of the batch
        fails and its row is emptied. The request being prefilled (its row was not part of the
        forward) and the queue go on, and the engine keeps serving."""
        events = [self._failed(r, exc, "decode") for r in self.running]
        n, prefilling = len(self.running), self.prefilling is not None
        self._remove_rows(list(range(n)))   # the prefilling row moves down to row 0
        for row in range(int(prefilling), n + int(prefilling)):
            self.cache.reset_row(row)
        return events

    def _speculative_decode(self, view) -> list[TokenEvent]:
        """One MTP round for every running row: the accepted drafts are reported, then each row's next
        token is sampled from the logits after its last accepted one."""
        n = len(self.running)
        try:
            accepted, logits, self.pending = draft_and_verify(self.model, self.k, view, self.tokens, self.pending,
                                                              self.spec_stats)
        except Exception as exc:
            return self._fail_batch(exc)
        events, finished = [], set()
        for row, r in enumerate(self.running):
            for token in accepted[row]:
                try:
                    text, done = accept_token(r, token, None, self.stop_ids)
                except Exception as exc:
                    events.append(self._failed(r, exc, "token acceptance"))
                    finished.add(row)
                    break
                self.stats.generation_tokens += 1
                events.append(TokenEvent(r, -1, token, text, done))
                if done:
                    finished.add(row)
                    self._count_finished(r)
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
            try:
                lp = token_logprob(logits, out, i, token) if r.params.logprobs else None
                text, done = accept_token(r, token, lp, self.stop_ids)
            except Exception as exc:
                events.append(self._failed(r, exc, "token acceptance"))
                finished.append(row)
                continue
            self.stats.generation_tokens += 1
            events.append(TokenEvent(r, -1, token, text, done, lp))
            if done:
                finished.append(row)
                self._count_finished(r)
        if finished:
            self._remove_rows(finished)
        return events

    def _remove_rows(self, rows: list[int]) -> None:
        """Free running rows: each hole is filled by the last running row; the row being prefilled
        (just past the running ones) moves down to stay adjacent."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self.cache.move_row(last, row)
                self.running[row] = self.running[last]
                self.tokens[row] = self.tokens[last]
                if self.pending:
                    self.pending[row] = self.pending[last]
            self.running.pop()
            if self.pending:
                self.pending.pop()
            keep = list(range(len(self.running)))
            if row != last:
                keep[row] = last
            self.sampler = self.sampler.select_rows(keep) if keep else None
            self.tokens = self.tokens[:len(self.running)] if self.running else None
            if self.prefilling is not None:
                self.cache.move_row(last + 1, len(self.running))
