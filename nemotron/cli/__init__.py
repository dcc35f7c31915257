"""The `nemotron` command line. Every failure the user can cause ends in one `error: ...` line and a
non-zero exit status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
import warnings
from collections import Counter
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from nemotron.api import EMBEDDED, load, resolve_model_path
from nemotron.config import load_config
from nemotron.config.presets import PRESETS, get_preset
from nemotron.errors import NemotronError, NemotronWarning
from nemotron.io.checkpoint import load_checkpoint_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.layers.cache import CacheOptions
from nemotron.models.info import count_params, summarize
from nemotron.quant.modelopt import read_quant_config
from nemotron.quant.quantize import quantize
from nemotron.tiny.recipe import TinyRecipe, format_table, run
from nemotron.train import load_recipe, train
from nemotron.train.trainer import coerce_setting


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n}{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or suffix == "TiB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _config_for(model: str):
    """A preset name or a checkpoint directory -> config."""
    if Path(model).exists() or model.lower() == EMBEDDED:
        return load_checkpoint_config(resolve_model_path(model))
    known = {k.lower() for p in PRESETS.values() for k in (p.name, p.hf_id)}
    if model.lower() in known:
        return get_preset(model).config
    raise NemotronError(f"{model}: no such checkpoint directory or preset (see `nemotron models`)")


def cmd_models(args: argparse.Namespace) -> None:
    rows = []
    for p in PRESETS.values():
        counts = count_params(p.config)
        rows.append({"name": p.name, "family": p.family, "advertised": p.advertised, "hf_id": p.hf_id,
                     "layers": p.config.num_hidden_layers, "total_params": counts["total"],
                     "active_params": counts["active"], "mtp": counts["mtp"] > 0})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="Nemotron family presets (parameter counts computed from each config)")
    for col in ("preset", "family", "size", "layers", "total", "active", "MTP", "Hugging Face id"):
        table.add_column(col, justify="right" if col in ("layers", "total", "active") else "left")
    for r in rows:
        table.add_row(r["name"], r["family"], r["advertised"], str(r["layers"]), _human(r["total_params"]),
                      _human(r["active_params"]), "yes" if r["mtp"] else "", r["hf_id"])
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)


def cmd_info(args: argparse.Namespace) -> None:
    info = summarize(_config_for(args.model))
    quant = _quant_summary(args.model)
    if quant:
        info["quantization"] = quant
    if args.json:
        print(json.dumps(info, indent=2))
        return
    lines = [
        f"architecture      {info['architecture']} ({info['model_type']})",
        f"layers            {info['num_layers']}" + (
            "  (" + ", ".join(f"{v} {k}" for k, v in info["layer_counts"].items()) + ")" if "layer_counts" in info else ""),
        f"layer pattern     {info['layer_pattern']}",
        f"hidden / vocab    {info['hidden_size']} / {info['vocab_size']}",
        f"total params      {info['total_params']:,} ({_human(info['total_params'])})",
        f"active params     {info['active_params']:,} ({_human(info['active_params'])})",
    ]
    if info["mtp_params"]:
        lines.append(f"MTP params        {info['mtp_params']:,} ({_human(info['mtp_params'])}, not in total)")
    if "experts" in info:
        e = info["experts"]
        lines.append(f"experts           {e['per_token']} of {e['routed']} per token" +
                     (f", latent size {e['latent_size']}" if e["latent_size"] else ""))
    lines.append("weight memory     " + ", ".join(f"{k} {_bytes(v)}" for k, v in info["weight_bytes"].items()))
    lines.append(f"KV cache          {_bytes(info['kv_bytes_per_token'])} per token (bf16)")
    if info["mamba_state_bytes_per_sequence"]:
        lines.append(f"Mamba state       {_bytes(info['mamba_state_bytes_per_sequence'])} per sequence "
                     "(bf16 conv, fp32 SSM)")
    if quant:
        lines.append(f"quantization      {quant['quant_algo']} (ModelOpt format)"
                     + (f", KV cache {quant['kv_cache_quant_algo']}" if quant["kv_cache_quant_algo"] else "")
                     + ("; " + ", ".join(f"{n} layers {a}" for a, n in sorted(quant["layers"].items()))
                        if quant["layers"] else "")
                     + (f"; excluded: {', '.join(quant['exclude_modules'])}" if quant["exclude_modules"] else ""))
    print("\n".join(lines))


def _quant_summary(model: str) -> dict | None:
    """A checkpoint directory's quantization config (None for presets and unquantized checkpoints)."""
    if not Path(model).is_dir():
        return None
    cfg = read_quant_config(Path(model))
    if cfg is None:
        return None
    layers = Counter(scheme.algo for scheme in cfg.quantized_layers.values())
    return {"quant_algo": cfg.quant_algo, "kv_cache_quant_algo": cfg.kv_cache_quant_algo, "layers": dict(layers),
            "exclude_modules": cfg.exclude_modules}


