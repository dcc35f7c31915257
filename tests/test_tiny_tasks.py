"""The procedural task generator: deterministic, disjoint splits, verifiable answers, tool records
that the project's chat template renders and its parser reads back."""

from __future__ import annotations

import json
import re

import pytest

from nemotron.chat.template import apply_chat_template
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.chat.parsers import parse_output
from nemotron.tiny.tasks import (FAMILIES, TOOL_FAMILIES, TOOLS, calculate, conversation, evaluation_steps,
                                 grpo_prompt, lookup, parse_expression, plus, problems, run_tool, times)
from nemotron.train.rewards import REWARDS


def test_generation_is_deterministic_and_splits_are_disjoint():
    a, b = problems(200, "train"), problems(200, "train")
    assert [p.question for p in a] == [p.question for p in b]
    held_out = {p.question for p in problems(400, "eval")}
    train = problems(2000, "train", families=("arithmetic", "word", "dates", "counting"), exclude=held_out)
    assert len(train) == 2000 and not held_out & {p.question for p in train}
    # without the exclusion small families do repeat held-out questions: the filter is needed
    assert held_out & {p.question for p in problems(2000, "train", families=("counting",))}
    assert {p.family for p in a} == set(FAMILIES) == {p.family for p in problems(50, "eval")}
    with pytest.raises(ValueError):
        problems(5, "train", held_out_forms=True)


def test_held_out_forms_never_reach_training():
    """Every family has forms (templates, expression shapes) that only the evaluation asks, and
    training never draws one of them."""
    seen = problems(6000, "train", seed=5)
    unseen = problems(1500, "eval", seed=5, held_out_forms=True)
    for family in FAMILIES:
        train_forms = {p.form for p in seen if p.family == family}
        held = {p.form for p in unseen if p.family == family}
        assert train_forms and held and not train_forms & held, family
    # the questions a user types first: two and three operations on two-digit numbers, whose
    # held-out shapes include the plain chain "n + n + n"
    two_digit = [p for p in unseen if p.family == "arithmetic2"]
    shapes = {p.form.split(":")[-1] for p in two_digit}
    assert "n + n + n" in shapes and {s.count("n") for s in shapes} == {3, 4}
    numbers = [int(t) for p in two_digit for t in p.steps[0].replace("(", " ").replace(")", " ").rstrip(".").split()
               if t.isdigit()]
    assert numbers and all(10 <= x <= 99 for x in numbers)


COLUMNS = ["ones", "tens", "hundreds", "thousands", "ten thousands"]
FACT = re.compile(r"^(?P<col>[a-z ]+) (?P<c>\d+) (?P<op>[+-]) (?P<d>\d) = (?P<s>\d+), so (?P<acc>\d+)$")


def check_facts(facts: str, acc: int | None, op: str | None) -> int:
    """Each "hundreds 6 + 4 = 10, so 8080" is a right digit fact about the column of the number
    before it (acc, where known), and its result is that number with the place value added or
    taken away; returns the last result."""
    for fact in facts.split("; "):
        m = FACT.match(fact.lower())
        assert m, fact
        k, c, d, s = COLUMNS.index(m["col"]), int(m["c"]), int(m["d"]), int(m["s"])
        assert s == (c + d if m["op"] == "+" else c - d) and s >= 0, fact
        if acc is not None:
            assert c == acc // 10 ** k % 10 + (10 if m["op"] == "-" and c >= 10 else 0), (fact, acc)
            assert int(m["acc"]) == (acc + d * 10 ** k if m["op"] == "+" else acc - d * 10 ** k), (fact, acc)
        assert op in (None, m["op"]), fact
        acc = int(m["acc"])
    return acc


PART_PRODUCT = re.compile(r"^(?P<x>\d+) \* (?P<y>\d+): (?P<a>\d) \* (?P<b>\d) = (?P<ab>\d+), so (?P<r>\d+)$")


