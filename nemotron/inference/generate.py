"""Generation over the hybrid cache.

`prefill` runs a prompt in chunks that continue the cache (bounded memory for long prompts),
`decode_step` is one recurrent step for every active row. `Generator` drives a batch of requests of
different lengths: each prompt is prefilled into its own cache row, then all rows decode together;
finished rows leave at once (the last active row moves into the freed one, so active rows stay packed
at the front and decode works on a zero-copy view). Per request it handles sampling, stop ids and
strings, streaming detokenization, the thinking budget, and optional MTP speculation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nemotron.layers.cache import CacheOptions, HybridCache
from nemotron.inference.detokenize import IncrementalDetokenizer, StopStrings
from nemotron.inference.sampling import Sampler, SamplingParams


PARSER_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<TOOLCALL>", "</TOOLCALL>")


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor, cache: HybridCache, chunk: int = 512,
            return_hidden: bool = False):
    """Run ids [B, T] through the model in chunks of `chunk` tokens that continue `cache`; return the
    last position's logits [B, V] (and, with return_hidden, every position's final hidden [B, T, H])."""
    hidden = []
    logits = None
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk]
        if return_hidden:
            h = model.hidden_states(part, cache)
            hidden.append(h)
            logits = model.lm_head(h[:, -1:]).float()
        else:
            logits = model(part, cache, logits_to_keep=1)
    if return_hidden:
        return logits[:, -1], torch.cat(hidden, dim=1)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: nn.Module, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """tokens [B] -> next logits [B, V], one recurrent step for each row of `cache`."""
    return model(tokens[:, None], cache)[:, -1]


@torch.inference_mode()
def greedy_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
                    stop_ids: set[int] | None = None) -> torch.Tensor:
    """ids [B, T] (same length) -> generated ids [B, <= max_new_tokens]; a row stops at its first stop id."""
    b, t = ids.shape
    cache = model.new_cache(b, t + max_new_tokens)
    logits = prefill(model, ids, cache)
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    stop = torch.tensor(sorted(stop_ids or []), dtype=ids.dtype, device=ids.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        out.append(token)
        done |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_step(model, token, cache)
    return torch.stack(out, dim=1) if out else ids[:, :0]


def _compiled_decode(model: nn.Module):
    """The model's compiled decode function, made once and kept on the model (so its graphs are
    reused by every Generator and freed with the model)."""
    if getattr(model, "_compiled_decode", None) is None:
        def step(ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
            return model(ids, cache, positions=positions)[:, -1]

        model._compiled_decode = torch.compile(step, dynamic=True)
    return model._compiled_decode


# --------------------------------------------------------------------------------------------------
# thinking budget
# --------------------------------------------------------------------------------------------------


@dataclass
class ThinkingBudget:
    """Caps reasoning at `budget` tokens. Once spent, reasoning is closed at the next line end, or
    after `grace` more tokens at the latest, by forcing `</think>` (NIM's budget control: a grace
    window to finish the line). The answer then follows as usual. `after_close` tokens are forced
    right after the reasoning ends, however it ends (the server's required/named tool_choice starts
    the tool call there)."""

    budget: int
    close_ids: list[int]           # tokens of "</think>\n"
    newline_close_ids: list[int]   # tokens of "\n</think>\n" (when cut mid-line)
    end_think_id: int | None       # the `</think>` token, to notice the model closing by itself
    start_think_id: int | None = None
    grace: int = 0
    active: bool = True            # the prompt already opened <think>
    at_line_start: bool = True     # generation prompt "<think>\n" ends a line
    spent: int = 0
    closed: bool = False
    after_close: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.grace <= 0:
            self.grace = max(8, min(self.budget // 10, 1 << 20))

    def observe(self, token: int, text: str) -> None:
        if self.closed:
            return
        if token == self.start_think_id:
            self.active = True
            return
        if not self.active:
            return
        if token == self.end_think_id:
            self.closed = True
            return
        self.spent += 1
        if text:
            self.at_line_start = text.endswith("\n")

    def force(self) -> list[int]:
        """Tokens to force next (empty while within budget)."""
        if self.closed:
            after, self.after_close = self.after_close, []
            return after
        if not self.active or self.spent < self.budget:
            return []
        if self.at_line_start:
            close = self.close_ids
        elif self.spent >= self.budget + self.grace:
            close = self.newline_close_ids
        else:
            return []
        self.closed = True
        after, self.after_close = self.after_close, []
        return list(close) + after


# --------------------------------------------------------------------------------------------------
# requests and the batch generator
# --------------------------------------------------------------------------------------------------


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    thinking_budget: ThinkingBudget | None = None
    # filled while generating
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = field(default=None, repr=False)
    stops: StopStrings | None = field(default=None, repr=False)
    cancelled: bool = False   # set by a client that went away; the engine drops the request
    on_event: Callable[["TokenEvent"], None] | None = field(default=None, repr=False)  # engine callback
    cached_tokens: int = 0    # prompt tokens served from the prefix cache
    error: str | None = None  # why it failed (finish_reason "error"), one line


@dataclass
class TokenEvent:
    """One generated token of one request: its text delta (already cut at a stop string)."""

    request: Request
    index: int                # position of the request in the list given to the generator
    token_id: int
    text: str
    finished: bool
    logprob: dict | None = None


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_length(self) -> float:
        """Tokens produced per target forward in speculative rounds: 1 + accepted / rounds."""
        return 1.0 + self.accepted / self.rounds if self.rounds else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


# --------------------------------------------------------------------------------------------------
# per-request bookkeeping, shared by the Generator and the serving Engine
# --------------------------------------------------------------------------------------------------


def start_request(req: Request, tokenizer) -> None:
    """Set up a request's streaming detokenizer, stop-string matcher and thinking budget."""
    if tokenizer is not None:
        # special tokens are dropped from the text (as vLLM does), except the tags output parsers read
        req.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, prompt_ids=req.prompt_ids,
                                           keep=PARSER_TAGS)
    if req.params.stop:
        req.stops = StopStrings(req.params.stop)
    if req.thinking_budget is not None:
        req.forced.extend(req.thinking_budget.force())


