"""Manifest streaming: every format, local and S3 (moto), hostile input, bounded memory."""
from __future__ import annotations

import gzip
import io
import json
import time
import tracemalloc
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.storage import Storage
from jobs.manifest import ManifestError, count_manifest, iter_manifest

BENCH = [{"prompts": ["a red fox runs through snow", "the fox stops at a frozen lake"]},
         {"prompts": ["a lighthouse at dusk"]}]
RICH = [{"id": "fox-1", "segments": [{"prompt": "a fox", "seconds": 4}, {"prompt": "a lake", "seconds": 6}],
         "seed": 7, "fps": 16},
        {"id": "light", "segments": [{"prompt": "a lighthouse", "seconds": 10}], "resolution": [480, 832]}]


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _parquet(rows, row_group_size) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


PARQUET_ROWS = [{"id": f"p{i}", "segments": [{"prompt": f"scene {i}", "seconds": 5.0}], "seed": i}
                for i in range(10)]
CASES = {
    "bench.jsonl": (_jsonl(BENCH), [2 * 10.0, 10.0], [1, 2]),
    "rich.jsonl": (_jsonl(RICH), [10.0, 10.0], [1, 2]),
    "prompts.txt": (b"# a comment\n\na cat on a roof\n  \nrain over a city\r\n", [10.0, 10.0], [3, 5]),
    "rows.parquet": (_parquet(PARQUET_ROWS, row_group_size=3), [5.0] * 10, list(range(1, 11))),
    "bench.jsonl.gz": (gzip.compress(_jsonl(BENCH)), [20.0, 10.0], [1, 2]),
    "noext": (_jsonl(RICH), [10.0, 10.0], [1, 2]),  # format sniffed from content
}


@pytest.fixture(params=["local", "s3"])
def put(request, tmp_path):
    """Write bytes to a manifest location; return (url, storage_options)."""
    if request.param == "local":
        def put_local(name, data):
            (tmp_path / name).write_bytes(data)
            return str(tmp_path / name), None
        return put_local
    endpoint, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    store = Storage(f"s3://{bucket}/manifests-{uuid.uuid4().hex}", endpoint_url=endpoint)

    def put_s3(name, data):
        store.write_bytes(name, data)
        return store.url_for(name), {"endpoint_url": endpoint}
    return put_s3


@pytest.mark.parametrize("name", list(CASES))
def test_formats(put, name):
    data, seconds, lines = CASES[name]
    url, opts = put(name, data)
    items = list(iter_manifest(url, opts))
    assert [i.error for i in items] == [None] * len(lines)
    assert [i.line for i in items] == lines
    assert [sum(s.seconds for s in i.script.segments) for i in items] == seconds
    expected_count = None if name.endswith(".gz") else len(lines)
    assert count_manifest(url, opts) == expected_count
    if name == "rows.parquet":
        assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 4
        assert [i.script.seed for i in items] == list(range(10))
        assert items[3].script.video_id == "p3"
    if name == "rich.jsonl":
        assert items[0].script.seed == 7 and items[1].script.resolution == (480, 832)


def test_bad_lines_are_reported_and_the_rest_goes_on(put):
    good = json.dumps(BENCH[1]).encode()
    lines = [
        good,                                                         # 1
        b'{"prompts": ["unterminated"',                               # 2 invalid JSON
        b'{"prompts": []}',                                           # 3 empty prompts
        b'{"prompts": ["a"], "colour": "red"}',                       # 4 unknown field
        b'{"prompts": ["' + b"x" * (2 << 20) + b'"]}',                # 5 a 2 MiB line
        b'{"prompts": ["nul\x00byte"]}',                              # 6 binary
        b'{"prompts": ["caf\xe9 latin-1"]}',                          # 7 invalid UTF-8
        b"",                                                          # 8 blank: skipped
        b"[" * 100_000 + b"]" * 100_000,                              # 9 absurd nesting
        b'{"segments": [{"prompt": "  ", "seconds": 5}]}',            # 10 blank prompt
        good,                                                         # 11
    ]
    url, opts = put("bad.jsonl", b"\n".join(lines))  # no trailing newline on the last line
    items = {i.line: i for i in iter_manifest(url, opts)}
    assert sorted(items) == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert items[1].ok and items[11].ok and items[11].script.segments[0].prompt == "a lighthouse at dusk"
    assert "invalid JSON" in items[2].error
    assert "segments" in items[3].error
    assert items[4].error.startswith("colour: unknown field")
    assert "longer than" in items[5].error and len(items[5].raw) <= 200
    assert "NUL" in items[6].error and "\x00" not in items[6].raw
    assert "UTF-8" in items[7].error
    assert "invalid JSON" in items[9].error
    assert "segments.0.prompt" in items[10].error
    assert count_manifest(url, opts) == 10


