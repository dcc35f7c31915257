"""Procedural tasks with verifiable answers for the embedded tiny model (no downloaded data).

Each family draws a `Problem` from a seeded `random.Random`: a question, the reasoning steps that
solve it, the answer, the verifier that checks an answer, and (for some families) the tool calls
that would solve it with the calculator or the lookup tool. The families cover their domain rather
than a few fixed forms: arithmetic is a random expression tree (1-4 operations over + - * and
parentheses, operands up to 999) asked in symbols or in words, and the other families ask through
many templates and paraphrases. `conversation()` turns a problem into a Nemotron 3 chat record in
one of three modes: reasoning on, reasoning off, or tool use (`<tool_call>` -> `<tool_response>` ->
answer).

Two kinds of held-out questions: training and evaluation come from disjoint seed ranges (no
evaluation question is generated for training), and a fixed quarter of the forms (templates,
expression shapes) never reaches training, so the evaluation reports questions of a form never seen
beside questions of a known form.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
import operator
import random
import zlib
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


def one(unit: str) -> str:
    """One of a plural unit, with its article: "hours" -> "an hour"."""
    return ("an " if unit[0] in "aeiouh" else "a ") + unit[:-1]


LOOKUP_TABLE = {f"{small} in {one(big)}": str(f) for (small, big), f in UNITS.items()}

_CALC_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The calculator tool: + - * / and parentheses on numbers, nothing else (no eval)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _CALC_OPS:
            return _CALC_OPS[type(node.op)](walk(node.left), walk(node.right))
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
    form: str = ""                   # the question's form: its template and (arithmetic) expression shape


# Held-out forms: every family asks its questions through templates, and arithmetic through
# expression shapes too; a fixed quarter of each never reaches training.
def held_out_shape(shape: str) -> bool:
    """Whether an expression shape ("(n + n) * n") is held out: a quarter of them, by a fixed hash."""
    return zlib.crc32(shape.encode()) % 4 == 0


def pick(rng: random.Random, templates: list, held_out: bool, kind: str) -> tuple[int, object]:
    """A template of `templates` (of kind `kind`) from the training forms or from the held-out
    quarter (every fourth, from an offset the kind fixes; never the first, the plainest form):
    (its index, it)."""
    offset = zlib.crc32(kind.encode()) % 4
    pool = [i for i in range(len(templates)) if (i > 0 and (i + offset) % 4 == 3) == held_out]
    i = rng.choice(pool)
    return i, templates[i]


_SMALL_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
_TENS_WORDS = {30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety",
               100: "a hundred"}


def number_words(n: int) -> str | None:
    """n in words where that is how people write it (0-20, the tens, 100), else None."""
    if 0 <= n <= 20:
        return _SMALL_WORDS[n]
    return _TENS_WORDS.get(n)


def spoken(rng: random.Random, n: int) -> str:
    """n in digits, or in words a third of the time where it has a common word."""
    w = number_words(n)
    return w if w is not None and rng.random() < 0.35 else str(n)


# ---- arithmetic: random expression trees, and the reasoning derived from the tree -----------------
# The traces break every operation into steps a few-million-parameter model can learn: a sum adds
# the second number's place values one at a time (45 + 83 = 45 + 80 + 3), a product multiplies
# place values (12 * 15 = 12 * 10 + 12 * 5), and after each operation the rest of the expression
# is written again with its result in place.

PRECEDENCE = {"+": 1, "-": 1, "*": 2}
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Expr:
    """A number (op None) or an operation on two sub-expressions."""
    value: int
    op: str | None = None
    left: Expr | None = None
    right: Expr | None = None

    def text(self, leaf: Callable[[int], str] = str) -> str:
        """The expression with the parentheses it needs (none where precedence and left-to-right
        order already group it)."""
        if self.op is None:
            return leaf(self.value)
        left, right = self.left.text(leaf), self.right.text(leaf)
        if self.left.op and PRECEDENCE[self.left.op] < PRECEDENCE[self.op]:
            left = f"({left})"
        if self.right.op and PRECEDENCE[self.right.op] <= PRECEDENCE[self.op]:
            right = f"({right})"
        return f"{left} {self.op} {right}"

    def shape(self) -> str:
        return self.text(lambda _: "n")

    def ops(self) -> int:
        return 0 if self.op is None else 1 + self.left.ops() + self.right.ops()


def place_parts(n: int) -> list[int]:
    """n's nonzero place values, largest first: 305 -> [300, 5]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"] or [0]


_COLUMNS = ["ones", "tens", "hundreds", "thousands", "ten thousands"]


