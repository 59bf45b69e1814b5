"""The dataset as Delta Lake tables (cluster/dataset.py): runs add only what is new, by an
idempotent merge on the id; readers see whole snapshots; two writers on one output cannot
corrupt it; records stay the source of truth (rebuild, migrate)."""
from __future__ import annotations

import io
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import dataset
from cluster.dataset import MANIFEST, DatasetIndex, manifest_row
from cluster.storage import Storage
from jobs import dataset as dataset_cli

from .records import synthetic_record


def commit(storage: Storage, ids) -> list[dict]:
    """Records written as replicas write them (the commit markers)."""
    records = [synthetic_record(vid) for vid in ids]
    for r in records:
        storage.write_json(f"records/{r['id']}.json", r)
    return records


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_server, s3_bucket):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    return Storage(f"s3://{s3_bucket}/dataset-{uuid.uuid4().hex[:8]}", s3_server)


def ids_of(index: DatasetIndex, table: str, version=None) -> list[str]:
    return sorted(r["id"] for r in index.read(table, version))


def test_runs_add_only_what_is_new_and_a_retry_adds_nothing(storage):
    index = DatasetIndex(storage)
    first = commit(storage, [f"a{i}" for i in range(30)])
    v1 = index.add([index.rows(r) for r in first])
    second = commit(storage, [f"b{i}" for i in range(5)])
    v2 = index.add([index.rows(r) for r in second])
    assert v2["manifest"] == v1["manifest"] + 1, "one commit per run"
    again = index.add([index.rows(r) for r in second + first[:3]])  # a retried update, a crashed driver's rerun
    assert ids_of(index, "manifest") == ids_of(index, "metrics") == sorted(r["id"] for r in first + second)
    assert ids_of(index, "manifest", v1["manifest"]) == sorted(r["id"] for r in first), "time travel: as of run 1"
    assert again["manifest"] >= v2["manifest"]
    committed = index.committed()
    assert len(committed) == 35 and committed.same("a3", first[3]["script_sha256"])


def test_a_table_of_many_runs_is_compacted_and_keeps_its_rows_and_versions(storage, monkeypatch):
    monkeypatch.setattr(dataset, "COMPACT_FILES", 3)
    index = DatasetIndex(storage)
    runs = [commit(storage, [f"r{run}-{i}" for i in range(4)]) for run in range(5)]
    versions = [index.add([index.rows(r) for r in records])["manifest"] for records in runs]
    assert len(index.table("manifest").file_uris()) <= 3, "the small files are rewritten into few"
    assert ids_of(index, "manifest") == ids_of(index, "metrics") == sorted(r["id"] for rs in runs for r in rs)
    assert ids_of(index, "manifest", versions[1]) == sorted(r["id"] for rs in runs[:2] for r in rs), "time travel"
    assert index.add([index.rows(r) for r in runs[0]])["manifest"] >= versions[-1], "a retry adds nothing"
    assert len(index.read("manifest")) == 20


def test_the_tables_are_made_to_agree_with_the_records_reading_only_what_differs(storage):
    index = DatasetIndex(storage)
    index.add([index.rows(r) for r in commit(storage, [f"x{i}" for i in range(40)])])
    late = commit(storage, ["late-1", "late-2"])  # committed by a driver that died before its update
    storage.delete("records/x7.json")  # deleted to render it again
    index.requests = 0
    missing, gone = index.reconcile(index.committed())
    assert sorted(r["id"] for r in missing) == ["late-1", "late-2"] and gone == ["x7"]
    assert index.requests == 1 + 2, "one listing, one read per missing record"
    index.add([index.rows(r) for r in missing])
    index.remove(gone)
    expected = sorted({f"x{i}" for i in range(40)} - {"x7"} | {r["id"] for r in late})
    assert ids_of(index, "manifest") == ids_of(index, "metrics") == expected


def test_two_writers_at_once_leave_every_row_exactly_once_in_every_snapshot(storage):
    index = DatasetIndex(storage)
    index.add([index.rows(r) for r in commit(storage, ["seed"])])
    groups = [[f"w{w}-{i}" for i in range(12)] + ["shared-1", "shared-2"] for w in range(2)]
    records = {w: commit(storage, g) for w, g in enumerate(groups)}
    errors = []

    def write(w):
        try:
            for batch in range(0, 14, 7):  # several commits each, interleaving
                DatasetIndex(storage).add([index.rows(r) for r in records[w][batch:batch + 7]])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = sorted({"seed", *groups[0], *groups[1]})
    assert ids_of(index, "manifest") == expected
    for version in range(index.table("manifest").version() + 1):  # no snapshot ever shows a row twice
        ids = ids_of(index, "manifest", version)
        assert len(ids) == len(set(ids)), version


def test_rebuild_and_migrate_from_the_records(storage, capsys):
    records = commit(storage, [f"m{i}" for i in range(7)])
    # an output indexed the old way: Parquet parts, one of them stale
    for folder, rows in (("manifest", [manifest_row(r) for r in records[:5]]),):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST), buf)
        storage.write_bytes(f"{folder}/part-old-00000.parquet", buf.getvalue())
    index = DatasetIndex(storage)
    assert index.migrate() is True
    assert ids_of(index, "manifest") == ids_of(index, "metrics") == sorted(r["id"] for r in records)
    assert not [n for n in storage.list("manifest") if n.startswith("part-old")], "the old parts are gone"
    assert index.migrate() is False, "once"
    assert dataset_cli.main(["rebuild", "--output", storage.url, *(["--endpoint-url", storage.endpoint_url]
                                                                   if storage.endpoint_url else [])]) == 0
    assert "from 7 records" in capsys.readouterr().out
    assert ids_of(index, "manifest") == sorted(r["id"] for r in records)
