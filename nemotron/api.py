"""`nemotron.load()`: a checkpoint directory (or preset) -> config, model, tokenizer; and the
Python generation API on top (`generate`, `chat`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemotron.layers.cache import CacheOptions
from nemotron.io.checkpoint import (checkpoint_dtype, checkpoint_files, load_checkpoint_config, load_weights,
                         match_checkpoint, our_spelling, save_checkpoint)
from nemotron.config import DTYPES, AnyConfig
from nemotron.errors import CheckpointError, NemotronError
from nemotron.files import is_present
from nemotron.models import build_model
from nemotron.quant.modelopt import apply_quant_config, kv_scales_as_written, read_quant_config
from nemotron.io.tokenizer import Tokenizer

_DTYPES = {**DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


@dataclass
class ChatResult:
    """One assistant turn: the raw text and its parts (reasoning, answer, tool calls)."""

    text: str
    reasoning: str | None
    content: str | None
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    speculation: dict | None = None  # MTP acceptance statistics when speculative decoding ran

    def message(self) -> dict:
        """The OpenAI assistant message (reasoning under both `reasoning` and `reasoning_content`)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning"] = msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs"}


@dataclass
class LoadedModel:
    config: AnyConfig
    model: nn.Module
    tokenizer: Tokenizer | None
    path: Path | None = None
    cache_options: CacheOptions = field(default_factory=CacheOptions)   # how inference state is stored

    # ---- persistence ----

    def save(self, out_dir: str | Path, dtype: torch.dtype | str | None = None,
             quantization_config: dict | None = None) -> Path:
        """Save in the release layout (config.json + safetensors) with the tokenizer files, if any
        (`quantization_config`: a quantized model's entry for config.json)."""
        out = save_checkpoint(self.model, self.config, out_dir, parse_dtype(dtype),
                              quantization_config=quantization_config)
        if self.path is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                         "special_tokens_map.json", "generation_config.json"):
                src = self.path / name
                if src.is_file() and src.resolve() != (out / name).resolve():
                    (out / name).write_bytes(src.read_bytes())
        return out

    # ---- generation ----

    def new_cache(self, batch: int, max_len: int):
        """An empty inference cache for `batch` sequences of up to `max_len` tokens, stored as this
        model's cache options say."""
        return self.model.new_cache(batch, max_len, self.cache_options)

    @property
    def stop_ids(self) -> set[int]:
        """End-of-turn ids: the config's eos_token_id (int or list) and the tokenizer's eos token."""
        eos = getattr(self.config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise NemotronError(f"{self.path}: this checkpoint has no tokenizer.json")
        return self.tokenizer

    def _params(self, max_new_tokens: int, sampling: dict[str, Any]):
        from nemotron.inference.sampling import SamplingParams

        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        sampling.setdefault("temperature", 0.0)  # greedy unless asked otherwise
        return SamplingParams(max_new_tokens=max_new_tokens, **sampling).validate()

    def _generator(self, speculative_tokens: int = 0, compile: bool = False, prefill_chunk: int = 512):
        from nemotron.inference.generate import Generator

        return Generator(self.model, self.tokenizer, self.stop_ids, prefill_chunk, speculative_tokens, compile,
                         self.cache_options)

    def generate(self, prompt: str | list[str] | list[int], max_new_tokens: int = 256,
                 speculative_tokens: int = 0, compile: bool = False, **sampling: Any) -> str | list[str]:
        """Plain completion of a prompt (or a batch of prompts, or token ids). Greedy by default;
        sampling options as in `SamplingParams` (temperature, top_p, seed, stop, ...).
        speculative_tokens: MTP drafts per step (greedy, MTP checkpoints); compile: torch.compile the
        decode step (a one-time compile, then much less per-token overhead for small models)."""
        from nemotron.inference.generate import Request

        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
        prompts = prompt if batch else [prompt]
        tok = self.tokenizer
        ids = [p if isinstance(p, list) else self._require_tokenizer().encode(p) for p in prompts]
        params = self._params(max_new_tokens, dict(sampling))
        reqs = [Request(i, params) for i in ids]
        for _ in self._generator(speculative_tokens, compile).stream(reqs):
            pass
        texts = [r.text if tok is not None else r.output_ids for r in reqs]
        return texts if batch else texts[0]

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Text deltas of a plain completion as they are generated."""
        from nemotron.inference.generate import Request

        req = Request(self._require_tokenizer().encode(prompt), self._params(max_new_tokens, dict(sampling)))
        for event in self._generator().stream([req]):
            if event.text:
                yield event.text

    def chat(self, messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = True,
             thinking_budget: int | None = None, max_new_tokens: int = 1024, stream: bool = False,
             speculative_tokens: int = 0, compile: bool = False, template_kwargs: dict[str, Any] | None = None,
             special_tokens_in_content: bool = False, **sampling: Any) -> ChatResult | Iterator:
        """One assistant turn in the checkpoint's own chat format.

        Returns a ChatResult (reasoning, content and OpenAI-shaped tool_calls apart), or with
        stream=True an iterator of `parsers.Delta` (reasoning / content / tool_calls pieces) whose last
        item is the ChatResult.

        The messages' and tools' text is tokenized as ordinary text by default: `<|im_start|>` or
        `<think>` typed in a message cannot become a control token (transformers and vLLM parse them
        inside content); special_tokens_in_content=True restores that parsing."""
        turn = self._turn(messages, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs, sampling,
                          special_tokens_in_content)
        it = self._chat_stream(turn, self._generator(speculative_tokens, compile))
        if stream:
            return it
        result = None
        for result in it:
            pass
        return result

    def chat_batch(self, conversations: list[list[dict]], tools: list[dict] | None = None,
                   enable_thinking: bool = True, thinking_budget: int | None = None, max_new_tokens: int = 1024,
                   template_kwargs: dict[str, Any] | None = None, special_tokens_in_content: bool = False,
                   **sampling: Any) -> list[ChatResult]:
        """One assistant turn for each of many conversations, decoded together as one batch: much
        faster than one `chat` call each for small models (evaluations, synthetic data).
        special_tokens_in_content: as in `chat` (off: message text cannot make control tokens)."""
        turns = [self._turn(m, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs,
                            dict(sampling), special_tokens_in_content) for m in conversations]
        generator = self._generator()
        for event in generator.stream([t.request for t in turns]):
            if event.text:
                turns[event.index].feed(event.text)
        return [t.result(generator) for t in turns]

    def _turn(self, messages, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs,
              sampling, special_tokens_in_content=False) -> "_ChatTurn":
        from nemotron.chat.template import prepare_chat
        from nemotron.inference.generate import Request
        from nemotron.chat.parsers import StreamingParser

        tok = self._require_tokenizer()
        prompt = prepare_chat(tok, messages, tools, enable_thinking,
                              special_tokens_in_content=special_tokens_in_content, **(template_kwargs or {}))
        budget = None
        if thinking_budget is not None and prompt.thinking:
            budget = make_thinking_budget(tok, thinking_budget, prompt.prompt_opens_think)
        req = Request(prompt.ids, self._params(max_new_tokens, sampling), budget)
        return _ChatTurn(req, StreamingParser(prompt.fmt, prompt.thinking, tools, prompt.prompt_opens_think),
                         len(prompt.ids))

    def _chat_stream(self, turn: "_ChatTurn", generator) -> Iterator:
        for event in generator.stream([turn.request]):
            if event.text:
                delta = turn.feed(event.text)
                if delta:
                    yield delta
        delta = turn.finish()
        if delta:
            yield delta
        yield turn.result(generator)


@dataclass
class _ChatTurn:
    """One assistant turn being generated: its request and the parser that splits its text."""

    request: Any
    parser: Any
    prompt_tokens: int
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    finished: bool = False

    def _take(self, delta):
        if delta:
            self.reasoning.append(delta.reasoning)
            self.content.append(delta.content)
            self.calls.extend(delta.tool_calls)
        return delta

    def feed(self, text: str):
        return self._take(self.parser.feed(text))

    def finish(self):
        self.finished = True
        return self._take(self.parser.finish())

    def result(self, generator) -> ChatResult:
        if not self.finished:
            self.finish()
        req = self.request
        tool_calls = [{"id": c["id"], "type": "function", "function": dict(c["function"])} for c in self.calls]
        finish = "tool_calls" if tool_calls else (req.finish_reason or "stop")
        return ChatResult(req.text, "".join(self.reasoning) or None, "".join(self.content) or None, tool_calls,
                          finish, self.prompt_tokens, len(req.output_ids), req.logprobs, list(self.parser.warnings),
                          speculation_stats(generator))


def speculation_stats(generator) -> dict | None:
    """MTP acceptance figures of a Generator that speculated (None otherwise)."""
    st = generator.stats
    if not generator.k or not st.rounds:
        return None
    return {"draft_tokens_per_step": generator.k, "rounds": st.rounds, "drafted": st.drafted,
            "accepted": st.accepted, "acceptance_rate": st.acceptance_rate,
            "acceptance_length": st.acceptance_length}


def make_thinking_budget(tokenizer: Tokenizer, budget: int, prompt_opens_think: bool, grace: int = 0):
    """A ThinkingBudget with this tokenizer's `</think>` spellings."""
    from nemotron.inference.generate import ThinkingBudget

    if budget < 0:
        raise ValueError("thinking_budget must be >= 0")
    return ThinkingBudget(
        budget=budget,
        close_ids=tokenizer.encode("</think>\n", add_special_tokens=False),
        newline_close_ids=tokenizer.encode("\n</think>\n", add_special_tokens=False),
        end_think_id=tokenizer.token_id("</think>"),
        start_think_id=tokenizer.token_id("<think>"),
        grace=grace,
        active=prompt_opens_think,
    )


EMBEDDED = "tiny"   # the model that ships inside the package (the default --model)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A checkpoint directory, or "tiny": the embedded model's directory inside the package."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path).lower() == EMBEDDED:
        from nemotron.tiny import MODEL_DIR
        if not (MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"the embedded model is missing from {MODEL_DIR} (a broken install?)")
        return MODEL_DIR
    from nemotron.config.presets import PRESETS  # a preset name: only presets that ship weights can be loaded
    key = str(name_or_path).lower()
    if key in PRESETS:
        raise CheckpointError(
            f"preset {name_or_path!r} ships no weights; download its checkpoint ({PRESETS[key].hf_id}) "
            "and pass the directory"
        )
    raise CheckpointError(f"{name_or_path}: no such checkpoint directory or preset")


def _release_freed_memory() -> None:
    """Hand the loader's freed read buffers back to the OS (glibc keeps freed heap pages resident)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def load(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    progress: bool = False,
    cache: CacheOptions | None = None,
) -> LoadedModel:
    """Load a Hugging Face checkpoint directory (release or transformers 5 layout).

    The model is built on the meta device and its tensors are read straight from the files, so
    peak memory stays near one copy of the weights. dtype defaults to the checkpoint's own.
    `progress=True` shows a progress bar on stderr. `cache`: how the inference state is stored (FP8
    KV cache, the SSM state's dtype and rounding; see CacheOptions)."""
    path = resolve_model_path(name_or_path)
    config = load_checkpoint_config(path)
    # the tokenizer first: it is quick to read, and a broken one should fail before the weights load
    tokenizer = Tokenizer.from_dir(path) if is_present(path / "tokenizer.json") else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        # its ids past the embedding table would fail at the first forward pass
        raise CheckpointError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size of {config.vocab_size}")
    dtype = parse_dtype(dtype) or checkpoint_dtype(config)
    refs = checkpoint_files(path, allow_pickle)
    config, refs = match_checkpoint(config, refs)   # the checkpoint's name variants (checkpoint.NAME_MAPS)
    with torch.device("meta"):
        model = build_model(config)
    quant = read_quant_config(path)
    if quant is not None:   # NVFP4 / FP8 (ModelOpt format): the layers it quantizes keep its storage
        apply_quant_config(model, quant, dtype, {our_spelling(n, config): r for n, r in refs.items()})
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(path.name, total=None)
            load_weights(model, config, path, dtype, device, allow_pickle, refs=refs,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        load_weights(model, config, path, dtype, device, allow_pickle, refs=refs)
    if quant is not None:
        kv_scales_as_written(model, quant)
    model.to(device).eval()
    _release_freed_memory()
    return LoadedModel(config, model, tokenizer, path, cache or CacheOptions())
