"""Seeded, bounded fuzzing of the checkpoint loader.

Each case copies a real tiny checkpoint (single-file, or sharded with an index; tokenizer files
included), applies one mutation (bytes of the safetensors header and data, header fields, config.json
fields, index weight_map entries, tokenizer files, files replaced by directories / FIFOs / symlinks)
and requires that `nemotron.load` either loads, and then a forward pass runs, or raises a
NemotronError whose message is one line: never another exception type, never a hang (every case has
a deadline). The CLI gets the same cases as a subprocess: a sample here, all of them under -m slow.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from checkpoints import Timeout, cli, deadline, read_raw, sharded_checkpoint, toy_checkpoint, write_raw

import nemotron
from nemotron.errors import NemotronError

SEED = 1515
CASES = 330
CASE_SECONDS = 20
CLI_SECONDS = 120
CLI_SAMPLE = (19, 90, 183, 266)   # in the default suite: two `info`, two `generate` (one loads)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-pristine")
    return {"single": toy_checkpoint(root / "single"), "sharded": sharded_checkpoint(root / "sharded")}


@pytest.fixture
def one_thread():
    """The tiny model's forward is ~5 ms on one thread and far slower when threads contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# values and edits
# --------------------------------------------------------------------------------------------------

DEEP = "__DEEP__"   # stands for a 100,000-deep array once the JSON is written

WEIRD = [None, True, False, 0, -1, 1, 3, 2**31, 2**64, 10**30, 1.5, -0.0, 1e308, float("inf"), float("nan"),
         "", "x", "\n", "M*-E", "F32", "a" * 5000, [], [1], [[[]]], ["x", 1], {}, {"a": 1}, {"__float__": "x"},
         {"__float__": "Infinity"}, {"content": 5}, DEEP]


def weird(rng: random.Random):
    return rng.choice(WEIRD)


def absurd_number(rng: random.Random):
    return rng.choice([0, -1, -(2**40), 2**20, 2**31, 2**63, 10**100, 1e308, float("inf"), float("nan"), 0.5])


def dump(value) -> str:
    return json.dumps(value).replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)


def edit_json(path: Path, fn: Callable[[object], object]) -> None:
    path.write_text(dump(fn(json.loads(path.read_text()))))


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def flip(data: bytearray, rng: random.Random, lo: int, hi: int, count: int) -> None:
    for _ in range(count):
        if hi > lo:
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


# --------------------------------------------------------------------------------------------------
# mutations: each edits a checkpoint copy in place and says what it did
# --------------------------------------------------------------------------------------------------


def m_header_bytes(rng, d):
    f = rng.choice(shards(d))
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    flip(data, rng, 0, 8 + n, rng.randint(1, 8))
    f.write_bytes(bytes(data))
    return f"flipped header bits of {f.name}"


def m_data_bytes(rng, d):
    f = rng.choice(shards(d))
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    flip(data, rng, 8 + n, len(data), rng.randint(1, 32))
    f.write_bytes(bytes(data))
    return f"flipped data bits of {f.name}"


def m_truncate(rng, d):
    f = rng.choice(shards(d))
    data = f.read_bytes()
    cut = rng.randrange(len(data))
    f.write_bytes(data[:cut])
    return f"truncated {f.name} to {cut} bytes"


def m_extend(rng, d):
    f = rng.choice(shards(d))
    extra = rng.randbytes(rng.choice([1, 7, 8, 4096]))
    f.write_bytes(f.read_bytes() + extra)
    return f"appended {len(extra)} bytes to {f.name}"


def m_header_length(rng, d):
    f = rng.choice(shards(d))
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    new = rng.choice([0, 1, n - 1, n + 1, n - 8, n + 8, len(data), len(data) - 8, 2**63, 2**64 - 1,
                      100_000_001, rng.randrange(2**64)])
    f.write_bytes(struct.pack("<Q", max(0, new)) + data[8:])
    return f"header length of {f.name} set to {new}"


