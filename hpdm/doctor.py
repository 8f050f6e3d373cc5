"""``hpdm doctor``: check that this node can run a config, as a table of check / status / detail.

Statuses: ``ok``, ``warn`` (works, but not as well as it could), ``FAIL`` (the run would fail); the exit code
is 1 when anything FAILs. Every check runs with a time limit (network checks: ``--timeout``), so a dead
endpoint or a hung driver shows up as a FAIL instead of a hang. Credentials are reported as set or unset,
never printed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import socket
import sys
import threading
from pathlib import Path

from data_pipeline.cli import number_at_least
from data_pipeline.storage import without_userinfo
from hpdm.config import Config, load_config
from hpdm.doctor_storage import (FAIL, OK, WARN, check_checkpoint_uri, check_data, check_disk, check_resume,
                                 check_run_dir, check_text)

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
LOCAL_TIMEOUT = 120.0  # imports and CUDA initialisation


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/tiny.yaml", help="YAML run config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.run_dir=/shared/runs/x")
    p.add_argument("--timeout", type=number_at_least(0, float, strict=True), default=20.0,
                   help="seconds allowed to each network check (default 20)")


def _limited(fn, timeout: float):
    """``fn()`` in a daemon thread; its rows, or one FAIL row when it raises or outlives ``timeout``."""
    box: dict = {}

    def target():
        try:
            box["rows"] = fn()
        except Exception as exc:  # noqa: BLE001 (a check that crashes is a failed check)
            box["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return [(None, FAIL, f"did not finish within {timeout:.0f} s (unreachable endpoint or hung driver?)")]
    if "error" in box:
        return [(None, FAIL, box["error"])]
    return box["rows"]


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


# -- software -------------------------------------------------------------------------------------------
def _package(module: str, dist: str, required: bool, gpu: bool) -> list:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        mod = importlib.import_module(module)
        version = getattr(mod, "__version__", None) or version
    except Exception as exc:  # noqa: BLE001 (missing, or built against another torch/CUDA)
        why = "not installed" if version is None else f"{version} installed but import fails: {type(exc).__name__}: {exc}"
        if required:
            return [(None, FAIL, why)]
        if not gpu:
            return [(None, OK, f"{why} (not used on CPU)")]
        return [(None, WARN, f"{why}; attention falls back to PyTorch SDPA")]
    return [(None, OK, str(version))]


def check_software(gpu: bool) -> list:
    rows = [("python", OK if sys.version_info >= (3, 10) else FAIL, f"{platform.python_version()} ({sys.executable})")]
    for name, module, dist, required in (("torch", "torch", "torch", True), ("deepspeed", "deepspeed", "deepspeed", True),
                                         ("triton", "triton", "triton", False), ("flash-attn", "flash_attn", "flash-attn", False),
                                         ("xformers", "xformers", "xformers", False)):
        for _, status, detail in _limited(lambda: _package(module, dist, required, gpu), LOCAL_TIMEOUT):
            if name == "torch" and status == OK:
                import torch  # noqa: PLC0415

                detail += f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
            if name == "triton" and status != OK:
                status, detail = WARN, f"{detail.split(';')[0]}; the fused kernels fall back to their PyTorch references"
            rows.append((name, status, detail))
    return rows


# -- hardware -------------------------------------------------------------------------------------------
def check_gpus() -> list:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not torch.cuda.is_available():
        return [("gpus", WARN, "no CUDA GPU: training runs on CPU with the gloo backend (slow)"),
                ("nccl", OK if dist.is_gloo_available() else FAIL, "not used on CPU; gloo "
                 + ("available" if dist.is_gloo_available() else "NOT available"))]
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    rows = [("gpus", OK, f"{len(gpus)}: " + "; ".join(gpus))]
    if not dist.is_nccl_available():
        rows.append(("nccl", FAIL, "torch was built without NCCL: multi-GPU training cannot start"))
    else:
        version = torch.cuda.nccl.version()
        rows.append(("nccl", OK, ".".join(map(str, version)) if isinstance(version, tuple) else str(version)))
    return rows


def check_attention(gpu: bool) -> list:
    import torch  # noqa: PLC0415

    from hpdm.attention import select_backend  # noqa: PLC0415

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    q = torch.randn(1, 256, 4, 64, device=device, dtype=dtype)
    forced = " (forced by HPDM_ATTENTION)" if os.environ.get("HPDM_ATTENTION") else ""
    return [("attention", OK, f"{select_backend(q, q, q)}{forced} for {dtype} on {device}")]


# -- environment ----------------------------------------------------------------------------------------
def check_credentials(cfg: Config) -> list:
    uses_s3 = any(u.startswith("s3://") for u in (cfg.data.shards, cfg.train.checkpoint_uri))
    set_ = [k for k in CREDENTIAL_VARS if os.environ.get(k)]
    endpoint = cfg.data.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    endpoint = without_userinfo(endpoint)
    detail = f"set: {', '.join(set_) or 'none'}; endpoint {endpoint}"
    files = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().is_file()
    if uses_s3 and not set_ and not files:
        return [("aws-credentials", WARN, detail + "; no credentials file either (fine only with an instance role)")]
    return [("aws-credentials", OK, detail if uses_s3 else detail + " (S3 not used by this config)")]


def _reachable(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def check_launcher(timeout: float) -> list:
    env = os.environ
    rows = []
    tools = {name: shutil.which(name) for name in ("deepspeed", "pdsh", "srun")}
    detail = "; ".join(f"{n} {'at ' + p if p else 'not found'}" for n, p in tools.items())
    rows.append(("launcher-tools", OK if tools["deepspeed"] else WARN,
                 detail + ("" if tools["deepspeed"] else " (the launchers/ scripts need `deepspeed` on PATH)")))
    if "RANK" not in env:
        rows.append(("launcher-env", OK, "RANK unset: not started by a launcher"))
        return rows
    master = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    detail = f"rank {env['RANK']} of {env.get('WORLD_SIZE', '?')}, local rank {env.get('LOCAL_RANK', '?')}, master {master}"
    if env.get("RANK") == "0" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        rows.append(("launcher-env", OK if "MASTER_ADDR" in env else WARN, detail))
        return rows
    error = _reachable(env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout)
    rows.append(("launcher-env", WARN if error else OK,
                 detail + (f"; master not reachable ({error}; it may not be listening yet)" if error else "; master reachable")))
    return rows


def check_nccl_env() -> list:
    names = sorted(k for k in os.environ if k.startswith("NCCL_"))
    return [("nccl-env", OK, ", ".join(f"{k}={os.environ[k]}" for k in names) if names else "no NCCL_* variables set")]


def run_checks(cfg: Config, timeout: float) -> list[tuple[str, str, str]]:
    """All checks, in table order, as (check, status, detail)."""
    gpu = _limited(lambda: [(None, OK, _cuda())], LOCAL_TIMEOUT)[0][2] is True  # False also when CUDA hangs
    plan = [(lambda: check_software(gpu), LOCAL_TIMEOUT, "software"), (check_gpus, LOCAL_TIMEOUT, "gpus"),
            (lambda: check_attention(gpu), LOCAL_TIMEOUT, "attention"), (check_nccl_env, 5, "nccl-env"),
            (lambda: check_data(cfg), timeout, "data"), (lambda: check_text(cfg), timeout, "text"),
            (lambda: check_run_dir(cfg), timeout, "run_dir"), (lambda: check_resume(cfg), timeout, "resume"),
            (lambda: check_checkpoint_uri(cfg), timeout, "checkpoint_uri"), (lambda: check_disk(cfg), timeout, "disk"),
            (lambda: check_credentials(cfg), 5, "aws-credentials"), (lambda: check_launcher(min(timeout, 5)), timeout, "launcher")]
    rows = []
    for fn, limit, name in plan:
        rows += [(n or name, s, d) for n, s, d in _limited(fn, limit)]
    return rows


def format_table(rows) -> str:
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'check':<{width}}{'status':<8}detail", "-" * (width + 40)]
    lines += [f"{name:<{width}}{status:<8}{detail}" for name, status, detail in rows]
    return "\n".join(lines)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    rows = run_checks(cfg, args.timeout)
    shown = without_userinfo(" ".join([args.config, *args.overrides]))
    print(f"hpdm doctor on {socket.gethostname()}, config {shown}")
    print(format_table(rows))
    fails, warns = sum(r[1] == FAIL for r in rows), sum(r[1] == WARN for r in rows)
    print(f"\n{fails} FAIL, {warns} warn" + (": this node cannot run the config" if fails else ""))
    return 1 if fails else 0
