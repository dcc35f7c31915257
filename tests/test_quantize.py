"""`nemotron quantize`: calibrated NVFP4 / FP8 / mixed checkpoints in ModelOpt's layout that round-trip
bit for bit through our loader, with the names, dtypes and configs vLLM's modelopt loaders read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import nemotron
from nemotron.io.checkpoint import read_safetensors_index
from nemotron.config.presets import toy_super_config
from nemotron import kernels
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.inference import steps
from nemotron.quant.modelopt import HF_QUANT_CONFIG, quantized_layers
from nemotron.quant.modules import QuantExperts, QuantLinear
from nemotron.quant.quantize import LayerStats, choose_mixed, quantize_model, save_quantized

TEXTS = ["The cat sat on the mat and looked at the birds in the garden.",
         "What is 12 * 7? It is 84, because 10 * 7 = 70 and 2 * 7 = 14.",
         "Mamba layers keep a state; attention layers keep keys and values."] * 2


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("float") / "ckpt", toy_super_config(), seed=1)


def _quant_buffers(model):
    return {f"{name}.{k}": v for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))
            for k, v in m._buffers.items() if v is not None}


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "mixed"])
def test_quantize_save_load_round_trip_is_bit_identical(float_ckpt, tmp_path, fmt):
    loaded = nemotron.load(float_ckpt)
    cfg, report = quantize_model(loaded, fmt, TEXTS, budget_bits=6.0, kv_cache=True)
    out = save_quantized(loaded, cfg, tmp_path / fmt, report)
    back = nemotron.load(out)
    assert quantized_layers(back.model) == quantized_layers(loaded.model)
    mine, theirs = _quant_buffers(loaded.model), _quant_buffers(back.model)
    assert mine.keys() == theirs.keys() and mine
    for name, t in mine.items():
        assert theirs[name].dtype == t.dtype, name
        assert torch.equal(theirs[name].view(torch.uint8), t.view(torch.uint8)) if t.element_size() == 1 \
            else torch.equal(theirs[name], t), name
    ids = torch.randint(5, 300, (2, 10))
    with torch.inference_mode():
        assert torch.equal(back.model(ids), loaded.model(ids))
    # MTP speculation through the quantized MTP block stays exact
    assert back.generate("Hello", max_new_tokens=12, temperature=0, speculative_tokens=2) == \
        back.generate("Hello", max_new_tokens=12, temperature=0)
    algos = {row["format"] for row in report["layers"].values()}
    if fmt == "mixed":   # a 6-bit budget: NVFP4 for most, FP8 for the most sensitive
        assert {"NVFP4", "FP8"} <= algos and 4.5 < report["bits_per_quantized_weight"] <= 6.0
    else:
        assert algos == {"NVFP4" if fmt == "nvfp4" else "FP8"}


def test_export_has_the_names_dtypes_and_configs_vllm_reads(float_ckpt, tmp_path):
    loaded = nemotron.load(float_ckpt)
    cfg, report = quantize_model(loaded, "nvfp4", TEXTS, kv_cache=True)
    out = save_quantized(loaded, cfg, tmp_path / "nvfp4", report)
    refs = read_safetensors_index(out / "model.safetensors")
    dt = {k: (r.dtype, tuple(r.shape)) for k, r in refs.items()}
    # a Mamba projection: packed E2M1 [N, K/2], E4M3 block scales [N, K/16], fp32 scalars
    n, k = loaded.model.backbone.layers[0].mixer.in_proj.out_features, 64
    p = "backbone.layers.0.mixer.in_proj"
    assert dt[f"{p}.weight"] == (torch.uint8, (n, k // 2))
    assert dt[f"{p}.weight_scale"] == (torch.float8_e4m3fn, (n, k // 16))
    assert dt[f"{p}.weight_scale_2"] == (torch.float32, ()) and dt[f"{p}.input_scale"] == (torch.float32, ())
    # routed experts: one tensor set per expert, as the release names them
    for e in (0, 7):
        assert dt[f"backbone.layers.1.mixer.experts.{e}.down_proj.weight"][0] == torch.uint8
        assert dt[f"backbone.layers.1.mixer.experts.{e}.up_proj.input_scale"] == (torch.float32, ())
    assert not any(".experts.up_proj" in name for name in dt)   # no stacked tensors
    # FP8 KV-cache scales (amax / 448, at least 1) on the attention's k/v projections
    assert refs["backbone.layers.3.mixer.k_proj.k_scale"].read() >= 1.0
    assert dt["backbone.layers.3.mixer.v_proj.v_scale"] == (torch.float32, ())
    # left unquantized: lm_head, the router, the conv; the vocabulary embedding
    assert dt["lm_head.weight"][0] == torch.float32 and dt["backbone.layers.1.mixer.gate.weight"][0] == torch.float32
    legacy = json.loads((out / HF_QUANT_CONFIG).read_text())["quantization"]
    assert legacy["quant_algo"] == "NVFP4" and legacy["group_size"] == 16 and legacy["kv_cache_quant_algo"] == "FP8"
    assert {"lm_head", "*.mixer.gate", "*.mixer.conv1d"} <= set(legacy["exclude_modules"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and "lm_head" in qc["ignore"]
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "float", "dynamic": False,
                                                         "group_size": 16}
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "dynamic": False}
    assert (out / "tokenizer.json").is_file()


def test_mixed_choice_keeps_to_the_bits_budget():
    stats = {"a": LayerStats("a", 1000), "b": LayerStats("b", 1000), "c": LayerStats("c", 2000)}
    errors = {"a": {"NVFP4": 0.2, "FP8": 0.02}, "b": {"NVFP4": 0.05, "FP8": 0.01}, "c": {"NVFP4": 0.1, "FP8": 0.02}}
    assert choose_mixed(stats, errors, 4.5) == {"a": "NVFP4", "b": "NVFP4", "c": "NVFP4"}
    # 5.5 bits: room for 1000 weights to go to FP8 (+3.5 bits each on 4000 weights = +0.875 on average)
    assert choose_mixed(stats, errors, 5.5) == {"a": "FP8", "b": "NVFP4", "c": "NVFP4"}
    assert choose_mixed(stats, errors, 8.0) == {"a": "FP8", "b": "FP8", "c": "FP8"}
    assert set(choose_mixed(stats, errors, 16.0).values()) == {None}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nemotron.cli", "quantize", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_quantize_cli(float_ckpt, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) +
                     json.dumps({"messages": [{"role": "user", "content": "Hi there"}]}) + "\n")
    out = tmp_path / "mixed"
    r = _cli("--model", str(float_ckpt), "--format", "mixed", "--output", str(out), "--calib", str(calib),
             "--kv-cache", "fp8", "--dtype", "bfloat16", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bits per quantizable weight" in r.stdout and "most sensitive layers" in r.stdout
    m = nemotron.load(out)
    assert quantized_layers(m.model) and m.model.backbone.embeddings.weight.dtype == torch.bfloat16
    report = json.loads((out / "quantization_report.json").read_text())
    rows = report["layers"]
    assert rows["backbone.layers.0.mixer.in_proj"]["error_nvfp4"] > rows["backbone.layers.0.mixer.in_proj"]["error_fp8"]
    assert {r["format"] for r in rows.values()} <= {"NVFP4", "FP8", "unquantized"}
    # bad input: one clear line, non-zero exit, nothing written over
    r = _cli("--model", str(float_ckpt), "--format", "nvfp4", "--output", str(out), "--quiet")
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and "not an empty directory" in r.stderr
    r = _cli("--model", str(float_ckpt), "--format", "nvfp4", "--output", str(tmp_path / "x"), "--calib",
             str(tmp_path / "nope.jsonl"))
    assert r.returncode == 1 and "no such calibration file" in r.stderr and not (tmp_path / "x").exists()
    r = _cli("--model", str(float_ckpt), "--format", "int3", "--output", str(tmp_path / "y"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _cli("--model", str(float_ckpt), "--format", "mixed", "--budget-bits", "4", "--output", str(tmp_path / "z"))
    assert r.returncode == 1 and "below NVFP4" in r.stderr and not (tmp_path / "z").exists()
    info = subprocess.run([sys.executable, "-m", "nemotron.cli", "info", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and "MIXED_PRECISION (ModelOpt format), KV cache FP8" in info.stdout
    assert "layers NVFP4" in info.stdout
    # the quantized checkpoint generates from the CLI, with the low-precision cache options too
    r = subprocess.run([sys.executable, "-m", "nemotron.cli", "generate", "--model", str(out), "Hello", "--raw",
                        "--max-new-tokens", "6", "--kv-cache-dtype", "fp8", "--ssm-cache-dtype", "float16",
                        "--ssm-rounding", "stochastic"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr[-2000:]
    # a quantized checkpoint is served and chatted with, not trained
    r = subprocess.run([sys.executable, "-m", "nemotron.cli", "train", "sft", f"model={out}", f"data=[{calib}]",
                        "steps=1", f"out_dir={tmp_path / 'train'}", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "is quantized" in r.stderr


def test_wildcard_exclusions_round_trip(float_ckpt, tmp_path):
    loaded = nemotron.load(float_ckpt)
    # transformers' `model.` prefix names the same modules as the release's `backbone.`
    cfg, report = quantize_model(loaded, "fp8", TEXTS, exclude=["model.layers.3.mixer*", "mtp.*"])
    out = save_quantized(loaded, cfg, tmp_path / "excl", report)
    legacy = json.loads((out / HF_QUANT_CONFIG).read_text())["quantization"]
    assert {"backbone.layers.3.mixer*", "mtp.*"} <= set(legacy["exclude_modules"])   # in the checkpoint's names
    m = nemotron.load(out)
    attn = m.model.backbone.layers[3].mixer
    assert not any(isinstance(getattr(attn, p), QuantLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not any(isinstance(x, (QuantLinear, QuantExperts)) for x in m.model.mtp.modules())
    assert isinstance(m.model.backbone.layers[0].mixer.in_proj, QuantLinear)
    assert quantized_layers(m.model) == quantized_layers(loaded.model)


def test_serving_a_quantized_checkpoint(tmp_path):
    """The embedded model in NVFP4 with an FP8 KV cache, served to the official client: concurrent
    requests decode as one batch through the quantized experts and still answer correctly."""
    import concurrent.futures

    openai = pytest.importorskip("openai")
    from serving import running_server

    loaded = nemotron.load("tiny")
    cfg, report = quantize_model(loaded, "nvfp4", TEXTS, kv_cache=True)
    out = save_quantized(loaded, cfg, tmp_path / "tiny-nvfp4", report)
    questions = {"What is 4 + 5 * 3?": "19", "What is 45 + 38 - 12?": "71", "What is 12 * 4 + 30?": "78"}
    with running_server(out, "--kv-cache-dtype", "fp8", "--served-model-name", "tiny-nvfp4") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=120)

        def ask(q: str) -> str:
            r = client.chat.completions.create(model="tiny-nvfp4", messages=[{"role": "user", "content": q}],
                                               max_tokens=160, temperature=0)
            return r.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = dict(zip(questions, pool.map(ask, questions)))
    assert all(answers[q].strip().endswith(a) for q, a in questions.items()), answers


def test_compiled_decode_of_a_quantized_model_matches_eager(float_ckpt, tmp_path, monkeypatch):
    """On a CPU the compiled decode step of a quantized model multiplies the stored weights through
    nemotron.kernels as eager decode does (every quantized Linear, two calls per MoE layer: the
    profiler sees them run), with eager decoding's logits and tokens. Without the kernels the
    default rule keeps such a model eager."""
    if not kernels.available():
        pytest.skip("the CPU kernels do not run here")
    loaded = nemotron.load(float_ckpt)
    cfg, report = quantize_model(loaded, "nvfp4", TEXTS)
    m = nemotron.load(save_quantized(loaded, cfg, tmp_path / "nvfp4", report))
    monkeypatch.delenv("NEMOTRON_COMPILE", raising=False)
    assert steps.compile_blocker(m.model) is None
    ids = torch.tensor([m.tokenizer.encode("Hello there")])

    def next_logits(compiled: bool) -> torch.Tensor:   # the compiled step called as the engine calls it
        cache = m.model.new_cache(1, 32)
        with torch.inference_mode():
            token = steps.prefill(m.model, ids, cache).argmax(-1)
            if not compiled:
                return steps.decode_step(m.model, token, cache)
            return steps.compiled_decode_step(m.model)(token[:, None], cache.first(16), cache.seq_lens)

    eager_logits = next_logits(False)
    next_logits(True)                                  # compiles
    with torch.profiler.profile() as prof:
        compiled_logits = next_logits(True)
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("nemotron_cpu::gemv_nvfp4"))
    layers = [mod for mod in m.model.modules() if isinstance(mod, (QuantLinear, QuantExperts))]
    expected = sum(1 if isinstance(mod, QuantLinear) else 2 for mod in layers)
    assert calls >= expected > 0, (calls, expected)
    assert (compiled_logits - eager_logits).abs().max() < 1e-4
    eager = m.generate("Hello there", max_new_tokens=10, temperature=0, compile=False)
    assert m.generate("Hello there", max_new_tokens=10, temperature=0, compile=True) == eager

    monkeypatch.setattr(kernels, "_ENABLED", False)
    assert "quantized" in steps.compile_blocker(m.model) and not steps.use_compiled_decode(m.model, long_run=True)


@pytest.mark.slow
def test_compiled_dequantizing_decode_of_a_quantized_model_matches_eager(float_ckpt, tmp_path, monkeypatch):
    """Without the CPU kernels, torch.compile traces the dequantizing path (the chosen experts'
    stored tensors gathered: static shapes, no host reads) and picks eager decoding's tokens."""
    loaded = nemotron.load(float_ckpt)
    cfg, report = quantize_model(loaded, "nvfp4", TEXTS)
    m = nemotron.load(save_quantized(loaded, cfg, tmp_path / "nvfp4", report))
    monkeypatch.setattr(kernels, "_ENABLED", False)
    eager = m.generate("Hello there", max_new_tokens=10, temperature=0)
    assert m.generate("Hello there", max_new_tokens=10, temperature=0, compile=True) == eager
