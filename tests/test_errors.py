"""Bad input: one clear line from the CLI (non-zero exit), a typed exception from the API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from nemotron.init import init_checkpoint, tiny_super_config


@pytest.fixture
def ckpt(tmp_path):
    return init_checkpoint(tmp_path / "ckpt", tiny_super_config(), seed=0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nemotron.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        nemotron.load(tmp_path / "nope")
    _assert_one_line_error(_cli("info", tmp_path / "nope"), "no such")


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        nemotron.load(ckpt)
    _assert_one_line_error(_cli("generate", "--model", ckpt, "hi"), "no weights")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        nemotron.load(ckpt)


def test_unknown_layer_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "MEX*EME"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown layer type 'X'"):
        nemotron.load(ckpt)
    _assert_one_line_error(_cli("info", ckpt), "unknown layer type 'X'")


def test_wrong_tensor_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["backbone.layers.3.mixer.q_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"backbone.layers.3.mixer.q_proj.weight: \[8, 64\] \(expected \[64, 64\]\)"):
        nemotron.load(ckpt)
    _assert_one_line_error(_cli("generate", "--model", ckpt, "hi"), "q_proj.weight")


def test_missing_and_unexpected_tensors(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["backbone.layers.1.mixer.experts.5.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing .*experts\.5\.up_proj\.weight"):
        nemotron.load(ckpt)
    tensors["backbone.layers.1.mixer.experts.5.up_proj.weight"] = torch.zeros(64, 32)
    tensors["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected .*surprise"):
        nemotron.load(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        nemotron.load(ckpt)
    _assert_one_line_error(_cli("generate", "--model", ckpt, "hi"), "truncated")
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        nemotron.load(ckpt)


def test_pickle_refused_unless_opted_in(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(tensors, ckpt / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pickled"):
        nemotron.load(ckpt)
    _assert_one_line_error(_cli("generate", "--model", ckpt, "hi"), "pickled")
    m = nemotron.load(ckpt, allow_pickle=True)
    assert torch.equal(m.model.lm_head.weight, tensors["lm_head.weight"])


def test_bad_config_values():
    with pytest.raises(ConfigError, match="unsupported model_type"):
        nemotron.config_from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="num_hidden_layers=3 but the layer pattern has 4"):
        nemotron.config_from_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="n_heads_in_group"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "num_attention_heads": 8, "hidden_size": 64,
                                   "block_configs": [{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}]})


def test_written_safetensors_read_by_the_reference_library(tmp_path):
    """Our writer (no numpy needed) produces files the safetensors library reads bit-exactly."""
    from safetensors.torch import load_file

    from nemotron.checkpoint import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "empty": torch.zeros(0, 3), "e": torch.tensor(2.5, dtype=torch.float16)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
