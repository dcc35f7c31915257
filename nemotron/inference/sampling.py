"""Batch sampling with per-row parameters, in vLLM's order and semantics:
logit_bias -> penalties -> temperature -> min_p -> top_k -> top_p -> draw.

Everything is vectorised over the batch and free of host syncs: per-row parameters live in [B]
tensors built once, token counts in a [B, V] tensor updated by scatter, and the draw is the
exponential race argmax(p / q), q ~ Exp(1) (written as argmax(logits - log q)), which needs no
cumulative sums or `multinomial` rejection loops. Which stages run is decided from the Python-side
parameters, so skipping unused stages costs no sync either."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# vLLM treats temperatures below this as greedy: dividing logits by them overflows fp32.
GREEDY_EPS = 1e-5
MAX_TOP_LOGPROBS = 20
# torch.Generator.manual_seed takes a 64-bit value, signed or unsigned
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
# token ids become int64 tensors
TOKEN_ID_MAX = (1 << 63) - 1
# OpenAI's range for a logit_bias value
LOGIT_BIAS_MAX = 100.0


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # < GREEDY_EPS (e.g. 0) -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    min_p: float = 0.0
    # HF/vLLM: tokens seen in prompt or output; positive logits divided, negative multiplied
    repetition_penalty: float = 1.0
    # OpenAI/vLLM: output tokens only; subtract the penalty once if the token occurred
    presence_penalty: float = 0.0
    # OpenAI/vLLM: output tokens only; subtract penalty * count
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, requires logprobs
    ignore_eos: bool = False  # vLLM's option: keep going past the model's end-of-turn ids
    # OpenAI: token id -> bias in [-100, 100], added to the logits before anything else (as vLLM)
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts a single string
            self.stop = [self.stop]

    def validate(self) -> "SamplingParams":
        """Raise ValueError (one line, naming the field) for out-of-range values; return self.
        Comparisons are written so that NaN fails them."""

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        if not self.max_new_tokens >= 0:
            fail("max_new_tokens", "must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            fail("temperature", "must be a finite number >= 0")
        if not self.top_k >= 0:
            fail("top_k", "must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            fail("repetition_penalty", "must be a finite number > 0")
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "must be in [-2, 2]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            fail("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            fail("top_logprobs", "requires logprobs=True")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            fail("seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}] or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if not all(isinstance(t, int) and 0 <= t <= TOKEN_ID_MAX for t in self.stop_token_ids):
            fail("stop_token_ids", f"must be a list of token ids in [0, {TOKEN_ID_MAX}]")
        if not (isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= TOKEN_ID_MAX
                and isinstance(b, (int, float)) and not isinstance(b, bool) and -LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX
                for t, b in self.logit_bias.items())):
            fail("logit_bias", f"must map token ids to biases in [{-LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    # log-probs under the RAW model distribution log_softmax(logits) (vLLM's default), present when
    # any row asked for logprobs; rows that did not ask get values too and should ignore them
    logprobs: torch.Tensor | None = None  # [B], of the chosen token
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids [B, n], values [B, n]), n = max asked


# --------------------------------------------------------------------------------------------------
# pure stages
# --------------------------------------------------------------------------------------------------

def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool (prompt or output); counts [B, V] float (output only);
    penalties [B]. Neutral values (1, 0, 0) leave a row bit-identical."""
    if seen is not None:
        rep = repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if counts is not None:
        logits = logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(-1)
    threshold = min_p[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """top_k [B] (V or more = off) and top_p [B] (1 = off) with one descending sort. top_k keeps
    ties at the k-th value (as vLLM); top_p keeps the minimal prefix whose mass reaches p, measured
    after top_k (renormalised)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).clamp(0, logits.shape[-1] - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    if top_p is not None:
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # exactly 0 for the top token, so it is always kept
        # rows with p == 1 skip: rounding can push the tail's mass_before just past 1
        drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_race(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(softmax(logits) / q) with q ~ Exp(1) draws from softmax(logits); in log space no
    softmax is needed. q is floored so a zero draw cannot turn a -inf logit into NaN."""
    return (logits - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()).argmax(-1)


# --------------------------------------------------------------------------------------------------
# the batch sampler
# --------------------------------------------------------------------------------------------------

class Sampler:
    """Per-row parameters for a batch of B sequences (rows may use different params).

    `sampler(logits)` draws one token per row; `sampler.update(tokens)` records them (penalty
    counts); `sampler.select_rows(rows)` keeps a subset when rows finish. A row with a seed draws
    its noise from its own generator, so its tokens do not depend on the rest of the batch or on
    its position in it; rows without a seed share torch's default generator of the device."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device: torch.device | str | None = None,
                 prompt_ids: list[list[int]] | None = None) -> None:
        b, v = len(params), vocab_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        prompt_ids = prompt_ids if prompt_ids is not None else [[] for _ in params]
        if len(prompt_ids) != b:
            raise ValueError(f"prompt_ids has {len(prompt_ids)} rows for {b} sampling params")
        for row in prompt_ids:
            if any(not 0 <= t < v for t in row):
                raise ValueError(f"prompt_ids: token id out of range [0, {v})")
        if any(t >= v for p in params for t in p.logit_bias):
            raise ValueError(f"logit_bias: token id out of range [0, {v})")
        self.params = [p.validate() for p in params]
        self.vocab_size, self.device = v, dev

        def col(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        self.greedy = col([p.greedy for p in params], torch.bool)
        self.temperature = col([1.0 if p.greedy else p.temperature for p in params])  # 1: no 0-division
        self.top_k = col([p.top_k if 0 < p.top_k < v else v for p in params], torch.long)
        self.top_p = col([p.top_p for p in params])
        self.min_p = col([p.min_p for p in params])
        self.repetition = col([p.repetition_penalty for p in params])
        self.presence = col([p.presence_penalty for p in params])
        self.frequency = col([p.frequency_penalty for p in params])
        # padded with -1, which no token equals
        width = max([len(p.stop_token_ids) for p in params], default=0)
        self.stop_ids = col([p.stop_token_ids + [-1] * (width - len(p.stop_token_ids)) for p in params]
                            if b else [], torch.long).reshape(b, width)
        self.generators: list[torch.Generator | None] = [
            None if p.seed is None else torch.Generator(dev).manual_seed(p.seed) for p in params]

        # penalty state only when some row needs it: [B, V] per row is the largest thing here
        self.seen: torch.Tensor | None = None  # prompt or output tokens, for repetition_penalty
        self.counts: torch.Tensor | None = None  # output token counts, for presence/frequency
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros(b, v, dtype=torch.bool, device=dev)
            rows = torch.repeat_interleave(torch.arange(b), torch.tensor([len(r) for r in prompt_ids], dtype=torch.long))
            cols = torch.tensor([t for r in prompt_ids for t in r], dtype=torch.long)
            self.seen[rows.to(dev), cols.to(dev)] = True
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            self.counts = torch.zeros(b, v, dtype=torch.float32, device=dev)
        self._set_flags()

    def _build_bias(self) -> None:
        """The rows' logit_bias as sparse (rows, cols, values) tensors, built from the Python params
        whenever the batch changes (never per step); None when no row has one."""
        entries = [(i, t, b) for i, p in enumerate(self.params) for t, b in p.logit_bias.items()]
        if not entries:
            self.bias = None
            return
        rows, cols, values = zip(*entries)
        self.bias = (torch.tensor(rows, dtype=torch.long, device=self.device),
                     torch.tensor(cols, dtype=torch.long, device=self.device),
                     torch.tensor(values, dtype=torch.float32, device=self.device))

    def _set_flags(self) -> None:
        """Host-side switches from the Python params: which stages run, and the logit_bias entries
        (no device reads)."""
        p = self.params
        self._build_bias()
        self._all_greedy = all(x.greedy for x in p)
        self._any_greedy = any(x.greedy for x in p)
        self._any_min_p = any(x.min_p > 0 and not x.greedy for x in p)
        self._any_top_k = any(0 < x.top_k < self.vocab_size and not x.greedy for x in p)
        self._any_top_p = any(x.top_p < 1 and not x.greedy for x in p)
        self._any_logprobs = any(x.logprobs for x in p)
        self._n_top = max([x.top_logprobs for x in p], default=0)
        self._any_unseeded = any(x.seed is None and not x.greedy for x in p)
        self._seeded = [(i, g) for i, (g, x) in enumerate(zip(self.generators, p)) if g is not None and not x.greedy]

    def __len__(self) -> int:
        return len(self.params)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits each row draws from: penalised, divided by temperature and filtered (-inf).
        Greedy rows are divided by 1, and no filter removes a row's argmax: it is their token."""
        x = logits.float()
        if self.bias is not None:  # out of place: the raw logits serve the log-probs; other rows stay bit-identical
            rows, cols, values = self.bias
            x = x.index_put((rows, cols), values, accumulate=True)
        x = apply_penalties(x, self.seen, self.counts, self.repetition, self.presence, self.frequency)
        if self._all_greedy:
            return x
        x = x / self.temperature[:, None]
        if self._any_min_p:
            x = apply_min_p(x, self.min_p)
        if self._any_top_k or self._any_top_p:
            x = apply_top_k_top_p(x, self.top_k if self._any_top_k else None, self.top_p if self._any_top_p else None)
        return x

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `__call__` draws from, [B, V] (one-hot at the argmax for greedy rows);
        e.g. for tests or speculative-decoding acceptance."""
        x = self.process(logits)
        p = x.softmax(-1)
        if self._any_greedy:
            onehot = torch.zeros_like(p).scatter_(1, x.argmax(-1, keepdim=True), 1.0)
            p = torch.where(self.greedy[:, None], onehot, p)
        return p

    def _noise(self, shape: torch.Size) -> torch.Tensor:
        q = torch.ones(shape, dtype=torch.float32, device=self.device)  # greedy rows: no noise needed
        if self._any_unseeded:
            q.exponential_()  # seeded rows are overwritten below
        for i, g in self._seeded:  # one kernel per seeded row, as vLLM; no sync
            q[i].exponential_(generator=g)
        return q

    def __call__(self, logits: torch.Tensor) -> SampleOutput:
        """logits [B, V] -> SampleOutput with tokens [B] (int64)."""
        if logits.shape != (len(self), self.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != ({len(self)}, {self.vocab_size})")
        x = self.process(logits)
        if self._all_greedy:
            tokens = x.argmax(-1)
        else:
            tokens = exponential_race(x, self._noise(x.shape))
            if self._any_greedy:
                tokens = torch.where(self.greedy, x.argmax(-1), tokens)
        out = SampleOutput(tokens=tokens)
        if self._any_logprobs:
            raw = torch.log_softmax(logits.float(), -1)
            out.logprobs = raw.gather(1, tokens[:, None]).squeeze(1)
            if self._n_top > 0:
                values, ids = raw.topk(self._n_top, dim=-1)
                out.top_logprobs = (ids, values)
        return out

    def update(self, tokens: torch.Tensor) -> None:
        """Record the chosen tokens [B] for the penalties."""
        t = tokens.reshape(-1, 1).to(device=self.device, dtype=torch.long)
        if self.seen is not None:
            self.seen.scatter_(1, t, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, t, torch.ones(t.shape, dtype=self.counts.dtype, device=self.device))

    def is_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] bool: the token is one of its row's stop_token_ids."""
        return (tokens[:, None] == self.stop_ids).any(-1)

    def select_rows(self, rows: list[int]) -> "Sampler":
        """A sampler for the given rows (in that order), carrying their counts and generator states
        (the generators are shared, not copied: the old sampler should no longer be used)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        new = object.__new__(Sampler)
        new.__dict__.update(self.__dict__)
        new.params = [self.params[i] for i in rows]
        new.generators = [self.generators[i] for i in rows]
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "presence",
                     "frequency", "stop_ids", "seen", "counts"):
            t = getattr(self, name)
            setattr(new, name, None if t is None else t.index_select(0, index))
        new._set_flags()
        return new

    @staticmethod
    def concat(samplers: list["Sampler"]) -> "Sampler":
        """One sampler whose rows are the given samplers' rows in order (their generators and penalty
        state carried over, not copied: the inputs should no longer be used). Continuous batching
        uses it to add a newly prefilled request to the running batch."""
        first = samplers[0]
        new = object.__new__(Sampler)
        new.__dict__.update(first.__dict__)
        new.params = [p for s in samplers for p in s.params]
        new.generators = [g for s in samplers for g in s.generators]
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency"):
            setattr(new, name, torch.cat([getattr(s, name) for s in samplers]))
        width = max(s.stop_ids.shape[1] for s in samplers)
        new.stop_ids = torch.cat([torch.nn.functional.pad(s.stop_ids, (0, width - s.stop_ids.shape[1]), value=-1)
                                  for s in samplers])
        for name, dtype in (("seen", torch.bool), ("counts", torch.float32)):
            parts = [getattr(s, name) for s in samplers]
            if all(t is None for t in parts):
                setattr(new, name, None)
            else:  # rows without that penalty get an empty (inert) state
                setattr(new, name, torch.cat([
                    t if t is not None else torch.zeros(len(s), s.vocab_size, dtype=dtype, device=s.device)
                    for t, s in zip(parts, samplers)]))
        new._set_flags()
        return new

