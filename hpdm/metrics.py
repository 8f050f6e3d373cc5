"""Training metrics: console, wandb (offline unless WANDB_MODE says otherwise) and a JSONL file, on rank 0.

MFU divides achieved model FLOP/s (the analytic count of hpdm.flops) by the accelerators' dense peak for
the training precision; it is left out where the peak is unknown (CPUs, unlisted GPUs).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import uuid
from pathlib import Path

import torch

from data_pipeline.local_files import write_atomic
from data_pipeline.storage import without_userinfo
from hpdm.errors import UserError

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU (NVIDIA's datasheets, half the "with sparsity" figures): (bf16, tf32). fp32 runs use
# TF32 matmuls on these GPUs. The PCIe and NVL cards of a chip run at lower clocks than its SXM module.
PEAK_TFLOPS = {"H100 PCIe": (756, 378), "H100 NVL": (835, 418), "H200 NVL": (835, 418), "H200": (989, 494),
               "H100": (989, 494), "A100": (312, 156), "L40S": (362, 183), "L40": (181, 90), "A10": (125, 62)}


def peak_flops(device: torch.device, precision: str, name: str | None = None) -> float | None:
    """The dense peak FLOP/s of ``device`` (``name``: its CUDA name) for MFU; None where it is not known."""
    if device.type != "cuda":
        return None
    name = name or torch.cuda.get_device_name(device)
    key = next((k for k in sorted(PEAK_TFLOPS, key=len, reverse=True) if k in name), None)  # "H100 NVL" before "H100"
    if key is None:
        return None
    bf16, tf32 = PEAK_TFLOPS[key]
    return 1e12 * (bf16 if precision == "bf16" else tf32)


def memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/gpu_max_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"mem/host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def drop_after(path: Path, step: int) -> None:
    """Remove the lines of ``path`` (metrics.jsonl) logged after ``step`` (a resumed run logs those steps again)
    and a line cut short by a kill."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        write_atomic(path, "".join(kept))


WANDB_MODES = ("offline", "online", "disabled", "dryrun", "shared", "run")  # what wandb.init accepts


def wandb_mode() -> str:
    """WANDB_MODE, offline where unset or empty; checked at the start of training (wandb refuses others late)."""
    mode = os.environ.get("WANDB_MODE", "").strip() or "offline"
    if mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a wandb mode: use one of {', '.join(WANDB_MODES)} "
                        "(offline where unset)")
    return mode


def drop_samples_after(folder: Path, step: int) -> None:
    """Remove the samples (``step_N.png``, ``.mp4``) of steps after ``step``, as ``drop_after`` their metrics: a run
    resumed from an earlier checkpoint (after a kill) trains those steps again; they showed weights that are gone."""
    gone = sorted(f for f in folder.glob("step_*.*") if f.stem[5:].isdigit() and int(f.stem[5:]) > step)
    for f in gone:
        f.unlink()
    if gone:
        log.info("removed %d samples of steps after step %d, which this run trains again (%s, ...)", len(gone), step,
                 gone[0].name)


def wandb_run_id(run_dir: Path, resumed_at: int) -> str:
    """The wandb run that this run folder logs to: the same one when it resumes, a new one when it starts afresh
    or was copied (the copy's folder is another inode; wandb would drop the copy's steps as going backwards).
    Moving a run folder, or reaching it through another mount, keeps its wandb run."""
    id_file, inode = run_dir / "wandb_run_id", str(run_dir.stat().st_ino)
    run_id, recorded = ((id_file.read_text().split() if id_file.is_file() else []) + ["", ""])[:2]
    if resumed_at == 0 or not run_id or recorded not in ("", inode):  # "": recorded before the inode was
        if run_id and resumed_at:
            log.info("%s is a copy of another run folder: it logs to a new wandb run", run_dir)
        run_id = uuid.uuid4().hex[:12]
    id_file.write_text(f"{run_id}\n{inode}\n")
    return run_id


class Metrics:
    def __init__(self, config: dict, run_dir: Path, project: str, rank: int, resumed_at: int = 0):
        self.rank, self.run, self.file = rank, None, None
        if rank != 0:
            return
        drop_after(run_dir / "metrics.jsonl", resumed_at)
        drop_samples_after(run_dir / "samples", resumed_at)
        self.file = open(run_dir / "metrics.jsonl", "a")
        mode = os.environ["WANDB_MODE"] = wandb_mode()  # wandb reads it too, and refuses an empty one
        if mode != "disabled":
            import wandb  # noqa: PLC0415

            sys.argv[1:] = [without_userinfo(a) for a in sys.argv[1:]]  # wandb records the command line
            try:
                self.run = wandb.init(project=project, dir=str(run_dir), config=config, mode=mode, name=run_dir.name,
                                      id=wandb_run_id(run_dir, resumed_at), resume="allow")
            except Exception as exc:  # wandb's own: no API key, no network, a project or entity it refuses
                self.file.close()
                first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
                hint = ("log in (`wandb login`, or WANDB_API_KEY), or set WANDB_MODE=offline (the default; `wandb "
                        "sync` uploads later) or disabled") if mode in ("online", "shared", "run") else \
                    "set WANDB_MODE=disabled to train without wandb"
                raise UserError(f"wandb (WANDB_MODE={mode}) did not start: {type(exc).__name__}: {first}; {hint}") from None

    def log(self, values: dict, samples: int) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"samples": samples, **values}) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(values, step=samples)

    def image(self, key: str, path: Path, samples: int) -> None:
        """An image file (a sample grid) to wandb; the file itself stays in the run folder."""
        if self.rank == 0 and self.run is not None:
            import wandb  # noqa: PLC0415

            self.run.log({key: wandb.Image(str(path))}, step=samples)

    def close(self, failed: bool = False) -> None:
        """Close the file and finish wandb (both, whatever fails); after a failure (a full disk) their errors are
        warnings, so that they do not replace the error that ended training."""
        errors = []
        for what, close in (("metrics.jsonl", self.file and self.file.close),
                            ("wandb", self.run and (lambda: self.run.finish(exit_code=1 if failed else 0)))):
            try:
                if close:
                    close()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                if failed:
                    log.warning("%s was not closed cleanly (%s)", what, exc)
        if errors and not failed:
            raise errors[0]
