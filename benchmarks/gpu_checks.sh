#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a session that is lent one (run from the
# repository root with the package installed): the server's 8-stream / 1-stream decode ratio
# (issue 4), MTP speculation's speed-up on the embedded model (issue 6), and the quantized layers,
# KV cache and SSM state options on CUDA (issue 7). Each step is bounded in time.
set -u
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
echo "== serving: 1 and 8 streams on the embedded model =="
timeout 240 python benchmarks/serve_load.py --model tiny --device cuda --levels 1 8 --requests 4 --new-tokens 128
echo "== MTP speculation on the embedded model =="
timeout 180 python benchmarks/tiny_mtp.py --device cuda --runs 3 --questions 12
echo "== quantized execution on CUDA =="
timeout 120 python - <<'PY'
import tempfile, torch, nemotron
from nemotron.cache import CacheOptions
from nemotron.quant.quantize import quantize_model, save_quantized
texts = ["What is 12 * 7? 10 * 7 = 70 and 2 * 7 = 14, so 84."] * 4
for fmt in ("nvfp4", "fp8"):
    with tempfile.TemporaryDirectory() as d:
        cpu = nemotron.load("tiny")
        cfg, report = quantize_model(cpu, fmt, texts, kv_cache=True)
        save_quantized(cpu, cfg, d, report)
        ref = nemotron.load(d)
        gpu = nemotron.load(d, device="cuda", cache=CacheOptions(kv_dtype="fp8", ssm_dtype="float16", ssm_rounding="stochastic"))
        ids = torch.randint(5, 1000, (2, 24))
        with torch.inference_mode():
            err = (gpu.model(ids.cuda()).cpu() - ref.model(ids)).abs().max().item()
        q = [{"role": "user", "content": "What is (3 + 15) * 2 + 14?"}]
        print(fmt, "max |logit diff| cuda vs cpu:", err, "| answer:", gpu.chat(q, max_new_tokens=160).content)
PY
