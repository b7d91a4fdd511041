"""The errors vlm raises for its users, each with a message that says what to change.

The edges (the CLI, the page, the API) catch `VLMError` and show its message in one line;
any other exception is a bug and keeps its traceback. `InputError` is also a `ValueError`,
so code that expects one from a bad argument keeps working.
"""

from __future__ import annotations


class VLMError(Exception):
    """An error meant for the person running vlm: its message is the whole story."""


class InputError(VLMError, ValueError):
    """An input, a flag or a request that vlm refuses."""


class ConfigError(InputError):
    """A configuration (a model's config.json, the trainer's, a setting) that does not fit."""


class SequenceTooLong(InputError):
    """A prompt with its image prefixes longer than the LM reads."""


class ModelLoadError(VLMError, OSError):
    """A model that cannot be loaded: not on this machine and not downloadable, or not a model.
    `reason` is the cause in one line."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} could not be loaded: {reason}")
        self.name, self.reason = name, reason


def one_line(error: BaseException) -> str:
    """An exception's message cut to its first line (transformers' run to a paragraph)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
