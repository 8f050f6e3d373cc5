"""The DeepSpeed config of a run: generated from ours, with ``train.deepspeed`` merged over it.

Keys that hpdm derives from its own fields may not be set through ``train.deepspeed``: two sources for one
setting would let the run do one thing and record another (a ZeRO-3 run saved as ``zero_stage: 0``). Everything
else passes through, nested keys merged. A top-level key that the installed DeepSpeed never reads is refused too:
DeepSpeed would ignore it without a word (its nested sections mostly refuse unknown keys themselves).
"""
from __future__ import annotations

import difflib
import functools

from hpdm.config import Config, ConfigError

OWNED = {  # DeepSpeed key -> the hpdm field that sets it
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16": "train.precision",
    "bfloat16": "train.precision",  # DeepSpeed's older name, read where "bf16" is absent (hpdm always writes that)
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
    "activation_checkpointing": "it configures deepspeed.checkpointing, which hpdm's model does not call, so it "
                                "would change nothing; set train.activation_checkpointing: true (per-block "
                                "recomputation) instead",
}
# Nested sections whose unknown keys DeepSpeed ignores (the others refuse them) and whose keys it reads by name
# (it copies `pipeline` whole, so nothing can be recorded for it)
LENIENT = ("aio", "autotuning", "checkpoint", "data_efficiency", "data_types", "flops_profiler", "timers")


@functools.cache
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys that the installed DeepSpeed reads, and the keys of the ``LENIENT`` sections as
    ``section.key``, recorded while it parses a minimal config (so a newer DeepSpeed's keys are known without a
    list here); empty when that fails, which turns the check off."""
    from deepspeed.runtime.config import DeepSpeedConfig  # noqa: PLC0415

    read = {"sequence_parallel_size", "data_parallel_size"}  # read by deepspeed.initialize itself

    class Keys:  # `key in config.keys()`, as DeepSpeed often asks
        def __init__(self, d: dict):
            self.d = d

        def __contains__(self, key):
            read.add(self.d.prefix + key)
            return dict.__contains__(self.d, key)

        def __iter__(self):
            return iter(dict.keys(self.d))

    class Recording(dict):
        prefix = ""

        def get(self, key, *default):
            read.add(self.prefix + key)
            return super().get(key, *default)

        def __getitem__(self, key):
            read.add(self.prefix + key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(self.prefix + key)
            return super().__contains__(key)

        def keys(self):
            return Keys(self)

    sections = {name: Recording() for name in LENIENT}
    for name, section in sections.items():
        section.prefix = name + "."
    try:
        DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                                  **sections))
    except Exception:  # noqa: BLE001 (a DeepSpeed whose parsing differs: no check rather than a wrong one)
        return frozenset()
    return frozenset(read)


def _check_known(extra: dict) -> None:
    import deepspeed  # noqa: PLC0415

    known = deepspeed_keys()
    recorded = {k.split(".")[0] for k in known if "." in k}  # a section read otherwise by another DeepSpeed: unchecked
    keys = [k for k in extra if not (k in recorded and isinstance(extra[k], dict))]
    keys += [f"{k}.{sub}" for k in recorded if isinstance(extra.get(k), dict) for sub in extra[k]]
    for key in keys:
        if known and key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {near[0]}?" if near else " (DeepSpeed's configuration docs list its keys)"
            raise ConfigError(f"train.deepspeed.{key}",
                              f"not a key of DeepSpeed {deepspeed.__version__}, which would ignore it{hint}")


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
    if t.deepspeed:
        _check_known(t.deepspeed)
    return _merge(ds, t.deepspeed)
