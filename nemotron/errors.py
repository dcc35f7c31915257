"""Typed exceptions. Every failure the user can cause says what went wrong in one line."""


class NemotronError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(NemotronError, ValueError):
    """A config.json (or preset, or override) that cannot describe a model."""


class CheckpointError(NemotronError):
    """A checkpoint directory or file that cannot be loaded: missing, truncated, mis-shaped, unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint (.bin/.pt/.pth) met without `allow_pickle=True`."""
