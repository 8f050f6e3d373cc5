"""Shards on a real S3 server (SeaweedFS on 127.0.0.1): write, stream back, and the errors people hit."""
import io
import os

import pytest
import torch

from data_pipeline import DataConfig, StorageError, build_loader, make_shards, prepare_dataset
from data_pipeline.seaweed import free_ports
from data_pipeline.storage import Storage


def test_shards_written_to_and_streamed_back_from_s3(s3_server, monkeypatch, tiny_manifest, tiny_shards):
    s3_server.env(monkeypatch)
    dest = f"s3://{s3_server.bucket}/tiny"
    index = make_shards(str(tiny_manifest), dest, shard_size_mb=0.02, progress=False)
    assert index["num_samples"] == 12
    storage = Storage()  # a rerun checks that each shard is there whole: one deleted is written again
    first = f"{dest}/{index['shards'][0]['name']}"
    assert storage.size(first) == index["shards"][0]["bytes"] and storage.size(f"{dest}/nothing.tar") is None
    storage.remove(first)
    assert make_shards(str(tiny_manifest), dest, shard_size_mb=0.02, progress=False) == index
    assert storage.size(first) == index["shards"][0]["bytes"]
    kw = dict(frames=8, size=(16, 16), batch_size=4, train=False)
    remote = list(build_loader(DataConfig(shards=dest, num_workers=2), **kw))
    local = list(build_loader(DataConfig(shards=tiny_shards["one"], num_workers=0), **kw))
    by_key = lambda batches: {k: v for b in batches for k, v in zip(b["key"], b["video"])}  # noqa: E731
    r, l = by_key(remote), by_key(local)
    assert sorted(r) == sorted(l) and len(r) == 12
    assert all(torch.equal(r[k], l[k]) for k in r)
    names = [s["name"] for s in index["shards"]]  # a brace pattern and a bare prefix find the same shards
    pattern = f"{dest}/shard-{{000000..{len(names) - 1:06d}}}.tar"
    keys = lambda spec: sorted(k for b in build_loader(DataConfig(shards=spec, num_workers=0), **kw) for k in b["key"])  # noqa: E731
    assert keys(pattern) == sorted(r)


def test_synthetic_dataset_on_s3_with_endpoint_from_config(s3_server, monkeypatch):
    s3_server.env(monkeypatch)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = DataConfig(shards=f"s3://{s3_server.bucket}/syn", synthetic=True, flip=False, synthetic_videos=4, num_workers=0,
                     endpoint_url=s3_server.endpoint)
    index = prepare_dataset(cfg, (4, 16, 16), num_classes=2)
    assert index["num_samples"] == 4
    assert Storage(s3_server.endpoint).exists(f"s3://{s3_server.bucket}/syn/index.json")
    batch = next(iter(build_loader(cfg, frames=4, size=(16, 16), batch_size=2, seed=1)))
    assert batch["video"].shape == (2, 4, 16, 16, 3)


