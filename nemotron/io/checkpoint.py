"""Hugging Face checkpoints in and out: safetensors (single file or sharded), the release layout.

Loading builds the model on the meta device and materialises each parameter straight from the file
(read into its own buffer, no mmap), so peak memory stays close to one copy of the weights. Every
tensor is checked: names (missing / unexpected), shapes, and that the file really holds the bytes its
header promises. Pickled checkpoints are refused unless the caller opts in.

Reading stays inside the checkpoint: only regular files are opened (without blocking, so a FIFO is
refused, never waited on), an index names its shards by relative paths with no `..`, and the
safetensors header is held to the reference library's rules. Symlinked files are followed: the
Hugging Face cache links each snapshot file to a blob outside the snapshot directory.

Name maps: our module names are the release names, except that routed experts are stored stacked
(`mixer.experts.up_proj [E, I, X]`) while the release has one tensor per expert
(`mixer.experts.{e}.up_proj.weight`). The other spellings that writers use (transformers versions,
NVIDIA's remote code, VL wrappers), a tied head and parts a writer leaves out are listed by each
family, next to its model (`NAME_MAP` in nemotron/models/nemotron_h.py, decoder.py), and found through
the model registry (`nemotron.models.family(config).name_map`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nemotron.config import DTYPES, AnyConfig, load_config, save_config
from nemotron.errors import CheckpointError, CheckpointWarning, UnsafeCheckpointError
from nemotron.files import confined, is_present, json_kind, open_regular, parse_json, read_json
from nemotron.models import family
from nemotron.models.contract import NameMap

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
# the reference library's bound on a header (safetensors' MAX_HEADER_SIZE)
_MAX_HEADER = 100_000_000


# --------------------------------------------------------------------------------------------------
# safetensors reading: the header is validated by the reference library's rules before any tensor
# is read, so a corrupt or hostile file gets one precise error and never a tensor made of the wrong bytes
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
        with open_regular(self.path) as f:
            f.seek(self.start)
            got = f.readinto(view)
        if got != nbytes:
            raise CheckpointError(f"{self.path.name}: tensor {self.name!r} is truncated ({got} of {nbytes} bytes)")
        return out.view(self.dtype).reshape(self.shape)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (json keeps the last of duplicates silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key[:200]!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _is_size(value: object) -> bool:
    """A JSON value usable as an unsigned 64-bit size (the reference library's usize)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _header_entry(path: Path, name: str, info: object, base: int) -> TensorRef:
    """One tensor's header entry: {"dtype", "shape", "data_offsets"} with a known dtype, a shape of
    unsigned ints and two unsigned offsets whose distance is the tensor's byte size."""
    where = f"{path.name}: tensor {name[:200]!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{where}: a header entry needs dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {str(code)[:40]!r} "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                              f"{shape} {code} needs {nbytes}")
    return TensorRef(name, tuple(shape), dtype, path, base + begin, base + end)


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Parse and validate a .safetensors header; returns name -> TensorRef (no tensor data read).

    What the reference `safetensors` library rejects is rejected here: a header length over 100 MB or
    past the end of the file; a header that is not UTF-8, not a JSON object or does not start with
    `{`; `__metadata__` other than strings to strings; entries without a known dtype, an unsigned shape
    and two unsigned offsets; byte ranges that are not numel * itemsize, that overlap or leave gaps
    (sorted by offset they must tile the data from 0) or that do not end exactly at the end of the file.
    Stricter than the reference: duplicate keys, whitespace before the header's `{` and dtypes this
    loader cannot hold (F8_E8M0, F4, ...) are refused too."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path.name}: not a safetensors file or truncated (header of {n} bytes, file {size})")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path.name}: not a safetensors file (its header does not start with '{{')")
    header = parse_json(raw, f"{path.name} (safetensors header)", object_pairs_hook=_no_duplicate_keys)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path.name}: the header's __metadata__ must map strings to strings")
    base = 8 + n
    refs = {name: _header_entry(path, name, info, base) for name, info in header.items()}
    expected = base   # sorted by offset, each tensor starts where the previous one ended
    for ref in sorted(refs.values(), key=lambda r: (r.start, r.end)):
        if ref.start != expected:
            how = "overlaps the tensor before it" if ref.start < expected else "leaves a gap before it"
            raise CheckpointError(f"{path.name}: tensor {ref.name[:200]!r} {how} (data_offsets start at "
                                  f"{ref.start - base}, expected {expected - base})")
        expected = ref.end
    if expected > size:
        raise CheckpointError(f"{path.name} is truncated: its tensors end at byte {expected} but the file has "
                              f"{size} bytes")
    if expected < size:
        raise CheckpointError(f"{path.name}: {size - expected} bytes after the last tensor (a corrupt or "
                              "padded file; the data must end where the last tensor does)")
    return refs


def _pickle_refs(path: Path) -> dict[str, TensorRef]:
    open_regular(path).close()   # refuse a FIFO or directory before torch opens it
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load's failures on a corrupt file have no common base class
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path.name}: cannot be read as a PyTorch checkpoint ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name}: expected a dict of tensors")
    return {str(k): TensorRef(str(k), tuple(v.shape), v.dtype, path, loader=lambda v=v: v) for k, v in state.items()}


def _index_shards(path: Path, index: Path) -> list[Path]:
    """The shard files an index names: each a relative name inside the checkpoint directory."""
    raw = read_json(index)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a non-empty 'weight_map' object, "
                              f"got {json_kind(weight_map)})")
    return sorted({confined(path, shard, f"{index.name}: weight_map[{tensor[:200]!r}]")
                   for tensor, shard in weight_map.items()})


