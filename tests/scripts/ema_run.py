"""Train the tiny model for 3 steps on fixed data under ZeRO-3 and write its EMA (rank 0).

Run by one process, or by the deepspeed launcher with two: each rank takes its slice of the same global batch,
so both runs see the same data and the EMAs must agree to fp32 tolerance.
"""
import sys

import deepspeed
import torch
from safetensors.torch import save_file

from hpdm.config import load_config
from hpdm.diffusion import EDM, Condition
from hpdm.distributed import init_distributed
from hpdm.ds_config import deepspeed_config
from hpdm.ema import EMA
from hpdm.model import HPDM
from hpdm.optim import build_optimizer
from hpdm.pyramid import boxes_from_offsets, sample_offsets

out = sys.argv[-1]
rank, world, device = init_distributed()
cfg = load_config("configs/tiny.yaml", ["train.zero_stage=3", "train.batch_size=4", "model.kernels=reference"])
m, B = cfg.model, cfg.train.batch_size
torch.manual_seed(0)
model = HPDM(m)
ema = EMA(model, halflife_samples=8, rampup=0)
if rank == 0:
    save_file({k: v.clone() for k, v in ema.state_dict().items()}, out + ".init")
optimizer = build_optimizer(model, "adamw", 2e-3, (0.9, 0.99), 0.01)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
edm = EDM(cfg.diffusion)
micro = B // world
mine = slice(rank * micro, (rank + 1) * micro)
for step in range(3):
    g = torch.Generator().manual_seed(step)
    x0 = torch.rand(B, m.levels, 3, *m.patch, generator=g) * 2 - 1
    boxes = boxes_from_offsets(sample_offsets(B, m.levels, m.patch, g), m.patch)
    sigma, noise = edm.sample_sigma(B, m.levels, "cpu", g), torch.randn(x0.shape, generator=g)
    labels = torch.arange(B) % m.num_classes
    loss, _ = edm.loss(engine, x0[mine], boxes[mine], Condition(labels=labels[mine]), sigma[mine], noise[mine])
    engine.backward(loss)
    engine.step()
    ema.update(engine.module, B, (step + 1) * B)
if rank == 0:
    save_file(ema.state_dict(), out)