def accept_token(req: Request, token: int, logprob: dict | None, stop_ids: set[int]) -> tuple[str, bool]:
    """Record one generated token for `req`; returns (text delta, finished)."""
    req.output_ids.append(token)
    if logprob is not None:
        req.logprobs.append(logprob)
    stopped_by_id = (token in stop_ids and not req.params.ignore_eos) or token in req.params.stop_token_ids
    text = req.detok.add(token) if req.detok is not None and not stopped_by_id else ""
    if req.thinking_budget is not None:
        req.thinking_budget.observe(token, text)
        if not req.forced:
            req.forced.extend(req.thinking_budget.force())
    if req.stops is not None:
        text, hit = req.stops.push(text)
        if hit:
            req.finish_reason = "stop"
            req.text += text
            return text, True
    if stopped_by_id:
        req.finish_reason = "stop"
    elif len(req.output_ids) >= req.params.max_new_tokens:
        req.finish_reason = "length"
    else:
        req.text += text
        return text, False
    # finished: release what the detokenizer and the stop matcher still hold
    if req.detok is not None:
        tail = req.detok.flush()
        if req.stops is not None:
            tail, hit = req.stops.push(tail)
            tail += "" if hit else req.stops.flush()
        text += tail
    req.text += text
    return text, True


def token_logprob(logits: torch.Tensor, out, row: int, token: int) -> dict:
    """Raw-distribution log-prob of the emitted token (forced tokens too) and the top-n."""
    if token == int(out.tokens[row]):
        value = float(out.logprobs[row])
    else:
        value = float(torch.log_softmax(logits[row].float(), -1)[token])
    entry = {"token_id": token, "logprob": value}
    if out.top_logprobs is not None:
        ids, values = out.top_logprobs
        entry["top"] = list(zip(ids[row].tolist(), values[row].tolist()))
    return entry


def check_prompt(req: Request, vocab_size: int) -> None:
    req.params.validate()
    if not req.prompt_ids:
        raise ValueError("empty prompt")
    if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab_size:
        raise ValueError(f"prompt token id out of range [0, {vocab_size})")
    if any(t >= vocab_size for t in req.params.stop_token_ids):
        raise ValueError(f"stop_token_ids: token id out of range [0, {vocab_size})")


