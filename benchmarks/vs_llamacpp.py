"""nemotron against llama.cpp on the same weights: the logits, CPU decode and prefill speed.

Builds a random ~125M-parameter `nemotron_h` MoE hybrid (hidden 768, 12 layers of Mamba, attention
and 16-expert top-4 MoE, vocabulary 16384) in the release layout, converts it with llama.cpp's own
`convert_hf_to_gguf.py` to f32, f16 and bf16 (q8_0 and q4_0 through llama.cpp's quantizer, the
output matrix kept bf16 as our quantized checkpoints keep lm_head unless --output-type default), checks
that llama.cpp's f32 logits match ours, then times batch-1 greedy decode and a 512-token prefill
for each, every engine in its own subprocess, the runs alternated. Ours runs fp32, bf16, and beside
q8_0 / q4_0 the checkpoint quantized by `nemotron quantize` to FP8 / NVFP4, decoded through the
CPU decode kernels (nemotron.kernels: the stored E4M3 / NVFP4 weight read as it is). Beside each decode rate: the
copy-bandwidth roofline, the weight bytes a decode step reads (every weight but the embedding
table, the routed experts counted top_k / experts) over the bytes per second `dst.copy_(src)`
moves, measured between the runs.

llama.cpp comes from `llama-cpp-python` (the `bench` extra: `pip install llama-cpp-python==0.3.36`
builds it from the sdist, 6-10 minutes on 2 cores). Its native build compiles ggml's AMX kernels
where the CPU reports AMX; on the Intel Xeon VMs here their q8_0/q4_0 matmuls die with SIGILL on a
`tileloadd` in a worker thread (an engine that fails is reported in the table with its signal). Built
for the same CPU without AMX, they run:
`CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"`. The converter is
the one its sdist vendors (`--llama-src`: the unpacked sdist, or it is downloaded with pip into
--cache), run with transformers 4.57.6 on its path (its pinned version; installed into --cache with
pip on first use), since the converter reads the raw NVIDIA config.json that version leaves alone.
A small trained vocabulary has no known pre-tokenizer hash; the converter is told "gpt-2" (a
byte-level BPE), which names the pre-tokenizer and changes no weight: token ids are fed directly.

    python benchmarks/vs_llamacpp.py [--runs 3] [--new-tokens 64] [--prefill 512]
                                     [--types f32 f16 bf16 q8_0 q4_0] [--cache DIR] [--llama-src DIR]
                                     [--output-type bf16|default]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_VERSION = "0.3.36"

CONFIG = dict(
    hybrid_override_pattern="MEMEM*EMEM*E", vocab_size=16384, hidden_size=768, num_attention_heads=12,
    num_key_value_heads=4, head_dim=64, mamba_num_heads=24, mamba_head_dim=64, n_groups=8,
    ssm_state_size=128, chunk_size=128, n_routed_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=512, moe_shared_expert_intermediate_size=1024, routed_scaling_factor=2.5,
    max_position_embeddings=4096, torch_dtype="float32", eos_token_id=2, bos_token_id=1,
)

# our precisions beside llama.cpp's types: the nearest counterpart of each. 8-bit and 4-bit are the
# checkpoint quantized by `nemotron quantize` to FP8 / NVFP4 (ModelOpt's layout, lm_head and routers
# left in bf16 as ModelOpt leaves them), run in bf16 through the CPU weight-only kernels
# (nemotron.quant.cpu: the stored E4M3 bytes, NVFP4's codes and E4M3 block scales)
OURS = {"f32": "float32", "f16": "bfloat16", "bf16": "bfloat16", "q8_0": "fp8", "q4_0": "nvfp4"}
QUANTIZED = ("fp8", "nvfp4")
# the default rule compiles a float model's decode step once it has decoded eagerly about as long as
# compiling takes (nemotron.inference.steps.use_compiled_decode): both phases are timed, as
# "float32" (eager: the first seconds) and "float32 compiled" (after them)
COMPILED = " compiled"


def precision(kind: str) -> str:
    return kind.removesuffix(COMPILED)

LLAMA_CHILD = r"""
import json, sys, time, statistics
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, task, runs, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
ids = args["ids"]
llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=args["threads"],
            n_threads_batch=args["threads"], logits_all=task == "logits", verbose=False)
out = {}
if task == "logits":
    llm.eval(ids)
    out["logits"] = np.asarray(llm.scores[:len(ids)]).tolist()
elif task == "prefill":
    times = []
    for _ in range(runs + 1):
        llm.reset()   # the next eval drops the cached sequence from position 0
        t = time.perf_counter(); llm.eval(ids); times.append(time.perf_counter() - t)
    out["tokens_per_s"] = len(ids) / statistics.median(times[1:])
