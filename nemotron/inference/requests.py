"""A request's life in the engine: what it asks (prompt, sampling, thinking budget), what it has
produced so far, and the per-token bookkeeping every generation path shares: detokenizing, stop ids
and strings, log-probs, tokens forced by the thinking budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nemotron.inference.constraint import Constraint, Grammar
from nemotron.inference.detokenize import IncrementalDetokenizer, StopStrings
from nemotron.inference.sampling import MAX_TOP_LOGPROBS, SamplingParams

# special tokens kept in the streamed text: the output parsers read them
PARSER_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<TOOLCALL>", "</TOOLCALL>")


@dataclass
class ThinkingBudget:
    """Caps reasoning at `budget` tokens. Once spent, reasoning is closed at the next line end, or
    after `grace` more tokens at the latest, by forcing `</think>` (NIM's budget control: a grace
    window to finish the line). The answer then follows as usual."""

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
        if self.closed or not self.active or self.spent < self.budget:
            return []
        if self.at_line_start:
            close = self.close_ids
        elif self.spent >= self.budget + self.grace:
            close = self.newline_close_ids
        else:
            return []
        self.closed = True
        return list(close)



@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    thinking_budget: ThinkingBudget | None = None
    # vLLM's prompt_logprobs: score every prompt token given the ones before it, with this many top
    # alternatives (0: the token alone); None: not asked
    prompt_logprobs: int | None = None
    grammar: Grammar | None = None     # constrained decoding: the engine compiles it into `constraint`
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
    failure: BaseException | None = field(default=None, repr=False)   # the exception behind `error`
    constraint: Constraint | None = field(default=None, repr=False)
    # with prompt_logprobs, filled by the prefill before the first TokenEvent: None for the first token
    # (nothing precedes it), then per prompt token {"token_id", "logprob", "rank", "top": [(id, logprob)]}
    prompt_logprob_entries: list[dict | None] = field(default_factory=list, repr=False)


@dataclass
class TokenEvent:
    """One generated token of one request: its text delta (already cut at a stop string)."""

    request: Request
    index: int                # position of the request in the list given to `Engine.run` (-1 when submitted)
    token_id: int
    text: str
    finished: bool
    logprob: dict | None = None



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
    if req.constraint is not None:
        req.constraint.observe(token)
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


def token_logprob(logits: torch.Tensor, out, row: int, token: int, top: int | None = None) -> dict:
    """Raw-distribution log-prob of the emitted token (forced tokens too) and the top-n (`top`: this
    row's n; the batch computes the largest any row asked for)."""
    if token == int(out.tokens[row]):
        value = float(out.logprobs[row])
    else:
        value = float(torch.log_softmax(logits[row].float(), -1)[token])
    entry = {"token_id": token, "logprob": value}
    if out.top_logprobs is not None:
        ids, values = out.top_logprobs
        entry["top"] = list(zip(ids[row, :top].tolist(), values[row, :top].tolist()))
    return entry


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, top: list[int]) -> list[list[dict]]:
    """Teacher-forced scores: logits [B, T, V] predict targets [B, T]. Per row and position, the
    target's raw log-prob (log_softmax in fp32), its rank (1 + the tokens more likely) and the row's
    `top[b]` most likely (id, log-prob), in prompt_logprob_entries' shape."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, targets[..., None])
    ranks = ((lp > chosen).sum(-1) + 1).tolist()
    values = chosen.squeeze(-1).tolist()
    n = max(top, default=0)
    if n:
        top_values, top_ids = lp.topk(n, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out = []
    for b, (row_ids, k) in enumerate(zip(targets.tolist(), top)):
        out.append([{"token_id": t, "logprob": values[b][j], "rank": ranks[b][j],
                     "top": list(zip(top_ids[b][j][:k], top_values[b][j][:k])) if k else []}
                    for j, t in enumerate(row_ids)])
    return out


def check_prompt(req: Request, vocab_size: int) -> None:
    req.params.validate()
    if not req.prompt_ids:
        raise ValueError("empty prompt")
    if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab_size:
        raise ValueError(f"prompt token id out of range [0, {vocab_size})")
    if any(t >= vocab_size for t in req.params.stop_token_ids):
        raise ValueError(f"stop_token_ids: token id out of range [0, {vocab_size})")
    if any(t >= vocab_size for t in req.params.logit_bias):
        raise ValueError(f"logit_bias: token id out of range [0, {vocab_size})")
    n = req.prompt_logprobs
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS):
        raise ValueError(f"prompt_logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {n!r}")

