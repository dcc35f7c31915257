"""Reasoning / content / tool-call parsing of Nemotron outputs (nemotron/parsers.py): one-shot and streaming."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest

from nemotron.chat.parsers import Delta, ParsedOutput, StreamingParser, ToolCallWarning, parse_output

ID_RE = re.compile(r"call_[0-9a-f]{24}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
TYPED = {"type": "function", "function": {"name": "typed", "parameters": {"type": "object", "properties": {
    "i": {"type": "integer"}, "f": {"type": "number"}, "b": {"type": "boolean"}, "o": {"type": "object"},
    "a": {"type": "array"}, "s": {"type": "string"}, "js": {"type": "string"}, "n": {"type": "null"},
    "ns": {"type": ["string", "null"]}, "ni": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    "ib": {"type": ["integer", "boolean"]}, "e": {"enum": ["a", "b"]}, "u": {"description": "no type"}}}}}
NOARGS = {"name": "ping"}  # bare (non-OpenAI-wrapped) tool, no parameters
TOOLS = [WEATHER, TYPED, NOARGS]


def xml_call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def json_call(*calls):
    return "<TOOLCALL>" + json.dumps([{"name": n, "arguments": a} for n, a in calls]) + "</TOOLCALL>"


def summary(reasoning, content, calls):
    return (reasoning, content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls])


def final(text, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToolCallWarning)
        p = parse_output(text, **kw)
    for c in p.tool_calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function" and ID_RE.fullmatch(c["id"])
        assert isinstance(c["function"]["arguments"], str)
    return summary(p.reasoning, p.content, p.tool_calls)


def stream(chunks, **kw):
    """Feed chunks; check the delta shapes; return (summary, number of warnings)."""
    p = StreamingParser(**kw)
    r, c, calls = "", "", []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToolCallWarning)
        deltas = [p.feed(ch) for ch in chunks] + [p.finish()]
    for d in deltas:
        assert isinstance(d, Delta)
        r, c = r + d.reasoning, c + d.content
        for tc in d.tool_calls:
            assert tc["index"] == len(calls) and tc["type"] == "function" and ID_RE.fullmatch(tc["id"])
            calls.append(tc)
    assert len({tc["id"] for tc in calls}) == len(calls)
    return summary(r or None, c or None, calls), len(p.warnings)


def check_splits(text, expected=None, **kw):
    """Every 2-way split, 1-char deltas and a few random splits all give parse_output's answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToolCallWarning)
        full = parse_output(text, **kw)
    ref = summary(full.reasoning, full.content, full.tool_calls)
    if expected is not None:
        assert ref == expected
    n_warn = len(full.warnings)
    assert stream([text], **kw) == (ref, n_warn)
    assert stream(list(text), **kw) == (ref, n_warn)
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], **kw) == (ref, n_warn), f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(chunks, **kw) == (ref, n_warn)
    return ref


# ------------------------------------------------------------------------------ reasoning split


def test_reasoning_then_content_every_split():
    check_splits("Let me think.\nOK 2+2=4.\n</think>\n\nThe answer is 4.",
                 (("Let me think.\nOK 2+2=4."), "The answer is 4.", []))


def test_no_think_close_means_all_reasoning():
    assert check_splits("still thinking < about </thin and <tool", ) == \
        ("still thinking < about </thin and <tool", None, [])


def test_stray_think_open_is_stripped():
    check_splits("<think>\nhmm\n</think>\nhi", ("hmm", "hi", []))
    check_splits("a<think>b</think>c<think>d", ("ab", "cd", []))


def test_tool_parsing_off_keeps_markup_as_content():
    text = "ok</think>\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"
    parsed = parse_output(text, tool_calls=False)
    assert parsed.reasoning == "ok" and not parsed.tool_calls
    assert parsed.content == text.split("</think>\n", 1)[1]
    assert parse_output(text).tool_calls  # the same text with parsing on is a call


def test_thinking_off_everything_is_content():
    check_splits("Plain answer.", (None, "Plain answer.", []), thinking=False)
    check_splits("reasoned?</think>\nAnswer", (None, "reasoned?\nAnswer", []), thinking=False)
    check_splits("<think>x</think>y", (None, "xy", []), thinking=False)


def test_empty_and_whitespace_output():
    assert check_splits("") == (None, None, [])
    assert check_splits("  \n ") == (None, None, [])
    assert check_splits("\n</think>\n") == (None, None, [])
    assert check_splits("", thinking=False) == (None, None, [])
    p = parse_output("")
    assert p == ParsedOutput(None, None, [], [])