else:
    new, vocab = args["new"], llm.n_vocab()
    def last_logits():   # without logits_all the wrapper keeps no scores: read the context's last row
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
    def run():
        llm.reset()
        llm.eval(ids)
        tokens = []
        t = time.perf_counter()
        for _ in range(new):
            tok = int(np.argmax(last_logits()))
            tokens.append(tok)
            llm.eval([tok])
        return time.perf_counter() - t, tokens
    run()
    results = [run() for _ in range(runs)]
    out["tokens_per_s"] = new / statistics.median(r[0] for r in results)
    out["tokens"] = results[0][1]
print(json.dumps(out))
"""

OUR_CHILD = r"""
import json, sys, time, statistics
import torch
import nemotron
from nemotron.inference.engine import Engine
from nemotron.inference.requests import Request
from nemotron.inference.sampling import SamplingParams
from nemotron.inference.steps import prefill
path, task, runs, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(args["threads"])
model = nemotron.load(path, dtype=args["dtype"]).model
ids = args["ids"]
out = {}
if task == "logits":
    with torch.inference_mode():
        out["logits"] = model(torch.tensor([ids])).float()[0].tolist()
elif task == "prefill":
    def run():
        cache = model.new_cache(1, len(ids))
        t = time.perf_counter(); prefill(model, torch.tensor([ids]), cache, chunk=len(ids))
        return time.perf_counter() - t
    run()
    out["tokens_per_s"] = len(ids) / statistics.median(run() for _ in range(runs))
else:
    new = args["new"]
    def run():
        # the default generation path: what `m.generate` runs (prompt prefill, then timed decode): eager
        # for a model's first seconds of decoding, compiled after them (compile=True: the step compiled
        # in the untimed first run)
        req = Request(list(ids), SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
        engine = Engine.for_requests(model, [req], compile=args["compile"])
        events = engine.run([req])
        next(events)                                   # the prefill's first token
        t = time.perf_counter()
        for _ in events:
            pass
        return time.perf_counter() - t, req.output_ids
    run()
    results = [run() for _ in range(runs)]
    out["tokens_per_s"] = (new - 1) / statistics.median(r[0] for r in results)
    out["tokens"] = results[0][1]
print(json.dumps(out))
"""


def build(out: Path) -> Path:
    """The random checkpoint, with the embedded model's tokenizer files (1,024 tokens: the rest of
    the vocabulary is padding to the converter)."""
    from nemotron.config import NemotronHConfig
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.models import build_model
    from nemotron.models.init import init_weights_
    from nemotron.tiny import MODEL_DIR

    config = NemotronHConfig(**CONFIG)
    save_checkpoint(init_weights_(build_model(config), config, seed=0), config, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, out / name)
    return out


def llama_source(cache: Path, given: Path | None) -> Path:
    """The unpacked llama-cpp-python sdist's vendored llama.cpp tree."""
    if given is not None:
        root = given / "vendor" / "llama.cpp" if (given / "vendor").exists() else given
        if not (root / "convert_hf_to_gguf.py").exists():
            raise SystemExit(f"{given}: no convert_hf_to_gguf.py (pass the unpacked sdist or its vendor/llama.cpp)")
        return root
    root = cache / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        # only this package as source: its build tools (cmake, ...) come as wheels, not built from source
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz") as tar:
            wanted = ("/vendor/llama.cpp/convert_hf_to_gguf.py", "/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/gguf-py/")
            members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
            tar.extractall(cache, members=members, filter="data")
    return root


def converter_path(cache: Path) -> Path:
    """A directory holding transformers 4.57.6 (the converter's pinned version)."""
    target = cache / "transformers-4.57.6"
    if not (target / "transformers").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                        "transformers==4.57.6", "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0"], check=True)
    return target


CONVERT = r"""
import sys
src, ckpt, out, outtype = sys.argv[1:5]
sys.path.insert(0, src)
import convert_hf_to_gguf as c
# a small trained vocabulary matches no known pre-tokenizer hash; it is a byte-level BPE
try:
    from conversion.base import TextModel      # the converter split into modules
except ImportError:
    TextModel = c.TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", ckpt, "--outfile", out, "--outtype", outtype]
c.main()
"""


def convert(src: Path, tf: Path, ckpt: Path, out: Path, outtype: str) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tf), str(src / "gguf-py")]), "NO_LOCAL_GGUF": ""}
    r = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(ckpt), str(out), outtype],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{r.stderr[-3000:]}")
    return out


GGML_TYPE_BF16 = 30   # ggml.h's enum ggml_type (the Python binding does not name it)


