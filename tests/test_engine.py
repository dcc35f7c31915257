"""The continuous-batching engine: requests joining and leaving between steps give each row exactly
its solo result; the prefix cache is exact; cancellation and the queue bound."""

from __future__ import annotations

import time

import pytest
import torch

import nemotron
from nemotron.errors import NemotronWarning
from nemotron.inference.engine import Engine, QueueFull
from nemotron.inference.requests import Request, ThinkingBudget
from nemotron.inference.steps import greedy_generate
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.inference.sampling import SamplingParams

from conftest import randomize_


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = nemotron.load(init_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0))
    randomize_(m.model, seed=3, scale=1.5)
    return m


def _prompts(n: int, seed: int, lengths=(5, 40, 17, 70, 3, 33, 64, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 260, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _run(engine: Engine, reqs: list[Request], max_steps: int = 10_000) -> int:
    for r in reqs:
        engine.submit(r)
    steps = 0
    while engine.running or engine.waiting or engine.prefilling:
        engine.step()
        steps += 1
        assert steps < max_steps
    return steps


def test_rows_equal_solo_runs_while_requests_come_and_go(tiny):
    prompts = _prompts(8, seed=1)
    budgets = [12, 3, 9, 12, 1, 7, 12, 5]
    solo = [greedy_generate(tiny.model, torch.tensor([p]), n)[0].tolist() for p, n in zip(prompts, budgets)]
    # 3 rows for 8 requests, prompts longer than the 16-token chunk: prefill interleaves with decode
    engine = Engine(tiny.model, max_batch=3, max_len=128, prefill_chunk=16)
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, budgets)]
    _run(engine, reqs)
    assert [r.output_ids for r in reqs] == solo
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.stats.generation_tokens == sum(budgets)
    # requests added while others run
    more = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts[:4], budgets[:4])]
    engine.submit(more[0])
    for _ in range(5):
        engine.step()
    _run(engine, more[1:])
    assert [r.output_ids for r in more] == solo[:4]


