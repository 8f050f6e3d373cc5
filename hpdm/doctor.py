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

OK, WARN, FAIL = "ok", "warn", "FAIL"
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


# -- storage --------------------------------------------------------------------------------------------
def _storage(cfg: Config):
    from data_pipeline.storage import Storage  # noqa: PLC0415

    return Storage(cfg.data.endpoint_url, retries=1, backoff=0.2)


def _bucket_exists(storage, url: str) -> None:
    """Raise a StorageError ("bucket ... does not exist", "access denied", ...) unless the bucket answers."""
    bucket = url[len("s3://"):].split("/")[0]
    storage.retry(lambda: storage.s3.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1), url, "listing")


def check_data(cfg: Config) -> list:
    from braceexpand import braceexpand  # noqa: PLC0415

    from data_pipeline.shardlist import load_index  # noqa: PLC0415
    from data_pipeline.storage import StorageError, is_s3, join  # noqa: PLC0415
    from data_pipeline.stream import DataError  # noqa: PLC0415
    from data_pipeline.synthetic import check_empty, check_labels, synthetic_frames, synthetic_origin  # noqa: PLC0415

    spec, storage = cfg.data.shards, _storage(cfg)
    try:
        if is_s3(spec):
            _bucket_exists(storage, spec)
        if cfg.data.synthetic and ("{" in spec or spec.endswith(".tar") or not storage.exists(join(spec, "index.json"))):
            m = cfg.model
            frames = synthetic_frames(cfg.data, m.resolution[0])
            check_empty(storage, spec, synthetic_origin(cfg.data.synthetic_videos, m.resolution, m.num_classes, frames))
        if "{" in spec or spec.endswith(".tar"):
            first = next(iter(braceexpand(spec)))
            if not storage.exists(first):
                return [("data", FAIL, f"{first} (the pattern's first shard) does not exist")]
            return [("data", OK, f"{spec}: first shard present")]
        if not is_s3(spec) and not os.path.isdir(spec):
            if cfg.data.synthetic:
                return [("data", WARN, f"{spec} does not exist yet; data.synthetic=true: rank 0 writes "
                                       f"{cfg.data.synthetic_videos} synthetic videos there at start")]
            what = "is not a folder" if os.path.exists(spec) else "does not exist"
            return [("data", FAIL, f"data.shards {spec} {what}")]
        index = load_index(storage, spec)  # the checks training makes: a valid index, labels that fit the model
        if index is not None:
            check_labels(index, cfg.model.num_classes, spec, cfg.model.cond == "class")
            listed, names = set(storage.contents(spec)), [s["name"] for s in index["shards"]]
            missing = [n for n in names if join(spec, n) not in listed and not storage.exists(join(spec, n))]
            if missing:
                return [("data", FAIL, f"{spec}: {len(missing)} of the {len(names)} shards its index.json lists are "
                                       f"missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")]
            return [("data", OK, f"{join(spec, 'index.json')}: {len(names)} shards, {index.get('num_samples')} samples")]
        tars = storage.list(spec, ".tar")
        if tars:
            return [("data", WARN, f"{spec} has no index.json; {len(tars)} .tar shards listed (sample counts unknown)")]
        if cfg.data.synthetic:
            return [("data", WARN, f"{spec} is empty; data.synthetic=true: rank 0 writes synthetic videos there at start")]
        return [("data", FAIL, f"{spec}: no index.json and no .tar shards; write some with `hpdm make-shards`")]
    except (StorageError, DataError) as exc:
        return [("data", FAIL, str(exc))]


def _probe_dir(path: Path) -> str:
    """Create ``path`` if needed, write, read back and delete a probe file; remove folders made here."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".hpdm-doctor-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"hpdm doctor")
            f.flush()
            os.fsync(f.fileno())
        if probe.read_bytes() != b"hpdm doctor":
            raise OSError(f"{probe} read back different bytes")
    finally:
        probe.unlink(missing_ok=True)
        for p in missing:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
    return "probe file written, read back and deleted"


def _fs_type(path: Path) -> str:
    """The mount's file-system type (nfs, lustre, ext4, ...) from /proc/mounts, or ''."""
    try:
        best, kind, real = "", "", str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return ""


