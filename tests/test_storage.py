"""Storage: the same behaviour on a local directory, S3 (moto) and memory://."""
from __future__ import annotations

import os
import pickle
import uuid

import pytest

from cluster.faults import StorageUnavailable
from cluster.storage import Storage


@pytest.fixture(params=["file", "s3", "memory"])
def storage(request, tmp_path):
    if request.param == "file":
        return Storage(f"file://{tmp_path}/out")
    if request.param == "memory":
        return Storage(f"memory://test-{uuid.uuid4().hex}/out")
    endpoint, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/run-{uuid.uuid4().hex}", endpoint_url=endpoint, retries=1, backoff_s=0.01)


def test_write_read_exists_list_delete(storage):
    assert not storage.exists("records/a.json")
    assert storage.list("records") == []
    storage.write_bytes("videos/a.mp4", b"\x00\x01video")
    storage.write_text("notes/readme.txt", "héllo")
    storage.write_json("records/a.json", {"id": "a", "seed": 3})
    storage.write_json("records/b.json", {"id": "b"})
    assert storage.exists("records/a.json")
    assert storage.read_bytes("videos/a.mp4") == b"\x00\x01video"
    assert storage.read_text("notes/readme.txt") == "héllo"
    assert '"seed": 3' in storage.read_text("records/a.json")
    assert storage.list("records") == ["a.json", "b.json"]
    assert set(storage.list()) >= {"videos", "records", "notes"}
    storage.write_json("records/a.json", {"id": "a", "seed": 4})  # overwrite
    assert '"seed": 4' in storage.read_text("records/a.json")
    storage.delete("records/a.json")
    storage.delete("records/a.json")  # already gone: fine
    assert not storage.exists("records/a.json")
    assert storage.list("records") == ["b.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("records/a.json")
    assert storage.url_for("records/b.json").endswith("/records/b.json")
    assert storage.url_for("records/b.json").split("://")[0] in ("file", "s3", "memory")


def test_open_write_and_upload(storage, tmp_path):
    with storage.open_write("videos/big.mp4") as f:
        for _ in range(8):
            f.write(os.urandom(1 << 16))
    assert len(storage.read_bytes("videos/big.mp4")) == 8 << 16
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    storage.upload_file(src, "videos/up.mp4")
    assert storage.read_bytes("videos/up.mp4") == b"payload" * 1000
    assert storage.list("videos") == ["big.mp4", "up.mp4"]


def test_open_write_leaves_nothing_on_exception(storage):
    with pytest.raises(RuntimeError):
        with storage.open_write("videos/broken.mp4") as f:
            f.write(b"x" * 100_000)
            raise RuntimeError("encoder crashed")
    assert not storage.exists("videos/broken.mp4")
    assert storage.list("videos") == []
    if storage.local:  # no temporary file left behind either
        assert os.listdir(storage.path("videos")) == []


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\\b", "", "a//b", ".", "a/./b",
                                 "x\0y", "s3://other/x", "line\nbreak"])
def test_path_refuses_escapes(tmp_path, bad):
    s = Storage(str(tmp_path))
    with pytest.raises(ValueError):
        s.path(bad)
    with pytest.raises(ValueError):
        s.write_bytes(bad, b"x")
    with pytest.raises(ValueError):
        s.path("records", bad)


def test_path_joins_under_root(tmp_path):
    s = Storage(str(tmp_path) + "/")
    assert s.path("records", "a.json") == s.path("records/a.json") == f"{tmp_path}/records/a.json"
    assert s.path() == str(tmp_path)
    assert s.url_for("a.json") == f"file://{tmp_path}/a.json"


def test_repr_and_pickle_never_hold_the_secret(s3_server, s3_bucket):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the fixture's dummy
    s = Storage(f"s3://{s3_bucket}/p", endpoint_url=s3_server)
    s.write_text("k.txt", "v")  # credentials have been resolved and used by now
    assert secret not in repr(s) and secret not in str(s)
    assert secret.encode() not in pickle.dumps(s)
    clone = pickle.loads(pickle.dumps(s))  # what a Ray actor receives
    assert clone.read_text("k.txt") == "v" and repr(clone) == repr(s)
    with pytest.raises(ValueError, match="credential"):
        Storage(f"s3://{s3_bucket}/p", endpoint_url=s3_server, secret=secret)
    with pytest.raises(ValueError, match="credential"):
        Storage(f"s3://testing:{secret}@{s3_bucket}/p")


def test_endpoint_from_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("MEMFLOW_S3_ENDPOINT", s3_server)
    s = Storage(f"s3://{s3_bucket}/env-{uuid.uuid4().hex}")
    s.write_text("a.txt", "ok")
    assert s.read_text("a.txt") == "ok"
    assert s3_server in repr(s)


def test_transient_errors_are_retried_then_raised(tmp_path, monkeypatch):
    s = Storage(str(tmp_path), retries=2, backoff_s=0.001)
    s.write_text("a.txt", "ok")
    with pytest.raises(FileNotFoundError):  # permanent: raised at once
        s.read_bytes("missing.txt")
    calls = []
    real = s.fs.cat_file

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return real(path, *a, **k)

    monkeypatch.setattr(s.fs, "cat_file", flaky)
    assert s.read_text("a.txt") == "ok" and len(calls) == 3
    calls.clear()

    def down(path, *a, **k):
        calls.append(path)
        raise TimeoutError("read timed out")

    monkeypatch.setattr(s.fs, "cat_file", down)
    with pytest.raises(StorageUnavailable, match="kept failing after 2 retries: TimeoutError") as err:
        s.read_bytes("a.txt")
    assert isinstance(err.value.__cause__, TimeoutError) and isinstance(err.value, OSError)
    assert len(calls) == 3  # bounded: 1 try + 2 retries
