"""`hpdm doctor`: a good local config passes; missing data, unwritable run folders and missing buckets FAIL."""
import json
import os
import shutil
import socket
import time

import pytest
import torch

from data_pipeline.storage import Storage
from hpdm import doctor
from hpdm.cli import main
from hpdm.config import load_config


def _doctor(capsys, *overrides) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run `hpdm doctor` in-process; returns the exit code, {check: (status, detail)} and the whole output."""
    code = main(["doctor", "--config", "configs/tiny.yaml", "--timeout", "15", "data.synthetic=false", *overrides])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines()[2:]:
        parts = line.split(None, 2) if line.strip() else []
        if len(parts) == 3 and parts[1] in ("ok", "warn", "FAIL"):
            rows[parts[0]] = (parts[1], parts[2])
    return code, rows, out


def test_good_local_config_passes(capsys, tiny_shards, tmp_path):
    run = tmp_path / "runs" / "x"
    code, rows, out = _doctor(capsys, f"data.shards={tiny_shards['one']}", f"train.run_dir={run}")
    assert code == 0, out
    assert rows["data"][0] == "ok" and "index.json: 1 shards, 12 samples" in rows["data"][1]
    assert rows["run_dir"][0] == "ok" and "probe file written" in rows["run_dir"][1]
    assert not (tmp_path / "runs").exists(), "the folders the probe created were left behind"
    assert rows["deepspeed"][0] == rows["torch"][0] == "ok" and rows["attention"][0] == "ok"
    assert rows["disk"][0] == "ok" and "GiB free" in rows["disk"][1]
    if not torch.cuda.is_available():
        assert rows["gpus"][0] == "warn" and rows["flash-attn"][0] == "ok"


def test_missing_shards_and_unwritable_run_dir_fail(capsys, tmp_path):
    (tmp_path / "afile").write_text("in the way")
    code, rows, out = _doctor(capsys, f"data.shards={tmp_path / 'no-data'}", f"train.run_dir={tmp_path / 'afile' / 'run'}")
    assert code == 1 and "FAIL" in out.splitlines()[-1]
    assert rows["data"] == ("FAIL", f"data.shards {tmp_path / 'no-data'} does not exist")
    assert rows["run_dir"][0] == "FAIL" and f"{tmp_path / 'afile'} is a file, not a folder" in rows["run_dir"][1]

    if os.geteuid() == 0:  # root writes into read-only folders: use a folder nobody can create things in
        read_only = "/proc/hpdm-doctor-test"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        read_only = str(tmp_path / "ro")
    code, rows, out = _doctor(capsys, f"train.run_dir={read_only}/run")
    assert code == 1 and rows["run_dir"][0] == "FAIL" and "is not writable" in rows["run_dir"][1], out


def test_an_index_training_would_refuse_fails(capsys, tiny_shards, tmp_path):
    """doctor once passed an index whose shards were missing or whose labels did not fit the model."""
    data = tmp_path / "d"
    shutil.copytree(tiny_shards["one"], data)
    index = json.loads((data / "index.json").read_text())
    cases = [({"shards": index["shards"] + [{"name": "shard-000007.tar", "samples": 5}]},
              f"{data}: 1 of the 2 shards its index.json lists are missing (shard-000007.tar)"),
             ({"max_label": 20}, f"data.shards {data}: labels go up to 20 but model.num_classes is 8"),
             ({"shards": ["shard-000000.tar"]}, f"{data}/index.json: shard entry 0 is \"shard-000000.tar\"")]
    for change, error in cases:
        (data / "index.json").write_text(json.dumps(index | change))
        code, rows, out = _doctor(capsys, f"data.shards={data}", f"train.run_dir={tmp_path / 'r'}")
        assert code == 1 and rows["data"][0] == "FAIL" and rows["data"][1].startswith(error), out


def test_shards_beside_the_index_that_it_does_not_list_are_a_warning(capsys, tiny_shards, tmp_path):
    """Shards copied into an indexed folder later were never read, and nothing said so."""
    data = tmp_path / "d"
    shutil.copytree(tiny_shards["one"], data)
    code, rows, _ = _doctor(capsys, f"data.shards={data}", f"train.run_dir={tmp_path / 'r'}")
    assert rows["data"][0] == "ok", rows
    shutil.copy(data / "shard-000000.tar", data / "more-000001.tar")
    code, rows, out = _doctor(capsys, f"data.shards={data}", f"train.run_dir={tmp_path / 'r'}")
    assert rows["data"] == ("warn", f"{data}/index.json: 1 shards, 12 samples; 1 .tar files beside it are not in "
                                    "the index and are not read (more-000001.tar)"), out


def test_synthetic_data_still_to_be_written_is_a_warning(capsys, tmp_path):
    code, rows, _ = _doctor(capsys, "data.synthetic=true", f"data.shards={tmp_path / 'syn'}", f"train.run_dir={tmp_path / 'r'}")
    assert code == 0 and rows["data"][0] == "warn" and "rank 0 writes" in rows["data"][1]


def test_synthetic_over_the_users_shards_fails(capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard-000000.tar").write_bytes(b"the user's data")
    code, rows, _ = _doctor(capsys, "data.synthetic=true", "data.flip=false", f"data.shards={tmp_path / 'mine'}",
                            f"train.run_dir={tmp_path / 'r'}")
    assert code == 1 and rows["data"][0] == "FAIL" and "holds 1 file" in rows["data"][1], rows["data"]


def test_s3_bucket_checks_and_no_secret_printed(capsys, s3_server, monkeypatch, tmp_path):
    s3_server.env(monkeypatch)
    Storage().write_bytes(f"s3://{s3_server.bucket}/doctor/index.json",
                          b'{"shards": [{"name": "shard-000000.tar", "samples": 1}], "num_samples": 1}')
    Storage().write_bytes(f"s3://{s3_server.bucket}/doctor/shard-000000.tar", b"not read by doctor")
    code, rows, out = _doctor(capsys, f"data.shards=s3://{s3_server.bucket}/doctor", f"train.run_dir={tmp_path / 'r'}",
                              f"train.checkpoint_uri=s3://{s3_server.bucket}/ckpt")
    assert code == 0, out
    assert rows["data"][0] == "ok" and rows["checkpoint_uri"][0] == "ok"
    assert not Storage().exists(f"s3://{s3_server.bucket}/ckpt/.hpdm-write-check"), "the probe object was left behind"
    assert "AWS_SECRET_ACCESS_KEY" in rows["aws-credentials"][1] and s3_server.admin[1] not in out

    code, rows, out = _doctor(capsys, "data.shards=s3://no-such-bucket/data", f"train.run_dir={tmp_path / 'r'}",
                              "train.checkpoint_uri=s3://no-such-bucket/ckpt")
    assert code == 1 and s3_server.admin[1] not in out
    for check in ("data", "checkpoint_uri"):
        assert rows[check][0] == "FAIL" and "bucket 'no-such-bucket' does not exist" in rows[check][1], out


def test_network_checks_are_time_limited(monkeypatch):
    t0 = time.monotonic()
    rows = doctor._limited(lambda: time.sleep(30), 0.3)
    assert rows[0][1] == "FAIL" and "did not finish within" in rows[0][2] and time.monotonic() - t0 < 5

    with socket.socket() as s:  # a port nothing listens on: refused, reported quickly
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hpdm-doctor-secret")
    cfg = load_config("configs/tiny.yaml", [f"data.endpoint_url=http://127.0.0.1:{port}", "train.checkpoint_uri=s3://b/c"])
    t0 = time.monotonic()
    rows = doctor._limited(lambda: doctor.check_checkpoint_uri(cfg), 10)
    assert rows[0][1] == "FAIL" and time.monotonic() - t0 < 12 and "hpdm-doctor-secret" not in rows[0][2]


def test_launcher_env_and_credential_redaction(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            monkeypatch.setenv(k, v)
        env_row = dict((n, (s, d)) for n, s, d in doctor.check_launcher(2.0))["launcher-env"]
        assert env_row[0] == "ok" and "rank 1 of 2" in env_row[1] and "master reachable" in env_row[1]
    env_row = dict((n, (s, d)) for n, s, d in doctor.check_launcher(2.0))["launcher-env"]
    assert env_row[0] == "warn" and "not reachable" in env_row[1]

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:url-secret/x@y@s3.example.com:9000")  # "/" and "@" too
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    (_, _, detail), = doctor.check_credentials(load_config("configs/tiny.yaml", ["train.checkpoint_uri=s3://b/c"]))
    assert "http://s3.example.com:9000" in detail and "AWS_SECRET_ACCESS_KEY" in detail
    assert "url-secret" not in detail and "x@y" not in detail and "env-secret" not in detail


@pytest.mark.parametrize("required,expected", [(True, "FAIL"), (False, "ok")])
def test_missing_package_status(required, expected):
    status, detail = doctor._package("hpdm_no_such_module", "hpdm-no-such-dist", required, gpu=False)[0][1:]
    assert status == expected and "not installed" in detail
    assert doctor._package("hpdm_no_such_module", "hpdm-no-such-dist", False, gpu=True)[0][1] == "warn"


def test_text_models_need_fitting_embeddings_or_an_encoder(capsys, tiny_shards, tiny_t5, tmp_path):
    """model.cond: text: the embeddings' index (width, tokens) or data.text_encoder is checked before a run."""
    from data_pipeline.text_shards import embed_shards  # noqa: PLC0415
    from hpdm.text_encoder import TextEncoder  # noqa: PLC0415

    enc = TextEncoder(str(tiny_t5), 16)
    embed_shards(tiny_shards["one"], enc.encode, {"encoder": str(tiny_t5), "width": 32, "max_tokens": 16},
                 out=str(tmp_path / "emb"), progress=False)
    text = ["model.cond=text", "model.text_tokens=16", f"data.shards={tiny_shards['one']}", f"train.run_dir={tmp_path / 'r'}"]
    rows = {}
    for name, extra in {"fits": ["model.text_dim=32", f"data.text_embeddings={tmp_path / 'emb'}"],
                        "none": ["model.text_dim=32", f"data.text_embeddings={tmp_path / 'nothing'}"],
                        "wide": ["model.text_dim=64", f"data.text_embeddings={tmp_path / 'emb'}"],
                        "encoder": ["model.text_dim=32", f"data.text_encoder={tiny_t5}"],
                        "bad encoder": ["model.text_dim=32", f"data.text_encoder={tmp_path / 'no-t5'}"]}.items():
        rows[name] = _doctor(capsys, *text, *extra)[1]["text"]
    assert rows["fits"][0] == "ok" and "embeddings of 1 shards fit model.text_dim 32" in rows["fits"][1]
    assert rows["none"][0] == "FAIL" and "hpdm embed-text" in rows["none"][1]
    assert rows["wide"][0] == "FAIL" and "32 wide" in rows["wide"][1] and "model.text_dim is 64" in rows["wide"][1]
    assert rows["encoder"] == ("ok", f"data.text_encoder {tiny_t5}: 32 wide, model.text_dim 32; captions encoded on the fly")
    assert rows["bad encoder"][0] == "FAIL" and "no-t5" in rows["bad encoder"][1]