def m_header_field(rng, d):
    f = rng.choice(shards(d))
    header, data = read_raw(f)
    name = rng.choice([k for k in header if k != "__metadata__"])
    info = header[name]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    kind = rng.randrange(5)
    if kind == 0:
        info.pop(field)
        what = "deleted"
    elif kind == 1:
        info[field] = weird(rng)
        what = f"set to {str(info[field])[:30]!r}"
    elif field == "dtype":
        info[field] = rng.choice(["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3",
                                  "F8_E5M2", "U16", "F8_E8M0", "F4", "f32", "C64"])
        what = f"set to {info[field]}"
    elif field == "shape":
        shape = list(info["shape"])
        op = rng.randrange(4)
        if op == 0 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**32])
        elif op == 1:
            shape.reverse()
        elif op == 2:
            shape.append(1)
        else:
            shape = shape[:-1]
        info[field] = shape
        what = f"set to {shape}"
    else:
        begin, end = info["data_offsets"]
        delta = rng.choice([-8, -4, -1, 1, 4, 8, 2**40])
        info[field] = rng.choice([[begin + delta, end + delta], [begin, end + delta], [end, begin], [0, end - begin],
                                  [begin - delta, end]])
        what = f"set to {info[field]}"
    write_raw(f, dump(header).encode(), data)
    return f"{f.name}: {name}.{field} {what}"


def m_header_entries(rng, d):
    f = rng.choice(shards(d))
    header, data = read_raw(f)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    op = rng.randrange(6)
    if op == 0:
        header.pop(name)
        what = f"deleted {name}"
    elif op == 1:
        header[name + rng.choice(["\n", "x", ".extra", ""])] = dict(header[rng.choice(names)])
        what = f"duplicated an entry as {name}+suffix"
    elif op == 2:
        header[rng.choice(["", "\x00", "a\nb", "é" * 3, "mtp.foo"])] = header.pop(name)
        what = f"renamed {name}"
    elif op == 3:
        header["__metadata__"] = weird(rng)
        what = f"__metadata__ set to {str(header['__metadata__'])[:30]!r}"
    elif op == 4:
        header[name] = weird(rng)
        what = f"entry {name} set to {str(header[name])[:30]!r}"
    else:
        other = rng.choice(names)
        header[name] = {**header[name], "data_offsets": header[other]["data_offsets"]}
        what = f"{name} pointed at {other}'s bytes"
    write_raw(f, dump(header).encode(), data)
    return f"{f.name}: {what}"


CONFIG_NUMBERS = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                  "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "moe_shared_expert_intermediate_size", "n_shared_experts", "moe_latent_size", "n_group",
                  "topk_group", "num_nextn_predict_layers", "num_hidden_layers", "max_position_embeddings",
                  "layer_norm_epsilon", "routed_scaling_factor", "time_step_min", "time_step_max",
                  "time_step_floor", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"]


def m_config(rng, d):
    path = d / "config.json"
    raw = json.loads(path.read_text())
    op = rng.randrange(7)
    if op == 0:
        key = rng.choice(sorted(raw))
        raw.pop(key)
        what = f"deleted {key}"
    elif op == 1:
        key = rng.choice(sorted(raw))
        raw[key] = weird(rng)
        what = f"{key} set to {str(raw[key])[:30]!r}"
    elif op == 2:
        key = rng.choice(CONFIG_NUMBERS)
        raw[key] = absurd_number(rng)
        what = f"{key} set to {raw[key]!r}"
    elif op == 3:
        pattern = list(raw["hybrid_override_pattern"])
        choice = rng.randrange(4)
        if choice == 0:
            pattern[rng.randrange(len(pattern))] = rng.choice("M*-EX| ")
        elif choice == 1:
            pattern = pattern * rng.choice([2, 200, 20_000])
        elif choice == 2:
            pattern = pattern[:rng.randrange(len(pattern))]
        else:
            rng.shuffle(pattern)
        raw["hybrid_override_pattern"] = "".join(pattern)
        what = f"pattern set to {''.join(pattern)[:30]!r} ({len(pattern)} layers)"
    elif op == 4:
        key = rng.choice(["model_type", "architectures", "layers_block_type", "mtp_hybrid_override_pattern",
                          "time_step_limit", "mamba_ssm_cache_dtype", "torch_dtype", "quantization_config",
                          "rope_parameters", "tie_word_embeddings", "mlp_hidden_act"])
        raw[key] = weird(rng)
        what = f"{key} set to {str(raw[key])[:30]!r}"
    elif op == 5:
        text = path.read_text()
        path.write_text(text[:rng.randrange(len(text))])
        return "config.json truncated"
    else:
        raw = weird(rng)
        what = f"replaced by {str(raw)[:30]!r}"
    path.write_text(dump(raw))
    return f"config.json: {what}"


