"""Bad input: one clear line from the CLI (non-zero exit), a typed exception from the API."""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import assert_one_line_error, cli, deadline, read_raw, sharded_checkpoint, toy_checkpoint, write_raw
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.config import save_config
from nemotron.errors import CheckpointError, ConfigError, NemotronError, UnsafeCheckpointError

_cli, _assert_one_line_error = cli, assert_one_line_error


@pytest.fixture
def ckpt(tmp_path):
    return toy_checkpoint(tmp_path / "ckpt")


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
        nemotron.config_from_dict({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="num_hidden_layers=3 but the layer pattern has 4"):
        nemotron.config_from_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="n_heads_in_group"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "num_attention_heads": 8, "hidden_size": 64,
                                   "block_configs": [{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}]})


def test_written_safetensors_read_by_the_reference_library(tmp_path):
    """Our writer (no numpy needed) produces files the safetensors library reads bit-exactly."""
    from safetensors.torch import load_file

    from nemotron.io.checkpoint import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "empty": torch.zeros(0, 3), "e": torch.tensor(2.5, dtype=torch.float16)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


# --------------------------------------------------------------------------------------------------
# hostile checkpoints: each case corrupts a copy of a real tiny checkpoint (single-file or sharded);
# `nemotron.load` must raise the typed error with one line, and the CLI print one `error:` line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {"single": toy_checkpoint(root / "single"), "sharded": sharded_checkpoint(root / "sharded")}


def _edit_json(path, fn):
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(fn(raw)))


def _set(**changes):
    return lambda raw: {**raw, **changes}


def _deep(depth: int = 100_000) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


def _deep_header(d):
    write_raw(d / "model.safetensors", _deep().encode(), b"")


def _no_model_type(d):
    _edit_json(d / "config.json", lambda raw: {**{k: v for k, v in raw.items() if k != "model_type"},
                                               "architectures": [["NemotronHForCausalLM"]]})


def _weight_map(fn):
    def mutate(d):
        _edit_json(d / "model.safetensors.index.json", lambda raw: {**raw, "weight_map": fn(raw["weight_map"])})
    return mutate


def _first_value_to(value):
    return _weight_map(lambda wm: {**wm, next(iter(wm)): value})


def _overlap(d):
    """lm_head.weight declared on the embedding's bytes (its own bytes dropped, so only the overlap is wrong)."""
    path = d / "model.safetensors"
    header, data = read_raw(path)
    head = header.pop("lm_head.weight")
    start, end = head["data_offsets"]
    data = data[:start] + data[end:]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o - (end - start) for o in info["data_offsets"]]
    header["lm_head.weight"] = {**head, "data_offsets": header["backbone.embeddings.weight"]["data_offsets"]}
    write_raw(path, header, data)


def _relabel(d):
    path = d / "model.safetensors"
    header, data = read_raw(path)
    assert header["backbone.norm_f.weight"]["dtype"] == "F32"
    header["backbone.norm_f.weight"]["dtype"] = "I32"
    write_raw(path, header, data)


def _shard_moved(to_name):
    """One shard moved next to the checkpoint directory and named in the index as `to_name(path)`."""
    def mutate(d):
        index = d / "model.safetensors.index.json"
        shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
        outside = d.parent / f"outside-{shard}"
        shutil.move(d / shard, outside)
        _weight_map(lambda wm: {k: (to_name(outside) if v == shard else v) for k, v in wm.items()})(d)
    return mutate


def _fifo(d):
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")


def _huge_pattern(d):
    _edit_json(d / "config.json", _set(hybrid_override_pattern="M" * 100_000, num_hidden_layers=100_000))


