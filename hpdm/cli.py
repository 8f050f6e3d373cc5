"""The ``hpdm`` command: train, info, export, convert-checkpoint, sample, eval-fvd, eval-synthetic, make-shards,
embed-text, doctor, bench-kernels."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from data_pipeline.local_files import disk_full, write_atomic
from hpdm.config import ConfigError, load_config
from hpdm.distributed import close_distributed
from hpdm.errors import RankFailed, UsageError, UserError, user_errors

# The repository's CPU smoke-test config (an editable install or a checkout); used when --config is not given.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (default: the repository's configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-3 model.levels=2")


def default_config() -> Path:
    """The config of a command run without --config: the repository's configs/tiny.yaml, wherever hpdm is run from.
    An installed copy of hpdm without the repository has none, and then --config is required."""
    if not DEFAULT_CONFIG.is_file():
        raise UsageError(f"--config: not given, and the default {DEFAULT_CONFIG} does not exist (this installation "
                         "of hpdm has no configs/ folder); pass --config FILE")
    if _rank0():
        logging.getLogger("hpdm.cli").info("no --config given: using %s", DEFAULT_CONFIG)
    return DEFAULT_CONFIG


def _rank0() -> bool:
    """Whether this is the only or the first process of a launch (RANK, as torchrun and deepspeed set it)."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # before DeepSpeed's heavy import: config errors come at once
    from hpdm.trainer import train  # noqa: PLC0415

    result = train(cfg)
    if result["rank"] == 0:
        if not result["trained_steps"] and not result["preempted"]:
            print(f"already complete: step {result['step']}, {result['samples']} clips (raise train.steps to train on)")
        else:
            what = "preempted" if result["preempted"] else "done"
            loss = f", last logged loss {result['loss']:.4f}" if "loss" in result else ""
            print(f"{what}: step {result['step']}, {result['samples']} clips{loss}")
    return 0


def cmd_info(args) -> int:
    from hpdm.info import print_info  # noqa: PLC0415

    print_info(load_config(args.config, args.overrides), args.micro_batch, args.processes)
    return 0


def cmd_export(args) -> int:
    from hpdm.export import export  # noqa: PLC0415

    out = export(args.checkpoint, args.out, raw=args.raw)
    print(f"wrote {out}")
    return 0


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default="", help="steps per level, e.g. 128,64,32, or one number for level 0 (halved per "
                                               "level); default: the run's diffusion.steps, halved per level")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: diffusion.guidance)")
    p.add_argument("--overlap", default="half",
                   help="tile overlap: half (metrics; the default), full (one-token stride) or a fraction")
    p.add_argument("--tile-batch", type=int, default=16, help="tiles per network call (default 16)")
    p.add_argument("--churn", type=float, default=None, help="level-0 S_churn (default: diffusion.s_churn)")
    p.add_argument("--level0-order", type=int, default=2, choices=(1, 2), help="level-0 sampler: 2 Heun, 1 Euler")
    p.add_argument("--fine-order", type=int, default=1, choices=(1, 2), help="finer levels' sampler order")
    p.add_argument("--coarse", default="renoise", choices=("renoise", "clean"), help="how tiles see coarser levels")
    p.add_argument("--fine-start", type=float, default=None,
                   help="finer levels start at this sigma from the coarser level upsampled, 0 from pure noise "
                        "(default: diffusion.fine_start)")
    p.add_argument("--batch", type=int, default=1, help="videos sampled together (default 1; eval-synthetic: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the random classes (default 0)")


def _sample_options(args):
    from hpdm.sampling import SampleOptions  # noqa: PLC0415

    try:
        steps = tuple(int(s) for s in args.steps.split(",")) if args.steps.strip() else ()  # "": the config's
    except ValueError:
        raise UsageError(f"--steps: must be whole numbers separated by commas, e.g. 128,64,32; "
                         f"got {args.steps!r}") from None
    return SampleOptions(steps=steps, guidance=args.guidance, overlap=args.overlap, s_churn=args.churn,
                         level0_order=args.level0_order, fine_order=args.fine_order, coarse=args.coarse,
                         fine_start=args.fine_start, tile_batch=args.tile_batch)


def cmd_sample(args) -> int:
    from hpdm.generate import generate  # noqa: PLC0415
    from hpdm.prompts import read_prompts  # noqa: PLC0415

    prompts = read_prompts(args.prompt, args.prompt_file)
    result = generate(args.generator, args.out, num=args.num, label=args.label, text_emb=args.text_emb,
                      prompts=prompts or None, encoder=args.encoder, seed=args.seed, opts=_sample_options(args),
                      batch=args.batch, fps=args.fps, raw=args.raw, lossless=args.lossless)
    print(f"wrote {len(result['files'])} videos of {'x'.join(map(str, result['resolution']))} to {args.out}"
          + (f" (rank {result['rank']} of {result['world']})" if result["world"] > 1 else ""))
    return 0


