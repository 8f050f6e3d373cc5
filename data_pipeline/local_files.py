"""Local files that a kill or a full disk cannot leave half written.

:func:`write_atomic` writes through a temporary name; :func:`disk_full` recognises a full disk or quota in the
errors of the writers we use (OSError, safetensors, torch.save); :func:`remove_orphaned_tmpdirs` and
:func:`remove_stale_temporaries` clear what killed processes left. Tests' fault injector (``tests/faults``)
patches :func:`write_atomic` here.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket

log = logging.getLogger(__name__)


def disk_full(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` comes from a full disk or an exhausted quota: its errno, a library's message with the OS's
    words (safetensors), or, for a writer that says neither (torch.save's "unexpected pos"), under 1 MiB free at
    ``where``."""
    for e in (e for e in (exc, exc.__cause__, exc.__context__) if e is not None):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or any(
                s in str(e) for s in ("No space left on device", "Disk quota exceeded")):
            return True
    if where is None:
        return False
    path = os.path.abspath(where)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free < 1 << 20


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a local file through a temporary name: an interrupted write (a kill, a full disk) leaves the old file
    or none, never a truncated one under ``path``."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename in (tmp, None) and exc.errno:  # name the file the user knows
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc  # of the same subclass (PermissionError)
        raise


def _gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (a reused number counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's running process
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove the ``NAME.tmpPID`` files (:func:`write_atomic`) and folders (a conversion's) in ``folder`` of
    processes on this host that are gone: a kill at the moment of a rename leaves them, and nothing else would.
    Called by the one process that holds the folder's run lock."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = re.fullmatch(r".+\.tmp(\d+)", name)
        if m and _gone(int(m.group(1))):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            log.info("removed %s, left by an interrupted write (process %s)", path, m.group(1))


def remove_orphaned_tmpdirs(base: str) -> None:
    """Remove the ``.hpdm-tmp-HOST-PID-*`` folders in ``base`` of processes on this host that are gone."""
    for name in (n for n in os.listdir(base) if n.startswith(".hpdm-tmp-")):
        host, _, pid = name.removeprefix(".hpdm-tmp-").rpartition("-")[0].rpartition("-")  # HOST-PID-RANDOM
        if host != socket.gethostname() or not pid.isdigit() or not _gone(int(pid)):
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        log.info("removed %s, left by an interrupted write (process %s)", os.path.join(base, name), pid)