def test_prefix_cache_is_exact(tiny):
    shared = _prompts(1, seed=2, lengths=(70,))[0]
    prompts = [shared + tail for tail in _prompts(4, seed=3, lengths=(6, 1, 20, 40))] + [shared]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)

    def outputs(prefix_cache_bytes: int, rounds: int, max_batch: int = 1) -> tuple[list, Engine]:
        engine = Engine(tiny.model, max_batch=max_batch, max_len=160, prefill_chunk=16,
                        prefix_cache_bytes=prefix_cache_bytes)
        results = []
        for _ in range(rounds):
            reqs = [Request(p, params) for p in prompts]
            _run(engine, reqs)
            results.append([(r.output_ids, [lp["logprob"] for lp in r.logprobs], r.cached_tokens) for r in reqs])
        return results, engine

    # one row at a time: nothing but the cache differs, and the log-probs are bit-identical
    (plain,), _ = outputs(0, 1)
    cached, engine = outputs(1 << 24, 2)
    for got in cached:
        assert [g[:2] for g in got] == [p[:2] for p in plain]
    # round 2 resumes at the last whole 16-token block that leaves a token to run: (len - 1) // 16 * 16
    assert [c[2] for c in cached[1]] == [(len(p) - 1) // 16 * 16 for p in prompts] == [64, 64, 80, 96, 64]
    assert [c[2] for c in cached[0]] == [0, 64, 64, 64, 64]   # round 1: the shared 64 after the first
    assert engine.prefix_cache.hits > 0 and 0 < engine.prefix_cache.hit_rate < 1
    # batched, rows meet different neighbours with and without the cache (float sums may differ in
    # the last bits, as in any batched engine); the greedy tokens are the same
    batched, _ = outputs(1 << 24, 2, max_batch=3)
    for got in batched:
        assert [g[0] for g in got] == [p[0] for p in plain]


def test_prefix_cache_respects_its_budget(tiny):
    engine = Engine(tiny.model, max_batch=2, max_len=160, prefill_chunk=16, prefix_cache_bytes=40_000)
    _run(engine, [Request(p, SamplingParams(max_new_tokens=2, temperature=0)) for p in _prompts(6, seed=4)])
    assert 0 < engine.prefix_cache.bytes <= 40_000


def test_cancel_frees_the_row_and_the_queue_is_bounded(tiny):
    engine = Engine(tiny.model, max_batch=2, max_len=160, prefill_chunk=16, max_waiting=2)
    long = [Request(p, SamplingParams(max_new_tokens=100, temperature=0)) for p in _prompts(2, seed=5)]
    for r in long:
        engine.submit(r)
    for _ in range(8):
        engine.step()
    assert len(engine.running) == 2
    waiting = [Request(p, SamplingParams(max_new_tokens=3, temperature=0)) for p in _prompts(2, seed=6)]
    for r in waiting:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(Request([5, 6], SamplingParams(max_new_tokens=3)))
    engine.cancel(long[0])
    engine.step()
    assert long[0] not in engine.running and long[0].finish_reason is None
    _run(engine, [])
    solo = [greedy_generate(tiny.model, torch.tensor([r.prompt_ids]), 3)[0].tolist() for r in waiting]
    assert [r.output_ids for r in waiting] == solo and len(long[1].output_ids) == 100


def test_mtp_speculation_in_the_engine_is_exact(tiny):
    """Greedy rows speculate with the MTP block (drafts verified in one forward, Mamba state rolled
    back); a sampled row in the batch switches the batch to plain decoding until it leaves. The greedy
    outputs equal their solo runs either way."""
    prompts = _prompts(6, seed=7)
    solo = [greedy_generate(tiny.model, torch.tensor([p]), 10)[0].tolist() for p in prompts]
    engine = Engine(tiny.model, max_batch=3, max_len=128, prefill_chunk=16, speculative_tokens=2)
    reqs = [Request(p, SamplingParams(max_new_tokens=10, temperature=0)) for p in prompts]
    reqs.insert(2, Request(prompts[0], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)))
    _run(engine, reqs)
    assert [r.output_ids for i, r in enumerate(reqs) if i != 2] == solo
    assert len(reqs[2].output_ids) == 4
    st = engine.spec_stats
    assert st.rounds > 0 and st.drafted == 2 * st.rounds and 0 <= st.accepted <= st.drafted
    # one rule wherever an engine is made (the server included): speculation turns the prefix cache off
    with pytest.warns(NemotronWarning, match="prefix cache is off"):
        assert Engine(tiny.model, speculative_tokens=2, prefix_cache_bytes=1 << 20).prefix_cache is None


def test_bad_requests_raise(tiny):
    engine = Engine(tiny.model, max_batch=1, max_len=32)
    with pytest.raises(ValueError, match="context length"):
        engine.submit(Request(list(range(3, 30)), SamplingParams(max_new_tokens=10)))
    with pytest.raises(ValueError, match="out of range"):
        engine.submit(Request([10 ** 6], SamplingParams(max_new_tokens=1)))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], SamplingParams(max_new_tokens=1)))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.submit(Request([5], SamplingParams(max_new_tokens=1, stop_token_ids=[engine.vocab_size])))
    with pytest.raises(ValueError, match="seed"):
        engine.submit(Request([5], SamplingParams(max_new_tokens=1, seed=2 ** 64)))


def test_decode_threads_leave_a_core_to_http_unless_weights_stream_from_memory():
    """The server's default decode threads: all cores but one for a cache-sized model, every core for
    one whose weights (>= 128 MiB) are read from memory at each step."""
    from nemotron.serve.app import STREAMED_WEIGHT_BYTES, decode_threads

    small = torch.nn.Linear(192, 192)
    with torch.device("meta"):  # sized, never allocated
        big = torch.nn.Linear(8192, 8192)
    assert sum(p.numel() * p.element_size() for p in big.parameters()) >= STREAMED_WEIGHT_BYTES
    assert decode_threads(small, 2) == 1 and decode_threads(small, 16) == 15 and decode_threads(small, 1) == 1
    assert decode_threads(big, 2) == 2 and decode_threads(big, 16) == 16
    packed = torch.nn.Module()   # a quantized model's weights are buffers
    packed.register_buffer("weight", torch.empty(8192, 16384, dtype=torch.uint8, device="meta"))
    assert decode_threads(packed, 2) == 2


