"""The training loop for pretraining and SFT, driven by a recipe (`TrainConfig`).

One loop: packed batches -> loss (next token, MTP, MoE balancing) -> AdamW step -> expert-bias update,
with gradient accumulation, clipping, a schedule, periodic atomic checkpoints that resume
bit-identically, metrics as JSONL (and TensorBoard when installed), a progress bar, a loss plot, and
an export in the Hugging Face layout at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint

from nemotron.api import load
from nemotron.config import config_from_dict
from nemotron.config.presets import toy_super_config
from nemotron.io.checkpoint import save_checkpoint
from nemotron.io.tokenizer import Tokenizer
from nemotron.models import build_model
from nemotron.models.init import init_weights_
from nemotron.quant.modelopt import quantized_layers
from nemotron.train.lora import DEFAULT_TARGETS, apply_lora, merge_lora, save_adapter
from nemotron.train.objectives import routers, routing_collapse, update_expert_bias
from nemotron.train.parallel import (all_reduce_grads, apply_ep, apply_fsdp, apply_tp, blocks, expert_parameters,
                       full_state_dict, init_from_env)
from nemotron.train.optim import DECAYS, OPTIMIZERS, SCHEDULES, lr_at, make_optimizer
from nemotron.train.data import PACKINGS
from nemotron.train.stages import make_stage
from nemotron.train.state import resume_training_state, save_training_state, step_dirs

STAGES = ("pretrain", "sft", "dpo", "grpo")
TOY_SUPER = "toy_super"   # init_config value: the toy Nemotron 3 Super layout of config.presets.toy_super_config
DISCARDED_METRICS = "metrics.discarded.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass
class TrainConfig:
    """A training recipe. Every field can be set in the recipe file or as key=value on the command line."""

    stage: str = "pretrain"
    data: list[str] = field(default_factory=list)   # pretrain: .jsonl ("text") or .txt; sft: .jsonl conversations
    out_dir: str = "runs/train"
    model: str | None = None          # a checkpoint directory to start from ...
    init_config: str | None = None    # ... or a config.json to initialise from (TOY_SUPER: toy_super_config())
    tokenizer: str | None = None      # tokenizer files (default: the model directory)
    seed: int = 0
    steps: int = 100
    seq_len: int = 512
    batch_size: int = 8               # packed rows per micro-batch
    packing: str = "first_fit"        # first_fit: an example joins the first of the last 64 open rows it fits;
                                      # greedy: the last row, else a new one (the data's order kept)
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    optimizer: str = "adamw"          # or muon: Muon for the dense hidden matrices (Linear weights), AdamW for the rest
    muon_lr: float | None = None      # muon: the matrices' peak learning rate (default: lr), on the schedule with lr
    warmup: int = 10
    schedule: str = "wsd"
    decay: str = "minus_sqrt"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    mtp_depth: int = 1
    aux_loss_coeff: float = 1e-4
    bias_update_rate: float = 1e-3
    freeze_router: bool | None = None  # router weights and expert biases stay put (default: only in grpo)
    # dpo
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    # grpo
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coeff: float = 0.0
    dynamic_sampling: int = 0         # grpo: extra prompt batches drawn to replace groups without signal (DAPO)
    grpo_reward: str = "number"       # the verifier of prompts that name none: number, exact, contains
    lora_rank: int = 0                # > 0: train low-rank adapters only (merged into the export)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    autocast: str = "none"            # "bfloat16" where the hardware has it
    parallel: str = "fsdp"            # under torchrun: fsdp (data parallel), tp (tensor), ep (expert + data)
    activation_checkpointing: bool = False
    compile: bool = False
    save_every: int = 100
    log_every: int = 1
    resume: bool = True               # continue from out_dir's latest checkpoint when there is one
    template_kwargs: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"recipe: {name} {rule}, got {getattr(self, name)!r}")

        if self.stage not in STAGES:
            fail("stage", f"must be one of {', '.join(STAGES)}")
        if not self.data:
            fail("data", "must list at least one file")
        for path in self.data:
            if not Path(path).is_file():
                raise ValueError(f"recipe: data file {path} does not exist")
        if (self.model is None) == (self.init_config is None):
            raise ValueError("recipe: set exactly one of model (a checkpoint to start from) and init_config")
        if self.init_config is not None and self.tokenizer is None:
            fail("tokenizer", "is needed with init_config (a directory with tokenizer.json)")
        if self.lora_rank < 0:
            fail("lora_rank", "must be >= 0 (0: full fine-tuning)")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "save_every", "log_every", "mtp_depth",
                     "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "mtp_weight", "aux_loss_coeff",
                     "bias_update_rate", "warmup", "dpo_beta", "temperature", "clip_low", "clip_high", "kl_coeff"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            fail("decay_fraction", "must be in [0, 1]")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if self.muon_lr is not None and self.muon_lr < 0:
            fail("muon_lr", "must be >= 0")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.decay not in DECAYS:
            fail("decay", f"must be one of {', '.join(DECAYS)}")
        if self.autocast not in ("none", "bfloat16"):
            fail("autocast", "must be none or bfloat16")
        if self.packing not in PACKINGS:
            fail("packing", f"must be one of {', '.join(PACKINGS)}")
        if self.parallel not in ("fsdp", "tp", "ep"):
            fail("parallel", "must be fsdp, tp or ep")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            fail("dpo_label_smoothing", "must be in [0, 0.5)")
        if self.stage == "grpo" and self.group_size < 2:
            fail("group_size", "must be >= 2 (advantages are relative to the group)")
        if self.freeze_router is None:
            self.freeze_router = self.stage == "grpo"   # NeMo-RL: router and expert biases frozen in RL
        return self


def coerce_setting(name: str, value: Any, hint: Any) -> Any:
    """Check a recipe value against the field's type hint (ints are accepted for floats, and numeric
    strings too: YAML 1.1 reads 3e-4, without a dot, as a string)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"recipe: {name} must be a list of strings, got {value!r}")
        return value
    if hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"recipe: {name} must be {hint.__name__}, got {value!r}")
    return value