# name: (layout, corruption, exception, phrase in the message, CLI command that must fail with it)
HOSTILE = {
    # item 4: tracebacks instead of one line
    "deep safetensors header": ("single", _deep_header, CheckpointError, "nested too deeply", "generate"),
    "deep config.json": ("single", lambda d: (d / "config.json").write_text(_deep()), ConfigError,
                         "nested too deeply", "info"),
    "model_type a list": ("single", lambda d: _edit_json(d / "config.json", _set(model_type=["nemotron_h"])),
                          ConfigError, "model_type must be a string", "info"),
    "architectures of lists": ("single", _no_model_type, ConfigError, "architectures must be a list of strings",
                               "info"),
    "weight_map value not a string": ("sharded", _first_value_to(5), CheckpointError,
                                      "file name must be a non-empty string", "generate"),
    "weight_map a list": ("sharded", _weight_map(lambda wm: sorted(wm.values())), CheckpointError,
                          "needs a non-empty 'weight_map' object", "generate"),
    "tokenizer_config a list": ("single", lambda d: (d / "tokenizer_config.json").write_text("[1, 2]"),
                                CheckpointError, "tokenizer_config.json: expected a JSON object", "generate"),
    "tokenizer_config a string": ("single", lambda d: (d / "tokenizer_config.json").write_text('"x"'),
                                  CheckpointError, "tokenizer_config.json: expected a JSON object", "generate"),
    "layer_norm_epsilon a string": ("single", lambda d: _edit_json(d / "config.json", _set(layer_norm_epsilon="x")),
                                    ConfigError, "layer_norm_epsilon must be a number", "info"),
    # item 5: corrupt files accepted silently
    "overlapping offsets": ("single", _overlap, CheckpointError, "overlaps the tensor before it", "generate"),
    "F32 relabelled I32": ("single", _relabel, CheckpointError, "'backbone.norm_f.weight' is stored as I32",
                           "generate"),
    "absolute shard path": ("sharded", _shard_moved(lambda p: str(p.resolve())), CheckpointError,
                            "points outside the checkpoint directory", "generate"),
    "../ shard path": ("sharded", _shard_moved(lambda p: f"../{p.name}"), CheckpointError,
                       "points outside the checkpoint directory", "generate"),
    "FIFO as model.safetensors": ("single", _fifo, CheckpointError, "not a regular file", "generate"),
    # item 6: an absurd config exhausts memory
    "100,000-layer pattern": ("single", _huge_pattern, ConfigError, "supported maximum of 1024", "info"),
}


def _hostile_copy(pristine, tmp_path, name):
    layout, corrupt, *_ = HOSTILE[name]
    d = tmp_path / name.replace(" ", "_").replace("/", "_")
    shutil.copytree(pristine[layout], d)
    corrupt(d)
    return d


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_checkpoint_api(pristine, tmp_path, name):
    _, _, exc, phrase, _ = HOSTILE[name]
    d = _hostile_copy(pristine, tmp_path, name)
    with deadline(30), pytest.raises(NemotronError) as info:
        nemotron.load(d)
    assert type(info.value) is exc, repr(info.value)
    message = str(info.value)
    assert "\n" not in message and phrase in message, message


def _cli_rejects(pristine, tmp_path, names):
    """`nemotron info DIR` / `nemotron generate --model DIR hi`: one `error:` line, non-zero exit."""
    cases = {name: _hostile_copy(pristine, tmp_path, name) for name in names}

    def run(name):
        command = HOSTILE[name][4]
        args = ["info", cases[name]] if command == "info" else ["generate", "--model", cases[name], "hi"]
        return name, cli(*args, timeout=60)

    with ThreadPoolExecutor(2) as pool:   # the CLI's startup (importing torch) dominates each case
        for name, result in pool.map(run, cases):
            assert_one_line_error(result, HOSTILE[name][3])


# one case of each kind for the default suite (each CLI start costs seconds); all of them under -m slow
CLI_SAMPLE = ["deep config.json", "weight_map a list", "layer_norm_epsilon a string", "overlapping offsets",
              "../ shard path", "FIFO as model.safetensors", "100,000-layer pattern"]


def test_hostile_checkpoint_cli(pristine, tmp_path):
    _cli_rejects(pristine, tmp_path, CLI_SAMPLE)


@pytest.mark.slow
def test_hostile_checkpoint_cli_all(pristine, tmp_path):
    _cli_rejects(pristine, tmp_path, list(HOSTILE))


