"""Randomly initialised checkpoints in the release layout (config.json, model.safetensors and, by
default, a byte-level tokenizer with the Nemotron 3 chat template): for tests, benchmarks and
`nemotron init`."""

from __future__ import annotations

from pathlib import Path

from nemotron.config import AnyConfig
from nemotron.config.presets import toy_super_config
from nemotron.io.checkpoint import save_checkpoint
from nemotron.io.tokenizer import write_byte_tokenizer
from nemotron.models import build_model
from nemotron.models.init import init_weights_


def init_checkpoint(out_dir: str | Path, config: AnyConfig | None = None, seed: int = 0,
                    with_tokenizer: bool = True) -> Path:
    """Write a randomly initialised checkpoint (config.json, model.safetensors, tokenizer) to out_dir;
    the config defaults to `toy_super_config()`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or toy_super_config()
    if with_tokenizer:
        size = write_byte_tokenizer(out)
        if config.vocab_size < size:
            raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {size}")
    model = init_weights_(build_model(config), config, seed)
    save_checkpoint(model, config, out)
    return out
