"""The model's forward steps over a cache: `prefill` runs a prompt in chunks that continue the cache
(bounded memory for long prompts), `decode_step` is one recurrent step for every row,
`compiled_decode_step` is the same step traced by torch.compile on the static decode path, and
`use_compiled_decode` the rule that picks it by default. `greedy_generate` is greedy decoding in one
short loop: the oracle the engine is tested against."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import warnings

import torch
from torch import nn

from nemotron.errors import NemotronWarning
from nemotron.kernels import MAX_ROWS
from nemotron.layers.cache import HybridCache


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor, cache: HybridCache, chunk: int = 512,
            return_hidden: bool = False):
    """Run ids [B, T] through the model in chunks of `chunk` tokens that continue `cache`; return the
    last position's logits [B, V] (and, with return_hidden, every position's final hidden [B, T, H])."""
    hidden = []
    logits = None
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk]
        if return_hidden:
            h = model.hidden_states(part, cache)
            hidden.append(h)
            logits = model.lm_head(h[:, -1:]).float()
        else:
            logits = model(part, cache, logits_to_keep=1)
    if return_hidden:
        return logits[:, -1], torch.cat(hidden, dim=1)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: nn.Module, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """tokens [B] -> next logits [B, V], one recurrent step for each row of `cache`."""
    return model(tokens[:, None], cache)[:, -1]


@torch.inference_mode()
def greedy_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
                    stop_ids: set[int] | None = None) -> torch.Tensor:
    """ids [B, T] (same length) -> generated ids [B, <= max_new_tokens]; a row stops at its first stop id."""
    b, t = ids.shape
    cache = model.new_cache(b, t + max_new_tokens)
    logits = prefill(model, ids, cache)
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    stop = torch.tensor(sorted(stop_ids or []), dtype=ids.dtype, device=ids.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        out.append(token)
        done |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_step(model, token, cache)
    return torch.stack(out, dim=1) if out else ids[:, :0]


log = logging.getLogger(__name__)

# The compiled decode step runs a step in a fraction of the eager time (fewer dispatches, fused small
# ops), but compiling costs seconds once per model and process (BENCHMARKS.md). By default the step is
# compiled once the model has spent about that long decoding eagerly: the break-even rule for a
# one-time cost, so a short one-off generation never pays it and a long session or a server runs
# compiled for all but its first seconds. NEMOTRON_COMPILE=0 keeps every step eager (debugging),
# NEMOTRON_COMPILE=1 compiles from the first step.
COMPILE_ENV = "NEMOTRON_COMPILE"
COMPILE_AFTER_S = 10.0


def compile_setting() -> bool | None:
    """NEMOTRON_COMPILE as True (always) / False (never) / None (unset: the break-even rule)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{COMPILE_ENV}={value!r}: expected 1 (compile the decode step), 0 (never) or auto")


