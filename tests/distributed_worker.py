"""Worker for tests/test_distributed.py: one process of a 2-rank gloo group. Trains a few steps with
one kind of parallelism ("tp", "fsdp", "ep"; "tp-llama" / "fsdp-llama" on a tiny tied-head Llama
instead of the tiny Super layout) and compares the full parameters with a single-process run of the
same steps (computed in every rank). SGD with momentum, so that the parameters differ exactly as much as
the gradients do (Adam's normalisation would blow float noise on near-zero gradients up to lr); "-muon"
trains the matrices alone with Muon instead (the rest frozen), whose step orthogonalises each sharded
matrix whole."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemotron.config import LlamaConfig
from nemotron.config.presets import toy_super_config
from nemotron.models.init import init_weights_
from nemotron.models import build_model
from nemotron.train import lm_loss, update_expert_bias
from nemotron.train.data import Batch
from nemotron.train.optim import make_optimizer as nemotron_optimizer, matrix_parameters
from nemotron.train.parallel import (all_reduce_grads, apply_ep, apply_fsdp, apply_tp, expert_parameters,
                                     full_state_dict)

STEPS, RATE, LR, MUON_LR = 3, 1e-2, 0.5, 1e-2


def make_optimizer(model, lr, muon=False):
    if muon:
        return nemotron_optimizer(model, MUON_LR, kind="muon")
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)


def _model(arch: str = "super", muon: bool = False):
    model = _build(arch)
    if muon:
        matrices = {id(p) for p in matrix_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in matrices)
    return model


def _build(arch: str):
    if arch == "llama":   # GQA with head_dim != hidden / heads, SwiGLU, tied embeddings
        config = LlamaConfig(vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=24, intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True)
        config.validate()
    else:
        config = toy_super_config()
    return init_weights_(build_model(config), config, seed=0).train()


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, 260, (4, 24), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)
        out.append(Batch(ids, labels, torch.zeros_like(ids)))
    return out


def _rows(batch: Batch, rank: int, world: int) -> Batch:
    sl = slice(rank * batch.input_ids.shape[0] // world, (rank + 1) * batch.input_ids.shape[0] // world)
    return Batch(batch.input_ids[sl], batch.labels[sl], batch.seq_idx[sl])


def _step(model, opt, batch, scale_tokens, loss_factor=1.0, after_backward=None, group=None):
    opt.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, batch, mtp_weight=0.3, loss_scale_tokens=scale_tokens)
    (loss * loss_factor).backward()
    if after_backward is not None:
        after_backward()
    opt.step()
    update_expert_bias(model, RATE, group)


def run(rank: int, world: int, init: str, kind: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    kind, *options = kind.split("-")
    arch, muon = "llama" if "llama" in options else "super", "muon" in options
    reference = _model(arch, muon)
    ref_opt = make_optimizer(reference, LR, muon)
    for batch in _batches():
        _step(reference, ref_opt, batch, batch.num_targets)
    expected = reference.state_dict()

    model = _model(arch, muon)
    if kind == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        apply_tp(model, init_device_mesh("cpu", (world,)))
        opt = make_optimizer(model, LR, muon)
        for batch in _batches():      # every tensor-parallel rank sees the whole batch
            _step(model, opt, batch, batch.num_targets)
        got = full_state_dict(model)
    elif kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        apply_fsdp(model, init_device_mesh("cpu", (world,)))
        opt = make_optimizer(model, LR, muon)
        for batch in _batches():      # data parallel: FSDP averages the ranks' gradients
            _step(model, opt, _rows(batch, rank, world), batch.num_targets, loss_factor=world,
                  group=dist.group.WORLD)
        got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    elif kind == "ep":
        apply_ep(model)
        opt = make_optimizer(model, LR, muon)
        experts = expert_parameters(model)
        for batch in _batches():      # experts' gradients arrive whole through the all-to-all
            _step(model, opt, _rows(batch, rank, world), batch.num_targets,
                  after_backward=lambda: all_reduce_grads(model, skip=experts), group=dist.group.WORLD)
        got = full_state_dict(model)
    else:
        raise ValueError(kind)
    worst = max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected
                if not k.endswith("tokens_per_expert"))
    start = _model(arch).state_dict()
    moved = max(float((expected[k].float() - start[k].float()).abs().max()) for k in expected
                if not k.endswith("tokens_per_expert"))
    if rank == 0:
        with open(result_path, "w") as f:
            f.write(f"{worst} {moved}\n")
    dist.barrier()
    dist.destroy_process_group()
