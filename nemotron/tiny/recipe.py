"""The tiny model's whole recipe: procedural data -> tokenizer -> pretrain -> SFT (reasoning on, off
and tool use) -> GRPO on verifiable rewards -> export, with the held-out evaluation table after each
stage. Every stage is the project's own code (nemotron.train, the engine, the parsers)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from nemotron import kernels
from nemotron.api import load
from nemotron.chat.template import apply_chat_template
from nemotron.config import NemotronHConfig, save_config
from nemotron.io.tokenizer import Tokenizer
from nemotron.tiny.evaluate import MODES, decode_speed, evaluate
from nemotron.tiny.tasks import (EVAL_FAMILIES, GRPO_SOLVABLE, GRPO_WEIGHTS, TOOL_FAMILIES, TRAIN_WEIGHTS, conversation, grpo_prompt,
                    problems)
from nemotron.tiny.tokenizer import train_tokenizer
from nemotron.train import load_recipe, train
from nemotron.train.data import PACKINGS
from nemotron.train.optim import OPTIMIZERS


def embedded_model_config(vocab_size: int) -> NemotronHConfig:
    """The embedded model's architecture: Nemotron 3 Super's shape at a few million parameters
    (Mamba-2, NoPE attention, LatentMoE with a sigmoid router, correction bias and a shared expert, and
    an MTP block), for a tokenizer of `vocab_size` ids."""
    return NemotronHConfig(
        hybrid_override_pattern="MEM*EM*EM*E", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
        vocab_size=vocab_size, hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=12, mamba_head_dim=32, n_groups=2, ssm_state_size=32, chunk_size=64,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, moe_latent_size=96,
        moe_shared_expert_intermediate_size=384, routed_scaling_factor=2.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=4, pad_token_id=0,
    )


@dataclass
class TinyRecipe:
    out_dir: str = "runs/tiny"
    seed: int = 0
    train_problems: int = 120_000
    eval_problems: int = 270          # per split (forms seen in training, forms held out): 30 per family
    pretrain_eval_problems: int = 90  # the first of those after pretraining, a progress check: 10 per family
    vocab_size: int = 1024
    seq_len: int = 512                # rows of packed conversations (~120 tokens each): attention over
                                      # 1024 computed a square of mostly masked pairs
    autocast: str = "auto"            # bf16 products where the CPU has bf16 instructions (auto), none, bfloat16
    # the shipped model's settings: rows packed first-fit (98% full against greedy's 79%); Muon for
    # the hidden matrices in pretraining (a step learns more: 760 steps and 180 of SFT fit where AdamW's
    # 520 and 150 did); a balancing step of 1e-2, as 1e-3 let every MoE layer's routing drift to one
    # expert over 480 Muon steps (with 1e-2, two of the four still do and one part way: README)
    packing: str = "first_fit"
    pretrain_steps: int = 760
    pretrain_optimizer: str = "muon"   # Muon for the hidden matrices at pretrain_muon_lr
    pretrain_lr: float = 3e-3          # AdamW's: the embeddings, output head, routers, experts and norms
    pretrain_muon_lr: float = 0.02
    pretrain_bias_update_rate: float = 1e-2   # the routers' balancing step (aux-loss-free bias), per step
    sft_steps: int = 180
    sft_optimizer: str = "adamw"
    sft_lr: float = 1e-3
    grpo_steps: int = 32
    grpo_lr: float = 5e-5
    grpo_temperature: float = 1.0
    grpo_dynamic_sampling: int = 2    # extra prompt batches to replace groups without signal (DAPO)
    grpo_batch_size: int = 8          # prompts per GRPO step (each sampled group_size times)
    grpo_kl_coeff: float = 0.02       # KL to the SFT model, per token
    # "solvable": tasks.GRPO_SOLVABLE, half reasoning off; "sft": the SFT mixture's questions;
    # "hard": tasks.GRPO_WEIGHTS
    grpo_prompts: str = "solvable"
    batch_size: int = 16
    max_new_tokens: int = 160         # GRPO samples
    eval_max_new_tokens: int = 960    # evaluation answers (a product of two-digit numbers and two more steps: ~800 tokens)

    def __post_init__(self) -> None:   # the settings each stage would reject, refused before any work
        if self.autocast not in ("auto", "none", "bfloat16"):
            raise ValueError(f"recipe tiny: autocast must be auto, none or bfloat16, got {self.autocast!r}")
        for stage in ("pretrain", "sft"):
            if getattr(self, f"{stage}_optimizer") not in OPTIMIZERS:
                raise ValueError(f"recipe tiny: {stage}_optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                 f"got {getattr(self, f'{stage}_optimizer')!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"recipe tiny: packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SPLITS = ("seen forms", "held-out forms")


def build_data(recipe: TinyRecipe, out: Path) -> dict:
    """Write the JSONL files of every stage; returns their paths and the evaluation problems of each
    split: new questions of the forms training uses, and questions of the held-out forms."""
    held_out = {split: problems(recipe.eval_problems, "eval", recipe.seed, EVAL_FAMILIES,
                                held_out_forms=split == "held-out forms") for split in SPLITS}
    exclude = {p.question for split in SPLITS for p in held_out[split]}
    training = problems(recipe.train_problems, "train", recipe.seed, exclude=exclude, weights=TRAIN_WEIGHTS)
    rng = random.Random(recipe.seed)
    sft, grpo = [], []
    for p in training:
        r = rng.random()
        # tool conversations carry the tool schemas (~400 tokens against ~120): a tenth of the
        # questions that have a tool solution teach the calls at a third of the SFT tokens' cost
        mode = "tool" if p.family in TOOL_FAMILIES and r < 0.1 else "no_think" if r > 0.8 else "think"
        sft.append(conversation(p, mode))
        if recipe.grpo_prompts == "sft" and p.family in EVAL_FAMILIES:   # RL on both reasoning modes
            grpo.append(grpo_prompt(p, thinking=mode != "no_think"))
    n = recipe.grpo_steps * recipe.grpo_batch_size * (1 + recipe.grpo_dynamic_sampling)
    if recipe.grpo_prompts == "hard":
        # questions of their own (another seed), in the same reasoning-on/off proportion as SFT
        for p in problems(n, "train", recipe.seed + 1, tuple(GRPO_WEIGHTS), exclude=exclude, weights=GRPO_WEIGHTS):
            grpo.append(grpo_prompt(p, thinking=rng.random() <= 0.8))
    elif recipe.grpo_prompts == "solvable":
        for p in problems(n, "train", recipe.seed + 1, GRPO_SOLVABLE, exclude=exclude):
            grpo.append(grpo_prompt(p, thinking=rng.random() < 0.5))
    elif recipe.grpo_prompts != "sft":
        raise ValueError(f"grpo_prompts must be 'solvable', 'hard' or 'sft', not {recipe.grpo_prompts!r}")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"sft": _write_jsonl(data / "sft.jsonl", sft),
             "grpo": _write_jsonl(data / "grpo.jsonl", grpo),
             "eval": _write_jsonl(data / "eval.jsonl", [{**grpo_prompt(p), "split": split, "form": p.form}
                                                        for split in SPLITS for p in held_out[split]])}
    return {"paths": paths, "held_out": held_out, "sft": sft}


def pretrain_texts(tokenizer: Tokenizer, sft: list[dict]) -> list[str]:
    """Pretraining text: the conversations rendered in the chat format (the tiny model learns the
    format and the tasks' language together). Only one tool conversation in three is kept: their
    tool schemas make them four times longer than the others, for little more to learn."""
    return [apply_chat_template(tokenizer, r["messages"], tools=r.get("tools"), add_generation_prompt=False,
                                enable_thinking=r.get("enable_thinking", True))
            for i, r in enumerate(sft) if "tools" not in r or i % 3 == 0]


def run(recipe: TinyRecipe, progress: bool = True) -> dict:
    """Run the whole recipe into recipe.out_dir; returns the evaluation table per stage."""
    start = time.perf_counter()
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(recipe, out)
    tok_dir = train_tokenizer((json.dumps(r) for r in data["sft"]), out / "tokenizer", recipe.vocab_size)
    tokenizer = Tokenizer.from_dir(tok_dir)
    pretrain_path = _write_jsonl(out / "data" / "pretrain.jsonl",
                                 ({"text": t} for t in pretrain_texts(tokenizer, data["sft"])))
    config = embedded_model_config(-(-tokenizer.vocab_size // 64) * 64)
    save_config(config, out / "config.json")
    autocast = recipe.autocast if recipe.autocast != "auto" else \
        "bfloat16" if kernels.cpu_isa() == kernels.AVX512_BF16 else "none"
    common = [f"seed={recipe.seed}", f"seq_len={recipe.seq_len}", f"autocast={autocast}", f"packing={recipe.packing}",
              "save_every=100000", "resume=false"]
    stages = [
        ("pretrain", [f"data=[{pretrain_path}]", f"init_config={out / 'config.json'}", f"tokenizer={tok_dir}",
                      f"steps={recipe.pretrain_steps}", f"lr={recipe.pretrain_lr}", "min_lr=1e-4",
                      f"optimizer={recipe.pretrain_optimizer}", f"muon_lr={recipe.pretrain_muon_lr}",
                      f"bias_update_rate={recipe.pretrain_bias_update_rate}",
                      f"warmup={max(1, recipe.pretrain_steps // 20)}", f"batch_size={recipe.batch_size}"]),
        ("sft", [f"data=[{data['paths']['sft']}]", f"model={out / 'pretrain' / 'final'}", f"steps={recipe.sft_steps}",
                 f"lr={recipe.sft_lr}", "min_lr=1e-5", f"optimizer={recipe.sft_optimizer}",
                 f"warmup={max(1, recipe.sft_steps // 20)}", f"batch_size={recipe.batch_size}"]),
        ("grpo", [f"data=[{data['paths']['grpo']}]", f"model={out / 'sft' / 'final'}", f"steps={recipe.grpo_steps}",
                  f"lr={recipe.grpo_lr}", "warmup=0", "schedule=constant", "group_size=8",
                  f"batch_size={recipe.grpo_batch_size}",
                  f"max_new_tokens={recipe.max_new_tokens}", f"temperature={recipe.grpo_temperature}",
                  f"dynamic_sampling={recipe.grpo_dynamic_sampling}", f"kl_coeff={recipe.grpo_kl_coeff}"]),
    ]
    table: dict = {}
    minutes = {"data": (time.perf_counter() - start) / 60}
    fields = ["seed", "train_problems", "eval_problems", "vocab_size", "seq_len", "autocast", "packing", "batch_size",
              "max_new_tokens", "eval_max_new_tokens"]
    for stage, args in stages:
        # a stage already run with the same settings (its own and every earlier one) is reused:
        # re-running the recipe after changing, say, the GRPO settings redoes GRPO only
        fields += [f.name for f in dataclasses.fields(recipe) if f.name.startswith(stage + "_")]
        settings = {f: getattr(recipe, f) for f in fields}
        done = out / stage / "done.json"
        record = json.loads(done.read_text()) if done.is_file() else {}
        if record.get("settings") != settings:
            done.unlink(missing_ok=True)
            cfg = load_recipe(None, common + args + [f"out_dir={out / stage}"], stage)
            t = time.perf_counter()
            train(cfg, progress=progress)
            record = {"settings": settings, "minutes": (time.perf_counter() - t) / 60}
            t = time.perf_counter()
            model = load(out / stage / "final")
            n = recipe.pretrain_eval_problems if stage == "pretrain" else recipe.eval_problems
            record["eval"] = {split: evaluate(model, data["held_out"][split][:n], MODES, recipe.eval_max_new_tokens)
                              for split in SPLITS}
            record["eval_minutes"] = (time.perf_counter() - t) / 60
            done.write_text(json.dumps(record, indent=1) + "\n")
        table[stage] = record["eval"]
        minutes[stage] = record["minutes"] + record["eval_minutes"]
        (out / "eval.json").write_text(json.dumps(table, indent=1) + "\n")
    t = time.perf_counter()
    table["speed"] = decode_speed(load(out / "grpo" / "final"), data["held_out"]["held-out forms"],
                                  max_new_tokens=recipe.max_new_tokens)
    minutes["speed"] = (time.perf_counter() - t) / 60
    table["minutes"] = minutes
    (out / "eval.json").write_text(json.dumps(table, indent=1) + "\n")
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(out / "grpo" / "final", final)
    (out / "eval.md").write_text(format_table(table))
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
    return table


def format_table(table: dict) -> str:
    """Markdown: one row per (stage, split, mode), one column per family; then the decode speed line."""
    stages = {k: v for k, v in table.items() if k not in ("speed", "minutes")}
    families = sorted({f for stage in stages.values() for split in stage.values() for row in split.values()
                       for f in row if f not in ("all", "tool_call_rate")})
    lines = ["| stage | forms | reasoning | " + " | ".join(families) + " | all | tool calls |",
             "|---|---|---|" + "---|" * (len(families) + 2)]
    for stage, splits in stages.items():
        for split, modes in splits.items():
            for mode, row in modes.items():
                cells = [f"{row[f]:.0%}" if f in row else "" for f in families]
                rate = f"{row['tool_call_rate']:.0%}" if "tool_call_rate" in row else ""
                lines.append(f"| {stage} | {split.split()[0]} | {mode} | " + " | ".join(cells)
                             + f" | {row['all']:.0%} | {rate} |")
    if "speed" in table:
        sp = table["speed"]
        lines += ["", f"Decode (batch 1, greedy): {sp['decode_tokens_per_s']:.0f} tokens/s; with MTP speculation "
                      f"({sp['mtp_draft_tokens']} draft tokens): {sp['mtp_tokens_per_s']:.0f} tokens/s "
                      f"({sp['mtp_speedup']:.2f}x), acceptance length {sp['mtp_acceptance_length']:.2f} tokens per "
                      f"step, same text: {'yes' if sp['mtp_same_text'] else 'no'}."]
    if "minutes" in table:
        mins = table["minutes"]
        lines += ["", "Minutes (training and evaluation per stage): " + ", ".join(f"{k} {v:.1f}" for k, v in mins.items())
                  + f"; total {sum(mins.values()):.1f}."]
    return "\n".join(lines) + "\n"
