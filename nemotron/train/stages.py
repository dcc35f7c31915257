"""What one optimizer step computes, per training stage.

Each stage draws its data for the step, runs forward and backward over its micro-batches (the
gradients accumulate in the model) and returns the step's metrics; the trainer does the rest
(clipping, the optimizer, the balancing update, logging, checkpoints). A stage's `state_dict` is its
data position, so that a resume continues exactly.

- `LMStage` (pretrain, sft): packed next-token loss + MTP + MoE aux loss.
- `DPOStage`: direct preference optimisation against a frozen copy of the starting model.
- `GRPOStage`: groups of samples from the project's own engine, verifiable rewards, group-normalised
  advantages, asymmetric clipping, token-level loss averaging, optional KL to the reference.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.chat.template import prepare_chat
from nemotron.chat.turn import ChatTurn
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request
from nemotron.inference.sampling import SamplingParams
from nemotron.train.data import IGNORE, PACKINGS, Batch, DataStream, Example, chat_example, chat_examples, collate, \
    pack, read_jsonl, text_examples
from nemotron.train.objectives import count_sequences, lm_loss
from nemotron.train.rewards import REWARDS


class IndexStream:
    """Indices 0..n-1 in batches, reshuffled every epoch by (seed, epoch); resumable."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n == 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.batch = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        if self.batch * self.batch_size >= self.n:
            self.epoch, self.batch = self.epoch + 1, 0
        order = self._order()
        out = order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        self.batch += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])


def _pad_id(tokenizer) -> int:
    pad = tokenizer.config.get("pad_token")
    return (tokenizer.token_id(pad) if isinstance(pad, str) else None) or 0


def token_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[B, L] log-prob of each label under the model (meaningless where the label is IGNORE)."""
    logits = model(batch.input_ids, seq_idx=batch.seq_idx).float()
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1).clamp(min=0),
                            reduction="none").view(batch.labels.shape)


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the scored tokens' log-probs for every packed sequence of the batch, in row-major order
    (row 0's sequences, then row 1's, ...), and each sequence's scored-token count."""
    labels = batch.labels
    scored = labels != IGNORE
    token_lp = token_logps(model, batch) * scored
    width, dev = int(batch.seq_idx.max()) + 1, labels.device
    flat_seq = (batch.seq_idx + torch.arange(labels.shape[0], device=dev)[:, None] * width).reshape(-1)
    sums = torch.zeros(labels.shape[0] * width, device=dev).index_add(0, flat_seq, token_lp.reshape(-1))
    counts = torch.zeros(labels.shape[0] * width, device=dev).index_add(0, flat_seq, scored.reshape(-1).float())
    # keep the sequences that exist (padding is the last sequence of a row and scores nothing)
    present = torch.zeros(labels.shape[0] * width, dtype=torch.bool, device=dev)
    present[flat_seq] = True
    real = present & (counts > 0)
    return sums[real], counts[real]


# --------------------------------------------------------------------------------------------------
# pretraining and SFT
# --------------------------------------------------------------------------------------------------


