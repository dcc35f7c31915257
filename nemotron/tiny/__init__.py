"""The embedded tiny Nemotron 3: procedural tasks with verifiable answers (`tasks`), its tokenizer,
the recipe that trains it end to end (`recipe`), its held-out evaluation (`evaluate`), and the
trained checkpoint itself (`MODEL_DIR`), loadable offline as `nemotron.load("tiny")`."""

from nemotron.config.presets import EMBEDDED_MODEL_DIR as MODEL_DIR

__all__ = ["MODEL_DIR"]
