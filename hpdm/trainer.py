"""Training: wires the data pipeline, the pyramid, the model, EDM and a DeepSpeed engine into one loop.

Progress is counted in samples (clips). A run resumes from its directory's latest checkpoint with no flag,
and checkpoints and exits cleanly on SIGTERM, SIGUSR1 (preemption) or a first Ctrl-C.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import deepspeed
import pydantic
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline import DataError, build_train_loader, prepare_dataset
from data_pipeline.local_files import remove_stale_temporaries
from data_pipeline.storage import Storage
from hpdm.checkpoint import Checkpointer
from hpdm.checkpoint_folder import in_checkpoints, is_universal, read_state
from hpdm.config import Config, ConfigError, is_recorded_config, resume_differences, save_config
from hpdm.diffusion import EDM, Condition
from hpdm.distributed import Preemption, init_distributed, on_rank0
from hpdm.divergence import DivergenceGuard
from hpdm.ds_config import deepspeed_config
from hpdm.errors import CheckpointError
from hpdm.ema import EMA
from hpdm.finetune import init_from_generator
from hpdm.flops import training_flops_per_sample
from hpdm.metrics import Metrics, memory_gib, peak_flops, wandb_mode
from hpdm.model import HPDM
from hpdm.monitor import plot_progress, sample_and_measure
from hpdm.optim import attach_partitions, build_optimizer, lr_factor
from hpdm.profiler import StepProfiler
from hpdm.pyramid import boxes_from_offsets
from hpdm.run_lock import RunLock, check_run_dir_writable
from hpdm.step_rng import draw_step_randomness, restore_generator, step_generator
from hpdm.text_encoder import TextEncoder, encoder_change, text_identity
from hpdm.video_io import clip_fps, to_uint8, write_mp4
from kernels import gather_pyramid
from kernels._triton import interpreting

log = logging.getLogger(__name__)


def _cond(cfg: Config, batch: dict, device, encoder=None) -> Condition:
    """The batch's condition: labels, or caption embeddings (precomputed in the batch, or from ``encoder``).
    Host tensors (pinned on CUDA by the loader) are copied without blocking."""
    if cfg.model.cond == "class":
        labels, n = batch["label"], cfg.model.num_classes
        if labels.min() < -1 or labels.max() >= n:  # checked on the host tensor: no device sync
            bad = int(labels.max() if labels.max() >= n else labels.min())
            where = f"data.shards {cfg.data.shards}" + (f" or data.image_shards {cfg.data.image_shards}"
                                                        if cfg.data.image_shards else "")
            raise DataError(f"{where}: a batch has label {bad} but model.num_classes is {n} "
                            f"(labels must be 0..{n - 1}, or -1 for none)")
        return Condition(labels=labels.to(device, non_blocking=True))  # -1: an unlabelled clip, trained unconditionally
    if cfg.model.cond == "text":
        if encoder is None:  # copied in the stored dtype, converted on the device
            return Condition(text=batch["text"].to(device, non_blocking=True).float(),
                             text_mask=batch["text_mask"].to(device, non_blocking=True))
        empty = [k for k, c in zip(batch["key"], batch["caption"]) if not c.strip()]
        if empty:
            raise DataError(f"data.shards {cfg.data.shards}: sample {empty[0]!r} has no caption, which "
                            "data.text_encoder needs (give every video a caption in the make-shards manifest)")
        text, mask = encoder.encode(batch["caption"])
        return Condition(text=text.float(), text_mask=mask)
    return Condition()


def _text_encoder(cfg: Config, device):
    """The frozen encoder of ``data.text_encoder`` (captions encoded on the fly), or None (precomputed)."""
    if cfg.model.cond != "text" or not cfg.data.text_encoder:
        return None
    return TextEncoder(cfg.data.text_encoder, cfg.model.text_tokens, device, option="data.text_encoder",
                       text_dim=cfg.model.text_dim)


def _monitor_cond(cfg: Config, batch: dict, device, encoder) -> tuple[Condition, list[int]] | None:
    """What text models sample every ``train.sample_every`` steps: the first batch's captions (and labels, for
    the synthetic measure), cycled to ``train.sample_videos``; None for class and unconditional models."""
    if cfg.model.cond != "text":
        return None
    rows = [i % len(batch["key"]) for i in range(cfg.train.sample_videos)]
    return _cond(cfg, batch, device, encoder).rows(rows, "cpu"), [int(batch["label"][i]) for i in rows]


def _samples(ema: EMA, cfg: Config, step: int, run_dir: Path, metrics: Metrics, samples: int,
             device, video: bool = False, cond: tuple[Condition, list[int]] | None = None) -> None:
    """Rank 0: sample the EMA weights (grid PNG, synthetic measure, progress plot; the first video as mp4 when
    ``video``); the other ranks wait at a barrier."""
    if dist.get_rank() == 0:
        try:
            _sample_rank0(ema, cfg, step, run_dir, metrics, samples, device, video, cond)
        except OSError as exc:  # e.g. samples/ no longer writable: no reason to stop training
            log.warning("samples at step %d could not be written (%s: %s); training goes on", step,
                        exc.strerror or exc, exc.filename or run_dir / "samples")
    dist.barrier()


def _sample_rank0(ema: EMA, cfg: Config, step: int, run_dir: Path, metrics: Metrics, samples: int, device,
                  video: bool, cond: tuple[Condition, list[int]] | None) -> None:
    t0 = time.perf_counter()
    net = HPDM(cfg.model).to(device).eval()
    ema.copy_to(net)
    values, grid, levels = sample_and_measure(net, cfg, step, run_dir, device, cond)
    metrics.log({**values, "step": step, "time/sampling_s": time.perf_counter() - t0}, samples)
    metrics.image("samples", grid, samples)
    plot_progress(run_dir)
    shown = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in values.items() if not k.startswith("synthetic/coarse"))
    log.info("samples at step %d: %s%s", step, grid, f" ({shown})" if shown else "")
    if video:
        path = run_dir / "samples" / f"step_{step:08d}.mp4"
        write_mp4(path, to_uint8(levels[-1][0]), fps=clip_fps(cfg))
        log.info("sample written to %s", path)


def _step(engine, edm: EDM, cfg: Config, batches, gen: torch.Generator, micro: int, accum: int, device,
          sync: bool, levels: int, encoder=None) -> tuple[torch.Tensor, dict, dict]:
    """One optimizer step over ``accum`` micro-batches on the ``levels`` coarsest levels (the
    randomness is drawn for all, so the stream does not depend on it); returns their losses, the time split
    (accurate on GPU only when ``sync``, which waits for the device at each boundary), the last batch and, when
    ``sync`` and DeepSpeed keeps none (``_plain_optimizer``), the gradient norm.

    ``gen`` lives on ``device``: every random number is drawn there, and nothing here reads a device value
    back (no .item(), .cpu(), .tolist()), so on a GPU the step queues work without waiting for it."""
    m = cfg.model
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    wait = compute = opt_time = 0.0
    level_losses, grad_norm = torch.zeros(levels, device=device), None
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        video = batch["video"].to(device, non_blocking=True)  # pinned by the loader on CUDA: an async copy
        cond = _cond(cfg, batch, device, encoder)
        # on the device: a CPU generator here would mean host draws and a host-to-device copy of the noise
        draws = draw_step_randomness(gen, micro, cfg, cond.labels is not None or cond.text is not None)
        # device offsets: the fused gather skips its host-side box check, which would sync (the reference
        # gather, kernels=reference, reads the offsets back and so syncs on GPU)
        x0 = gather_pyramid(video, draws.offsets, m.patch, dtype, impl=m.kernels)[:, :levels]
        boxes = boxes_from_offsets(draws.offsets, m.patch)[:, :levels]  # on the device, constants cached there
        cond = cond if draws.drop is None else cond.masked(draws.drop)
        loss, per_level = edm.loss(engine, x0, boxes, cond, draws.sigma[:, :levels], draws.noise[:, :levels])
        engine.backward(loss)
        if sync and device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if sync and engine.is_gradient_accumulation_boundary() and _plain_optimizer(engine):
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()  # DeepSpeed steps the optimizer at the end of the accumulation
        if sync and device.type == "cuda":
            torch.cuda.synchronize()
        wait, compute, opt_time = wait + t1 - t0, compute + t2 - t1, opt_time + time.perf_counter() - t2
        level_losses += per_level / accum
    times = {"time/data_wait_s": wait, "time/fwd_bwd_s": compute, "time/optimizer_s": opt_time}
    return level_losses, times, batch, grad_norm


def _plain_optimizer(engine) -> bool:
    """Whether DeepSpeed steps our optimizer directly (ZeRO-0 in fp32): it then keeps no gradient norm of its own,
    so the trainer takes it from the (all-reduced, unclipped) gradients on logging steps."""
    return engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled()


def _prepare(cfg: Config, ckpt: Checkpointer) -> RunLock:
    """Rank 0, before any work: lock the run folder, check the checkpoint copy is writable, make sure the data is
    there (writing the synthetic set only into an empty location)."""
    run_dir, t = Path(cfg.train.run_dir), cfg.train
    if t.warmup_steps >= t.steps:
        log.warning("train.warmup_steps (%d) is not below train.steps (%d): the learning rate never reaches train.lr "
                    "(%g)", t.warmup_steps, t.steps, t.lr)
    for what, unused in (("train.level0_steps", t.level0_steps and cfg.model.levels == 1),
                         ("data.text_encoder", cfg.data.text_encoder and cfg.model.cond != "text"),
                         ("data.text_embeddings", cfg.data.text_embeddings and cfg.model.cond != "text")):
        if unused:  # settings without effect, said (model.cond defaults to class: captions were dropped silently)
            log.warning("%s has no effect on a model with %s", what, "one level" if what.startswith("train")
                        else f"model.cond={cfg.model.cond} (set model.cond=text to train on captions)")
    if cfg.model.levels > 1 and t.level0_steps >= t.steps:
        log.warning("train.level0_steps (%d) is not below train.steps (%d): the finer levels never train",
                    t.level0_steps, t.steps)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("train.run_dir", f"{run_dir} is a file; give a folder for the run")
    shards = Path(cfg.data.shards).resolve()
    if run_dir.resolve() == shards or shards in run_dir.resolve().parents:
        raise ConfigError("train.run_dir", f"{run_dir} is data.shards or inside it; give the run a folder of its own")
    inside = next((p for p in (run_dir.resolve(), *run_dir.resolve().parents) if in_checkpoints(p)), None)
    if inside is not None:  # a new run there trained from scratch, and the parent's pruning deleted it later
        raise ConfigError("train.run_dir", f"{run_dir} is {'inside ' * (inside != run_dir.resolve())}the checkpoint"
                          f"{'s folder' * (inside.name == 'checkpoints')} {inside}; to continue that run, give its "
                          f"folder: train.run_dir={inside.parent if inside.name == 'checkpoints' else inside.parent.parent}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("train.run_dir", f"cannot create {run_dir}: {exc.strerror or exc}") from None
    lock = RunLock(run_dir)
    try:
        check_run_dir_writable(run_dir)
        for folder in (run_dir, run_dir / "checkpoints"):  # what killed writers left: a kill at a rename, a conversion
            remove_stale_temporaries(folder)
        recorded = run_dir / "config.yaml"
        if recorded.is_file() and not is_recorded_config(recorded):  # e.g. the --config given: it would be replaced
            raise ConfigError("train.run_dir", f"{recorded} was not written by `hpdm train`, which records the run's "
                              "resolved config there: move your file out of the run folder (and give --config its "
                              "new path)")
        if t.checkpoint_uri:
            ckpt.storage.check_writable(t.checkpoint_uri)
        prepare_dataset(cfg.data, resolution=cfg.model.resolution, num_classes=cfg.model.num_classes,
                        labelled=cfg.model.cond == "class")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_resume(cfg: Config, ckpt: Checkpointer, latest: Path | None, text_id: dict | None) -> None:
    """Rank 0: refuse a checkpoint made for another model or diffusion config or text encoder (``text_id``), then
    move newer checkpoint folders out of the way (they are kept, never overwritten)."""
    if latest is not None:
        state = read_state(latest)
        changed = encoder_change(state.get("text_encoder"), text_id)  # embeddings of another encoder: a silent mix
        differ = resume_differences(state["config"], cfg) + ([changed] if changed else [])
        if differ:
            raise CheckpointError(f"cannot resume {latest} with this config; these settings differ from the "
                                  f"checkpoint's: {'; '.join(differ)}. Restore them, or train in another "
                                  "train.run_dir (train.init_from starts from a generator's weights)")
    ckpt.set_aside_newer(latest.name if latest else "")


def _apply_optimizer_settings(engine, schedule, t, saved: dict, rank: int) -> None:
    """After a resume: train.lr, betas and weight_decay as configured, not as the checkpoint's optimizer and
    schedule restored them (a changed lr was silently ignored); the optimizer's moments are kept."""
    changed = [f"train.{k}: {saved[k]} -> {getattr(t, k)}" for k in ("lr", "betas", "weight_decay")
               if k in saved and saved[k] != json.loads(json.dumps(getattr(t, k)))]
    schedule.base_lrs = [t.lr] * len(schedule.base_lrs)
    factor = lr_factor(schedule.last_epoch, t.warmup_steps, t.steps, t.decay)
    # train.steps under cosine decay (or warmup_steps, decay) moves the schedule: the lr jumped without a word
    moved = [f"train.{k}: {saved[k]} -> {getattr(t, k)}" for k in ("steps", "warmup_steps", "decay")
             if k in saved and saved[k] != getattr(t, k)]
    was = saved.get("lr", t.lr) * lr_factor(schedule.last_epoch, *(saved.get(k, getattr(t, k)) for k in
                                                                   ("warmup_steps", "steps", "decay")))
    if moved and not math.isclose(was, t.lr * factor):
        changed.append(f"the learning rate of step {schedule.last_epoch + 1}: {was:.3g} -> {t.lr * factor:.3g} "
                       f"({', '.join(moved)})")
    for i, group in enumerate(engine.optimizer.param_groups):  # in param_groups' order: decayed matrices first
        group.update(lr=t.lr * factor, betas=tuple(t.betas), weight_decay=t.weight_decay if i == 0 else 0.0)
    if changed and rank == 0:
        log.info("resuming with %s (the optimizer's moments are kept)", "; ".join(changed))