def plus(a: int, op: str, b: int) -> str:
    """a + b or a - b, one place value of b at a time, each written as its column's digit fact
    first ("hundreds 6 + 4 = 10, so 8080"): a small model that must write 7680 + 400 in one go
    drops the carry; with the fact in front, the carry is on the page before the digits it changes."""
    if a < 10 and b < 10 or b == 0:
        return f"{a} {op} {b} = {APPLY[op](a, b)}."
    facts, acc = [], a
    for p in place_parts(b):
        k = len(str(p)) - 1
        d, c = p // 10 ** k, acc // 10 ** k % 10
        if op == "+":
            fact = f"{c} + {d} = {c + d}"
        else:
            fact = f"{c} - {d} = {c - d}" if c >= d else f"{c + 10} - {d} = {c + 10 - d}"
        acc = APPLY[op](acc, p)
        facts.append(f"{_COLUMNS[k]} {fact}, so {acc}")
    return f"{a} {op} {b}: " + "; ".join(facts) + "."


def _power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).strip("0") == "1"


def part_product(x: int, y: int) -> str:
    """x * y for numbers of one place value each, written as the digits' table fact first
    ("90 * 50: 9 * 5 = 45, so 4500"): a small model that writes 90 * 50 in one go picks the wrong
    digits or the wrong fact; with the fact in front, only the zeros are left to append."""
    a, b = int(str(x).rstrip("0")), int(str(y).rstrip("0"))
    if (a, b) == (x, y):
        return f"{x} * {y} = {x * y}."
    return f"{x} * {y}: {a} * {b} = {a * b}, so {x * y}."


def times(x: int, y: int) -> str:
    """x * y through place values: the factor with fewer of them is split, and x is multiplied by
    each part; a product of two one-place numbers is its table fact with zeros, and the parts'
    products are added column by column. A product by 10, 100, ... only appends zeros."""
    if x < 2 or y < 2 or _power_of_ten(x) or _power_of_ten(y):
        return f"{x} * {y} = {x * y}."
    if len(place_parts(x)) == 1 and len(place_parts(y)) == 1:
        return part_product(x, y)
    small, big = (y, x) if len(place_parts(y)) <= len(place_parts(x)) else (x, y)
    parts = place_parts(small)
    if len(parts) == 1:
        pairs = [(p, small) for p in place_parts(big)]
        lines = [f"{x} * {y} = " + " + ".join(f"{p} * {q}" for p, q in pairs) + "."]
        lines += [part_product(p, q) for p, q in pairs]
    else:
        lines = [f"{x} * {y} = " + " + ".join(f"{big} * {p}" for p in parts) + "."]
        lines += [times(big, p) for p in parts]
        pairs = [(big, p) for p in parts]
    acc = pairs[0][0] * pairs[0][1]
    for p, q in pairs[1:]:
        lines.append(plus(acc, "+", p * q))
        acc += p * q
    return " ".join(lines)


def evaluation_steps(e: Expr) -> list[str]:
    """The reasoning for e: each operation in the order a person works (parentheses, then products,
    then left to right), its trace, and what remains of the expression after it."""
    steps = [f"{e.text()}."]
    while e.op is not None:
        node = _next_operation(e)
        steps.append(times(node.left.value, node.right.value) if node.op == "*" else
                     plus(node.left.value, node.op, node.right.value))
        e = _replace(e, node, Expr(node.value))
        if e.op is not None:
            steps.append(f"Now {e.text()}.")
    return steps


def _next_operation(e: Expr) -> Expr:
    """The first operation whose operands are both numbers, in the evaluation order of `e`."""
    if e.left.op is not None:
        return _next_operation(e.left)
    if e.right.op is not None:
        return _next_operation(e.right)
    return e


def _replace(e: Expr, old: Expr, new: Expr) -> Expr:
    if e is old:
        return new
    if e.op is None:
        return e
    return Expr(e.value, e.op, _replace(e.left, old, new), _replace(e.right, old, new))


def random_expression(rng: random.Random, ops: int, digits: tuple[int, int], max_value: int = 99_999) -> Expr:
    """A random expression of `ops` operations over + - * with operands of digits[0]..digits[1]
    digits (0 allowed among one-digit ones). Every partial result is in 0..max_value, and products
    stay short to work out (one factor of at most two place values, the other below 1000)."""
    while True:
        e = _draw(rng, ops, digits)
        if e is not None and e.value <= max_value:
            return e


