"""Training checkpoints: everything a bit-identical resume needs, in safetensors + JSON (nothing
pickled): the model's own state dict (parameters and buffers, exact names and dtypes), the optimizer
state, the step, the data position and the RNG state.

A checkpoint is written into a temporary folder that is renamed into place, then the `latest` pointer
is replaced atomically, so a crash at any moment leaves the previous checkpoint as the latest one.
Under torch.distributed every rank writes its own shards (`*.rank{r}.safetensors`, DTensors as
their local pieces) and resumes from them on the same layout; rank 0 writes trainer.json, renames
the folder and moves the pointer once every rank is done.

Resuming never discards a run silently. The `step_*` folders are scanned newest first and the first
one that is intact is resumed from: its trainer.json, tensor files, names, shapes and dtypes are all
checked against the live model and optimizer before anything is copied into them. `latest` is only a
hint (a crash between the rename and the pointer update leaves it one checkpoint behind); when it is
missing, garbled or disagrees with the scan, that is reported. Newer folders that fail the check are
renamed `damaged_step_*` (kept for the user, out of the way of pruning and of the steps this run will
write again), and one line says what was damaged, why, and where the run resumes. If there are
checkpoints but none is usable, resuming refuses with a CheckpointError instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nemotron.errors import CheckpointError
from nemotron.io.checkpoint import read_safetensors_index, write_safetensors

STEP_DIR = re.compile(r"step_(\d{8})")
DAMAGED_PREFIX = "damaged_"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(problem: str | None) -> str | None:
    """The first problem any rank found (so that every rank resumes from the same checkpoint)."""
    if not (dist.is_available() and dist.is_initialized()):
        return problem
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


def _suffix(world: int, rank: int) -> str:
    return "" if world == 1 else f".rank{rank}"


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """The (step, folder) of every `step_NNNNNNNN` folder (eight digits), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _point_latest(ckpt_root: Path, name: str) -> None:
    pointer = ckpt_root / "latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, ckpt_root / "latest")


