"""Quantized layers: a Linear and a stack of MoE experts whose weights stay in their low-precision
storage (NVFP4: ~4.5 bits per weight; FP8: 8) and are dequantized block by block inside the forward.

Default execution is weight-only (W4A16 / W8A16: activations stay in the model dtype, as vLLM's
Marlin path runs on GPUs without FP4 hardware). `set_activation_emulation(model, True)` switches the
layers whose format quantizes activations to fake-quantize their inputs first (W4A4 / W8A8: with the
stored static `input_scale`, or per token at run time for FP8_PER_CHANNEL_PER_TOKEN), reproducing
Blackwell/Hopper numerics for parity checks.

Tensor names follow the ModelOpt export: `weight` (packed uint8 for NVFP4, float8_e4m3fn for FP8),
`weight_scale`, `weight_scale_2` (NVFP4), `input_scale`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemotron import kernels
from nemotron.layers.linear import linear
from nemotron.layers.moe import dispatch
from nemotron.quant import cpu, formats

# quant_algo -> the storage of one linear layer's weight
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO")
ALGOS = NVFP4_ALGOS + FP8_ALGOS


def nvfp4_dequantize(packed: torch.Tensor, block_scales: torch.Tensor, scale_2: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """`formats.nvfp4_dequantize`, through the CPU kernels where they run (`kernels.nvfp4_decode`: the
    same values); scale_2 one value, or one per expert of a stack [E, N, K/2]."""
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32, device=packed.device)
    w = kernels.nvfp4_decode(packed, block_scales, scale_2, dtype)
    if w is not None:
        return w
    if scale_2.numel() > 1:
        scale_2 = scale_2.reshape(-1, *[1] * (packed.dim() - 1))
    return formats.nvfp4_dequantize(packed, block_scales, scale_2, dtype)


@dataclass(frozen=True)
class QuantScheme:
    """How one layer is stored: a ModelOpt `quant_algo` (upper case) and, for NVFP4, the block size."""

    algo: str
    group_size: int = formats.NVFP4_BLOCK

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"unsupported quant_algo {self.algo!r} (supported: {', '.join(ALGOS)})")
        if self.algo in NVFP4_ALGOS and self.group_size != formats.NVFP4_BLOCK:
            raise ValueError(f"NVFP4 uses blocks of {formats.NVFP4_BLOCK} elements, not group_size {self.group_size}")

    @property
    def nvfp4(self) -> bool:
        return self.algo in NVFP4_ALGOS

    @property
    def has_input_scale(self) -> bool:
        """Whether the export carries a static activation scale (W4A4 NVFP4, per-tensor FP8)."""
        return self.algo in ("NVFP4", "FP8")

    @property
    def quantizes_inputs(self) -> bool:
        """Whether the format runs its activations in low precision too (a static input_scale, or
        FP8 per token computed at run time)."""
        return self.has_input_scale or self.algo == "FP8_PER_CHANNEL_PER_TOKEN"

    @property
    def bits(self) -> float:
        """Storage bits per weight, scales included."""
        return 4.5 if self.nvfp4 else 8.0

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The stored tensors of one [out, in] weight: name -> (shape, dtype)."""
        n, k = out_features, in_features
        if self.nvfp4:
            if k % formats.NVFP4_BLOCK:
                raise ValueError(f"NVFP4 needs an input dimension divisible by 16, got {k}")
            out = {"weight": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // 16), torch.float8_e4m3fn),
                   "weight_scale_2": ((), torch.float32)}
        elif self.algo == "FP8":
            out = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((), torch.float32)}
        elif self.algo == "FP8_PER_CHANNEL_PER_TOKEN":
            out = {"weight": ((n, k), torch.float8_e4m3fn), "weight_scale": ((n,), torch.float32)}
        else:  # FP8_PB_WO: 128x128 blocks (partial at the edges), ModelOpt's 4-d scale layout
            b = formats.FP8_BLOCK
            out = {"weight": ((n, k), torch.float8_e4m3fn),
                   "weight_scale": ((-(-n // b), 1, -(-k // b), 1), torch.float32)}
        if self.has_input_scale:
            out["input_scale"] = ((), torch.float32)
        return out

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float [out, in] weight -> its stored tensors (without input_scale)."""
        if self.nvfp4:
            packed, scale, scale_2 = formats.nvfp4_quantize(w)
            return {"weight": packed, "weight_scale": scale, "weight_scale_2": scale_2}
        granularity = {"FP8": "tensor", "FP8_PER_CHANNEL_PER_TOKEN": "channel", "FP8_PB_WO": "block"}[self.algo]
        q, scale = formats.fp8_quantize(w, granularity)
        if granularity == "block":
            scale = scale.reshape(scale.shape[0], 1, scale.shape[1], 1)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.nvfp4:
            return nvfp4_dequantize(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype)
        return formats.fp8_dequantize(tensors["weight"], tensors["weight_scale"], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if self.algo == "FP8_PER_CHANNEL_PER_TOKEN":
            return formats.fp8_fake_quantize_per_token(x)
        if self.nvfp4:
            return formats.nvfp4_fake_quantize(x, input_scale)
        return formats.fp8_fake_quantize(x, input_scale)

    def input_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The static activation scale for a calibrated amax (NVFP4: amax/2688; FP8: amax/448)."""
        amax = torch.as_tensor(amax, dtype=torch.float32)
        return formats.nvfp4_global_scale(amax) if self.nvfp4 else amax / formats.E4M3_MAX


class _KeepsStorageDtypes(nn.Module):
    """`.to(dtype)`, `.half()` & co. move the stored tensors (buffers) between devices but never
    convert them (a packed or FP8 weight cast to bf16 would be garbage); parameters (a bias) follow
    the model dtype."""

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers.pop(k) for k in list(self._buffers)}
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                # where fn would move a tensor of this device (it may only change the dtype)
                self._buffers[name] = None if t is None else t.to(fn(torch.empty(0, device=t.device)).device)


class QuantLinear(_KeepsStorageDtypes):
    """A Linear stored in `scheme`'s format. `compute_dtype`: the dtype the weight is dequantized to
    (the model's dtype)."""

    quantized = True

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.compute_dtype = compute_dtype
        self.emulate_activations = False
        for name, (shape, dtype) in scheme.shapes(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, input_amax: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize a float Linear (input_amax: the calibrated max |input|, for the schemes that store
        an input_scale)."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None, w.dtype, w.device)
        for name, t in scheme.quantize(w).items():
            setattr(q, name, t.to(w.device))
        if scheme.has_input_scale:
            if input_amax is None:
                raise ValueError(f"{scheme.algo} stores a static input_scale: calibrate the activations first")
            q.input_scale = scheme.input_scale(input_amax).to(w.device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._buffers.items() if v is not None}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.dequantize(self.stored(), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate_activations:
            x = self.scheme.fake_quantize_input(x, self._buffers.get("input_scale"))
        elif cpu.applies(x) and (packed := self._packed()) is not None:
            y = packed(x)   # decode on a CPU: the kernels read the stored weight
            return y if self.bias is None else y + self.bias
        return linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _packed(self) -> cpu.PackedWeight | None:
        return cpu.cached(self, "cpu", lambda: self.stored().values(), lambda: cpu.pack(
            self.scheme.nvfp4, self.weight, self.weight_scale, self._buffers.get("weight_scale_2")))

    def uses_cpu_kernels(self) -> bool:
        """Whether CPU decode multiplies the stored weight through the kernels (not decoding it)."""
        return cpu.enabled_on(self.weight.device) and not self.emulate_activations

    def prepare_cpu_kernels(self) -> None:
        """Make (or, after a change of the stored tensors, remake) the kernels' copy now, in eager code,
        for a torch.compile trace to read."""
        if self.uses_cpu_kernels():
            self._packed()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.algo}"


class QuantExperts(_KeepsStorageDtypes):
    """Experts (stacked non-gated relu² experts, up [E, I, X] and down [E, X, I]) stored per expert in
    `scheme`'s format: `up_proj` holds every expert's packed/FP8 weight, `up_proj_weight_scale` &c.
    their scales (per-expert scalars stacked to [E]). Only the experts a batch routes to are
    dequantized."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, scheme: QuantScheme,
                 compute_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_experts, self.scheme, self.compute_dtype = num_experts, scheme, compute_dtype
        self.emulate_activations = False
        for proj, (n, k) in (("up_proj", (intermediate_size, dim)), ("down_proj", (dim, intermediate_size))):
            for name, (shape, dtype) in scheme.shapes(n, k).items():
                key = proj if name == "weight" else f"{proj}_{name}"
                self.register_buffer(key, torch.zeros((num_experts, *shape), dtype=dtype, device=device))

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: QuantScheme,
                     input_amax: dict[str, torch.Tensor] | None = None) -> "QuantExperts":
        """Quantize float Experts; input_amax: {"up_proj": [E], "down_proj": [E]} calibrated max |input|."""
        up, down = experts.up_proj.detach(), experts.down_proj.detach()
        q = cls(up.shape[0], up.shape[2], up.shape[1], scheme, up.dtype, up.device)
        for proj, w in (("up_proj", up), ("down_proj", down)):
            for e in range(w.shape[0]):
                for name, t in scheme.quantize(w[e]).items():
                    getattr(q, proj if name == "weight" else f"{proj}_{name}")[e].copy_(t)
            if scheme.has_input_scale:
                if input_amax is None:
                    raise ValueError(f"{scheme.algo} stores a static input_scale: calibrate the activations first")
                getattr(q, f"{proj}_input_scale").copy_(scheme.input_scale(input_amax[proj]))
        return q

    def _tensors(self, proj: str, e: int) -> dict[str, torch.Tensor]:
        out = {"weight": getattr(self, proj)[e]}
        for name in ("weight_scale", "weight_scale_2", "input_scale"):
            t = self._buffers.get(f"{proj}_{name}")
            if t is not None:
                out[name] = t[e]
        return out

    def expert_weight(self, proj: str, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.scheme.dequantize(self._tensors(proj, e), dtype or self.compute_dtype)

    # the weight source of nemotron.layers.moe.dispatch: each expert decoded where it is used

    quantized = True

    def gather_ok(self) -> bool:
        """Whether `gathered` serves (not for 128x128-block FP8 nor with emulated activations)."""
        return self.scheme.algo != "FP8_PB_WO" and not self.emulate_activations

    def indexed_ok(self, x: torch.Tensor) -> bool:
        """Whether `indexed` serves rows like x: the CPU kernels multiply the stored weights (under a
        trace, only where their copies were made before it, by eager calls)."""
        return (not self.emulate_activations and cpu.applies(x) and self._packs("up_proj") is not None
                and self._packs("down_proj") is not None)

    def grouped_mm_ok(self, x: torch.Tensor) -> bool:
        return False  # it would decode every expert

    def _packs(self, proj: str) -> cpu.PackedWeight | None:
        def stored() -> list[torch.Tensor]:
            return [t for name, t in self._buffers.items() if t is not None and name.startswith(proj)]

        return cpu.cached(self, proj, stored, lambda: cpu.pack(
            self.scheme.nvfp4, getattr(self, proj), getattr(self, f"{proj}_weight_scale"),
            self._buffers.get(f"{proj}_weight_scale_2")))

    def uses_cpu_kernels(self) -> bool:
        """Whether CPU decode multiplies the stored weights through the kernels (not decoding them)."""
        return cpu.enabled_on(self.up_proj.device) and not self.emulate_activations

    def prepare_cpu_kernels(self) -> None:
        """Make (or remake) the kernels' copies now, in eager code, for a torch.compile trace to read."""
        if self.uses_cpu_kernels():
            self._packs("up_proj"), self._packs("down_proj")

    def indexed(self, proj: str, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Row i of x [R, K] times the `proj` weight of expert experts[i], read as stored (the kernels)."""
        return self._packs(proj)(x, experts)

    def _project(self, x: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        if self.indexed_ok(x):
            return self.indexed(proj, x, torch.full((x.numel() // x.shape[-1],), e, dtype=torch.long))
        t = self._tensors(proj, e)
        if self.emulate_activations:
            x = self.scheme.fake_quantize_input(x, t.get("input_scale"))
        return linear(x, self.scheme.dequantize(t, x.dtype))

    def up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._project(x, "up_proj", e)

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return self._project(h, "down_proj", e)

    def gathered(self, proj: str, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weights of `experts` [P] (with repeats), [P, N, K]: the stored tensors are
        gathered first, so only the chosen experts are decoded."""
        w = getattr(self, proj).index_select(0, experts)
        scale = getattr(self, f"{proj}_weight_scale").index_select(0, experts)
        if self.scheme.nvfp4:
            scale_2 = getattr(self, f"{proj}_weight_scale_2").index_select(0, experts)
            return nvfp4_dequantize(w, scale, scale_2, dtype)
        step = scale[:, None, None] if scale.dim() == 1 else scale[:, :, None]   # per tensor / per channel
        return (formats.e4m3_to_float(w) * step).to(dtype)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                method: str | None = None) -> torch.Tensor:
        """x [T, X], idx/weights [T, k] -> sum_j w_j e_j(x) (fp32 accumulation, returned in x.dtype).

        Few (token, expert) pairs (decode): the chosen experts' stored tensors are gathered and
        decoded for two batched matmuls, with static shapes and no host reads (what torch.compile
        needs); on a CPU, the kernels read the stored weights of each row's experts (`indexed`).
        Otherwise the tokens are grouped by expert and each expert is decoded once
        (`nemotron.layers.moe.choose_kernel`)."""
        return dispatch(self, x, idx, weights, method)


def set_activation_emulation(model: nn.Module, on: bool = True) -> int:
    """Fake-quantize the inputs of every quantized layer whose format quantizes activations (W4A4 /
    W8A8 numerics) or not (weight-only, the default). Returns the number of layers switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)) and m.scheme.quantizes_inputs:
            m.emulate_activations = on
            n += 1
    return n
