"""LoRA: low-rank adapters on chosen linear layers, applied from outside the model code.

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the frozen base weight
under the same name (so checkpoints and loaders see the usual `...q_proj.weight`) and adds
`lora_A` [r, in] (Kaiming-uniform) and `lora_B` [out, r] (zeros): training starts exactly at the base
model. `merge_lora` folds `scale * B @ A` into the weights and puts plain linears back, for an export
in the release layout; `save_adapter` writes the adapters alone in PEFT's layout
(`adapter_model.safetensors` + `adapter_config.json`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.io.checkpoint import write_safetensors
from nemotron.layers.linear import Linear, linear

# Nemotron 3 Super's LoRA recipe: qkv/proj (attention), fc1/fc2 (MLPs), in_proj/out_proj (Mamba)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "in_proj", "out_proj")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return linear(x, self.weight, self.bias) + update.to(x.dtype)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze the model and put adapters on every nn.Linear whose name ends with a target (the MTP
    block and lm_head included only if named). Returns the adapted module names."""
    if rank < 1:
        raise ValueError("lora rank must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in (nn.Linear, Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                adapted.append(full)
    if not adapted:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    return adapted


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += scale * B @ A) and restore plain nn.Linear
    modules; returns how many were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                merged_linear = Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                       device="meta")
                delta = (child.lora_B.float() @ child.lora_A.float()) * child.scale
                merged_linear.weight = nn.Parameter((child.weight.float() + delta).to(child.weight.dtype))
                if child.bias is not None:
                    merged_linear.bias = child.bias
                setattr(module, child_name, merged_linear)
                merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """The adapters alone, in PEFT's file layout and tensor names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets, rank, alpha = {}, set(), None, None
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach()
            targets.add(name.rsplit(".", 1)[-1])
            rank, alpha = module.rank, module.alpha
    if not tensors:
        raise ValueError("the model has no LoRA adapters")
    write_safetensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
    }, indent=2) + "\n")
    return out