def _draw(rng: random.Random, ops: int, digits: tuple[int, int]) -> Expr | None:
    if ops == 0:
        d = digits[0] if digits[0] == digits[1] else rng.choices(range(digits[0], digits[1] + 1),
                                                                  (3, 5, 2)[:digits[1] - digits[0] + 1])[0]
        return Expr(rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1))
    # mostly left to right, as people write ("45 + 83 - 21 * 2"); sometimes a group on the right
    left_ops = ops - 1 if rng.random() < 0.6 else rng.randint(0, ops - 1)
    op = rng.choices("+-*", (0.4, 0.3, 0.3))[0]
    left, right = _draw(rng, left_ops, digits), _draw(rng, ops - 1 - left_ops, digits)
    if left is None or right is None:
        return None
    if op == "-" and left.value < right.value:
        return None
    if op == "*" and (min(len(place_parts(left.value)), len(place_parts(right.value))) > 2
                      or max(left.value, right.value) >= 1000):
        return None
    value = APPLY[op](left.value, right.value)
    return Expr(value, op, left, right) if value <= 99_999 else None


_SYMBOLIC = ["What is {e}?", "What's {e}?", "Calculate {e}.", "Compute {e}.", "{e} = ?", "How much is {e}?",
             "Evaluate {e}.", "Work out {e}.", "Please calculate {e}.", "Can you compute {e}?", "Solve {e}.",
             "what is {e}", "{e}?", "Find the value of {e}.", "Quick question: what is {e}?", "{e} equals what?",
             "Tell me what {e} is.", "I need {e}.", "What does {e} come to?", "Help me with {e}."]
_OP_WORDS = {"+": ["plus"], "-": ["minus", "minus", "take away"], "*": ["times", "times", "multiplied by"]}
_ONE_OP = {"+": ["What is the sum of {a} and {b}?", "Add {a} and {b}.", "What do you get if you add {a} to {b}?",
                 "What is {b} more than {a}?", "What is the total of {a} and {b}?", "{a} and {b} make how many?"],
           "-": ["What is the difference between {a} and {b}?", "Subtract {b} from {a}.", "What is {b} less than {a}?",
                 "Take {b} away from {a}.", "How much is left if you take {b} from {a}?", "What is {a} take away {b}?"],
           "*": ["What is the product of {a} and {b}?", "Multiply {a} by {b}.", "What is {a} multiplied by {b}?",
                 "What do you get when you multiply {a} and {b}?", "How much is {a} lots of {b}?", "What is {a} times {b}?"]}
_IN_WORDS = ["What is {w}?", "How much is {w}?", "Calculate {w}.", "What's {w}?", "{w} is what?",
             "Can you work out {w}?", "Tell me {w}.", "What do you get for {w}?"]
# a chain of operations said as steps, for expressions worked strictly left to right
_STEPS = ["Start with {a}, {ops}. What do you get?", "Take {a}, {ops}. What is the result?",
          "Begin with {a}, {ops}. What number do you end with?", "If you start at {a}, {ops}, what do you get?",
          "Think of {a}, {ops}. What is the number now?", "Start from {a}: {ops}. What is the answer?",
          "You have {a}; {ops}. What do you have now?", "From {a}, {ops}. Result?"]
_STEP_WORDS = {"+": ["add {x}", "add {x}", "plus {x}", "add on {x}"], "-": ["subtract {x}", "take away {x}", "minus {x}"],
               "*": ["multiply by {x}", "times {x}"]}


def _left_deep(e: Expr) -> bool:
    """Whether e is worked strictly left to right: every right operand is a number."""
    return e.op is None or (e.right.op is None and _left_deep(e.left))


def _said_steps(rng: random.Random, e: Expr) -> tuple[int, list[str]]:
    """A left-deep expression as its first number and the steps that follow ("add 25", ...)."""
    if e.op is None:
        return e.value, []
    first, steps = _said_steps(rng, e.left)
    return first, steps + [rng.choice(_STEP_WORDS[e.op]).format(x=spoken(rng, e.right.value))]


