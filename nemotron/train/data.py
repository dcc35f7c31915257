"""Training data: documents and conversations become packed rows of token ids.

A row holds several examples back to back; `seq_idx` numbers them so that the model keeps them apart
(no attention, conv or SSM state crosses a boundary: see `hidden_states(seq_idx=...)`), and `labels`
are -100 wherever no loss is taken: across a boundary, on padding, and on tokens the example masks
(SFT: everything but the assistant's turns). Shuffling is by seed and epoch, and the position in the
stream (epoch, batch) is all a resume needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemotron.chat.template import apply_chat_template, validate_messages, validate_tools
from nemotron.io.jsonl import read_jsonl

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    targets: list[bool]   # targets[t]: ids[t] is predicted (and scored) from the tokens before it


@dataclass
class Batch:
    input_ids: torch.Tensor   # [B, L]
    labels: torch.Tensor      # [B, L]: the next token, or -100
    seq_idx: torch.Tensor     # [B, L]: which example of the row each token belongs to

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


# a recipe's `packing`: the open rows an example may join in `pack`
PACKINGS = {"first_fit": 64, "greedy": 1}


def pack(examples: list[Example], seq_len: int, open_rows: int = PACKINGS["greedy"]) -> list[list[Example]]:
    """First-fit packing: an example goes in the first of the last `open_rows` rows it fits in, else
    starts a new row. open_rows=1 keeps the examples in their order (greedy packing: a preference
    pair stays side by side); a few dozen fill the rows almost completely where greedy packing leaves
    a fifth of each row as padding (examples of 50-1000 tokens in rows of 512). Examples longer than
    seq_len are cut into seq_len pieces (each its own example)."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for ex in examples:
        for i in range(0, len(ex.ids), seq_len):
            piece = Example(ex.ids[i:i + seq_len], ex.targets[i:i + seq_len])
            n = len(piece.ids)
            k = next((k for k in range(max(0, len(rows) - open_rows), len(rows)) if free[k] >= n), None)
            if k is None:
                rows.append([])
                free.append(seq_len)
                k = len(rows) - 1
            rows[k].append(piece)
            free[k] -= n
    return rows


