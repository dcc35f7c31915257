"""Prefix-cache blocks finer than the prefill chunk: the Mamba states captured at block ends inside a
chunk are the states of a prefill that stops there, the scan resumed from them is the same
arithmetic, and the engine and the server hit on them at default settings."""

from __future__ import annotations

import json
import urllib.request
import warnings

import pytest
import torch

import nemotron
from nemotron.errors import NemotronWarning
from nemotron.inference.engine import Engine
from nemotron.inference.prefix_cache import choose_block
from nemotron.inference.requests import Request
from nemotron.inference.sampling import SamplingParams
from nemotron.layers.cache import CacheOptions, KVState, MambaState, StateCapture
from nemotron.layers.mamba2 import Mamba2Mixer
from nemotron.layers.ssd import ssd_chunked

from conftest import randomize_
from serving import running_server


@pytest.fixture(scope="module")
def tiny():
    return nemotron.load("tiny")


def _scan_inputs(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, 4, 3, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(2, L, 4, generator=g) - 1.0)
    A = -torch.exp(torch.rand(4, generator=g) * 2 - 0.5)
    B, C = torch.randn(2, L, 2, 5, generator=g), torch.randn(2, L, 2, 5, generator=g)
    return x, dt, A, B, C


def test_scan_states_at_chunk_boundaries_resume_bit_identically():
    """The state the scan keeps at a chunk boundary is the final state of a scan that stops there,
    and a scan resumed from it gives the rest of the full scan bit for bit (the state passes from
    chunk to chunk one chunk at a time)."""
    x, dt, A, B, C = _scan_inputs(45)
    s0 = torch.randn(2, 4, 3, 5)
    for init in (None, s0):
        y, kept = ssd_chunked(x, dt, A, B, C, 8, init, state_at=(16, 24, 45))
        y_all, final = ssd_chunked(x, dt, A, B, C, 8, init)
        assert torch.equal(y, y_all) and torch.equal(kept[:, 2], final)
        for i, at in enumerate((16, 24)):
            _, stopped = ssd_chunked(x[:, :at], dt[:, :at], A, B[:, :at], C[:, :at], 8, init)
            assert torch.equal(kept[:, i], stopped)
            y_rest, s_rest = ssd_chunked(x[:, at:], dt[:, at:], A, B[:, at:], C[:, at:], 8, kept[:, i])
            assert torch.equal(y_rest, y_all[:, at:]) and torch.equal(s_rest, final)
    with pytest.raises(ValueError, match="chunk boundaries"):
        ssd_chunked(x, dt, A, B, C, 8, state_at=(12,))


def test_mixer_captures_the_state_of_a_prefill_that_stops_there():
    """Inside one forward, the conv/SSM states at offsets 16 and 32 equal (bit for bit) those of a
    forward of exactly that many tokens, and continuing from them gives the full forward's outputs.
    (Bit-identity of the continuation holds where the in_proj rows come out the same at every row
    count, as CPU matmuls do for 16 rows or more.)"""
    torch.manual_seed(0)
    mixer = randomize_(Mamba2Mixer(32, num_heads=4, head_dim=8, state_size=8, n_groups=2, chunk_size=16), seed=1)
    x = torch.randn(1, 48, 32)
    with torch.inference_mode():
        full = mixer.new_state(1, torch.float32, torch.float32, "cpu")
        capture = StateCapture((16, 32, 48))
        y_full = mixer(x, full, pos=[0], capture=capture)
        for i, at in enumerate((16, 32, 48)):
            stopped = mixer.new_state(1, torch.float32, torch.float32, "cpu")
            mixer(x[:, :at], stopped, pos=[0])
            conv, ssm = capture.at(i)[0]
            assert torch.equal(conv, stopped.conv[0]) and torch.equal(ssm, stopped.ssm[0])
            if at < 48:
                y_rest = mixer(x[:, at:], stopped, pos=[at])
                assert torch.equal(y_rest, y_full[:, at:])
                assert torch.equal(stopped.ssm, full.ssm) and torch.equal(stopped.conv, full.conv)
        with pytest.raises(ValueError, match="chunk boundaries"):
            mixer(x, mixer.new_state(1, torch.float32, torch.float32, "cpu"), pos=[0], capture=StateCapture((8,)))


