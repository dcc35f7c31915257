"""Generation: batched greedy decoding against transformers, chunked prefill, MTP speculation,
the thinking budget, logprobs and stop handling."""

from __future__ import annotations

import pytest
import torch

import nemotron
from nemotron.errors import NemotronWarning
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request
from nemotron.inference.steps import greedy_generate, prefill
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.inference.sampling import SamplingParams

from conftest import randomize_

DENSE = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]
MOE = ["linear_attention", "moe", "full_attention", "linear_attention", "moe"]
PROMPT_LENGTHS = (3, 11, 26)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _batched(model, prompts, new_tokens, **kw) -> list[list[int]]:
    reqs = [Request(p, SamplingParams(max_new_tokens=new_tokens, temperature=0)) for p in prompts]
    list(Engine.for_requests(model, reqs, **kw).run(reqs))
    return [r.output_ids for r in reqs]


def _hf_single(hf, prompt, new_tokens) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("layers", [DENSE, MOE], ids=["dense", "moe"])
def test_batched_greedy_equals_transformers_nemotron_h(make_hf_nemotron_h, layers):
    path, hf = make_hf_nemotron_h(layers_block_type=layers, moe_latent_size=32)
    model = nemotron.load(path).model
    prompts = _prompts(96)
    ours = _batched(model, prompts, 10)
    for prompt, row in zip(prompts, ours):
        assert row == _hf_single(hf, prompt, 10)