def collate(rows: list[list[Example]], pad_id: int = 0, length: int | None = None) -> Batch:
    """Rows of examples -> tensors, padded to the longest row (or `length`)."""
    length = length or max(sum(len(e.ids) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    seq = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, ex in enumerate(row):
            n = len(ex.ids)
            ids[b, t:t + n] = torch.tensor(ex.ids)
            seq[b, t:t + n] = k
            nxt = torch.tensor(ex.ids[1:], dtype=torch.long)
            keep = torch.tensor(ex.targets[1:], dtype=torch.bool)
            labels[b, t:t + n - 1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
            t += n
        seq[b, t:] = len(row)  # padding is a sequence of its own, with no targets
    return Batch(ids, labels, seq)


class DataStream:
    """Batches of packed rows over epochs: shuffled by (seed, epoch), resumable from (epoch, batch)."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int = 0,
                 pad_id: int = 0, shuffle: bool = True, open_rows: int = PACKINGS["first_fit"]) -> None:
        if not examples:
            raise ValueError("the dataset is empty")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.pad_id, self.shuffle, self.open_rows = seed, pad_id, shuffle, open_rows
        self.epoch, self.batch = 0, 0
        self._rows: list[list[Example]] | None = None

    def _epoch_rows(self) -> list[list[Example]]:
        if self._rows is None:
            order = list(range(len(self.examples)))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(len(order), generator=g).tolist()
            self._rows = pack([self.examples[i] for i in order], self.seq_len, self.open_rows)
        return self._rows

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows = self._epoch_rows()
        if self.batch * self.batch_size >= len(rows):
            self.epoch, self.batch, self._rows = self.epoch + 1, 0, None
            rows = self._epoch_rows()
        chunk = rows[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        self.batch += 1
        return collate(chunk, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
        self._rows = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self._epoch_rows()) // self.batch_size)


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------


def text_examples(paths: list[str | Path], tokenizer) -> list[Example]:
    """Pretraining documents: JSONL records with a "text" field, or whole .txt files; each document
    ends with the tokenizer's end-of-sequence token (when it has one)."""
    eos = tokenizer.eos_token_id
    out = []
    for path in paths:
        path = Path(path)
        if path.suffix == ".jsonl":
            texts = []
            for n, record in enumerate(read_jsonl(path), 1):
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}: record {n} has no string 'text' field")
                texts.append(record["text"])
        else:
            texts = [path.read_text(encoding="utf-8")]
        for text in texts:
            ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
            out.append(Example(ids, [True] * len(ids)))
    return out


def _char_targets(tokenizer, text: str, spans: list[tuple[int, int]]) -> Example:
    """Tokenize `text`; a token is a target when its characters lie inside one of `spans`."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    targets = [any(a <= s and e <= b for a, b in spans) and e > s for s, e in enc.offsets]
    return Example(list(enc.ids), targets)


def chat_example(tokenizer, record: dict[str, Any], template_kwargs: dict | None = None,
                 last_turn_only: bool = False) -> list[Example]:
    """A conversation {"messages": [...], "tools"?: [...], "enable_thinking"?: bool} rendered with the
    model's chat template; the loss covers each assistant turn (through its end-of-turn token) and
    nothing else (`last_turn_only`: the final turn alone, as preference pairs score it). With
    enable_thinking false the reasoning is stripped from the turns. If the template
    rewrites earlier turns as the conversation grows (it drops old reasoning), each assistant turn
    becomes its own example with the history as the template shows it at that point."""
    messages, tools = record.get("messages"), record.get("tools")
    validate_messages(messages)
    validate_tools(tools)
    thinking = record.get("enable_thinking", True)
    kwargs = dict(template_kwargs or {}, enable_thinking=thinking)
    if not thinking:
        messages = [{k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")} for m in messages]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("a training conversation needs at least one assistant message")
    eos = tokenizer.eos_token or ""

    def span(i: int) -> tuple[str, int, int]:
        """(the text up to and including turn i, where turn i starts, where it ends)."""
        prompt = apply_chat_template(tokenizer, messages[:i], tools=tools, add_generation_prompt=True, **kwargs)
        full = apply_chat_template(tokenizer, messages[:i + 1], tools=tools, add_generation_prompt=False, **kwargs)
        if not full.startswith(prompt):
            raise ValueError(f"the chat template does not render assistant turn {i} as a continuation of its "
                             "generation prompt; cannot tell which tokens are the assistant's")
        end = full.rfind(eos) + len(eos) if eos and eos in full[len(prompt):] else len(full)
        return full, len(prompt), end

    if last_turn_only:
        full, start, end = span(turns[-1])
        return [_char_targets(tokenizer, full[:end], [(start, end)])]
    whole = apply_chat_template(tokenizer, messages, tools=tools, add_generation_prompt=False, **kwargs)
    spans = []
    for i in turns:
        full, start, end = span(i)
        if not whole.startswith(full[:end]):
            break  # the template rewrites history: one example per assistant turn
        spans.append((start, end))
    else:
        return [_char_targets(tokenizer, whole, spans)]
    out = []
    for i in turns:
        full, start, end = span(i)
        out.append(_char_targets(tokenizer, full[:end], [(start, end)]))
    return out


def chat_examples(paths: list[str | Path], tokenizer, template_kwargs: dict | None = None) -> list[Example]:
    out = []
    for path in paths:
        for n, record in enumerate(read_jsonl(path), 1):
            try:
                out.extend(chat_example(tokenizer, record, template_kwargs))
            except ValueError as e:
                raise ValueError(f"{path}: record {n}: {e}") from None
    return out