class LMStage:
    """shard = (rank, world) for data parallelism: every rank packs the same global batch of
    batch_size x world rows and takes every world-th row; the loss is scaled by the global count of
    scored tokens (x world under FSDP, which averages gradients), so the step equals one process
    training on the whole batch."""

    def __init__(self, cfg, model: nn.Module, tokenizer, shard: tuple[int, int] = (0, 1)) -> None:
        self.cfg, (self.rank, self.world) = cfg, shard
        examples = text_examples(cfg.data, tokenizer) if cfg.stage == "pretrain" else \
            chat_examples(cfg.data, tokenizer, cfg.template_kwargs)
        self.stream = DataStream(examples, cfg.seq_len, cfg.batch_size * self.world, cfg.seed, _pad_id(tokenizer),
                                 open_rows=PACKINGS[cfg.packing])

    def _mine(self, batch: Batch) -> Batch:
        rows = slice(self.rank, None, self.world)
        return Batch(batch.input_ids[rows], batch.labels[rows], batch.seq_idx[rows])

    def step(self, model: nn.Module, autocast) -> dict:
        cfg = self.cfg
        global_micro = [next(self.stream) for _ in range(cfg.grad_accum)]
        n_targets = sum(b.num_targets for b in global_micro)
        n_sequences = sum(count_sequences(b.seq_idx) for b in global_micro)
        micro = [self._mine(b) for b in global_micro] if self.world > 1 else global_micro
        factor = self.world if self.world > 1 and cfg.parallel == "fsdp" else 1
        sums: dict[str, float] = {}
        for batch in micro:
            if batch.input_ids.shape[0] == 0:
                continue
            with autocast:   # the aux loss is per sequence: its mean over ranks is already the batch's
                loss, m = lm_loss(model, batch, cfg.mtp_weight, cfg.mtp_depth, cfg.aux_loss_coeff / factor, n_targets,
                                  n_sequences)
            (loss * factor).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        if self.world > 1:   # the logged figures are the whole step's
            import torch.distributed as dist

            totals = torch.tensor([sums.get(k, 0.0) for k in sorted(sums)], dtype=torch.float64)
            dist.all_reduce(totals)
            sums = dict(zip(sorted(sums), totals.tolist()))
        record = {"loss": sums.get("ce_sum", 0.0) / max(1, n_targets), "targets": n_targets,
                  "tokens": sum(int(b.input_ids.numel()) for b in micro)}
        for k in range(1, cfg.mtp_depth + 1):
            if f"mtp{k}_ce_sum" in sums:
                record[f"mtp{k}_loss"] = sums[f"mtp{k}_ce_sum"] / max(1, n_targets)
        if "aux_sum" in sums:
            record["aux_loss"] = sums["aux_sum"] / max(1, n_sequences)
        return record

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------


def preference_pairs(paths: list[str], tokenizer, template_kwargs: dict | None = None) -> list[tuple[Example, Example]]:
    """JSONL records {"messages": [prompt turns], "chosen": assistant message, "rejected": assistant
    message, "tools"?, "enable_thinking"?}; the loss covers only the final (chosen/rejected) turn."""
    pairs = []
    for path in paths:
        for n, record in enumerate(read_jsonl(path), 1):
            try:
                sides = []
                for key in ("chosen", "rejected"):
                    reply = record.get(key)
                    if isinstance(reply, str):
                        reply = {"role": "assistant", "content": reply}
                    if not isinstance(reply, dict):
                        raise ValueError(f"'{key}' must be an assistant message or a string")
                    convo = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
                    convo["messages"] = list(record.get("messages") or []) + [dict(reply, role="assistant")]
                    sides.append(chat_example(tokenizer, convo, template_kwargs, last_turn_only=True)[-1])
                pairs.append((sides[0], sides[1]))
            except ValueError as e:
                raise ValueError(f"{path}: record {n}: {e}") from None
    return pairs


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al.) with conservative label smoothing: per pair,
    -(1-e) log sigmoid(beta m) - e log sigmoid(-beta m), m = (pi_c - pi_r) - (ref_c - ref_r)."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    rewards_c, rewards_r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return loss.mean(), {"reward_margin": float((rewards_c - rewards_r).mean().detach()),
                         "accuracy": float((rewards_c > rewards_r).float().mean())}