def cmd_init(args: argparse.Namespace) -> None:
    config = load_config(args.config) if args.config else None
    out = init_checkpoint(args.output, config, seed=args.seed)
    print(f"wrote a randomly initialised checkpoint to {out}")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    out = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.stop:
        out["stop"] = args.stop
    return out


def _cache_options(args: argparse.Namespace):
    return CacheOptions(args.kv_cache_dtype, args.ssm_cache_dtype, args.ssm_rounding)


def _cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "nvfp4"], default="auto",
                   help="fp8: E4M3 attention KV cache with the checkpoint's k/v scales; nvfp4: 4-bit blocks "
                        "(ModelOpt's NVFP4 KV cache)")
    p.add_argument("--ssm-cache-dtype", choices=["float32", "float16", "bfloat16"],
                   help="the Mamba SSM state's dtype (default: the config's mamba_ssm_cache_dtype)")
    p.add_argument("--ssm-rounding", choices=["nearest", "stochastic"], default="nearest",
                   help="rounding of a float16/bfloat16 SSM state after each update")


def _load_for_generation(args: argparse.Namespace):
    if args.max_new_tokens < 0:
        raise NemotronError("--max-new-tokens must be >= 0")
    if args.thinking_budget is not None and args.thinking_budget < 0:
        raise NemotronError("--thinking-budget must be >= 0")
    m = load(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty(),
             cache=_cache_options(args))
    if m.tokenizer is None:
        raise NemotronError(f"{args.model} has no tokenizer.json")
    return m


