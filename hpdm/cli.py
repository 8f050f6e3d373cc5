"""The ``hpdm`` command: train, info, make-shards, bench-kernels."""
from __future__ import annotations

import argparse
import logging
import sys

from hpdm.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/tiny.yaml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML run config (default: {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-3 model.levels=2")


def cmd_train(args) -> int:
    from hpdm.trainer import train  # noqa: PLC0415 (DeepSpeed is a heavy import)

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.get("loss") is not None:
        print(f"done: step {result['step']}, {result['samples']} clips, loss {result.get('loss', float('nan')):.4f}")
    return 0


def cmd_info(args) -> int:
    import torch  # noqa: PLC0415

    from hpdm.flops import activation_bytes, forward_flops_per_level, parameter_counts  # noqa: PLC0415
    from hpdm.model import HPDM  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
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
    micro = args.micro_batch or cfg.train.micro_batch or 1
    act = activation_bytes(m, micro, dtype)
    print(f"\nactivation memory, micro-batch {micro} ({cfg.train.precision}): {act / 2**30:.2f} GiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="hpdm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("info", help="parameters, FLOPs per level and activation memory of a config")
    _add_config_args(p)
    p.add_argument("--micro-batch", type=int, default=0, help="micro-batch for the memory estimate")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench-kernels", help="time the fused kernels against their references (GPU)")
    from kernels import bench  # noqa: PLC0415

    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
