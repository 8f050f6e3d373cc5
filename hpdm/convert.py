"""``hpdm convert-checkpoint``: a sharded ZeRO 1-3 checkpoint made loadable at any number of processes."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from data_pipeline.local_files import disk_full, remove_stale_temporaries
from hpdm.checkpoint import Checkpointer
from hpdm.checkpoint_folder import (RAW_FILE, UNIVERSAL_MARK, file_sizes, is_complete, is_universal, is_whole, order,
                                    problems, read_state)
from hpdm.errors import CheckpointError
from hpdm.safe_load import no_pickle


def convert_to_universal(src: str | Path) -> tuple[Path, bool]:
    """Convert a checkpoint (or a run's latest) with DeepSpeed's ``ds_to_universal`` so that it loads at any
    world size; the result sits beside it as ``<name>_universal``. It becomes the run's latest (returned True)
    when its source was: converting an older one must not make the next resume go back to it."""
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415

    src = Path(src)
    ckpt = src if is_complete(src) else Checkpointer(src).latest()
    if ckpt is None:
        raise CheckpointError(f"{src} is neither a checkpoint folder nor a run with checkpoints")
    if wrong := problems(ckpt):
        raise CheckpointError("; ".join(wrong))
    if is_universal(ckpt):
        raise CheckpointError(f"{ckpt} is already universal")
    if is_whole(ckpt):
        raise CheckpointError(f"{ckpt} needs no conversion: it holds the whole optimizer state (ZeRO-0), which any "
                              "number of processes resumes from")
    out = ckpt.parent / f"{ckpt.name}_universal"
    remove_stale_temporaries(ckpt.parent)  # those of killed conversions (and writes), which no one else removes
    tmp = ckpt.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        _convert(ds_to_universal, ckpt, tmp)
    except BaseException as exc:
        full = isinstance(exc, Exception) and disk_full(exc, tmp)  # before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)  # a hidden folder that would keep the disk full
        if full:
            raise CheckpointError(f"converting {ckpt}: no space left on device on its filesystem (the universal "
                                  f"checkpoint needs about as much again as {ckpt.name}); {ckpt.name} is as it was") from exc
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (ckpt.parent / "latest_universal").unlink(missing_ok=True)  # written by ds_to_universal inside tmp's parent
    run = Checkpointer(ckpt.parent.parent)
    latest = order(ckpt.name)[0] >= order(run.newest_local())[0]
    if latest:
        run.set_latest(out.name)
    return out, latest


def _convert(ds_to_universal, ckpt: Path, tmp: Path) -> None:
    """Write the universal form of ``ckpt`` into ``tmp``, with the files of ours it keeps and its state.json."""
    argv = sys.argv
    try:
        sys.argv = ["ds_to_universal", "--input_folder", str(ckpt), "--output_folder", str(tmp)]
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = argv
    with no_pickle():  # its worker processes are forked and inherit the restriction
        ds_to_universal.main(args)
    for f in ckpt.glob("rank_*.safetensors"):
        shutil.copy2(f, tmp / f.name)
    for name in ("ema.safetensors", RAW_FILE):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, tmp / name)
    (tmp / UNIVERSAL_MARK).write_text(f"converted from {ckpt.name}\n")
    state = read_state(ckpt)
    state["files"] = file_sizes(tmp)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