def test_engine_thread_uses_its_own_thread_counts(tiny):
    """Decode steps run with `threads`, prefill chunks with `prefill_threads`, set by the engine's own
    thread (OpenMP keeps the count per OS thread: the creator's setting does not carry over)."""
    import threading

    seen = []   # (tokens per row, torch threads, OS thread) for every forward
    hook = tiny.model.backbone.embeddings.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].shape[1], torch.get_num_threads(), threading.get_ident())))
    before = torch.get_num_threads()
    try:
        engine = Engine(tiny.model, max_batch=2, max_len=128, prefill_chunk=16, threads=1, prefill_threads=2).start()
        done = threading.Event()
        req = Request(_prompts(1, seed=5)[0], SamplingParams(max_new_tokens=4, temperature=0))
        engine.submit(req, on_event=lambda e: e.finished and done.set())
        assert done.wait(60)
        engine.shutdown()
    finally:
        hook.remove()
    assert torch.get_num_threads() == before          # the caller's setting is left alone
    prefill = {threads for t, threads, _ in seen if t > 1}
    decode = {threads for t, threads, _ in seen if t == 1}
    assert prefill == {2} and decode == {1}
    assert {ident for *_, ident in seen} == {engine._thread.ident}


# --------------------------------------------------------------------------------------------------
# one request's failure never hurts another
# --------------------------------------------------------------------------------------------------

MARK = 262   # a token only the victim's prompt holds (the others draw from 3..259), not a special one


class _FaultyBackend:
    """The tokenizer backend, whose decode fails when the ids hold MARK: the victim's first token
    (decoded with the end of its prompt as context) cannot be detokenized, nobody else's can."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def decode(self, ids, **kw):
        if MARK in ids:
            raise RuntimeError("injected detokenizer failure")
        return self._backend.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self._backend, name)


class _FaultyTokenizer:
    def __init__(self, tokenizer) -> None:
        self.backend = _FaultyBackend(tokenizer.backend)


class _ExplodingBudget(ThinkingBudget):
    """A thinking budget that fails on the request's 4th token: a failure mid-stream."""

    def observe(self, token: int, text: str) -> None:
        self.spent += 1
        if self.spent >= 4:
            raise RuntimeError("injected token acceptance failure")


def _inject(stage: str, engine: Engine, model, victim: Request):
    """Make `stage` fail for `victim` (or, for a batched decode, for the batch holding it) by breaking
    a collaborator of the engine; returns an undo callable and a list that collects the requests of
    the failed batch."""
    batch: list[Request] = []
    if stage == "admission":
        lookup = engine.prefix_cache.lookup

        def failing_lookup(ids):
            if MARK in ids:
                raise RuntimeError("injected admission failure")
            return lookup(ids)

        engine.prefix_cache.lookup = failing_lookup
        return (lambda: delattr(engine.prefix_cache, "lookup")), batch
    if stage == "sampler":   # a seed torch refuses, set after submit() validated the params
        victim.params = SamplingParams(max_new_tokens=victim.params.max_new_tokens, temperature=0, seed=2 ** 64)
        return (lambda: None), batch
    if stage == "detokenize":
        tokenizer, engine.tokenizer = engine.tokenizer, _FaultyTokenizer(engine.tokenizer)
        return (lambda: setattr(engine, "tokenizer", tokenizer)), batch
    if stage == "token acceptance":
        victim.thinking_budget = _ExplodingBudget(1 << 40, [], [], None, active=False)
        return (lambda: None), batch

    def hook(module, args):
        ids = args[0]
        if stage == "prefill" and ids.shape[1] > 1 and bool((ids == MARK).any()):
            raise RuntimeError("injected prefill failure")
        # a decode forward of the batch holding the victim, while another request is mid-prefill
        if stage == "decode" and ids.shape[1] == 1 and victim in engine.running and engine.prefilling is not None \
                and not batch:
            batch.extend(engine.running)
            raise RuntimeError("injected decode failure")

    handle = model.backbone.embeddings.register_forward_pre_hook(hook)
    return handle.remove, batch


# how the engine names each stage in Request.error
_STAGE_LABELS = {"admission": "admission", "prefill": "prefill", "sampler": "joining the batch", "decode": "decode",
                 "detokenize": "token acceptance", "token acceptance": "token acceptance"}


