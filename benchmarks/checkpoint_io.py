"""Time a checkpoint save and restore (DeepSpeed engine state + EMA + our state) for a model config.

One process, ZeRO stage and optimizer from the config, real optimizer state (one step on a cheap loss so that
the moments exist). Prints a table and writes JSON. Example:

    python benchmarks/checkpoint_io.py --config configs/ucf101_hpdm_m.yaml --out benchmarks/checkpoint_io.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import deepspeed
import torch

from hpdm.checkpoint import Checkpointer
from hpdm.config import load_config
from hpdm.distributed import init_distributed
from hpdm.ds_config import deepspeed_config
from hpdm.ema import EMA
from hpdm.model import HPDM
from hpdm.optim import build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ucf101_hpdm_m.yaml")
    p.add_argument("--dir", default="", help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--out", default="checkpoint_io.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rank, world, device = init_distributed()
    cfg = load_config(args.config, ["train.batch_size=1", *args.overrides])
    model = HPDM(cfg.model).to(device)
    ema = EMA(model, cfg.train.ema_halflife)
    t = cfg.train
    opt = build_optimizer(model, t.optimizer, t.lr, t.betas, t.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
    cheap = sum(q.float().sum() for q in engine.module.parameters()) * 0.0  # creates gradients and optimizer state
    engine.backward(cheap)
    engine.step()
    root = Path(args.dir or tempfile.mkdtemp(prefix="hpdm-ckpt-"))
    ckpt = Checkpointer(root)
    t0 = time.perf_counter()
    path = ckpt.save(engine, ema, 1, 1, {"version": 1}, torch.Generator().get_state(), {"config": cfg.to_dict()})
    save_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir())
    t0 = time.perf_counter()
    ckpt.load(engine, ema, path)
    load_s = time.perf_counter() - t0
    params = sum(q.numel() for q in model.parameters())
    row = {"config": args.config, "params": params, "zero_stage": t.zero_stage, "optimizer": t.optimizer,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world_size": world,
           "bytes": size, "save_s": save_s, "restore_s": load_s}
    print(f"{'config':<30}{'params':>14}{'size GB':>10}{'save s':>9}{'restore s':>11}")
    print(f"{args.config:<30}{params:>14,}{size / 1e9:>10.2f}{save_s:>9.1f}{load_s:>11.1f}")
    Path(args.out).write_text(json.dumps(row, indent=1))
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
