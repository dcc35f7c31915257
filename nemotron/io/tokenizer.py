"""`tokenizer.json` + `tokenizer_config.json` through the `tokenizers` library: reading a checkpoint's
tokenizer (`Tokenizer`), and writing tokenizer files with the Nemotron 3 special tokens and chat
template (`write_tokenizer_files`, `write_byte_tokenizer`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from nemotron.errors import CheckpointError
from nemotron.files import is_present, json_kind, read_json, read_text


# tokenizer.json of a release vocabulary is tens of MB
MAX_TOKENIZER_BYTES = 512 * 1024 * 1024

# what `write_tokenizer_files` writes: the Nemotron 3 special tokens and the project's chat template
NEMOTRON3_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                            "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
NEMOTRON3_CHAT_TEMPLATE = Path(__file__).parent.parent / "chat" / "templates" / "nemotron3_chat.jinja"


def _check_config(config: dict, path: Path) -> None:
    """The tokenizer_config.json keys this class reads, checked before use: special tokens are a
    string or {"content": string}, add_bos_token a boolean, chat_template a string or named templates
    (a list or an object, resolved by `chat.chat_template_for`)."""
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, dict) and isinstance(value.get("content"), str))):
            raise CheckpointError(f"{path}: {key} must be a string or {{\"content\": string}}, got {json_kind(value)}")
    if not isinstance(config.get("add_bos_token", False), bool):
        raise CheckpointError(f"{path}: add_bos_token must be true or false, got {json_kind(config['add_bos_token'])}")
    if not isinstance(config.get("chat_template"), (str, list, dict, type(None))):
        raise CheckpointError(f"{path}: chat_template must be a string or a list of named templates, "
                              f"got {json_kind(config['chat_template'])}")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None) -> None:
        self.backend = tokenizer
        self.config = config or {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self.config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json, with tokenizer_config.json and chat_template.jinja where present (each a
        regular file; a name that is there but unreadable or of the wrong shape is an error)."""
        path = Path(path)
        tok_path = path / "tokenizer.json"
        text = read_text(tok_path, MAX_TOKENIZER_BYTES)
        try:
            backend = _HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"{tok_path}: cannot be read ({first})") from None
        config = {}
        cfg_path = path / "tokenizer_config.json"
        if is_present(cfg_path):
            config = read_json(cfg_path)
            _check_config(config, cfg_path)
        template = path / "chat_template.jinja"
        if is_present(template):  # as in transformers 5, the .jinja file wins over tokenizer_config.json
            config["chat_template"] = read_text(template)
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    @cached_property
    def control_tokens(self) -> dict[str, int]:
        """The added tokens (special or not) by text: the library matches each of them in the input
        before the model sees it, so text that spells one becomes that token. Whitespace-only added
        tokens (runs of spaces in code tokenizers) are ordinary text and left out."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.content.strip()}

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, add_special_tokens=False)` and each token's (start, end) character span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_as_text(self, text: str, after_token: bool = False) -> list[int]:
        """`text` tokenized with no control token recognised in it: their spellings become ordinary
        text tokens. after_token: tokenize it as text that follows an added token (some pre-tokenizers
        treat the start of the input apart)."""
        backend, sentinel = self._text_backend
        if not after_token or sentinel in text:
            return backend.encode(text, add_special_tokens=False).ids
        return backend.encode(sentinel + text, add_special_tokens=False).ids[1:]

    @cached_property
    def _text_backend(self) -> tuple[_HFTokenizer, str]:
        """A copy of the backend that reads every control token's spelling as text (all marked special,
        with `encode_special_tokens`), plus a sentinel added token to stand for "an added token came
        just before"."""
        spec = json.loads(self.backend.to_str())
        control = set(self.control_tokens.values())
        for token in spec.get("added_tokens") or []:
            if token["id"] in control:
                token["special"] = True
        backend = _HFTokenizer.from_str(json.dumps(spec))
        backend.encode_special_tokens = True
        sentinel = "\uffff\ufffe\uffff"  # noncharacters: not in any real text
        backend.add_tokens([AddedToken(sentinel, special=False, normalized=False)])
        return backend, sentinel

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------------------
# writing tokenizer files
# --------------------------------------------------------------------------------------------------


def write_tokenizer_files(tok: _HFTokenizer, out_dir: str | Path) -> None:
    """tokenizer.json, a tokenizer_config.json with the Nemotron 3 special tokens, and the project's
    chat template, for a `tokenizers.Tokenizer`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
         "add_bos_token": False, "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2) + "\n")
    (out / "chat_template.jinja").write_text(NEMOTRON3_CHAT_TEMPLATE.read_text())


def write_byte_tokenizer(out_dir: str | Path) -> int:
    """A byte-level tokenizer (256 byte tokens, no merges) with the Nemotron 3 special tokens; returns
    its vocabulary size."""
    vocab = {tok: i for i, tok in enumerate(NEMOTRON3_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(NEMOTRON3_SPECIAL_TOKENS)
    write_tokenizer_files(tok, out_dir)
    return tok.get_vocab_size()