def quantize(f32: Path, out: Path, kind: str, output_bf16: bool) -> Path:
    """llama.cpp's quantizer; with `output_bf16` the output matrix (lm_head) stays bf16, as it does in
    our quantized checkpoints (ModelOpt's exports leave lm_head unquantized), where llama.cpp would
    make it q6_K (q4_0) or q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params.nthread = 2
    if output_bf16:
        params.output_tensor_type = GGML_TYPE_BF16
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize to {kind}")
    return out


def child(code: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        why = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        raise RuntimeError(f"{why}: {lines[-1][:300] if lines else 'no message'}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def copy_bandwidth() -> float:
    """Bytes per second `dst.copy_(src)` moves on 1 GiB buffers: larger than the CPU's caches (an L3
    can hold a 125M model's active weights), so the roofline is memory's."""
    import torch

    src = torch.randn((1 << 30) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(9):
        t = time.perf_counter(); dst.copy_(src); samples.append(time.perf_counter() - t)
    return src.numel() * 4 / statistics.median(samples)


# bytes per weight of each engine's precision (ours quantized: the stored E4M3 byte, and NVFP4's
# 4-bit code with an E4M3 scale per 16, for the quantized weights; bf16 for the rest, see decode_bytes)
BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "float32": 4, "bfloat16": 2,
         "fp8": 1, "nvfp4": 9 / 16}


def decode_bytes(ckpt: Path, kind: str, output_bf16: bool = False) -> float:
    """Bytes one batch-1 decode step reads at `kind`'s BYTES per weight: every weight but the embedding
    table, the routed experts at top_k / experts of their count. A checkpoint of ours quantized reads
    its quantized weights at BYTES[kind] and the tensors left unquantized in bf16; `output_bf16`: the
    output matrix in bf16 (llama.cpp's quantized GGUFs under --output-type bf16)."""
    from safetensors import safe_open

    share = CONFIG["num_experts_per_tok"] / CONFIG["n_routed_experts"]
    total = 0.0
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        for name in f.keys():
            if "embeddings" in name or name.startswith("mtp.") or "scale" in name:
                continue
            routed = ".experts." in name and "shared_experts" not in name
            t = f.get_slice(name)
            weights = math.prod(t.get_shape()) * (share if routed else 1.0)
            stored = t.get_dtype()
            if stored == "U8":           # NVFP4 holds two weights a byte
                weights *= 2
            quantized = stored in ("U8", "F8_E4M3")
            bf16 = (kind in QUANTIZED and not quantized) or (output_bf16 and name.startswith("lm_head"))
            total += weights * (BYTES["bfloat16"] if bf16 else BYTES[kind])
    return total


def measure(who: str, kind: str, model: Path, runs: int, common: dict, prompt: list[int], new: int,
            long: list[int]) -> tuple[dict, dict]:
    """(decode, prefill) results of one engine and precision, each in its own process."""
    code, extra = (LLAMA_CHILD, {}) if who == "llama.cpp" else \
        (OUR_CHILD, {"dtype": "bfloat16" if precision(kind) in QUANTIZED else precision(kind),
                     "compile": kind.endswith(COMPILED)})
    d = child(code, model, "decode", runs, json.dumps({**common, **extra, "ids": prompt, "new": new}))
    if kind.endswith(COMPILED):   # prefill is the same forward, compiled or not
        return d, {"tokens_per_s": float("nan")}
    p = child(code, model, "prefill", runs, json.dumps({**common, **extra, "ids": long}))
    return d, p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="timed repetitions per child (median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds over every engine (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nemotron-vs-llamacpp")
    parser.add_argument("--llama-src", type=Path, help="the unpacked llama-cpp-python sdist (else downloaded)")
    parser.add_argument("--output-type", choices=["bf16", "default"], default="bf16",
                        help="llama.cpp's q8_0 / q4_0 output matrix: bf16 as in our quantized checkpoints "
                             "(the same weights), or its quantizer's default (q8_0 / q6_K)")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit(f"llama.cpp is not installed: pip install llama-cpp-python=={LLAMA_VERSION} "
                         "(builds from source, ~10 minutes on 2 cores)") from None
    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    src, tf = llama_source(args.cache, args.llama_src), converter_path(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build(tmp / "moe-125m")
        ggufs = {"f32": convert(src, tf, ckpt, tmp / "f32.gguf", "f32")}
        ours_ckpt = {"float32": ckpt, "bfloat16": ckpt}
        from nemotron.quant.quantize import quantize as quantize_ours
        for kind in args.types:
            if OURS.get(kind) in QUANTIZED:
                out = tmp / f"moe-125m-{OURS[kind]}"
                quantize_ours(str(ckpt), OURS[kind], out, dtype="bfloat16", progress=False)
                ours_ckpt[OURS[kind]] = out
        for kind in args.types:
            if kind in ("f16", "bf16"):
                ggufs[kind] = convert(src, tf, ckpt, tmp / f"{kind}.gguf", kind)
            elif kind in ("q8_0", "q4_0"):
                ggufs[kind] = quantize(ggufs["f32"], tmp / f"{kind}.gguf", kind, args.output_type == "bf16")

        g = torch.Generator().manual_seed(1)
        check_ids = torch.randint(3, 1024, (16,), generator=g).tolist()
        prompt = torch.randint(3, 1024, (32,), generator=g).tolist()
        long = torch.randint(3, 1024, (args.prefill,), generator=g).tolist()
        common = {"threads": args.threads}

        mine = child(OUR_CHILD, ckpt, "logits", 1, json.dumps({**common, "dtype": "float32", "ids": check_ids}))
        theirs = child(LLAMA_CHILD, ggufs["f32"], "logits", 1, json.dumps({**common, "ids": check_ids}))
        a, b = torch.tensor(mine["logits"]), torch.tensor(theirs["logits"])
        print(f"logits, f32, {len(check_ids)} tokens: max |ours - llama.cpp| = {(a - b).abs().max().item():.2e} "
              f"(logits up to {a.abs().max().item():.1f}); same argmax at {int((a.argmax(-1) == b.argmax(-1)).sum())} "
              f"of {len(check_ids)} positions", flush=True)

        ours = dict.fromkeys(OURS[k] for k in args.types if k in OURS)
        engines = [("llama.cpp", k) for k in args.types] + [("nemotron", k) for k in ours] + \
            [("nemotron", k + COMPILED) for k in ours]
        decode, pre = {e: [] for e in engines}, {e: [] for e in engines}
        failed, tokens, bw = {}, {}, []
        for r in range(args.rounds):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                if e in failed:
                    continue
                model = ggufs[e[1]] if e[0] == "llama.cpp" else ours_ckpt[precision(e[1])]
                try:
                    d, p = measure(*e, model, args.runs, common, prompt, args.new_tokens, long)
                except RuntimeError as exc:
                    failed[e] = str(exc)
                    print(f"{e[0]} {e[1]} failed: {exc}", flush=True)
                    continue
                decode[e].append(d["tokens_per_s"])
                pre[e].append(p["tokens_per_s"])
                tokens.setdefault(e, d["tokens"])
                bw.append(copy_bandwidth())
            print(f"round {r + 1} of {args.rounds} done", flush=True)

        copy_bw = statistics.median(bw)
        base = ("llama.cpp", "f32")
        base_d = statistics.median(decode[base]) if decode.get(base) else float("nan")
        base_p = statistics.median(pre[base]) if pre.get(base) else float("nan")
        print(f"\nmoe-125m (hidden 768, 12 layers, 16 experts top-4, vocab 16384), {args.threads} threads, "
              f"batch-1 greedy decode of {args.new_tokens} tokens after a {len(prompt)}-token prompt, "
              f"prefill of {args.prefill}; medians of {args.rounds} alternated rounds x {args.runs} runs; "
              f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; llama.cpp's q8_0 / q4_0 output matrix: "
              f"{'bf16, as ours' if args.output_type == 'bf16' else 'its default (q8_0 / q6_K)'}\n")
        print("| engine | weights | decode tok/s | vs llama.cpp f32 | vs llama.cpp, nearest type | "
              "of the copy roofline | prefill tok/s | vs llama.cpp f32 | vs llama.cpp, nearest type |")
        print("|---|---|---|---|---|---|---|---|---|")
        for e in engines:
            who, kind = e
            if e in failed:
                print(f"| {who} | {kind} | failed: {failed[e]} | | | | | | |")
                continue
            d, p = statistics.median(decode[e]), statistics.median(pre[e])
            # ours beside llama.cpp's first type that OURS maps to this precision (bf16: f16)
            twin = ("llama.cpp", next((k for k in args.types if OURS.get(k) == precision(kind)), kind))
            same_d, same_p = "", ""
            if who == "nemotron" and decode.get(twin):
                same_d = f"{d / statistics.median(decode[twin]):.2f} ({twin[1]})"
                same_p = f"{p / statistics.median(pre[twin]):.2f} ({twin[1]})"
            roof = copy_bw / decode_bytes(ours_ckpt[precision(kind)] if who == "nemotron" else ckpt, precision(kind),
                                          who == "llama.cpp" and kind in ("q8_0", "q4_0") and args.output_type == "bf16")
            prefill = f"{p:.0f} | {p / base_p:.2f} | {same_p}" if p == p else "as above | | "
            print(f"| {who} | {kind} | {d:.1f} | {d / base_d:.2f} | {same_d} | {d / roof:.0%} | {prefill} |")
        ref = tokens.get(base)
        for kind in ("float32", "float32" + COMPILED):
            mine = tokens.get(("nemotron", kind))
            if ref is not None and mine is not None:
                same = next((i for i, (x, y) in enumerate(zip(ref, mine)) if x != y), min(len(ref), len(mine)))
                print(f"greedy tokens, llama.cpp f32 against ours {kind}: the first {same} of {len(ref)} are the same")


if __name__ == "__main__":
    main()
