"""Training: wires the data pipeline, the pyramid, the model, EDM and a DeepSpeed engine into one loop.

Progress is counted in samples (clips); a run resumes from its directory's latest checkpoint with no flag.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline import build_loader, prepare_dataset
from hpdm.checkpoint import Checkpointer
from hpdm.config import Config, ConfigError, save_config
from hpdm.diffusion import EDM, Condition
from hpdm.distributed import init_distributed
from hpdm.ema import EMA
from hpdm.flops import training_flops_per_sample
from hpdm.model import HPDM
from hpdm.optim import build_optimizer, lr_factor
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from hpdm.video_io import to_uint8, write_mp4
from kernels import gather_pyramid

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON generated from our config; ``train.deepspeed`` keys are merged over it."""
    t = cfg.train
    micro = t.micro_batch or t.batch_size // world
    if t.batch_size % (micro * world):
        raise ConfigError("train.batch_size", f"{t.batch_size} is not a multiple of micro_batch ({micro}) x processes ({world})")
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (micro * world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }
    ds.update(t.deepspeed)
    return ds


class Metrics:
    """Console and wandb (offline unless WANDB_MODE says otherwise) on rank 0."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int):
        self.run = None
        if rank == 0 and os.environ.get("WANDB_MODE", "offline") != "disabled":
            import wandb  # noqa: PLC0415

            self.run = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), config=cfg.to_dict(),
                                  mode=os.environ.get("WANDB_MODE", "offline"), name=run_dir.name, resume="allow")

    def log(self, values: dict, samples: int) -> None:
        if self.run is not None:
            self.run.log(values, step=samples)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _cond(cfg: Config, batch: dict, device) -> Condition:
    if cfg.model.cond == "class":
        return Condition(labels=batch["label"].to(device))
    if cfg.model.cond == "text":
        raise ConfigError("model.cond", "training with text conditioning needs precomputed text embeddings in the "
                                        "shards, which the data pipeline does not provide yet")
    return Condition()


def sample_video(net, edm: EDM, cfg: Config, label: int, path: Path, seed: int, device) -> Path:
    """Draw level 0 (the whole video at the coarsest resolution) and write it as mp4."""
    g = torch.Generator().manual_seed(seed)
    boxes = boxes_from_offsets(torch.zeros(1, 1, 3, dtype=torch.int64), cfg.model.patch).to(device)
    cond = Condition(labels=torch.tensor([label], device=device)) if cfg.model.cond == "class" else Condition()
    x = edm.sample(net, (1, 1, 3, *cfg.model.patch), boxes, cond, generator=g, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, to_uint8(x[0, 0]))
    return path


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the final progress and the last logged metrics."""
    rank, world, device = init_distributed()
    t, m = cfg.train, cfg.model
    run_dir = Path(t.run_dir)
    ds_config = deepspeed_config(cfg, world)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        prepare_dataset(cfg.data, resolution=m.resolution, num_classes=m.num_classes)
    dist.barrier()

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = HPDM(m).to(device)
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.betas, t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.decay))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    ema = EMA(model, t.ema_halflife)
    edm = EDM(cfg.diffusion)
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)  # pyramid boxes, sigma, noise, condition dropout
    loader = build_loader(cfg.data, frames=m.resolution[0], size=m.resolution[1:], batch_size=micro,
                          rank=rank, world_size=world, seed=t.seed, train=True)

    ckpt = Checkpointer(run_dir)
    step = samples = 0
    if (latest := ckpt.latest()) is not None:
        state, rng = ckpt.load(engine, ema, latest)
        step, samples = state["step"], state["samples"]
        loader.load_state_dict(state["loader"])
        if rng is not None:
            gen.set_state(rng)
        if rank == 0:
            log.info("resumed from %s (step %d, %d samples)", latest, step, samples)

    metrics = Metrics(cfg, run_dir, rank)
    flops = training_flops_per_sample(m)
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    batches = iter(loader)
    bar = tqdm(total=t.steps * t.batch_size, initial=samples, unit="clip", disable=rank != 0, dynamic_ncols=True)
    last: dict = {}
    while step < t.steps:
        t0 = time.perf_counter()
        wait = 0.0
        level_losses = torch.zeros(m.levels)
        for _ in range(accum):
            w0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - w0
            video = batch["video"].to(device, non_blocking=True)
            offsets = sample_offsets(micro, m.levels, m.patch, gen)
            x0 = gather_pyramid(video, offsets.to(device), m.patch, dtype, impl=m.kernels)
            boxes = boxes_from_offsets(offsets, m.patch).to(device)
            cond = _cond(cfg, batch, device).dropped(m.cond_dropout, gen)
            sigma = edm.sample_sigma(micro, m.levels, device, gen)
            noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
            loss, per_level = edm.loss(engine, x0, boxes, cond, sigma, noise)
            engine.backward(loss)
            engine.step()
            level_losses += per_level.float().cpu() / accum
        step += 1
        samples += t.batch_size
        ema.update(engine.module, t.batch_size, samples)
        dt = time.perf_counter() - t0
        bar.update(t.batch_size)
        if step % t.log_every == 0 or step == t.steps:
            if world > 1:
                dist.all_reduce(level_losses)
                level_losses /= world
            grad_norm = engine.get_global_grad_norm()
            last = {"loss": level_losses.mean().item(), **{f"loss/level{l}": v.item() for l, v in enumerate(level_losses)},
                    "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": t.batch_size / dt, "step_time_s": dt, "data_wait_s": wait,
                    "tflops_per_s": flops * t.batch_size / dt / 1e12, "step": step}
            bar.set_postfix(loss=f"{last['loss']:.4f}", clips_s=f"{last['samples_per_s']:.1f}")
            metrics.log(last, samples)
        if step % t.save_every == 0 or step == t.steps:
            ckpt.save(engine, ema, step, samples, {"loader": loader.state_dict()}, gen.get_state())
    bar.close()

    if t.sample_at_end and rank == 0:
        net = HPDM(m).to(device).eval()
        ema.copy_to(net)
        path = sample_video(net, edm, cfg, label=0, path=run_dir / "samples" / f"step_{step:08d}.mp4", seed=t.seed, device=device)
        log.info("sample written to %s", path)
    metrics.close()
    dist.barrier()
    return {"step": step, "samples": samples, **last}