@functools.cache
def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def compile_blocker(model: nn.Module) -> str | None:
    """Why the default rule leaves this model's decode step eager, or None when it may compile."""
    if model.__dict__.get("_compile_failed"):
        return model.__dict__["_compile_failed"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "a distributed run (sharded parameters are gathered by hooks the compiled step would trace)"
    device = model.lm_head.weight.device
    if device.type == "cpu" and not _has_cxx():
        return "torch.compile needs a C++ compiler for CPU code and none is on PATH"
    if device.type == "cpu" and any(getattr(m, "quantized", False) and not m.uses_cpu_kernels() for m in model.modules()):
        # without the CPU kernels (NEMOTRON_CPU_KERNELS=0, no compiler, emulated activations) quantized
        # layers decode their weights at each step, which a compiled graph does several times slower
        return "quantized layers without their CPU kernels decode faster eagerly"
    return None


def eager_decode_seconds(model: nn.Module) -> float:
    """Seconds this model has spent in eager decode steps in this process (`note_eager_decode`)."""
    return model.__dict__.get("_eager_decode_s", 0.0)


def note_eager_decode(model: nn.Module, seconds: float) -> None:
    model.__dict__["_eager_decode_s"] = eager_decode_seconds(model) + seconds


def use_compiled_decode(model: nn.Module, requested: bool | None = None, long_run: bool = False) -> bool:
    """Whether decode steps of `model` run compiled: `requested` when given (True / False), else
    NEMOTRON_COMPILE when set, else where nothing blocks it (`compile_blocker`) once its step is
    compiled already, or the model has decoded eagerly for COMPILE_AFTER_S seconds, or the caller
    will decode for long (`long_run`: a server)."""
    if requested is not None:
        return requested
    setting = compile_setting()
    if setting is not None:
        return setting
    due = (long_run or model.__dict__.get("_compiled_decode") is not None
           or eager_decode_seconds(model) >= COMPILE_AFTER_S)
    return due and compile_blocker(model) is None   # the cheap test first: engines ask at every batch


@functools.cache
def tracing_errors() -> tuple[type[Exception], ...]:
    """What tracing a step as one graph raises where the step needs more than one: a graph break, or a
    host read of a value the graph computes (`counts.tolist()` in a large batch's MoE dispatch, which
    fails on the symbolic value as the graph is traced). Neither can come from running a graph.
    Imported when first needed: the compiler's modules take two seconds to import, which every
    command that never compiles (help, info, a short generate) would pay."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode


class CompiledDecode:
    """The model's decode step under torch.compile (mode "static": positions as a tensor, the KV
    window the caller passes read under a mask, symbolic shapes). A call that compiles (the first one
    for each shape of `_shape`: batch 1, up to the CPU kernels' rows, more) is timed, logged and kept
    in `compile_seconds`.

    The step is compiled as one graph where it can be. Where tracing it meets a graph break (a host
    read: a large CPU batch's MoE dispatch reads its expert counts), that shape's step runs eagerly
    from then on (`graph_breaks`). In pieces, the graphs after the host read would be specialised to
    the value read, one compile for each pattern of expert counts: 3 GRPO steps of the tiny model
    (64-row groups) took 110 s that way, 47 s eagerly (24 s of it compiling the batch-1 step and
    tracing this one). Pieces would also need their guards in full: one failing in a later graph
    comes after the earlier ones updated the cache."""

    def __init__(self, model: nn.Module) -> None:
        def step(ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
            return model(ids, cache, mode="static", positions=positions)[:, -1]

        self.model = model
        self.eager_step = step
        self.step = torch.compile(step, dynamic=True, fullgraph=True)
        self.compile_seconds: dict[str, float] = {}
        self.graph_breaks: set[str] = set()
        self.prepare()

    def prepare(self) -> None:
        """Layers that keep a copy of their weights in a CPU kernel's layout (quantized layers) make or
        refresh it in eager code, where their stored tensors' changes are seen; the compiled graph
        reads it. Engines call this when a batch starts; the guards of the next calls run in full."""
        for m in self.model.modules():
            if hasattr(m, "prepare_cpu_kernels"):
                m.prepare_cpu_kernels()
        self._guarded: set[tuple[str, int]] = set()

    @staticmethod
    def _shape(ids: torch.Tensor) -> str:
        # torch.compile specialises a size of 1, so batch 1 and larger batches compile once each; batches
        # beyond the CPU decode kernels' rows take other kernels (an MoE's sorted dispatch, which reads
        # its expert counts to the host), so they are a shape of their own
        rows = ids.shape[0]
        return "batch 1" if rows == 1 else f"batch 2-{MAX_ROWS}" if rows <= MAX_ROWS else f"batch > {MAX_ROWS}"

    def compiles(self, ids: torch.Tensor) -> bool:
        """Whether a call on `ids` compiles first (no graph for its shape yet)."""
        return self._shape(ids) not in self.compile_seconds

    def __call__(self, ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor,
                 source: object | None = None) -> torch.Tensor:
        """The step's logits. source: the cache that `cache` is a view of. Its first call for a shape
        after `prepare` (a batch's start) evaluates the graph's guards in full; its later calls run
        only the guards that tell the shapes' graphs apart (`skip_guard_eval_unsafe`), where the step
        is one graph. The other guards check what a batch cannot change (the model's tensors, the
        cache's dtypes and layout), and on a CPU their evaluation took ~10% of a 125M model's
        compiled step (BENCHMARKS.md)."""
        shape = self._shape(ids)
        if shape in self.compile_seconds:
            key = (shape, id(source))
            if key in self._guarded:
                try:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        return self.step(ids, cache, positions)
                except RuntimeError as exc:
                    # one graph: its guards failed before it ran, so the call runs again with every
                    # guard, which finds (or compiles) the graph it needs
                    if "skip_guard_eval_unsafe" not in str(exc):
                        raise
            out = self._run(shape, ids, cache, positions)
            if source is not None and shape not in self.graph_breaks:   # an eager step has no guards to skip
                self._guarded.add(key)
            return out
        import torch.fx.experimental._config as fx_config

        start = time.perf_counter()
        # without duck shaping, the attention window (a size of the cache's KV views) keeps a symbol of
        # its own rather than one shared with an equal size (a Mamba state's) that the model fixes
        with fx_config.patch(use_duck_shape=False):
            out = self._run(shape, ids, cache, positions)
        self.compile_seconds[shape] = seconds = time.perf_counter() - start
        if shape in self.graph_breaks:
            log.info("the decode step for %s is not one graph: it runs eagerly (%.1f s to find out)", shape, seconds)
        else:
            log.info("compiled the decode step for %s in %.1f s (once per model and process)", shape, seconds)
        return out

    def _run(self, shape: str, ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
        if shape not in self.graph_breaks:
            try:
                return self.step(ids, cache, positions)
            except tracing_errors():   # raised while tracing the graph: nothing ran
                self.graph_breaks.add(shape)
        return self.eager_step(ids, cache, positions)


def compile_failed(model: nn.Module, exc: Exception) -> None:
    """Compiling the decode step of `model` failed: the default rule keeps it eager from now on."""
    reason = f"compiling the decode step failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    model.__dict__["_compile_failed"] = reason
    model.__dict__.pop("_compiled_decode", None)
    warnings.warn(f"{reason}; decoding eagerly", NemotronWarning, stacklevel=3)


def compiled_decode_step(model: nn.Module) -> CompiledDecode:
    """The model's compiled decode function, made once and kept on the model (so its graphs are
    reused by every engine and freed with the model)."""
    if model.__dict__.get("_compiled_decode") is None:
        model.__dict__["_compiled_decode"] = CompiledDecode(model)
    return model.__dict__["_compiled_decode"]


