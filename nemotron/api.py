"""`nemotron.load()`: a checkpoint directory (or preset) -> config, model, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import checkpoint_dtype, load_checkpoint_config, load_weights, save_checkpoint
from .config import AnyConfig
from .errors import CheckpointError
from .models import build_model
from .tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    config: AnyConfig
    model: nn.Module
    tokenizer: Tokenizer | None
    path: Path | None = None

    def save(self, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Save in the release layout (config.json + safetensors) with the tokenizer files, if any."""
        out = save_checkpoint(self.model, self.config, out_dir, parse_dtype(dtype))
        if self.path is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                         "special_tokens_map.json", "generation_config.json"):
                src = self.path / name
                if src.is_file() and src.resolve() != (out / name).resolve():
                    (out / name).write_bytes(src.read_bytes())
        return out


def resolve_model_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    from .presets import PRESETS  # a preset name: only presets that ship weights can be loaded
    key = str(name_or_path).lower()
    if key in PRESETS:
        raise CheckpointError(
            f"preset {name_or_path!r} ships no weights; download its checkpoint ({PRESETS[key].hf_id}) "
            "and pass the directory"
        )
    raise CheckpointError(f"{name_or_path}: no such checkpoint directory or preset")


def load(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    progress: bool = False,
) -> LoadedModel:
    """Load a Hugging Face checkpoint directory (release or transformers 5 layout).

    The model is built on the meta device and its tensors are read straight from the files, so
    peak memory stays near one copy of the weights. dtype defaults to the checkpoint's own.
    `progress=True` shows a progress bar on stderr."""
    path = resolve_model_path(name_or_path)
    config = load_checkpoint_config(path)
    dtype = parse_dtype(dtype) or checkpoint_dtype(config)
    with torch.device("meta"):
        model = build_model(config)
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(path.name, total=None)
            load_weights(model, config, path, dtype, device, allow_pickle,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        load_weights(model, config, path, dtype, device, allow_pickle)
    model.to(device).eval()
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(config, model, tokenizer, path)