class Generator:
    """Generates for a list of requests at once. Iterate `stream()` for TokenEvents."""

    def __init__(self, model: nn.Module, tokenizer=None, stop_ids: set[int] | None = None,
                 prefill_chunk: int = 512, speculative_tokens: int = 0, compile: bool = False,
                 cache_options: CacheOptions | None = None) -> None:
        self.cache_options = cache_options
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids or ())
        self.prefill_chunk = prefill_chunk
        self.k = speculative_tokens
        self.stats = SpecStats()
        self.vocab_size = model.lm_head.weight.shape[0]
        self.device = model.lm_head.weight.device
        # torch.compile of the one-token decode step (whole-buffer KV with a mask, positions as a
        # tensor, symbolic shapes): the first step compiles (seconds), later ones run fused kernels
        self.compiled_step = _compiled_decode(model) if compile else None
        if self.k and getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding needs a checkpoint with MTP weights (num_nextn_predict_layers > 0)")

    def _speculate(self, reqs: list[Request]) -> bool:
        return self.k > 0 and all(speculation_ok(r) for r in reqs)

    # ---- the loop ----

    @torch.inference_mode()
    def stream(self, requests: list[Request]) -> Iterator[TokenEvent]:
        for r in requests:
            check_prompt(r, self.vocab_size)
        live = [r for r in requests if r.params.max_new_tokens > 0]
        for r in requests:
            if r.params.max_new_tokens == 0:
                r.finish_reason = "length"
        if not live:
            return
        index = {id(r): i for i, r in enumerate(requests)}
        # prompts of equal length share one prefill forward: keep them in adjacent rows
        live.sort(key=lambda r: len(r.prompt_ids))
        max_len = max(len(r.prompt_ids) + r.params.max_new_tokens for r in live) + self.k + 1
        cache = self.model.new_cache(len(live), max_len, self.cache_options)
        use_mtp = self.k > 0
        logits, hidden = [], []
        start = 0
        while start < len(live):
            end = start
            while end < len(live) and len(live[end].prompt_ids) == len(live[start].prompt_ids):
                end += 1
            ids = torch.tensor([r.prompt_ids for r in live[start:end]], device=self.device)
            out = prefill(self.model, ids, cache.rows(start, end), self.prefill_chunk, return_hidden=use_mtp)
            if use_mtp:
                out, h = out
                hidden.extend(h[i:i + 1] for i in range(end - start))
            logits.append(out)
            start = end
        for r in live:
            start_request(r, self.tokenizer)
        logits = torch.cat(logits)
        sampler = Sampler([r.params for r in live], self.vocab_size, self.device, [r.prompt_ids for r in live])
        # MTP pairs still to run per row: (target hidden at t, token at t+1)
        pending = [(h, torch.tensor([r.prompt_ids[1:]], device=self.device)) for h, r in zip(hidden, live)] \
            if use_mtp else None

        while live:
            # 1. each row's next token: sampled, or forced by the thinking budget
            out = sampler(logits)
            tokens = out.tokens.clone()
            for row, r in enumerate(live):
                if r.forced:
                    tokens[row] = r.forced.pop(0)
            sampler.update(tokens)
            finished = []
            for row, (r, token) in enumerate(zip(live, tokens.tolist())):
                lp = token_logprob(logits, out, row, token) if r.params.logprobs else None
                text, done = accept_token(r, token, lp, self.stop_ids)
                yield TokenEvent(r, index[id(r)], token, text, done, lp)
                if done:
                    finished.append(row)
            if finished:
                if len(finished) == len(live):
                    return
                live, cache, sampler, tokens, pending = self._compact(live, cache, sampler, finished, tokens, pending)
            if not (use_mtp and self._speculate(live)):
                # 2a. one decode step for every running row
                logits = self._decode(live, cache, tokens, pending)
                continue
            # 2b. MTP drafts, verified in one forward; the accepted drafts are emitted now
            accepted, logits, pending = draft_and_verify(self.model, self.k, cache, tokens, pending, self.stats)
            finished = []
            for row, r in enumerate(live):
                for token in accepted[row]:
                    text, done = accept_token(r, token, None, self.stop_ids)
                    yield TokenEvent(r, index[id(r)], token, text, done)
                    if done:
                        finished.append(row)
                        break
            if finished:
                if len(finished) == len(live):
                    return
                live, cache, sampler, logits, pending = self._compact(live, cache, sampler, finished, logits, pending)

    @staticmethod
    def _compact(live, cache, sampler, finished, rows_tensor, pending):
        """Move the running rows to the front of the cache and drop the finished ones; returns the
        new (live, cache view, sampler, rows_tensor[running], pending)."""
        active = [row for row in range(len(live)) if row not in finished]
        for new_row, old_row in enumerate(active):
            if new_row != old_row:
                cache.move_row(old_row, new_row)
        pending = None if pending is None else [pending[i] for i in active]
        return ([live[i] for i in active], cache.rows(0, len(active)), sampler.select_rows(active),
                rows_tensor[active], pending)

    def _decode(self, live, cache, tokens, pending):
        if pending is None:
            if self.compiled_step is not None:
                logits = self.compiled_step(tokens[:, None], cache, cache.seq_lens.to(tokens.device))
                cache.seq_lens += 1
                return logits
            return decode_step(self.model, tokens, cache)
        h = self.model.hidden_states(tokens[:, None], cache)
        extend_pending(pending, h, tokens)
        return self.model.lm_head(h[:, -1]).float()


