"""The run folder's lock (hpdm/run_lock.py): one trainer at a time, and free as soon as a killed one is gone."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpdm.errors import UserError
from hpdm.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import os, sys, time
    from hpdm.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    if os.fork() == 0:  # as a DataLoader worker is forked: it outlives a killed trainer by seconds
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_killed_trainers_lock_is_free_while_its_forked_workers_live(tmp_path):
    """The workers shared the trainer's open lock file, so a restart right after `kill -9` was refused, naming the
    dead trainer, until they noticed and exited (about 6 s)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"is in use by another `hpdm train` \\(pid {proc.pid} on"):
            RunLock(tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.killpg(proc.pid, 0)  # the forked child still runs
        lock = RunLock(tmp_path)
        assert (tmp_path / "train.lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
