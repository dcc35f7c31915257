"""The embedded tiny model as it ships: loadable offline by name, the default of every command,
small, and good at what its recipe taught it (held-out questions, tool calls through the server)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import nemotron
from nemotron.tiny import MODEL_DIR
from nemotron.tiny.evaluate import evaluate
from nemotron.tiny.recipe import TinyRecipe
from nemotron.tiny.tasks import EVAL_FAMILIES, TOOLS, calculate, problems
from nemotron.train.rewards import reward_number

# a held-out question (evaluation seeds) the README's main command asks
README_QUESTION, README_ANSWER = "What is 76 + 26 + (37 + 62)?", "201"


@pytest.fixture(scope="module")
def tiny():
    return nemotron.load("tiny")


def test_ships_inside_the_package_within_30_mb(tiny):
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert sum(files.values()) <= 30 * 2 ** 20
    assert tiny.path == MODEL_DIR and tiny.config.model_type == "nemotron_h"
    assert tiny.model.mtp is not None and set(tiny.config.hybrid_override_pattern) == {"M", "E", "*"}


def test_held_out_two_digit_arithmetic_with_reasoning_beats_reasoning_off(tiny):
    """What a user types first (two or three operations on two-digit numbers), in forms training
    never saw: 12 of these 16 right as shipped, none with reasoning off."""
    questions = problems(16, "eval", seed=1, families=("arithmetic2",), held_out_forms=True)
    table = evaluate(tiny, questions, ("off", "on"), max_new_tokens=768)
    assert table["on"]["arithmetic2"] >= 0.5 and table["on"]["arithmetic2"] > table["off"]["arithmetic2"]


def test_readme_main_command_answers_a_held_out_question():
    recipe = TinyRecipe()   # the recipe's held-out questions are kept out of its training data
    assert README_QUESTION in {p.question for p in problems(recipe.eval_problems, "eval", recipe.seed, EVAL_FAMILIES)}
    r = subprocess.run([sys.executable, "-m", "nemotron.cli", "generate", README_QUESTION],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert reward_number(r.stdout.strip().splitlines()[-1], {"answer": README_ANSWER}) == 1.0, r.stdout


def test_server_tool_calls_on_held_out_calculator_questions():
    """Through `nemotron serve` (default model) and the openai client, with the tools the recipe
    trains with offered: a valid calculator call for >= 90% of held-out questions, and the final
    answer uses the tool's result."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from serving import running_server

    questions = problems(40, "eval", seed=2, families=("arithmetic", "word"))

    def ask(client, p):
        messages = [{"role": "user", "content": p.question}]
        r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=96,
                                           temperature=0)
        msg = r.choices[0].message
        if not msg.tool_calls or msg.tool_calls[0].function.name != "calculator":
            return False, False
        try:
            expression = json.loads(msg.tool_calls[0].function.arguments)["expression"]
        except (ValueError, KeyError, TypeError):
            return False, False
        result = calculate(expression)
        messages += [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": result}]
        final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=96,
                                               temperature=0).choices[0].message.content or ""
        return True, reward_number(final, {"answer": result}) == 1.0

    with running_server("tiny") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda p: ask(client, p), questions))
    valid = sum(v for v, _ in results) / len(results)
    used = sum(u for _, u in results) / len(results)
    print(f"\nvalid calculator calls {valid:.0%}, final answers using the result {used:.0%} ({len(results)} questions)")
    assert valid >= 0.9 and used >= 0.9, (valid, used)