def arithmetic_problem(rng: random.Random, held_out: bool = False, ops: tuple[int, int] = (1, 4),
                       digits: tuple[int, int] = (1, 3), family: str = "arithmetic") -> Problem:
    """An expression of ops[0]..ops[1] operations, asked in symbols or in words, its shape and its
    question template both from the training forms or both from the held-out ones."""
    while True:
        e = random_expression(rng, rng.randint(*ops), digits)
        if e.ops() == 1 or held_out_shape(e.shape()) == held_out:
            break
    expr = e.text()
    chain = "(" not in expr
    r = rng.random()
    if e.ops() == 1 and r < 0.3:            # one operation in words: "the sum of 45 and 83"
        k, template = pick(rng, _ONE_OP[e.op], held_out, f"one{e.op}")
        question = template.format(a=spoken(rng, e.left.value), b=spoken(rng, e.right.value))
        form = f"one{e.op}:{k}"
    elif e.ops() > 1 and _left_deep(e) and r < 0.45:   # as steps: "start with 64, add 25, then subtract 30"
        k, template = pick(rng, _STEPS, held_out, "steps")
        first, said = _said_steps(rng, e)
        ops = ", ".join(said[:-1]) + rng.choice([", then ", " and then ", ", and "]) + said[-1]
        question = template.format(a=spoken(rng, first), ops=ops)
        form = f"steps:{k}:{e.shape()}"
    elif chain and r < 0.6:                 # the operators in words: "45 plus 83 minus 21"
        k, template = pick(rng, _IN_WORDS, held_out, "words")
        words = expr
        for op, names in _OP_WORDS.items():
            words = words.replace(f" {op} ", f" {rng.choice(names)} ")
        said = " ".join(spoken(rng, int(t)) if t.isdigit() else t for t in words.split())
        question = template.format(w=said)
        question = question[0].upper() + question[1:]
        form = f"words:{k}:{e.shape()}"
    else:
        k, template = pick(rng, _SYMBOLIC, held_out, "symbolic")
        question = template.format(e=expr)
        question = question[0].upper() + question[1:] if not template.startswith("{") else question
        form = f"symbolic:{k}:{e.shape()}"
    return Problem(family, question, evaluation_steps(e), str(e.value), "number", [("calculator", {"expression": expr})],
                   form)


def arithmetic(rng: random.Random, held_out: bool = False) -> Problem:
    """Expressions of 1-4 operations on 1-3 digit numbers; a quarter of them one or two operations on
    single digits ("What is 7 * 3 - 5?"), whose table facts the longer traces only write with zeros."""
    if rng.random() < 0.25:
        return arithmetic_problem(rng, held_out, ops=(1, 2), digits=(1, 1))
    return arithmetic_problem(rng, held_out)


def two_digit_arithmetic(rng: random.Random, held_out: bool = False) -> Problem:
    """What a user types first: two or three operations on two-digit numbers ("What is 45 + 83 - 21?")."""
    return arithmetic_problem(rng, held_out, ops=(2, 3), digits=(2, 2), family="arithmetic2")


def parse_expression(text: str) -> Expr | None:
    """The Expr of an expression in + - * and parentheses, None where a partial result is negative."""
    def walk(node):
        if isinstance(node, ast.Constant):
            return Expr(int(node.value))
        left, right = walk(node.left), walk(node.right)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[type(node.op)]
        if left is None or right is None or APPLY[op](left.value, right.value) < 0:
            return None
        return Expr(APPLY[op](left.value, right.value), op, left, right)
    return walk(ast.parse(text, mode="eval").body)


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Mo", "Nia",
          "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]
_ITEMS = ["apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells", "stickers", "cookies",
          "eggs", "pencils", "flowers", "buttons", "candles", "cups"]
