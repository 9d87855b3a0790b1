"""One project error type, caught at the CLI boundary and printed as one line."""


class PmnodeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(PmnodeError, ValueError):
    """Bad configuration. Subclasses ValueError so pydantic validators report it per field."""


class DataError(PmnodeError):
    """Missing or unusable training data."""
