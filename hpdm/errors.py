"""Errors a user can fix. The ``hpdm`` command prints them as one line (``hpdm <command>: error: ...``) and exits
2; every other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in a config, an option, the data, storage or a checkpoint; the message says what and where."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, unsafe or made for another config."""


class UsageError(UserError):
    """A bad command-line option value."""
