"""User-facing error types. Every message names the bad input and what to do about it."""

from __future__ import annotations


class NiteruError(Exception):
    """Base class for errors meant to be read by a person (no traceback needed)."""


class ConfigError(NiteruError, ValueError):
    """A parameter or configuration value is missing, unknown or invalid."""


class SchemaError(NiteruError, ValueError):
    """An input table does not have the expected columns or types."""


class BadImageError(NiteruError, ValueError):
    """An image cannot be decoded or is unsafe to decode (truncated, not an image, too large)."""


class StageError(NiteruError, RuntimeError):
    """A chain stage failed; the message points at the stage, notebook and failing cell."""


class GateFailed(NiteruError, RuntimeError):
    """A quality gate failed; ``check`` names the failing check so the chain stops before packaging."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(f"quality gate '{check}' failed: {message}")