def test_batched_greedy_equals_transformers_nemotron4(tmp_path):
    from transformers import NemotronConfig, NemotronForCausalLM

    cfg = NemotronConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = randomize_(NemotronForCausalLM(cfg), scale=1.5).eval()
    hf.save_pretrained(tmp_path / "n4")
    model = nemotron.load(tmp_path / "n4").model
    prompts = _prompts(96, seed=1)
    for prompt, row in zip(prompts, _batched(model, prompts, 10)):
        assert row == _hf_single(hf, prompt, 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Nemotron 3 Super-layout checkpoint (Mamba, attention, LatentMoE, MTP), randomised
    strongly enough that greedy continuations vary."""
    path = init_checkpoint(tmp_path_factory.mktemp("tiny"), toy_super_config(), seed=0)
    m = nemotron.load(path)
    randomize_(m.model, seed=3, scale=1.5)
    return m


def test_chunked_prefill_matches_one_shot(tiny):
    model = tiny.model
    ids = torch.randint(3, 260, (1, 70), generator=torch.Generator().manual_seed(0))
    ref_cache = model.new_cache(1, 80)
    ref = prefill(model, ids, ref_cache, chunk=ids.shape[1])
    ref_next = model(torch.tensor([[5]]), ref_cache)
    for chunk in (1, 7, 64):
        cache = model.new_cache(1, 80)
        got = prefill(model, ids, cache, chunk=chunk)
        assert (got - ref).abs().max() <= 1e-4, chunk
        assert (model(torch.tensor([[5]]), cache) - ref_next).abs().max() <= 1e-4, chunk


def test_reused_cache_row_does_not_read_the_previous_sequence(tiny):
    """A row restarted at position 0 ignores whatever conv/SSM/KV state its last sequence left."""
    model = tiny.model
    ids = torch.randint(3, 260, (1, 19), generator=torch.Generator().manual_seed(5))
    fresh = prefill(model, ids, model.new_cache(1, 40))
    used = model.new_cache(1, 40)
    prefill(model, torch.randint(3, 260, (1, 23), generator=torch.Generator().manual_seed(6)), used)
    used.seq_lens.zero_()
    assert torch.equal(prefill(model, ids, used), fresh)


def test_mixed_batch_rows_equal_single_runs(tiny):
    prompts = _prompts(260, seed=2)
    singles = [greedy_generate(tiny.model, torch.tensor([p]), 12)[0].tolist() for p in prompts]
    assert _batched(tiny.model, prompts, 12) == singles
    # rows of different budgets leave the batch at different steps
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, (2, 12, 5))]
    list(Engine.for_requests(tiny.model, reqs).run(reqs))
    assert [r.output_ids for r in reqs] == [s[:n] for s, n in zip(singles, (2, 12, 5))]
    assert [r.finish_reason for r in reqs] == ["length"] * 3


def test_chat_batch_equals_one_chat_per_conversation(tiny):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    conversations = [[{"role": "user", "content": q}] for q in ("Hi", "What is 2 + 3?", "Sort 3, 1, 2 please.")]
    for kwargs in ({"enable_thinking": True}, {"enable_thinking": False}, {"tools": tools}):
        batch = tiny.chat_batch(conversations, max_new_tokens=10, **kwargs)
        singles = [tiny.chat(c, max_new_tokens=10, **kwargs) for c in conversations]
        assert [(r.text, r.reasoning, r.content, r.finish_reason, r.completion_tokens) for r in batch] == \
            [(r.text, r.reasoning, r.content, r.finish_reason, r.completion_tokens) for r in singles]


def test_mtp_speculation_is_exact(tiny):
    prompts = _prompts(260, seed=4)
    plain = _batched(tiny.model, prompts, 14)
    for k in (1, 3):
        reqs = [Request(p, SamplingParams(max_new_tokens=14, temperature=0)) for p in prompts]
        engine = Engine.for_requests(tiny.model, reqs, speculative_tokens=k)
        list(engine.run(reqs))
        assert [r.output_ids for r in reqs] == plain
        assert engine.spec_stats.rounds > 0 and engine.spec_stats.drafted > 0


def _bigram_model(m, successor: dict[int, int], default_next: int):
    """Zero every mixer's output so the hidden state is the token embedding, then wire embeddings and
    lm_head so token t is always followed by successor[t] (others by default_next). The MTP block is
    wired the same way from the *next* token, so its drafts are always right."""
    model = m.model
    h = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj", "down_proj.weight",
                              "fc2_latent_proj.weight")):
                p.zero_()
        emb = model.backbone.embeddings.weight
        emb.zero_()
        head = model.lm_head.weight
        head.zero_()
        dims = {}
        for t in list(successor) + [None]:
            dims[t] = len(dims)
        assert len(dims) <= h
        for t, d in dims.items():
            if t is None:
                emb[[i for i in range(emb.shape[0]) if i not in successor], d] = 1.0
            else:
                emb[t, d] = 1.0
            head[successor.get(t, default_next), d] = 10.0
        if model.mtp is not None:
            first = model.mtp.layers[0]
            first.eh_proj.weight.zero_()
            first.eh_proj.weight[:, :h] = torch.eye(h)
            for layer in model.mtp.layers:
                layer.norm.weight.fill_(1.0)
        for layer in model.backbone.layers:
            layer.norm.weight.fill_(1.0)
        model.backbone.norm_f.weight.fill_(1.0)
    return m


@pytest.fixture
def counting(tmp_path):
    """A bigram model counting a b c d a b ... (token ids of the byte tokenizer)."""
    path = init_checkpoint(tmp_path / "bigram", toy_super_config(), seed=0)
    m = nemotron.load(path)
    a, b, c, d = (m.tokenizer.encode(ch)[0] for ch in "abcd")
    return _bigram_model(m, {a: b, b: c, c: d, d: a}, default_next=a), (a, b, c, d)


def test_mtp_always_right_drafts_accept_k_plus_one(counting):
    m, (a, b, c, d) = counting
    prompt = [a, b]
    calls = {"n": 0}
    forward = m.model.hidden_states

    def counted(*args, **kw):
        calls["n"] += 1
        return forward(*args, **kw)

    m.model.hidden_states = counted
    plain = _batched(m.model, [prompt], 13)
    plain_calls = calls["n"]
    assert plain[0] == [c, d, a, b, c, d, a, b, c, d, a, b, c]
    calls["n"] = 0
    k = 3
    reqs = [Request(prompt, SamplingParams(max_new_tokens=13, temperature=0))]
    engine = Engine.for_requests(m.model, reqs, speculative_tokens=k)
    list(engine.run(reqs))
    assert reqs[0].output_ids == plain[0]
    stats = engine.spec_stats
    assert stats.accepted == stats.drafted            # every draft right
    assert stats.acceptance_length == k + 1           # k drafts + 1 per verify forward
    # plain: one prefill + 12 decode forwards; speculative: prefill + ceil((13 - 1) / (k + 1)) verifies
    assert plain_calls == 13 and calls["n"] == 1 + 3


def test_thinking_budget_closes_never_ending_reasoning(tmp_path):
    """A model that never emits </think>: the budget forces it within budget + grace, and the answer
    (the text after </think>) follows."""
    path = init_checkpoint(tmp_path / "rambler", toy_super_config(), seed=0)
    m = nemotron.load(path)
    a, b, nl = (m.tokenizer.encode(ch)[0] for ch in "ab\n")
    # a b b b ... (no newline for a while) then a newline every 9 tokens is not possible with a bigram,
    # so use two chains: "a b b b ..." never ends a line (exercises the grace cut)
    _bigram_model(m, {a: b, b: b}, default_next=a)
    messages = [{"role": "user", "content": "go"}]
    free = m.chat(messages, max_new_tokens=60)
    assert free.content is None and free.reasoning and "</think>" not in free.text
    result = m.chat(messages, max_new_tokens=60, thinking_budget=10)
    reasoning_tokens = m.tokenizer.encode(result.text.split("</think>")[0])
    assert "</think>" in result.text
    grace = max(8, 10 // 10)
    assert len(reasoning_tokens) <= 10 + grace + 1      # + the forced newline before </think>
    assert result.content and set(result.content) <= {"a", "b"}
    # a model that ends lines: the budget cuts at the first line end after it is spent
    _bigram_model(m, {a: b, b: nl, nl: a}, default_next=a)
    result = m.chat(messages, max_new_tokens=40, thinking_budget=4)
    head, _, tail = result.text.partition("</think>")
    assert head.endswith("\n") and len(m.tokenizer.encode(head)) <= 4 + 3
    assert result.content


def test_logprobs_stop_strings_and_seed(tiny):
    prompt = _prompts(260, seed=5)[1]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    req = Request(prompt, params)
    list(Engine.for_requests(tiny.model, [req], tiny.tokenizer).run([req]))
    with torch.no_grad():
        first = torch.log_softmax(tiny.model(torch.tensor([prompt]))[0, -1], -1)
    assert req.logprobs[0]["token_id"] == req.output_ids[0] == int(first.argmax())
    assert req.logprobs[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-5)
    assert [t for t, _ in req.logprobs[0]["top"]] == first.topk(3).indices.tolist()
    # same seed, same sample; a stop string cuts the text before it
    out1 = tiny.generate("Hello", max_new_tokens=10, temperature=1.0, seed=7)
    out2 = tiny.generate("Hello", max_new_tokens=10, temperature=1.0, seed=7)
    assert out1 == out2
    stop = out1[3:5]
    cut = tiny.generate("Hello", max_new_tokens=10, temperature=1.0, seed=7, stop=[stop])
    assert cut == out1[:out1.index(stop)]


def test_compiled_decode_matches_eager(tiny):
    """The torch.compile decode path (the KV window up to the longest row under a mask, tensor
    positions, gathered experts) picks the same tokens as eager decoding, as rows leave the batch and
    as the window grows past a multiple of STATIC_WINDOW (a prompt of 125 tokens decoding 6)."""
    from nemotron.inference.engine import STATIC_WINDOW

    assert STATIC_WINDOW == 128
    prompts = _prompts(260, seed=6)[:2] + [list(range(3, 128))]
    budgets = (4, 9, 6)
    eager = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, budgets)]
    list(Engine.for_requests(tiny.model, eager).run(eager))
    compiled = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, budgets)]
    list(Engine.for_requests(tiny.model, compiled, compile=True).run(compiled))
    assert [r.output_ids for r in compiled] == [r.output_ids for r in eager]


def test_compiled_engines_of_different_caches_interleave(tiny):
    """Two engines on one model's compiled step, caches of different layouts (the model dtype's KV
    and FP8 KV: two graphs), stepped in turn: each picks the tokens it picks alone. After a cache's
    first step in a batch the guards that tell the graphs apart are the only ones evaluated
    (`CompiledDecode`); they must still send each step to its own cache's graph."""
    from nemotron.layers.cache import CacheOptions

    prompts = _prompts(60, seed=8)[:1]   # batch 1: the model dtype's graph is test_compiled_decode_matches_eager's

    def engine(kv: str, reqs):
        return Engine(tiny.model, max_batch=1, max_len=64, compile=True, cache_options=CacheOptions(kv_dtype=kv))

    alone, engines, turns = [], [], []
    for kv in ("auto", "fp8"):
        reqs = [Request(p, SamplingParams(max_new_tokens=6, temperature=0)) for p in prompts]
        list(engine(kv, reqs).run(reqs))
        alone.append([r.output_ids for r in reqs])
        turns.append([Request(p, SamplingParams(max_new_tokens=6, temperature=0)) for p in prompts])
        engines.append(engine(kv, turns[-1]))
        for r in turns[-1]:
            engines[-1].submit(r)
    while any(e.running or e.waiting or e.prefilling for e in engines):
        for e in engines:
            e.step()
    assert [[r.output_ids for r in reqs] for reqs in turns] == alone
    kv = [{s.k.dtype for s in e.cache.layers if hasattr(s, "k")} for e in engines]
    assert kv[0] != kv[1] and torch.float8_e4m3fn in kv[1]   # two graphs