# (question, expression): {a} {b} {c} are numbers; "*" slots get small factors
_WORD_TEMPLATES = [
    ("{name} has {a} {item}. {name} gets {b} more and then gives away {c}. How many {item} does {name} have now?", "{a} + {b} - {c}"),
    ("{name} had {a} {item} and gave {b} to a friend. How many {item} are left?", "{a} - {b}"),
    ("There are {a} {item} in one box and {b} in another. How many {item} are there in all?", "{a} + {b}"),
    ("A box holds {a} {item}. How many {item} are in {b} boxes?", "{a} * {b}"),
    ("{name} buys {b} bags with {a} {item} in each. How many {item} is that?", "{b} * {a}"),
    ("{name} reads {a} pages a day for {b} days. How many pages is that?", "{a} * {b}"),
    ("A shop had {a} {item}, sold {b} and then got {c} more. How many {item} does it have now?", "{a} - {b} + {c}"),
    ("{name} saves {a} dollars a week. How much does {name} save in {b} weeks?", "{a} * {b}"),
    ("{name} has {a} dollars and spends {b} dollars. How much money is left?", "{a} - {b}"),
    ("{name} has {a} {item} and {other} has {b}. How many {item} do they have together?", "{a} + {b}"),
    ("{name} has {a} {item}. {other} has {b} more than {name}. How many {item} does {other} have?", "{a} + {b}"),
    ("{name} had {a} {item}, then found {b} more and {c} more. How many {item} now?", "{a} + {b} + {c}"),
    ("There are {b} rows with {a} chairs in each row. How many chairs are there?", "{b} * {a}"),
    ("{name} packs {a} {item} into each of {b} boxes and has {c} left over. How many {item} were there?", "{a} * {b} + {c}"),
    ("{name} has {b} packs of {a} {item} and gives away {c}. How many {item} are left?", "{b} * {a} - {c}"),
    ("Tickets cost {a} dollars each. How much do {b} tickets cost?", "{a} * {b}"),
    ("{name} had {a} {item}. {other} took {b} and then gave back {c}. How many {item} does {name} have?", "{a} - {b} + {c}"),
    ("A class has {a} students and another class has {b}. If {c} students are absent, how many are here?", "{a} + {b} - {c}"),
    ("I have {a} {item} and get {b} more. How many {item} do I have now?", "{a} + {b}"),
    ("I had {a} {item} and lost {b} of them. How many {item} are left?", "{a} - {b}"),
    ("I buy {b} boxes with {a} {item} in each. How many {item} did I buy?", "{b} * {a}"),
    ("We had {a} {item}, used {b} and then bought {c} more. How many {item} do we have?", "{a} - {b} + {c}"),
    ("My jar has {a} {item}. I add {b} and take out {c}. How many {item} are in the jar?", "{a} + {b} - {c}"),
    ("A bag has {a} {item} and a basket has {b}. What is the total?", "{a} + {b}"),
    ("{name} earned {a} dollars on Monday and {b} dollars on Tuesday. How much is that in total?", "{a} + {b}"),
    ("{name} needs {a} {item} and already has {b}. How many more does {name} need?", "{a} - {b}"),
    ("Each of {b} friends brings {a} {item}. How many {item} do they bring altogether?", "{b} * {a}"),
    ("{name} starts with {a} {item}, gives {b} to {other} and gets {c} from a neighbour. How many {item} now?", "{a} - {b} + {c}"),
]


def word_problem(rng: random.Random, held_out: bool = False) -> Problem:
    k, (template, shape) = pick(rng, _WORD_TEMPLATES, held_out, "word")
    while True:
        small = "{a} * {b}" in shape or "{b} * {a}" in shape
        a = rng.randint(2, 60) if small else rng.randint(5, 400)
        b = rng.randint(2, 12) if small else rng.randint(2, 200)
        c = rng.randint(1, 150)
        expr = shape.format(a=a, b=b, c=c)
        e = parse_expression(expr)
        if e is not None:
            break
        # a partial result went below zero: draw again
    name, other = rng.sample(_NAMES, 2)
    q = template.format(name=name, other=other, item=rng.choice(_ITEMS), a=spoken(rng, a), b=spoken(rng, b), c=c)
    return Problem("word", q, evaluation_steps(e), str(e.value), "number", [("calculator", {"expression": expr})],
                   f"word:{k}")


_UNIT_TEMPLATES = ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.", "{n} {big} is how many {small}?",
                   "How many {small} is {n} {big}?", "What is {n} {big} in {small}?", "How many {small} make {n} {big}?",
                   "Change {n} {big} into {small}.", "{n} {big} equals how many {small}?", "How many {small} in {n} {big}?",
                   "Express {n} {big} in {small}.", "How many {small} are there in {n} {big}?",
                   "{n} {big} is the same as how many {small}?", "I have {n} {big}. How many {small} is that?",
                   "Turn {n} {big} into {small}.", "What do {n} {big} come to in {small}?", "Give {n} {big} in {small}.",
                   "If something is {n} {big}, how many {small} is it?", "How many {small} does {n} {big} make?"]


def unit_conversion(rng: random.Random, held_out: bool = False) -> Problem:
    k, template = pick(rng, _UNIT_TEMPLATES, held_out, "units")
    (small, big), factor = rng.choice(list(UNITS.items()))
    n = rng.randint(2, 30)
    key = f"{small} in {one(big)}"
    q = template.format(small=small, big=big, n=spoken(rng, n))
    steps = [f"There are {factor} {small} in {one(big)}.", times(n, factor)]
    return Problem("units", q[0].upper() + q[1:], steps, str(n * factor), "number",
                   [("lookup", {"key": key}), ("calculator", {"expression": f"{n} * {factor}"})], f"units:{k}")


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WEEKDAY_TEMPLATES = ["What day of the week is {k} days after {d}?", "If today is {d}, what day is it in {k} days?",
                      "{k} days from {d} is what day?", "What day comes {k} days after {d}?",
                      "Today is {d}. What day of the week will it be {k} days from now?", "Which day is {k} days after {d}?",
                      "It is {d}. What day will it be after {k} days?", "What weekday is {k} days past {d}?"]