def _check_json_out(out: str | None, key: str) -> None:
    """``--out`` of the evaluations, checked before the sampling and feature extraction that precede its writing: an
    existing file is replaced only if it is an earlier result of the same command (a JSON object with ``key``)."""
    if not out:
        return
    from hpdm.export import check_output  # noqa: PLC0415

    check_output("--out", Path(out), "result.json")
    if out.endswith("/") and not Path(out).exists():
        raise UsageError(f"--out: {out} names a folder; give the JSON file to write, e.g. {Path(out) / 'result.json'}")
    if Path(out).is_dir():
        raise UsageError(f"--out: {out} is a folder; give the JSON file to write, e.g. {Path(out) / 'result.json'}")
    if Path(out).exists():
        from hpdm.generate import json_object  # noqa: PLC0415

        earlier = json_object(Path(out), limit=1 << 20)  # a result is a few KB; anything large is not one
        if earlier is None or key not in earlier:
            raise UsageError(f"--out: {out} exists and is not an earlier result of this command, which it would "
                             "replace; give another path (or remove the file)")


def cmd_eval_fvd(args) -> int:
    from hpdm.eval_fvd import evaluate, main_result  # noqa: PLC0415

    _check_json_out(args.out, "fvd")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise UsageError(f"--cache-dir: {args.cache_dir} is a file; give a folder for the real videos' statistics")

    try:
        size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    except ValueError:
        raise UsageError(f"--size: must be HxW, e.g. 128x128; got {args.size!r}") from None
    result = evaluate(args.i3d, fake=args.fake, generator=args.generator, real=args.real, real_shards=args.real_shards,
                      num_fake=args.num_fake, num_real=args.num_real, frames=args.frames, size=size, c3d=args.c3d,
                      layout=args.layout, batch=args.batch, seed=args.seed, opts=_sample_options(args),
                      cache_dir=args.cache_dir, i3d_sha256=args.i3d_sha256, c3d_sha256=args.c3d_sha256)
    main_result(result, args.out)
    return 0


def cmd_eval_synthetic(args) -> int:
    from hpdm.synthetic_eval import evaluate_generator, report_table  # noqa: PLC0415

    _check_json_out(args.out, "class_correct")
    result = evaluate_generator(args.generator, args.num, _sample_options(args), seed=args.seed, batch=args.batch,
                                raw=args.raw)
    print(report_table(result))
    print(f"class_correct: {result['class_correct']:.3f} over {result['videos']} videos")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=1))
    return 0


def cmd_convert(args) -> int:
    from hpdm.convert import convert_to_universal  # noqa: PLC0415

    out, latest = convert_to_universal(args.checkpoint)
    print(f"wrote {out}; it resumes at any number of processes and "
          + ("is now the run's latest checkpoint" if latest else
             f"the run's latest stays {(out.parent / 'latest').read_text().strip()}, which is newer: convert that "
             "one to change the number of processes"))
    return 0


def _text_encoder(source: str, max_tokens: int, text_dim: int | None = None):
    """The frozen encoder (on CUDA in bf16 when there is a GPU, else CPU fp32) and what identifies its embeddings:
    a local folder by its absolute path, so `./t5` and `/data/t5` are one encoder."""
    import torch  # noqa: PLC0415

    if max_tokens < 1:
        raise UsageError(f"--max-tokens: must be >= 1; got {max_tokens}")
    from hpdm.text_encoder import TextEncoder  # noqa: PLC0415

    enc = TextEncoder(source, max_tokens, "cuda" if torch.cuda.is_available() else "cpu", text_dim=text_dim)
    path = os.path.expanduser(source)
    name = os.path.abspath(path) if os.path.exists(path) else enc.name
    return enc, {"encoder": name, "width": enc.width, "max_tokens": max_tokens, "digest": enc.digest}


def cmd_make_shards(args) -> int:
    from data_pipeline import cli as data_cli  # noqa: PLC0415

    embed = None
    if args.encoder:  # loaded first: a bad --encoder stops before any shard is written
        enc, meta = _text_encoder(args.encoder, args.max_tokens)
        embed = {"encode": enc.encode, "encoder_meta": meta}
    return data_cli.run(args, embed)


