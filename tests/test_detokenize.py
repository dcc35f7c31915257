"""Incremental detokenization against tokenizer.decode, on byte-level, trained byte-level BPE and
Metaspace (SentencePiece-style) tokenizers; stop-string matching on streamed text."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemotron.inference.detokenize import IncrementalDetokenizer, StopStrings
from nemotron.io.tokenizer import NEMOTRON3_SPECIAL_TOKENS, write_byte_tokenizer
from nemotron.io.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé, déjà vu; 中文测试 and 日本語 too",
    "thumbs 👍🏽 up 👍 and a family 👨‍👩‍👧 emoji",
    "  two spaces   three spaces\tand a tab\nnew line",
] * 30
TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "naïve café 中文测试 👍🏽 done",
    "👨‍👩‍👧👍🏽",
    "é",
    "line one\nline\ttwo",
]
SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("byte")
    write_byte_tokenizer(d)
    return Tokenizer.from_dir(d)


def _train(model, pre, dec, trainer) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.pre_tokenizer, tok.decoder = pre, dec
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_tok() -> HFTokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    return _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                  trainers.BpeTrainer(vocab_size=500, initial_alphabet=alphabet, special_tokens=SPECIALS,
                                      show_progress=False))


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def metaspace_tok(request) -> HFTokenizer:
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    dec = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if request.param == "bpe":
        return _train(models.BPE(unk_token="<unk>"), pre, dec,
                      trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False))
    return _train(models.Unigram(), pre, dec,
                  trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False))


def _encode(tok, text: str) -> list[int]:
    tok = getattr(tok, "backend", tok)
    return tok.encode(text, add_special_tokens=False).ids


def _decode(tok, ids: list[int], skip: bool = False) -> str:
    return getattr(tok, "backend", tok).decode(ids, skip_special_tokens=skip)


def _stream(tok, ids: list[int], skip: bool = False, prompt: list[int] | None = None) -> list[str]:
    """Feed ids one by one; check the invariants at every step; return the deltas (+ flush)."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt)
    prompt = prompt or []
    base = _decode(tok, prompt, skip)
    deltas = []
    for k, t in enumerate(ids, 1):
        deltas.append(detok.add(t))
        assert "\ufffd" not in deltas[-1], (k, deltas)
        assert detok.text == "".join(deltas)
        full = _decode(tok, prompt + ids[:k], skip)
        if not full.endswith("\ufffd"):  # nothing held back once the decoded tail is complete
            assert base + detok.text == full, (k, detok.text, full)
    deltas.append(detok.flush())
    assert detok.token_ids == ids
    return deltas


def test_byte_level_multibyte_characters(byte_tok):
    for text in TEXTS:
        ids = _encode(byte_tok, text)
        assert len(ids) == len(text.encode())  # one token per byte: every non-ASCII char spans tokens
        deltas = _stream(byte_tok, ids)
        assert "".join(deltas) == byte_tok.decode(ids) == text
        # each character (code point) arrives whole, at the token that completes it
        assert [d for d in deltas if d] == list(text)


def test_byte_level_holds_back_incomplete_character(byte_tok):
    ids = _encode(byte_tok, "中")
    detok = IncrementalDetokenizer(byte_tok)
    assert [detok.add(t) for t in ids] == ["", "", "中"]
    # an incomplete character at the end is flushed as decode renders it
    detok = IncrementalDetokenizer(byte_tok)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == byte_tok.decode(ids[:1]) == "\ufffd"


def test_trained_byte_level_bpe(bpe_tok):
    for text in TEXTS:
        ids = _encode(bpe_tok, text)
        assert "".join(_stream(bpe_tok, ids)) == bpe_tok.decode(ids) == text
    # merges really happened, and some token carries a partial character (the hold-back matters)
    ids = _encode(bpe_tok, "Hello world")
    assert len(ids) < len("Hello world")
    unseen = "한국어 😀 ü and 中文"  # characters the corpus lacks stay split into byte tokens
    ids = _encode(bpe_tok, unseen)
    assert any("\ufffd" in bpe_tok.decode([t]) for t in ids)
    assert "".join(_stream(bpe_tok, ids)) == unseen


def test_metaspace_leading_spaces(metaspace_tok):
    tok = metaspace_tok
    for text in ["Hello world", "the quick brown fox", "  two spaces   three", "café déjà 中文"]:
        ids = _encode(tok, text)
        expected = tok.decode(ids, skip_special_tokens=False)
        deltas = _stream(tok, ids)
        assert "".join(deltas) == expected
        # decoding tokens one at a time would drop every word's space: the window is what helps
        assert "".join(tok.decode([t], skip_special_tokens=False) for t in ids) != expected


def test_metaspace_with_prompt_keeps_the_first_space(metaspace_tok):
    tok = metaspace_tok
    prompt, gen = _encode(tok, "The quick brown"), _encode(tok, "fox jumps")
    text = "".join(_stream(tok, gen, prompt=prompt))
    assert text == " fox jumps"  # "▁fox" continues the prompt, so its space is real
    assert "".join(_stream(tok, gen)) == "fox jumps"  # at the start of a text it is stripped