def test_arithmetic_traces_are_right_at_every_step():
    """Each line of a trace is a chain "a op b = ... = r" whose every link has the same value, a
    sum worked column by column through right digit facts, or a product of two one-place numbers
    worked as its digits' table fact; each "Now ..." line is the rest of the expression, worth the
    answer."""
    for p in problems(400, "train", seed=6, families=("arithmetic", "arithmetic2", "word")):
        assert calculate(p.steps[0].rstrip(".")) == p.answer, p
        for line in p.steps[1:]:
            for sentence in line.split(". "):
                sentence = sentence.rstrip(".")
                if sentence.startswith("Now "):
                    assert calculate(sentence[4:]) == p.answer, (p.question, sentence)
                elif m := PART_PRODUCT.match(sentence):
                    x, y, a, b = (int(m[k]) for k in "xyab")
                    assert str(x).rstrip("0") == str(a) and str(y).rstrip("0") == str(b), sentence
                    assert int(m["ab"]) == a * b and int(m["r"]) == x * y, sentence
                elif ": " in sentence:
                    head, _, facts = sentence.partition(": ")
                    first = head.split()
                    assert str(check_facts(facts, int(first[0]), first[1])) == calculate(head), sentence
                else:
                    links = sentence.split(" = ")
                    assert len(links) >= 2 and len({calculate(x) for x in links}) == 1, (p.question, sentence)
    # each operation is broken into place values, each worked as its column's digit fact first
    assert plus(45, "+", 83) == "45 + 83: tens 4 + 8 = 12, so 125; ones 5 + 3 = 8, so 128."
    assert plus(305, "-", 120) == "305 - 120: hundreds 3 - 1 = 2, so 205; tens 10 - 2 = 8, so 185."
    assert plus(128, "-", 70) == "128 - 70: tens 12 - 7 = 5, so 58." and plus(3, "+", 4) == "3 + 4 = 7."
    assert plus(45, "+", 0) == "45 + 0 = 45."
    # and a product's parts as the table facts of their digits, with the zeros appended after
    assert times(12, 15) == ("12 * 15 = 12 * 10 + 12 * 5. 12 * 10 = 120. 12 * 5 = 10 * 5 + 2 * 5. "
                             "10 * 5: 1 * 5 = 5, so 50. 2 * 5 = 10. 50 + 10: tens 5 + 1 = 6, so 60. "
                             "120 + 60: tens 2 + 6 = 8, so 180.")
    assert times(14, 90) == ("14 * 90 = 10 * 90 + 4 * 90. 10 * 90: 1 * 9 = 9, so 900. 4 * 90: 4 * 9 = 36, so 360. "
                             "900 + 360: hundreds 9 + 3 = 12, so 1200; tens 0 + 6 = 6, so 1260.")
    assert times(70, 40) == "70 * 40: 7 * 4 = 28, so 2800." and times(7, 4) == "7 * 4 = 28."


def test_expressions_print_the_parentheses_they_need():
    e = parse_expression("(45 + 83) * 2 - (7 - 3) + 5 * (6 + 1)")
    assert e.text() == "(45 + 83) * 2 - (7 - 3) + 5 * (6 + 1)" and e.value == 287
    assert parse_expression("45 - (8 + 3)").text() == "45 - (8 + 3)" and parse_expression("45 - 8 + 3").text() == "45 - 8 + 3"
    assert parse_expression("3 - 5") is None   # partial results never go below zero
    assert evaluation_steps(parse_expression("2 + 3 * 4")) == ["2 + 3 * 4.", "3 * 4 = 12.", "Now 2 + 12.", "2 + 12: tens 0 + 1 = 1, so 12; ones 2 + 2 = 4, so 14."]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_answers_pass_their_verifier_and_tools_reproduce_them(family):
    for p in problems(30, "train", seed=1, families=(family,)):
        record = grpo_prompt(p)
        assert REWARDS[record["verifier"]](p.answer, record) == 1.0, p
        assert REWARDS[record["verifier"]]("something else entirely", record) == 0.0, p
        if p.tool_calls:   # the last tool result is the answer
            assert run_tool(*p.tool_calls[-1]) == p.answer, p


def test_calculator_is_safe_and_lookup_knows_the_units():
    assert calculate("(3 + 4) * 5") == "35" and calculate("7 / 2") == "3.5" and calculate("-2 * 3") == "-6"
    for bad in ("__import__('os')", "2 ** 10", "1 / 0", "a + 1", "x" * 300):
        assert calculate(bad).startswith("error")
    assert lookup("minutes in an hour") == "60" and lookup("Grams in a kilogram") == "1000"
    assert run_tool("nope", {}) .startswith("error") and run_tool("calculator", {"x": 1}).startswith("error")


def test_tool_conversations_render_and_parse_back(tmp_path):
    from nemotron.io.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(init_checkpoint(tmp_path / "t", seed=0))
    for p in problems(12, "train", seed=2, families=TOOL_FAMILIES):
        record = conversation(p, "tool")
        text = apply_chat_template(tok, record["messages"], tools=record["tools"], add_generation_prompt=False)
        assert "<tool_call>\n<function=" in text and "<tool_response>" in text and text.rstrip().endswith("<|im_end|>")
        # the first assistant turn, as the model would write it, parses into the OpenAI call
        first = record["messages"][1]
        call = first["tool_calls"][0]["function"]
        raw = (f"{first['reasoning_content']}\n</think>\n<tool_call>\n<function={call['name']}>\n"
               + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in json.loads(call["arguments"]).items())
               + "</function>\n</tool_call>\n")
        parsed = parse_output(raw, tools=TOOLS)
        assert [c["function"]["name"] for c in parsed.tool_calls] == [call["name"]]
        assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == json.loads(call["arguments"])
        for turn in record["messages"]:   # each calculator call's reasoning restates its expression first
            for c in turn.get("tool_calls") or []:
                if c["function"]["name"] == "calculator":
                    assert turn["reasoning_content"].startswith(json.loads(c["function"]["arguments"])["expression"] + ":")
    for mode in ("think", "no_think"):
        record = conversation(problems(1, "train", seed=3)[0], mode)
        apply_chat_template(tok, record["messages"], add_generation_prompt=False,
                            enable_thinking=record.get("enable_thinking", True))
    with pytest.raises(ValueError):
        conversation(problems(1, "train", families=("sorting",))[0], "tool")


