"""nemotron: the NVIDIA Nemotron model family in plain PyTorch.

    import nemotron
    m = nemotron.load("path/to/checkpoint")      # or a preset name
    logits = m.model(input_ids)                   # [B, T] -> [B, T, V]
"""

from __future__ import annotations

import warnings

# torch warns at import when numpy is absent; nothing here uses numpy (it is not a dependency)
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from nemotron.api import LoadedModel, load
from nemotron.config import (LlamaConfig, MistralConfig, Nemotron4Config, NemotronHConfig, NemotronNASConfig, config_from_dict,
                     load_config)
from nemotron.errors import CheckpointError, ConfigError, NemotronError, UnsafeCheckpointError

__all__ = [
    "load", "LoadedModel", "config_from_dict", "load_config",
    "NemotronHConfig", "Nemotron4Config", "NemotronNASConfig", "LlamaConfig", "MistralConfig",
    "NemotronError", "ConfigError", "CheckpointError", "UnsafeCheckpointError",
]
__version__ = "0.1.0"
