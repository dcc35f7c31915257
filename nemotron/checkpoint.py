"""Hugging Face checkpoints in and out: safetensors (single file or sharded), the release layout.

Loading builds the model on the meta device and materialises each parameter straight from the file
(read into its own buffer, no mmap), so peak memory stays close to one copy of the weights. Every
tensor is checked: names (missing / unexpected), shapes, and that the file really holds the bytes its
header promises. Pickled checkpoints are refused unless the caller opts in.

Name maps: our module names are the release names, except that routed experts are stored stacked
(`mixer.experts.up_proj [E, I, X]`) while the release has one tensor per expert
(`mixer.experts.{e}.up_proj.weight`). transformers 5 uses `model.` where the release has `backbone.`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DTYPES, AnyConfig, NemotronHConfig, load_config, save_config
from .errors import CheckpointError, UnsafeCheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# safetensors reading (header parsed here so truncation and corruption get a precise error)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: a file and a byte range, or a loader for pickled files."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Path
    start: int = 0
    end: int = 0
    loader: Callable[[], torch.Tensor] | None = None

    def read(self) -> torch.Tensor:
        if self.loader is not None:
            return self.loader()
        nbytes = self.end - self.start
        if nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        # read straight into a tensor allocated by torch (aligned for vectorised kernels)
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = (ctypes.c_char * nbytes).from_address(out.data_ptr())
        with open(self.path, "rb") as f:
            f.seek(self.start)
            got = f.readinto(view)
        if got != nbytes:
            raise CheckpointError(f"{self.path.name}: tensor {self.name} is truncated ({got} of {nbytes} bytes)")
        return out.view(self.dtype).reshape(self.shape)


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Parse and validate a .safetensors header; returns name -> TensorRef (no tensor data read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path.name}: not a safetensors file or truncated (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not a JSON object")
    base = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: bad header entry for tensor {name!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        if base + end > size:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes"
            )
        refs[name] = TensorRef(name, shape, dtype, path, base + begin, base + end)
    return refs


def _pickle_refs(path: Path) -> dict[str, TensorRef]:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: expected a dict of tensors")
    return {k: TensorRef(k, tuple(v.shape), v.dtype, path, loader=lambda v=v: v) for k, v in state.items()}


def checkpoint_files(path: Path, allow_pickle: bool = False) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory (or single file), by name."""
    if path.is_file():
        files, is_pickle = [path], path.suffix in PICKLE_SUFFIXES
    else:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard(s) named in the index are missing: {', '.join(missing)}")
            is_pickle = False
        else:
            files = sorted(path.glob("*.safetensors"))
            is_pickle = False
            if not files:
                files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                is_pickle = True
            if not files:
                raise CheckpointError(f"{path}: no weights found (expected *.safetensors)")
    if is_pickle and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{files[0]} is a pickled checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it"
        )
    refs: dict[str, TensorRef] = {}
    for f in files:
        for name, ref in (_pickle_refs(f) if is_pickle else read_safetensors_index(f)).items():
            if name in refs:
                raise CheckpointError(f"tensor {name} appears in both {refs[name].path.name} and {f.name}")
            refs[name] = ref
    return refs


_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file (header, then each tensor's raw bytes) straight from torch memory,
    with no numpy round trip."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))


# --------------------------------------------------------------------------------------------------
# name maps
# --------------------------------------------------------------------------------------------------

# one expert's tensor: its weight, or (quantized checkpoints) one of its scales
_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.(weight|weight_scale|weight_scale_2|input_scale)$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)(?:_(weight_scale_2|weight_scale|input_scale))?$")


def _canonical_name(name: str, config: AnyConfig) -> tuple[str, int | None]:
    """Checkpoint name -> (our parameter name, expert index or None)."""
    if name.startswith("language_model."):  # VL / Omni checkpoints wrap the LLM
        name = name[len("language_model."):]
    if isinstance(config, NemotronHConfig):
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        m = _EXPERT.match(name)
        if m:
            suffix = "" if m.group(4) == "weight" else "_" + m.group(4)
            return f"{m.group(1)}.{m.group(3)}{suffix}", int(m.group(2))
    return name, None


def release_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors under their release names (stacked experts, and their scales when quantized, split
    into one tensor per expert)."""
    for name, tensor in model.state_dict().items():
        m = _STACKED_EXPERTS.match(name)
        if m:
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3) or 'weight'}", tensor[e]
        else:
            yield name, tensor


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


# tensors that stay fp32 whatever the model dtype (quantization scales included)
FP32_TENSORS = ("e_score_correction_bias", "weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")
# the dtypes a checkpoint's float tensors may be converted between; others (packed FP4, FP8, scales
# declared by a quantized layer) keep the dtype the model declares
MODEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _keeps_dtype(name: str, declared: torch.dtype) -> bool:
    return name.endswith(FP32_TENSORS) or declared not in MODEL_FLOATS


def _fits(stored: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A stored shape that fills an expected one: equal, or a one-element tensor ([1], as some
    exports write per-tensor scales) for a scalar."""
    return tuple(stored) == tuple(want) or (want == () and tuple(stored) == (1,))