@pytest.fixture(scope="module")
def fault_prompts(tiny):
    """Six prompts, the third (the victim's) holding MARK, and their solo greedy outputs."""
    prompts = _prompts(6, seed=8, lengths=(5, 9, 23, 70, 30, 40))
    prompts[2] = prompts[2][:20] + [MARK] + prompts[2][20:]   # MARK in the second prefill chunk
    prompts[2][-1] = MARK                                     # and in the detokenizer's context
    return prompts, [greedy_generate(tiny.model, torch.tensor([p]), 12)[0].tolist() for p in prompts]


@pytest.mark.parametrize("stage", list(_STAGE_LABELS))
def test_a_failure_at_any_stage_fails_only_the_requests_it_hits(tiny, fault_prompts, stage):
    """A failure while admitting, prefilling, building the sampler of, decoding or detokenizing one
    request ends that request (finish_reason "error", with the reason) -- for a batched decode
    forward, the requests of that batch -- while every other request, including one mid-prefill,
    finishes with its solo output, and the engine serves a normal request afterwards."""
    prompts, solo = fault_prompts
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4, max_len=128, prefill_chunk=16,
                    prefix_cache_bytes=1 << 22)
    reqs = [Request(p, SamplingParams(max_new_tokens=12, temperature=0)) for p in prompts]
    victim = reqs[2]
    for r in reqs:
        engine.submit(r)
    undo, batch = _inject(stage, engine, tiny.model, victim)
    events = []
    try:
        steps = 0
        while engine.running or engine.waiting or engine.prefilling:
            events += engine.step()
            steps += 1
            assert steps < 1000
    finally:
        undo()
    failed = batch if stage == "decode" else [victim]
    assert victim in failed and (stage != "decode" or len(failed) > 1)
    for r, want in zip(reqs, solo):
        if r in failed:
            assert r.finish_reason == "error" and r.error.startswith(f"{_STAGE_LABELS[stage]} failed: "), r.error
            assert ("seed must be" if stage == "sampler" else "injected") in r.error, r.error
            assert [e for e in events if e.request is r][-1].finished   # its client hears of it
        else:
            assert (r.output_ids, r.finish_reason, r.error) == (want, "length", None)
    assert engine.stats.finished["error"] == len(failed) and engine.error is None
    if stage == "token acceptance":
        assert len(victim.output_ids) == 4   # it failed mid-stream
    # the engine is whole: the victim's prompt, now without a fault, gets its solo output
    again = Request(prompts[2], SamplingParams(max_new_tokens=12, temperature=0))
    _run(engine, [again])
    assert again.output_ids == solo[2] and again.finish_reason == "length"


def test_the_engine_thread_survives_a_failing_request(tiny):
    """On the engine's own thread (the server's setup): a request whose sampler cannot be built (the
    seed that once stopped the server) gets its final event with finish_reason "error"; a request
    running beside it and one whose event callback raises do not take the engine down; the engine
    stays up (no `error`, the thread alive) and answers the next request."""
    import threading

    prompts = _prompts(3, seed=9)
    solo = greedy_generate(tiny.model, torch.tensor([prompts[0]]), 30)[0].tolist()
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4, max_len=128, prefill_chunk=16).start()
    try:
        done = {}

        def watch(name):
            def on_event(event):
                if event.finished:
                    done[name].set()
            return on_event

        def broken_consumer(event):
            raise RuntimeError("a broken consumer")

        bystander = Request(prompts[0], SamplingParams(max_new_tokens=30, temperature=0))
        victim = Request(prompts[1], SamplingParams(max_new_tokens=30, temperature=1.0, seed=7))
        careless = Request(prompts[2], SamplingParams(max_new_tokens=30, temperature=0))
        for name, r in (("bystander", bystander), ("victim", victim)):
            done[name] = threading.Event()
            engine.submit(r, watch(name))
        victim.params.seed = 2 ** 64   # passes submit(); the engine thread meets it
        engine.submit(careless, broken_consumer)
        assert done["victim"].wait(60) and done["bystander"].wait(60)
        assert victim.finish_reason == "error" and "seed must be" in victim.error
        assert bystander.output_ids == solo and bystander.finish_reason == "length"
        assert engine.error is None and engine._thread.is_alive()
        deadline = time.monotonic() + 60
        while engine.num_running:   # the broken consumer's request was dropped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        again = Request(prompts[0], SamplingParams(max_new_tokens=30, temperature=0))
        done["again"] = threading.Event()
        engine.submit(again, watch("again"))
        assert done["again"].wait(60) and again.output_ids == solo
    finally:
        engine.shutdown()


