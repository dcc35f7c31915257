"""Matrix-vector kernels for CPU decode (`gemv.cpp`): a few rows of activations against a weight read
in its stored format (fp32, bf16, FP8 E4M3, NVFP4), each row optionally against its own expert of a
stack. torch's own one-row kernels are bound by their arithmetic, not by memory (BENCHMARKS.md):
oneDNN's bf16 product, and the int8 / int4 kernels that quantized weights had to be re-rounded for.
NVFP4 multiplies integers: its codes (times 2) against the activations rounded to int8 per block of
16 (W4A8, `quantize_blocks`).

The C++ is compiled once per machine at first use by torch's extension builder (~20 s, a C++
compiler needed; cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). Where it cannot
be built, `available()` is False and callers keep their torch path, with one warning.

Which instructions run is chosen here from the CPU's features: `cpu_isa()` follows torch's own dispatch
(so ATEN_CPU_CAPABILITY=avx2 forces the AVX2 kernels too) and the kernel flags /proc/cpuinfo lists.
NEMOTRON_CPU_KERNELS=0 turns the kernels off (every caller's torch path)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings

import torch

from nemotron.errors import NemotronWarning

AVX2, AVX512, AVX512_BF16 = 0, 1, 2
ISA_NAMES = {AVX2: "AVX2", AVX512: "AVX-512", AVX512_BF16: "AVX-512 with BF16 and VNNI"}
MAX_ROWS = 16   # rows up to which these kernels beat a GEMM on the decoded weight
ROW_GROUP = 4   # NVFP4 weight rows interleaved in `nvfp4_i8_order` (gemv.cpp's kGroup)

_ENABLED = os.environ.get("NEMOTRON_CPU_KERNELS", "1") != "0"
_SOURCES = [os.path.join(os.path.dirname(__file__), name) for name in ("gemv.cpp", "mamba_step.cpp")]
_NAME = "nemotron_cpu_kernels"
log = logging.getLogger(__name__)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _detect_isa() -> int | None:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if capability.startswith("AVX512") and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c"} <= flags:
        return AVX512_BF16 if {"avx512_bf16", "avx512_vnni"} <= flags else AVX512
    if capability.startswith(("AVX2", "AVX512")) and {"avx2", "fma", "f16c"} <= flags:
        return AVX2
    return None


_ISA = _detect_isa()
_BUILT: bool | None = None   # built and loaded (decided at the first use)


def cpu_isa() -> int | None:
    """The best instruction set of these kernels this CPU runs (AVX2, AVX512, AVX512_BF16), or None."""
    return _ISA


def _built_at() -> float | None:
    """The modification time of the kernels' cached build, or None (none yet, or not found)."""
    from torch.utils import cpp_extension

    try:
        folder = cpp_extension._get_build_directory(_NAME, verbose=False)
        return os.stat(os.path.join(folder, f"{_NAME}.so")).st_mtime
    except (AttributeError, OSError):
        return None