def test_trained_tokenizer_splits_digits_and_keeps_special_tokens(tmp_path):
    from nemotron.chat.template import prepare_chat
    from nemotron.tiny.tokenizer import train_tokenizer
    from nemotron.io.tokenizer import Tokenizer

    corpus = []
    for p in problems(300, "train", seed=4):
        corpus.append(json.dumps(conversation(p, "think")))
        corpus.append(p.question + " " + p.answer)
    tok = Tokenizer.from_dir(train_tokenizer(corpus, tmp_path / "tok", vocab_size=600))
    assert tok.vocab_size <= 600
    text = "Ana has 1234 apples. <think>\n12 * 34 = 408.\n</think>\n<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in tok.encode("1234 + 408")]
    assert [p for p in pieces if p.strip().isdigit()] == ["1", "2", "3", "4", "4", "0", "8"]
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                    "<tool_response>", "</tool_response>"):
        assert len(tok.encode(special)) == 1
    prompt = prepare_chat(tok, [{"role": "user", "content": "What is 2 + 3?"}], TOOLS, True)
    assert prompt.text.endswith("<|im_start|>assistant\n<think>\n") and prompt.fmt == "nemotron3"
    assert len(tok.encode("Sort from smallest to largest")) < len("Sort from smallest to largest") / 2  # merges learnt


def test_the_tiny_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """data -> tokenizer -> pretrain -> SFT -> GRPO -> export, with the evaluation table after each
    stage (a few steps each: the wiring, not the accuracy, which the full recipe run measures)."""
    import nemotron
    from nemotron.tiny.recipe import TinyRecipe, embedded_model_config, run

    recipe = TinyRecipe(out_dir=str(tmp_path / "tiny"), train_problems=200, eval_problems=7, seq_len=512,
                        pretrain_steps=2, sft_steps=2, grpo_steps=1, batch_size=2, max_new_tokens=8,
                        eval_max_new_tokens=24)
    table = run(recipe, progress=False)
    assert list(table) == ["pretrain", "sft", "grpo", "speed", "minutes"]
    assert list(table["sft"]) == ["seen forms", "held-out forms"]
    assert all(set(split) == {"off", "on", "tools"} for split in table["sft"].values())
    assert "tool_call_rate" in table["grpo"]["held-out forms"]["tools"]
    speed = table["speed"]
    assert speed["decode_tokens_per_s"] > 0 and speed["mtp_acceptance_length"] >= 1.0
    assert speed["mtp_same_text"]   # MTP speculation is exact
    report = (tmp_path / "tiny" / "eval.md").read_text()
    assert report.startswith("| stage | forms | reasoning |") and "| grpo | held-out | on |" in report
    assert "acceptance length" in report
    m = nemotron.load(tmp_path / "tiny" / "final")
    assert m.tokenizer is not None and m.model.mtp is not None
    params = sum(p.numel() for p in nemotron.models.build_model(embedded_model_config(1024)).parameters())
    assert 2e6 < params < 8e6   # "a few million parameters"
    # a re-run with new GRPO settings reuses the pretrain and SFT stages and redoes GRPO only
    stamps = {s: (tmp_path / "tiny" / s / "final" / "model.safetensors").stat().st_mtime_ns
              for s in ("pretrain", "sft", "grpo")}
    recipe.grpo_lr *= 2
    run(recipe, progress=False)
    again = {s: (tmp_path / "tiny" / s / "final" / "model.safetensors").stat().st_mtime_ns
             for s in ("pretrain", "sft", "grpo")}
    assert [again[s] == stamps[s] for s in stamps] == [True, True, False]


def test_recipe_cli_rejects_bad_settings_before_any_work(tmp_path):
    import subprocess
    import sys

    for bad, message in (("pretrain_stepz=3", "unknown setting"), ("pretrain_steps=many", "must be int"),
                         ("packing=tight", "packing must be one of"),
                         ("sft_optimizer=sgd", "sft_optimizer must be one of")):
        r = subprocess.run([sys.executable, "-m", "nemotron.cli", "recipe", "tiny", f"out_dir={tmp_path / 'x'}", bad],
                           capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr
    assert not (tmp_path / "x").exists()
