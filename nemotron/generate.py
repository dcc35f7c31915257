"""Greedy generation over the hybrid cache: a chunked prefill (bounded memory for long prompts),
then one recurrent decode step per token."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor, cache, chunk: int = 512) -> torch.Tensor:
    """Run the prompt through the model in chunks that continue the cache; return last-token logits."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], cache, logits_to_keep=1)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(model: nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    return model(token[:, None], cache)[:, -1]


@torch.inference_mode()
def greedy_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
                    stop_ids: set[int] | None = None) -> torch.Tensor:
    """ids [B, T] -> generated ids [B, <= max_new_tokens]; a row stops at its first stop id."""
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