def _as_declared(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor in the dtype the model declares (older ModelOpt exports store FP8 as int8)."""
    if dtype == torch.float8_e4m3fn and t.dtype in (torch.int8, torch.uint8):
        return t.view(dtype)
    return t.to(dtype)


def load_weights(
    model: nn.Module,
    config: AnyConfig,
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill a meta-device `model` from checkpoint `path`, validating every name and shape."""
    refs = checkpoint_files(path, allow_pickle)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    has_mtp = isinstance(config, NemotronHConfig) and config.num_nextn_predict_layers > 0

    plan: dict[str, list[tuple[int | None, TensorRef]]] = {}
    unexpected, misshaped = [], []
    for name, ref in refs.items():
        target, expert = _canonical_name(name, config)
        if target not in expected:
            if name.startswith("mtp.") and not has_mtp:
                continue  # MTP weights of a checkpoint whose config disables MTP: not used
            unexpected.append(name)
            continue
        want = tuple(expected[target].shape)
        if expert is not None:
            if expert >= want[0] or not _fits(ref.shape, want[1:]):
                misshaped.append(f"{name}: {list(ref.shape)} (expected expert < {want[0]} of shape {list(want[1:])})")
                continue
        elif not _fits(ref.shape, want):
            misshaped.append(f"{name}: {list(ref.shape)} (expected {list(want)})")
            continue
        plan.setdefault(target, []).append((expert, ref))

    if misshaped:
        raise CheckpointError(f"wrong tensor shape: {misshaped[0]}" + (f" (+{len(misshaped) - 1} more)" if len(misshaped) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {', '.join(sorted(unexpected)[:5])}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    missing = []
    for target, param in expected.items():
        entries = plan.get(target, [])
        if not entries:
            missing.append(target)
        elif entries[0][0] is not None:
            have = {e for e, _ in entries}
            absent = [e for e in range(param.shape[0]) if e not in have]
            if absent:
                missing.append(f"{target.replace('.experts.', f'.experts.{absent[0]}.')}.weight" +
                               (f" (and {len(absent) - 1} more experts)" if len(absent) > 1 else ""))
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))

    done, total = 0, sum(len(v) for v in plan.values())
    for target, entries in plan.items():
        param = expected[target]
        want_dtype = param.dtype if _keeps_dtype(target, param.dtype) else dtype
        if entries[0][0] is None:
            _set_tensor(model, target, _as_declared(entries[0][1].read(), want_dtype).reshape(param.shape).to(device))
            done += 1
        else:
            stacked = torch.empty(param.shape, dtype=want_dtype, device=device)
            for expert, ref in entries:
                stacked[expert].copy_(_as_declared(ref.read(), want_dtype).reshape(param.shape[1:]))
                done += 1
                if progress:
                    progress(done, total)
            _set_tensor(model, target, stacked)
        if progress:
            progress(done, total)


def checkpoint_dtype(config: AnyConfig) -> torch.dtype:
    """The dtype the checkpoint declares (config torch_dtype), defaulting to float32."""
    name = getattr(config, "torch_dtype", None) or "float32"
    return DTYPES.get(name, torch.float32)


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def save_checkpoint(model: nn.Module, config: AnyConfig, out_dir: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 1024**3, quantization_config: dict | None = None) -> Path:
    """Write `config.json` + safetensors in the release layout (sharded above `max_shard_bytes`);
    `quantization_config` goes into config.json as is (a quantized model's format).

    Files are written under temporary names and renamed at the end, so a crash never leaves a
    half-written checkpoint that looks complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in release_state_dict(model):
        t = tensor.detach()
        if dtype is not None and t.is_floating_point() and not _keeps_dtype(name, t.dtype):
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().cpu()
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for fname, shard in zip(names, shards):
        tmp = out / (fname + ".tmp")
        write_safetensors(tmp, shard, metadata={"format": "pt"})
        written.append((tmp, out / fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: fname for fname, s in zip(names, shards) for k in s}}
        tmp = out / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        written.append((tmp, out / "model.safetensors.index.json"))
    saved_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = config.replace(torch_dtype=_DTYPE_NAMES.get(saved_dtype, "float32"))
    tmp = out / "config.json.tmp"
    save_config(config, tmp)
    if quantization_config is not None:
        tmp.write_text(json.dumps({**json.loads(tmp.read_text()), "quantization_config": quantization_config},
                                  indent=2) + "\n")
    written.append((tmp, out / "config.json"))
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        if stale.exists() and stale not in {final for _, final in written}:
            stale.unlink()
    for tmp, final in written:
        os.replace(tmp, final)
    return out


def load_checkpoint_config(path: Path) -> AnyConfig:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + safetensors)")
    return load_config(path)
