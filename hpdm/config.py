"""Run configuration: typed dataclasses loaded from YAML, with ``section.key=value`` overrides.

Every error names the key it is about and the value, e.g. ``train.save_every: must be >= 1; got 0``, or the file (and
line) or the override it comes from, e.g. ``configs/x.yaml:3: YAML syntax error: ...``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.config import DataConfig
from data_pipeline.local_files import write_atomic
from data_pipeline.storage import without_userinfo
from hpdm.config_file import merge, parse_overrides, read_yaml
from hpdm.errors import ConfigError

log = logging.getLogger(__name__)
SEED_LIMIT = 2**32  # seeds are scaled and offset per rank and per video, and must stay within int64


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


def check_range(key: str, value, low: float, strict: bool = False, high: float | None = None) -> None:
    """``value`` (a number, or a tuple checked entry by entry) must be >= ``low`` (> when ``strict``) and, given
    ``high``, < ``high``; else a ConfigError naming ``key`` and the value."""
    many = isinstance(value, tuple)
    if all((v > low if strict else v >= low) and (high is None or v < high) for v in (value if many else (value,))):
        return
    want = f"in [{low}, {high})" if high is not None else f"{'>' if strict else '>='} {low}"
    raise ConfigError(key, f"{'every entry ' if many else ''}must be {want}; got {list(value) if many else value}")


@dataclass
class ModelConfig:
    patch: tuple[int, int, int] = (16, 64, 64)  # t, h, w of every level's patch
    levels: int = 3  # level l is cut from the video downsampled 2**(levels-1-l) times; level 0 is the whole video
    patchify: tuple[int, int, int] = (1, 4, 4)  # pixel tube per data token
    token_dim: int = 1024  # data-token width
    latent_dim: int = 256  # width of the latent tokens, which do most of the compute
    num_latents: int = 768  # latent tokens per sample
    blocks: int = 6  # RIN blocks
    latent_layers: int = 4  # latent self-attention layers per block
    levels_per_block: tuple[int, ...] = (1, 1, 2, 2, 3, 3)  # adaptive computation: levels each block processes
    head_dim: int = 64  # attention head width (divides token_dim and latent_dim)
    mlp_ratio: float = 4.0  # latent MLPs
    token_conv: int = 3  # kernel of the depthwise convolution over the token grid in every block (0: none)
    # Hidden channels of a per-frame 3x3 convolutional pass over the output pixels (0: none); not in the paper, but
    # what lets neighbouring tokens agree on a shape's edge pixels (README, "Does it learn?").
    pixel_head: int = 0
    data_mlp_ratio: float = 8.0  # data-token MLP of the write layer (4 latent layers and 8 put S/M/L within 7 % of the paper)
    cond: str = "class"  # class | text | none
    num_classes: int = 101  # classes of model.cond: class (UCF-101: 101); labels are 0..num_classes-1
    text_dim: int = 4096  # width of the text embeddings (T5-11B: 4096); must match the encoder's
    text_tokens: int = 128  # tokens per caption: longer ones are cut, shorter ones padded (and masked)
    cond_dropout: float = 0.1  # drop the class/text condition for classifier-free guidance
    coords: bool = True  # condition every patch on its box in normalised video coordinates
    context_fusion: str = "deep"  # deep (before every block) | shallow (before a level's first block) | none
    context_detach: bool = False  # stop gradients from finer levels into coarser activations (ablation)
    kernels: str = "auto"  # auto (fused on GPU) | reference | fused

    @property
    def resolution(self) -> tuple[int, int, int]:
        """Full video resolution (t, h, w): the patch scaled by 2 per level above level 0."""
        s = 2 ** (self.levels - 1)
        return tuple(p * s for p in self.patch)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return tuple(p // q for p, q in zip(self.patch, self.patchify))

    def validate(self) -> None:
        for key in ("patch", "levels", "patchify", "token_dim", "latent_dim", "num_latents", "blocks", "latent_layers",
                    "head_dim", "num_classes", "text_dim", "text_tokens"):
            check_range(f"model.{key}", getattr(self, key), 1)
        for key, width in (("mlp_ratio", self.latent_dim), ("data_mlp_ratio", self.token_dim)):
            check_range(f"model.{key}", getattr(self, key), 0, strict=True)
            if int(width * getattr(self, key)) < 1:  # MLPs are int(width * ratio) wide
                raise ConfigError(f"model.{key}", f"{getattr(self, key)} x {width} leaves the MLP no hidden unit")
        for i, (p, q) in enumerate(zip(self.patch, self.patchify)):
            if p % q:
                raise ConfigError("model.patchify", f"dimension {i} ({q}) must divide model.patch ({p})")
        lpb = self.levels_per_block
        if len(lpb) != self.blocks:
            raise ConfigError("model.levels_per_block", f"must have one entry per block ({self.blocks}); got {len(lpb)}")
        if lpb[0] < 1 or any(b < a for a, b in zip(lpb, lpb[1:])) or lpb[-1] != self.levels:
            raise ConfigError("model.levels_per_block", f"must be non-decreasing from >= 1 to model.levels ({self.levels}); got {list(lpb)}")
        if self.latent_dim % self.head_dim or self.token_dim % self.head_dim:
            raise ConfigError("model.head_dim", f"must divide model.latent_dim ({self.latent_dim}) and model.token_dim "
                                                f"({self.token_dim}); got {self.head_dim}")
        if self.token_conv < 0 or self.token_conv % 2 == 0 and self.token_conv:
            raise ConfigError("model.token_conv", f"must be 0 (none) or an odd kernel size; got {self.token_conv}")
        check_range("model.pixel_head", self.pixel_head, 0)
        _choice("model.cond", self.cond, ("class", "text", "none"))
        _choice("model.context_fusion", self.context_fusion, ("deep", "shallow", "none"))
        _choice("model.kernels", self.kernels, ("auto", "reference", "fused"))
        check_range("model.cond_dropout", self.cond_dropout, 0, high=1)


@dataclass
class DiffusionConfig:
    sigma_data: float = 0.5  # EDM's standard deviation of the data in [-1, 1]
    p_mean: float = -1.2  # log-normal training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2  # see p_mean
    independent_levels: bool = False  # one sigma per level instead of one per sample
    sigma_min: float = 0.002  # lowest noise level of the sampler
    sigma_max: float = 80.0  # highest noise level of the sampler (level 0 starts there)
    rho: float = 7.0  # spacing of the sampler's noise levels (EDM's rho)
    steps: int = 128  # sampling steps for level 0; halved at each further level
    guidance: float = 1.0  # classifier-free guidance scale (1: none)
    s_churn: float = 40.0  # stochasticity of the level-0 sampler (0: deterministic)
    # > 0: finer levels start at this sigma from the coarser level upsampled, not from pure noise (README)
    fine_start: float = 0.0

    def validate(self) -> None:
        for key in ("sigma_data", "p_std", "sigma_min", "rho"):
            check_range(f"diffusion.{key}", getattr(self, key), 0, strict=True)
        if self.sigma_max <= self.sigma_min:
            raise ConfigError("diffusion.sigma_max",
                              f"must be > diffusion.sigma_min ({self.sigma_min}); got {self.sigma_max}")
        check_range("diffusion.steps", self.steps, 1)
        check_range("diffusion.guidance", self.guidance, 0)
        check_range("diffusion.s_churn", self.s_churn, 0)
        check_range("diffusion.fine_start", self.fine_start, 0)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # checkpoints, config.yaml, metrics.jsonl, samples; a rerun resumes from it
    steps: int = 40_000  # optimizer steps the run trains for; raise it and rerun to train on
    batch_size: int = 768  # global, in clips
    micro_batch: int = 0  # per process and step; 0: batch_size / world_size (no accumulation)
    optimizer: str = "lamb"  # lamb | adamw
    lr: float = 0.005  # peak learning rate (after warm-up)
    betas: tuple[float, float] = (0.9, 0.99)  # the optimizer's moment decays
    weight_decay: float = 0.01  # decoupled weight decay (AdamW and LAMB)
    warmup_steps: int = 10_000  # linear warm-up of the learning rate over these optimizer steps
    decay: str = "none"  # none | cosine (after warm-up)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    ema_halflife: float = 500_000.0  # in samples (clips)
    precision: str = "fp32"  # fp32 (the paper's) | bf16
    # Recompute each RIN block in the backward pass, keeping only block inputs: less activation memory for about
    # one more forward of compute. A memory setting, free to change between resumes (not in config_differences).
    activation_checkpointing: bool = False
    # torch.compile the model (inductor; the fused kernels are custom ops that it calls as they are): fuses the
    # modulation, norm and residual element-wise work. compile_mode "reduce-overhead" adds CUDA graphs. Free to
    # change between resumes, like checkpointing.
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (1: optimizer state, 2: + gradients, 3: + weights partitioned)
    seed: int = 0  # data order, noise and pyramid boxes; a resume with another one draws from it from there on
    log_every: int = 10  # steps between logged metrics (the last step is always logged)
    save_every: int = 1000  # steps between checkpoints (also at the end and on preemption)
    keep_checkpoints: int = 3  # newest checkpoints kept, locally and at checkpoint_uri
    max_skipped_steps: int = 20  # stop when DeepSpeed skips more optimizer steps than this in a row (non-finite grads)
    checkpoint_uri: str = ""  # s3://bucket/prefix: every checkpoint is also uploaded there, and resumed from there
    profile_steps: tuple[int, int] = (0, 0)  # [start, end), numbered as in the logs: trace them (torch.profiler)
    sample_at_end: bool = True  # a full-resolution video and a sample grid from the EMA when training ends
    sample_every: int = 0  # every N steps a grid of samples (and the synthetic measure) from the EMA; 0: never
    sample_videos: int = 4  # videos per sample grid (classes in turn)
    wandb_project: str = "hpdm"  # wandb project (offline unless WANDB_MODE says otherwise)
    deepspeed: dict = field(default_factory=dict)  # raw DeepSpeed keys merged over the generated config
    init_from: str = ""  # a lower-resolution generator (exported file, checkpoint or run) to start from (hpdm/finetune.py)
    # Train level 0 alone for the first N steps, then every level: the coarse generator learns the clips' layout
    # without sharing the network with the finer levels, at level 0's share of a step's cost (README, "Does it learn?").
    level0_steps: int = 0

    def validate(self) -> None:
        if not self.run_dir.strip():
            raise ConfigError("train.run_dir", "is empty; give the run a folder of its own")
        self.run_dir = os.path.abspath(os.path.expanduser(self.run_dir))  # recorded as found: see follow_record
        if self.init_from and not self.init_from.startswith("s3://"):  # recorded as found, whatever the folder of a resume
            self.init_from = os.path.abspath(os.path.expanduser(self.init_from))
        _choice("train.optimizer", self.optimizer, ("lamb", "adamw"))
        _choice("train.decay", self.decay, ("none", "cosine"))
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError("train.activation_checkpointing",
                              f"must be true or false; got {self.activation_checkpointing!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("train.zero_stage", f"must be 0, 1, 2 or 3; got {self.zero_stage}")
        _choice("train.compile_mode", self.compile_mode, ("default", "reduce-overhead", "max-autotune"))
        if not isinstance(self.compile, bool):
            raise ConfigError("train.compile", f"must be true or false; got {self.compile!r}")
        if self.compile and self.zero_stage == 3:
            raise ConfigError("train.compile", "not with train.zero_stage 3, whose parameter gathering in module "
                                               "hooks torch.compile cannot trace; use zero_stage 0-2")
        for key in ("steps", "batch_size", "log_every", "save_every", "keep_checkpoints", "sample_videos"):
            check_range(f"train.{key}", getattr(self, key), 1)
        check_range("train.seed", self.seed, 0, high=SEED_LIMIT)
        for key in ("micro_batch", "weight_decay", "warmup_steps", "grad_clip", "ema_halflife", "sample_every",
                    "max_skipped_steps", "level0_steps"):
            check_range(f"train.{key}", getattr(self, key), 0)
        check_range("train.lr", self.lr, 0, strict=True)
        check_range("train.betas", self.betas, 0, high=1)
        if self.init_from.startswith("s3://"):  # read where it is used (a resume needs it no more)
            raise ConfigError("train.init_from", f"must be a local file or folder; download {self.init_from} first")
        if self.checkpoint_uri and not (self.checkpoint_uri.startswith("s3://") and self.checkpoint_uri[5:].strip("/")):
            raise ConfigError("train.checkpoint_uri", f"must be an s3://bucket/prefix (or empty); got "
                                                      f"{self.checkpoint_uri!r}")
        if not 0 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ConfigError("train.profile_steps",
                              f"must be [start, end) with 0 <= start <= end; got {list(self.profile_steps)}")
        if self.profile_steps[1] > self.steps:
            raise ConfigError("train.profile_steps", f"ends at step {self.profile_steps[1]}, after train.steps="
                                                     f"{self.steps}: the trace would never be written")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    def to_dict(self) -> dict:
        """As plain data for config.yaml, checkpoints, exports and wandb: without the ``user:password@`` of a URL."""
        def public(v):
            return without_userinfo(v) if isinstance(v, str) else [public(x) for x in v] if isinstance(v, list) else v

        return {section: {k: public(v) for k, v in values.items()} for section, values in dataclasses.asdict(self).items()}


def _coerce(value, tp, key: str):
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"must have {len(args)} entries; got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping; got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(key, f"must be an integer; got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, f"must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string; got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    if data is None and prefix:  # `model:` with nothing under it, or a `model=` override
        raise ConfigError(prefix.rstrip("."), "is empty; give its keys, or leave the section out for the defaults")
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(prefix + str(k), f"unknown key; valid keys here: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    data = {}
    if path is not None:
        data = read_yaml(Path(path))
    cfg = from_dict(Config, merge(data, parse_overrides(list(overrides))))
    cfg.validate()
    if path is not None:
        follow_record(cfg, Path(path), overrides)
    return cfg


def follow_record(cfg: Config, path: Path, overrides) -> None:
    """A run's recorded config (RUN/config.yaml) as --config continues RUN, also when its recorded train.run_dir
    names another folder: a copied or moved run, or a relative path recorded from another working folder, would
    otherwise train the original or start afresh elsewhere. A train.run_dir override still chooses the folder."""
    if path.name != "config.yaml" or any(o.partition("=")[0].strip() == "train.run_dir" for o in overrides):
        return
    here = path.resolve().parent
    if Path(cfg.train.run_dir).resolve() == here or not is_recorded_config(path):
        return
    if int(os.environ.get("RANK", "0")) == 0:
        log.warning("train.run_dir: %s is the record of the run in %s, which this continues (it records "
                    "train.run_dir %s; override train.run_dir to train elsewhere)", path, here, cfg.train.run_dir)
    cfg.train.run_dir = str(here)


RECORD_HEADER = "# written by `hpdm train` at every start: the resolved config of this run (edits here are overwritten)\n"


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, RECORD_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def is_recorded_config(path: Path) -> bool:
    """Whether ``path`` is a config that ``save_config`` wrote (and may overwrite), not a user's own: it starts
    with the header, or (written before the header existed) holds the four sections and no comment."""
    text = path.read_text(errors="replace")
    if text.startswith(RECORD_HEADER):
        return True
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    sections = {f.name for f in dataclasses.fields(Config)}
    return isinstance(loaded, dict) and set(loaded) == sections and not any(
        line.lstrip().startswith("#") for line in text.splitlines())


SAMPLING_ONLY = {"diffusion.steps", "diffusion.guidance", "diffusion.s_churn", "diffusion.fine_start", "model.kernels"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def resume_differences(saved: dict, cfg: Config) -> list[str]:
    """What keeps a checkpoint saved with config ``saved`` from resuming under ``cfg``: model and diffusion
    settings, and the optimizer state's layout (optimizer, precision, ZeRO stage; stages 1 and 2 load each other's)."""
    old, t = saved.get("train", {}), cfg.train
    return config_differences(saved, cfg.to_dict()) + [
        f"train.{k}: {old[k]} -> {getattr(t, k)}" for k in ("optimizer", "precision", "zero_stage")
        if k in old and old[k] != getattr(t, k) and {old[k], getattr(t, k)} != {1, 2}]


def config_differences(saved: dict, now: dict, sections=("model", "diffusion")) -> list[str]:
    """``key: saved -> now`` for every setting of ``sections`` that a resume may not change (sampling-only
    settings may)."""
    old = _flat({s: saved.get(s, {}) for s in sections})
    new = _flat(json.loads(json.dumps({s: now[s] for s in sections})))  # tuples as lists, like the saved JSON
    return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in sorted(old.keys() | new.keys())
            if k not in SAMPLING_ONLY and old.get(k) != new.get(k)]
