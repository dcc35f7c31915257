"""Checkpoints in and out: the safetensors reader, checkpoint load/save and validation, the tokenizer."""