def save_training_state(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` and keep the newest `keep` ones. Only `step_*` folders are pruned, and
    all of them are older than this save or written by this run: a resume has moved the damaged newer
    ones aside (and resume=false an earlier run's whole folder)."""
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
        _point_latest(ckpt_root, final.name)
        older = [p for _, p in step_dirs(ckpt_root) if p != final]
        for old in older[:-max(0, keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, if it has a trainer.json (no other check)."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


# --------------------------------------------------------------------------------------------------
# reading and checking a checkpoint (nothing live is touched until everything has passed)
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """A checkpoint read into memory and checked against the live model and optimizer."""

    path: Path
    meta: dict
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]   # "{param index}.{key}" and "rng.torch"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_meta(file: Path) -> dict:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _check_meta(file: Path, meta: dict, step: int | None, world: int, optimizer: torch.optim.Optimizer,
                data_state: dict | None) -> None:
    def fail(problem: str) -> None:
        raise CheckpointError(f"{file}: {problem}")

    for key, kind in (("step", int), ("world_size", int), ("param_groups", list), ("scalars", dict),
                      ("data", dict)):
        if key not in meta:
            fail(f"no {key!r}")
        if not (_is_int(meta[key]) if kind is int else isinstance(meta[key], kind)):
            fail(f"{key!r} must be {'an integer' if kind is int else 'a JSON ' + kind.__name__}, got {meta[key]!r:.40}")
    if step is not None and meta["step"] != step:
        fail(f"says step {meta['step']}, its folder step {step}")
    if meta["world_size"] != world:
        fail(f"written by {meta['world_size']} processes; resume with as many (this run has {world})")
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        fail(f"{len(groups)} parameter groups, the optimizer has {len(optimizer.param_groups)}")
    for saved, live in zip(groups, optimizer.param_groups):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list) \
                or len(saved["params"]) != len(live["params"]):
            fail("a parameter group does not fit this model's optimizer")
        for key, value in saved.items():   # hyperparameters the optimizer reads must keep their kind
            if key in live and (_is_number(live[key]) and not _is_number(value)
                                or isinstance(live[key], bool) and not isinstance(value, bool)):
                fail(f"parameter group {key!r} is {value!r:.40}")
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    for key in meta["scalars"]:
        idx, sep, _ = key.partition(".")
        if not (sep and idx.isdigit() and int(idx) < n_params):
            fail(f"optimizer scalar {key!r} names no parameter")
    if data_state is not None:
        data = meta["data"]
        if data.keys() != data_state.keys() or not all(_is_int(v) for v in data.values()):
            fail(f"data position {json.dumps(data):.60} does not fit this stage (expected integers "
                 f"{', '.join(data_state)})")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return {name: ref.read() for name, ref in read_safetensors_index(file).items()}
    except CheckpointError as e:   # the reader names the file only; say which checkpoint it is in
        raise CheckpointError(f"{file.parent}{os.sep}{e}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def _check_model(file: Path, saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    missing = [k for k in live if k not in saved and not k.endswith("tokens_per_expert")]
    unexpected = [k for k in saved if k not in live]
    if missing or unexpected:
        raise CheckpointError(f"{file}: does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in saved.items():
        target = _local(live[name])
        if tensor.shape != target.shape or tensor.dtype != target.dtype:
            raise CheckpointError(f"{file}: {name} is {list(tensor.shape)} {tensor.dtype}, the model's "
                                  f"{list(target.shape)} {target.dtype}")


def _check_optimizer(file: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    rng = tensors.get("rng.torch")
    expected_rng = torch.get_rng_state()
    if rng is None or rng.dtype != expected_rng.dtype or rng.shape != expected_rng.shape:
        raise CheckpointError(f"{file}: no valid rng.torch state")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in tensors.items():
        if name == "rng.torch":
            continue
        idx, sep, key = name.partition(".")
        if not (sep and idx.isdigit() and int(idx) < len(params)):
            raise CheckpointError(f"{file}: {name} names no parameter of this model")
        p = _local(params[int(idx)])
        ok = value.numel() == 1 if key == "step" else (value.shape == p.shape and value.dtype == p.dtype)
        if not ok:
            raise CheckpointError(f"{file}: {name} is {list(value.shape)} {value.dtype}, "
                                  f"its parameter {list(p.shape)} {p.dtype}")


def read_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        data_state: dict | None = None) -> TrainingState:
    """Read checkpoint `path` and check all of it against the live model, optimizer and (when given)
    the data stream's state; raises CheckpointError naming the file at fault. Touches nothing live."""
    rank, world = _dist()
    m = STEP_DIR.fullmatch(path.name)
    meta = _read_meta(path / "trainer.json")
    _check_meta(path / "trainer.json", meta, int(m.group(1)) if m else None, world, optimizer, data_state)
    sfx = _suffix(world, rank)
    model_file, optimizer_file = path / f"model{sfx}.safetensors", path / f"optimizer{sfx}.safetensors"
    saved = _read_tensors(model_file)
    _check_model(model_file, saved, model.state_dict())
    tensors = _read_tensors(optimizer_file)
    _check_optimizer(optimizer_file, tensors, optimizer)
    return TrainingState(path, meta, saved, tensors)


@torch.no_grad()
def apply_training_state(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copy a checked checkpoint into the live model, optimizer and RNG (local shards of DTensors);
    returns its trainer.json."""
    live = model.state_dict()
    for name, tensor in state.model.items():
        _local(live[name]).copy_(tensor)
    tensors = dict(state.optimizer)
    torch.set_rng_state(tensors.pop("rng.torch"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):   # AdamW's state, created as its first step would, then filled in
        keys = {k.split(".", 1)[1] for k in tensors if k.split(".", 1)[0] == str(i)}
        if not keys:
            continue
        opt_state = optimizer.state[p]
        for key in keys:
            value = tensors[f"{i}.{key}"]
            if key == "step":
                opt_state[key] = value.clone()
            else:
                opt_state[key] = torch.zeros_like(p) if key not in opt_state else opt_state[key]
                _local(opt_state[key]).copy_(value)
        for key, value in state.meta["scalars"].items():
            idx, name = key.split(".", 1)
            if idx == str(i):
                opt_state[name] = value
    for group, saved_group in zip(optimizer.param_groups, state.meta["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    return state.meta


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        data_state: dict | None = None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder (written with the same world size);
    returns its trainer.json. Everything is checked first: a damaged checkpoint raises
    CheckpointError and leaves the live model and optimizer as they were."""
    return apply_training_state(read_training_state(path, model, optimizer, data_state), model, optimizer)


# --------------------------------------------------------------------------------------------------
# choosing where to resume
# --------------------------------------------------------------------------------------------------


def _pointer_problem(ckpt_root: Path, chosen: Path, damaged: list[Path]) -> str | None:
    """What is wrong with `latest`, given the checkpoint the scan chose (None: nothing to say)."""
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return "checkpoints/latest is missing"
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not STEP_DIR.fullmatch(name):
        return f"checkpoints/latest is garbled ({name[:40]!r})"
    if name == chosen.name or any(name == p.name for p in damaged):
        return None
    if not (ckpt_root / name).is_dir():
        return f"checkpoints/latest names {name}, which does not exist"
    return f"checkpoints/latest names {name}, but a newer checkpoint is intact"


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never deleted: it is the user's to inspect)."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}")
    os.replace(path, target)
    return target


def resume_training_state(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                          data_state: dict | None = None) -> tuple[dict | None, str | None]:
    """Resume from the newest intact checkpoint of out_dir: (its trainer.json or None for a fresh
    start, a one-line note for the user or None when all was in order). Newer damaged checkpoints are
    renamed aside and `latest` is pointed at the one resumed from. Raises CheckpointError, having
    changed nothing, when there is checkpoint data but none of it can be resumed from."""
    rank, _ = _dist()
    ckpt_root = out_dir / "checkpoints"
    candidates = [p for _, p in reversed(step_dirs(ckpt_root))]
    damaged: list[tuple[Path, str]] = []
    state = None
    for path in candidates:
        try:
            state, reason = read_training_state(path, model, optimizer, data_state), None
        except CheckpointError as e:
            state, reason = None, str(e)
        reason = _any_rank(reason)
        if reason is None:
            break
        state = None
        damaged.append((path, reason))
    if state is None:
        if damaged:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in damaged)
            raise CheckpointError(f"no usable checkpoint in {ckpt_root} ({reasons}); repair or remove them, "
                                  "or set resume=false to start over")
        if (ckpt_root / "latest").exists():
            raise CheckpointError(f"{ckpt_root / 'latest'} exists but no step_* checkpoint is left in "
                                  f"{ckpt_root}; remove the folder, or set resume=false to start over")
        interrupted = sorted(p.name for p in ckpt_root.glob(".tmp_step_*")) if ckpt_root.is_dir() else []
        return None, (f"no complete checkpoint in {ckpt_root} (interrupted save {interrupted[-1]} ignored); "
                      "starting at step 0") if interrupted else None
    notes = []
    pointer = _pointer_problem(ckpt_root, state.path, [p for p, _ in damaged])
    if rank == 0:
        for path, reason in damaged:
            notes.append(f"{path.name} is damaged ({reason}), renamed {_set_aside(path).name}")
        if damaged or pointer:
            _point_latest(ckpt_root, state.path.name)
    _barrier()
    if pointer:
        notes.append(pointer)
    meta = apply_training_state(state, model, optimizer)
    note = "; ".join(notes) + f"; resuming from {state.path.name}" if notes else None
    return meta, note
