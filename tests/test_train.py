"""Training: SFT masking, packing, objectives, balancing, schedules, recipes, and resuming exactly."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

import nemotron
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.models.init import init_weights_
from nemotron.models import build_model
from nemotron.train import (DataStream, Example, chat_example, collate, lm_loss, load_recipe, pack, train,
                            update_expert_bias)
from nemotron.train.data import IGNORE
from nemotron.train.objectives import routing_collapse
from nemotron.train.optim import lr_at, make_optimizer, matrix_parameters, orthogonalize, param_groups

from scripted import ASK, CALL, HI, RESULT, TOOLS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return nemotron.load(init_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0))


CONVERSATIONS = [
    {"messages": HI + [{"role": "assistant", "content": "Hi!", "reasoning_content": "A greeting."}]},
    {"messages": ASK + [CALL, RESULT, {"role": "assistant", "content": "It is sunny in Paris.",
                                       "reasoning_content": "The tool says sunny."}], "tools": TOOLS},
    {"messages": HI + [{"role": "assistant", "content": "Hello there!"}], "enable_thinking": False},
]


def _fresh_model(seed: int = 0):
    config = toy_super_config()
    return init_weights_(build_model(config), config, seed=seed)


def test_sft_targets_are_exactly_the_assistant_turns(tiny):
    tok = tiny.tokenizer
    (ex,) = chat_example(tok, CONVERSATIONS[1])
    scored = tok.decode([i for i, t in zip(ex.ids, ex.targets) if t], skip_special_tokens=False)
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
    assert scored == ("I should call the tool.\n</think>\n" + call + "<|im_end|>"
                      + "The tool says sunny.\n</think>\nIt is sunny in Paris.<|im_end|>")
    (off,) = chat_example(tok, CONVERSATIONS[2])   # reasoning off: the prompt closes <think> itself
    assert tok.decode([i for i, t in zip(off.ids, off.targets) if t], skip_special_tokens=False) == \
        "Hello there!<|im_end|>"


def test_template_that_rewrites_history_gives_one_example_per_turn(tiny):
    """The Nemotron 3 format drops earlier reasoning once a new user turn arrives: each assistant turn
    is then trained with the history as the template shows it at that point."""
    record = {"messages": HI + [{"role": "assistant", "content": "Hi!", "reasoning_content": "A greeting."},
                                {"role": "user", "content": "Again"},
                                {"role": "assistant", "content": "Hi again!", "reasoning_content": "Repeat."}]}
    examples = chat_example(tiny.tokenizer, record)
    assert len(examples) == 2
    texts = [tiny.tokenizer.decode([i for i, t in zip(e.ids, e.targets) if t], skip_special_tokens=False)
             for e in examples]
    assert texts == ["A greeting.\n</think>\nHi!<|im_end|>", "Repeat.\n</think>\nHi again!<|im_end|>"]


def test_gradients_come_only_from_assistant_tokens(tiny):
    examples = [e for c in CONVERSATIONS for e in chat_example(tiny.tokenizer, c)]
    batch = collate(pack(examples, 4096))
    model = _fresh_model()
    logits = model(batch.input_ids, seq_idx=batch.seq_idx)
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits[0].float(), batch.labels[0], ignore_index=IGNORE).backward()
    scored = (logits.grad[0].abs().sum(-1) > 0)
    assert torch.equal(scored, batch.labels[0] != IGNORE)
    targets = sum(sum(e.targets[1:]) for e in examples)
    assert int(scored.sum()) == targets > 0


def test_packed_loss_equals_unpacked(tiny):
    examples = [e for c in CONVERSATIONS for e in chat_example(tiny.tokenizer, c)]
    model = _fresh_model(seed=1).eval()
    packed = collate(pack(examples, 4096))
    assert packed.input_ids.shape[0] == 1 and int(packed.seq_idx.max()) == len(examples) - 1
    with torch.no_grad():
        loss, m = lm_loss(model, packed, mtp_weight=0.3)
        total_ce, total_targets, total_mtp = 0.0, 0, 0.0
        for ex in examples:
            single = collate([[ex]])
            _, ms = lm_loss(model, single, mtp_weight=0.3)
            total_ce += ms["ce_sum"]
            total_mtp += ms["mtp1_ce_sum"]
            total_targets += ms["targets"]
    assert m["targets"] == total_targets
    assert abs(m["ce_sum"] - total_ce) <= 1e-4 * total_ce
    assert abs(m["mtp1_ce_sum"] - total_mtp) <= 1e-4 * total_mtp


def test_first_fit_packing_fills_the_rows_and_keeps_every_token(tmp_path):
    sizes = (5, 9, 3, 12, 7, 2, 30)
    examples = [Example(list(range(100 * i, 100 * i + n)), [True] * n) for i, n in enumerate(sizes)]
    assert [[len(e.ids) for e in r] for r in pack(examples, 16)] == [[5, 9], [3, 12], [7, 2], [16], [14]]
    assert [[len(e.ids) for e in r] for r in pack(examples, 16, open_rows=8)] == [[5, 9, 2], [3, 12], [7], [16], [14]]
    rng = torch.Generator().manual_seed(0)
    many = [Example(list(range(n)), [True] * n) for n in torch.randint(20, 700, (400,), generator=rng).tolist()]
    greedy, first_fit = pack(many, 256), pack(many, 256, open_rows=32)
    for rows in (greedy, first_fit):
        assert max(sum(len(e.ids) for e in r) for r in rows) <= 256
        assert sorted(tuple(e.ids) for r in rows for e in r) == sorted(tuple(e.ids) for r in greedy for e in r)
    assert len(first_fit) < 0.85 * len(greedy)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    base = [f"data=[{data}]", f"init_config=toy_super", f"tokenizer={tmp_path}"]
    assert load_recipe(None, base).packing == "first_fit"
    with pytest.raises(ValueError, match="packing must be one of first_fit, greedy"):
        load_recipe(None, base + ["packing=tight"])


def test_pack_and_stream_are_deterministic_and_resumable():
    examples = [Example(list(range(n)), [True] * n) for n in (5, 9, 3, 12, 7, 30)]
    rows = pack(examples, 16)
    assert [sum(len(e.ids) for e in r) for r in rows] == [14, 15, 7, 16, 14]   # 30 split into 16 + 14
    a, b = DataStream(examples, 16, 2, seed=3), DataStream(examples, 16, 2, seed=3)
    first = [next(a).input_ids for _ in range(5)]
    for _ in range(2):
        next(b)
    c = DataStream(examples, 16, 2, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, next(c).input_ids) for x in first[2:])
    assert not all(torch.equal(x, y) for x, y in zip(first, [next(DataStream(examples, 16, 2, seed=4)).input_ids]))


def test_schedules_and_param_groups():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 0.1, warmup=10, schedule="wsd", decay_fraction=0.2) == 1.0
    assert lr_at(99, 100, 1.0, 0.1, warmup=10, schedule="wsd", decay_fraction=0.2) == pytest.approx(0.1)
    assert lr_at(89, 100, 1.0, 0.0, schedule="wsd", decay_fraction=0.2, decay="minus_sqrt") == \
        pytest.approx(1 - (10 / 20) ** 0.5)
    assert lr_at(99, 100, 1.0, 0.0, schedule="cosine") == pytest.approx(0.0, abs=1e-3)
    groups = param_groups(_fresh_model(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    model = _fresh_model()
    names = {n for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n}
    assert names and all(p.ndim >= 2 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(decayed) == len(groups[0]["params"])


def test_orthogonalize_flattens_the_spectrum_of_each_matrix():
    g = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 0, 24)
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())   # g's spanned 200x and more
    assert torch.allclose(o[1], orthogonalize(g[1]), atol=1e-5)   # a stack: each matrix on its own
    assert torch.allclose(orthogonalize(g[0].T), o[0].T, atol=1e-5)   # tall and wide alike


def test_muon_matches_torch_muon_per_matrix_and_adamw_elsewhere():
    model = _fresh_model()
    names = {id(p): n for n, p in model.named_parameters()}
    dense = {names[id(p)] for p in matrix_parameters(model)}
    assert any(n.endswith("q_proj.weight") for n in dense) and not any(n.endswith("experts.up_proj") for n in dense)
    matrices = matrix_parameters(model, experts=True)   # the stacks, each expert orthogonalised on its own
    picked = {names[id(p)] for p in matrices}
    assert any(n.endswith("experts.up_proj") for n in picked) and dense < picked
    assert not any(k in n for n in picked for k in ("lm_head", "embeddings", "gate.weight", "conv1d", "norm"))
    opt = make_optimizer(model, 1e-2, 0.1, kind="muon", muon_lr=3e-2)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in matrix_parameters(model)}
    opt.param_groups[1]["params"] = [p for p in opt.param_groups[1]["params"] if p.ndim != 3]
    opt.param_groups[0]["params"] = matrices   # the stacks too, to check them against torch's Muon
    # the reference: torch's Muon on every matrix (each expert a leaf of its own), torch's AdamW on the rest
    slices = {id(p): [p.detach()[e].clone().requires_grad_() for e in range(p.shape[0])] if p.ndim == 3
              else [p.detach().clone().requires_grad_()] for p in matrices}
    rest = [p for g in opt.param_groups[1:] for p in g["params"]]
    rest_ref = {id(p): p.detach().clone().requires_grad_() for p in rest}
    ref_muon = torch.optim.Muon([q for qs in slices.values() for q in qs], lr=3e-2, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": [rest_ref[id(p)] for p in g["params"]],
                                    "weight_decay": g["weight_decay"]} for g in opt.param_groups[1:]],
                                  lr=1e-2, betas=(0.9, 0.95))
    start = {id(p): p.detach().clone() for p in model.parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in list(model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            for e, q in enumerate(slices.get(id(p), [])):
                q.grad = p.grad[e] if p.ndim == 3 else p.grad
            if id(p) in rest_ref:
                rest_ref[id(p)].grad = p.grad.clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for p in matrices:   # torch orthogonalises in bf16, this optimizer in fp32
        want = torch.stack([q.detach() for q in slices[id(p)]]) if p.ndim == 3 else slices[id(p)][0].detach()
        moved = (want - start[id(p)]).abs().max()
        assert (p.detach() - want).abs().max() < 0.03 * moved, names[id(p)]
    for p in rest:
        assert torch.allclose(p.detach(), rest_ref[id(p)].detach(), atol=1e-6), names[id(p)]


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    model = _fresh_model()
    router = model.backbone.layers[1].mixer.gate
    with torch.no_grad():   # a router skewed towards its first two experts
        router.e_score_correction_bias[:2] = 0.4
    model.train()
    ids = torch.randint(3, 260, (4, 64), generator=torch.Generator().manual_seed(1))
    loads = []
    with torch.no_grad():
        for _ in range(200):
            model(ids)
            loads.append(update_expert_bias(model, rate=1e-2)[0])
    assert loads[0] > 2.0 and loads[-1] < 1.5 and loads[-1] < loads[0] / 2, (loads[0], loads[-1])
    assert abs(float(router.e_score_correction_bias.mean()) - 0.1) < 1e-5   # re-centred updates keep the mean


def test_a_router_that_sends_every_token_to_one_expert_is_reported_once():
    from nemotron.train.objectives import routers

    model = _fresh_model()
    gates = routers(model)
    bounds = {i: r.weight.shape[0] / r.top_k for i, r in enumerate(gates)}
    ids = torch.randint(3, 260, (2, 32), generator=torch.Generator().manual_seed(1))
    streaks, notes = {}, []
    with torch.no_grad():
        for bias in (5.0, 5.0, 5.0, 5.0, 0.0, 5.0):   # one expert favoured by far, then not, then again
            for r in gates:
                r.e_score_correction_bias.zero_()
                r.e_score_correction_bias[0] = bias
            model(ids)
            loads = update_expert_bias(model, rate=0.0)
            notes.append(routing_collapse(loads, bounds, streaks, steps=3))
    # every token's choices include expert 0 (the MTP block's router saw no tokens: no load)
    assert len(loads) >= 2 and loads == pytest.approx({i: bounds[i] for i in loads})
    assert [len(n) for n in notes] == [0, 0, len(loads), 0, 0, 0] and "MoE layer 0" in notes[2][0]
    assert set(streaks.values()) == {1}   # the balanced step restarted the counts


def _pretrain_data(tmp_path) -> str:
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()
    path = tmp_path / "pre.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))})
                            + "\n" for _ in range(100)))
    return str(path)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_pretrain_loss_falls_and_resume_is_bit_identical(tmp_path, tiny, optimizer):
    data = _pretrain_data(tmp_path)
    common = [f"data=[{data}]", "init_config=toy_super", f"tokenizer={tiny.path}", "steps=8", "seq_len=128",
              "batch_size=2", "grad_accum=2", "lr=3e-3", "warmup=2", "save_every=2", f"optimizer={optimizer}"]
    straight = train(load_recipe(None, common + [f"out_dir={tmp_path / 'a'}"], "pretrain"), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    # 4 steps, a stop, then a resume that runs the remaining 4 from the latest checkpoint
    cfg = load_recipe(None, common + [f"out_dir={tmp_path / 'b'}"], "pretrain")
    assert train(cfg, progress=False, stop_after=4)["stopped_at"] == 4
    resumed = train(cfg, progress=False)
    assert resumed["loss"] == straight["loss"]
    a = nemotron.load(tmp_path / "a" / "final").model.state_dict()
    b = nemotron.load(tmp_path / "b" / "final").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 8


def test_sft_stage_trains_on_conversations(tmp_path, tiny):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    summary = train(load_recipe(None, [f"data=[{data}]", f"model={tiny.path}", f"out_dir={tmp_path / 'sft'}",
                                       "steps=12", "seq_len=1024", "batch_size=1", "lr=3e-3", "warmup=0",
                                       "schedule=constant"], "sft"), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]
    assert nemotron.load(summary["final"]).tokenizer is not None   # exported with its tokenizer
    png = (tmp_path / "sft" / "loss.png").read_bytes()
    assert summary["plot"] and png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("overrides,message", [
    (["stepz=3"], "unknown key"),
    (["steps=0"], "steps must be >= 1"),
    (["lr=fast"], "lr must be float"),
    (["schedule=zigzag"], "schedule must be one of"),
    (["optimizer=sgd"], "optimizer must be one of"),
    (["data=[/no/such/file.jsonl]"], "does not exist"),
])
def test_bad_recipes_fail_before_any_work(tmp_path, tiny, overrides, message):
    data = _pretrain_data(tmp_path)
    base = [f"data=[{data}]", "init_config=toy_super", f"tokenizer={tiny.path}", f"out_dir={tmp_path / 'x'}"]
    with pytest.raises(ValueError, match=message):
        load_recipe(None, base + overrides, "pretrain")
    result = subprocess.run([sys.executable, "-m", "nemotron.cli", "train", "pretrain", *base, *overrides],
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["pretrain", "sft"])
def test_shipped_recipes_parse(name, tmp_path):
    """The recipe files in recipes/ use only known keys and valid values (paths overridden)."""
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / f"{name}.yaml"
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    source = ["model=null", f"init_config={tmp_path}"] if name == "pretrain" else [f"model={tmp_path}"]
    cfg = load_recipe(recipe, [f"data=[{data}]", f"tokenizer={tmp_path}", *source], name)
    assert cfg.stage == name and cfg.steps > 0


def test_dpo_loss_by_hand():
    from nemotron.train.stages import dpo_loss

    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)          # margin 2, beta*margin 1
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())
    assert m["reward_margin"] == pytest.approx(1.0) and m["accuracy"] == 1.0
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    ls = torch.nn.functional.logsigmoid
    assert smoothed.item() == pytest.approx(-(0.9 * ls(torch.tensor(1.0)) + 0.1 * ls(torch.tensor(-1.0))).item())


def test_grpo_advantages_and_clipping_by_hand():
    from nemotron.train.stages import group_advantages, grpo_token_loss

    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5) and adv[1].abs().max() == 0
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))   # ratios 1.5, 1, 0.5 on each row
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, m = grpo_token_loss(new, old, torch.tensor([1.0, -1.0]), mask, clip_low=0.2, clip_high=0.28)
    # positive advantage: min(r, clip(r)) -> 1.28, 1, 0.5; negative: min(-r, -clip(r)) -> -1.5, -1
    assert loss.item() == pytest.approx(-(1.28 + 1.0 + 0.5 - 1.5 - 1.0) / 5)
    assert m["clip_fraction"] == pytest.approx(3 / 5)


def test_dpo_learns_the_preference(tmp_path, tiny):
    data = tmp_path / "pairs.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}], "chosen": "Happy to help!", "rejected": "Go away.",
             "enable_thinking": False} for q in ("Hi", "Help me", "Question", "Hello")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(load_recipe(None, [f"data=[{data}]", f"model={tiny.path}", f"out_dir={tmp_path / 'dpo'}", "steps=10",
                             "batch_size=2", "lr=1e-3", "warmup=0", "schedule=constant", "seq_len=512"], "dpo"),
          progress=False)
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)   # the policy starts as its reference
    assert records[-1]["accuracy"] == 1.0 and records[-1]["reward_margin"] > 0.5
    assert records[-1]["loss"] < records[0]["loss"] - 0.2


def test_grpo_raises_mean_reward(tmp_path, tiny):
    """A verifiable reward the random model already earns sometimes (the share of lowercase letters in
    its answer); groups of 8 samples from the engine, 15 steps, the mean reward rises."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "answer": "",
                                        "enable_thinking": False}) + "\n"
                            for q in ("Say hi", "Say something", "Write", "Talk")))

    def lowercase_share(answer: str, record: dict) -> float:
        return sum(c.islower() for c in answer) / max(1, len(answer))

    cfg = load_recipe(None, [f"data=[{data}]", f"model={tiny.path}", f"out_dir={tmp_path / 'grpo'}", "steps=15",
                             "batch_size=2", "group_size=8", "max_new_tokens=16", "lr=1e-2", "warmup=0",
                             "schedule=constant", "grpo_reward=lowercase", "seq_len=256"], "grpo")
    assert cfg.freeze_router is True
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random model writes stray <tool_call> tags
        train(cfg, progress=False, stage_kwargs={"rewards": {"lowercase": lowercase_share}})
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    router_bias = nemotron.load(tmp_path / "grpo" / "final").model.backbone.layers[1].mixer.gate.e_score_correction_bias
    assert torch.equal(router_bias, tiny.model.backbone.layers[1].mixer.gate.e_score_correction_bias)


