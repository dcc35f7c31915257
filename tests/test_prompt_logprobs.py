"""Prompt log-probs made in the engine's batch (vLLM's prompt_logprobs, the legacy echo+logprobs of
/v1/completions) checked against teacher-forced log_softmax(model(ids)); the tokenizer endpoints
(/tokenize, /detokenize, /tokenizer_info), models.retrieve and logit_bias through the real server;
and lm-eval's `local-completions` model scoring a small local task against the server."""

from __future__ import annotations

import json

import pytest
import torch

import nemotron
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request
from nemotron.inference.sampling import Sampler, SamplingParams
from nemotron.inference.steps import greedy_generate
from nemotron.io.random_checkpoint import init_checkpoint

from conftest import randomize_
from serving import running_server

openai = pytest.importorskip("openai")

from test_server import http  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random checkpoint with a byte-level tokenizer, its weights spread out (randomize_) so that
    log-probs differ clearly between tokens and positions."""
    path = init_checkpoint(tmp_path_factory.mktemp("random"), seed=0)
    m = nemotron.load(path)
    randomize_(m.model, seed=5, scale=1.5)
    m.save(path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return nemotron.load(checkpoint)


def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """log_softmax(model(ids)) in fp32, [T, V]: row t scores token t+1."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 260, (n,), generator=g).tolist()


# --------------------------------------------------------------------------------------------------
# in the engine
# --------------------------------------------------------------------------------------------------

def test_engine_prompt_logprobs_equal_teacher_forcing_across_chunks_in_a_mixed_batch(loaded):
    model = loaded.model
    prompt = _prompt(40, seed=1)    # 4 chunks of 12: the chunk boundaries are scored across
    other = _prompt(40, seed=2)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    # one length: the three prefill together in one batch; the middle one does not ask
    reqs = [Request(prompt, greedy, prompt_logprobs=5), Request(other, greedy), Request(list(other), greedy,
                                                                                     prompt_logprobs=0)]
    engine = Engine(model, max_batch=3, max_len=48, prefill_chunk=12, prefill_batch=3)
    list(engine.run(reqs))
    solo = Engine(model, max_batch=1, max_len=48, prefill_chunk=12)
    alone = Request(list(other), greedy)
    list(solo.run([alone]))
    assert reqs[1].output_ids == alone.output_ids == reqs[2].output_ids   # scoring changes no one's tokens
    assert reqs[1].prompt_logprob_entries == []

    for r, top in ((reqs[0], 5), (reqs[2], 0)):
        ref = teacher_forced(model, r.prompt_ids)
        entries = r.prompt_logprob_entries
        assert len(entries) == len(r.prompt_ids) and entries[0] is None
        for t, e in enumerate(entries[1:]):
            token = r.prompt_ids[t + 1]
            assert e["token_id"] == token
            assert abs(e["logprob"] - ref[t, token].item()) < TOL, (t, e["logprob"], ref[t, token].item())
            assert e["rank"] == int((ref[t] > ref[t, token]).sum()) + 1
            assert len(e["top"]) == top
            if top:
                values, ids = ref[t].topk(top)
                assert [i for i, _ in e["top"]] == ids.tolist()
                assert max(abs(v - w) for (_, v), w in zip(e["top"], values.tolist())) < TOL


def test_prompt_logprobs_skip_the_prefix_cache_but_fill_it(loaded):
    model = loaded.model
    prompt = _prompt(28, seed=3)
    engine = Engine(model, max_batch=1, max_len=32, prefill_chunk=12, prefix_cache_bytes=1 << 24)
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    first = Request(prompt, greedy, prompt_logprobs=0)
    list(engine.run([first]))
    # its blocks were saved: a plain request hits them; one that scores its prompt does not restore them
    plain, scored = Request(list(prompt), greedy), Request(list(prompt), greedy, prompt_logprobs=0)
    list(engine.run([plain]))
    list(engine.run([scored]))
    assert plain.cached_tokens == 24 and scored.cached_tokens == 0
    assert [e and e["logprob"] for e in scored.prompt_logprob_entries] == \
        [e and e["logprob"] for e in first.prompt_logprob_entries]
    assert plain.output_ids == scored.output_ids == first.output_ids


