"""Replica housekeeping without Ray: stale temp folders, permissions of what it writes,
and what travels to a replica (no credentials)."""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys

from cluster.replica import TMP_PREFIX, clean_stale_tmp
from cluster.storage import Storage
from jobs import batch

from .conftest import SECRET_KEY


def test_stale_temp_folders_of_dead_replicas_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{TMP_PREFIX}{dead.pid}-abc").mkdir()
    (tmp_path / f"{TMP_PREFIX}{dead.pid}-abc" / "video.mp4").write_bytes(b"half an mp4")
    (tmp_path / f"{TMP_PREFIX}{os.getpid()}-def").mkdir()  # a live replica's: in use
    (tmp_path / "memflow-other").mkdir()  # not a replica's
    assert clean_stale_tmp(str(tmp_path)) == [f"{TMP_PREFIX}{dead.pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memflow-other", f"{TMP_PREFIX}{os.getpid()}-def"]


def test_outputs_get_normal_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        s = Storage(str(tmp_path / "out"))
        s.write_json("records/a.json", {"id": "a"})
        (tmp_path / "v.mp4").write_bytes(b"video")
        s.upload_file(tmp_path / "v.mp4", "videos/a.mp4")
        with s.open_write("manifest/part-0.parquet") as f:
            f.write(b"PAR1")
        for key in ("records/a.json", "videos/a.mp4", "manifest/part-0.parquet"):
            assert stat.S_IMODE((tmp_path / "out" / key).stat().st_mode) == 0o644, key
        os.umask(0o002)  # a team's group-writable umask is followed too
        s.write_text("summary.json", "{}")
        assert stat.S_IMODE((tmp_path / "out" / "summary.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_replicas_get_no_credentials_from_the_driver(s3_server, s3_bucket, monkeypatch):
    """The driver has credentials in its environment; what it builds its replicas from
    (Ray keeps actor arguments in its object store, which spills to disk) holds none."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "driverSessionToken/NotForReplicas")
    args = batch.parse_args(["--output", f"s3://{s3_bucket}/out", "--endpoint-url", s3_server]).settings
    blob = pickle.dumps(batch.replica_config(args, use_gpu=False))
    for secret in (SECRET_KEY, "driverSessionToken/NotForReplicas"):
        assert secret.encode() not in blob
    assert s3_server.encode() in blob, "the endpoint (configuration, not a credential) is passed on"
