"""Errors a user can act on. The CLI prints these as one line, without a traceback."""


class StablecodeError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(StablecodeError):
    """An invalid or unsupported model configuration."""


class CheckpointError(StablecodeError):
    """A checkpoint directory that cannot be loaded as it is."""


class TokenizerError(StablecodeError):
    """A missing or unreadable tokenizer."""
