"""3 LAMB steps of a tiny model under DeepSpeed at a given ZeRO stage; rank 0 saves the final weights.

Usage: lamb_zero_run.py STAGE OUT [--no-attach]. The global batch is 8 whatever the number of processes, each rank
taking its slice of the same deterministic data, so that every world size and stage should give the same weights."""
import sys

import deepspeed
import torch
from torch import nn

from hpdm.distributed import init_distributed
from hpdm.optim import Lamb, attach_partitions, param_groups

BATCH = 8


def main(stage: int, out: str, attach: bool) -> None:
    rank, world, _ = init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 5))
    opt = Lamb(param_groups(model, 0.1), lr=0.05)
    config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if attach:
        attach_partitions(engine)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 5, generator=g)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        engine.backward(nn.functional.mse_loss(engine(x[part]), y[part]))
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        torch.save(weights, out)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    main(int(args[0]), args[1], "--no-attach" not in args)