def cmd_embed_text(args) -> int:
    from data_pipeline.shardlist import resolve_shards  # noqa: PLC0415
    from data_pipeline.storage import Storage  # noqa: PLC0415
    from data_pipeline.text_shards import default_location, embed_shards  # noqa: PLC0415

    if args.batch < 1:
        raise UsageError(f"--batch: must be >= 1; got {args.batch}")
    cfg = load_config(args.config) if args.config else None
    if cfg and cfg.model.cond != "text":
        raise UsageError(f"--config: {args.config} is not a text model (model.cond is {cfg.model.cond}, not text)")
    max_tokens = args.max_tokens if args.max_tokens is not None else cfg.model.text_tokens if cfg else 128
    if cfg and max_tokens != cfg.model.text_tokens:
        raise UsageError(f"--max-tokens: {max_tokens}, but model.text_tokens is {cfg.model.text_tokens} in "
                         f"{args.config}; leave --max-tokens out to take the config's")
    out = args.out or default_location(args.shards)
    storage = Storage(args.endpoint_url)
    resolve_shards(storage, args.shards)  # a wrong SHARDS stops before a large encoder loads
    enc, meta = _text_encoder(args.encoder, max_tokens, cfg.model.text_dim if cfg else None)
    index = embed_shards(args.shards, enc.encode, meta, out=out, batch=args.batch, dtype=args.dtype, storage=storage,
                         progress=not args.no_progress)
    print(f"embed-text: {index['num_samples']} captions of {len(index['shards'])} shards at {out} ({meta['encoder']}, "
          f"{meta['width']} wide, up to {max_tokens} tokens, {args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `hpdm` command line: one subcommand per task (tests/test_docs.py checks the README and docs/ against it)."""
    parser = argparse.ArgumentParser(prog="hpdm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error, user errors included")
    # the `deepspeed` launcher passes --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("info", help="parameters, FLOPs per level and activation memory of a config")
    _add_config_args(p)
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch for the memory estimate (default: "
                                                                  "train.micro_batch, or from --processes)")
    p.add_argument("--processes", type=int, default=None, help="processes of the run: the micro-batch is then "
                                                                "train.batch_size / processes, as training takes it")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("export", help="write a checkpoint's EMA weights and config to one safetensors file")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--raw", action="store_true", help="also store the raw (non-EMA) weights")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("sample", help="generate full-resolution videos patch by patch (mp4s, a PNG grid, the cost)")
    p.add_argument("generator", help="exported .safetensors, checkpoint folder or run folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-n", "--num", type=int, default=None, help="number of videos, shared among processes (default: one "
                   "per prompt, else 4); with P prompts at least P, and video i gets prompt i %% P")
    p.add_argument("--label", type=int, default=None, help="class of every video (default: random classes)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="text prompt (repeatable); videos "
                   "are named after their prompts and the grid is captioned with them")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="prompts, one per line (blank lines and lines "
                   "starting with # are skipped), after any --prompt")
    p.add_argument("--encoder", default=None, metavar="MODEL", help="the model's text encoder for the prompts: a "
                   "Hugging Face folder or cached name, e.g. google/t5-v1_1-xxl (bf16 on CUDA, else fp32 on the CPU)")
    p.add_argument("--text-emb", default=None, metavar="FILE", help="or precomputed embeddings: safetensors with "
                   "'text' [S,D] or [N,S,D] and optional 'mask' (with --prompt: one per prompt, or 1)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the mp4s (default: that of the training "
                   "clips, data.fps over data.frame_stride, 24 for the synthetic set; 8 where the data kept native rates)")
    p.add_argument("--raw", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument("--lossless", action="store_true", help="mp4s with the exact frames (H.264 RGB, qp 0), for measures "
                   "such as eval-fvd --fake to agree with --generator's; larger, and not every player shows them")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("eval-fvd", help="FVD (and IS) with the StyleGAN-V protocol")
    p.add_argument("--i3d", required=True, help="TorchScript I3D (StyleGAN-V's i3d_torchscript.pt)")
    p.add_argument("--c3d", default=None, help="TorchScript C3D for IS (StyleGAN-V's c3d_ucf101.pt)")
    p.add_argument("--i3d-sha256", default="", help="refuse an I3D file with another SHA-256")
    p.add_argument("--c3d-sha256", default="", help="refuse a C3D file with another SHA-256")
    p.add_argument("--layout", default="stylegan-v", choices=("stylegan-v", "bthwc"), help="detector call convention")
    p.add_argument("--fake", default=None, help="folder of generated mp4s")
    p.add_argument("--generator", default=None, help="or sample on the fly from this generator")
    p.add_argument("--real", default=None, help="folder of real mp4s")
    p.add_argument("--real-shards", default=None, help="or the project's shards (folder, s3:// prefix or brace pattern)")
    p.add_argument("--num-fake", type=int, default=2048, help="generated videos (2048 or 10000)")
    p.add_argument("--num-real", type=int, default=None, help="real videos (default: --num-fake)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16, the protocol's)")
    p.add_argument("--size", default=None, help="HxW of the clips (default: the generated videos')")
    p.add_argument("--cache-dir", default=None, help="where real statistics are cached (default: ~/.cache/hpdm/fvd)")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_eval_fvd)
    p = sub.add_parser("eval-synthetic", help="sample a model of the synthetic moving-shapes set and measure its shapes")
    p.add_argument("generator", help="exported .safetensors, checkpoint folder or run folder")
    p.add_argument("-n", "--num", type=int, default=16, help="videos to sample (classes in turn)")
    p.add_argument("--raw", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_eval_synthetic, batch=4)
    p = sub.add_parser("convert-checkpoint", help="make a checkpoint resumable at another number of processes")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("make-shards", help="write video shards (local folder or s3://bucket/prefix)")
    from data_pipeline import cli as data_cli  # noqa: PLC0415

    data_cli.add_arguments(p)
    p.add_argument("--encoder", default="", help="also write the captions' embeddings to DEST/text with this Hugging "
                                                  "Face text encoder (a folder or a cached model name)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per caption with --encoder (default 128)")
    p.set_defaults(func=cmd_make_shards)
    p = sub.add_parser("embed-text", help="precompute the captions' text embeddings as shards beside the video shards")
    p.add_argument("shards", help="video shards: folder or s3:// prefix with index.json, or a brace pattern")
    p.add_argument("--encoder", required=True, help="Hugging Face text encoder: a folder or a model name already in "
                                                    "the Hugging Face cache (hpdm never downloads one)")
    p.add_argument("--out", default="", help="where the embedding shards go (default: SHARDS/text)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per caption (default: model.text_tokens of "
                                                                "--config, else 128)")
    p.add_argument("--config", default="", help="run config: takes model.text_tokens and checks the encoder's width "
                                                "against model.text_dim")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="stored dtype (default: bf16)")
    p.add_argument("--batch", type=int, default=64, help="captions per encoder call (default 64)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed_text)
    p = sub.add_parser("doctor", help="check this node (packages, GPUs, data, checkpoint storage) for a config")
    from hpdm import doctor  # noqa: PLC0415

    doctor.add_arguments(p)
    p.set_defaults(func=doctor.run, config=None)  # None: the default config, resolved in main from any folder
    p = sub.add_parser("bench-kernels", help="time the fused kernels against their references (GPU)")
    from kernels import bench  # noqa: PLC0415

    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    for p in sub.choices.values():  # `hpdm train --debug ...` as well as `hpdm --debug train ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A log handler that cannot write (wandb's log files on a full disk) stays silent rather than printing a
    # traceback per message, thousands of lines that bury the error that ended the command.
    logging.raiseExceptions = False
    for name in ("aiobotocore.credentials", "botocore.credentials"):  # "Found credentials in ..." for every client
        logging.getLogger(name).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "config", "") is None:
            args.config = str(default_config())
        status = args.func(args)
    except user_errors() as e:
        return _report(args, e)
    except KeyboardInterrupt:  # a Ctrl-C: one line, not the traceback of wherever it landed (training checkpoints first)
        if args.debug:
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hpdm {args.command}: interrupted", file=sys.stderr)
        return 130
    except PermissionError as e:  # the environment, not a bug: one line naming the path, as for our own errors
        where = e.filename or "a file"
        return _report(args, UserError(f"{where}: {(e.strerror or 'permission denied').lower()}; this user needs "
                                       "access to it: check its owner and mode and those of the folders above it"))
    except Exception as e:  # noqa: BLE001 (two more causes in the environment; anything else is a bug, re-raised)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if disk_full(e):  # a write of our own names its path; a library's (safetensors, wandb) may not
            said = isinstance(e, OSError) and e.strerror  # "no space left on device" or "disk quota exceeded"
            what = (f"{e.filename}: " if said and e.filename else "") + (
                e.strerror.lower() if said else f"no space left on device ({first})")
            return _report(args, UserError(f"{what}; free space, then run the same command again"))
        if not (isinstance(e, RuntimeError) and _peer_lost(e)):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"hpdm {args.command}: error: rank {os.environ.get('RANK', '?')}: another process of the job stopped "
              f"({first}); its own error, printed by it, says why", file=sys.stderr)
        return 2
    close_distributed()
    return status


def _peer_lost(exc: RuntimeError) -> bool:
    """A collective failed because another process of a multi-process job exited (which reports its own error)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        s in str(exc) for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted"))


def _report(args, exc: BaseException) -> int:
    """Print a user error as one line on stderr and return the exit status 2. Of a multi-process launch, rank 0
    prints, and another rank only an error of its own (not one that every rank meets, like a config error);
    with --debug every rank also prints its traceback."""
    if args.debug:
        traceback.print_exc()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not isinstance(exc, (ConfigError, UsageError, RankFailed)):
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"hpdm {args.command}: error: {'' if rank == 0 else f'rank {rank}: '}{message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