def load_recipe(path: str | Path | None, overrides: list[str] = (), stage: str | None = None) -> TrainConfig:
    """A recipe file (YAML or JSON) plus key=value overrides -> a validated TrainConfig. Unknown keys
    and bad values are one-line errors before any work starts."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"recipe {path}: cannot be read ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"recipe {path}: must be a mapping of keys to values")
        values.update(loaded or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    if stage is not None:
        if values.get("stage", stage) != stage:
            raise ValueError(f"recipe stage {values['stage']!r} does not match the command ({stage})")
        values["stage"] = stage
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(TrainConfig)
    clean = {k: coerce_setting(k, v, hints[k]) for k, v in values.items()}
    return TrainConfig(**clean).validate()


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def _build(cfg: TrainConfig):
    if cfg.model is not None:
        loaded = load(cfg.model, dtype="float32")
        model, config = loaded.model, loaded.config
        quantized = quantized_layers(model)
        if quantized:
            raise ValueError(f"{cfg.model} is quantized ({next(iter(quantized.values())).algo}); "
                             "train the full-precision checkpoint and quantize the result")
        tok_dir = Path(cfg.tokenizer or cfg.model)
    else:
        config = toy_super_config() if cfg.init_config == TOY_SUPER else \
            config_from_dict(json.loads(Path(cfg.init_config).read_text()))
        torch.manual_seed(cfg.seed)
        model = init_weights_(build_model(config), config, seed=cfg.seed)
        tok_dir = Path(cfg.tokenizer)
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary {config.vocab_size}")
    return model, config, tokenizer, tok_dir


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (applied from outside: the block's
    forward is wrapped on the instance, names and weights are unchanged)."""
    for block in blocks(model):
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def plot_curves(records: list[dict], out: Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """A PNG of the logged curves (needs matplotlib; without it nothing is drawn)."""
    try:   # imported here: matplotlib takes about a second to import, and only the end of a run draws
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r["step"] for r in records if key in r]
        ax.plot(xs, [r[key] for r in records if key in r])
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def rewind_metrics(path: Path, step: int) -> tuple[list[dict], int]:
    """Cut metrics.jsonl back to the records of steps <= `step` (the checkpoint resumed from, 0 for a
    fresh start) and return them, with the number of lines moved. Nothing is dropped: the lines after
    `step` (steps about to be run again) and lines that do not parse (a write cut short by a crash) are
    appended, byte for byte, to metrics.discarded.jsonl beside it before metrics.jsonl is replaced."""
    lines = path.read_bytes().splitlines() if path.is_file() else []
    kept, moved, records = [], [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:   # JSONDecodeError, or bytes that are not UTF-8
            record = None
        ok = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        (kept if ok else moved).append(line)
        if ok:
            records.append(record)
    if moved:
        with (path.parent / DISCARDED_METRICS).open("ab") as f:
            f.write(b"".join(line + b"\n" for line in moved))
            f.flush()
            os.fsync(f.fileno())   # on disk before the lines leave metrics.jsonl
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)
    return records, len(moved)