def test_default_rule_switches_to_the_compiled_step_between_batches(tiny, monkeypatch):
    """By default (NEMOTRON_COMPILE unset) a model decodes eagerly until it has spent COMPILE_AFTER_S
    seconds in eager steps; the engine's next batch then starts on the compiled step and picks the
    same tokens. compile= and NEMOTRON_COMPILE override the rule; a bad setting is refused."""
    from nemotron.inference import steps

    model = tiny.model
    monkeypatch.delenv("NEMOTRON_COMPILE", raising=False)
    compiled = steps.compiled_decode_step(model)   # graphs of test_compiled_decode_matches_eager, if it ran
    monkeypatch.delitem(model.__dict__, "_compiled_decode")
    monkeypatch.setitem(model.__dict__, "_eager_decode_s", 0.0)
    assert steps.compile_blocker(model) is None
    assert not steps.use_compiled_decode(model) and steps.use_compiled_decode(model, True)
    assert steps.use_compiled_decode(model, long_run=True)

    prompts = _prompts(260, seed=8)[:2]
    engine = Engine(model, max_batch=2, max_len=64)
    first = [Request(p, SamplingParams(max_new_tokens=6, temperature=0)) for p in prompts]
    list(engine.run(first))
    assert engine.compiled_step is None and steps.eager_decode_seconds(model) > 0
    # the model has now decoded eagerly for as long as a compile takes (here: the threshold is lowered)
    monkeypatch.setattr(steps, "COMPILE_AFTER_S", steps.eager_decode_seconds(model))
    monkeypatch.setitem(model.__dict__, "_compiled_decode", compiled)
    second = [Request(p, SamplingParams(max_new_tokens=6, temperature=0)) for p in prompts]
    list(engine.run(second))
    assert engine.compiled_step is compiled and compiled.compile_seconds
    assert [r.output_ids for r in second] == [r.output_ids for r in first]

    assert not steps.use_compiled_decode(model, False)
    monkeypatch.setenv("NEMOTRON_COMPILE", "0")
    assert not steps.use_compiled_decode(model, long_run=True) and Engine(model, max_batch=1, max_len=8).warm_up() == {}
    monkeypatch.setenv("NEMOTRON_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="NEMOTRON_COMPILE='sometimes'"):
        steps.use_compiled_decode(model)


def test_a_failed_compile_falls_back_to_eager_under_the_default_rule(tiny, monkeypatch):
    """Where compiling the decode step fails (here: the compiler raises), the default rule decodes
    eagerly from then on with a warning and the same tokens; a compile that was asked for raises."""
    from nemotron.inference import steps

    model = tiny.model
    monkeypatch.delenv("NEMOTRON_COMPILE", raising=False)
    prompt = _prompts(260, seed=9)[:1]
    eager = [Request(prompt[0], SamplingParams(max_new_tokens=5, temperature=0))]
    list(Engine.for_requests(model, eager, compile=False).run(eager))

    def fails(fn, **kwargs):
        def compile_error(*args):
            raise RuntimeError("no compiler here")
        return compile_error

    monkeypatch.setattr(torch, "compile", fails)
    monkeypatch.delitem(model.__dict__, "_compiled_decode", raising=False)
    monkeypatch.setitem(model.__dict__, "_eager_decode_s", steps.COMPILE_AFTER_S)
    asked = [Request(prompt[0], SamplingParams(max_new_tokens=5, temperature=0))]
    with pytest.raises(RuntimeError, match="no compiler here"):
        list(Engine.for_requests(model, asked, compile=True).run(asked))
    monkeypatch.delitem(model.__dict__, "_compiled_decode", raising=False)
    default = [Request(prompt[0], SamplingParams(max_new_tokens=5, temperature=0))]
    engine = Engine.for_requests(model, default)
    assert engine.compiled_step is not None
    with pytest.warns(NemotronWarning, match="compiling the decode step failed: RuntimeError: no compiler here"):
        list(engine.run(default))
    assert default[0].output_ids == eager[0].output_ids and engine.compiled_step is None
    assert "failed" in steps.compile_blocker(model)
    monkeypatch.delitem(model.__dict__, "_compile_failed")


def test_static_decode_path_matches_dynamic(tmp_path, tiny):
    """The static-shape decode (tensor positions, whole KV buffer with a mask) that torch.compile
    traces gives the same logits as the normal decode, for rows at different lengths, in both the
    hybrid and the rotary (Nemotron-4) families."""
    from transformers import NemotronConfig, NemotronForCausalLM

    cfg = NemotronConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    randomize_(NemotronForCausalLM(cfg)).save_pretrained(tmp_path / "n4")
    for model in (tiny.model, nemotron.load(tmp_path / "n4").model):
        prompts = [list(range(3, 3 + n)) for n in (4, 9)]
        caches = []
        for _ in range(2):
            cache = model.new_cache(2, 16)
            for row, p in enumerate(prompts):
                prefill(model, torch.tensor([p]), cache.rows(row))
            caches.append(cache)
        tokens = torch.tensor([[7], [8]])
        with torch.no_grad():
            dynamic = model(tokens, caches[0])[:, -1]
            static = model(tokens, caches[1], mode="static", positions=caches[1].seq_lens.clone())[:, -1]
        assert (dynamic - static).abs().max() <= 1e-5


def test_bad_requests_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="out of range"):
        reqs = [Request([1, 10_000], SamplingParams(max_new_tokens=2))]
        list(Engine.for_requests(tiny.model, reqs).run(reqs))
    with pytest.raises(ValueError, match="empty prompt"):
        reqs = [Request([], SamplingParams(max_new_tokens=2))]
        list(Engine.for_requests(tiny.model, reqs).run(reqs))
    with pytest.raises(ValueError, match="top_p"):
        reqs = [Request([1, 2], SamplingParams(max_new_tokens=2, top_p=0.0))]
        list(Engine.for_requests(tiny.model, reqs).run(reqs))


