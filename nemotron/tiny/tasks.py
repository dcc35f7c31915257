"""Procedural tasks with verifiable answers for the embedded tiny model (no downloaded data).

Each family draws a `Problem` from a seeded `random.Random`: a question, the reasoning steps that
solve it, the answer, the verifier that checks an answer, and (for some families) the tool calls
that would solve it with the calculator or the lookup tool. `conversation()` turns a problem into a
Nemotron 3 chat record in one of three modes: reasoning on, reasoning off, or tool use
(`<tool_call>` -> `<tool_response>` -> answer). Training and held-out splits come from disjoint seed
ranges, so no held-out question is ever generated for training.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------------
# the tools the model may call (OpenAI tool schemas and their implementations)
# --------------------------------------------------------------------------------------------------

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up a unit conversion factor, e.g. 'minutes in an hour'.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}
TOOLS = [CALCULATOR, LOOKUP]

# unit -> (bigger unit, factor): "how many SMALL in N BIG"
UNITS = {
    ("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("hours", "days"): 24, ("days", "weeks"): 7,
    ("meters", "kilometers"): 1000, ("centimeters", "meters"): 100, ("grams", "kilograms"): 1000,
    ("milliliters", "liters"): 1000, ("months", "years"): 12,
}
LOOKUP_TABLE = {f"{small} in a {big[:-1]}": str(f) for (small, big), f in UNITS.items()}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The calculator tool: + - * / and parentheses on numbers, nothing else (no eval)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError("unsupported expression")

    if len(expression) > 200:
        return "error: expression too long"
    try:
        value = walk(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return "error: cannot evaluate"
    return _fmt(value)


def lookup(key: str) -> str:
    return LOOKUP_TABLE.get(key.strip().lower(), "error: unknown key")


TOOL_FUNCTIONS: dict[str, Callable[..., str]] = {"calculator": calculate, "lookup": lookup}


def run_tool(name: str, arguments: dict) -> str:
    """Execute a tool call the way the recipe's evaluation and a chat client would."""
    fn = TOOL_FUNCTIONS.get(name)
    if fn is None:
        return f"error: unknown tool {name}"
    try:
        return fn(**arguments)
    except TypeError:
        return "error: bad arguments"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    family: str
    question: str
    steps: list[str]                 # the reasoning, one line each
    answer: str                      # the final answer text
    verifier: str = "number"         # number | exact | contains
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)   # (tool, arguments), in order
    final_from_tools: Callable[[list[str]], str] | None = field(default=None, repr=False)


# The reasoning traces break every operation into steps a few-million-parameter model can learn:
# a two-digit multiplication goes through its tens and units, an addition or subtraction of a
# two-digit number adds its tens first and then its units.

def times(x: int, c: int) -> str:
    """x * c, through x's tens and units when x has two digits."""
    if x >= 10 and x % 10 and c > 1:
        t, u = x - x % 10, x % 10
        return f"{x} * {c} = {t} * {c} + {u} * {c} = {t * c} + {u * c} = {x * c}."
    return f"{x} * {c} = {x * c}."


def plus(a: int, op: str, b: int) -> str:
    """a + b or a - b, adding (or taking away) b's tens first, then its units."""
    result = a + b if op == "+" else a - b
    if b >= 10 and b % 10:
        t, u = b - b % 10, b % 10
        mid = a + t if op == "+" else a - t
        return f"{a} {op} {b} = {a} {op} {t} {op} {u} = {mid} {op} {u} = {result}."
    return f"{a} {op} {b} = {result}."


def arithmetic(rng: random.Random) -> Problem:
    """Two- and three-step expressions with small operands (results below 400, never negative)."""
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    form = rng.randrange(5)
    if form == 0:
        p = b * c
        expr, steps, value = f"{a} + {b} * {c}", [times(b, c), plus(a, "+", p)], a + p
    elif form == 1:
        s = a + b
        expr, steps, value = f"({a} + {b}) * {c}", [plus(a, "+", b), times(s, c)], s * c
    elif form == 2:
        p = a * c
        d = rng.randint(1, min(30, p - 1))
        expr, steps, value = f"{a} * {c} - {d}", [times(a, c), plus(p, "-", d)], p - d
    elif form == 3:
        p = b * c
        d = rng.randint(1, min(30, a + p - 1))
        expr, steps, value = f"{a} + {b} * {c} - {d}", [times(b, c), plus(a, "+", p), plus(a + p, "-", d)], a + p - d
    else:
        s, d = a + b, rng.randint(1, 30)
        expr, steps, value = f"({a} + {b}) * {c} + {d}", [plus(a, "+", b), times(s, c), plus(s * c, "+", d)], s * c + d
    return Problem("arithmetic", f"What is {expr}?", steps, str(value), "number", [("calculator", {"expression": expr})])


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_ITEMS = ["apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells"]