def test_unicode():
    text = "Réflexion 🤔 — 日本語\n</think>\nRéponse: ✓ 東京 " + xml_call("get_weather", city="Zürich 🇨🇭")
    got = check_splits(text, tools=TOOLS)
    assert got == ("Réflexion 🤔 — 日本語", "Réponse: ✓ 東京", [("get_weather", {"city": "Zürich 🇨🇭"})])
    assert "Zürich" in parse_output(text).tool_calls[0]["function"]["arguments"]  # not \u-escaped


# ------------------------------------------------------------------------ nemotron3 tool calls


def test_tool_call_in_content_every_split():
    text = "Checking.\n</think>\nLet me look.\n" + xml_call("get_weather", city="Paris", days="3") + "\n"
    check_splits(text, ("Checking.", "Let me look.", [("get_weather", {"city": "Paris", "days": 3})]),
                 tools=TOOLS)


def test_multiple_tool_calls_and_content_around():
    text = ("</think>Before " + xml_call("get_weather", city="A") + "\nmiddle\n"
            + xml_call("get_weather", city="B", days="2") + " after")
    check_splits(text, (None, "Before \nmiddle\n after",
                        [("get_weather", {"city": "A"}), ("get_weather", {"city": "B", "days": 2})]), tools=TOOLS)


def test_values_typed_by_schema():
    text = "</think>" + xml_call(
        "typed", i="-42", f="2.5", b="True", o='{"k": [1, 2]}', a="[1, \"x\"]", s="123", js='{"k": 1}', n="null",
        ns="None", ni="null", ib="false", e="a", u='{"j": 1}')
    (_, _, [(name, args)]) = final(text, tools=TOOLS)
    assert name == "typed"
    assert args == {"i": -42, "f": 2.5, "b": True, "o": {"k": [1, 2]}, "a": [1, "x"], "s": "123", "js": '{"k": 1}',
                    "n": None,
                    "ns": None, "ni": None, "ib": False, "e": "a", "u": {"j": 1}}
    assert isinstance(args["i"], int) and isinstance(args["f"], float) and isinstance(args["s"], str)


def test_values_that_do_not_fit_their_type_stay_strings():
    text = "</think>" + xml_call("typed", i="many", f="1e999", b="maybe", o="{not json", a='{"k": 1}',
                                 ns="null but text", s="null", ib="7", extra="[1, 2]", extra2="5")
    (_, _, [(_, args)]) = final(text, tools=TOOLS)
    assert args == {"i": "many", "f": "1e999", "b": "maybe", "o": "{not json", "a": '{"k": 1}',
                    "ns": "null but text", "s": "null", "ib": 7, "extra": [1, 2], "extra2": "5"}


def test_number_and_integer_edge_values():
    text = "</think>" + xml_call("typed", i="5.0", f="7") + xml_call("typed", f="-1.5e3", o="{'py': True}")
    (_, _, calls) = final(text, tools=TOOLS)
    assert calls == [("typed", {"i": 5, "f": 7}), ("typed", {"f": -1500.0, "o": {"py": True}})]
    assert json.loads(parse_output(text, tools=TOOLS).tool_calls[0]["function"]["arguments"])["f"].__class__ is int


def test_no_tools_given_values_are_strings_unless_obvious_json():
    text = "</think>" + xml_call("anything", n="5", b="true", o='{"a": 1}', l="[1]", s="hello")
    assert final(text) == (None, None, [("anything", {"n": "5", "b": "true", "o": {"a": 1}, "l": [1], "s": "hello"})])
    assert final("</think>" + xml_call("ping"), tools=TOOLS) == (None, None, [("ping", {})])


def test_value_newlines_only_one_stripped_each_side():
    text = ("</think><tool_call>\n<function=get_weather>\n<parameter=city>\n\n  two\nlines  \n\n</parameter>\n"
            "</function>\n</tool_call>")
    assert final(text, tools=TOOLS)[2] == [("get_weather", {"city": "\n  two\nlines  \n"})]
    inline = "</think><tool_call><function=get_weather><parameter=city>Rome</parameter></function></tool_call>"
    assert final(inline, tools=TOOLS)[2] == [("get_weather", {"city": "Rome"})]


