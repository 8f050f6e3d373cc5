"""Errors a user can fix. The ``hpdm`` command prints them as one line (``hpdm <command>: error: ...``) and exits
2; every other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in a config, an option, the data, storage or a checkpoint; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, unsafe or made for another config."""


class UsageError(UserError):
    """A bad command-line option value."""


class DivergenceError(UserError):
    """Training stopped because its loss became non-finite or DeepSpeed kept skipping steps."""


class RankFailed(UserError):
    """Raised on every other rank when one rank failed with a user error (which that rank reports)."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions printed as one line: ours and the data pipeline's (which does not import hpdm)."""
    from data_pipeline.storage import StorageError  # noqa: PLC0415
    from data_pipeline.stream import DataError  # noqa: PLC0415 (SourceError, for manifests, is one)

    return UserError, DataError, StorageError
