"""``hpdm info``: what a config costs before it runs: parameters per component, forward FLOPs per level, and the
memory of one process at the micro-batch a run takes (an analytic estimate, see hpdm/flops.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

from hpdm.config import Config
from hpdm.ds_config import deepspeed_config
from hpdm.errors import UsageError
from hpdm.flops import activation_bytes, as_on_gpu, forward_flops_per_level, parameter_counts, state_bytes
from hpdm.model import HPDM

MAX_COUNT = 1_000_000  # far beyond any machine; larger numbers overflow the estimate's byte counts


def _micro_batch(cfg: Config, micro_batch: int | None, processes: int | None) -> tuple[int, str]:
    """The micro-batch of the estimate and where it comes from. A run's split (train.micro_batch, or --processes) is
    checked as training checks it; --micro-batch alone is a what-if and is not."""
    for flag, value in (("--micro-batch", micro_batch), ("--processes", processes)):
        if value is not None and not 1 <= value <= MAX_COUNT:
            raise UsageError(f"{flag}: must be between 1 and {MAX_COUNT:,}; got {value}")
    t = cfg.train
    if processes or (t.micro_batch and not micro_batch):
        run = replace(cfg, train=replace(t, micro_batch=micro_batch or t.micro_batch))
        micro = deepspeed_config(run, processes or 1)["train_micro_batch_size_per_gpu"]
        source = "--micro-batch" if micro_batch else "train.micro_batch" if t.micro_batch else ""
        return micro, ", ".join(filter(None, [source, f"{processes} processes" if processes else ""]))
    if micro_batch:
        return micro_batch, "--micro-batch"
    return 1, (f"train.micro_batch is unset, so a run takes train.batch_size / processes ({t.batch_size} / P): give "
               "--processes P or --micro-batch N")


def size(n: int) -> str:
    """Bytes as GiB, or as MiB below one (a tiny config's figures were all 0.00 GiB)."""
    return f"{n / 2**30:>9.2f} GiB" if n >= 2**30 else f"{n / 2**20:>9.1f} MiB"


def print_info(cfg: Config, micro_batch: int | None = None, processes: int | None = None) -> None:
    """The report of `hpdm info`, on stdout."""
    micro, why = _micro_batch(cfg, micro_batch, processes)
    m = cfg.model
    with torch.device("meta"):
        model = HPDM(m)
    counts = parameter_counts(model)
    print(f"model: {m.levels} levels of {'x'.join(map(str, m.patch))} patches, video {'x'.join(map(str, m.resolution))}, "
          f"{m.blocks} blocks, levels per block {list(m.levels_per_block)}")
    print(f"\n{'component':<22}{'parameters':>16}")
    for name, n in counts.items():
        print(f"{name:<22}{n:>16,}")
    print(f"\n{'level':<8}{'resolution':>16}{'blocks':>8}{'fwd GFLOP/sample':>20}")
    for level, fl in enumerate(forward_flops_per_level(m)):
        res = "x".join(str(p * 2 ** level) for p in m.patch)
        blocks = sum(n > level for n in m.levels_per_block)
        print(f"{level:<8}{res:>16}{blocks:>8}{fl / 1e9:>20.2f}")
    total = sum(forward_flops_per_level(m))
    print(f"{'all':<8}{'':>16}{'':>8}{total / 1e9:>20.2f}   (training: {3 * total / 1e9:.2f} GFLOP/sample)")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    gpu = as_on_gpu(m)
    act, ckpt = activation_bytes(gpu, micro, dtype), activation_bytes(gpu, micro, dtype, checkpointed=True)
    state = state_bytes(counts["total"], cfg.train.precision)
    print(f"\nmemory estimate per process, micro-batch {micro} ({why}), {cfg.train.precision} (no ZeRO "
          "partitioning; no allocator overhead, workspaces or backward temporaries):")
    print(f"  {'activation memory, micro-batch ' + str(micro):<52}{size(act)}   (saved for backward, {gpu.kernels} kernels)")
    print(f"  {'  with train.activation_checkpointing':<52}{size(ckpt)}   (block inputs + one block recomputed)")
    print(f"  {'weights':<52}{size(state['weights'])}")
    print(f"  {'gradients':<52}{size(state['gradients'])}")
    master = " + fp32 master weights" if cfg.train.precision == "bf16" else ""
    print(f"  {'optimizer state':<52}{size(state['optimizer'])}   (two fp32 moments{master})")
    fixed = sum(state.values())
    print(f"  {'total':<52}{size(fixed + act)}   ({size(fixed + ckpt).strip()} with activation checkpointing)")