def test_init_from_is_checked_before_training(capsys, tmp_path, monkeypatch):
    """Doctor said nothing of train.init_from: a generator that does not fit the model was found only when training
    had prepared its data. It checks from the file headers: loading a 4B-parameter source takes minutes."""
    import hpdm.export
    from hpdm.config import Config
    from hpdm.model import HPDM
    from tests.test_sampling import export_model

    base = load_config("configs/tiny.yaml").model
    fits = Config(model=base.__class__(**{**vars(base), "levels": 1, "levels_per_block": (1, 1, 1, 1)}))
    export_model(HPDM(fits.model), fits, tmp_path / "lowres.safetensors")
    wide = Config(model=base.__class__(**{**vars(fits.model), "token_dim": 2 * base.token_dim}))
    export_model(HPDM(wide.model), wide, tmp_path / "wide.safetensors")
    run = f"train.run_dir={tmp_path / 'run'}"
    monkeypatch.setattr(hpdm.export, "load_generator", None)  # no weights are read
    _, rows, _ = _doctor(capsys, run, f"train.init_from={tmp_path / 'lowres.safetensors'}")
    status, detail = rows["resume"]
    assert status == "ok" and f"from train.init_from {tmp_path / 'lowres.safetensors'} (" in detail, detail
    _, rows, _ = _doctor(capsys, run, f"train.init_from={tmp_path / 'wide.safetensors'}")
    assert rows["resume"][0] == "FAIL" and rows["resume"][1].startswith("train.init_from: ") and "shapes differ" in rows["resume"][1]
    _, rows, _ = _doctor(capsys, run)
    assert rows["resume"][0] == "ok" and "train.init_from" not in rows["resume"][1]
