"""The tiny model's whole recipe: procedural data -> tokenizer -> pretrain -> SFT (reasoning on, off
and tool use) -> GRPO on verifiable rewards -> export, with the held-out evaluation table after each
stage. Every stage is the project's own code (nemotron.train, the engine, the parsers)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..chat import apply_chat_template
from ..config import NemotronHConfig, save_config
from .evaluate import MODES, evaluate
from .tasks import EVAL_FAMILIES, TOOL_FAMILIES, conversation, grpo_prompt, problems
from .tokenizer import train_tokenizer


def tiny_config(vocab_size: int) -> NemotronHConfig:
    """Nemotron 3 Super's shape at a few million parameters: Mamba-2, NoPE attention, LatentMoE
    (sigmoid router with correction bias, shared expert) and an MTP block."""
    return NemotronHConfig(
        hybrid_override_pattern="MEM*EMEM*E", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
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
    train_problems: int = 12000
    eval_problems: int = 140
    vocab_size: int = 1024
    seq_len: int = 1024
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    sft_steps: int = 600
    sft_lr: float = 1e-3
    grpo_steps: int = 60
    grpo_lr: float = 2e-5
    batch_size: int = 8
    eval_max_new_tokens: int = 96


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_data(recipe: TinyRecipe, out: Path) -> dict:
    """Write the JSONL files of every stage; returns their paths and the held-out problems."""
    held_out = problems(recipe.eval_problems, "eval", recipe.seed, EVAL_FAMILIES)
    exclude = {p.question for p in held_out}
    train = problems(recipe.train_problems, "train", recipe.seed, exclude=exclude)
    rng = random.Random(recipe.seed)
    sft = []
    for p in train:
        r = rng.random()
        mode = "tool" if p.family in TOOL_FAMILIES and r < 0.3 else "no_think" if r > 0.8 else "think"
        sft.append(conversation(p, mode))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"sft": _write_jsonl(data / "sft.jsonl", sft),
             "grpo": _write_jsonl(data / "grpo.jsonl", [grpo_prompt(p) for p in train if p.family in EVAL_FAMILIES]),
             "eval": _write_jsonl(data / "eval.jsonl", [grpo_prompt(p) for p in held_out])}
    return {"paths": paths, "held_out": held_out, "sft": sft}


def _pretrain_texts(tokenizer, sft: list[dict]) -> list[str]:
    """Pretraining text: the conversations rendered in the chat format (the tiny model learns the
    format and the tasks' language together)."""
    return [apply_chat_template(tokenizer, r["messages"], tools=r.get("tools"), add_generation_prompt=False,
                                enable_thinking=r.get("enable_thinking", True)) for r in sft]


def run(recipe: TinyRecipe, progress: bool = True) -> dict:
    """Run the whole recipe into recipe.out_dir; returns the evaluation table per stage."""
    import nemotron
    from ..tokenizer import Tokenizer
    from ..train import load_recipe, train

    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(recipe, out)
    tok_dir = train_tokenizer((json.dumps(r) for r in data["sft"]), out / "tokenizer", recipe.vocab_size)
    tokenizer = Tokenizer.from_dir(tok_dir)
    pretrain_path = _write_jsonl(out / "data" / "pretrain.jsonl",
                                 ({"text": t} for t in _pretrain_texts(tokenizer, data["sft"])))
    config = tiny_config(-(-tokenizer.vocab_size // 64) * 64)
    save_config(config, out / "config.json")
    common = [f"seed={recipe.seed}", f"seq_len={recipe.seq_len}", f"batch_size={recipe.batch_size}",
              "save_every=100000", "resume=false"]
    stages = [
        ("pretrain", [f"data=[{pretrain_path}]", f"init_config={out / 'config.json'}", f"tokenizer={tok_dir}",
                      f"steps={recipe.pretrain_steps}", f"lr={recipe.pretrain_lr}", "min_lr=1e-4",
                      f"warmup={max(1, recipe.pretrain_steps // 20)}"]),
        ("sft", [f"data=[{data['paths']['sft']}]", f"model={out / 'pretrain' / 'final'}", f"steps={recipe.sft_steps}",
                 f"lr={recipe.sft_lr}", "min_lr=1e-5", f"warmup={max(1, recipe.sft_steps // 20)}"]),
        ("grpo", [f"data=[{data['paths']['grpo']}]", f"model={out / 'sft' / 'final'}", f"steps={recipe.grpo_steps}",
                  f"lr={recipe.grpo_lr}", "warmup=0", "schedule=constant", "group_size=8", "batch_size=4",
                  "max_new_tokens=96", "temperature=1.0"]),
    ]
    table = {}
    for stage, args in stages:
        cfg = load_recipe(None, common + args + [f"out_dir={out / stage}"], stage)
        if stage == "grpo":
            cfg.batch_size = 4
        train(cfg, progress=progress)
        model = nemotron.load(out / stage / "final")
        table[stage] = evaluate(model, data["held_out"], MODES, recipe.eval_max_new_tokens)
        (out / "eval.json").write_text(json.dumps(table, indent=1) + "\n")
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(out / "grpo" / "final", final)
    (out / "eval.md").write_text(format_table(table))
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
    return table


def format_table(table: dict) -> str:
    """Markdown: one row per (stage, mode), one column per family."""
    families = sorted({f for stage in table.values() for row in stage.values() for f in row
                       if f not in ("all", "tool_call_rate")})
    lines = ["| stage | reasoning | " + " | ".join(families) + " | all | tool calls |",
             "|---|---|" + "---|" * (len(families) + 2)]
    for stage, modes in table.items():
        for mode, row in modes.items():
            cells = [f"{row[f]:.0%}" if f in row else "" for f in families]
            rate = f"{row['tool_call_rate']:.0%}" if "tool_call_rate" in row else ""
            lines.append(f"| {stage} | {mode} | " + " | ".join(cells) + f" | {row['all']:.0%} | {rate} |")
    return "\n".join(lines) + "\n"
