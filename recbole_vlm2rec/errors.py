"""Errors a user can act on (bad data, bad configuration), reported by the commands without a traceback."""


class VLM2RecError(Exception):
    """Base class: the message names the file, field or value at fault and what to do."""


class ConfigError(VLM2RecError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(VLM2RecError, ValueError):
    """Input data (atomic files, sidecars, feature arrays, images) is missing or malformed."""
