"""`nn.Linear` with a faster CPU matmul for inference.

PyTorch runs fp32 `F.linear` on CPU through MKL, which uses AVX-512 only on Intel CPUs. On an
AVX-512 AMD CPU, oneDNN (also in every PyTorch CPU build) multiplies about 2x faster for prefill
and batched decode, and reads a large weight faster at batch 1 (BENCHMARKS.md). oneDNN costs ~10 us
more per call, so small products (a tiny model's decode, cache-resident) stay on MKL. On an Intel
CPU, where MKL runs its AVX-512 kernels, oneDNN wins only a large weight at a few rows (batched
decode) and loses prefill and a single row (BENCHMARKS.md), so only those products take it there.

oneDNN's op has no autograd: anything that records gradients takes `F.linear`.

Decode (at most kernels.MAX_ROWS rows) takes nemotron.kernels' matrix-vector product where
`kernels.serves` says it is faster: bf16 weights (on AVX512-BF16 through VDPBF16PS, elsewhere in
fp32 from the bf16 weight, fp32 sums either way; torch's bf16 product is bound by its arithmetic at
a few rows, 1.4-2x slower), and fp32 weights on AVX-512 up to 15 rows, which the kernels stream from
memory faster than MKL or oneDNN (BENCHMARKS.md). On x86 CPUs
without bf16 instructions, torch's bf16 GEMM is emulated (10x slower than fp32 at 512 rows on the
AVX2 path): larger bf16 products run in fp32 there and are rounded back."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from nemotron import kernels

# oneDNN's extra per-call cost pays off once rows x weight elements reach MIN_WORK (crossovers
# measured alone: a 1M-element weight at one row, 74k at 16 rows, 33k at 32). Below MIN_ROWS only a
# weight of MIN_WORK elements qualifies: in a tiny model's 8-row decode, its 174k-element in_proj
# measured faster alone on oneDNN but made the whole step 6% slower.
MIN_WORK, MIN_ROWS = 1 << 20, 16

# on an Intel CPU: the row counts at which a weight of MIN_WORK elements takes oneDNN
INTEL_ROWS = range(4, 17)


def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it ("GenuineIntel", "AuthenticAMD"; "" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# NEMOTRON_ONEDNN=0 keeps every product on F.linear (A/B measurements)
_ONEDNN = (os.environ.get("NEMOTRON_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
           and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
_MKL_AVX512 = cpu_vendor() == "GenuineIntel"


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes oneDNN for this input and weight (CPU fp32 inference, AVX-512)."""
    if not (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.compiler.is_compiling() or x.numel() == 0:
        return False
    rows, size = x.numel() // x.shape[-1], weight.numel()
    if _MKL_AVX512:
        return size >= MIN_WORK and rows in INTEL_ROWS
    return size >= MIN_WORK or (rows >= MIN_ROWS and rows * size >= MIN_WORK)


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes nemotron.kernels' product (CPU decode: `kernels.serves`)."""
    return weight.dim() == 2 and kernels.serves(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through nemotron.kernels or oneDNN where `use_kernel` / `use_onednn` say it is
    faster."""
    if use_kernel(x, weight):
        y = kernels.gemv(x, weight)
        return y if bias is None else y + bias
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.cpu_isa() in (kernels.AVX2, kernels.AVX512):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    if use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """The model's linear layer: `nn.Linear` (same parameters and state dict) calling `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