def test_logit_bias_in_the_sampler_leaves_other_rows_bit_identical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    plain = [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0)]
    biased = SamplingParams(temperature=0, logit_bias={7: 100.0, int(logits[2].argmax()): -100})
    s = Sampler(plain + [biased], 50)
    x = s.process(logits)
    assert torch.equal(x[:2], Sampler(plain, 50).process(logits[:2]))
    assert x[2, 7] == logits[2, 7] + 100 and int(s(logits).tokens[2]) == 7
    assert torch.equal(logits, torch.randn(3, 50, generator=torch.Generator().manual_seed(0)))   # not modified
    # the bias follows its row through select_rows and concat
    assert int(s.select_rows([2, 0])(logits[[2, 0]]).tokens[0]) == 7
    joined = Sampler.concat([Sampler(plain, 50), Sampler([biased], 50)])
    assert torch.equal(joined.process(logits), x)
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler([SamplingParams(logit_bias={50: 1.0})], 50)
    for bad in ({1: 101.0}, {1: float("nan")}, {-1: 0.0}, {1: True}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()


# --------------------------------------------------------------------------------------------------
# through the server
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, "--prefill-chunk", "16", "--max-batch", "4", "--max-model-len", "512") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


TEXT = "The quick brown fox jumps over the lazy dog, twice."


def test_echo_with_logprobs_scores_the_prompt(server, client, checkpoint, loaded):
    ids = loaded.tokenizer.encode(TEXT)
    assert len(ids) > 32    # 3+ prefill chunks of 16
    r = client.completions.create(model=checkpoint.name, prompt=TEXT, max_tokens=3, temperature=0, logprobs=2,
                                  echo=True, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:len(ids)]) == TEXT and r.choices[0].text.startswith(TEXT)
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert lp.text_offset[len(ids)] == len(TEXT)
    # the server decodes greedily: the same tokens as greedy generation here
    full = ids + greedy_generate(loaded.model, torch.tensor([ids]), 3)[0].tolist()
    assert lp.tokens[len(ids):] == [loaded.tokenizer.decode([t]) for t in full[len(ids):]]
    ref = teacher_forced(loaded.model, full)
    for t in range(1, len(full)):
        assert abs(lp.token_logprobs[t] - ref[t - 1, full[t]].item()) < TOL, t
        assert len(lp.top_logprobs[t]) <= 2
    # the same through a token-id prompt, and streamed: the echo chunk carries the prompt's log-probs
    chunks = list(client.completions.create(model=checkpoint.name, prompt=ids, max_tokens=3, temperature=0,
                                            logprobs=2, echo=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for c in chunks for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_vllm_prompt_logprobs_on_completions_and_chat(server, checkpoint, loaded):
    ids = loaded.tokenizer.encode(TEXT)
    ok, _, r = http(server, "/v1/completions", {"prompt": TEXT, "max_tokens": 1, "prompt_logprobs": 3})
    assert ok == 200, r
    plp = r["choices"][0]["prompt_logprobs"]
    ref = teacher_forced(loaded.model, ids)
    assert len(plp) == len(ids) and plp[0] is None
    for t in range(1, len(ids)):
        entry = plp[t]
        own = entry[str(ids[t])]
        assert abs(own["logprob"] - ref[t - 1, ids[t]].item()) < TOL
        assert own["rank"] == int((ref[t - 1] > ref[t - 1, ids[t]]).sum()) + 1
        assert own["decoded_token"] == loaded.tokenizer.decode([ids[t]])
        top = ref[t - 1].topk(3).indices.tolist()
        assert set(entry) == {str(ids[t])} | {str(i) for i in top}
        assert [entry[str(i)]["rank"] for i in top if i != ids[t]] == [k + 1 for k, i in enumerate(top) if i != ids[t]]
    assert r["choices"][0]["logprobs"] is None    # prompt_logprobs alone asks for no generated log-probs
    # chat: one list for the rendered prompt, whose ids /tokenize gives for the same messages
    msgs = [{"role": "user", "content": "Say hi"}]
    ok, _, r = http(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "prompt_logprobs": 0})
    assert ok == 200, r
    ok, _, tok = http(server, "/tokenize", {"messages": msgs})
    assert ok == 200, tok
    chat_ids, plp = tok["tokens"], r["prompt_logprobs"]
    assert r["usage"]["prompt_tokens"] == tok["count"] == len(chat_ids) == len(plp)
    ref = teacher_forced(loaded.model, chat_ids)
    assert plp[0] is None
    assert all(abs(plp[t][str(chat_ids[t])]["logprob"] - ref[t - 1, chat_ids[t]].item()) < TOL
               for t in range(1, len(chat_ids)))
    for path, body in (("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}),
                       ("/v1/completions", {"prompt": "hi", "prompt_logprobs": "3"}),
                       ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}),
                       ("/v1/chat/completions", {"messages": msgs, "prompt_logprobs": -1})):
        got, _, err = http(server, path, body)
        assert got == 400 and err["error"]["param"] == "prompt_logprobs", (body, err)


