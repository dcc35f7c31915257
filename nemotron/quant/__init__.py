"""Low precision: NVFP4, FP8 and MXFP4 formats (formats.py), quantized linear layers and experts
(modules.py), the ModelOpt Hugging Face checkpoint format (modelopt.py) and `nemotron quantize`
(quantize.py)."""