def word_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    total = a + b - c
    q = (f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
         f"How many {item} does {name} have now?")
    steps = [f"{name} starts with {a}.", plus(a, "+", b), plus(a + b, "-", c)]
    return Problem("word", q, steps, str(total), "number", [("calculator", {"expression": f"{a} + {b} - {c}"})])


def unit_conversion(rng: random.Random) -> Problem:
    (small, big), factor = rng.choice(list(UNITS.items()))
    n = rng.randint(2, 12)
    key = f"{small} in a {big[:-1]}"
    q = f"How many {small} are in {n} {big}?"
    steps = [f"There are {factor} {small} in a {big[:-1]}.", times(n, factor)]
    p = Problem("units", q, steps, str(n * factor), "number",
                [("lookup", {"key": key}), ("calculator", {"expression": f"{n} * {factor}"})])
    return p


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def date_arithmetic(rng: random.Random) -> Problem:
    if rng.random() < 0.5:
        start, k = rng.randrange(7), rng.randint(1, 20)
        end = _DAYS[(start + k) % 7]
        steps = [f"{k} days is {k // 7} weeks and {k % 7} days.", f"{k % 7} days after {_DAYS[start]} is {end}."]
        return Problem("dates", f"What day of the week is {k} days after {_DAYS[start]}?", steps, end, "exact")
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(366))
    k = rng.randint(1, 28)   # at most one month boundary
    end = day + dt.timedelta(days=k)
    month_days = (dt.date(day.year + day.month // 12, day.month % 12 + 1, 1) - dt.timedelta(days=1)).day
    s = day.day + k
    steps = [plus(day.day, "+", k)]
    if s <= month_days:
        steps.append(f"{day.strftime('%B')} has {month_days} days, so it stays in {day.strftime('%B')}.")
    else:
        steps += [f"{day.strftime('%B')} has {month_days} days: {s} - {month_days} = {s - month_days}.",
                  f"That is day {end.day} of {end.strftime('%B')} {end.year}."]
    return Problem("dates", f"What date is {k} days after {day.isoformat()}? Answer as YYYY-MM-DD.", steps,
                   end.isoformat(), "exact")


def sorting(rng: random.Random) -> Problem:
    xs = rng.sample(range(1, 100), rng.randint(3, 6))
    ordered = sorted(xs)
    steps = [f"The smallest is {ordered[0]}, the largest is {ordered[-1]}.",
             "In order: " + ", ".join(map(str, ordered)) + "."]
    return Problem("sorting", "Sort from smallest to largest: " + ", ".join(map(str, xs)) + ".", steps,
                   ", ".join(map(str, ordered)), "exact")


_WORDS = ["banana", "strawberry", "mississippi", "parallel", "committee", "bookkeeper", "assessment", "balloon",
          "cat", "blue", "river", "seven", "lamp", "cloud", "apple", "letter", "butter", "coffee", "pepper", "summer"]
_CONSONANTS, _VOWELS = "bcdfgklmnprstvz", "aeiou"


def any_word(rng: random.Random) -> str:
    """A real word or a made-up one of two to four syllables: families drawn from a handful of
    words would have no held-out questions left that training never saw."""
    if rng.random() < 0.3:
        return rng.choice(_WORDS)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice(_CONSONANTS) if rng.random() < 0.3 else "")
                   for _ in range(rng.randint(2, 4)))


def counting(rng: random.Random) -> Problem:
    word_ = any_word(rng)
    letter = rng.choice(sorted(set(word_)))
    n = word_.count(letter)
    found = " ".join(c for c in word_ if c == letter)
    steps = [f"Spell it: {' '.join(word_)}.", f"The '{letter}'s: {found}.", f"That is {n}."]
    return Problem("counting", f"How many times does the letter '{letter}' appear in '{word_}'?", steps, str(n), "number")


_GREETINGS = [("Hi!", "Hello! How can I help you today?"), ("Thanks!", "You're welcome!"),
              ("Good morning", "Good morning! What can I do for you?"), ("Who are you?", "I am a small Nemotron model.")]


def chat_turn(rng: random.Random) -> Problem:
    q, a = rng.choice(_GREETINGS)
    return Problem("chat", q, ["This is a greeting; answer politely and briefly."], a, "exact")


