"""Run checkpoints: DeepSpeed's sharded engine state plus ours (EMA, progress, data position, RNG).

Layout under ``run_dir/checkpoints`` (mirrored to ``train.checkpoint_uri`` when that is an ``s3://`` prefix):

    step_00001000/   DeepSpeed's files (each rank writes its own shard), rank_00000.safetensors per rank
                     (RNG state; data-loader position in its metadata), ema.safetensors, raw.safetensors (the
                     consolidated raw weights, for sampling and export at any ZeRO stage), state.json
    latest           the name of the newest complete checkpoint
    set-aside/       checkpoints newer than the one a run resumed from, moved here instead of being overwritten

A checkpoint is complete once ``state.json`` exists, which rank 0 writes after every rank has finished its
files; it lists every file with its size, so a truncated or missing file is found before loading. Only then is
``latest`` replaced, atomically, and the copy uploaded. A crash or a failed upload therefore leaves a complete
local checkpoint. When ``latest`` is missing or names a broken checkpoint, the newest intact one is used, with
a warning (as torchtitan and Lightning resume from the newest complete step folder).

Nothing from a checkpoint can run code: every ``torch.load`` during loading and conversion, DeepSpeed's own
included, is forced to ``weights_only=True`` with an allow-list of DeepSpeed's plain-data classes
(``hpdm.safe_load.no_pickle``); our own files are safetensors and JSON.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from safetensors import safe_open

from data_pipeline.local_files import disk_full, write_atomic
from data_pipeline.storage import Storage, StorageError, join
from hpdm.checkpoint_folder import (RAW_FILE, file_sizes, is_checkpoint_name, is_complete, is_universal, is_whole,
                                    order, problems, read_state, save_safetensors)
from hpdm.distributed import on_rank0
from hpdm.ema import full_parameters
from hpdm.errors import CheckpointError, RankFailed
from hpdm.safe_load import load_safetensors, no_pickle

log = logging.getLogger(__name__)
_SAID: set = set()  # fallback warnings given by this process
_OWN_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rank_(\d+)\.")  # files that rank N writes


class DamagedCheckpoint(CheckpointError):
    """A remote checkpoint whose state.json cannot be read: passed over for an older one when resuming."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, remote: str = "", storage: Storage | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.remote = keep, remote.rstrip("/")
        self.storage = storage or Storage()

    # -- finding ---------------------------------------------------------------------------------------
    def folders(self) -> list[Path]:
        """Checkpoint folders, oldest first."""
        return sorted((p for p in self.root.glob("step_*") if p.is_dir() and is_checkpoint_name(p.name)),
                      key=lambda p: order(p.name))

    def newest_local(self) -> str:
        """The checkpoint named by ``latest`` when it is intact, else the newest intact one (with a warning).

        Raises CheckpointError when checkpoints exist but none is intact: starting afresh would overwrite them."""
        f = self.root / "latest"
        try:
            named = f.read_bytes().decode().strip() if f.is_file() else ""
            named_wrong = ((problems(self.root / named) if is_checkpoint_name(named)
                            else ["not a checkpoint folder of this run"]) if named else [])
        except (OSError, UnicodeDecodeError) as exc:  # garbled: fall back like any other broken pointer
            named, named_wrong = "?", [f"unreadable ({exc})"]
        if named and not named_wrong:
            return named
        why = (f"{f} names {named[:80]}: {'; '.join(named_wrong)}" if named else
               f"{f} is {'empty' if f.is_file() else 'missing'}")
        folders, broken = self.folders(), []
        for p in reversed(folders):
            wrong = named_wrong if p.name == named else problems(p)
            if not wrong:
                said = ("; ".join([why, *broken]), p.name)
                if said not in _SAID:  # once per process: a source of train.init_from is looked up several times
                    _SAID.add(said)
                    log.warning("%s; using %s, the newest intact checkpoint", *said)
                return p.name
            if p.name != named:  # already said in ``why``
                broken.append("; ".join(wrong))
        if any(is_complete(p) for p in folders):
            raise CheckpointError(f"no intact checkpoint in {self.root}: " + " | ".join([*named_wrong, *broken])
                                  + ". Repair these folders, or move them away (training then starts the run afresh)")
        if named or broken:
            log.warning("%s and no checkpoint is complete (%d unfinished saves); starting at step 0", why, len(broken))
        return ""

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the newest intact one here or (when newer) in the remote copy, which
        is then fetched. Chosen on rank 0; collective: every rank calls it."""
        def choose() -> str:
            try:
                tag, damaged = self.newest_local(), []
            except CheckpointError as exc:  # nothing intact here: the remote copy may have it
                if not self.remote:
                    raise
                tag, damaged = "", [str(exc)]
            if self.remote and self.storage.exists(join(self.remote, "latest")):
                named = self.storage.read_bytes(join(self.remote, "latest")).decode(errors="replace").strip()
                # the one `latest` names, then older ones (newer folders are uploads that have not finished)
                tags = {t for t in self._remote_tags() if not is_checkpoint_name(named) or order(t) <= order(named)}
                for remote in sorted(tags, key=order, reverse=True):
                    if order(remote) <= order(tag or "none"):  # a converted local copy (step_N_universal) beats step_N
                        break
                    try:
                        self._check_remote_owner(remote)
                        wrong = self._fetch(remote)  # on this node; the others fetch it in _download
                    except DamagedCheckpoint as exc:
                        wrong = [str(exc)]
                    if not wrong:
                        return remote
                    damaged.append("; ".join(wrong))
                    log.warning("the remote checkpoint %s is damaged (%s); trying the next older one",
                                join(self.remote, remote), damaged[-1])
            if damaged and not tag:  # starting afresh would bury them
                raise CheckpointError(f"no intact checkpoint in {self.root} or train.checkpoint_uri {self.remote}: "
                                      + " | ".join(damaged))
            return tag

        tag = on_rank0(choose, share=True)
        if tag and self.remote:
            self._download(tag)
        return self.root / tag if tag else None

    def _remote_tags(self) -> list[str]:
        names = (u.rstrip("/").rsplit("/", 1)[1] for u in self.storage.list(self.remote))
        return [t for t in names if is_checkpoint_name(t)]

    def _remote_state(self, tag: str) -> dict | None:
        """The remote checkpoint's state.json (None where there is none), or a DamagedCheckpoint naming it."""
        url = join(self.remote, tag, "state.json")
        if not self.storage.exists(url):
            return None
        try:
            state = json.loads(self.storage.read_bytes(url))
            if not isinstance(state["config"]["train"]["run_dir"], str):
                raise TypeError("its config's train.run_dir is not a string")
        except (ValueError, TypeError, KeyError) as exc:
            raise DamagedCheckpoint(f"{url}: not an hpdm checkpoint state ({type(exc).__name__}: {exc}); delete that "
                                    "checkpoint folder from train.checkpoint_uri") from None
        return state

    def _check_remote_owner(self, tag: str) -> None:
        """Refuse to continue from, or upload beside, a remote checkpoint of another run folder: two runs given one
        checkpoint_uri silently took over each other's weights, optimizer and data position."""
        state = self._remote_state(tag)
        if state is None:
            return
        owner, here = state["config"]["train"]["run_dir"], self.root.parent
        if os.path.abspath(os.path.expanduser(owner)) != os.path.abspath(here):
            raise CheckpointError(f"train.checkpoint_uri {self.remote} holds the checkpoints of the run in {owner} "
                                  f"(latest {tag}), not of train.run_dir {here}: give this run a checkpoint_uri of its "
                                  f"own, or train.run_dir={owner} to continue that run")

    def set_aside_newer(self, tag: str) -> None:
        """Rank 0: move checkpoint folders newer than ``tag`` (the one resumed from) to ``set-aside/``, so that
        this run's saves never overwrite them; unfinished saves are deleted."""
        for p in self.folders():
            if order(p.name) <= order(tag or "none"):
                continue
            if not is_complete(p):
                shutil.rmtree(p)
                log.info("removed %s, a save that did not finish", p)
                continue
            self._set_aside(p, "is newer than the checkpoint this run resumes from")

    def _set_aside(self, path: Path, why: str) -> None:
        dest = self.root / "set-aside" / path.name
        dest = dest.with_name(f"{path.name}.{int(time.time())}") if dest.exists() else dest
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        log.warning("%s %s; moved to %s", path, why, dest)

    def _fetch(self, tag: str) -> list[str]:
        """Download remote checkpoint ``tag`` here unless it is here already; its ``problems`` (a damaged download
        is removed again, so that it is never taken for a complete checkpoint)."""
        folder = self.root / tag
        if is_complete(folder) and problems(folder):  # a damaged copy of it here: kept, out of the way
            self._set_aside(folder, "is damaged, and the remote copy of it is fetched")
        if not is_complete(folder):
            prefix = join(self.remote, tag)
            urls = self.storage.list(prefix)
            log.info("downloading checkpoint %s (%d files)", prefix, len(urls))
            for url in sorted(urls, key=lambda u: u.endswith("state.json")):  # state.json last: it marks completion
                self.storage.download(url, str(folder / url.rsplit("/", 1)[1]))
        if wrong := problems(folder):
            shutil.rmtree(folder, ignore_errors=True)
        return wrong

    def _download(self, tag: str) -> None:
        """Collective. Local rank 0 of every node without the folder fetches it (shared file systems once per node)."""
        def fetch_here() -> None:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not is_complete(self.root / tag):
                if wrong := self._fetch(tag):
                    raise CheckpointError(f"{join(self.remote, tag)} was intact when chosen, but its copy here is "
                                          "not: " + "; ".join(wrong))

        on_rank0(lambda: None, first=fetch_here)  # a failure on any node stops every rank

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, engine, ema, step: int, samples: int, loader_state: dict, rng: torch.Tensor, state: dict) -> Path:
        """Collective: every rank calls it. ``state`` (config, ...) goes into state.json; ``rng`` is the training
        generator's ``get_state()``, a CPU ByteTensor also for a CUDA generator. Returns the folder."""
        t0 = time.perf_counter()
        rank, tag = _rank(), f"step_{step:08d}"
        path = self.root / tag
        before = self.named_latest()
        try:
            self._write(engine, ema, path, rank, {"step": step, "samples": samples, **state}, loader_state, rng)
        except Exception as exc:
            if not disk_full(exc, path):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            kept = f"the last complete checkpoint, {before}, is as it was" if before else "no checkpoint is affected"
            raise CheckpointError(f"saving {path}: no space left on device ({first}); {kept}: free space, then run the "
                                  "same command to go on") from exc
        if rank == 0:
            self._prune()
            log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - t0)
        _barrier()
        if self.remote:
            self._upload(path, rank)
        return path

    def _write(self, engine, ema, path: Path, rank: int, state: dict, loader_state: dict, rng: torch.Tensor) -> None:
        on_rank0(lambda: self._clear(path))
        # the version marker lets `hpdm convert-checkpoint` (DeepSpeed's ds_to_universal) convert this checkpoint
        engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False,
                               client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        save_safetensors({"rng": rng}, path / f"rank_{rank:05d}.safetensors", metadata={"loader": json.dumps(loader_state)})
        with full_parameters(engine.module):  # collective under ZeRO-3
            if rank == 0:
                save_safetensors({n: p.detach().contiguous() for n, p in engine.module.named_parameters()}, path / RAW_FILE)
        if rank == 0:
            save_safetensors({k: v.contiguous() for k, v in ema.state_dict().items()}, path / "ema.safetensors")
        mine = file_sizes(path, [f.name for f in path.iterdir() if self._owner(f.name) == rank])
        sizes = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            sizes = [None] * dist.get_world_size()
            dist.all_gather_object(sizes, mine)  # also the barrier after which every rank's files are written
        if rank == 0:
            files = {k: v for s in sizes for k, v in s.items()}
            world = dist.get_world_size() if dist.is_initialized() else 1
            # the mark of a complete checkpoint: whole or absent, also when the process is killed while writing it
            write_atomic(path / "state.json", json.dumps({**state, "world_size": world, "files": files}, indent=1))
            try:
                self.set_latest(path.name)
            except BaseException:  # a complete folder newer than `latest` would be set aside on resume: unfinish it
                (path / "state.json").unlink(missing_ok=True)
                raise

    def _clear(self, path: Path) -> None:
        if is_complete(path):
            raise CheckpointError(f"{path} exists and this run did not resume from it: refusing to overwrite it "
                                  "(is another trainer writing to this run folder?)")
        shutil.rmtree(path, ignore_errors=True)  # an unfinished save
        try:
            path.mkdir(parents=True)
        except OSError as exc:  # DeepSpeed would say "Parent directory ... does not exist"
            if disk_full(exc):  # save says so
                raise
            kept = f"; {self.named_latest()}, the last checkpoint, is as it was" if self.named_latest() else ""
            raise CheckpointError(f"cannot write the checkpoint {path} ({exc.strerror or exc}): fix the owner or "
                                  f"mode of {self.root}, or the file system{kept}") from None

    @staticmethod
    def _owner(name: str) -> int:
        m = _OWN_FILE.match(name)
        return int(m.group(1) or m.group(2)) if m else 0

    def _upload(self, path: Path, rank: int) -> None:
        """Collective. Each rank uploads the files it wrote, rank 0 also the shared ones, then state.json and
        ``latest``. A failure anywhere is raised on every rank after the local checkpoint is complete."""
        def upload_mine() -> None:
            latest = join(self.remote, "latest")
            if self.storage.exists(latest):  # another run started on this prefix since ours did
                self._check_remote_owner(self.storage.read_bytes(latest).decode().strip())
            for f in sorted(path.iterdir()):
                if self._owner(f.name) == rank and f.name != "state.json":
                    self.storage.upload(str(f), join(self.remote, path.name, f.name))

        def finish() -> None:
            self.storage.upload(str(path / "state.json"), join(self.remote, path.name, "state.json"))
            self.storage.write_bytes(join(self.remote, "latest"), path.name.encode())
            try:
                self._prune_remote()
            except StorageError as exc:  # the checkpoint is there: older ones kept is no reason to stop the run
                log.warning("checkpoint %s uploaded, but older remote checkpoints could not be deleted (%s); they "
                            "stay until a later save can", path.name, exc)

        try:
            on_rank0(finish, first=upload_mine)
        except (StorageError, CheckpointError, RankFailed) as exc:
            raise CheckpointError(f"checkpoint {path} is complete locally, but uploading it to {self.remote} failed: "
                                  f"{exc}. Fix the storage and rerun: the run resumes from the local checkpoint") from exc

    def set_latest(self, tag: str) -> None:
        write_atomic(self.root / "latest", tag)

    def named_latest(self) -> str:
        """What ``latest`` names ('' when it is missing or unreadable); see newest_local for the one resumed from."""
        try:
            return (self.root / "latest").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def _kept(self, names: list[str], latest: str) -> set[str]:
        return set(sorted(names, key=order)[-self.keep:]) | {latest}

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older incomplete ones (crashed saves)."""
        latest = (self.root / "latest").read_text().strip()
        folders = self.folders()
        keep = self._kept([p.name for p in folders if is_complete(p)], latest)
        for p in folders:
            if p.name not in keep and order(p.name) < order(latest):
                shutil.rmtree(p, ignore_errors=True)
                if p.exists():
                    log.warning("could not delete the old checkpoint %s (permissions?): it stays", p)

    def _prune_remote(self) -> None:
        """The same rule for the remote copy: the newest ``keep`` checkpoints stay."""
        latest = (self.root / "latest").read_text().strip()
        tags = self._remote_tags()
        for t in tags:
            if t not in self._kept(tags, latest) and order(t) < order(latest):
                url = join(self.remote, t)
                self.storage.retry(lambda u=url: self.storage.s3.rm(u[len("s3://"):], recursive=True), url, "deleting")

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, engine, ema, path: Path) -> tuple[dict, dict | None, torch.Tensor | None]:
        """Restore engine and EMA in place; returns (state.json, this rank's loader state, RNG state).

        After a world-size change (a universal or a ZeRO-0 checkpoint), ranks without a saved state of their own
        get rank 0's loader state (the loader then restarts its epoch) and no RNG state."""
        state = read_state(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if state.get("world_size", world) != world and not (is_universal(path) or is_whole(path)):
            written = f"{state['world_size']} process{'es' if state['world_size'] != 1 else ''}"
            raise (CheckpointError if _rank() == 0 else RankFailed)(  # every rank meets it: rank 0 says it
                f"{path} was written by {written} and this run has {world}: run `hpdm convert-checkpoint "
                f"{path.parent.parent}` first")
        with no_pickle():
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        ema.load_state_dict(load_safetensors(path / "ema.safetensors"))
        own = path / f"rank_{_rank():05d}.safetensors"
        rank_file = own if own.is_file() and state.get("world_size") == world else path / "rank_00000.safetensors"
        try:
            with safe_open(str(rank_file), framework="pt") as f:
                loader = json.loads(f.metadata()["loader"])
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{rank_file}: cannot be read ({exc})") from exc
        rng = load_safetensors(rank_file)["rng"] if rank_file == own else None
        return state, loader, rng
