"""The exception hierarchy. The CLI prints any of these as one line and exits 1.

Asserts are kept for internal invariants only; everything a user can cause raises one of these.
"""


class VarstudentError(Exception):
    """Base class: an error the user can act on, printed without a traceback."""


class ConfigError(VarstudentError):
    """params.yaml or a --set override is invalid."""


class DataError(VarstudentError):
    """A dataset is missing, corrupt, or does not match its pinned checksum."""


class ArtifactError(VarstudentError):
    """A saved model or stage output is missing, truncated, or does not match its spec."""


class TrainingError(VarstudentError):
    """Training cannot proceed (e.g. the loss became NaN or inf)."""


class ServiceError(VarstudentError):
    """An external service (tracking server, registry) is unreachable or refused the request."""
