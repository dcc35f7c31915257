"""The `nemotron` command line. Every failure the user can cause ends in one `error: ...` line and a
non-zero exit status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import NemotronError


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
    from .checkpoint import load_checkpoint_config
    from .presets import PRESETS, get_preset

    if Path(model).exists():
        return load_checkpoint_config(Path(model))
    known = {k.lower() for p in PRESETS.values() for k in (p.name, p.hf_id)}
    if model.lower() in known:
        return get_preset(model).config
    raise NemotronError(f"{model}: no such checkpoint directory or preset (see `nemotron models`)")


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from .info import count_params
    from .presets import PRESETS

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
    from .info import summarize

    info = summarize(_config_for(args.model))
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
    print("\n".join(lines))


def cmd_init(args: argparse.Namespace) -> None:
    from .config import load_config
    from .init import init_checkpoint

    config = load_config(args.config) if args.config else None
    out = init_checkpoint(args.output, config, seed=args.seed)
    print(f"wrote a randomly initialised checkpoint to {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .api import load
    from .generate import greedy_generate

    if args.max_new_tokens < 0:
        raise NemotronError("--max-new-tokens must be >= 0")
    m = load(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty())
    if m.tokenizer is None:
        raise NemotronError(f"{args.model} has no tokenizer.json")
    ids = m.tokenizer.encode(args.prompt)
    if not ids:
        raise NemotronError("the prompt is empty")
    stop = {i for i in (m.tokenizer.eos_token_id,) if i is not None}
    eos = m.config.eos_token_id
    stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = greedy_generate(m.model, torch.tensor([ids], device=args.device), args.max_new_tokens, stop)
    print(args.prompt + m.tokenizer.decode(out[0].tolist(), skip_special_tokens=True))


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

    p = sub.add_parser("init", help="write a randomly initialised checkpoint (default: tiny Nemotron 3 Super layout)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--config", help="a config.json to initialise instead of the tiny default")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="greedy completion of a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
