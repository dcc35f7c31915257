"""nemotron.kernels against torch's own CPU kernels on one decode step's products.

The products are those of the ~125M-parameter `nemotron_h` MoE hybrid of benchmarks/vs_llamacpp.py
at batch 1 (hidden 768: 4 Mamba in/out projections, 6 shared experts, 24 routed experts (top 4 of 16
in 6 layers), 2 attention blocks, the 16384-row lm_head): 64.6M weights, every matrix distinct, so
the weights stream from memory or the last-level cache as they do in decode. Each precision's pair
runs on the same weights and inputs, alternated, in rounds; medians of the rounds.

- fp32: MKL (F.linear) | ours
- bf16: torch's bf16 product (oneDNN) | ours (VDPBF16PS on AVX512-BF16, fp32 from bf16 elsewhere)
- 8-bit: torch's int8 weight-only kernel on the weights re-rounded to int8 per channel (what this
  project ran before) | ours on the FP8 (E4M3) weights as stored
- 4-bit: torch's int4 kernel on the weights re-rounded to 4 bits per 32 (min-max) | ours on NVFP4

With --mamba-step: a Mamba-2 layer's decode step (`Mamba2Mixer.step`: its two products and one
fused kernel between them) against the same step in torch operations (`Mamba2Mixer.reference_step`),
on the 125M model's Mamba layer (hidden 768, 24 heads of 64, state 128, 8 groups) and the small
model's of benchmarks/generation.py (hidden 256, 16 heads of 32, state 128, 2 groups), fp32 and bf16.

With --instructions: the time of one instruction of each kind the kernels' inner loops rest on,
8 independent accumulators in flight (a throughput, not a latency), on one core: VDPBF16PS (bf16,
32 products), VPDPBUSD (int8, 64 products), VFMADD231PS (fp32, 16 products). Needs AVX512-BF16
and VNNI.

    python benchmarks/cpu_kernels.py [--rows 1] [--threads 2] [--rounds 7] [--instructions | --mamba-step]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nemotron import kernels
from nemotron.quant import cpu, formats
from nemotron.quant.modules import QuantScheme

SHAPES = ([(5144, 768), (768, 1536)] * 4 + [(1024, 768), (768, 1024)] * 6 + [(512, 768), (768, 512)] * 24
          + [(768, 768), (512, 768), (768, 768)] * 2 + [(16384, 768)])


def torch_int8(w: torch.Tensor):
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    scales = scale.bfloat16()
    return lambda x: torch._weight_int8pack_mm(x.bfloat16(), q, scales)


def torch_int4(w: torch.Tensor):
    rows = w.shape[0]
    w = F.pad(w, (0, 0, 0, -rows % 16))          # the packing's tile: 16 rows, the padding sliced off
    n, k = w.shape
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = lo + 8 * scale
    codes = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).view(n, k).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz)[:, :rows]


def ours_quantized(w: torch.Tensor, algo: str) -> cpu.PackedWeight:
    scheme = QuantScheme(algo)
    stored = scheme.quantize(w)
    return cpu.pack(scheme.nvfp4, stored["weight"], stored["weight_scale"], stored.get("weight_scale_2"))


INSTRUCTIONS_CPP = r"""
#include <immintrin.h>
#include <chrono>
#define T __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vnni")))
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define KEEP(v) asm volatile("" : "+v"(v##0), "+v"(v##1), "+v"(v##2), "+v"(v##3), "+v"(v##4), "+v"(v##5), "+v"(v##6), "+v"(v##7))
#define ZF(i) __m512 a##i = _mm512_setzero_ps();
#define ZI(i) __m512i a##i = _mm512_setzero_si512();
#define DP(i) a##i = _mm512_dpbf16_ps(a##i, w, x);
#define DI(i) a##i = _mm512_dpbusd_epi32(a##i, b, b);
#define FM(i) a##i = _mm512_fmadd_ps(a##i, m, m);
T void bf16_dots(long n) {
  const __m512bh w = (__m512bh)_mm512_set1_epi16(0), x = (__m512bh)_mm512_set1_epi16(0x3f80);
  EACH(ZF)
  for (long i = 0; i < n; ++i) { EACH(DP) KEEP(a); }
}
T void int8_dots(long n) {
  const __m512i b = _mm512_set1_epi8(1);
  EACH(ZI)
  for (long i = 0; i < n; ++i) { EACH(DI) KEEP(a); }
}
T void fmas(long n) {
  const __m512 m = _mm512_setzero_ps();
  EACH(ZF)
  for (long i = 0; i < n; ++i) { EACH(FM) KEEP(a); }
}
double instruction_ns(int64_t kind, int64_t n) {
  auto t = std::chrono::steady_clock::now();
  if (kind == 0) bf16_dots(n); else if (kind == 1) int8_dots(n); else fmas(n);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / (8.0 * n) * 1e9;
}
"""


def instructions() -> None:
    from torch.utils.cpp_extension import load_inline

    mod = load_inline("nemotron_instruction_rates", cpp_sources=INSTRUCTIONS_CPP, functions=["instruction_ns"],
                      extra_cflags=["-O2"])
    names = ["VDPBF16PS (bf16, 32 products)", "VPDPBUSD (int8, 64 products)", "VFMADD231PS (fp32, 16 products)"]
    for kind, name in enumerate(names):
        ns = statistics.median(mod.instruction_ns(kind, 20_000_000) for _ in range(5))
        print(f"{name:34s} {ns:6.2f} ns an instruction")


def mamba_step(rows: int, rounds: int) -> None:
    from nemotron.layers.mamba2 import Mamba2Mixer

    print(f"Mamba-2 decode step, {rows} row(s), {torch.get_num_threads()} thread(s), median of {rounds} rounds")
    print(f"{'layer':42s} {'torch us':>9s} {'fused us':>9s} {'torch/fused':>12s}")
    for hidden, heads, head_dim, groups in ((768, 24, 64, 8), (256, 16, 32, 2)):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            m = Mamba2Mixer(hidden, heads, head_dim, 128, groups).to(dtype)
            state = m.new_state(rows, dtype, torch.float32, "cpu")
            x = torch.randn(rows, 1, hidden).to(dtype)
            if not kernels.fuses_mamba_step(x, state.conv, state.ssm):
                raise SystemExit("the fused step does not run here")
            sides = (m.reference_step, m.step)
            times: list[list[float]] = [[], []]
            with torch.inference_mode():
                for r in range(rounds):
                    for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                        for _ in range(20):
                            sides[side](x, state)
                        t = time.perf_counter()
                        for _ in range(200):
                            sides[side](x, state)
                        times[side].append((time.perf_counter() - t) / 200)
            a, b = statistics.median(times[0]), statistics.median(times[1])
            ratio = statistics.median(slow / fast for slow, fast in zip(*times))
            name = f"hidden {hidden}, {heads} heads of {head_dim}, {str(dtype)[6:]}"
            print(f"{name:42s} {a * 1e6:9.1f} {b * 1e6:9.1f} {ratio:11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--instructions", action="store_true", help="time the instructions, not the kernels")
    parser.add_argument("--mamba-step", action="store_true", help="time the fused Mamba decode step, not the products")
    args = parser.parse_args()
    if args.instructions:
        if kernels.cpu_isa() != kernels.AVX512_BF16:
            raise SystemExit("--instructions needs AVX512-BF16 and VNNI")
        return instructions()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the CPU kernels do not run here")
    if args.mamba_step:
        return mamba_step(args.rows, args.rounds)
    torch.manual_seed(0)
    ws = [torch.randn(s) * 0.05 for s in SHAPES]
    xs = {k: torch.randn(args.rows, k) for k in {s[1] for s in SHAPES}}
    xb = {k: v.bfloat16() for k, v in xs.items()}
    pairs: dict[str, tuple[list, list]] = {}
    pairs["fp32 (MKL | ours)"] = ([lambda w=w: F.linear(xs[w.shape[1]], w) for w in ws],
                                  [lambda w=w: kernels.gemv(xs[w.shape[1]], w) for w in ws])
    wbs = [w.bfloat16() for w in ws]
    pairs["bf16 (oneDNN | ours)"] = ([lambda w=w: F.linear(xb[w.shape[1]], w) for w in wbs],
                                     [lambda w=w: kernels.gemv(xb[w.shape[1]], w) for w in wbs])
    i8, f8 = [torch_int8(w) for w in ws], [ours_quantized(w, "FP8_PER_CHANNEL_PER_TOKEN") for w in ws]
    pairs[f"8-bit (int8 | ours {f8[0].kind})"] = ([lambda f=f, w=w: f(xb[w.shape[1]]) for f, w in zip(i8, ws)],
                                                 [lambda p=p, w=w: p(xb[w.shape[1]]) for p, w in zip(f8, ws)])
    i4, n4 = [torch_int4(w) for w in ws], [ours_quantized(w, "W4A16_NVFP4") for w in ws]
    pairs[f"4-bit (int4 | ours {n4[0].kind})"] = ([lambda f=f, w=w: f(xb[w.shape[1]]) for f, w in zip(i4, ws)],
                                          [lambda p=p, w=w: p(xb[w.shape[1]]) for p, w in zip(n4, ws)])
    weights = sum(w.numel() for w in ws)
    times = {(name, side): [] for name in pairs for side in (0, 1)}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name, sides in pairs.items():
                for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                    calls = sides[side]
                    for f in calls:
                        f()
                    t = time.perf_counter()
                    for _ in range(3):
                        for f in calls:
                            f()
                    times[(name, side)].append((time.perf_counter() - t) / 3)
    print(f"{weights / 1e6:.1f}M weights a step, {args.rows} row(s), {args.threads} thread(s), "
          f"{kernels.ISA_NAMES[kernels.cpu_isa()]} kernels, median of {args.rounds} rounds")
    print(f"{'precision (torch | ours)':34s} {'torch ms':>9s} {'ours ms':>8s} {'torch G/s':>10s} {'ours G/s':>9s} {'ours/torch':>10s}")
    for name in pairs:
        a, b = statistics.median(times[(name, 0)]), statistics.median(times[(name, 1)])
        ratio = statistics.median(x / y for x, y in zip(times[(name, 0)], times[(name, 1)]))
        print(f"{name:34s} {a * 1e3:9.2f} {b * 1e3:8.2f} {weights / a / 1e9:10.1f} {weights / b / 1e9:9.1f} {ratio:10.2f}x")


if __name__ == "__main__":
    main()
