"""The model's forward steps over a cache: `prefill` runs a prompt in chunks that continue the cache
(bounded memory for long prompts), `decode_step` is one recurrent step for every row,
`compiled_decode_step` is the same step traced by torch.compile on the static decode path.
`greedy_generate` is greedy decoding in one short loop: the oracle the engine is tested against."""

from __future__ import annotations

import torch
from torch import nn

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


def compiled_decode_step(model: nn.Module):
    """The model's compiled decode function, made once and kept on the model (so its graphs are
    reused by every engine and freed with the model)."""
    if getattr(model, "_compiled_decode", None) is None:
        def step(ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor) -> torch.Tensor:
            return model(ids, cache, mode="static", positions=positions)[:, -1]

        model._compiled_decode = torch.compile(step, dynamic=True)
    return model._compiled_decode


