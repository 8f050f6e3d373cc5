"""The DeepSpeed config of a run: generated from ours, with ``train.deepspeed`` merged over it.

Keys that hpdm derives from its own fields may not be set through ``train.deepspeed``: two sources for one
setting would let the run do one thing and record another (a ZeRO-3 run saved as ``zero_stage: 0``). Everything else passes through, nested keys merged.
"""
from __future__ import annotations

from hpdm.config import Config, ConfigError

OWNED = {  # DeepSpeed key -> the hpdm field that sets it
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16": "train.precision",
    "fp16": "train.precision (fp16 is not supported: use bf16)",
    "torch_autocast": "train.precision",
    "amp": "train.precision",
    "optimizer": "train.optimizer, train.lr, train.betas and train.weight_decay",
    "scheduler": "train.warmup_steps and train.decay",
    "checkpoint.load_universal": "nothing (hpdm sets it when resuming a converted checkpoint)",
}
UNSUPPORTED = {  # DeepSpeed key -> why a run cannot use it
    "zero_optimization.offload_optimizer": "ZeRO-Offload of the optimizer steps DeepSpeed's own CPU optimizer, "
                                           "and hpdm builds its own (train.optimizer)",
}


def _merge(base: dict, extra: dict, prefix: str = "") -> dict:
    for k, v in extra.items():
        key = prefix + str(k)
        if key in OWNED:
            raise ConfigError(f"train.deepspeed.{key}", f"set by hpdm from {OWNED[key]}; set that instead")
        if key in UNSUPPORTED:
            raise ConfigError(f"train.deepspeed.{key}", f"not supported: {UNSUPPORTED[key]}")
        if isinstance(base.get(k), dict) and not isinstance(v, dict):  # `zero_optimization: true` would replace ours
            raise ConfigError(f"train.deepspeed.{key}", f"must be a mapping of DeepSpeed's {key} keys; got {v!r}")
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, key + ".")
        else:
            base[k] = v
    return base


def deepspeed_config(cfg: Config, world: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON of a run with ``world`` processes."""
    t = cfg.train
    micro = t.micro_batch or t.batch_size // world
    if micro < 1 or t.batch_size % (micro * world):
        split = (f"micro_batch ({micro}) x processes ({world})" if t.micro_batch else
                 f"the {world} processes (train.micro_batch is unset: each process takes batch_size / processes)")
        raise ConfigError("train.batch_size", f"{t.batch_size} is not a multiple of {split}")
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (micro * world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, t.deepspeed)