def test_compiled_step_that_breaks_its_graph_runs_eagerly():
    """A step that reads a value to the host (as a large batch's MoE dispatch reads its expert
    counts) cannot be one graph: it runs eagerly, each call once (the cache updated once), with the
    eager result. A one-graph step that needs another graph mid-batch (its guards skipped) finds it."""
    from nemotron.inference.steps import CompiledDecode

    class HostRead(torch.nn.Module):
        def forward(self, ids, cache, mode, positions):
            cache += 1   # the step's state update, before the host read
            x = ids.float()[..., None] + cache
            for _ in range(int(positions.max()) % 3):   # a host read: a graph break
                x = x * 2
            return x

    class OneGraph(torch.nn.Module):
        def forward(self, ids, cache, mode, positions):
            cache += 1
            return ids.float()[..., None] + cache * positions.max()   # positions' values: no guard

    ids = torch.tensor([[1], [2]])
    step, cache, source = CompiledDecode(HostRead()), torch.zeros(2, 1, 4), object()
    for t in range(5):
        out = step(ids, cache, torch.tensor([t, 0]), source=source)
        assert torch.equal(out, (ids.float() + t + 1).expand(2, 4) * 2 ** (t % 3)), t
    assert step.graph_breaks == {"batch 2-16"}
    step, cache = CompiledDecode(OneGraph()), torch.zeros(2, 1, 4)
    for t in range(3):
        assert torch.equal(step(ids, cache, torch.tensor([t, 0]), source=source), (ids.float() + (t + 1) * t).expand(2, 4))
    out = step(ids, cache.double(), torch.tensor([1, 0]), source=source)   # another graph: a float64 state
    assert not step.graph_breaks and out.shape == (2, 4)