def test_a_failure_in_the_engines_own_bookkeeping_resets_it_and_keeps_the_queue(tiny, fault_prompts):
    """The last line of defence: a failure outside the per-request guards (here the cache refusing to
    move a row when a request leaves) fails the admitted requests, empties the cache, and leaves the
    queue to be served with exact outputs; the engine stays up."""
    prompts, solo = fault_prompts
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=2, max_len=128, prefill_chunk=16)
    short, long, queued = (Request(prompts[0], SamplingParams(max_new_tokens=3, temperature=0)),
                           Request(prompts[1], SamplingParams(max_new_tokens=12, temperature=0)),
                           Request(prompts[4], SamplingParams(max_new_tokens=12, temperature=0)))

    def broken_move(src, dst):
        raise RuntimeError("injected cache failure")

    engine.cache.move_row = broken_move   # `short` leaves first: row 1 would move into row 0
    try:
        events = []
        for r in (short, long, queued):
            engine.submit(r)
        while short.finish_reason is None:
            events += engine.step()
    finally:
        del engine.cache.move_row
    _run(engine, [])
    assert (short.finish_reason, long.finish_reason) == ("error", "error") and "injected" in long.error
    assert {id(e.request) for e in events if e.finished} >= {id(short), id(long)}   # their clients hear of it
    assert queued.output_ids == solo[4] and queued.finish_reason == "length" and engine.error is None
    again = Request(prompts[1], SamplingParams(max_new_tokens=12, temperature=0))
    _run(engine, [again])
    assert again.output_ids == solo[1]


def test_prompts_of_one_length_prefill_together_and_equal_solo_runs(tiny):
    """`prefill_batch` lets waiting prompts of one length share each prefill forward; a request
    cancelled in the middle of such a group leaves it without disturbing the others, and `run`
    gives every request its solo result with events indexed by the request's position."""
    g = torch.Generator().manual_seed(11)
    # groups [9, 9], [5, 5], [23, 23]: the last one is still prefilling when rows of the first finish,
    # so its rows move down while it prefills
    lengths, budgets = (9, 9, 5, 23, 5, 23), (8, 3, 8, 5, 2, 8)
    prompts = [torch.randint(3, 260, (n,), generator=g).tolist() for n in lengths]
    solo = [greedy_generate(tiny.model, torch.tensor([p]), n)[0].tolist() for p, n in zip(prompts, budgets)]
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, budgets)]
    engine = Engine.for_requests(tiny.model, reqs, prefill_chunk=4)
    seen = {}
    for event in engine.run(reqs):
        seen.setdefault(event.index, []).append(event.token_id)
    assert [r.output_ids for r in reqs] == solo
    assert [seen[i] for i in range(len(reqs))] == solo
    solo = [greedy_generate(tiny.model, torch.tensor([p]), 8)[0].tolist() for p in prompts]
    # the two prompts of length 9 prefill as one group over three 4-token chunks; one is cancelled
    engine = Engine(tiny.model, max_batch=4, max_len=64, prefill_chunk=4, prefill_batch=4)
    reqs = [Request(p, SamplingParams(max_new_tokens=8, temperature=0)) for p in prompts]
    for r in (reqs[0], reqs[1], reqs[2], reqs[4], reqs[3], reqs[5]):   # [9, 9] then [5, 5], [23, 23]
        engine.submit(r)
    engine.step()
    assert [r.prompt_ids for r in engine.prefilling] == [prompts[0], prompts[1]]
    engine.cancel(reqs[1])
    engine.step()
    assert [r.prompt_ids for r in engine.prefilling] == [prompts[0]]
    _run(engine, [])
    assert reqs[1].output_ids == [] and reqs[1].finish_reason is None
    assert [r.output_ids for i, r in enumerate(reqs) if i != 1] == [s for i, s in enumerate(solo) if i != 1]