def m_index(rng, d):
    index = d / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    wm = raw["weight_map"]
    key = rng.choice(sorted(wm))
    op = rng.randrange(6)
    if op == 0:
        wm[key] = rng.choice([weird(rng), "../x.safetensors", "/etc/hostname", str(shards(d)[0].resolve()),
                              "", ".", "sub/model.safetensors", "nonexistent.safetensors", "config.json",
                              "./" + wm[key], wm[key] + "\x00"])
        what = f"weight_map[{key}] set to {str(wm[key])[:40]!r}"
    elif op == 1:
        wm.pop(key)
        what = f"weight_map lost {key}"
    elif op == 2:
        raw["weight_map"] = weird(rng)
        what = f"weight_map set to {str(raw['weight_map'])[:30]!r}"
    elif op == 3:
        raw.pop("weight_map")
        what = "weight_map deleted"
    elif op == 4:
        raw = weird(rng)
        what = f"index replaced by {str(raw)[:30]!r}"
    else:
        text = index.read_text()
        index.write_text(text[:rng.randrange(len(text))])
        return "index truncated"
    index.write_text(dump(raw))
    return f"index: {what}"


def m_tokenizer_config(rng, d):
    path = d / "tokenizer_config.json"
    op = rng.randrange(4)
    if op == 0:
        path.write_text(dump(weird(rng)))
        return "tokenizer_config.json replaced by a weird value"
    if op == 1:
        text = path.read_text()
        path.write_text(text[:rng.randrange(len(text))])
        return "tokenizer_config.json truncated"
    key = rng.choice(["bos_token", "eos_token", "add_bos_token", "chat_template", "unk_token", "pad_token",
                      "model_max_length", "added_tokens_decoder"])
    value = weird(rng)
    edit_json(path, lambda raw: {**raw, key: value})
    return f"tokenizer_config.json: {key} set to {str(value)[:30]!r}"


def m_tokenizer_json(rng, d):
    path = d / "tokenizer.json"
    op = rng.randrange(3)
    data = bytearray(path.read_bytes())
    if op == 0:
        path.write_bytes(bytes(data[:rng.randrange(len(data))]))
        return "tokenizer.json truncated"
    if op == 1:
        flip(data, rng, 0, len(data), rng.randint(1, 8))
        path.write_bytes(bytes(data))
        return "tokenizer.json bits flipped"
    path.write_text(dump(weird(rng)))
    return "tokenizer.json replaced by a weird value"


def m_quant_config(rng, d):
    algo = rng.choice(["FP8", "NVFP4", "MIXED_PRECISION", "W4A16_NVFP4", "INT8", weird(rng)])
    body = {"quantization": {"quant_algo": algo, rng.choice(["group_size", "exclude_modules", "quantized_layers",
                                                             "kv_cache_quant_algo", "config_groups"]): weird(rng)}}
    if rng.random() < 0.5:
        (d / "hf_quant_config.json").write_text(dump(rng.choice([body, weird(rng)])))
        return f"hf_quant_config.json written ({str(body)[:50]})"
    edit_json(d / "config.json", lambda raw: {**raw, "quantization_config": body["quantization"]})
    return f"config.json quantization_config set ({str(body)[:50]})"


def m_chat_template(rng, d):
    path = d / "chat_template.jinja"
    path.write_bytes(rng.choice([b"\xff\xfe garbage", b"{% for %}", b"", rng.randbytes(64)]))
    return "chat_template.jinja replaced"


def m_filesystem(rng, d):
    victims = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               *(f.name for f in shards(d))]
    if (d / "model.safetensors.index.json").exists():
        victims.append("model.safetensors.index.json")
    name = rng.choice(victims)
    path = d / name
    path.unlink()
    op = rng.choice(["deleted", "directory", "fifo", "/dev/zero", "/", "dangling", "loop", "sibling", "empty",
                     "garbage"])
    if op == "directory":
        path.mkdir()
    elif op == "fifo":
        os.mkfifo(path)
    elif op in ("/dev/zero", "/"):
        path.symlink_to(op)
    elif op == "dangling":
        path.symlink_to(d / "nowhere")
    elif op == "loop":
        path.symlink_to(path)
    elif op == "sibling":
        path.symlink_to(rng.choice([v for v in victims if v != name]))
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "garbage":
        path.write_bytes(rng.randbytes(256))
    return f"{name}: {op}"