def instruction(rng: random.Random) -> Problem:
    w = any_word(rng)
    if rng.random() < 0.5:
        n = rng.randint(2, 4)
        return Problem("instructions", f"Repeat the word '{w}' {n} times, separated by spaces.",
                       [f"Write '{w}' {n} times."], " ".join([w] * n), "exact")
    steps = [f"Spell it: {' '.join(w)}.", f"In capitals: {' '.join(w.upper())}."]
    return Problem("instructions", f"Write the word '{w}' in uppercase.", steps, w.upper(), "exact")


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": arithmetic, "word": word_problem, "units": unit_conversion, "dates": date_arithmetic,
    "sorting": sorting, "counting": counting, "chat": chat_turn, "instructions": instruction,
}
TOOL_FAMILIES = ("arithmetic", "word", "units")

# disjoint seed ranges: training draws below EVAL_SEED_BASE, evaluation at or above it
EVAL_SEED_BASE = 10_000_000


EVAL_FAMILIES = tuple(f for f in FAMILIES if f != "chat")   # the chat turns have no held-out variety


# the training mixture leans on the multi-step families, where the model has the most to learn
TRAIN_WEIGHTS = {"arithmetic": 0.32, "word": 0.14, "units": 0.1, "dates": 0.12, "sorting": 0.08, "counting": 0.1,
                 "chat": 0.04, "instructions": 0.1}
# GRPO learns only from groups whose rewards differ: its prompts lean on the families the SFT model
# still gets wrong some of the time, not on those it already always solves (two-step arithmetic)
GRPO_WEIGHTS = {"counting": 0.25, "sorting": 0.25, "instructions": 0.15, "units": 0.15, "dates": 0.1,
                "arithmetic": 0.05, "word": 0.05}
# the families where the SFT model's sampled answers (temperature 1, 8 per question) fix some of its
# greedy mistakes, in both reasoning modes: what RL can turn into greedy accuracy. Instructions are
# left out: sampling breaks their exact formats (16-20% sampled against 53-63% greedy)
GRPO_SOLVABLE = ("counting", "sorting", "units")


def problems(n: int, split: str = "train", seed: int = 0, families: tuple[str, ...] | None = None,
             exclude: set[str] | None = None, weights: dict[str, float] | None = None) -> list[Problem]:
    """n problems, round-robin over the families (or drawn with `weights`); `split` "train" or
    "eval" (disjoint seeds). `exclude`: questions to skip (the held-out ones, when drawing training
    data: small families would otherwise repeat some of them by chance)."""
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    names = list(families or (EVAL_FAMILIES if split == "eval" else FAMILIES))
    base = EVAL_SEED_BASE if split == "eval" else 0
    out, i, tries = [], 0, 0
    while len(out) < n:
        rng = random.Random((base + seed * 1_000_003 + i) % (2 ** 63))
        i += 1
        family = rng.choices(names, [weights.get(f, 0.0) for f in names])[0] if weights \
            else names[len(out) % len(names)]
        p = FAMILIES[family](rng)
        if exclude and p.question in exclude:
            tries += 1
            if tries > 100 * n:
                raise ValueError("the families cannot produce that many questions outside `exclude`")
            continue
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# conversations
# --------------------------------------------------------------------------------------------------


def conversation(p: Problem, mode: str = "think") -> dict:
    """A chat record for SFT: mode "think" (reasoning trace), "no_think" (answer only) or "tool"
    (reasoning, then the tool calls with their results, then the answer; tools offered)."""
    user = {"role": "user", "content": p.question}
    if mode == "no_think":
        return {"messages": [user, {"role": "assistant", "content": p.answer}], "enable_thinking": False}
    if mode == "think":
        return {"messages": [user, {"role": "assistant", "content": p.answer, "reasoning_content": " ".join(p.steps)}]}
    if mode != "tool":
        raise ValueError(f"unknown mode {mode!r}")
    if not p.tool_calls:
        raise ValueError(f"{p.family} problems have no tool solution")
    messages = [user]
    for k, (name, args) in enumerate(p.tool_calls):
        why = "I will use the calculator." if name == "calculator" else "I will look up the factor."
        messages.append({"role": "assistant", "content": None, "reasoning_content": why,
                         "tool_calls": [{"id": f"call_{k}", "type": "function",
                                         "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": run_tool(name, args)})
    messages.append({"role": "assistant", "content": p.answer,
                     "reasoning_content": f"The tool returned {run_tool(*p.tool_calls[-1])}."})
    return {"messages": messages, "tools": TOOLS}


def grpo_prompt(p: Problem, thinking: bool = True) -> dict:
    """A GRPO record: the question, the answer and its verifier."""
    return {"messages": [{"role": "user", "content": p.question}], "answer": p.answer, "verifier": p.verifier,
            "enable_thinking": thinking}
