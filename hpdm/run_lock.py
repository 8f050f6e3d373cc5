"""One trainer per run folder: an exclusive ``flock`` on ``run_dir/train.lock`` for the life of the process.

The kernel drops the lock when the process dies, so a job killed with SIGKILL leaves nothing to clean up. Forked
children (the DataLoader workers) close their copy of the file at once: sharing it, they held the lock for
seconds after the trainer was killed, and a restart in that time was refused.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
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
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        if not self.file.closed:
            self.file.close()  # the child's reference only: no LOCK_UN, which would release the parent's lock

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


WRITTEN = ("checkpoints", "samples", "metrics.jsonl", "config.yaml", "deepspeed.json", "wandb_run_id", "progress.png")


def check_run_dir_writable(run_dir: Path) -> None:
    """A ConfigError naming the first part of a run folder that this user cannot write (its checkpoints/ or
    samples/ folder, a file the trainer appends to or replaces): found at the start, not at the first save or
    sample after hours of training."""
    for p in (run_dir, *(run_dir / name for name in WRITTEN)):
        try:
            if p.is_dir():
                tempfile.TemporaryFile(dir=p).close()
            elif p.is_file():
                open(p, "a").close()  # noqa: SIM115
        except OSError as exc:
            raise ConfigError("train.run_dir", f"cannot write {p} ({exc.strerror or exc}): the run folder and "
                              "everything in it must be writable by this user; fix their owner or mode") from None