def _load() -> bool:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("no C++ compiler on PATH: CPU decode runs torch's kernels (slower for bf16 and quantized "
                      "weights); install one (g++) for nemotron's", NemotronWarning, stacklevel=3)
        return False
    from torch.utils import cpp_extension

    start, before = time.perf_counter(), _built_at()
    try:
        cpp_extension.load(name=_NAME, sources=_SOURCES, extra_cflags=["-O3", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # a broken toolchain must not stop inference: the torch path still runs
        warnings.warn(f"building the CPU kernels failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "CPU decode runs torch's kernels", NemotronWarning, stacklevel=3)
        return False
    if _built_at() != before:   # compiled now, not loaded from the cache
        log.info("compiled the CPU decode kernels in %.1f s (once per machine)", time.perf_counter() - start)
    for name in ("gemv", "gemv_fp8_bf16"):
        torch.library.register_fake(f"nemotron_cpu::{name}")(_fake_product)
    torch.library.register_fake("nemotron_cpu::gemv_nvfp4_i8")(_fake_nvfp4_product)
    torch.library.register_fake("nemotron_cpu::mamba_step")(_fake_mamba_step)
    return True


def _fake_product(x: torch.Tensor, w: torch.Tensor, *rest) -> torch.Tensor:
    # the output's shape for torch.compile: one row per input row, N columns (w is [.., N, K or K/2])
    return x.new_empty(x.shape[0], w.shape[-2])


def _fake_nvfp4_product(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, scales: torch.Tensor,
                        *rest) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[-2])   # N: the codes' rows are padded to ROW_GROUP


def _fake_mamba_step(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, *rest) -> torch.Tensor:
    return zxbcdt.new_empty(zxbcdt.shape[0], ssm_state.shape[1] * ssm_state.shape[2])


def available() -> bool:
    """Whether the kernels run here: turned on, an x86-64 CPU with AVX2 at least, built (at the first
    call: a torch.compile trace reads the answer of the eager calls before it)."""
    global _BUILT
    if not _ENABLED or _ISA is None:
        return False
    if _BUILT is None:
        _BUILT = _load()
    return _BUILT


def applies(x: torch.Tensor) -> bool:
    """Whether a product with input x goes through these kernels: CPU inference (nothing records a
    gradient for x), 1 to MAX_ROWS rows."""
    if x.device.type != "cpu" or x.numel() == 0 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return x.numel() // x.shape[-1] <= MAX_ROWS and available()


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` is the faster product of x and a float weight [.., N, K] of its dtype
    (BENCHMARKS.md, `benchmarks/cpu_kernels.py`): bf16 wherever the kernels run (torch's bf16 product
    is bound by its arithmetic at a few rows); fp32 on AVX-512, where ours stream the weight faster
    than MKL (which runs its AVX2 kernels on AMD CPUs) and no slower on Intel, up to MAX_ROWS - 1 rows:
    fp32 products of 16 rows or more stay on torch, whose GEMM gives each row the same result at any
    row count (a prefill's states captured at a prefix-cache block boundary equal, bit for bit, those
    of a prefill that stops there: tests/test_prefix_blocks.py). K a multiple of 32, no gradient
    recorded for the weight, `applies(x)`."""
    if x.dtype != weight.dtype or weight.shape[-1] % 32 or (torch.is_grad_enabled() and weight.requires_grad):
        return False
    if x.dtype == torch.float32:
        return _ISA in (AVX512, AVX512_BF16) and applies(x) and x.numel() // x.shape[-1] < MAX_ROWS
    return x.dtype == torch.bfloat16 and applies(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None, experts: torch.Tensor | None = None,
         isa: int | None = None) -> torch.Tensor:
    """x [.., K] against w [N, K] (or [E, N, K] with `experts`: one expert id per row of x) of fp32,
    bf16 or E4M3 bits (uint8; then `scales` [.., N, segments] fp32, the dequantization scale of each
    equal segment of K): [.., N] in x.dtype. bf16 x and w on AVX512-BF16 multiply in bf16 (VDPBF16PS);
    everything else in fp32, exactly the product with the decoded weight up to summation order."""
    return _shaped(torch.ops.nemotron_cpu.gemv(_rows(x), w, scales, experts, cpu_isa() if isa is None else isa), x)


def gemv_fp8_bf16(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                  experts: torch.Tensor | None = None) -> torch.Tensor:
    """x [.., K] (rounded to bf16) against E4M3 bits in `fp8_bf16_order` [N, K] or [E, N, K]: [.., N]
    in x.dtype, through VDPBF16PS (AVX512-BF16 only); E4M3 subnormals read as 0."""
    return _shaped(torch.ops.nemotron_cpu.gemv_fp8_bf16(_rows(x), w, scales, experts), x)


def gemv_nvfp4_i8(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, scales: torch.Tensor,
                  experts: torch.Tensor | None = None, isa: int | None = None) -> torch.Tensor:
    """x [.., K] against NVFP4 in `nvfp4_i8_order` (codes [.., Np, Kp/2], E4M3 block scales [.., Np, Kp/16];
    Kp: K rounded up to 256, Np: N to ROW_GROUP) and fp32 tensor scales [.., N, 1]: [.., N] in x.dtype, through VPDPBUSD
    (AVX512-VNNI) or VPMADDUBSW (AVX2): W4A8. The weights are exact; x is rounded to int8 per block
    of 16 (`quantize_blocks`: scale amax / 127, nearest, ties to even); the sums are exact integers,
    scaled in fp32."""
    return _shaped(torch.ops.nemotron_cpu.gemv_nvfp4_i8(_rows(x), codes, block_scales, scales, experts,
                                                        cpu_isa() if isa is None else isa), x)


def nvfp4_decode(packed: torch.Tensor, block_scales: torch.Tensor, scale_2: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """`formats.nvfp4_dequantize` (the same fp32 products, then rounded to dtype) for a CPU prefill's
    GEMM, ~15x faster than torch's table lookup (BENCHMARKS.md): packed [.., K/2] bytes, E4M3 block
    scales [.., K/16], scale_2 one value or one per expert of an [E, N, K/2] stack. None where it does
    not run (the kernels off, a CPU without AVX512-BF16, not CPU tensors, another dtype, K not a
    multiple of 16, or a torch.compile trace): the caller's torch path."""
    if (_ISA != AVX512_BF16 or dtype not in (torch.float32, torch.bfloat16) or packed.device.type != "cpu"
            or packed.dim() == 0 or packed.shape[-1] % 8 or torch.compiler.is_compiling() or not available()):
        return None
    if not (scale_2.numel() == 1 or (packed.dim() == 3 and scale_2.numel() == packed.shape[0])):
        return None
    return torch.ops.nemotron_cpu.nvfp4_decode(packed.contiguous(), block_scales.contiguous().view(torch.uint8),
                                               scale_2.reshape(-1), dtype == torch.bfloat16)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `gemv_nvfp4_i8` does to its inputs, in torch (the tests' reference): x [.., K] (K a multiple
    of 16) -> (q [.., K] int8 as float, scale [.., K/16]) with x ~ q * scale per block of 16."""
    blocks = x.float().unflatten(-1, (-1, 16))
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv).flatten(-2), (amax / 127.0).squeeze(-1)


def nvfp4_i8_order(codes: torch.Tensor, block_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes [.., N, K] (0..15, K a multiple of 16) and their E4M3 block scales' bits [.., N, K/16]
    -> what `gemv_nvfp4_i8` reads, [.., Np, Kp/2] and [.., Np, Kp/16] (N zero-padded to Np, a multiple
    of ROW_GROUP rows; K to Kp, a multiple of 256). Each row's 256 columns (16 blocks) as 128 bytes:
    two 64-byte halves L, byte 4j + u = code(block j, 8L + u) | code(block j, 8L + 4 + u) << 4; its
    16 block scales as 16 bytes. The rows of each group of ROW_GROUP are interleaved by those 256
    columns (a group's first 256 columns of every row, then the next 256), so a tile of the group's
    rows reads its codes and its block scales as two sequential streams."""
    *lead, n, k = codes.shape
    pad, rows = -k % 256, -n % ROW_GROUP
    chunks = (k + pad) // 256
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad, 0, rows)).reshape(*lead, n + rows, chunks, 16, 2, 2, 4)
    c = c.permute(*range(len(lead) + 2), -3, -4, -1, -2)                   # [.., rows, chunks, L, block j, u, nibble]
    packed = (c[..., 0] | (c[..., 1] << 4)).reshape(*lead, (n + rows) // ROW_GROUP, ROW_GROUP, chunks, 128)
    scales = torch.nn.functional.pad(block_scales.view(torch.uint8), (0, pad // 16, 0, rows))
    scales = scales.reshape(*lead, (n + rows) // ROW_GROUP, ROW_GROUP, chunks, 16)
    return (packed.transpose(-3, -2).reshape(*lead, n + rows, chunks * 128).contiguous(),
            scales.transpose(-3, -2).reshape(*lead, n + rows, chunks * 16).contiguous())


def fp8_bf16_order(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bits [.., K] (K a multiple of 64) in the order `gemv_fp8_bf16` reads: in each 64, the
    byte unpacks' order (stored[16j + 8h + t] = w[32h + 8j + t])."""
    *lead, k = q.shape
    return q.reshape(*lead, k // 64, 2, 4, 8).transpose(-3, -2).reshape(*lead, k).contiguous()


def fuses_mamba_step(x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> bool:
    """Whether `mamba_step` runs a Mamba-2 decode step of the layer input x [b, 1, H] with these states:
    CPU inference, fp32 or bf16 activations and conv state, an fp32 SSM state (a low-precision one is
    rounded by the torch path's own rules), contiguous states, the state size a multiple of 16."""
    return (x.dtype in (torch.float32, torch.bfloat16) and conv_state.dtype in (torch.float32, torch.bfloat16)
            and ssm_state.dtype == torch.float32 and ssm_state.shape[-1] % 16 == 0
            and conv_state.is_contiguous() and ssm_state.is_contiguous() and applies(x))


def mamba_step(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
               conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
               norm_weight: torch.Tensor, groups: int, norm_groups: int, dt_limit: tuple[float, float],
               eps: float, isa: int | None = None) -> torch.Tensor:
    """One Mamba-2 decode step after in_proj (`Mamba2Mixer.reference_step`'s math, mamba_step.cpp):
    zxbcdt [b, D] -> out_proj's input [b, inner] in zxbcdt's dtype; the conv and SSM states updated in
    place. The state update rounds as the reference's; sums run in another order and exp is a
    polynomial (within 2 ulp), so results differ from the reference's by a few fp32 ulps."""
    return torch.ops.nemotron_cpu.mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log,
                                             D, norm_weight, groups, norm_groups, float(dt_limit[0]),
                                             float(dt_limit[1]), eps, cpu_isa() if isa is None else isa)