def test_tokenize_detokenize_tokenizer_info_and_models_retrieve(server, client, checkpoint, loaded):
    for prefix in ("", "/v1"):
        ok, _, r = http(server, prefix + "/tokenize", {"prompt": TEXT, "return_token_strs": True})
        assert ok == 200, r
        assert r["tokens"] == loaded.tokenizer.encode(TEXT) and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 512
        assert r["token_strs"] == [loaded.tokenizer.backend.id_to_token(t) for t in r["tokens"]]
        ok, _, back = http(server, prefix + "/detokenize", {"tokens": r["tokens"]})
        assert ok == 200 and back == {"prompt": TEXT}
    assert http(server, "/tokenize", {"prompt": "x"})[2]["token_strs"] is None
    ok, _, info = http(server, "/tokenizer_info")
    assert ok == 200
    assert info["eos_token"] == loaded.tokenizer.eos_token and info["model_max_length"] == 512
    assert "{%" in info["chat_template"] and info["tokenizer_class"]
    model = client.models.retrieve(checkpoint.name)
    assert model.id == checkpoint.name and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    for path, body, param in (("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                               "prompt"),
                              ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, "messages"),
                              ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"), ("/detokenize", {}, "tokens")):
        got, _, err = http(server, path, body)
        assert got == 400 and err["error"]["param"] == param, (path, body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}


def test_logit_bias_steers_greedy_output(server, client, checkpoint):
    kw = dict(model=checkpoint.name, prompt=TEXT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(logprobs=0, **kw).choices[0]
    first = plain.logprobs.tokens[0]
    tid = http(server, "/tokenize", {"prompt": first, "add_special_tokens": False})[2]["tokens"]
    assert len(tid) == 1
    banned = client.completions.create(logit_bias={str(tid[0]): -100}, logprobs=0, **kw).choices[0]
    assert banned.logprobs.tokens[0] != first
    a, b = (http(server, "/tokenize", {"prompt": c})[2]["tokens"][0] for c in "AB")
    forced = client.completions.create(logit_bias={str(a): 100}, **kw).choices[0]
    assert forced.text == "AAAA"
    chat = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logit_bias={str(b): 100},
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat.choices[0].message.content == "BBB"
    for bias in ({"x": 1}, {str(a): 101}, {str(a): "1"}, {"-1": 1}, {"1000000": 1}, {str(a): True}, [1],
                 {"9" * 40: 1}, {" 1": 1}):
        got, _, err = http(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "logit_bias": bias})
        assert got == 400 and err["error"]["param"] == "logit_bias", (bias, err)


# --------------------------------------------------------------------------------------------------
# lm-eval against the server
# --------------------------------------------------------------------------------------------------

DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
    {"question": "A quick brown", "choices": [" fox", " dog", " cat"], "label": 1},
]


def test_lm_eval_local_completions_matches_teacher_forcing(server, checkpoint, loaded, tmp_path, monkeypatch):
    """lm-eval's own `local-completions` model (its remote tokenizer reads /tokenizer_info and
    /tokenize) scores a local multiple-choice task through /v1/completions echo+logprobs; every
    loglikelihood it reports equals the teacher-forced sum over the continuation."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": checkpoint.name, "base_url": server + "/v1/completions", "num_concurrent": 1,
                    "max_retries": 1, "tokenized_requests": True},
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        cache_requests=False)
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(DOCS)
    tok = loaded.tokenizer
    checked = 0
    for sample in samples:
        doc = sample["doc"]
        for (ctx, cont), resp in zip(sample["arguments"], sample["resps"]):
            ll = resp[0][0]
            whole = tok.encode(ctx + cont, add_special_tokens=False)
            n_ctx = len(tok.encode(ctx, add_special_tokens=False))
            ref = teacher_forced(loaded.model, whole)
            expected = sum(ref[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))
            assert abs(float(ll) - expected) < TOL, (doc, cont, ll, expected)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
