"""Training objectives on packed batches: next-token loss, the MTP loss, MoE load balancing.

Nemotron 3's pretraining and SFT losses: token-level cross-entropy averaged over the scored tokens,
plus `mtp_weight` (0.3) x the mean over depths of the MTP block's loss (the one MTP block applied
repeatedly: depth k predicts the token k+1 places ahead), plus the sequence-level load-balancing loss
(alpha = 1e-4) of every MoE layer. The aux-loss-free expert-bias update runs after each optimizer step
(`update_expert_bias`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nemotron.layers.moe import TopkRouter
from nemotron.train.data import IGNORE, Batch


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def routers(model: nn.Module) -> list[TopkRouter]:
    return [m for m in model.modules() if isinstance(m, TopkRouter)]


def count_sequences(seq_idx: torch.Tensor) -> int:
    """Packed sequences in a batch (each row's distinct seq_idx values)."""
    return int(sum(len(torch.unique(row)) for row in seq_idx))


def sequence_aux_loss(model: nn.Module, seq_idx: torch.Tensor) -> torch.Tensor:
    """Sum over MoE layers and packed sequences of the alpha-free sum_i f_i P_i (divide by the number
    of sequences for the mean): f_i = E / (K T_s) x tokens of sequence s routed to expert i, P_i = the
    mean normalised score of expert i over those tokens (Megatron's seq_aux_loss). Uses each router's
    last training forward."""
    b, t = seq_idx.shape
    seq = (seq_idx + torch.arange(b, device=seq_idx.device)[:, None] * (int(seq_idx.max()) + 1)).reshape(-1)
    _, seq = torch.unique(seq, return_inverse=True)
    n_seq = int(seq.max()) + 1
    tokens = torch.bincount(seq, minlength=n_seq).float()                             # T_s
    total = seq_idx.new_zeros((), dtype=torch.float32)
    # the blocks' routers, which the forward just ran (the MTP block runs after this loss, and a
    # stale routing from an earlier step must never be read: its graph is gone)
    for router in routers(model.blocks):
        if router.last_routing is None:
            continue
        scores, idx = router.last_routing
        router.last_routing = None
        if scores.shape[0] != seq.numel():
            continue
        e, k = scores.shape[1], idx.shape[1]
        probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        p_mean = torch.zeros(n_seq, e, device=scores.device).index_add_(0, seq, probs) / tokens[:, None]
        counts = torch.bincount(seq.repeat_interleave(k) * e + idx.reshape(-1), minlength=n_seq * e)
        counts = counts.view(n_seq, e).float()
        f = counts * e / (k * tokens[:, None])
        total = total + (f * p_mean).sum()
    return total


def lm_loss(model: nn.Module, batch: Batch, mtp_weight: float = 0.0, mtp_depth: int = 1,
            aux_coeff: float = 0.0, loss_scale_tokens: int | None = None,
            loss_scale_sequences: int | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one (micro-)batch. The cross-entropy is summed and divided by `loss_scale_tokens`
    (the scored tokens of the whole optimizer step, so that gradient accumulation and data
    parallelism average per token) or by this batch's own count; the aux loss likewise by
    `loss_scale_sequences` (the step's packed sequences). Returns (loss, metrics)."""
    ids, labels, seq_idx = batch.input_ids, batch.labels, batch.seq_idx
    n = max(1, loss_scale_tokens if loss_scale_tokens is not None else batch.num_targets)
    use_mtp = mtp_weight > 0 and model.mtp is not None
    if use_mtp:
        logits, h = model(ids, seq_idx=seq_idx, return_hidden=True)
    else:
        logits = model(ids, seq_idx=seq_idx)
    ce = _ce_sum(logits, labels)
    loss = ce / n
    metrics = {"ce_sum": float(ce.detach()), "targets": batch.num_targets}
    if aux_coeff > 0:
        aux = sequence_aux_loss(model, seq_idx)
        loss = loss + aux_coeff * aux / max(1, loss_scale_sequences or count_sequences(seq_idx))
        metrics["aux_sum"] = float(aux.detach())
    if use_mtp:
        mtp_total, hidden = 0.0, h
        for k in range(1, mtp_depth + 1):
            length = ids.shape[1] - k
            if length <= 0:
                break
            # depth k: hidden at t (and the previous depth's output) + token t+k -> token t+k+1
            same = seq_idx[:, :length] == seq_idx[:, k:]
            target = torch.where(same, labels[:, k:], torch.full_like(labels[:, k:], IGNORE))
            logits_k, hidden = model.mtp_forward(hidden[:, :length], ids[:, k:], depth=k - 1,
                                                 seq_idx=seq_idx[:, :length])
            ce_k = _ce_sum(logits_k, target)
            mtp_total = mtp_total + ce_k / n
            metrics[f"mtp{k}_ce_sum"] = float(ce_k.detach())
        loss = loss + mtp_weight * mtp_total / mtp_depth
    return loss, metrics


def routing_collapse(loads: dict[int, float], bounds: dict[int, float], streaks: dict[int, int],
                     steps: int = 20, share: float = 0.9) -> list[str]:
    """Notes naming the MoE layers whose busiest expert has taken at least `share` of the most it can
    (every token: experts / top_k times the mean load) in `steps` balancing updates in a row: the
    router then sends nearly everything to one expert, and the bias cannot recover it. `streaks`
    carries the counts from call to call; a layer is named once, when its streak reaches `steps`."""
    notes = []
    for i, load in loads.items():
        streaks[i] = streaks.get(i, 0) + 1 if load >= share * bounds[i] else 0
        if streaks[i] == steps:
            notes.append(f"MoE layer {i}'s routing has collapsed: for {steps} steps its busiest expert took "
                         f"{load:.2f}x the mean load (every token would be {bounds[i]:.2f}x); check the learning "
                         f"rate, the optimizer and bias_update_rate")
    return notes


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, group=None) -> dict:
    """The aux-loss-free balancing step (DeepSeek-V3, Nemotron 3): each router's selection bias moves by
    `rate` x sign(mean load - load), re-centred to mean zero; the load counts restart. With a
    data-parallel `group` the counts are summed over it first (every rank then moves alike). Returns
    the max/mean load of each MoE layer since the previous update."""
    out = {}
    for i, router in enumerate(routers(model)):
        load = router.tokens_per_expert
        if group is not None:
            dist.all_reduce(load, group=group)
        if load.sum() == 0:
            continue
        out[i] = float(load.max() / load.mean())
        if rate > 0:
            delta = rate * torch.sign(load.mean() - load)
            router.e_score_correction_bias += delta - delta.mean()
        load.zero_()
    return out