def test_grpo_dynamic_sampling_keeps_only_groups_with_signal(tmp_path, tiny):
    """Half the prompts score 1 whatever the model writes (groups without signal); with dynamic
    sampling every step trains on batch_size groups whose rewards differ, without it some do not."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a,
                                        "enable_thinking": False}) + "\n"
                            for q, a in (("Say hi", "same"), ("Write", ""), ("Hello", "same"), ("Talk", ""))))

    def reward(answer: str, record: dict) -> float:
        return 1.0 if record["answer"] == "same" else sum(c.islower() for c in answer) / max(1, len(answer))

    signal = {}
    for extra in (0, 4):
        out = tmp_path / f"grpo{extra}"
        cfg = load_recipe(None, [f"data=[{data}]", f"model={tiny.path}", f"out_dir={out}", "steps=4",
                                 "batch_size=2", "group_size=4", "max_new_tokens=8", "warmup=0", "seq_len=256",
                                 "grpo_reward=mixed", f"dynamic_sampling={extra}"], "grpo")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(cfg, progress=False, stage_kwargs={"rewards": {"mixed": reward}})
        signal[extra] = [json.loads(line)["samples_with_signal"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert signal[4] == [8, 8, 8, 8] and min(signal[0]) < 8, signal


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path, tiny):
    from nemotron.train.lora import LoRALinear, apply_lora, merge_lora

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    summary = train(load_recipe(None, [f"data=[{data}]", f"model={tiny.path}", f"out_dir={tmp_path / 'lora'}",
                                       "steps=6", "seq_len=1024", "batch_size=1", "lr=1e-2", "warmup=0",
                                       "lora_rank=4", "schedule=constant"], "sft"), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    adapter = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "in_proj" in adapter["target_modules"]
    merged = nemotron.load(summary["final"]).model
    base = tiny.model.state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 2)[-2] in adapter["target_modules"] for k in changed)
    # merging computes what the adapted model computes
    model = _fresh_model(seed=2).eval()
    apply_lora(model, rank=4, targets=["q_proj", "in_proj", "up_proj"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    ids = torch.randint(3, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        assert merge_lora(model) > 0
        assert (model(ids) - before).abs().max() < 1e-4


def test_torchrun_fsdp_matches_one_process(tmp_path, tiny):
    """The real entry point under torchrun (2 gloo processes, FSDP2, 2 rows each) against one process
    with the same 4-row batches: the same losses, and a single unsharded export."""
    import os
    import shutil
    import socket

    data = _pretrain_data(tmp_path)
    common = ["--quiet", f"data=[{data}]", "init_config=toy_super", f"tokenizer={tiny.path}", "steps=4", "seq_len=128",
              "lr=1e-3", "save_every=2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port",
                             str(port), "-m", "nemotron.cli", "train", "pretrain", *common, "batch_size=2",
                             f"out_dir={tmp_path / 'dist'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "nemotron.cli", "train", "pretrain", *common, "batch_size=4",
                             f"out_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    dist_log = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["targets"] for r in dist_log] == [r["targets"] for r in one_log]
    for a, b in zip(dist_log, one_log):   # AdamW turns float noise on tiny gradients into small drifts
        for key, rel in (("loss", 1e-4), ("mtp1_loss", 1e-4), ("aux_loss", 1e-3)):
            assert a[key] == pytest.approx(b[key], rel=rel), key
    assert sorted(p.name for p in (tmp_path / "dist" / "checkpoints" / "step_00000004").iterdir()) == [
        "model.rank0.safetensors", "model.rank1.safetensors", "optimizer.rank0.safetensors",
        "optimizer.rank1.safetensors", "trainer.json"]
    exported = nemotron.load(tmp_path / "dist" / "final").model.state_dict()
    reference = nemotron.load(tmp_path / "one" / "final").model.state_dict()
    assert max(float((exported[k] - reference[k]).abs().max()) for k in reference) < 1e-3


def test_activation_checkpointing_keeps_the_gradients(tiny):
    from nemotron.train.trainer import enable_activation_checkpointing

    examples = [e for c in CONVERSATIONS for e in chat_example(tiny.tokenizer, c)]
    batch = collate(pack(examples, 4096))
    grads = []
    for checkpointed in (False, True):
        model = _fresh_model(seed=3)
        if checkpointed:
            enable_activation_checkpointing(model)
        loss, _ = lm_loss(model, batch, mtp_weight=0.3, aux_coeff=1e-4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize("option", ["autocast=bfloat16", pytest.param("compile=true", marks=pytest.mark.slow)])
def test_bf16_autocast_and_compile_train_like_fp32(tmp_path, tiny, option):
    data = _pretrain_data(tmp_path)
    common = [f"data=[{data}]", "init_config=toy_super", f"tokenizer={tiny.path}", "steps=3", "seq_len=128",
              "batch_size=2", "lr=1e-3"]
    losses = []
    for name, extra in (("plain", []), ("option", [option])):
        train(load_recipe(None, common + extra + [f"out_dir={tmp_path / name}"], "pretrain"), progress=False)
        losses.append([json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert all(abs(a - b) < 2e-2 * a for a, b in zip(*losses)), losses


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from nemotron.train import state

    model = _fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[5, 6, 7]])).sum().backward()
    opt.step()
    first = state.save_training_state(tmp_path, 1, model, opt, {"data": {}})
    calls = []

    def failing_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, tensors, metadata)

    real_write = state.write_safetensors
    monkeypatch.setattr(state, "write_safetensors", failing_write)
    with pytest.raises(OSError):
        state.save_training_state(tmp_path, 2, model, opt, {"data": {}})
    assert state.latest_checkpoint(tmp_path) == first
    monkeypatch.undo()
    restored = _fresh_model(seed=5)
    state.load_training_state(first, restored, torch.optim.AdamW(restored.parameters(), lr=1e-3))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))


def test_grpo_kl_term_by_hand():
    from nemotron.train.stages import grpo_token_loss

    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = grpo_token_loss(logp, logp, torch.tensor([1.0]), mask)
    same, m0 = grpo_token_loss(logp, logp, torch.tensor([1.0]), mask, ref_logp=logp, kl_coeff=0.5)
    assert same.item() == pytest.approx(base.item()) and m0["kl"] == pytest.approx(0.0)
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    with_kl, m = grpo_token_loss(logp, logp, torch.tensor([1.0]), mask, ref_logp=ref, kl_coeff=0.5)
    k3 = (0.5 - torch.log(torch.tensor(0.5)) - 1).item() / 2   # token 1: r = 0.25/0.5; token 2: r = 1 -> 0
    assert m["kl"] == pytest.approx(k3) and with_kl.item() == pytest.approx(base.item() + 0.5 * k3)


def test_aux_loss_never_reads_a_previous_steps_routing():
    """Batches whose lengths make the MTP block's routed positions match the next batch's (packing
    pads to the longest row) once made the aux loss reach into a freed graph."""
    model = _fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for length in (9, 8, 9, 8):   # (9 - 1) * 2 positions in the MTP block == 8 * 2 in the next backbone pass
        ids = torch.randint(3, 260, (2, length), generator=torch.Generator().manual_seed(length))
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
        from nemotron.train.data import Batch

        loss, _ = lm_loss(model, Batch(ids, labels, torch.zeros_like(ids)), mtp_weight=0.3, aux_coeff=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
