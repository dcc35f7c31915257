"""`nemotron.load()`: a checkpoint directory (or preset) -> config, model, tokenizer; and the
Python generation API on top (`generate`, `chat`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemotron.chat.turn import ChatResult, ChatTurn
from nemotron.inference.constraint import StructuredOutput
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request
from nemotron.inference.sampling import SamplingParams
from nemotron.layers.cache import CacheOptions
from nemotron.io.checkpoint import (checkpoint_dtype, checkpoint_files, load_checkpoint_config, load_weights,
                         match_checkpoint, our_spelling, save_checkpoint)
from nemotron.config import DTYPES, AnyConfig
from nemotron.config.presets import EMBEDDED_MODEL_DIR, PRESETS
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


__all__ = ["ChatResult", "LoadedModel", "load", "parse_dtype", "resolve_model_path"]


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

    def _params(self, max_new_tokens: int, sampling: dict[str, Any]) -> SamplingParams:
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        sampling.setdefault("temperature", 0.0)  # greedy unless asked otherwise
        return SamplingParams(max_new_tokens=max_new_tokens, **sampling).validate()

    def _engine(self, reqs: list[Request], speculative_tokens: int = 0, compile: bool | None = None) -> Engine:
        """An engine sized for `reqs`, run on the calling thread."""
        return Engine.for_requests(self.model, reqs, self.tokenizer, self.stop_ids, speculative_tokens, compile,
                                   self.cache_options)

    def generate(self, prompt: str | list[str] | list[int], max_new_tokens: int = 256,
                 speculative_tokens: int = 0, compile: bool | None = None, **sampling: Any) -> str | list[str]:
        """Plain completion of a prompt (or a batch of prompts, or token ids). Greedy by default;
        sampling options as in `SamplingParams` (temperature, top_p, seed, stop, ...).
        speculative_tokens: MTP drafts per step (greedy, MTP checkpoints); compile: True compiles the
        decode step from the first token (a one-time cost of seconds per model and process, then less
        per-token overhead), False never; None (default): once the model has decoded eagerly about
        as long as compiling takes (`nemotron.inference.steps.use_compiled_decode`)."""
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
        prompts = prompt if batch else [prompt]
        tok = self.tokenizer
        ids = [p if isinstance(p, list) else self._require_tokenizer().encode(p) for p in prompts]
        params = self._params(max_new_tokens, dict(sampling))
        reqs = [Request(i, params) for i in ids]
        for _ in self._engine(reqs, speculative_tokens, compile).run(reqs):
            pass
        texts = [r.text if tok is not None else r.output_ids for r in reqs]
        return texts if batch else texts[0]

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Text deltas of a plain completion as they are generated."""
        req = Request(self._require_tokenizer().encode(prompt), self._params(max_new_tokens, dict(sampling)))
        for event in self._engine([req]).run([req]):
            if event.text:
                yield event.text

    def chat(self, messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = True,
             thinking_budget: int | None = None, max_new_tokens: int = 1024, stream: bool = False,
             speculative_tokens: int = 0, compile: bool | None = None, template_kwargs: dict[str, Any] | None = None,
             special_tokens_in_content: bool = False, tool_choice: str | dict = "auto",
             response_format: dict | None = None, parallel_tool_calls: bool = True,
             **sampling: Any) -> ChatResult | Iterator:
        """One assistant turn in the checkpoint's own chat format.

        Returns a ChatResult (reasoning, content and OpenAI-shaped tool_calls apart), or with
        stream=True an iterator of `parsers.Delta` (reasoning / content / tool_calls pieces, `kind`
        "delta") whose last item is the ChatResult (`kind` "result").

        tool_choice, as the server takes it: "auto" (parse the calls the model makes), "none" (no
        tools in the prompt, call markup stays text), "required" (a call is forced, the model picks the
        function) or {"type": "function", "function": {"name": NAME}} (a call of NAME is forced).
        finish_reason is "tool_calls" when a call was parsed and generation stopped by itself.
        A forced call follows the template's syntax and the tool's parameter schema (grammar-constrained).

        response_format, as OpenAI takes it: {"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}}} or {"type": "json_object"} constrains the answer after the reasoning to JSON
        (with tools offered and tool_choice "auto", a tool call stays possible instead).
        parallel_tool_calls=False allows one call where calls are constrained.

        The messages' and tools' text is tokenized as ordinary text by default: `<|im_start|>` or
        `<think>` typed in a message cannot become a control token (transformers and vLLM parse them
        inside content); special_tokens_in_content=True restores that parsing."""
        turn = self._turn(messages, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs, sampling,
                          special_tokens_in_content, tool_choice, response_format, parallel_tool_calls)
        it = self._chat_stream(turn, self._engine(turn.reqs, speculative_tokens, compile))
        if stream:
            return it
        result = None
        for result in it:
            pass
        return result

    def chat_batch(self, conversations: list[list[dict]], tools: list[dict] | None = None,
                   enable_thinking: bool = True, thinking_budget: int | None = None, max_new_tokens: int = 1024,
                   template_kwargs: dict[str, Any] | None = None, special_tokens_in_content: bool = False,
                   tool_choice: str | dict = "auto", response_format: dict | None = None,
                   parallel_tool_calls: bool = True, **sampling: Any) -> list[ChatResult]:
        """One assistant turn for each of many conversations, decoded together as one batch: much
        faster than one `chat` call each for small models (evaluations, synthetic data).
        special_tokens_in_content, tool_choice, response_format, parallel_tool_calls: as in `chat`."""
        turns = [self._turn(m, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs,
                            dict(sampling), special_tokens_in_content, tool_choice, response_format,
                            parallel_tool_calls) for m in conversations]
        reqs = [r for t in turns for r in t.reqs]
        engine = self._engine(reqs)
        owner = {}
        for t in turns:
            t.engine = engine
            owner.update((id(r), t) for r in t.reqs)
        for event in engine.run(reqs):
            owner[id(event.request)].feed(event)
        return [t.results()[0] for t in turns]

    def _turn(self, messages, tools, enable_thinking, thinking_budget, max_new_tokens, template_kwargs,
              sampling, special_tokens_in_content=False, tool_choice="auto", response_format=None,
              parallel_tool_calls=True) -> ChatTurn:
        """The ChatTurn of one conversation, with its one request made."""
        turn = ChatTurn.prepare(self._require_tokenizer(), messages, tools, tool_choice=tool_choice,
                                enable_thinking=enable_thinking, thinking_budget=thinking_budget,
                                template_kwargs=template_kwargs, special_tokens_in_content=special_tokens_in_content,
                                answer=StructuredOutput.from_response_format(response_format),
                                parallel_tool_calls=parallel_tool_calls)
        turn.requests(self._params(max_new_tokens, sampling))
        return turn

    def _chat_stream(self, turn: ChatTurn, engine: Engine) -> Iterator:
        """The turn's Deltas as they come, then its ChatResult."""
        for event in turn.run(engine):
            if event.kind == "done":
                yield event.result
            elif event.delta:
                yield event.delta


EMBEDDED = "tiny"   # the model that ships inside the package (the default --model)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A checkpoint directory, or "tiny": the embedded model's directory inside the package."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path).lower() == EMBEDDED:
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR} (a broken install?)")
        return EMBEDDED_MODEL_DIR
    key = str(name_or_path).lower()   # a preset name: only presets that ship weights can be loaded
    if key in PRESETS:
        raise CheckpointError(
            f"preset {name_or_path!r} ships no weights; download its checkpoint ({PRESETS[key].hf_id}) "
            "and pass the directory"
        )
    raise CheckpointError(f"{name_or_path}: no such checkpoint directory or preset")


def release_freed_memory() -> None:
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
    config, refs = match_checkpoint(config, refs)   # the checkpoint's name variants (the family's NAME_MAP)
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
    release_freed_memory()
    return LoadedModel(config, model, tokenizer, path, cache or CacheOptions())
