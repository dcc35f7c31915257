"""Training checkpoints: everything a bit-identical resume needs, in safetensors + JSON (nothing
pickled): the model's own state dict (parameters and buffers, exact names and dtypes), the optimizer
state, the step, the data position and the RNG state.

A checkpoint is written into a temporary folder that is renamed into place, then the `latest` pointer
is replaced atomically, so a crash at any moment leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_safetensors_index, write_safetensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: ref.read() for name, ref in read_safetensors_index(path).items()}


def save_training_state(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict, keep: int = 2) -> Path:
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors(tmp / "model.safetensors", {k: v for k, v in model.state_dict().items()})
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    write_safetensors(tmp / "optimizer.safetensors", tensors)
    (tmp / "trainer.json").write_text(json.dumps(
        {"step": step, "param_groups": opt["param_groups"], "scalars": scalars, **extra}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = ckpt_root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, ckpt_root / "latest")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p != final)[:-max(0, keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder; returns its trainer.json."""
    meta = json.loads((path / "trainer.json").read_text())
    missing, unexpected = model.load_state_dict(_load_tensors(path / "model.safetensors"), strict=False)
    missing = [m for m in missing if not m.endswith("tokens_per_expert")]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    tensors = _load_tensors(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
