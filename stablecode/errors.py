"""Errors a user can act on. The CLI prints these as one line, without a traceback."""


class StablecodeError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(StablecodeError):
    """An invalid or unsupported model configuration."""


class CheckpointError(StablecodeError):
    """A checkpoint directory that cannot be loaded as it is."""


class TokenizerError(StablecodeError):
    """A missing or unreadable tokenizer."""


class StablecodeWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


class CheckpointWarning(StablecodeWarning):
    """A checkpoint that loads but holds something suspicious (NaN or Inf weights)."""
