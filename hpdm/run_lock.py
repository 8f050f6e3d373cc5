"""One trainer per run folder: an exclusive ``flock`` on ``run_dir/train.lock`` for the life of the process.

The kernel drops the lock when the process dies, so a job killed with SIGKILL leaves nothing to clean up.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from hpdm.errors import ConfigError, UserError


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "train.lock"
        try:
            self.file = open(self.path, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
        except OSError as exc:  # a read-only or foreign folder
            raise ConfigError("train.run_dir", f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{run_dir} is in use by another `hpdm train` ({holder}); wait for it to end or choose "
                            "another train.run_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
