"""Reading untrusted checkpoint files: regular files only, names confined to the checkpoint
directory, JSON parsed with bounded nesting and a checked top-level type.

Every error names the file (and the key, where there is one) in one line, as the given error class
(ConfigError for config.json, CheckpointError for the rest)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import IO, Any

from nemotron.errors import CheckpointError, NemotronError

# JSON files in a checkpoint nest a few levels (quantization_config, tokenizer_config's
# added_tokens_decoder): deeper input is hostile, and code that walks it recursively must not overflow
MAX_JSON_DEPTH = 64
# a release tokenizer_config.json is a few MB at most; configs, indexes and the rest far less
MAX_JSON_BYTES = 64 * 1024 * 1024

_JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "a boolean",
               int: "an integer", float: "a number", type(None): "null"}


def json_kind(value: Any) -> str:
    """How a JSON value reads in an error message ("a JSON object", "a string", ...)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def open_regular(path: Path, error: type[NemotronError] = CheckpointError) -> IO[bytes]:
    """Open `path` for reading if it is a regular file (symlinks followed). The open is non-blocking,
    so a FIFO or device under a checkpoint name is refused instead of hanging the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot be opened ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_present(path: Path) -> bool:
    """Whether anything (a file, a directory, a FIFO, a dangling symlink) has this name: a name that
    is there but unreadable is an error for the reader, not a missing optional file."""
    return os.path.lexists(path)


def read_bytes(path: Path, limit: int, error: type[NemotronError] = CheckpointError) -> bytes:
    """A regular file's contents, refusing files over `limit` bytes before reading them."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= limit:
            data = f.read(size + 1)   # (not read(limit): that allocates the whole limit up front)
            size = len(data)
        if size > limit:
            raise error(f"{path}: {size} bytes is too large for this file (at most {limit})")
        return data


def read_text(path: Path, limit: int = MAX_JSON_BYTES, error: type[NemotronError] = CheckpointError) -> str:
    """A regular UTF-8 text file's contents."""
    try:
        return read_bytes(path, limit, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_depth(value: Any, name: str, error: type[NemotronError]) -> None:
    """Iteratively (a recursive walk would itself overflow on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"{name}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def parse_json(data: bytes | str, name: str, error: type[NemotronError] = CheckpointError,
               expect: type = dict, **loads_kwargs: Any) -> Any:
    """Parse JSON from an untrusted file: invalid UTF-8 or JSON, nesting deeper than MAX_JSON_DEPTH
    and a top-level value other than `expect` are all `error`s naming `name`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, **loads_kwargs)
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise error(f"{name}: JSON nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and the hooks' own refusals
        raise error(f"{name}: not valid JSON ({e})") from None
    if not isinstance(value, expect):
        raise error(f"{name}: expected {_JSON_KINDS.get(expect, expect.__name__)} at the top level, "
                    f"got {json_kind(value)}")
    _check_depth(value, name, error)
    return value


def read_json(path: Path, error: type[NemotronError] = CheckpointError, expect: type = dict,
              limit: int = MAX_JSON_BYTES) -> Any:
    """A checkpoint's JSON file (see `parse_json`), read only if it is a regular file of sane size."""
    return parse_json(read_bytes(path, limit, error), str(path), error, expect)


def confined(root: Path, name: Any, where: str) -> Path:
    """`root / name` for a file name read from the checkpoint itself (an index's weight_map): a
    relative path with no `..` part, so the reader stays inside the checkpoint directory. The file
    may still be a symlink (the Hugging Face cache links every file to a blob outside the snapshot
    directory); `open_regular` then requires it to lead to a regular file."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: a file name must be a non-empty string, got {json_kind(name)}")
    if "\x00" in name or "\\" in name:
        raise CheckpointError(f"{where}: file name {name[:200]!r} has a NUL or backslash")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise CheckpointError(f"{where}: file name {name[:200]!r} points outside the checkpoint directory")
    return root / name