def _start_over(out: Path) -> str | None:
    """resume=false over an earlier run: its checkpoints are moved to checkpoints.previous (replacing
    an older one there), so that none of them is mistaken for this run's; returns the note to print."""
    ckpt_root = out / "checkpoints"
    if not step_dirs(ckpt_root):
        return None
    previous = out / "checkpoints.previous"
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(ckpt_root, previous)
    return f"resume=false: starting at step 0; the earlier checkpoints were moved to {previous}"


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None,
          stage_kwargs: dict | None = None) -> dict:
    """Run the recipe; returns a summary. `stop_after`: leave after that many steps of this call
    (as a crash would, but cleanly): used to test resuming. `stage_kwargs`: e.g. {"rewards": {name:
    fn(answer, record) -> float}} to add GRPO verifiers."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = init_from_env() if distributed else (0, 1)
    if distributed and cfg.stage not in ("pretrain", "sft"):
        raise ValueError(f"{cfg.stage} runs in one process for now; use torchrun for pretrain and sft")
    torch.manual_seed(cfg.seed)
    model, config, tokenizer, tok_dir = _build(cfg)
    model.train()
    # the stage first: DPO/GRPO keep a frozen copy of the starting model, made before any wrapping
    shard = (rank, world) if distributed and cfg.parallel != "tp" else (0, 1)
    stage = make_stage(cfg, model, tokenizer, shard=shard, **(stage_kwargs or {}))
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.freeze_router:
        for router in routers(model):
            router.weight.requires_grad_(False)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        for block in blocks(model):
            block.compile()
    dp_group, experts = None, set()
    if distributed:   # parallelism applied from outside: tensor / expert parallel, then FSDP2
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
        if cfg.parallel == "tp":
            apply_tp(model, mesh)
        elif cfg.parallel == "ep":
            apply_ep(model)
            experts = expert_parameters(model)
            dp_group = dist.group.WORLD
        else:
            apply_fsdp(model, mesh)
            dp_group = dist.group.WORLD
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), kind=cfg.optimizer,
                               muon_lr=cfg.muon_lr)
    lr_ratios = [group["lr_ratio"] for group in optimizer.param_groups]   # this run's, not a checkpoint's
    start = 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:   # refuses (CheckpointError) rather than start over when no checkpoint is usable
        meta, note = resume_training_state(out, model, optimizer, stage.state_dict())
        if meta is not None:
            stage.load_state_dict(meta["data"])
            start = meta["step"]
    else:
        note = _start_over(out) if rank == 0 else None
    records, moved = rewind_metrics(metrics_path, start) if rank == 0 else ([], 0)
    if moved:
        note = (note + "; " if note else "") + \
            f"{moved} line(s) of {metrics_path.name} after step {start} moved to {DISCARDED_METRICS}"
    if note and rank == 0:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    writer = _tensorboard(out)
    autocast = torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16,
                              enabled=cfg.autocast == "bfloat16")
    bar = _progress(progress and rank == 0, cfg.steps, start)
    load_bounds = {i: r.weight.shape[0] / r.top_k for i, r in enumerate(routers(model))}
    collapse_streaks: dict[int, int] = {}
    # a run resumed at its last step trains no more: it reports the last logged loss
    last_loss = records[-1].get("loss", float("nan")) if records else float("nan")
    steps_run = 0
    try:
        with metrics_path.open("a") as log:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.schedule, cfg.decay_fraction,
                           cfg.decay)
                for group, ratio in zip(optimizer.param_groups, lr_ratios):
                    group["lr"] = lr * ratio
                optimizer.zero_grad(set_to_none=True)
                record = {"step": step + 1, **stage.step(model, autocast), "lr": lr}
                if distributed and cfg.parallel == "ep":   # replicated weights: sum the ranks' gradients
                    all_reduce_grads(model, skip=experts)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) \
                    if cfg.grad_clip > 0 else float("nan")
                optimizer.step()
                frozen = cfg.freeze_router or cfg.lora_rank > 0   # LoRA: the base model (biases too) stays put
                loads = update_expert_bias(model, 0.0 if frozen else cfg.bias_update_rate, dp_group)
                dt = time.perf_counter() - t0
                last_loss = record["loss"]
                record["grad_norm"] = grad_norm
                record["tokens_per_s"] = record.pop("tokens") / dt
                if loads:
                    record["max_over_mean_load"] = {str(i): round(v, 4) for i, v in loads.items()}
                    for collapse in routing_collapse(loads, load_bounds, collapse_streaks):
                        if rank == 0:
                            print(f"warning: step {step + 1}: {collapse}", file=sys.stderr, flush=True)
                if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    records.append(record)
                    if writer is not None:
                        for k, v in record.items():
                            if isinstance(v, float):
                                writer.add_scalar(k, v, step + 1)
                if bar is not None:
                    bar.update(step + 1, last_loss, record["tokens_per_s"])
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                    save_training_state(out, step + 1, model, optimizer,
                                        {"data": stage.state_dict(), "recipe": dataclasses.asdict(cfg)})
                steps_run += 1
                if stop_after is not None and steps_run >= stop_after:
                    return {"stopped_at": step + 1, "loss": last_loss}
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if distributed:   # the export is one unsharded checkpoint, written by rank 0
        full = full_state_dict(model) if cfg.parallel != "fsdp" else \
            {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        if rank != 0:
            dist.barrier()
            return {"steps": cfg.steps, "loss": last_loss, "rank": rank}
        model, _, _, _ = _build(cfg)
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        missing, unexpected = model.load_state_dict(full, strict=False)
        if [m for m in missing if not m.endswith("tokens_per_expert")] or unexpected:
            raise RuntimeError(f"gathering the sharded model lost tensors: {missing[:3]} {unexpected[:3]}")
    if cfg.lora_rank:
        save_adapter(model, out / "adapter", cfg.model)
        merge_lora(model)
    final = save_checkpoint(model, config, out / "final")
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, final / name)
    curves = ("loss",) + tuple(k for k in ("mtp1_loss", "reward", "accuracy") if any(k in r for r in records))
    plot = plot_curves(records, out / "loss.png", curves)
    if distributed:
        dist.barrier()
    return {"steps": cfg.steps, "loss": last_loss, "final": str(final), "metrics": str(metrics_path),
            "plot": str(plot) if plot else None}


def _tensorboard(out: Path):
    try:   # optional: TensorBoard logging when it is installed (it is not a dependency)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


class _Bar:
    def __init__(self, total: int, start: int) -> None:
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                                 TimeRemainingColumn())
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def update(self, step: int, loss: float, tps: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, tps=tps)

    def close(self) -> None:
        self.progress.stop()


def _progress(on: bool, total: int, start: int) -> _Bar | None:
    return _Bar(total, start) if on else None