# --------------------------------------------------------------------------------------------------
# MTP speculation, shared by the Generator and the serving Engine
# --------------------------------------------------------------------------------------------------


def speculation_ok(req: Request) -> bool:
    """MTP speculation is exact for greedy rows without penalties, forced tokens or logprobs."""
    p = req.params
    return (p.greedy and not req.forced and not p.logprobs and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and (req.thinking_budget is None or req.thinking_budget.closed))


def extend_pending(pending: list, h: torch.Tensor, tokens: torch.Tensor) -> None:
    """After a plain decode step: each row's new token pairs with the hidden state before it, owed to
    its MTP cache (kept in step for the next speculative round)."""
    for row in range(len(pending)):
        ph, pt = pending[row]
        pending[row] = (torch.cat([ph, h[row:row + 1]], 1), torch.cat([pt, tokens[row:row + 1, None]], 1))


def draft_and_verify(model: nn.Module, k: int, cache: HybridCache, tokens: torch.Tensor, pending: list,
                     stats: SpecStats):
    """Draft k tokens per row with the MTP block, verify [token, drafts] in one target forward, keep
    the accepted prefix (Mamba state rolled back from per-token snapshots). `pending[row]` is the
    (target hidden states, next tokens) pairs the row's MTP cache still owes. Returns (the accepted
    drafts per row, the logits that follow each row's last kept token, the new pending pairs)."""
    device = tokens.device
    drafts = []
    for row in range(tokens.shape[0]):
        view = cache if tokens.shape[0] == 1 else cache.rows(row)
        ph, pt = pending[row]
        # pairs still owed to the MTP cache, the newest ending with this step's token
        pt = torch.cat([pt, tokens[row:row + 1, None]], 1)[:, -ph.shape[1]:]
        logits_d, hd = model.mtp_forward(ph, pt, cache=view, logits_to_keep=1)
        row_drafts = [int(logits_d[0, -1].argmax())]
        for _ in range(k - 1):
            logits_d, hd = model.mtp_forward(hd[:, -1:], torch.tensor([[row_drafts[-1]]], device=device), cache=view,
                                             logits_to_keep=1)
            row_drafts.append(int(logits_d[0, -1].argmax()))
        view.mtp_seq_lens -= k - 1  # recursive drafts used MTP hidden states: recomputed next round
        drafts.append(row_drafts)
    block = torch.cat([tokens[:, None], torch.tensor(drafts, device=device)], dim=1)      # [B, k+1]
    cache.set_record(True)
    try:
        h = model.hidden_states(block, cache)
    finally:  # a failed forward must not leave the cache recording for the next one
        cache.set_record(False)
    all_logits = model.lm_head(h).float()                                                # [B, k+1, V]
    preds = all_logits.argmax(-1).tolist()
    keep, out_tokens, new_pending = [], [], []
    for row, row_drafts in enumerate(drafts):
        n = 0
        while n < k and preds[row][n] == row_drafts[n]:
            n += 1
        keep.append(n + 1)
        out_tokens.append(row_drafts[:n])
        stats.drafted += k
        stats.accepted += n
        new_pending.append((h[row:row + 1, :n + 1], block[row:row + 1, 1:n + 1]))
    stats.rounds += len(drafts)
    cache.rollback(keep, k + 1)
    return out_tokens, all_logits[torch.arange(len(keep)), torch.tensor(keep) - 1], new_pending