def _skip_counts(loader, world: int) -> dict:
    """Samples skipped as bad, in total and per reason, summed over ranks (collective when world > 1)."""
    stats = [loader.stats]
    if world > 1:
        stats = [None] * world
        dist.all_gather_object(stats, loader.stats)
    out = {"data/skipped": float(sum(s["skipped"] for s in stats))}
    for s in stats:
        for reason, n in s["reasons"].items():
            out[f"data/skipped/{reason}"] = out.get(f"data/skipped/{reason}", 0.0) + n
    return out


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the final progress and the last logged metrics."""
    preemption, lock = Preemption(), None  # first: a signal while starting stops the run before its first step
    try:
        rank, world, device = init_distributed()
        t = cfg.train
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        elif cfg.model.kernels == "fused" and not interpreting():
            raise ConfigError("model.kernels", "fused needs a CUDA GPU (or TRITON_INTERPRET=1); use auto or reference")
        deepspeed_config(cfg, world)  # its errors before any work
        wandb_mode()
        ckpt = Checkpointer(t.run_dir, t.keep_checkpoints, t.checkpoint_uri, Storage(cfg.data.endpoint_url))
        lock = on_rank0(lambda: _prepare(cfg, ckpt))
        return _train(cfg, ckpt, rank, world, device, preemption)
    finally:
        preemption.close()
        if lock is not None:
            lock.release()


def _train(cfg: Config, ckpt: Checkpointer, rank: int, world: int, device, preemption: Preemption) -> dict:
    t, m = cfg.train, cfg.model
    run_dir = Path(t.run_dir)
    latest = ckpt.latest()
    text_id = text_identity(cfg)
    on_rank0(lambda: _check_resume(cfg, ckpt, latest, text_id))
    ds_config = deepspeed_config(cfg, world, load_universal=latest is not None and is_universal(latest))
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = HPDM(m).to(device)
    model.checkpoint_blocks = t.activation_checkpointing  # recompute blocks in backward (hpdm/model.py)
    if t.init_from and latest is None:  # fine-tuning from a lower-resolution generator (not when resuming)
        init_from_generator(model, t.init_from, cfg.diffusion, text_id)
    elif latest is not None:  # the record keeps what the run started from
        started = read_state(latest)["config"]["train"].get("init_from", "")
        if t.init_from and rank == 0:
            log.log(logging.WARNING if t.init_from != started else logging.INFO, "train.init_from is not used: this "
                    "run resumes from its checkpoint %s (it started from %s)", latest.name, started or "scratch")
        t.init_from = started
    ema = EMA(model, t.ema_halflife)  # before ZeRO-3 partitions the parameters
    if t.compile:  # in place, so parameter names (checkpoints, EMA) stay as they are; compiled at the first step
        model.compile(mode=t.compile_mode)
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.betas, t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.decay))
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    except pydantic.ValidationError as exc:  # DeepSpeed's own checks of what train.deepspeed adds
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError("train.deepspeed", f"DeepSpeed refuses {exc.title}: {errors}") from None
    attach_partitions(engine)  # LAMB's per-parameter trust ratio over ZeRO's flat partitions
    if type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer":  # what DeepSpeed 0.19 gives bf16 at ZeRO-0
        log.warning("bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer checks each of the %d gradient tensors with "
                    "its own host read and steps them one by one (136 ms of a 450 ms HPDM-S step on an H200); "
                    "train.zero_stage=1 works on flat buffers and, on one GPU, holds the same state",
                    sum(1 for p in model.parameters() if p.requires_grad))
    edm = EDM(cfg.diffusion)
    gen = step_generator(t.seed * 1000 + rank, device)  # pyramid boxes, sigma, noise, condition dropout
    encoder = _text_encoder(cfg, device)
    text = (m.text_tokens, m.text_dim) if m.cond == "text" and encoder is None else None
    loader = build_train_loader(cfg.data, frames=m.resolution[0], size=m.resolution[1:], micro=micro, rank=rank,
                                world_size=world, seed=t.seed, text=text)

    step = samples = 0
    if latest is not None:
        t0 = time.perf_counter()
        state, loader_state, rng = ckpt.load(engine, ema, latest)
        step, samples = state["step"], state["samples"]
        _apply_optimizer_settings(engine, schedule, t, state["config"].get("train", {}), rank)
        loader.load_state_dict(loader_state)
        seed = state["config"].get("train", {}).get("seed", t.seed)
        if seed != t.seed:  # a new seed (to get past a loss spike) is new noise, not only a new data order
            if rank == 0:
                log.warning("train.seed %d -> %d: noise, noise levels and pyramid boxes are drawn from the new seed "
                            "from here on", seed, t.seed)
        elif rng is not None and not restore_generator(gen, rng) and rank == 0:
            log.warning("the checkpoint's random state is from a %s generator; this run draws on %s from a seed "
                        "derived from it, so its noise differs from an uninterrupted run's", "CPU" if device.type
                        == "cuda" else "CUDA", device.type)
        if rank == 0:
            log.info("resumed from %s (step %d, %d samples) in %.1f s", latest, step, samples, time.perf_counter() - t0)
    if rank == 0 and step < t.level0_steps and m.levels > 1:
        log.info("training level 0 alone until step %d, then all %d levels (train.level0_steps)", t.level0_steps, m.levels)
    if rank == 0:  # only now: a refused or failed resume leaves the run's recorded config as it was
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))

    metrics = Metrics(cfg.to_dict(), run_dir, t.wandb_project, rank, resumed_at=step)
    peak = peak_flops(device, t.precision)
    profiler = StepProfiler(t.profile_steps, run_dir / "profile", rank, device, step)
    guard = DivergenceGuard(t.max_skipped_steps, device, engine.skipped_steps)
    record = {"config": cfg.to_dict(), "deepspeed": ds_config, "text_encoder": text_id}
    batches = iter(loader)
    # the clips still to train at today's batch size (a resume may have changed it) after those already trained
    bar = tqdm(total=samples + max(t.steps - step, 0) * t.batch_size, initial=samples, unit="clip",
               disable=rank != 0, dynamic_ncols=True)
    last: dict = {}
    preempted, first_step, monitor = preemption.requested(device), step, None
    if preempted and rank == 0:
        log.warning("preempted (signal %s) while starting: exiting before the first step", preemption.signal)
    try:
        try:
            while step < t.steps and not preempted:
                profiler.at(step + 1)
                timed = (step + 1) % t.log_every == 0 or step + 1 == t.steps
                lr = engine.get_lr()[0]  # this step's: engine.step() moves the schedule on to the next one's
                t0 = time.perf_counter()
                levels = 1 if step < t.level0_steps else m.levels
                level_losses, times, batch, own_norm = _step(engine, edm, cfg, batches, gen, micro, accum, device,
                                                             timed, levels, encoder)
                if monitor is None:
                    monitor = _monitor_cond(cfg, batch, device, encoder)
                step += 1
                samples += t.batch_size
                guard.step(level_losses, engine.skipped_steps, step)
                ema.update(engine.module, t.batch_size, samples)
                bar.update(t.batch_size)
                if timed:
                    dt = time.perf_counter() - t0
                    flops = training_flops_per_sample(m, levels)
                    if world > 1:
                        dist.all_reduce(level_losses)
                        level_losses /= world
                    level_losses = level_losses.cpu()
                    grad_norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
                    last = {"loss": level_losses.mean().item(), **{f"loss/level{l}": v.item() for l, v in enumerate(level_losses)},
                            "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                            "samples_per_s": t.batch_size / dt, "time/step_s": dt, **times,
                            "tflops_per_gpu": flops * t.batch_size / dt / world / 1e12, **memory_gib(device),
                            "train/skipped_steps": guard.skipped_total, **_skip_counts(loader, world), "step": step}
                    if peak:
                        last["mfu"] = flops * t.batch_size / dt / world / peak
                    bar.set_postfix(loss=f"{last['loss']:.4f}", clips_s=f"{last['samples_per_s']:.1f}")
                    metrics.log(last, samples)
                    guard.check(step, last["loss"])
                preempted = preemption.requested(device)
                if step % t.save_every == 0 or step == t.steps or preempted:  # before sampling, which may fail
                    guard.check(step)
                    ckpt.save(engine, ema, step, samples, loader.state_dict(), gen.get_state(), record)
                if t.sample_every and step % t.sample_every == 0 and step < t.steps and not preempted:
                    _samples(ema, cfg, step, run_dir, metrics, samples, device, cond=monitor)
                if preempted:
                    if rank == 0:
                        log.warning("preempted (signal %s): checkpoint at step %d written, exiting", preemption.signal, step)
                    break
            profiler.finish()
        finally:
            batches.close()  # shut the data-loader workers down, also when the step raised
            bar.close()
        # a finished run that is rerun samples nothing, unless a stop during its end samples (or a preemption at its
        # last step) left them unwritten: the mp4, written last, says
        missing = step == first_step and not on_rank0(lambda: (run_dir / "samples" / f"step_{step:08d}.mp4").exists(),
                                                      share=True)
        if t.sample_at_end and not preempted and step == t.steps and (step > first_step or missing):
            if missing and rank == 0:
                log.info("writing the end-of-run samples of step %d, which a stop left unwritten", step)
            if monitor is None and m.cond == "text":  # no step ran to give the captions to sample
                first = iter(loader)
                try:
                    monitor = _monitor_cond(cfg, next(first), device, encoder)
                finally:
                    first.close()
            _samples(ema, cfg, step, run_dir, metrics, samples, device, video=True, cond=monitor)
        elif rank == 0 and step > first_step:  # the loss up to the last step, also without samples
            plot_progress(run_dir)
    except BaseException:
        metrics.close(failed=True)
        raise
    metrics.close()
    dist.barrier()
    return {**last, "step": step, "samples": samples, "rank": rank, "preempted": preempted,
            "trained_steps": step - first_step}
