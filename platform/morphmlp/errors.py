"""User-facing failure classes.

One exception type per class of failure a user can cause; each message names the file, row,
column or value at fault and, where there is a closed set, the allowed values. Library code
raises these; entry points in jobs/ turn them into a one-line error and a non-zero exit.
"""


class MorphMLPError(Exception):
    """Base class: a problem with the user's input, configuration or environment."""


class ConfigError(MorphMLPError, ValueError):
    """An invalid configuration: unknown key, wrong type, or values that don't fit together."""


class StorageError(MorphMLPError):
    """A URI that can't be read or written (missing, no permission, unreachable endpoint)."""