# (mutation, layouts it applies to)
MUTATIONS: list[tuple[Callable, tuple[str, ...]]] = [
    (m_header_bytes, ("single", "sharded")), (m_data_bytes, ("single", "sharded")),
    (m_truncate, ("single", "sharded")), (m_extend, ("single", "sharded")),
    (m_header_length, ("single", "sharded")), (m_header_field, ("single", "sharded")),
    (m_header_field, ("single", "sharded")), (m_header_entries, ("single", "sharded")),
    (m_config, ("single", "sharded")), (m_config, ("single", "sharded")), (m_index, ("sharded",)),
    (m_index, ("sharded",)), (m_tokenizer_config, ("single", "sharded")), (m_tokenizer_json, ("single",)),
    (m_quant_config, ("single", "sharded")), (m_chat_template, ("single",)),
    (m_filesystem, ("single", "sharded")), (m_filesystem, ("single", "sharded")),
]


def make_case(pristine: dict[str, Path], root: Path, i: int) -> tuple[Path, str]:
    """Case `i`: the same copy and mutation on every run (its own seeded generator)."""
    rng = random.Random(f"{SEED}-{i}")
    mutate, layouts = MUTATIONS[i % len(MUTATIONS)]
    layout = rng.choice(layouts)
    d = root / f"case{i:04d}"
    shutil.copytree(pristine[layout], d, symlinks=True)
    return d, f"case {i} ({layout}, {mutate.__name__}): {mutate(rng, d)}"


def run_in_process(d: Path) -> str:
    """'loaded' or 'rejected'; anything else raises (the test reports it)."""
    with deadline(CASE_SECONDS):
        try:
            m = nemotron.load(d)
        except NemotronError as e:
            assert "\n" not in str(e) and str(e), f"not one line: {str(e)!r}"
            return "rejected"
        ids = (m.tokenizer.encode("hi") if m.tokenizer is not None else []) or [1, 2, 3]
        m.generate(ids, max_new_tokens=2)
        return "loaded"


def test_loader_fuzz_in_process(pristine, tmp_path, one_thread):
    outcomes, failures = Counter(), []
    for i in range(CASES):
        d, what = make_case(pristine, tmp_path, i)
        try:
            outcomes[run_in_process(d)] += 1
        except (Exception, Timeout) as e:   # the fuzz's findings: reported together below
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            shutil.rmtree(d)
    print(f"\nloader fuzz: {CASES} cases, {dict(outcomes)}")
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)
    assert outcomes["loaded"] and outcomes["rejected"]   # the mutations hit both sides


def run_cli(d: Path, i: int) -> subprocess.CompletedProcess:
    """Even cases `nemotron info DIR`, odd ones `nemotron generate --model DIR hi` (a hang past the
    timeout comes back as exit code None)."""
    args = ["info", d] if i % 2 == 0 else ["generate", "--model", d, "--max-new-tokens", "2", "hi"]
    try:
        return cli(*args, timeout=CLI_SECONDS)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, None, "", f"still running after {CLI_SECONDS} s")


def cli_findings(pristine: dict[str, Path], root: Path, cases) -> tuple[Counter, list[str]]:
    """Run the CLI on each case (two at a time): a zero exit, or a non-zero one with exactly one
    `error: ...` line on stderr; never a traceback, never past the timeout."""
    prepared = [(i, *make_case(pristine, root, i)) for i in cases]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"   # two CLIs at once on a small machine: no thread oversubscription
    outcomes, failures = Counter(), []
    try:
        with ThreadPoolExecutor(2) as pool:
            for (i, d, what), result in zip(prepared, pool.map(lambda c: run_cli(c[1], c[0]), prepared)):
                lines = result.stderr.strip().splitlines()
                if result.returncode == 0 and "Traceback" not in result.stderr:
                    outcomes["ok"] += 1
                elif result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "):
                    outcomes["error line"] += 1
                else:
                    failures.append(f"{what}: exit {result.returncode}: {result.stderr[-1500:]}")
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return outcomes, failures


def test_loader_fuzz_cli_sample(pristine, tmp_path):
    outcomes, failures = cli_findings(pristine, tmp_path, CLI_SAMPLE)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_loader_fuzz_cli_all(pristine, tmp_path):
    outcomes, failures = cli_findings(pristine, tmp_path, range(CASES))
    print(f"\nCLI fuzz: {CASES} cases, {dict(outcomes)}, {len(failures)} tracebacks or bad exits")
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)
