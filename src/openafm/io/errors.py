"""Errors a user can act on (bad file, unknown model, failed fetch): printed as one line by the CLI."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or of an unsupported kind."""


class FetchError(RuntimeError):
    """The model could not be fetched or verified."""
