"""Batch sampler: each stage against hand math or transformers, empirical frequencies of the draw,
raw logprobs, seeded determinism across batch composition, parameter validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from nemotron.inference.sampling import SamplingParams, Sampler

P = SamplingParams


def _draw(params: SamplingParams, logits: torch.Tensor, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Empirical token frequencies of n draws from one logits vector (as n identical batch rows)."""
    torch.manual_seed(seed)
    rows = 4000
    sampler = Sampler([params] * rows, logits.numel())
    batch = logits.expand(rows, -1)
    tokens = torch.cat([sampler(batch).tokens for _ in range(n // rows)])
    return torch.bincount(tokens, minlength=logits.numel()).float() / tokens.numel()


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_greedy_is_argmax_also_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    greedy = Sampler([P(temperature=0.0)] * 8, 50)
    assert torch.equal(greedy(logits).tokens, logits.argmax(-1))
    # greedy rows among sampling rows (with filters that greedy rows must ignore)
    params = [P(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5) if i % 2 == 0 else P(temperature=5.0)
              for i in range(8)]
    tokens = Sampler(params, 50)(logits).tokens
    assert tokens.dtype == torch.long and tokens.shape == (8,)
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies(temperature):
    freq = _draw(P(temperature=temperature), LOGITS)
    expected = (LOGITS / temperature).softmax(-1)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_top_k_one_is_greedy_and_top_k_keeps_k():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    assert torch.equal(Sampler([P(top_k=1, temperature=3.0)] * 64, 100)(logits).tokens, logits.argmax(-1))
    freq = _draw(P(top_k=3), LOGITS)
    assert (freq[3:] == 0).all()
    expected = LOGITS[:3].softmax(-1)
    assert (freq[:3] - expected).abs().max() < 0.015


def test_top_p_keeps_minimal_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    sampler = Sampler([P(top_p=0.75), P(top_p=0.85), P(top_p=0.45), P(top_p=1.0)], 4)
    probs = sampler.probs(logits.expand(4, -1))
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(probs[2], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(probs[3], logits.softmax(-1))
    freq = _draw(P(top_p=0.75), logits)
    assert (freq[2:] == 0).all() and abs(freq[0] - 0.625) < 0.015


def test_top_p_applies_after_top_k_and_temperature():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top_k=3 renormalises to [4/9, 3/9, 2/9]; top_p=0.7 then needs the first two (7/9 >= 0.7)
    probs = Sampler([P(top_k=3, top_p=0.7)], 4).probs(logits[None])[0]
    torch.testing.assert_close(probs, torch.tensor([4 / 7, 3 / 7, 0, 0]))
    # temperature 0.5 squares the odds: [16, 9, 4, 1] / 30 -> top_p=0.9 keeps 3 tokens (29/30 >= 0.9)
    probs = Sampler([P(temperature=0.5, top_p=0.9)], 4).probs(logits[None])[0]
    torch.testing.assert_close(probs, torch.tensor([16 / 29, 9 / 29, 4 / 29, 0]))


def test_min_p_threshold():
    logits = torch.tensor([0.5, 0.3, 0.12, 0.08]).log()
    # threshold = 0.2 * 0.5 = 0.1: drops 0.08, keeps 0.12
    probs = Sampler([P(min_p=0.2)], 4).probs(logits[None])[0]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.12, 0]) / 0.92)
    freq = _draw(P(min_p=0.2), logits)
    assert freq[3] == 0 and freq[2] > 0.08
    # after temperature: at T=0.5 probs ~ [.693, .249, .040, .018]; 0.1 * .693 drops the last two
    probs = Sampler([P(min_p=0.1, temperature=0.5)], 4).probs(logits[None])[0]
    assert (probs[2:] == 0).all() and (probs[:2] > 0).all()


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(2)
    b, v = 3, 40
    prompts = [[1, 5, 5, 7], [0, 39], [12]]
    outputs = torch.tensor([[3, 5], [39, 20], [12, 12]])
    sampler = Sampler([P(repetition_penalty=1.3)] * b, v, prompt_ids=prompts)
    for step in range(outputs.shape[1]):
        sampler.update(outputs[:, step])
    logits = torch.randn(b, v) * 3
    ours = sampler.process(logits)
    for i in range(b):
        ids = torch.tensor([prompts[i] + outputs[i].tolist()])
        ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[i:i + 1].clone())[0]
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_by_hand():
    v = 10
    params = [P(presence_penalty=0.5, frequency_penalty=0.25), P(presence_penalty=-1.0), P()]
    # prompt tokens do not count for presence/frequency
    sampler = Sampler(params, v, prompt_ids=[[1, 2, 3], [4], [5]])
    for step in ([1, 4, 5], [1, 6, 5], [2, 6, 5]):
        sampler.update(torch.tensor(step))
    logits = torch.linspace(-2, 2, v).expand(3, -1).contiguous()
    ours = sampler.process(logits)
    expected = logits.clone()
    expected[0, 1] -= 0.5 + 0.25 * 2
    expected[0, 2] -= 0.5 + 0.25 * 1
    expected[1, 4] += 1.0
    expected[1, 6] += 1.0
    torch.testing.assert_close(ours, expected)