def test_symlinked_files_are_followed(pristine, tmp_path):
    """The Hugging Face cache layout: every file of a snapshot is a symlink to a blob outside it."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    shutil.copytree(pristine["sharded"], blobs)
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(os.path.relpath(f, snapshot))
    m = nemotron.load(snapshot)
    assert m.generate([1, 2, 3], max_new_tokens=2)


def test_huge_layer_count_fails_fast_and_small(pristine, tmp_path):
    """A 100 KB config.json asking for 100,000 layers: refused in well under a second, with little
    memory (before: 87 s and 2.9 GB for load, > 3 GB for info)."""
    d = _hostile_copy(pristine, tmp_path, "100,000-layer pattern")
    from nemotron.models.info import summarize

    for attempt in (lambda: nemotron.load(d), lambda: summarize(nemotron.load_config(d))):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match="supported maximum of 1024"):
            attempt()
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.5 and peak < 20 * 2**20, (elapsed, peak)


@pytest.mark.parametrize("name", ["nemotron-3-ultra-550b-a55b", "llama-3.1-nemotron-ultra-253b-v1"])
def test_largest_presets_pass_the_size_caps(tmp_path, name):
    from nemotron.models.info import summarize
    from nemotron.config.presets import PRESETS

    config = PRESETS[name].config
    save_config(config, tmp_path / "config.json")
    again = nemotron.load_config(tmp_path)
    assert again == config
    assert summarize(again)["total_params"] > 2e11


def test_config_types_checked_against_annotations():
    """One generic check (BaseConfig): ints, floats (JSON ints fine), strings, booleans, lists and
    optional fields, named by the key the file used (an alias included)."""
    base = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*"}
    bad = {"hidden_size": 64.0, "attention_bias": "false", "mlp_hidden_act": 2, "eos_token_id": [2, "x"],
           "bos_token_id": True, "time_step_limit": [0.0], "moe_latent_size": "32", "mamba_d_conv": 4.5}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"nemotron_h config: {key} must be"):
            nemotron.config_from_dict({**base, key: value})
    ok = nemotron.config_from_dict({**base, "layer_norm_epsilon": 1, "eos_token_id": [2, 11], "moe_latent_size": None})
    assert ok.layer_norm_epsilon == 1 and ok.eos_token_id == [2, 11]
    with pytest.raises(ConfigError, match="nemotron config: layer_norm_eps must be a number"):
        nemotron.config_from_dict({"model_type": "nemotron", "layer_norm_eps": "1e-5"})
    with pytest.raises(ConfigError, match=r"block_configs\[0\].ffn: ffn_mult must be a number"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "num_attention_heads": 8, "hidden_size": 64,
                                   "block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": "2"}}]})
    with pytest.raises(ConfigError, match="rope scaling: factor must be a number"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "num_attention_heads": 8, "hidden_size": 64,
                                   "rope_scaling": {"rope_type": "llama3", "factor": "8"},
                                   "block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 2}}]})
    with pytest.raises(ConfigError, match="hidden_size must be an integer"):
        nemotron.config_from_dict(base).replace(hidden_size="64")


def test_sizes_capped_before_building():
    for key, value in {"hidden_size": 1 << 20, "vocab_size": 10**9, "n_routed_experts": 10**6}.items():
        with pytest.raises(ConfigError, match=f"{key}={value} exceeds the supported maximum"):
            nemotron.config_from_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "ME", key: value})
    with pytest.raises(ConfigError, match="64 MTP depths of 1000 layers exceed"):
        nemotron.config_from_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "M*",
                                   "num_nextn_predict_layers": 64, "mtp_hybrid_override_pattern": "*E" * 500})
    with pytest.raises(ConfigError, match="block_configs has 5000 layers"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "block_configs": [{}] * 5000})
    with pytest.raises(ConfigError, match="makes an FFN of"):
        nemotron.config_from_dict({"model_type": "nemotron-nas", "num_attention_heads": 8, "hidden_size": 65536,
                                   "block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1e6}}]})


def test_tokenizer_larger_than_the_vocabulary(pristine, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(pristine["single"], d)
    _edit_json(d / "config.json", _set(vocab_size=100))
    with pytest.raises(CheckpointError, match="tokens, more than the model's vocab_size of 100"):
        nemotron.load(d)
