"""Constrained decoding on CPU: the grammar engines side by side, and what a constraint costs the engine.

1. Grammar engines (llguidance, which the project uses, and xgrammar when installed), on the same
   vocabulary and JSON schemas: time to compile a schema into a matcher (its first mask included), and
   time per token to compute the next mask and advance, walking a valid document token by token.
   Two vocabularies: the embedded model's (1,024 tokens) and a 32,000-token byte-level BPE trained here
   on Python's own source files (the size of a real model's vocabulary; no download).
2. The engine on the embedded model: decode tokens/s of greedy requests, free against constrained by
   a JSON schema, at 1 and 8 streams, alternated, medians of --runs. Both generate exactly --new tokens
   (the schema asks for a long array, so the constrained answer cannot end early; the free ones ignore
   the end-of-turn token).

    python benchmarks/structured.py [--runs 5] [--new 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
        "required": ["name", "age"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer"}, "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                             "qty": {"type": "integer", "minimum": 1},
                                             "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["id", "items"], "additionalProperties": False},
}
DOCUMENTS = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["a", "c"]},
    "order": {"id": 1234, "items": [{"sku": "ABC-1234", "qty": 2, "price": 9.5},
                                    {"sku": "XYZ-0001", "qty": 1, "price": 120.25}], "note": None},
}


def bpe_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on the standard library's Python files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    return tok


def engines_table(backend, name: str, eos: int) -> None:
    """Compile and per-token mask times of each grammar engine on `backend` (a tokenizers.Tokenizer)."""
    vocab = backend.get_vocab_size()
    rows = []
    import llguidance
    import llguidance.torch as llt

    lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=[eos])
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for schema_name, schema in SCHEMAS.items():
        ids = backend.encode(json.dumps(DOCUMENTS[schema_name]), add_special_tokens=False).ids
        grammar = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": options})
        bitmask = llt.allocate_token_bitmask(1, vocab)
        t = time.perf_counter()
        m = llguidance.LLMatcher(lltok, grammar)
        llt.fill_next_token_bitmask(m, bitmask)
        compile_s = time.perf_counter() - t
        m = llguidance.LLMatcher(lltok, grammar)
        t = time.perf_counter()
        for token in ids:
            llt.fill_next_token_bitmask(m, bitmask)
            assert m.consume_token(token), m.get_error()
        rows.append(("llguidance", schema_name, compile_s, (time.perf_counter() - t) / len(ids)))
    try:
        import xgrammar
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        xgrammar = None
    if xgrammar is not None:
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        for schema_name, schema in SCHEMAS.items():
            ids = backend.encode(json.dumps(DOCUMENTS[schema_name]), add_special_tokens=False).ids
            compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            bitmask = xgrammar.allocate_token_bitmask(1, vocab)
            t = time.perf_counter()
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            m = xgrammar.GrammarMatcher(compiled)
            m.fill_next_token_bitmask(bitmask)
            compile_s = time.perf_counter() - t
            m = xgrammar.GrammarMatcher(compiled)
            t = time.perf_counter()
            for token in ids:
                m.fill_next_token_bitmask(bitmask)
                assert m.accept_token(token)
            rows.append(("xgrammar", schema_name, compile_s, (time.perf_counter() - t) / len(ids)))
    print(f"\nvocabulary: {name} ({vocab} tokens)")
    print(f"{'engine':12s} {'schema':8s} {'compile + first mask':>22s} {'mask + advance / token':>24s}")
    for engine, schema_name, compile_s, per_token in rows:
        print(f"{engine:12s} {schema_name:8s} {compile_s * 1e3:19.2f} ms {per_token * 1e6:21.1f} us")


def decode_rates(runs: int, new: int) -> None:
    import nemotron
    from nemotron.chat.template import prepare_chat
    from nemotron.inference.constraint import StructuredOutput
    from nemotron.inference.engine import Engine
    from nemotron.inference.requests import Request
    from nemotron.inference.sampling import SamplingParams

    m = nemotron.load("tiny")
    tok = m.tokenizer
    schema = {"type": "object", "properties": {"values": {"type": "array", "minItems": 200,
                                                          "items": {"type": "integer", "minimum": 0}}},
              "required": ["values"]}
    grammar = StructuredOutput("json_schema", schema).grammar()
    questions = [f"List {k + 3} numbers as JSON." for k in range(8)]
    prompts = [prepare_chat(tok, [{"role": "user", "content": q}], enable_thinking=False).ids for q in questions]

    def one(streams: int, constrained: bool) -> float:
        reqs = [Request(list(p), SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=not constrained),
                        grammar=grammar if constrained else None) for p in prompts[:streams]]
        engine = Engine.for_requests(m.model, reqs, tok, m.stop_ids)
        t = time.perf_counter()
        events = list(engine.run(reqs))
        seconds = time.perf_counter() - t
        assert all(len(r.output_ids) == new for r in reqs), [len(r.output_ids) for r in reqs]
        return len(events) / seconds

    print(f"\nembedded model, greedy, {new} new tokens per stream, torch threads {torch.get_num_threads()}")
    print(f"{'streams':>8s} {'free tok/s':>11s} {'json_schema tok/s':>18s} {'constrained / free':>19s}   per run")
    for streams in (1, 8):
        one(streams, False), one(streams, True)   # warm-up
        ratios, free, cons = [], [], []
        for i in range(runs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {c: one(streams, c) for c in order}
            free.append(got[False]), cons.append(got[True])
            ratios.append(got[True] / got[False])
        print(f"{streams:8d} {statistics.median(free):11.0f} {statistics.median(cons):18.0f} "
              f"{statistics.median(ratios):18.3f}x   " + " ".join(f"{r:.2f}" for r in ratios))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--skip-engines", action="store_true")
    args = parser.parse_args()
    if not args.skip_engines:
        import nemotron

        tiny = nemotron.load("tiny").tokenizer.backend
        engines_table(tiny, "the embedded model's", tiny.token_to_id("<|im_end|>"))
        big = bpe_tokenizer(32000)
        engines_table(big, "byte-level BPE", big.token_to_id("<|im_end|>"))
    decode_rates(args.runs, args.new)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