def check_run_dir(cfg: Config) -> list:
    run_dir = Path(cfg.train.run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return [("run_dir", FAIL, f"cannot create train.run_dir {run_dir}: {blocker} is a file, not a folder")]
    try:
        detail = _probe_dir(run_dir)
    except OSError as exc:
        return [("run_dir", FAIL, f"train.run_dir {run_dir} is not writable: {type(exc).__name__}: {exc.strerror or exc}")]
    fs = _fs_type(run_dir)
    return [("run_dir", OK, f"{run_dir}: {detail}" + (f" ({fs})" if fs else ""))]


def check_checkpoint_uri(cfg: Config) -> list:
    from data_pipeline.storage import StorageError  # noqa: PLC0415

    uri = cfg.train.checkpoint_uri
    if not uri:
        return [("checkpoint_uri", OK, "not set: checkpoints stay in train.run_dir (use a shared file system on several nodes)")]
    try:
        _storage(cfg).check_writable(uri)
    except StorageError as exc:
        return [("checkpoint_uri", FAIL, str(exc))]
    return [("checkpoint_uri", OK, f"{uri}: bucket reachable, probe object written and deleted")]


def check_resume(cfg: Config) -> list:
    """Whether the run folder's newest intact checkpoint resumes under this config (as `hpdm train` checks)."""
    from data_pipeline.storage import StorageError  # noqa: PLC0415
    from data_pipeline.stream import DataError  # noqa: PLC0415
    from hpdm.checkpoint import Checkpointer, read_state  # noqa: PLC0415
    from hpdm.config import resume_differences  # noqa: PLC0415
    from hpdm.errors import CheckpointError, UserError  # noqa: PLC0415
    from hpdm.text_encoder import encoder_change, text_identity  # noqa: PLC0415

    ckpt = Checkpointer(cfg.train.run_dir)
    try:
        tag = ckpt.newest_local()
    except CheckpointError as exc:
        return [("resume", FAIL, str(exc))]
    remote = "; train.checkpoint_uri may hold a newer one (not read here)" if cfg.train.checkpoint_uri else ""
    if not tag:
        return [("resume", OK, f"no checkpoint in {ckpt.root}: the run starts at step 0{remote}")]
    state = read_state(ckpt.root / tag)
    try:
        changed = encoder_change(state.get("text_encoder"), text_identity(cfg))
    except (UserError, DataError, StorageError):  # no embeddings or encoder: the text row says why
        changed = None
    differ = resume_differences(state["config"], cfg) + ([changed] if changed else [])
    if differ:
        return [("resume", FAIL, f"cannot resume {tag} with this config: {'; '.join(differ)}")]
    return [("resume", OK, f"resumes from {tag} (step {state['step']}){remote}")]


def _checkpoint_bytes(cfg: Config) -> int:
    """Rough size of one checkpoint: fp32 weights, two optimizer moments and the EMA (16 bytes a parameter)."""
    import torch  # noqa: PLC0415

    from hpdm.model import HPDM  # noqa: PLC0415

    with torch.device("meta"):
        return 16 * sum(p.numel() for p in HPDM(cfg.model).parameters())


def check_disk(cfg: Config) -> list:
    path = Path(cfg.train.run_dir).absolute()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    try:
        one = _checkpoint_bytes(cfg)
    except Exception:  # noqa: BLE001 (an estimate only)
        one = 0
    need = one * (cfg.train.keep_checkpoints + 1)  # the kept ones plus the one being written
    detail = f"{free / 2**30:.1f} GiB free at {path}"
    if one:
        detail += f"; a checkpoint is about {one / 2**30:.2f} GiB, {cfg.train.keep_checkpoints}+1 need {need / 2**30:.1f} GiB"
    status = FAIL if free < one else WARN if free < max(need, 1 << 30) else OK
    return [("disk", status, detail)]


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


def check_text(cfg: Config) -> list:
    """A text model's captions: the encoder of data.text_encoder (its width), or the precomputed embeddings'
    index (width and token count against the model)."""
    m, d = cfg.model, cfg.data
    if m.cond != "text":
        return [("text", OK, "not a text-conditioned model")]
    if d.text_encoder:
        from hpdm.text_encoder import TextEncoderError, encoder_config  # noqa: PLC0415

        try:
            width = encoder_config(d.text_encoder, "data.text_encoder")[3]  # refused as training would refuse it
        except TextEncoderError as exc:
            return [("text", FAIL, str(exc))]
        except ImportError as exc:
            return [("text", FAIL, f"data.text_encoder {d.text_encoder}: {str(exc).splitlines()[0]}")]
        ok = width == m.text_dim
        return [("text", OK if ok else FAIL, f"data.text_encoder {d.text_encoder}: {width} wide, model.text_dim "
                                             f"{m.text_dim}; captions encoded on the fly")]
    from data_pipeline.loader import matching_text_urls, text_location  # noqa: PLC0415
    from data_pipeline.shardlist import resolve_shards  # noqa: PLC0415
    from data_pipeline.storage import StorageError  # noqa: PLC0415
    from data_pipeline.stream import DataError  # noqa: PLC0415

    storage = _storage(cfg)
    try:
        urls, _ = resolve_shards(storage, d.shards)
        matching_text_urls(d, storage, urls, m.text_tokens, m.text_dim)
    except (StorageError, DataError) as exc:
        status = WARN if d.synthetic and not storage.exists(d.shards.rstrip("/") + "/index.json") else FAIL
        return [("text", status, str(exc))]
    return [("text", OK, f"{text_location(d)}: embeddings of {len(urls)} shards fit model.text_dim {m.text_dim} "
                         f"and model.text_tokens {m.text_tokens}")]


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