_DATE_TEMPLATES = ["What date is {k} days after {iso}? Answer as YYYY-MM-DD.",
                   "Add {k} days to {iso}. Give the date as YYYY-MM-DD.",
                   "What is the date {k} days after {iso} (YYYY-MM-DD)?",
                   "{iso} plus {k} days is which date? Use YYYY-MM-DD.",
                   "Starting from {iso}, what date is it {k} days later? Answer as YYYY-MM-DD.",
                   "Which date (YYYY-MM-DD) is {k} days after {iso}?"]


def date_arithmetic(rng: random.Random, held_out: bool = False) -> Problem:
    if rng.random() < 0.5:
        i, template = pick(rng, _WEEKDAY_TEMPLATES, held_out, "weekday")
        start, k = rng.randrange(7), rng.randint(1, 30)
        end = _DAYS[(start + k) % 7]
        steps = [f"{k} days is {k // 7} weeks and {k % 7} days.", f"{k % 7} days after {_DAYS[start]} is {end}."]
        q = template.format(k=k, d=_DAYS[start])
        return Problem("dates", q, steps, end, "exact", form=f"weekday:{i}")
    i, template = pick(rng, _DATE_TEMPLATES, held_out, "date")
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(366 * 2))
    k = rng.randint(2, 28)   # at most one month boundary
    end = day + dt.timedelta(days=k)
    month_days = (dt.date(day.year + day.month // 12, day.month % 12 + 1, 1) - dt.timedelta(days=1)).day
    s = day.day + k
    steps = [plus(day.day, "+", k)]
    if s <= month_days:
        steps.append(f"{day.strftime('%B')} has {month_days} days, so it stays in {day.strftime('%B')}.")
    else:
        steps += [f"{day.strftime('%B')} has {month_days} days: {s} - {month_days} = {s - month_days}.",
                  f"That is day {end.day} of {end.strftime('%B')} {end.year}."]
    return Problem("dates", template.format(k=k, iso=day.isoformat()), steps, end.isoformat(), "exact",
                   form=f"date:{i}")


# (question, largest first)
_SORT_TEMPLATES = [("Sort from smallest to largest: {xs}.", False), ("Put these numbers in increasing order: {xs}.", False),
                   ("Arrange in ascending order: {xs}.", False), ("Order from least to greatest: {xs}.", False),
                   ("Sort these numbers: {xs}.", False), ("Can you sort {xs} from low to high?", False),
                   ("Sort from largest to smallest: {xs}.", True), ("Put these in decreasing order: {xs}.", True),
                   ("Arrange in descending order: {xs}.", True), ("Order from greatest to least: {xs}.", True)]


def sorting(rng: random.Random, held_out: bool = False) -> Problem:
    k, (template, descending) = pick(rng, _SORT_TEMPLATES, held_out, "sorting")
    xs = rng.sample(range(1, 1000 if rng.random() < 0.3 else 100), rng.randint(3, 6))
    ordered = sorted(xs, reverse=descending)
    low, high = min(xs), max(xs)
    steps = [f"The smallest is {low}, the largest is {high}.",
             ("From largest to smallest: " if descending else "From smallest to largest: ") + ", ".join(map(str, ordered)) + "."]
    return Problem("sorting", template.format(xs=", ".join(map(str, xs))), steps, ", ".join(map(str, ordered)), "exact",
                   form=f"sorting:{k}")


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


_COUNT_TEMPLATES = ["How many times does the letter '{l}' appear in '{w}'?", "Count the letter '{l}' in '{w}'.",
                    "How many '{l}'s are in '{w}'?", "How often does '{l}' occur in the word '{w}'?",
                    "In the word '{w}', how many times is there an '{l}'?", "How many {l}'s does {w} have?",
                    "Count how many times '{l}' appears in {w}.", "How many letters '{l}' are in the word {w}?"]


def counting(rng: random.Random, held_out: bool = False) -> Problem:
    k, template = pick(rng, _COUNT_TEMPLATES, held_out, "counting")
    word_ = any_word(rng)
    letter = rng.choice(sorted(set(word_)))
    n = word_.count(letter)
    found = " ".join(c for c in word_ if c == letter)
    steps = [f"Spell it: {' '.join(word_)}.", f"The '{letter}'s: {found}.", f"That is {n}."]
    return Problem("counting", template.format(l=letter, w=word_), steps, str(n), "number", form=f"counting:{k}")


# (question, uppercase: else repeat)
_INSTRUCTION_TEMPLATES = [("Repeat the word '{w}' {n} times, separated by spaces.", False), ("Say '{w}' {n} times.", False),
                          ("Write {w} {n} times with spaces between.", False), ("Print the word '{w}' {n} times.", False),
                          ("Write the word '{w}' in uppercase.", True), ("Make '{w}' all capital letters.", True),
                          ("Convert {w} to upper case.", True), ("Spell '{w}' in capitals.", True),
                          ("Type '{w}' in uppercase letters.", True), ("Shout the word '{w}' in capitals.", True)]


def instruction(rng: random.Random, held_out: bool = False) -> Problem:
    k, (template, upper) = pick(rng, _INSTRUCTION_TEMPLATES, held_out, "instructions")
    w = any_word(rng)
    if not upper:
        n = rng.randint(2, 4)
        return Problem("instructions", template.format(w=w, n=spoken(rng, n)), [f"Write '{w}' {n} times."],
                       " ".join([w] * n), "exact", form=f"instructions:{k}")
    steps = [f"Spell it: {' '.join(w)}.", f"In capitals: {' '.join(w.upper())}."]
    return Problem("instructions", template.format(w=w), steps, w.upper(), "exact", form=f"instructions:{k}")


_PLACES = ["France", "Peru", "Kenya", "Japan", "Norway", "Chile", "Egypt", "Canada", "Vietnam", "Poland"]
_TOPICS = ["the sea", "cats", "autumn", "a robot", "friendship", "the moon", "coffee", "trains"]
_ABILITIES = ("I can do arithmetic, word problems, unit conversions, dates, sorting, counting letters and simple "
              "instructions, and I can use a calculator.")
# intent -> (questions, answer, reasoning)
_CHAT = {
    "greeting": (["Hi!", "Hello", "Hey there", "Good morning", "Good evening", "Hi, how are you?", "Hello there!",
                  "Hey!", "Hi there, anyone home?", "Greetings!"],
                 "Hello! How can I help you today?", "This is a greeting; answer politely and briefly."),
    "thanks": (["Thanks!", "Thank you", "Thanks a lot", "Thank you so much!", "Cheers, thanks", "Great, thanks for the help",
                "Many thanks", "Thx"], "You're welcome!", "They thank me; answer briefly."),
    "identity": (["Who are you?", "What are you?", "What is your name?", "Are you a person?", "Tell me about yourself.",
                  "Are you a robot?", "Who made you?", "What model are you?"],
                 "I am a small Nemotron model.", "They ask who I am."),
    "abilities": (["What can you do?", "How can you help me?", "What are you good at?", "What kind of questions can you answer?",
                   "What do you know how to do?", "Can you help me with math?", "What should I ask you?", "Help"],
                  _ABILITIES, "They ask what I can do."),
    "unknown": (["What is the capital of {place}?", "Who is the president of {place}?", "What is the population of {place}?",
                 "What will the weather be tomorrow?", "Who won the football final last year?", "How tall is the tallest building in {place}?",
                 "What is the news today?", "When was {place} founded?"],
                "I don't know. I am a small model: I know arithmetic, units, dates and a few word tasks.",
                "I do not have this knowledge; say so."),
    "refuse": (["Write me a poem about {topic}.", "Translate 'good night' into French.", "Write an essay on {topic}.",
                "Tell me a joke about {topic}.", "Write some Python code to sort a list.", "Summarize this book for me.",
                "Draw a picture of {topic}.", "Compose a song about {topic}."],
               "Sorry, I can't do that. I can help with arithmetic, units, dates and simple word tasks.",
               "This is beyond what I can do; decline politely."),
}


def chat_turn(rng: random.Random, held_out: bool = False) -> Problem:
    intent = rng.choice(sorted(_CHAT))
    questions, answer, why = _CHAT[intent]
    k, q = pick(rng, questions, held_out, f"chat-{intent}")
    question = q.format(place=rng.choice(_PLACES), topic=rng.choice(_TOPICS))
    return Problem("chat", question, [why], answer, "exact", form=f"chat-{intent}:{k}")


FAMILIES: dict[str, Callable[..., Problem]] = {
    "arithmetic": arithmetic, "arithmetic2": two_digit_arithmetic, "word": word_problem, "units": unit_conversion,
    "dates": date_arithmetic, "sorting": sorting, "counting": counting, "chat": chat_turn, "instructions": instruction,
}
TOOL_FAMILIES = ("arithmetic", "arithmetic2", "word", "units")

# disjoint seed ranges: training draws below EVAL_SEED_BASE, evaluation at or above it
EVAL_SEED_BASE = 10_000_000

EVAL_FAMILIES = tuple(FAMILIES)

# the training mixture leans on the multi-step families, where the model has the most to learn
TRAIN_WEIGHTS = {"arithmetic": 0.2, "arithmetic2": 0.28, "word": 0.14, "units": 0.1, "dates": 0.06, "sorting": 0.05,
                 "counting": 0.06, "chat": 0.05, "instructions": 0.06}
# GRPO learns only from groups whose rewards differ: its prompts lean on the families the SFT model
# still gets wrong some of the time, not on those it already always solves
GRPO_WEIGHTS = {"counting": 0.2, "sorting": 0.2, "instructions": 0.1, "units": 0.15, "dates": 0.1,
                "arithmetic": 0.1, "arithmetic2": 0.1, "word": 0.05}
# the families where the SFT model's sampled answers (temperature 1, 8 per question) fix some of its
# greedy mistakes, in both reasoning modes: what RL can turn into greedy accuracy. Instructions are
# left out: sampling breaks their exact formats (16-20% sampled against 53-63% greedy)
GRPO_SOLVABLE = ("counting", "sorting", "units")


# what people put around a question; the held-out quarter of each list reaches only the evaluation
_LEAD_INS = ["Hi! ", "Hey! ", "Quick question: ", "Hello. ", "Please help. ", "I have a question. ", "Can you help me? ",
             "Hi there. ", "Hey, quick one: ", "Question: ", "Help me out. ", "Math time! "]
_TAILS = [" Thanks!", " Thank you.", " Please.", " Thanks in advance.", " Cheers.", " Thanks a lot."]


def with_chatter(rng: random.Random, p: Problem, held_out: bool) -> Problem:
    """p asked with a greeting or a request before it, or thanks after it, some of the time."""
    lead = pick(rng, _LEAD_INS, held_out, "lead")[1] if rng.random() < 0.2 else ""
    tail = pick(rng, _TAILS, held_out, "tail")[1] if rng.random() < 0.12 else ""
    return dataclasses.replace(p, question=lead + p.question + tail)


def problems(n: int, split: str = "train", seed: int = 0, families: tuple[str, ...] | None = None,
             exclude: set[str] | None = None, weights: dict[str, float] | None = None,
             held_out_forms: bool = False) -> list[Problem]:
    """n problems, round-robin over the families (or drawn with `weights`); `split` "train" or
    "eval" (disjoint seeds). held_out_forms: questions of the held-out forms (evaluation only), else
    of the training forms. `exclude`: questions to skip (the held-out ones, when drawing training
    data: small families would otherwise repeat some of them by chance)."""
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    if held_out_forms and split == "train":
        raise ValueError("the held-out forms are for evaluation only")
    names = list(families or (EVAL_FAMILIES if split == "eval" else FAMILIES))
    base = EVAL_SEED_BASE if split == "eval" else 0
    out, i, tries = [], 0, 0
    while len(out) < n:
        rng = random.Random((base + seed * 1_000_003 + i + (1 << 40 if held_out_forms else 0)) % (2 ** 63))
        i += 1
        family = rng.choices(names, [weights.get(f, 0.0) for f in names])[0] if weights \
            else names[len(out) % len(names)]
        p = FAMILIES[family](rng, held_out_forms)
        if family != "chat":
            p = with_chatter(rng, p, held_out_forms)
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
    # clients offer one tool or several: half the conversations offer only the tools the problem uses
    used = {name for name, _ in p.tool_calls}
    offered = TOOLS if zlib.crc32(p.question.encode()) % 2 else [t for t in TOOLS if t["function"]["name"] in used]
    messages = [user]
    for k, (name, args) in enumerate(p.tool_calls):
        # the expression restated before the call: the call then copies symbols just written, not a
        # question in words (the same expression twice costs ~15 tokens)
        why = f"{args['expression']}: I will use the calculator." if name == "calculator" else "I will look up the factor."
        messages.append({"role": "assistant", "content": None, "reasoning_content": why,
                         "tool_calls": [{"id": f"call_{k}", "type": "function",
                                         "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": run_tool(name, args)})
    messages.append({"role": "assistant", "content": p.answer,
                     "reasoning_content": f"The tool returned {run_tool(*p.tool_calls[-1])}."})
    return {"messages": messages, "tools": offered}


def grpo_prompt(p: Problem, thinking: bool = True) -> dict:
    """A GRPO record: the question, the answer and its verifier."""
    return {"messages": [{"role": "user", "content": p.question}], "answer": p.answer, "verifier": p.verifier,
            "enable_thinking": thinking}
