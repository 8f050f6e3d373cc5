"""``hpdm doctor``'s checks of what a run reads and writes: the data (and a text model's embeddings or encoder),
the run folder, the resume from its newest checkpoint, the checkpoint copy on S3 and the disk. Each returns rows of
(check, status, detail); ``hpdm/doctor.py`` runs them with time limits beside the node's own checks.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from hpdm.config import Config, ConfigError
from hpdm.run_lock import check_run_dir_writable

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _storage(cfg: Config):
    from data_pipeline.storage import Storage  # noqa: PLC0415

    return Storage(cfg.data.endpoint_url, retries=1, backoff=0.2, outage=0)


def _bucket_exists(storage, url: str) -> None:
    """Raise a StorageError ("bucket ... does not exist", "access denied", ...) unless the bucket answers."""
    bucket = url[len("s3://"):].split("/")[0]
    storage.retry(lambda: storage.s3.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1), url, "listing")


def check_data(cfg: Config) -> list:
    from braceexpand import braceexpand  # noqa: PLC0415

    from data_pipeline.shardlist import check_finished, check_readable, load_index  # noqa: PLC0415
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
            check_readable([join(spec, n) for n in names])
            said = f"{join(spec, 'index.json')}: {len(names)} shards, {index.get('num_samples')} samples"
            unlisted = sorted({u.rsplit("/", 1)[-1] for u in listed if u.endswith(".tar")} - set(names))
            if unlisted:  # e.g. shards copied in later: training reads only what the index lists
                return [("data", WARN, f"{said}; {len(unlisted)} .tar files beside it are not in the index and are "
                                       f"not read ({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''})")]
            return [("data", OK, said)]
        check_finished(spec, storage.contents(spec))
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
        check_run_dir_writable(run_dir)  # what training checks: its checkpoints/, samples/ and files too
    except OSError as exc:
        return [("run_dir", FAIL, f"train.run_dir {run_dir} is not writable: {type(exc).__name__}: {exc.strerror or exc}")]
    except ConfigError as exc:
        return [("run_dir", FAIL, str(exc))]
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
    from hpdm.checkpoint import Checkpointer  # noqa: PLC0415
    from hpdm.checkpoint_folder import read_state  # noqa: PLC0415
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
        return [("resume", *_check_init_from(cfg, f"no checkpoint in {ckpt.root}: the run starts at step 0{remote}"))]
    state = read_state(ckpt.root / tag)
    try:
        changed = encoder_change(state.get("text_encoder"), text_identity(cfg))
    except (UserError, DataError, StorageError):  # no embeddings or encoder: the text row says why
        changed = None
    differ = resume_differences(state["config"], cfg) + ([changed] if changed else [])
    if differ:
        return [("resume", FAIL, f"cannot resume {tag} with this config: {'; '.join(differ)}")]
    unused = f"; train.init_from is not used (the run started from {state['config']['train'].get('init_from') or 'scratch'})"
    return [("resume", OK, f"resumes from {tag} (step {state['step']}){remote}" + (unused if cfg.train.init_from else ""))]


def _check_init_from(cfg: Config, detail: str) -> tuple[str, str]:
    """(status, detail) of a run starting at step 0: whether ``train.init_from`` fits the model, as training checks
    it, from the source's config and tensor shapes (on a model without storage: no weights are read or made)."""
    if not cfg.train.init_from:
        return OK, detail
    import torch  # noqa: PLC0415

    from hpdm.errors import user_errors  # noqa: PLC0415
    from hpdm.finetune import check_source  # noqa: PLC0415
    from hpdm.model import HPDM  # noqa: PLC0415
    from hpdm.text_encoder import text_identity  # noqa: PLC0415

    try:
        text_id = text_identity(cfg)
    except user_errors():  # no embeddings or encoder: the text row says why
        return WARN, f"{detail}; train.init_from not checked: which text encoder the run trains on is unknown"
    try:
        with torch.device("meta"):
            model = HPDM(cfg.model)
        fresh = check_source(model, cfg.train.init_from, cfg.diffusion, text_id)[1]
    except ConfigError as exc:
        return FAIL, str(exc)
    return OK, f"{detail}, from train.init_from {cfg.train.init_from} ({len(fresh)} new tensors)"


def checkpoint_bytes(cfg: Config) -> int:
    """Size of one checkpoint, per parameter: DeepSpeed's module weights (none at ZeRO-3, where its optimizer
    files hold them), an fp32 master copy (bf16, or ZeRO 1-2 partitions), two optimizer moments, the fp32 EMA and
    the raw weights in the training precision. It said 16 bytes, 21-34 % under what runs wrote."""
    import torch  # noqa: PLC0415

    from hpdm.model import HPDM  # noqa: PLC0415

    t = cfg.train
    weight = 2 if t.precision == "bf16" else 4
    module = 0 if t.zero_stage == 3 else weight
    master = 4 if t.precision == "bf16" or t.zero_stage > 0 else 0
    with torch.device("meta"):
        return (module + master + 8 + 4 + weight) * sum(p.numel() for p in HPDM(cfg.model).parameters())


def check_disk(cfg: Config) -> list:
    path = Path(cfg.train.run_dir).absolute()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    try:
        one = checkpoint_bytes(cfg)
    except Exception:  # noqa: BLE001 (an estimate only)
        one = 0
    need = one * (cfg.train.keep_checkpoints + 1)  # the kept ones plus the one being written
    detail = f"{free / 2**30:.1f} GiB free at {path}"
    if one:
        detail += f"; a checkpoint is about {one / 2**30:.2f} GiB, {cfg.train.keep_checkpoints}+1 need {need / 2**30:.1f} GiB"
    status = FAIL if free < one else WARN if free < max(need, 1 << 30) else OK
    return [("disk", status, detail)]


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
