"""The real CLI, run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import nemotron


def _run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "nemotron.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_info_super_preset_json():
    info = json.loads(_run("info", "nemotron-3-super-120b-a12b", "--json").stdout)
    assert info["total_params"] == 120_668_707_840
    assert info["architecture"] == "NemotronHForCausalLM" and info["num_layers"] == 88
    assert 12.5e9 < info["active_params"] < 13e9
    assert info["mtp_params"] == 123_611_033_088 - 120_668_707_840


def test_info_text_and_models_table():
    text = _run("info", "nemotron-3-nano-30b-a3b").stdout
    assert "31,577,940,288" in text and "6 of 128 per token" in text and "per sequence" in text
    table = _run("models").stdout
    assert "llama-3.3-nemotron-super-49b-v1" in table and "minitron-8b" in table
    rows = json.loads(_run("models", "--json").stdout)
    assert len(rows) >= 25
    # the Llama / Mistral members, as their own families
    for name in ("llama-3.1-nemotron-70b-instruct", "llama-3.1-nemotron-nano-8b-v1", "llama-3.1-nemotron-nano-4b-v1.1",
                 "llama-3.1-minitron-4b-width-base", "mistral-nemo-minitron-8b-base"):
        assert name in table
    by_name = {r["name"]: r for r in rows}
    assert by_name["llama-3.1-minitron-4b-depth-base"]["family"] == "llama"
    assert by_name["llama-3.1-minitron-4b-depth-base"]["layers"] == 16
    assert by_name["mistral-nemo-minitron-8b-instruct"]["family"] == "mistral"
    assert by_name["mistral-nemo-minitron-8b-base"]["total_params"] == 8_414_105_600


def test_info_llama_preset():
    info = json.loads(_run("info", "llama-3.1-minitron-4b-width-base", "--json").stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["total_params"] == 4_512_746_496 and info["num_layers"] == 32
    assert info["layer_pattern"] == " ".join(["AF"] * 32)
    assert info["kv_bytes_per_token"] == 32 * 2 * 8 * 128 * 2   # layers * (k, v) * KV heads * head_dim * bf16


def test_init_info_generate(tmp_path):
    out = tmp_path / "tiny"
    _run("init", out)
    info = json.loads(_run("info", out, "--json").stdout)
    assert info["layer_pattern"] == "MEM*EME" and info["mtp_params"] > 0
    text = _run("generate", "--model", out, "Hello", "--max-new-tokens", "5", "--raw").stdout
    assert text.startswith("Hello")
    # the CLI prints the prompt followed by the greedy continuation computed through the cache
    import torch

    from nemotron.inference.steps import greedy_generate

    m = nemotron.load(out)
    ids = greedy_generate(m.model, torch.tensor([m.tokenizer.encode("Hello")]), 5, {m.tokenizer.eos_token_id})
    assert text == "Hello" + m.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True) + "\n"


def test_generate_chat_format_and_chat_repl(tmp_path):
    """`generate` on a checkpoint with a chat template answers in the chat format, reasoning apart;
    `chat` keeps history and obeys its slash commands (stdin piped, so no prompts are printed)."""
    out = tmp_path / "tiny"
    _run("init", out)
    shown = _run("generate", "--model", out, "Hi", "--max-new-tokens", "30", "--thinking-budget", "2").stdout
    assert shown.startswith("[thinking]\n")
    m = nemotron.load(out)
    expect = m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=30, thinking_budget=2)
    assert "</think>" in expect.text  # the budget closed the reasoning
    assert expect.reasoning.strip() in shown
    off = _run("generate", "--model", out, "Hi", "--max-new-tokens", "6", "--no-think").stdout
    assert "[thinking]" not in off
    script = "hello\n/think off\nagain\n/budget 3\n/clear\n/bogus\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "nemotron.cli", "chat", "--model", str(out), "--max-new-tokens", "6"],
                            input=script, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(thinking off)" in result.stdout and "(thinking budget 3)" in result.stdout
    assert "(conversation cleared)" in result.stdout and "commands:" in result.stdout
    bad = _run("generate", "--model", out, "Hi", "--temperature", "-1", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "temperature" in bad.stderr
