"""2 gloo processes: FSDP2, tensor parallel and expert parallel training on the tiny Nemotron 3
Super layout (Mamba, attention, LatentMoE, MTP), and FSDP2 / tensor parallel on a tiny tied-head Llama
(SwiGLU split column/row-wise), match single-process training within 1e-5; so does FSDP2 with
Muon, which orthogonalises each sharded matrix whole."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

import distributed_worker


@pytest.mark.parametrize("kind", ["fsdp", "tp", "ep", "fsdp-llama", "tp-llama", "fsdp-muon"])
def test_parallel_training_matches_single_process(tmp_path, kind):
    result = tmp_path / "result.txt"
    mp.spawn(distributed_worker.run, args=(2, f"file://{tmp_path / 'rendezvous'}", kind, str(result)), nprocs=2,
             join=True)
    worst, moved = map(float, result.read_text().split())
    assert moved > 1e-3            # the steps changed the parameters ...
    assert worst <= 1e-5, worst    # ... and the parallel run changed them identically
