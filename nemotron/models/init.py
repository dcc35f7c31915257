"""Random weight initialisation, for training from scratch and for random test checkpoints
(`nemotron.io.random_checkpoint`).

Linear and embedding weights ~ N(0, initializer_range); output projections of residual branches
scaled by 1/sqrt(num_layers); norms at identity; Mamba A_log = log(1..heads), D = 1 and dt_bias the
inverse softplus of a log-uniform dt in [time_step_min, time_step_max] (floored), as Mamba-2 does."""

from __future__ import annotations

import math

import torch
from torch import nn

from nemotron.config import AnyConfig, NemotronHConfig
from nemotron.layers.mamba2 import Mamba2Mixer
from nemotron.layers.moe import Experts, TopkRouter
from nemotron.layers.norm import GatedRMSNorm, LayerNorm1P, RMSNorm

_RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj", "linear_attn", "linear_mlp", "fc2_latent_proj")


@torch.no_grad()
def init_weights_(model: nn.Module, config: AnyConfig, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    depth_scale = 1 / math.sqrt(max(1, config.num_hidden_layers))

    def normal_(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * s)

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            normal_(module.weight, std * (depth_scale if leaf in _RESIDUAL_OUTPUTS else 1.0))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, LayerNorm1P):
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, Experts):
            normal_(module.up_proj, std)
            normal_(module.down_proj, std * depth_scale)
        elif isinstance(module, TopkRouter):
            normal_(module.weight, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, Mamba2Mixer):
            assert isinstance(config, NemotronHConfig)
            k = module.conv1d.weight.shape[-1]
            bound = 1 / math.sqrt(k)  # PyTorch's default conv init for a depthwise kernel
            module.conv1d.weight.copy_((torch.rand(module.conv1d.weight.shape, generator=g) * 2 - 1) * bound)
            if module.conv1d.bias is not None:
                module.conv1d.bias.copy_((torch.rand(module.conv1d.bias.shape, generator=g) * 2 - 1) * bound)
            h = module.num_heads
            module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(h, generator=g) * (hi - lo) + lo).clamp(min=config.time_step_floor)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    return model