def test_missing_closing_parameter_and_function_tags():
    last_missing = ("</think><tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
                    "<parameter=days>\n4\n</function>\n</tool_call>")
    check_splits(last_missing, (None, None, [("get_weather", {"city": "Oslo", "days": 4})]), tools=TOOLS)
    middle_missing = ("</think><tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
                      "<parameter=days>\n4\n</parameter>\n</function>\n</tool_call>")
    assert final(middle_missing, tools=TOOLS)[2] == [("get_weather", {"city": "Oslo", "days": 4})]
    no_function_end = "</think><tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</tool_call>"
    assert final(no_function_end, tools=TOOLS)[2] == [("get_weather", {"city": "Oslo"})]


def test_unclosed_tool_call_at_end_becomes_content_with_warning():
    text = "</think>Sure. <tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    with pytest.warns(ToolCallWarning, match="never closed"):
        p = parse_output(text, tools=TOOLS)
    assert p.tool_calls == [] and p.content == text[len("</think>"):] and len(p.warnings) == 1
    check_splits(text, tools=TOOLS)


def test_unknown_function_is_content_with_warning_but_accepted_without_tool_list():
    call = xml_call("launch_missiles", target="moon")
    with pytest.warns(ToolCallWarning, match="unknown function 'launch_missiles'"):
        p = parse_output("</think>" + call, tools=TOOLS)
    assert p.tool_calls == [] and p.content == call
    check_splits("</think>x " + call + " y", (None, "x " + call + " y", []), tools=TOOLS)
    assert final("</think>" + call, tools=None)[2] == [("launch_missiles", {"target": "moon"})]


@pytest.mark.parametrize("bad", [
    "<tool_call>\nno function here\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "<tool_call>\n<function={{ tool.name }}>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get weather>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city\n</tool_call>",
])
def test_malformed_xml_calls_are_kept_as_content(bad):
    with pytest.warns(ToolCallWarning):
        p = parse_output("</think>" + bad)
    assert p.tool_calls == [] and p.content == bad


def test_restarted_tool_call_keeps_abandoned_part_as_text():
    text = "</think><tool_call>\n<function=get_wea" + xml_call("get_weather", city="Lyon")
    got = check_splits(text, tools=TOOLS)
    assert got == (None, "<tool_call>\n<function=get_wea", [("get_weather", {"city": "Lyon"})])


def test_tool_call_inside_reasoning_is_hoisted():
    text = "I should call it.\n" + xml_call("get_weather", city="Kyiv") + "\nDone.\n</think>\nCalling now."
    check_splits(text, ("I should call it.\n\nDone.", "Calling now.", [("get_weather", {"city": "Kyiv"})]),
                 tools=TOOLS)
    # the known failure: call emitted inside the reasoning and </think> never comes
    stall = "Need weather. " + xml_call("get_weather", city="Rome")
    check_splits(stall, ("Need weather.", None, [("get_weather", {"city": "Rome"})]), tools=TOOLS)


def test_call_drafted_in_reasoning_and_repeated_in_content_is_returned_once():
    draft = xml_call("get_weather", city="Rome", days="2")
    again = ("<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n"  # same call, other order
             "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>")
    other = xml_call("get_weather", city="Oslo")
    text = "draft " + draft + "</think>now " + again + other + again
    check_splits(text, ("draft", "now", [("get_weather", {"city": "Rome", "days": 2}),
                                         ("get_weather", {"city": "Oslo"}),
                                         ("get_weather", {"city": "Rome", "days": 2})]), tools=TOOLS)


def test_invalid_or_unfinished_call_in_reasoning_stays_reasoning():
    unknown = "maybe " + xml_call("nope") + " no</think>answer"
    got = check_splits(unknown, tools=TOOLS)
    assert got == ("maybe " + xml_call("nope") + " no", "answer", [])
    unfinished = "draft <tool_call>\n<function=get_weather>\n</think>final"
    assert check_splits(unfinished, tools=TOOLS) == ("draft <tool_call>\n<function=get_weather>", "final", [])


# -------------------------------------------------------------------------------- nemotron_json


def test_json_toolcall_every_split():
    text = "Plan.\n</think>\n\nOK. " + json_call(("get_weather", {"city": "Paris", "days": 2}),
                                                 ("ping", {})) + "\n"
    check_splits(text, ("Plan.", "OK.", [("get_weather", {"city": "Paris", "days": 2}), ("ping", {})]),
                 fmt="nemotron_json", tools=TOOLS)