def test_model_capture_inside_a_chunk_matches_a_prefill_that_stops_there(tiny):
    """The whole model: every Mamba layer's state captured at 192 inside a 256-token forward against a
    prefill of exactly 192 tokens. The first Mamba layer sees the same inputs and matches bit for
    bit; later ones see the outputs of MoE layers, whose per-expert products run at other row counts
    in the two forwards (CPU kernels round small ones differently), so they match to fp32 rounding."""
    ids = torch.randint(5, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = tiny.new_cache(1, 256)
        capture = StateCapture((64, 192, 256))
        tiny.model(ids, cache, capture=capture)
        stopped = tiny.new_cache(1, 256)
        tiny.model(ids[:, :192], stopped)
    mamba = [s for s in stopped.layers if isinstance(s, MambaState)]
    captured = capture.at(1)
    assert len(captured) == len(mamba) == 4
    assert torch.equal(captured[0][0], mamba[0].conv[0]) and torch.equal(captured[0][1], mamba[0].ssm[0])
    for (conv, ssm), state in zip(captured, mamba):
        # conv inputs reach ~40: a few fp32 ulps there are ~1e-5
        assert torch.allclose(conv, state.conv[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(ssm, state.ssm[0], rtol=1e-4, atol=1e-5)
    # at the forward's end the capture is the cache's own state
    for (conv, ssm), state in zip(capture.at(2), (s for s in cache.layers if isinstance(s, MambaState))):
        assert torch.equal(conv, state.conv[0]) and torch.equal(ssm, state.ssm[0])


def _generate(engine: Engine, prompt: list[int]) -> Request:
    r = Request(prompt, SamplingParams(max_new_tokens=4, temperature=0, logprobs=True))
    engine.submit(r)
    while not engine.idle:
        engine.step()
    return r


def test_engine_hits_on_blocks_inside_a_chunk_at_default_settings(tiny):
    """Default settings: 256-token prefill chunks, 64-token blocks (the embedded model's scan chunk).
    A prompt sent again resumes at its last whole block inside the chunk; a longer one sharing its
    start resumes there too. The greedy tokens equal an uncached engine's, the log-probs to fp32
    rounding; with the block equal to the chunk they are bit-identical."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(5, 1000, (217,), generator=g).tolist()
    prompts = [shared, shared, shared[:200] + torch.randint(5, 1000, (90,), generator=g).tolist()]
    plain = Engine(tiny.model, max_batch=1, max_len=512)
    cached = Engine(tiny.model, max_batch=1, max_len=512, prefix_cache_bytes=1 << 26)
    assert (cached.prefill_chunk, cached.prefix_block) == (256, 64)
    alone = _generate(plain, shared)
    want = [alone, alone, _generate(plain, prompts[2])]
    got = [_generate(cached, p) for p in prompts]
    assert [r.cached_tokens for r in got] == [0, 192, 192]
    for w, r in zip(want, got):
        assert r.output_ids == w.output_ids
        assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(w.logprobs, r.logprobs)) < 1e-4
    # blocks on forward ends only: every restore is where a forward ended, and bit-identical
    coarse = Engine(tiny.model, max_batch=1, max_len=512, prefix_cache_bytes=1 << 26, prefix_block=256)
    long = shared + torch.randint(5, 1000, (60,), generator=g).tolist()
    first, again = _generate(coarse, long), _generate(coarse, long)
    assert again.cached_tokens == 256
    assert again.output_ids == first.output_ids
    assert [lp["logprob"] for lp in again.logprobs] == [lp["logprob"] for lp in first.logprobs]


def test_the_block_is_checked_and_a_low_precision_state_keeps_blocks_on_forward_ends(tiny):
    cache = tiny.new_cache(1, 8)
    assert choose_block(tiny.model, cache, 256) == 64
    assert choose_block(tiny.model, cache, 96) == 96        # 64 does not divide it: the chunk itself
    assert choose_block(tiny.model, cache, 256, 128) == 128
    with pytest.raises(ValueError, match="multiple of the prefix-cache block"):
        choose_block(tiny.model, cache, 256, 96)
    with pytest.raises(ValueError, match="scan chunk"):
        choose_block(tiny.model, cache, 256, 32)
    low = tiny.model.new_cache(1, 8, CacheOptions(ssm_dtype="float16"))
    assert choose_block(tiny.model, low, 256) == 256
    with pytest.warns(NemotronWarning, match="rounded"):
        assert choose_block(tiny.model, low, 256, 64) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_block(tiny.model, low, 256, 256) == 256
    assert all(isinstance(s, (KVState, MambaState)) or s is None for s in cache.layers)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _chat(base: str, messages: list[dict]) -> dict:
    body = {"model": "tiny", "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 6,
            "chat_template_kwargs": {"enable_thinking": False}}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_a_tools_prompt_sent_again_hits_through_the_server_at_default_settings():
    """The agent case of issue 18: a system prompt with tools (a little over 192 tokens), sent twice to
    a server with default settings, then a second turn that grows the history."""
    system = {"role": "system", "content": "You are a helpful travel agent."}
    ask = [system, {"role": "user", "content": "What is the weather in Paris?"}]
    with running_server("tiny") as base:
        first, again = _chat(base, ask), _chat(base, ask)
        assert 192 < first["usage"]["prompt_tokens"] <= 256
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192
        assert again["choices"][0]["message"] == first["choices"][0]["message"]
        reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"] or "Sunny."}
        turn2 = _chat(base, ask + [reply, {"role": "user", "content": "And in Rome?"}])
        assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192