def test_previews_are_short_and_safe(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\x1b[31mred\x1b[0m " + "y" * 5000 + "\n", encoding="utf-8")
    [item] = iter_manifest(str(path))
    assert "segments.0.prompt: prompt has 5013 characters" in item.error
    assert len(item.raw) <= 200 and "\x1b" not in item.raw and item.raw.startswith("\\x1b[31mred")


def test_parquet_prompts_column_and_unknown_columns(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompts": [["one", "two"], [], None]}), path)
    items = list(iter_manifest(str(path)))
    assert items[0].ok and len(items[0].script.segments) == 2
    assert [i.line for i in items if not i.ok] == [2, 3]
    pq.write_table(pa.table({"prompts": [["one"]], "caption": ["x"]}), path)
    with pytest.raises(ManifestError, match="caption"):
        list(iter_manifest(str(path)))


def test_streaming_keeps_memory_bounded(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(f'{{"prompts": ["shot {i}: a long walk along a windy coast"]}}\n')
    size = path.stat().st_size
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        n = errors = 0
        for item in iter_manifest(str(path)):
            n += 1
            errors += not item.ok
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (n, errors) == (200_000, 0)
    assert peak < 2 << 20 < size // 4, (peak, size)
    print(f"200k lines ({size >> 20} MiB): peak {peak >> 10} KiB, {time.perf_counter() - t0:.1f} s")


HOSTILE = ["../x", "/etc/passwd", "a\\b", "..", ".", "...", "видео/../../x", "a/b/c", "x" * 512,
           "\u202eevil", "~root", "C:\\Windows", "%2e%2e%2fx"]


def test_hostile_ids_stay_under_the_prefix(tmp_path, s3_server, s3_bucket):
    url = tmp_path / "ids.jsonl"
    url.write_bytes(_jsonl({"id": h, "prompts": ["p"]} for h in HOSTILE))
    items = list(iter_manifest(str(url)))
    assert all(i.ok for i in items)
    ids = [i.script.video_id for i in items]
    assert len(set(ids)) == len(HOSTILE)
    for store in (Storage(str(tmp_path / "out")),
                  Storage(f"s3://{s3_bucket}/ids", endpoint_url=s3_server)):
        for vid in ids:
            p = store.path("videos", f"{vid}.mp4")
            assert p.startswith(store.root + "/videos/") and p.count("/") == store.root.count("/") + 2
            assert store.path("records", f"{vid}.json").startswith(store.root + "/records/")


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_line_splitting_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    import jobs.manifest as m

    monkeypatch.setattr(m, "CHUNK_BYTES", chunk)
    lines = ["a", "", "bb bb", "x" * 30, "ccc", "y" * 9, "d"]
    path = tmp_path / "l.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    items = list(iter_manifest(str(path), max_line_bytes=10))
    assert [(i.line, i.ok) for i in items] == [(1, True), (3, True), (4, False), (5, True), (6, True), (7, True)]
    assert [i.script.segments[0].prompt for i in items if i.ok] == ["a", "bb bb", "ccc", "y" * 9, "d"]
    assert items[2].raw.startswith("x" * 10) and "longer than 10 bytes" in items[2].error


def test_scripts_that_could_never_finish_are_bad_lines(put):
    from memflow.config import PRESETS
    from memflow.script import Limits

    lines = [
        b'{"prompts": ["a lighthouse at dusk"]}',                                 # 1
        b'{"segments": [{"prompt": "a long night", "seconds": 1e9}]}',            # 2 hangs a replica for ever
        b'{"prompts": ["a"], "resolution": [1180591620717411303424, 16]}',        # 3 2**70 rows
        b'{"prompts": ["a fox \\ud83e in the snow"]}',                            # 4 lone surrogate
        b'{"prompts": ["a"], "fps": "16"}',                                       # 5 no coercion
        b'{"segments": [{"prompt": "a", "seconds": true}]}',                      # 6
        b'{"prompts": ["a"], "fps": 90}',                                         # 7 above the job's fps
        b'{"prompts": ["a"], "resolution": [64, 64], "fps": 8}',                  # 8
    ]
    url, opts = put("limits.jsonl", b"\n".join(lines) + b"\n")
    items = {i.line: i for i in iter_manifest(url, opts, limits=Limits.for_preset(PRESETS["tiny"]))}
    assert [n for n, i in items.items() if i.ok] == [1, 8]
    expected = {2: "seconds: the segments add up to 1e+09 s", 3: "resolution: 1180591620717411303424x16",
                4: "segments.0.prompt: prompt is not valid Unicode text", 5: "fps: Input should be a valid integer",
                6: "segments.0.seconds: Input should be a valid number, got bool", 7: "fps: 90 is above"}
    for n, text in expected.items():
        assert text in items[n].error, (n, items[n].error)
        (items[n].raw + items[n].error).encode("utf-8")  # safe to write to errors.jsonl
    assert "\\ud83e" in items[4].raw


def test_a_storage_outage_mid_manifest_is_ridden_out(s3_server):  # s3_server: its dummy credentials
    """The S3 server goes away while the manifest is being read (small blocks: a request
    per 64 KiB read) and comes back 25 s later, longer than botocore's own retries last:
    every line is read, once, in order."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    lines = [{"id": f"o{i}", "prompts": [f"scene {i} " + "x" * 80]} for i in range(3000)]  # 64 KiB reads: 6
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket="outage", Key="m.jsonl", Body=_jsonl(lines))
    restarted = []

    def restart():
        time.sleep(25)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # its data lives on
        again.start()
        restarted.append(again)

    try:
        items = iter_manifest("s3://outage/m.jsonl", {"endpoint_url": endpoint, "default_block_size": 1024})
        got = [next(items) for _ in range(50)]
        server.stop()
        threading.Thread(target=restart, daemon=True).start()
        got += list(items)
    finally:
        for s in restarted or [server]:
            s.stop()
    assert restarted, "the read went on only after the server was back"
    assert [i.script.video_id for i in got] == [f"o{i}" for i in range(3000)] and all(i.ok for i in got)