def checkpoint_files(path: Path, allow_pickle: bool = False) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory (or single file), by name. Only regular files are read
    (symlinks to them are followed, as the Hugging Face cache needs); an index names its shards by
    relative paths inside the directory."""
    if path.is_file():
        files, is_pickle = [path], path.suffix in PICKLE_SUFFIXES
    elif not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory or a weights file")
    else:
        index = path / INDEX_FILE
        if is_present(index):
            files = _index_shards(path, index)
            missing = [str(f.relative_to(path)) for f in files if not is_present(f)]
            if missing:
                raise CheckpointError(f"{path}: shard(s) named in the index are missing: {', '.join(missing[:5])}")
            is_pickle = False
        elif is_present(path / "model.safetensors"):   # the one file transformers reads; others are not weights
            files, is_pickle = [path / "model.safetensors"], False
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
                raise CheckpointError(f"tensor {name!r} appears in both {refs[name].path.name} and {f.name}")
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

def name_map(config: AnyConfig) -> NameMap:
    """How the checkpoints of `config`'s family name their tensors (the family's own NAME_MAP)."""
    return family(config).name_map


def our_spelling(name: str, config: AnyConfig) -> str:
    """A checkpoint tensor name under our module names (the family's renames; experts still one by one)."""
    for pattern, replacement in name_map(config).renames:
        name = pattern.sub(replacement, name, count=1)
    return name


def _canonical_name(name: str, config: AnyConfig) -> tuple[str, int | None]:
    """Checkpoint name -> (our parameter name, expert index or None)."""
    names = name_map(config)
    name = our_spelling(name, config)
    expert = names.experts.ours(name) if names.experts else None
    return expert if expert is not None else (name, None)


def match_checkpoint(config: AnyConfig, refs: dict[str, TensorRef]) -> tuple[AnyConfig, dict[str, TensorRef]]:
    """The config and tensors to build and load, before the model is built: one name per parameter
    (two spellings of one tensor are an error), a tied head read from the embedding, and an optional
    part the checkpoint leaves out whole dropped from the config."""
    names = name_map(config)
    seen: dict[tuple[str, int | None], str] = {}
    targets: dict[str, str] = {}   # our name -> the first checkpoint name that fills (part of) it
    for name in refs:
        target, expert = key = _canonical_name(name, config)
        # one spelling twice, or a stacked tensor beside its per-expert tensors
        twin = seen.get(key) or seen.get((target, None)) or (expert is None and targets.get(target))
        if twin:
            raise CheckpointError(f"tensors {twin!r} and {name!r} are the same parameter "
                                  f"({target}{'' if expert is None else f', expert {expert}'}); keep one")
        seen[key] = name
        targets.setdefault(target, name)
    if names.tied is not None and getattr(config, "tie_word_embeddings", False):
        head, embedding = names.tied
        if head not in targets and embedding in targets:
            refs = {**refs, head: refs[targets[embedding]]}
    if names.tied_copy is not None and getattr(config, "tie_word_embeddings", False) and names.tied_copy in targets:
        refs = {k: v for k, v in refs.items() if k != targets[names.tied_copy]}
    for prefix, field_name in names.optional:
        if getattr(config, field_name, 0) and not any(t.startswith(prefix) for t in targets):
            warnings.warn(f"the config sets {field_name}={getattr(config, field_name)} but the checkpoint holds no "
                          f"{prefix}* tensor (as transformers saves it): loaded without that part",
                          CheckpointWarning, stacklevel=3)
            config = config.replace(**{field_name: 0})
    return config, refs


def release_state_dict(model: nn.Module, config: AnyConfig | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors under their release names (stacked experts, and their scales when quantized, split
    into one tensor per expert, as the family's name map says). `config`: the model's by default."""
    experts = name_map(model.config if config is None else config).experts
    for name, tensor in model.state_dict().items():
        if experts is not None and experts.release(name, 0) is not None:
            for e in range(tensor.shape[0]):
                yield experts.release(name, e), tensor[e]
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


def _dtype_kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "floating" if dtype.is_floating_point else "integer"


def _dtype_fits(stored: torch.dtype, declared: torch.dtype) -> bool:
    """A stored dtype that converts meaningfully to the declared one: the same kind (floating, integer,
    bool), or int8/uint8 bytes for an FP8 tensor (older ModelOpt exports)."""
    if declared in (torch.float8_e4m3fn, torch.float8_e5m2) and stored in (torch.int8, torch.uint8):
        return True
    return _dtype_kind(stored) == _dtype_kind(declared)


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
    refs: dict[str, TensorRef] | None = None,
) -> None:
    """Fill a meta-device `model` from checkpoint `path`, validating every name and shape (`refs`: the
    checkpoint's tensors when the caller has read them already)."""
    refs = checkpoint_files(path, allow_pickle) if refs is None else refs
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    has_mtp = model.mtp is not None

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
        if not _dtype_fits(ref.dtype, expected[target].dtype):
            declared = expected[target].dtype
            raise CheckpointError(f"tensor {name!r} is stored as {_DTYPE_CODES.get(ref.dtype, ref.dtype)}, which "
                                  f"cannot hold a {_dtype_kind(declared)} {str(declared)[6:]} parameter")
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
    for name, tensor in release_state_dict(model, config):
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