class _Printer:
    """Reasoning (dim, on a TTY) apart from the answer; plain labelled sections otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.section: str | None = None

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind != self.section:
            if self.section is not None:
                sys.stdout.write("\n")
            if kind == "reasoning":
                sys.stdout.write("\033[2m[thinking] " if self.tty else "[thinking]\n")
            elif kind == "content" and self.section == "reasoning":
                sys.stdout.write("\033[0m" if self.tty else "[answer]\n")
            self.section = kind
        sys.stdout.write(text)
        sys.stdout.flush()

    def tool_call(self, call: dict) -> None:
        self.write("tool", f"[tool call] {call['function']['name']}({call['function']['arguments']})")

    def end(self) -> None:
        if self.tty and self.section == "reasoning":
            sys.stdout.write("\033[0m")
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.section = None


def _chat_turn(m, messages: list[dict], args: argparse.Namespace, enable_thinking: bool,
               thinking_budget: int | None, tools: list[dict] | None, printer: _Printer):
    """Generate one assistant turn, streaming it through `printer`; returns the ChatResult."""
    result = None
    for item in m.chat(messages, tools=tools, enable_thinking=enable_thinking, thinking_budget=thinking_budget,
                       max_new_tokens=args.max_new_tokens, stream=True, speculative_tokens=args.speculative_tokens,
                       compile=args.compile, special_tokens_in_content=args.allow_special_tokens_in_content,
                       **_sampling_kwargs(args)):
        if item.kind == "delta":   # a Delta; the last item is the ChatResult (kind "result")
            printer.write("reasoning", item.reasoning)
            printer.write("content", item.content)
            for call in item.tool_calls:
                printer.tool_call(call)
        else:
            result = item
    printer.end()
    if result.speculation:
        sp = result.speculation
        print(f"[MTP] {sp['accepted']}/{sp['drafted']} drafts accepted, {sp['acceptance_length']:.2f} tokens "
              "per verify step", file=sys.stderr)
    return result


def cmd_generate(args: argparse.Namespace) -> None:
    m = _load_for_generation(args)
    has_template = m.tokenizer.chat_template is not None
    if args.raw or not has_template:
        if args.system or args.no_think or args.thinking_budget is not None:
            raise NemotronError("--system / --no-think / --thinking-budget need a checkpoint with a chat template")
        if sys.stdout.isatty():
            sys.stdout.write(args.prompt)
            for delta in m.stream(args.prompt, args.max_new_tokens, **_sampling_kwargs(args)):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(args.prompt + m.generate(args.prompt, args.max_new_tokens, args.speculative_tokens,
                                           args.compile, **_sampling_kwargs(args)))
        return
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    _chat_turn(m, messages, args, not args.no_think, args.thinking_budget, None, _Printer())


def _content_tokens_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="let message and tool text spell control tokens (<|im_start|>, <think>, ...), as "
                        "transformers and vLLM do (default: such text is tokenized as ordinary text)")


CHAT_HELP = """commands: /think on|off  /budget N|off  /system TEXT  /tool RESULT (answer the last tool call)
          /clear (forget the conversation)  /exit"""


def cmd_chat(args: argparse.Namespace) -> None:
    m = _load_for_generation(args)
    if m.tokenizer.chat_template is None:
        raise NemotronError(f"{args.model} has no chat template")
    tools = None
    if args.tools:
        try:
            tools = json.loads(Path(args.tools).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NemotronError(f"--tools {args.tools}: {e}") from None
    thinking, budget, system = not args.no_think, args.thinking_budget, args.system
    history: list[dict] = []
    printer = _Printer()
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/clear":
                history = []
                print("(conversation cleared)")
            elif command == "/think" and rest in ("on", "off"):
                thinking = rest == "on"
                print(f"(thinking {rest})")
            elif command == "/budget" and (rest == "off" or rest.isdigit()):
                budget = None if rest == "off" else int(rest)
                print(f"(thinking budget {rest})")
            elif command == "/system":
                system = rest or None
                print("(system prompt set)" if system else "(system prompt cleared)")
            elif command == "/tool" and history and history[-1].get("tool_calls"):
                history.append({"role": "tool", "content": rest})
                history.append(_chat_turn(m, _with_system(system, history), args, thinking, budget, tools,
                                          printer).message())
            else:
                print(CHAT_HELP)
            continue
        history.append({"role": "user", "content": line})
        history.append(_chat_turn(m, _with_system(system, history), args, thinking, budget, tools, printer).message())


def _with_system(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def cmd_train(args: argparse.Namespace) -> None:
    cfg = load_recipe(args.config, args.overrides, stage=args.stage)  # every key checked before any work
    summary = train(cfg, progress=not args.quiet)
    print(json.dumps(summary, indent=1))


def cmd_recipe(args: argparse.Namespace) -> None:
    hints = typing.get_type_hints(TinyRecipe)
    values = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"recipe tiny: unknown setting {item!r} (known: {', '.join(hints)})")
        values[key] = coerce_setting(key, yaml.safe_load(raw), hints[key])
    table = run(TinyRecipe(**values), progress=not args.quiet)
    print(format_table(table))


def cmd_serve(args: argparse.Namespace) -> None:
    # imported here: the server's web stack (fastapi, uvicorn) adds about a second to every other command
    from nemotron.serve import serve

    kwargs = None
    if args.default_chat_template_kwargs:
        try:
            kwargs = json.loads(args.default_chat_template_kwargs)
        except ValueError as e:
            raise ValueError(f"--default-chat-template-kwargs is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--default-chat-template-kwargs must be a JSON object")
    if args.speculative_tokens < 0:
        raise ValueError("--speculative-tokens must be >= 0")
    for flag in ("port", "max_batch", "max_model_len", "prefill_chunk", "prefix_block", "max_waiting", "max_tokens",
                 "threads", "prefill_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "port" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    serve(args.model, args.host, args.port, args.api_key, args.served_model_name, args.max_batch, args.max_model_len,
          args.prefill_chunk, args.max_waiting, args.prefix_cache_mb, args.max_tokens, kwargs, args.dtype,
          args.device, args.threads, args.speculative_tokens, _cache_options(args), args.prefill_threads,
          allow_special_tokens_in_content=args.allow_special_tokens_in_content, prefix_block=args.prefix_block,
          compile=args.compile)


def cmd_quantize(args: argparse.Namespace) -> None:
    if args.budget_bits <= 0:
        raise ValueError("--budget-bits must be positive")
    summary = quantize(args.model, args.format, args.output, args.calib, args.budget_bits, args.exclude,
                       kv_cache=args.kv_cache == "fp8", dtype=args.dtype, progress=not args.quiet)
    layers = summary["layers"]
    table = Table(title="most sensitive layers (relative output error on the calibration inputs)")
    for col in ("layer", "params", "format", "error NVFP4", "error FP8"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    ranked = sorted(layers.items(), key=lambda kv: -kv[1].get("error_nvfp4", 0.0))
    for name, row in ranked[:args.show]:
        table.add_row(name, _human(row["params"]), row["format"], f"{row.get('error_nvfp4', float('nan')):.4f}",
                      f"{row.get('error_fp8', float('nan')):.4f}")
    console = Console()
    console.print(table)
    counts = Counter(row["format"] for row in layers.values())
    console.print(f"{summary['quant_algo']}: " + ", ".join(f"{n} layers {f}" for f, n in sorted(counts.items()))
                  + f"; {summary['bits_per_quantized_weight']:.2f} bits per quantizable weight")
    console.print(f"wrote {args.output} (report: quantization_report.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotron", description="The NVIDIA Nemotron model family in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the family presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="architecture, parameters, memory of a preset or checkpoint")
    p.add_argument("model", help="preset name or checkpoint directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint (default: the toy Nemotron 3 Super layout)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--config", help="a config.json to initialise instead of the toy default")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    def generation_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny", help="checkpoint directory (default: the embedded tiny model)")
        p.add_argument("--system", help="system message")
        p.add_argument("--no-think", action="store_true", help="reasoning off (enable_thinking=false)")
        p.add_argument("--thinking-budget", type=int, help="cap on reasoning tokens")
        p.add_argument("--max-new-tokens", type=int, default=512)
        p.add_argument("--temperature", type=float, help="0 = greedy (the default)")
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--min-p", type=float)
        p.add_argument("--repetition-penalty", type=float)
        p.add_argument("--presence-penalty", type=float)
        p.add_argument("--frequency-penalty", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--speculative-tokens", type=int, default=0, help="MTP draft tokens per step (greedy)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the decode step from the first token (--no-compile: never); by default "
                            "it is compiled once the model has decoded eagerly about as long as compiling takes")
        p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
        p.add_argument("--device", default="cpu")
        _content_tokens_flag(p)
        _cache_flags(p)

    p = sub.add_parser("generate", help="one completion (chat-formatted when the checkpoint has a template)")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat template")
    generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, reasoning shown apart from the answer")
    p.add_argument("--tools", help="JSON file with an OpenAI-style tool list to offer the model")
    generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="pretrain, fine-tune (SFT), DPO or GRPO from a recipe (recipes/*.yaml)")
    p.add_argument("stage", choices=["pretrain", "sft", "dpo", "grpo"])
    p.add_argument("--config", help="recipe file (YAML or JSON)")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the recipe")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipe", help="run a whole recipe end to end (tiny: data -> tokenizer -> pretrain -> SFT -> GRPO)")
    p.add_argument("name", choices=["tiny"])
    p.add_argument("overrides", nargs="*", help="key=value settings (out_dir=..., pretrain_steps=..., ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument("--model", default="tiny", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (cache rows)")
    p.add_argument("--max-model-len", type=int, default=4096, help="context length per sequence")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--prefix-block", type=int,
                   help="prefix-cache block in tokens, a divisor of --prefill-chunk (default: the model's Mamba "
                        "scan chunk, 64 for the embedded model; equal to --prefill-chunk: restores only where "
                        "a prefill forward ended, bit-identical whatever the kernels)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--prefix-cache-mb", type=int, default=256, help="prefix-cache budget (0 turns it off)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--default-chat-template-kwargs", help='JSON, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads for decode steps (default: all cores for a model of 128 MiB of weights "
                        "or more, else all cores but one, left to the HTTP side)")
    p.add_argument("--prefill-threads", type=int, help="torch CPU threads for prefill chunks (default: all cores)")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="MTP draft tokens per step for greedy requests (checkpoints with MTP weights)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step before serving (default: unless nothing can compile it, e.g. no "
                        "C++ compiler; --no-compile: decode eagerly)")
    _content_tokens_flag(p)
    _cache_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="NVFP4 / FP8 / mixed post-training quantization (ModelOpt checkpoint format)")
    p.add_argument("--model", required=True, help="checkpoint directory (or 'tiny')")
    p.add_argument("--format", required=True, choices=["nvfp4", "fp8", "mixed"])
    p.add_argument("--output", required=True, help="new checkpoint directory")
    p.add_argument("--calib", help="calibration text: .jsonl ('text' or 'messages' records) or plain text "
                                   "(blank-line separated); default: a few built-in samples")
    p.add_argument("--budget-bits", type=float, default=4.75,
                   help="mixed: average bits per quantizable weight (NVFP4 4.5, FP8 8, unquantized 16)")
    p.add_argument("--exclude", nargs="*", default=[], help="module names or wildcards kept unquantized")
    p.add_argument("--kv-cache", choices=["fp8"], help="also export FP8 KV-cache scales")
    p.add_argument("--dtype", help="dtype of the tensors left unquantized (default: the checkpoint's)")
    p.add_argument("--show", type=int, default=15, help="layers listed in the sensitivity table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings as one `warning: ...` line, like its errors; others as Python shows them."""
    if issubclass(category, NemotronWarning):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _show_compile_notes() -> None:
    """The one-time compiles, of the decode step (nemotron.inference.steps) and of the CPU kernels
    (nemotron.kernels, once per machine), are noted on stderr with their seconds, since the command
    pauses for them."""
    for name in ("nemotron.inference.steps", "nemotron.kernels"):
        notes = logging.getLogger(name)
        if not notes.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("\n[%(message)s]"))   # on a line of its own, mid-stream too
            notes.addHandler(handler)
            notes.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    _show_compile_notes()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "recipe"):  # key=value overrides may come before or after the flags
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (NemotronError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