def test_json_argument_variants():
    text = ('</think><TOOLCALL>{"name": "get_weather", "arguments": "{\\"city\\": \\"Nice\\"}"}</TOOLCALL>'
            '<TOOLCALL>[{"name": "ping"}, {"name": "ping", "parameters": {"x": 1}}, '
            '{"name": "ping", "arguments": ""}]</TOOLCALL>')
    assert final(text, fmt="nemotron_json") == (None, None, [
        ("get_weather", {"city": "Nice"}), ("ping", {}), ("ping", {"x": 1}), ("ping", {})])


@pytest.mark.parametrize("payload", [
    '[{"name": "get_weather", "arguments": {"city": "Paris"}',       # truncated JSON
    "[{'name': 'get_weather'}]",                                     # not JSON
    '[{"arguments": {"city": "Paris"}}]',                            # missing name
    '[{"name": "get_weather", "arguments": {}}, {"name": "nope"}]',   # unknown name (all-or-nothing)
    '[{"name": "get_weather", "arguments": [1, 2]}]',                # arguments not an object
    '[{"name": "get_weather", "arguments": "not json"}]',
    '"just a string"',
    '[1]',
])
def test_json_malformed_blocks_are_kept_as_content(payload):
    raw = "<TOOLCALL>" + payload + "</TOOLCALL>"
    with pytest.warns(ToolCallWarning):
        p = parse_output("</think>Text " + raw, fmt="nemotron_json", tools=TOOLS)
    assert p.tool_calls == [] and p.content == "Text " + raw
    check_splits("</think>Text " + raw, fmt="nemotron_json", tools=TOOLS)


def test_json_unclosed_block_and_hoisting():
    text = '</think>x <TOOLCALL>[{"name": "ping", "arguments": {}}]'
    assert check_splits(text, fmt="nemotron_json") == (None, text[len("</think>"):], [])
    hoist = 'think ' + json_call(("ping", {"a": 1})) + ' more</think>done'
    check_splits(hoist, ("think  more", "done", [("ping", {"a": 1})]), fmt="nemotron_json")


def test_json_model_opens_think_itself():
    kw = dict(fmt="nemotron_json", prompt_opens_think=False)
    check_splits("\n<think>\nreason\n</think>\n\nanswer", ("reason", "answer", []), **kw)
    check_splits("no reasoning here </think> ok", (None, "no reasoning here  ok", []), **kw)
    check_splits("<thin", (None, "<thin", []), **kw)
    check_splits("<think>\n</think>\n\nanswer", (None, "answer", []), fmt="nemotron_json", thinking=False,
                 prompt_opens_think=False)
    # a <tool_call> tag means nothing in this format, a <TOOLCALL> means nothing in nemotron3
    assert final("</think><tool_call>x</tool_call>", fmt="nemotron_json") == (None, "<tool_call>x</tool_call>", [])
    assert final("</think>" + json_call(("ping", {}))) == (None, json_call(("ping", {})), [])


# ------------------------------------------------- round trip through the real chat templates

TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat_templates"
ROUND_TRIP_ARGS = {"i": 7, "f": 0.25, "b": True, "o": {"k": ["v", 1]}, "a": [1, 2], "s": "007",
                   "js": "multi\nline  ", "e": "b"}


def render_history(template_name, **kwargs):
    path = TEMPLATES / template_name
    if not path.exists():
        pytest.skip(f"{path} not present")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters.setdefault("tojson", lambda v, **kw: json.dumps(v, ensure_ascii=False))
    return env.from_string(path.read_text()).render(**kwargs)


def test_round_trip_nemotron3_template_tool_call():
    """An assistant turn as the Nemotron 3 template renders it parses back to the same message."""
    call = {"type": "function", "function": {"name": "typed", "arguments": ROUND_TRIP_ARGS}}
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "reasoning_content": "Need a call.", "content": "Calling.", "tool_calls": [call]}]
    text = render_history("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", messages=msgs, tools=TOOLS)
    turn = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    assert turn.startswith("<think>\n") and "<function=typed>" in turn
    generated = turn[len("<think>\n"):]  # the generation prompt supplies "<think>\n"
    got = check_splits(generated, tools=TOOLS)
    assert got == ("Need a call.", "Calling.", [("typed", ROUND_TRIP_ARGS)])