def test_compiled_step_with_a_host_read_of_computed_counts_runs_eagerly():
    """A batch beyond the CPU decode kernels' rows takes an MoE dispatch that reads its expert counts
    (`counts.tolist()`): tracing that as one graph fails on the symbolic counts. That shape then runs
    eagerly, each call once; smaller batches keep their graph."""
    from nemotron.inference.steps import CompiledDecode
    from nemotron.kernels import MAX_ROWS

    class CountsRead(torch.nn.Module):
        def forward(self, ids, cache, mode, positions):
            cache += 1
            x = (ids.float()[..., None] + cache).flatten(0, 1)
            if ids.shape[0] <= MAX_ROWS:   # the kernels' rows: no host read
                return (x * 2).view_as(cache)
            parts, start = [], 0
            for n in torch.bincount(ids.flatten() % 4, minlength=4).tolist():
                parts.append(x[start:start + n] * 2)
                start += n
            return torch.cat(parts).view_as(cache)

    step, source = CompiledDecode(CountsRead()), object()
    for b in (2, 3, MAX_ROWS + 4, MAX_ROWS + 5, 2):
        ids, cache = torch.arange(b)[:, None], torch.zeros(b, 1, 4)
        out = step(ids, cache, torch.zeros(b, dtype=torch.long), source=source)
        assert torch.equal(cache, torch.ones(b, 1, 4)) and torch.equal(out, ((ids.float() + 1) * 2).expand(b, 4)), b
    assert step.graph_breaks == {f"batch > {MAX_ROWS}"} and f"batch 2-{MAX_ROWS}" in step.compile_seconds