class DPOStage:
    def __init__(self, cfg, model: nn.Module, tokenizer) -> None:
        self.cfg = cfg
        self.pairs = preference_pairs(cfg.data, tokenizer, cfg.template_kwargs)
        self.index = IndexStream(len(self.pairs), cfg.batch_size, cfg.seed)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)   # the starting policy, frozen

    def step(self, model: nn.Module, autocast) -> dict:
        cfg = self.cfg
        metrics: dict[str, float] = {"loss": 0.0, "reward_margin": 0.0, "accuracy": 0.0, "tokens": 0}
        for _ in range(cfg.grad_accum):
            chosen_rejected = [ex for i in self.index.next() for ex in self.pairs[i]]
            rows = pack(chosen_rejected, cfg.seq_len)
            if sum(len(r) for r in rows) != len(chosen_rejected):
                raise ValueError("a preference example is longer than seq_len")
            batch = collate(rows)
            with autocast:
                logp, _ = sequence_logps(model, batch)
                with torch.no_grad():
                    ref, _ = sequence_logps(self.reference, batch)
                loss, m = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], cfg.dpo_beta,
                                   cfg.dpo_label_smoothing)
            (loss / cfg.grad_accum).backward()
            metrics["loss"] += float(loss.detach()) / cfg.grad_accum
            metrics["reward_margin"] += m["reward_margin"] / cfg.grad_accum
            metrics["accuracy"] += m["accuracy"] / cfg.grad_accum
            metrics["tokens"] += int(batch.input_ids.numel())
        return metrics

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[prompts, group] rewards -> (r - group mean) / (group std + eps); a group where every sample
    scored the same has no signal (all zeros)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.28, ref_logp: torch.Tensor | None = None,
                    kl_coeff: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate per token (DAPO's clip-higher: ratio in [1-clip_low, 1+clip_high]),
    averaged over all scored tokens of the batch (token-level, not per sequence), with an optional
    k3 KL estimate to a reference policy. logp/old_logp/ref_logp/mask: [N, T]; advantages [N]."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    per_token = -surrogate
    metrics = {"clip_fraction": float(((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()[mask].mean())
               if mask.any() else 0.0}
    if ref_logp is not None and kl_coeff > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + kl_coeff * kl
        metrics["kl"] = float(kl.detach()[mask].mean()) if mask.any() else 0.0
    return (per_token * mask).sum() / mask.sum().clamp(min=1), metrics


class GRPOStage:
    """Prompts {"messages": [...], "answer": ..., "verifier"?: number|exact|contains, "tools"?,
    "enable_thinking"?}; each step samples `group_size` answers per prompt with the engine, scores the
    parsed answer (content) with the verifier, and takes a clipped policy-gradient step.
    `rewards` (Python API) adds verifiers by name. One policy update per batch of samples (on-policy:
    the ratio starts at 1, so the clip bounds act as in DAPO once the update moves the policy)."""

    def __init__(self, cfg, model: nn.Module, tokenizer,
                 rewards: dict[str, Callable[[str, dict], float]] | None = None) -> None:

        self.cfg, self.tokenizer = cfg, tokenizer
        self.rewards = {**REWARDS, **(rewards or {})}
        self.records = [r for path in cfg.data for r in read_jsonl(path)]
        self.prompts = []
        for n, r in enumerate(self.records, 1):
            verifier = r.get("verifier", cfg.grpo_reward)
            if verifier not in self.rewards:
                raise ValueError(f"prompt {n}: unknown verifier {verifier!r} (known: {', '.join(self.rewards)})")
            self.prompts.append(prepare_chat(tokenizer, r["messages"], r.get("tools"),
                                             r.get("enable_thinking", True), **cfg.template_kwargs))
        self.index = IndexStream(len(self.records), cfg.batch_size, cfg.seed)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coeff > 0 else None
        self.step_count = 0

    def _generate(self, model: nn.Module, indices: list[int]) -> list[tuple[int, list[int], float]]:

        cfg = self.cfg
        was_training = model.training
        model.eval()
        stop = {self.tokenizer.eos_token_id} - {None}
        longest = max(len(self.prompts[i].ids) for i in indices) + cfg.max_new_tokens
        engine = Engine(model, self.tokenizer, stop, max_batch=min(64, len(indices) * cfg.group_size),
                        max_len=longest, prefill_chunk=512, max_waiting=len(indices) * cfg.group_size)
        reqs = []
        for i in indices:
            for j in range(cfg.group_size):
                seed = (cfg.seed * 1_000_003 + self.step_count * 10_007 + i * 101 + j) % (2 ** 63)
                reqs.append((i, Request(list(self.prompts[i].ids), SamplingParams(
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed))))
        for _ in engine.run([r for _, r in reqs]):
            pass
        model.train(was_training)
        out = []
        for i, r in reqs:
            p = self.prompts[i]
            with warnings.catch_warnings():  # early policies write stray tags; the reward judges the answer
                warnings.simplefilter("ignore")
                result = ChatTurn(p, self.records[i].get("tools")).result_for(r)   # as chat() and the server read it
            verifier = self.rewards[self.records[i].get("verifier", cfg.grpo_reward)]
            out.append((i, list(r.output_ids), float(verifier(result.content or "", self.records[i]))))
        return out

    def _informative(self, samples: list) -> list[list]:
        """The groups (consecutive group_size samples of one prompt) whose rewards differ."""
        g = self.cfg.group_size
        groups = [samples[j:j + g] for j in range(0, len(samples), g)]
        return [group for group in groups if len({s[2] for s in group}) > 1]

    def step(self, model: nn.Module, autocast) -> dict:
        cfg = self.cfg
        indices = self.index.next()
        samples = self._generate(model, indices)
        if cfg.dynamic_sampling:
            # DAPO's dynamic sampling: a group whose samples all score alike teaches nothing; draw up
            # to `dynamic_sampling` more batches of prompts and keep batch_size groups that differ
            groups = self._informative(samples)
            for _ in range(cfg.dynamic_sampling):
                if len(groups) >= len(indices):
                    break
                groups += self._informative(self._generate(model, self.index.next()))
            if groups:
                groups = groups[:len(indices)]
                samples = [s for group in groups for s in group]
                indices = [group[0][0] for group in groups]
        self.step_count += 1
        rewards = torch.tensor([s[2] for s in samples]).view(len(indices), cfg.group_size)
        advantages = group_advantages(rewards).reshape(-1)
        examples = [Example(list(self.prompts[i].ids) + ids, [False] * len(self.prompts[i].ids) + [True] * len(ids))
                    for i, ids, _ in samples]
        keep = [k for k, a in enumerate(advantages.tolist()) if a != 0.0 and len(examples[k].ids) <= cfg.seq_len]
        metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "samples_with_signal": len(keep), "tokens": sum(len(e.ids) for e in examples), "loss": 0.0}
        if not keep:
            return metrics
        rows = [[examples[k]] for k in keep]   # one sample per row: the token log-probs line up with it
        batch = collate(rows)
        adv = advantages[keep]
        mask = batch.labels != IGNORE
        with torch.no_grad():
            ref = token_logps(self.reference, batch) if self.reference is not None else None
        with autocast:
            logp = token_logps(model, batch)
            loss, m = grpo_token_loss(logp, logp.detach(), adv, mask, cfg.clip_low, cfg.clip_high, ref, cfg.kl_coeff)
        loss.backward()
        metrics["loss"] = float(loss.detach())
        metrics.update(m)
        return metrics

    def state_dict(self) -> dict:
        return {**self.index.state_dict(), "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)
        self.step_count = int(state.get("step_count", 0))


def make_stage(cfg, model: nn.Module, tokenizer, shard: tuple[int, int] = (0, 1), **kwargs: Any):
    if cfg.stage in ("pretrain", "sft"):
        return LMStage(cfg, model, tokenizer, shard)
    if cfg.stage == "dpo":
        return DPOStage(cfg, model, tokenizer)
    if cfg.stage == "grpo":
        return GRPOStage(cfg, model, tokenizer, **kwargs)
    raise ValueError(f"unknown stage {cfg.stage!r}")