def test_round_trip_nano_v2_template_toolcall():
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Sure.", "tool_calls": [call, call]},
            {"role": "user", "content": "again"}]
    text = render_history("NVIDIA-Nemotron-Nano-v2.jinja", messages=msgs, tools=TOOLS)
    turn = text.split("<SPECIAL_11>Assistant\n")[1].split("\n<SPECIAL_12>")[0]
    assert "<TOOLCALL>[" in turn
    got = check_splits("reasoning\n</think>\n\n" + turn, fmt="nemotron_json", tools=TOOLS)
    assert got == ("reasoning", "Sure.", [("get_weather", {"city": "Zürich", "days": 2})] * 2)


# ---------------------------------------------------------------------------------- streaming


def test_streaming_emits_promptly_and_holds_only_tag_prefixes():
    p = StreamingParser(tools=TOOLS)
    assert p.feed("Thinking hard").reasoning == "Thinking hard"
    assert p.feed(" about it <").reasoning == " about it"   # '<' may start </think>; ' ' is held with it
    assert p.feed("/thi").reasoning == ""
    d = p.feed("nk>\nAnswer")
    assert d.reasoning == "" and d.content == "Answer"
    assert p.feed(" is 4 <tool").content == " is 4"
    d = p.feed("_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n")
    assert not d and d.tool_calls == []                        # nothing until the block closes
    d = p.feed("</tool_call>")
    assert d.content == "" and len(d.tool_calls) == 1
    tc = d.tool_calls[0]
    assert tc["index"] == 0 and tc["type"] == "function" and ID_RE.fullmatch(tc["id"])
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert p.feed(" <i>x</i>").content == "  <i>x</i>"         # held ' ' from before; '<i' is no tag prefix
    assert not p.finish()
    assert not p.finish()                                      # idempotent
    with pytest.raises(RuntimeError):
        p.feed("more")


def test_streaming_finish_flushes_held_prefix():
    p = StreamingParser(thinking=False)
    assert p.feed("a <tool_ca").content == "a"
    assert p.finish().content == " <tool_ca"


def test_delta_and_message_shapes():
    text = "why</think>ok" + xml_call("get_weather", city="X")
    p = parse_output(text, tools=TOOLS)
    msg = p.to_message()
    assert msg["role"] == "assistant" and msg["content"] == "ok"
    assert msg["reasoning"] == msg["reasoning_content"] == "why"
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "tool_calls" not in parse_output("hi", thinking=False).to_message()
    d = StreamingParser().feed("r</think>c")
    assert d.to_openai() == {"reasoning": "r", "reasoning_content": "r", "content": "c"}
    assert Delta().to_openai() == {} and not Delta()


def test_bad_format_name_raises():
    with pytest.raises(ValueError):
        StreamingParser(fmt="hermes")


def test_malformed_tool_list_entries_are_ignored():
    tools = [None, "x", {"function": {"name": 3}}, {"type": "function", "function": {"name": "ping",
                                                                                      "parameters": "bad"}}]
    assert final("</think>" + xml_call("ping", a="1"), tools=tools) == (None, None, [("ping", {"a": "1"})])


# -------------------------------------------------------------------------------------- fuzz

FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<function=get_weather>", "<function=typed>",
    "<function=nope>", "<function=", "<parameter=city>", "<parameter=days>", "<parameter=o>", "</parameter>",
    "</function>", "<TOOLCALL>", "</TOOLCALL>", '[{"name": "ping", "arguments": {"a": 1}}]', '[{"name": ',
    '{"x": [1, 2]}', "\n", " ", "  \n", "Paris", "42", "true", "é🤔", "<", "</", "<t", "</th", ">", "text", "{",
]


def test_fuzz_no_exceptions_and_stream_equals_final():
    rng = random.Random(1234)
    for trial in range(400):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14)))
        kw = dict(fmt=rng.choice(["nemotron3", "nemotron_json"]), thinking=rng.random() < 0.7,
                  prompt_opens_think=rng.random() < 0.7, tools=rng.choice([None, TOOLS]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ToolCallWarning)
            full = parse_output(text, **kw)
        ref = (summary(full.reasoning, full.content, full.tool_calls), len(full.warnings))
        cuts = sorted(rng.sample(range(len(text) + 1), min(rng.randint(0, 6), len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(chunks, **kw) == ref, (trial, chunks, kw)
        assert stream(list(text), **kw) == ref, (trial, text, kw)
        for part in (full.reasoning, full.content):
            assert part is None or (part and part == part.strip())
        for call in full.tool_calls:
            assert call["function"]["name"] in text
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
        if not kw["thinking"] and not any(t in text for t in ("<think>", "</think>", "<tool_call>", "<TOOLCALL>")):
            assert full.content == (text.strip() or None)
