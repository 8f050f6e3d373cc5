"""Process-group set-up for the `deepspeed` launcher, torchrun, or a plain single process."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import time

import torch
import torch.distributed as dist

from hpdm.errors import RankFailed, UsageError, user_errors

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU); returns (rank, world, device)."""
    import deepspeed  # noqa: PLC0415 (heavy import, only for training)

    if "RANK" not in os.environ:  # a plain `hpdm train`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    missing = [v for v in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:  # DeepSpeed would go looking for MPI instead (a traceback about mpi4py); Kubeflow sets no LOCAL_RANK
        raise UsageError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start "
                         "with the deepspeed launcher or torchrun, or unset RANK and LOCAL_RANK left from another job")
    if int(os.environ["WORLD_SIZE"]) > 1:  # says what a start that waits for missing processes is waiting for
        log.info("rank %s joins a group of %s processes at %s:%s", os.environ["RANK"], os.environ["WORLD_SIZE"],
                 os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op with g++ the first time it starts in an
        # environment (35-45 s on 2 cores), for its inference all-reduce only; training reduces through gloo.
        # Marked unavailable, a CPU run needs no compiler and starts at once.
        getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if not cuda:
        atexit.register(_destroy_gloo_group)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cuda", local) if cuda else torch.device("cpu")


def _destroy_gloo_group() -> None:
    """Destroy the gloo process group and let its worker threads go idle while the interpreter is still whole.

    A gloo worker thread may drop the last reference to a finished collective's tensors a moment after the caller
    stopped waiting for it; if that happens during interpreter shutdown it cannot take the GIL and the process
    aborts ("terminate called without an active exception", exit -6; seen in a core dump of a 2-process ZeRO-2
    run, in 2 of 30 such runs on a 2-core CPU), after which the `deepspeed` launcher reports failure and kills the
    other ranks. DeepSpeed's engines keep the groups alive until then, so destroying them does not join those
    threads; the pause gives them the CPU to finish."""
    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(0.25)


def close_distributed() -> None:
    """Destroy the process groups once every rank has finished its command. PyTorch asks for this at a normal exit:
    NCCL warns at exit without it, and a rank could leave before its last collective reached the others. Not on an
    error: ranks that failed at different points would wait for each other here."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _raise_any(errors: list, mine: BaseException | None) -> None:
    """Raise this rank's own exception, else (when another rank failed) one that names that rank's error."""
    if mine is not None:
        raise mine
    for rank, err in enumerate(errors):
        if err is not None:
            user, text = err
            raise (RankFailed if user else RuntimeError)(f"rank {rank} failed: {text}")


def _describe(exc: BaseException | None):
    return None if exc is None else (isinstance(exc, user_errors()), str(exc))


def on_rank0(fn, *, first=None, share: bool = False):
    """Run ``first`` (if given) on every rank, then ``fn`` on rank 0 alone while the others wait.

    An exception on any rank is raised on every rank, so that no rank waits forever at the next collective.
    Returns ``fn``'s result on rank 0, and on every rank with ``share``."""
    world, rank = _world(), dist.get_rank() if dist.is_initialized() else 0
    mine = result = None
    if first is not None:
        try:
            first()
        except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
            mine = exc
        errors = [_describe(mine)]
        if world > 1:
            errors = [None] * world
            dist.all_gather_object(errors, _describe(mine))
        _raise_any(errors, mine)
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001
            mine = exc
    if world > 1:
        box = [(_describe(mine), result if share else None)]
        dist.broadcast_object_list(box, src=0)
        error, shared = box[0]
        _raise_any([error], mine)
        return result if rank == 0 else shared
    if mine is not None:
        raise mine
    return result


class Preemption:
    """Turns SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT) into a request to checkpoint and exit at the end of the
    current step; a second Ctrl-C stops at once. ``close`` gives the signals their previous handlers back.

    Every rank checks the request collectively, so that all of them stop after the same step even when the
    signal reached only some of them."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal is not None:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                log.warning("Ctrl-C: checkpointing after this step, then exiting (Ctrl-C again: stop at once, unsaved)")
        if self.signal is None:  # the first is what the user sent (DeepSpeed's launcher follows a Ctrl-C with SIGTERM)
            self.signal = signum

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal: a collective with several ranks (it waits for the GPU), else a flag."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
