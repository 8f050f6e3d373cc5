"""Worker processes for one-off parallel work (make-shards, the synthetic set) that stop with their parent."""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import signal
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent reports it
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the trainer's preemption handler, inherited, only set a flag: the
        signal.signal(sig, signal.SIG_DFL)  # workers of a trainer killed while writing the synthetic set lived on
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent when it is killed alone (by a
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # scheduler, the OOM killer)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A forking ProcessPoolExecutor whose queued work is dropped when the parent is interrupted (leaving the
    ``with`` waited for every submitted task: hours of shards after a Ctrl-C) and whose workers end with it."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
