"""MTP speculative decoding: the model's multi-token-prediction block drafts k tokens per row, one
target forward verifies [token, drafts], the accepted prefix is kept and the Mamba state is rolled
back from per-token snapshots. The engine calls `draft_and_verify` for a round when every running
row can speculate exactly (`speculation_ok`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemotron.inference.constraint import Constraint
from nemotron.inference.requests import Request
from nemotron.layers.cache import HybridCache


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_length(self) -> float:
        """Tokens produced per target forward in speculative rounds: 1 + accepted / rounds."""
        return 1.0 + self.accepted / self.rounds if self.rounds else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self, speculative_tokens: int) -> dict | None:
        """The acceptance figures as a dict (None when no round ran)."""
        if not self.rounds:
            return None
        return {"draft_tokens_per_step": speculative_tokens, "rounds": self.rounds, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "acceptance_length": self.acceptance_length}


@dataclass
class OwedPairs:
    """What one row's MTP cache has not consumed yet: the target's final hidden states at positions
    t ([1, n, H]) and the tokens at t + 1 ([1, n]) that the MTP block reads beside them."""

    hidden: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def after_prompt(cls, hidden: torch.Tensor, prompt_ids: list[int]) -> "OwedPairs":
        """A prefilled prompt owes every position but the last, whose next token is not chosen yet."""
        return cls(hidden, torch.tensor([prompt_ids[1:]], dtype=torch.long, device=hidden.device))

    def extended(self, hidden: torch.Tensor, token: torch.Tensor) -> "OwedPairs":
        """After a plain decode step: the step's token pairs with the hidden state before it."""
        return OwedPairs(torch.cat([self.hidden, hidden], 1), torch.cat([self.tokens, token.view(1, 1)], 1))


def check_speculation(model: nn.Module, speculative_tokens: int) -> None:
    """Speculation needs the model's MTP block."""
    if speculative_tokens < 0:
        raise ValueError("speculative_tokens must be >= 0")
    if speculative_tokens and model.mtp is None:
        raise ValueError("speculative decoding needs a checkpoint with MTP weights (num_nextn_predict_layers > 0)")


def speculation_ok(req: Request) -> bool:
    """MTP speculation is exact for greedy rows without penalties, forced tokens or logprobs."""
    p = req.params
    return (p.greedy and not req.forced and not p.logprobs and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and (req.thinking_budget is None or req.thinking_budget.closed))


def extend_owed(owed: list[OwedPairs], hidden: torch.Tensor, tokens: torch.Tensor) -> None:
    """After a plain decode step of every row (hidden [B, 1, H], tokens [B])."""
    for row in range(len(owed)):
        owed[row] = owed[row].extended(hidden[row:row + 1], tokens[row])


def draft_and_verify(model: nn.Module, k: int, cache: HybridCache, tokens: torch.Tensor, owed: list[OwedPairs],
                     stats: SpecStats, constraints: list[Constraint | None] | None = None,
                     ) -> tuple[list[list[int]], torch.Tensor, list[OwedPairs]]:
    """Draft k tokens per row with the MTP block, verify [token, drafts] in one target forward, keep
    the accepted prefix. Returns (the accepted drafts per row, the logits that follow each row's last
    kept token, the rows' new owed pairs). `constraints`: per row, a grammar the kept drafts must
    follow (after `tokens`, which it has seen): a row keeps no draft past the first one its grammar
    refuses, and greedy under the grammar agrees with the target's argmax wherever that is allowed."""
    device = tokens.device
    drafts = []
    for row in range(tokens.shape[0]):
        view = cache if tokens.shape[0] == 1 else cache.rows(row)
        # pairs still owed to the MTP cache, the newest ending with this step's token
        hidden = owed[row].hidden
        next_ids = torch.cat([owed[row].tokens, tokens[row:row + 1, None]], 1)[:, -hidden.shape[1]:]
        logits_d, hd = model.mtp_forward(hidden, next_ids, cache=view, logits_to_keep=1)
        row_drafts = [int(logits_d[0, -1].argmax())]
        for _ in range(k - 1):
            logits_d, hd = model.mtp_forward(hd[:, -1:], torch.tensor([[row_drafts[-1]]], device=device), cache=view,
                                             logits_to_keep=1)
            row_drafts.append(int(logits_d[0, -1].argmax()))
        view.mtp_seq_lens -= k - 1  # recursive drafts used MTP hidden states: recomputed next round
        drafts.append(row_drafts)
    block = torch.cat([tokens[:, None], torch.tensor(drafts, device=device)], dim=1)      # [B, k+1]
    h = model.hidden_states(block, cache, mode="verify")   # Mamba state kept after every token, for rollback
    all_logits = model.lm_head(h).float()                                                # [B, k+1, V]
    preds = all_logits.argmax(-1).tolist()
    keep, accepted, new_owed = [], [], []
    for row, row_drafts in enumerate(drafts):
        c = constraints[row] if constraints is not None else None
        limit = k if c is None else c.valid_prefix(row_drafts)
        n = 0
        while n < limit and preds[row][n] == row_drafts[n]:
            n += 1
        keep.append(n + 1)
        accepted.append(row_drafts[:n])
        stats.drafted += k
        stats.accepted += n
        new_owed.append(OwedPairs(h[row:row + 1, :n + 1], block[row:row + 1, 1:n + 1]))
    stats.rounds += len(drafts)
    cache.rollback(keep, k + 1)
    return accepted, all_logits[torch.arange(len(keep)), torch.tensor(keep) - 1], new_owed
