"""Engine errors, split by scope: per-request input errors, checkpoint errors, and fatal runtime errors."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(EngineError):
    """A checkpoint directory is missing files, has unreadable files, or its keys/shapes do not match."""


class InvalidRequestError(EngineError, ValueError):
    """One request is invalid (bad image, bad size, bad parameter); only that request fails."""