def test_logprobs_are_raw_and_top_logprobs_sorted():
    torch.manual_seed(3)
    logits = torch.randn(3, 30) * 2
    params = [P(logprobs=True, top_logprobs=5, temperature=0.3, repetition_penalty=2.0, top_k=4),
              P(logprobs=True), P(temperature=0.0)]
    sampler = Sampler(params, 30, prompt_ids=[[0, 1, 2], [], []])
    out = sampler(logits)
    raw = logits - logits.exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.tokens[:, None])[:, 0])
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (3, 5)
    order = raw.argsort(-1, descending=True)[:, :5]
    assert torch.equal(ids, order)
    torch.testing.assert_close(values, raw.gather(1, order))
    assert (values[:, :-1] >= values[:, 1:]).all()
    # nobody asked: nothing computed
    out = Sampler([P(), P(temperature=0.0)], 30)(logits[:2])
    assert out.logprobs is None and out.top_logprobs is None
    # logprobs without top_logprobs
    out = Sampler([P(logprobs=True)], 30)(logits[:1])
    assert out.logprobs is not None and out.top_logprobs is None


# a toy "model": next-token logits depend on the previous token, so a sequence depends on its history
_TABLE = torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) * 1.5


def _generate(params: list[SamplingParams], prompts: list[list[int]], steps: int = 12,
              drop_after: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Generate for a batch; rows in drop_after leave the batch after that many tokens."""
    sampler = Sampler(params, 64, prompt_ids=prompts)
    live = list(range(len(params)))
    last = torch.tensor([p[-1] for p in prompts])
    out: dict[int, list[int]] = {i: [] for i in live}
    for step in range(steps):
        tokens = sampler(_TABLE[last]).tokens
        sampler.update(tokens)
        for row, t in zip(live, tokens.tolist()):
            out[row].append(t)
        keep = [k for k, row in enumerate(live) if (drop_after or {}).get(row, steps) > step + 1]
        if len(keep) < len(live):
            sampler, live, tokens = sampler.select_rows(keep), [live[k] for k in keep], tokens[keep]
        last = tokens
    return out


def test_seed_determinism_across_batch_composition_and_order():
    mine = P(seed=1234, temperature=1.2, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.3)
    prompt = [3, 9, 27]
    alone = _generate([mine], [prompt])[0]
    assert _generate([mine], [prompt])[0] == alone
    torch.manual_seed(99)  # the unseeded neighbour's draws must not matter
    others = [P(), P(seed=7, top_k=5), P(temperature=0.0)]
    batched = _generate(others + [mine], [[1], [2, 2], [5]] + [prompt], drop_after={1: 4})
    assert batched[3] == alone
    reordered = _generate([mine] + others[::-1], [prompt, [5], [2, 2], [1]], drop_after={2: 2, 3: 7})
    assert reordered[0] == alone
    # and the seed matters: another seed, or the same seed with another prompt, gives other tokens
    assert _generate([replace(mine, seed=1235)], [prompt])[0] != alone
    assert _generate([mine], [[3, 9, 28]])[0] != alone


def test_select_rows_carries_counts():
    sampler = Sampler([P(frequency_penalty=1.0), P(frequency_penalty=2.0)], 5)
    sampler.update(torch.tensor([1, 2]))
    sampler.update(torch.tensor([1, 3]))
    kept = sampler.select_rows([1])
    logits = torch.zeros(1, 5)
    torch.testing.assert_close(kept.process(logits), torch.tensor([[0.0, 0.0, -2.0, -2.0, 0.0]]))
    assert len(kept) == 1


def test_concat_keeps_each_rows_state():
    """Continuous batching adds a request's 1-row sampler to the running one: penalties, seeds and
    stop ids carry over, rows without a penalty stay unpenalised."""
    a = Sampler([P(frequency_penalty=1.0, stop_token_ids=[4]), P(seed=3, temperature=1.0)], 5)
    a.update(torch.tensor([1, 2]))
    b = Sampler([P(repetition_penalty=2.0, stop_token_ids=[2, 3])], 5, prompt_ids=[[0]])
    both = Sampler.concat([a, b])
    assert len(both) == 3 and both.is_stop(torch.tensor([4, 4, 3])).tolist() == [True, False, True]
    logits = torch.ones(3, 5)
    expect = torch.ones(3, 5)
    expect[0, 1] = 0.0       # row 0: token 1 seen once, frequency 1.0
    expect[2, 0] = 0.5       # row 2: prompt token 0, repetition 2.0
    torch.testing.assert_close(both.process(logits)[[0, 2]], expect[[0, 2]])
    # the seeded row draws what it would alone (its generator moved over, unused so far)
    x = torch.zeros(1, 5)   # uniform: 20 draws of 5 tokens match by chance with probability 5**-20
    fresh = Sampler([P(seed=3, temperature=1.0)], 5)
    assert [both(x.expand(3, 5)).tokens[1].item() for _ in range(20)] == [fresh(x).tokens.item() for _ in range(20)]


def test_stop_token_ids():
    sampler = Sampler([P(stop_token_ids=[4, 7]), P(), P(stop_token_ids=[1])], 10)
    assert sampler.is_stop(torch.tensor([7, 4, 1])).tolist() == [True, False, True]
    assert sampler.is_stop(torch.tensor([3, 0, 2])).tolist() == [False, False, False]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
    ("min_p", 1.1), ("top_k", -1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1), ("max_new_tokens", -1), ("top_logprobs", 21), ("top_logprobs", 3),
    ("stop", [""]), ("stop_token_ids", [-1]), ("seed", 1.5),
    # past what torch.Generator.manual_seed and int64 tensors take: once an engine-killing crash
    ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("stop_token_ids", [2 ** 63]),
])
def test_validation_errors(field, value):
    with pytest.raises(ValueError, match=field) as err:
        P(**{field: value}).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=field):
        Sampler([P(), P(**{field: value})], 10)


def test_valid_edges_pass():
    for p in [P(temperature=0.0), P(top_p=1.0), P(min_p=1.0), P(presence_penalty=-2.0, frequency_penalty=2.0),
              P(logprobs=True, top_logprobs=20), P(max_new_tokens=0), P(stop="\n")]:
        assert p.validate() is p
    assert P(stop="\n").stop == ["\n"]
    edges = [P(temperature=1.0, seed=2 ** 64 - 1), P(temperature=1.0, seed=-(2 ** 63)), P(stop_token_ids=[2 ** 63 - 1])]
    assert len(Sampler(edges, 10)(torch.zeros(3, 10)).tokens) == 3
    assert P(temperature=0.0).greedy and not P(temperature=0.1).greedy
    with pytest.raises(ValueError, match="logits shape"):
        Sampler([P()], 10)(torch.zeros(2, 10))
