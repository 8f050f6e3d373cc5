"""One checkpoint folder: the names of its files, its ``state.json``, and whether it is complete and intact.

Read by the trainer's :class:`~hpdm.checkpoint.Checkpointer`, export, conversion and ``hpdm doctor``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from hpdm.errors import CheckpointError

UNIVERSAL_MARK = "universal"  # file in a checkpoint folder converted by `hpdm convert-checkpoint`
RAW_FILE = "raw.safetensors"
_TAG = re.compile(r"^step_(\d+)(_universal)?$")


def order(tag: str) -> tuple[int, int]:
    """Sort key of checkpoint names: by step, a converted copy after its source; other names first."""
    m = _TAG.match(tag)
    return (int(m.group(1)), bool(m.group(2))) if m else (-1, 0)


def is_checkpoint_name(name: str) -> bool:
    """``step_N`` or a converted ``step_N_universal``."""
    return _TAG.match(name) is not None


def is_complete(path: Path) -> bool:
    return (path / "state.json").is_file()


def in_checkpoints(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder (it holds state.json) or a run's checkpoints/ folder."""
    return is_complete(path) or path.name == "checkpoints" and ((path / "latest").is_file() or any(path.glob("step_*")))


def is_universal(path: Path) -> bool:
    return (path / UNIVERSAL_MARK).is_file()


def is_whole(path: Path) -> bool:
    """Whether DeepSpeed kept the optimizer state whole (ZeRO-0: no per-rank ``*optim_states.pt``), so that any
    number of processes resumes from it as it is."""
    return not any(path.glob("*optim_states.pt"))


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, or a CheckpointError that names it."""
    f = path / "state.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{f}: cannot be read ({exc})") from exc
    if not isinstance(state, dict) or not {"step", "samples", "config"} <= state.keys():
        raise CheckpointError(f"{f}: not an hpdm checkpoint state (needs step, samples and config)")
    return state


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file`` with the mode a plain write gets from the umask: it makes every file 0600, so
    another user of a group-shared run folder could not resume, sample or export from it."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_readable(path: Path) -> None:
    """Raise a CheckpointError for a file of checkpoint ``path`` that this user may not read. Not damage, to skip
    over (an older checkpoint used, this one set aside), but a permission to fix."""
    f = path
    try:
        for f in [path, *path.iterdir()]:
            if f.is_dir():
                os.listdir(f)
            else:
                open(f, "rb").close()
    except PermissionError as exc:
        raise CheckpointError(f"{f}: permission denied ({exc.strerror}): this user cannot read it; fix its owner or "
                              "mode (a checkpoint that cannot be read is not taken for a damaged one)") from None


def problems(path: Path) -> list[str]:
    """What makes a checkpoint folder unusable, each naming its file; empty when it is complete and intact.
    Raises a CheckpointError when the user may not read it."""
    if not path.is_dir():
        return [f"{path} does not exist"]
    check_readable(path)
    if not is_complete(path):
        return [f"{path} has no state.json (its save did not finish)"]
    try:
        state = read_state(path)
    except CheckpointError as exc:
        return [str(exc)]
    found = []
    for name, size in state.get("files", {}).items():  # sizes recorded at save (older checkpoints have none)
        f = path / name
        if not f.is_file():
            found.append(f"{f} is missing")
        elif f.stat().st_size != size:
            found.append(f"{f} has {f.stat().st_size} bytes; {size} were written")
    for name in ("ema.safetensors", "rank_00000.safetensors", RAW_FILE):
        f = path / name
        if name == RAW_FILE and not f.is_file():
            continue  # written since issue 10 only
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 (missing, truncated or not safetensors)
            found.append(f"{f} cannot be read ({exc})")
    return found


def file_sizes(folder: Path, names=None) -> dict[str, int]:
    """{path relative to ``folder``: size} of ``names`` (default: every file below it)."""
    files = [folder / n for n in names] if names is not None else [p for p in folder.rglob("*") if p.is_file()]
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(files)}
