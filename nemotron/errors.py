"""Typed exceptions. Every failure the user can cause says what went wrong in one line."""


class NemotronError(Exception):
    """Base class of every error this package raises on bad input.

    A message is one line whatever it quotes: line breaks in names read from a file (a tensor name, a
    key) are shown escaped, so a CLI `error: ...` line or a log record can never be split."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (args[0].replace("\r", "\\r").replace("\n", "\\n"),)
        super().__init__(*args)


class ConfigError(NemotronError, ValueError):
    """A config.json (or preset, or override) that cannot describe a model."""


class CheckpointError(NemotronError):
    """A checkpoint directory or file that cannot be loaded: missing, truncated, mis-shaped, unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint (.bin/.pt/.pth) met without `allow_pickle=True`."""


class NemotronWarning(UserWarning):
    """Something that works, but not quite as asked: the user should know (the CLI prints one
    `warning: ...` line)."""


class CheckpointWarning(NemotronWarning):
    """A checkpoint that loads, but only after a repair or a decision the user should know about
    (a producer's known name defect, a quantization config the tensors contradict)."""
