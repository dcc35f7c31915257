"""Training checkpoints: everything a bit-identical resume needs, in safetensors + JSON (nothing
pickled): the model's own state dict (parameters and buffers, exact names and dtypes), the optimizer
state, the step, the data position and the RNG state.

A checkpoint is written into a temporary folder that is renamed into place, then the `latest` pointer
is replaced atomically, so a crash at any moment leaves the previous checkpoint as the latest one.
Under torch.distributed every rank writes its own shards (`*.rank{r}.safetensors`, DTensors as
their local pieces) and resumes from them on the same layout; rank 0 writes trainer.json, renames
the folder and moves the pointer once every rank is done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_safetensors_index, write_safetensors


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: ref.read() for name, ref in read_safetensors_index(path).items()}


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _suffix(world: int, rank: int) -> str:
    return "" if world == 1 else f".rank{rank}"


def save_training_state(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict, keep: int = 2) -> Path:
    rank, world = _dist()
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    sfx = _suffix(world, rank)
    write_safetensors(tmp / f"model{sfx}.safetensors", {k: _local(v) for k, v in model.state_dict().items()})
    tensors, scalars = {}, {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = _local(value)
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    write_safetensors(tmp / f"optimizer{sfx}.safetensors", tensors)
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(
            {"step": step, "world_size": world, "param_groups": optimizer.state_dict()["param_groups"],
             "scalars": scalars, **extra}, indent=1) + "\n")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, ckpt_root / "latest")
        for old in sorted(p for p in ckpt_root.glob("step_*") if p != final)[:-max(0, keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


@torch.no_grad()
def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder (written with the same world size);
    returns its trainer.json. Values are copied into the live tensors (local shards of DTensors)."""
    rank, world = _dist()
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("world_size", 1) != world:
        raise ValueError(f"{path} was written by {meta.get('world_size', 1)} processes; resume with as many")
    sfx = _suffix(world, rank)
    saved = _load_tensors(path / f"model{sfx}.safetensors")
    live = model.state_dict()
    missing = [k for k in live if k not in saved and not k.endswith("tokens_per_expert")]
    unexpected = [k for k in saved if k not in live]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name, tensor in saved.items():
        _local(live[name]).copy_(tensor)
    tensors = _load_tensors(path / f"optimizer{sfx}.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):   # AdamW's state, created as its first step would, then filled in
        keys = {k.split(".", 1)[1] for k in tensors if k.split(".", 1)[0] == str(i)}
        if not keys:
            continue
        state = optimizer.state[p]
        for key in keys:
            value = tensors[f"{i}.{key}"]
            if key == "step":
                state[key] = value.clone()
            else:
                state[key] = torch.zeros_like(p) if key not in state else state[key]
                _local(state[key]).copy_(value)
        for key, value in meta["scalars"].items():
            idx, name = key.split(".", 1)
            if idx == str(i):
                state[name] = value
    for group, saved_group in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    return meta
