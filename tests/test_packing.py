"""Packed training sequences (`seq_idx`): a row holding several documents gives each document exactly
the logits it gets alone — no attention, conv or SSM state crosses a boundary, rotary positions
restart — and gradients flow through the packed forward."""

from __future__ import annotations

import torch

from nemotron.config import Nemotron4Config
from nemotron.config.presets import toy_super_config
from nemotron.models.init import init_weights_
from nemotron.models.decoder import packed_positions
from nemotron.models import build_model

from conftest import randomize_

LENGTHS = [5, 30, 1, 40, 12]   # boundaries inside and at the edges of 32-token Mamba chunks


def _packed(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return docs, torch.cat(docs)[None], seq_idx


def _check(model, vocab: int) -> None:
    docs, ids, seq_idx = _packed(LENGTHS, vocab)
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)[0]
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            assert (packed[start:start + len(doc)] - alone).abs().max() <= 1e-4
            start += len(doc)
        # without seq_idx the documents do see each other (the check above can fail)
        assert (model(ids)[0, 5:35] - model(docs[1][None])[0]).abs().max() > 1e-3


def test_packed_nemotron_h_matches_documents_alone():
    config = toy_super_config()
    model = randomize_(init_weights_(build_model(config), config, seed=0), seed=1, scale=1.0).eval()
    _check(model, config.vocab_size)


def test_packed_nemotron4_restarts_rotary_positions():
    config = Nemotron4Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = randomize_(init_weights_(build_model(config), config, seed=0), seed=2, scale=1.0).eval()
    _check(model, config.vocab_size)


def test_packed_positions():
    seq = torch.tensor([[0, 0, 0, 1, 2, 2], [3, 3, 3, 3, 3, 3]])
    assert packed_positions(seq).tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]]


def test_packed_forward_is_differentiable():
    config = toy_super_config()
    model = init_weights_(build_model(config), config, seed=0).train()
    _, ids, seq_idx = _packed(LENGTHS, config.vocab_size, seed=1)
    loss = torch.nn.functional.cross_entropy(model(ids, seq_idx=seq_idx)[0, :-1], ids[0, 1:])
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "mtp" not in n and "bias" not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