def test_missing_credentials_are_named(s3_server, monkeypatch):
    s3_server.env(monkeypatch, creds=None)
    with pytest.raises(StorageError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        build_loader(DataConfig(shards=f"s3://{s3_server.bucket}/tiny"), frames=4, size=(8, 8), batch_size=1)
    monkeypatch.setenv("AWS_PROFILE", "hpdm-no-such-profile")  # was botocore's ProfileNotFound, without the variable
    with pytest.raises(StorageError, match=r"\(hpdm-no-such-profile\) could not be found: AWS_PROFILE names a profile"):
        Storage().exists(f"s3://{s3_server.bucket}/tiny")


def test_missing_bucket_is_named(s3_server, monkeypatch, tiny_manifest):
    s3_server.env(monkeypatch)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        build_loader(DataConfig(shards="s3://no-such-bucket/ds"), frames=4, size=(8, 8), batch_size=1)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        make_shards(str(tiny_manifest), "s3://no-such-bucket/ds", progress=False)


def test_denied_requests_are_named(s3_server, monkeypatch, tiny_manifest):
    s3_server.env(monkeypatch, creds=s3_server.reader)  # may read and list, not write
    with pytest.raises(StorageError, match="access denied"):
        make_shards(str(tiny_manifest), f"s3://{s3_server.bucket}/denied", progress=False)
    s3_server.env(monkeypatch, creds=s3_server.unlisted)  # may read and write, not list: was called "writing"
    with pytest.raises(StorageError, match=rf"^listing s3://{s3_server.bucket}/ckpt: access denied"):
        Storage().check_writable(f"s3://{s3_server.bucket}/ckpt")
    s3_server.env(monkeypatch, creds=(s3_server.reader[0], "wrong-secret"))
    with pytest.raises(StorageError, match="access denied"):
        Storage().read_bytes(f"s3://{s3_server.bucket}/.ready")


def test_unreachable_endpoint_is_named(s3_server, monkeypatch):
    s3_server.env(monkeypatch)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    cfg = DataConfig(shards=f"s3://{s3_server.bucket}/tiny", endpoint_url=dead, io_retries=1, io_backoff=0.01)
    with pytest.raises(StorageError, match=f"cannot reach the storage endpoint {dead}"):
        build_loader(cfg, frames=4, size=(8, 8), batch_size=1)


class _FlakyFile(io.BytesIO):
    def __init__(self, data, fail_at, log):
        super().__init__(data)
        self.fail_at, self.log = fail_at, log

    def read(self, n=-1):
        if self.tell() <= self.fail_at < self.tell() + (n if n >= 0 else 1 << 62):
            self.log.append(self.tell())
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(n)


class _FlakyFS:
    """Every opened handle dies once when it reaches byte 1000 (after which a new handle works)."""

    def __init__(self, data):
        self.data, self.failures, self.opens = data, [], 0

    def open(self, path, mode="rb", **kw):
        self.opens += 1
        return _FlakyFile(self.data, 1000 if self.opens == 1 else -1, self.failures)


def test_transient_read_errors_are_retried_from_the_same_byte():
    data = bytes(range(256)) * 20
    storage = Storage(retries=2, backoff=0.0)
    storage._s3, storage._pid = _FlakyFS(data), os.getpid()
    with storage.open("s3://bucket/shard.tar", offset=10) as f:
        got = b"".join(iter(lambda: f.read(300), b""))
    assert got == data[10:] and storage._s3.failures == [910] and storage._s3.opens == 2


def test_an_endpoint_that_never_answered_fails_at_once_a_known_one_is_retried():
    calls = []

    def refused_once():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    storage = Storage("http://127.0.0.1:9", retries=3, backoff=0.0)
    with pytest.raises(StorageError, match="cannot reach the storage endpoint http://127.0.0.1:9"):
        storage.retry(refused_once, "s3://b/k", "reading")  # a wrong endpoint: no backoff schedule
    assert len(calls) == 1
    calls.clear()
    assert storage.retry(lambda: "answered", "s3://b/k", "reading") == "answered"
    assert storage.retry(refused_once, "s3://b/k", "reading") == "ok" and len(calls) == 2  # e.g. a restart mid-run


def test_an_endpoint_that_accepts_and_never_answers_times_out_with_warnings(monkeypatch, caplog):
    """A frozen server (it accepts connections, never answers) held a read for over 20 minutes without a word."""
    import socket
    import threading
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "hpdm-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hpdm-test-secret")
    server, held = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def accept():
        while True:
            try:
                held.append(server.accept()[0])  # kept open, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    storage = Storage(f"http://127.0.0.1:{server.getsockname()[1]}", retries=1, backoff=0.0, timeout=1.0, outage=0)
    said = "took the connection but did not answer within 1 s"
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING"), pytest.raises(StorageError, match=said):
            storage.read_bytes("s3://bucket/shard.tar")  # never answered: at once (it took 5 minutes at start)
        assert time.monotonic() - t0 < 8 and "retry" not in caplog.text  # botocore's 2 attempts of 1 s, with slack
        storage._reached = True  # as if it had answered before: retried, with a warning
        with caplog.at_level("WARNING"), pytest.raises(StorageError, match=said):
            storage.read_bytes("s3://bucket/shard.tar")
    finally:
        server.close()
        for c in held:
            c.close()
    assert "retry 1 in" in caplog.text and "ReadTimeoutError" in caplog.text


def test_a_known_endpoint_is_retried_through_an_outage_of_a_minute():
    """A restarting object store (about 15 s) killed the run: the retries were spent in 7.5 s."""
    import time

    down_until, calls = time.monotonic() + 1.0, []

    def restarting():
        calls.append(1)
        if time.monotonic() < down_until:
            raise ConnectionRefusedError(111, "Connection refused")
        return "back"

    storage = Storage("http://127.0.0.1:9", retries=1, backoff=0.05, outage=5.0)
    storage._reached = True
    assert storage.retry(restarting, "s3://b/k", "reading") == "back" and len(calls) > 2  # more than `retries`
    down_until, calls[:] = time.monotonic() + 1.0, []
    storage.outage = 0  # the retries alone
    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        storage.retry(restarting, "s3://b/k", "reading")
    assert len(calls) == 2


@pytest.mark.parametrize("error,said", [
    (OSError(22, "Bad Request"),  # a HEAD's 400 (e.g. an expired session token) has no body: no error code
     "the request was refused as bad .* expired .*AWS_SESSION_TOKEN.* wrong .*AWS_REGION"),
    (OSError(getattr(__import__("errno"), "EREMOTEIO", 5), "We encountered an internal error. Please try again."),
     "the storage service answered with an error on every try"),  # was "cannot reach the storage endpoint"
])
def test_what_the_server_answered_is_said(error, said):
    def fail():
        raise error

    storage = Storage("http://127.0.0.1:9", retries=0, backoff=0.0)
    storage._reached = True
    with pytest.raises(StorageError, match=f"^reading s3://b/k: {said}"):
        storage.retry(fail, "s3://b/k", "reading")


def test_5xx_answers_are_transient_as_s3fs_renames_them():
    """s3fs turns S3's 500 InternalError into OSError(EREMOTEIO) whose text is S3's message: it was not retried."""
    import errno

    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from data_pipeline.storage import is_transient

    def answer(status, code):
        return ClientError({"Error": {"Code": code, "Message": "We encountered an internal error, please try again."},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    for status, code in ((500, "InternalError"), (503, "SlowDown"), (503, "ServiceUnavailable"), (502, "BadGateway")):
        assert is_transient(translate_boto_error(answer(status, code))), code
        assert is_transient(answer(status, code)), code
    assert is_transient(OSError(errno.EREMOTEIO, "We encountered an internal error, please try again."))
    for status, code in ((403, "AccessDenied"), (404, "NoSuchKey"), (400, "InvalidArgument")):
        assert not is_transient(translate_boto_error(answer(status, code))), code