@pytest.mark.parametrize("skip", [False, True])
def test_special_tokens_byte_level(byte_tok, skip):
    im_end = byte_tok.token_id("<|im_end|>")
    think = byte_tok.token_id("<think>")
    ids = [think] + _encode(byte_tok, "é ok") + [im_end, im_end] + _encode(byte_tok, " 中") + [im_end]
    text = "".join(_stream(byte_tok, ids, skip=skip))
    assert text == byte_tok.decode(ids, skip_special_tokens=skip)
    assert text == ("é ok 中" if skip else "<think>é ok<|im_end|><|im_end|> 中<|im_end|>")


@pytest.mark.parametrize("skip", [False, True])
def test_special_tokens_metaspace(metaspace_tok, skip):
    tok = metaspace_tok
    s, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    ids = [s] + _encode(tok, "Hello") + [eos] + _encode(tok, "world") + [eos, s] + _encode(tok, "fox")
    assert "".join(_stream(tok, ids, skip=skip)) == tok.decode(ids, skip_special_tokens=skip)
    # prompt ending in special tokens
    prompt = _encode(tok, "Hello") + [eos, s]
    expected = tok.decode(prompt + ids, skip_special_tokens=skip)[len(tok.decode(prompt, skip_special_tokens=skip)):]
    assert "".join(_stream(tok, ids, skip=skip, prompt=prompt)) == expected


def test_accepts_wrapper_and_backend(byte_tok):
    ids = _encode(byte_tok, "👍🏽 x")
    a = "".join(_stream(byte_tok, ids))
    b = "".join(_stream(byte_tok.backend, ids))
    assert a == b == "👍🏽 x"


# --------------------------------------------------------------------------------------------------
# StopStrings
# --------------------------------------------------------------------------------------------------

def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    s = StopStrings(stops)
    out, stopped = [], False
    for p in pieces:
        emit, stopped = s.push(p)
        out.append(emit)
        if stopped:
            break
    if not stopped:
        out.append(s.flush())
    return "".join(out), stopped


def _splits(text: str, cuts: int):
    for points in itertools.combinations(range(1, len(text)), cuts):
        bounds = (0, *points, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_stop_split_across_deltas_at_every_position():
    text = "Hello STOP world"
    for cuts in (1, 2, 3):
        for pieces in _splits(text, cuts):
            assert _run(["STOP"], pieces) == ("Hello ", True), pieces
    assert _run(["STOP"], list(text)) == ("Hello ", True)


def test_stop_holds_back_only_possible_prefixes():
    s = StopStrings(["STOP", "\n\n"])
    assert s.push("Hello ST") == ("Hello ", False)  # "ST" may start "STOP"
    assert s.push("ART") == ("START", False)  # it did not
    assert s.push("a\n") == ("a", False)
    assert s.push("b") == ("\nb", False)
    assert s.push("S") == ("", False)
    assert s.flush() == "S"


def test_overlapping_stop_strings():
    assert _run(["ab", "abc"], ["xxa", "bc"]) == ("xx", True)
    assert _run(["abc", "ab"], ["xxabc"]) == ("xx", True)
    # "ab" held as a prefix of "abc"; the earliest occurrence is "bd", inside the held text
    assert _run(["abc", "bd"], ["a", "b", "d"]) == ("a", True)
    assert _run(["abc", "bd"], ["ab", "c"]) == ("", True)
    # several stop strings in one delta: the earliest occurrence wins, whatever the list order
    for stops in (["world", "lo"], ["lo", "world"]):
        s = StopStrings(stops)
        assert s.push("hello world") == ("hel", True) and s.matched == "lo"


def test_stop_at_the_very_start_and_after_stop():
    s = StopStrings(["<end>"])
    assert s.push("<en") == ("", False)
    assert s.push("d>rest") == ("", True)
    assert s.matched == "<end>"
    assert s.push("more") == ("", True)
    assert s.flush() == ""


def test_no_stop():
    text = "no stop here, only S and ST and STO"
    for pieces in _splits(text, 2):
        assert _run(["STOP"], pieces) == (text, False)
    assert _run([], [text]) == (text, False)
    with pytest.raises(ValueError):
        StopStrings([""])


def test_special_tokens_listed_by_init_are_special(byte_tok):
    # the skip set comes from the tokenizer's added-token table
    ids = [byte_tok.token_id(t) for t in NEMOTRON3_SPECIAL_TOKENS]
    detok = IncrementalDetokenizer(byte_tok, skip_special_tokens=True)
    assert [detok.add(t) for t in ids] == [""] * len(ids)
    assert detok.flush() == "" and detok.text == ""


def test_skip_specials_but_keep_parser_tags(tmp_path):
    """Generation drops special tokens from the text but keeps the tags the output parsers read."""
    from nemotron.inference.requests import PARSER_TAGS
    from nemotron.io.tokenizer import write_byte_tokenizer
    from nemotron.io.tokenizer import Tokenizer

    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    ids = [tok.token_id("<s>"), *tok.encode("hi"), tok.token_id("<think>"), *tok.encode("x"),
           tok.token_id("</think>"), tok.token_id("<|im_start|>"), *tok.encode("ok")]
    d = IncrementalDetokenizer(tok, skip_special_tokens=True, keep=PARSER_TAGS)
    text = "".join(d.add(i) for i in ids) + d.flush()
    assert text == "hi<think>x</think>ok"
