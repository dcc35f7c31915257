"""Our safetensors reader tracks the reference library: every corruption that `safetensors` rejects,
ours rejects too, with a one-line CheckpointError (and what the reference accepts, ours reads alike)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemotron.io.checkpoint import read_safetensors_index, write_safetensors
from nemotron.errors import CheckpointError

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.arange(4),
           "c": torch.ones(5, dtype=torch.bfloat16)}


def _base() -> tuple[dict, bytes]:
    """A valid file's header (as a dict) and data buffer."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, t in TENSORS.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def _pack(header: dict | bytes, data: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _with(name: str, **changes):
    def mutate():
        header, data = _base()
        header[name] = {**header[name], **changes}
        return _pack(header, data)
    return mutate


def _header_bytes(blob: bytes):
    def mutate():
        return _pack(blob, _base()[1])
    return mutate


def _raw(fn):
    def mutate():
        header, data = _base()
        return fn(_pack(header, data))
    return mutate


def _header(fn):
    def mutate():
        header, data = _base()
        fn(header)
        return _pack(header, data)
    return mutate


CORRUPTIONS = {
    "shorter than 8 bytes": _raw(lambda b: b[:5]),
    "header length over 100 MB": _raw(lambda b: struct.pack("<Q", 100_000_001) + b[8:]),
    "header length past the end": _raw(lambda b: struct.pack("<Q", len(b)) + b[8:]),
    "header length 2**63": _raw(lambda b: struct.pack("<Q", 2**63) + b[8:]),
    "header not UTF-8": _header_bytes(b'{"\xff\xfe": 1}'),
    "header a JSON array": _header_bytes(b"[1, 2]"),
    "header a string": _header_bytes(b'"abc"'),
    "header invalid JSON": _header_bytes(b'{"a": {"dtype": "F32", '),
    "header with a trailing NUL": lambda: _pack(json.dumps(_base()[0]).encode() + b"\x00", _base()[1]),
    "NaN offset": _header_bytes(b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,NaN]}}'),
    "deeply nested header": _header_bytes(b"[" * 100_000 + b"]" * 100_000),
    "__metadata__ value not a string": _header(lambda h: h.update(__metadata__={"format": 1})),
    "__metadata__ a string": _header(lambda h: h.update(__metadata__="pt")),
    "entry not an object": _header(lambda h: h.update(a=[1, 2])),
    "entry without data_offsets": _header(lambda h: h["a"].pop("data_offsets")),
    "entry without dtype": _header(lambda h: h["a"].pop("dtype")),
    "unknown dtype": _with("a", dtype="F33"),
    "lower-case dtype": _with("a", dtype="f32"),
    "dtype not a string": _with("a", dtype=4),
    "negative shape": _with("a", shape=[-2, -3]),
    "float shape": _with("a", shape=[2.0, 3]),
    "boolean shape": _with("a", shape=[True, 6]),
    "shape not a list": _with("a", shape=6),
    "three offsets": _with("a", data_offsets=[0, 24, 24]),
    "negative offset": _with("a", data_offsets=[-24, 0]),
    "end before begin": _with("b", data_offsets=[56, 24]),
    "byte size not numel * itemsize": _with("a", shape=[2, 2]),
    "dtype relabelled to another size": _with("a", dtype="F16"),
    "shape product overflows 64 bits": _with("a", shape=[2**62, 8]),
    "overlapping offsets": _with("c", data_offsets=[0, 10]),
    "two tensors on the same bytes": _header(lambda h: h.update(d=dict(h["a"]))),
    "gap between tensors": _with("c", data_offsets=[58, 68]),
    "first tensor not at 0": _header(lambda h: [h[k].update(data_offsets=[o + 8 for o in h[k]["data_offsets"]])
                                                for k in TENSORS]),   # the data is 8 bytes short of them too
    "data truncated": _raw(lambda b: b[:-3]),
    "bytes after the last tensor": _raw(lambda b: b + b"\x00" * 8),
}


def _reference_rejects(path) -> bool:
    try:
        load_file(path)
    except Exception:
        pass
    else:
        return False
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:
        return True
    return False


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_rejected_by_both(tmp_path, corruption):
    path = tmp_path / "model.safetensors"
    path.write_bytes(CORRUPTIONS[corruption]())
    assert _reference_rejects(path), f"the reference library accepts {corruption!r}: drop it from the list"
    with pytest.raises(CheckpointError) as info:
        read_safetensors_index(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.safetensors"), message


def test_valid_files_read_alike(tmp_path):
    """The uncorrupted base file, a file with zero-size tensors sharing an offset, and trailing
    header padding: both readers agree on every tensor."""
    header, data = _base()
    variants = {"base": _pack(header, data)}
    zero = {**header, "z1": {"dtype": "F32", "shape": [0, 4], "data_offsets": [len(data)] * 2},
            "z2": {"dtype": "I8", "shape": [0], "data_offsets": [len(data)] * 2}}
    variants["zero-size"] = _pack(zero, data)
    variants["padded header"] = _pack(json.dumps(header).encode() + b"   ", data)
    variants["null metadata"] = _pack({**header, "__metadata__": None}, data)
    for name, blob in variants.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        want = load_file(path)
        refs = read_safetensors_index(path)
        assert set(refs) == set(want), name
        for key, ref in refs.items():
            got = ref.read()
            assert got.dtype == want[key].dtype and torch.equal(got, want[key]), (name, key)


def test_our_writer_passes_our_reader(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, dict(TENSORS), {"format": "pt"})
    assert {k: r.read().tolist() for k, r in read_safetensors_index(path).items()} == \
        {k: t.tolist() for k, t in TENSORS.items()}
