"""The dataset index: manifest/ and metrics/ as Delta Lake tables that grow by transactions.

Records are the source of truth (a script is done iff its record exists); the tables
index them, one row per committed video, keyed by id, in an open table format that
duckdb, pandas, Ray Data and Spark read (through `deltalake`, delta-rs). A run adds only
the videos committed since the index was last updated, in one atomic commit per table,
as an idempotent merge on the id: a retry or a crashed driver can neither drop nor
duplicate a row, and a run that finds committed records missing from the table (a driver
that died between a commit and the index update) adds them. What an update costs grows
with the new videos, not with the dataset: a listing of records/ names, the tables' id
column, and one read per new record.

Readers see one snapshot or the next, never a mix; two jobs on one output cannot corrupt
the tables: Delta's optimistic concurrency (a commit is a new log entry written only if
absent: a rename on a local disk, a conditional PUT on S3) makes a losing writer retry on
the new snapshot. Every version stays readable (time travel: "the dataset as of run N";
`summary.json` names the versions each run wrote). `rebuild` recreates the tables from
the records from scratch; `migrate` turns an output written before (Parquet part files)
into the tables.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import pyarrow as pa

from memflow.quality import METRICS as QUALITY, SWITCH_METRICS

from .storage import S3_PROTOCOLS, Storage, s3_endpoint

log = logging.getLogger(__name__)
BATCH = 5000  # records read at once, rows merged at once
COMPACT_FILES = 64  # a table of more files is compacted after an update: a merge reads every file's ids

# The video's story (a tree's node, a continuation): root and parent ids, where it forked, how
# its prefix and chunks were obtained. Records from before stories: their own root, no parent.
_STORY_CHUNKS = [(f"story_chunks_{k}", pa.int64()) for k in ("shared", "replayed", "generated")]
_STORY = [("story_root", pa.string()), ("story_parent", pa.string()), ("story_fork_chunk", pa.int64()),
          ("story_prefix", pa.string()), *_STORY_CHUNKS]
# Quality metrics (memflow.quality): null where not measured (no backbone given, older records).
_QUALITY = [(name, pa.float64()) for name in QUALITY]
SEGMENT = pa.struct([("index", pa.int32()), ("prompt", pa.string()), ("start_frame", pa.int64()),
                     ("end_frame", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64()), *_QUALITY])
SWITCH = pa.struct([("from_segment", pa.int32()), ("to_segment", pa.int32()), ("frame", pa.int64()),
                    ("start_frame", pa.int64()), ("end_frame", pa.int64()),
                    *[(name, pa.float64()) for name in SWITCH_METRICS]])
MANIFEST = pa.schema([("id", pa.string()), ("script_sha256", pa.string()), ("video", pa.string()),
                      ("video_url", pa.string()),
                      ("num_frames", pa.int64()), ("fps", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
                      ("seconds", pa.float64()), ("seed", pa.int64()), ("prompts", pa.list_(pa.string())),
                      ("segments", pa.list_(SEGMENT)), ("preset", pa.string()), ("weights", pa.string()),
                      ("memory", pa.string()), ("config_fingerprint", pa.string()), ("committed_at", pa.string()),
                      *_QUALITY, *_STORY])
METRICS = pa.schema([("id", pa.string()), ("num_chunks", pa.int64()), ("generate_s", pa.float64()),
                     ("decode_encode_s", pa.float64()), ("upload_s", pa.float64()), ("generation_fps", pa.float64()),
                     ("peak_kv_bytes", pa.int64()), ("chunk_seconds", pa.list_(pa.float64())),
                     ("attempts", pa.int32()), ("replica", pa.int32()), ("host", pa.string()),
                     ("device", pa.string()), ("bank_updates", pa.int32()), *_QUALITY,
                     ("segment_quality", pa.list_(SEGMENT)), ("switch_quality", pa.list_(SWITCH)),
                     ("quality_s", pa.float64()), ("quality_error", pa.string()), *_STORY_CHUNKS])


def _quality(r: dict) -> dict:
    return r.get("quality") or {"video": {}, "segments": [], "switches": []}


def _segments(r: dict) -> list[dict]:
    """The record's segments with their quality metrics merged in (by index)."""
    scores = {q["index"]: q for q in _quality(r)["segments"]}
    return [{k: s.get(k, scores.get(s["index"], {}).get(k)) for k in SEGMENT.names} for s in r["segments"]]


def _story(r: dict) -> dict:
    story = r.get("story") or {}
    chunks = story.get("chunks") or {}
    return {"story_root": story.get("root") or r["id"], "story_parent": story.get("parent"),
            "story_fork_chunk": story.get("fork_chunk"), "story_prefix": story.get("prefix"),
            **{f"story_chunks_{k}": chunks.get(k) for k in ("shared", "replayed", "generated")}}


def manifest_row(r: dict) -> dict:
    segments = _segments(r)
    video = _quality(r)["video"]
    return {"id": r["id"], "script_sha256": r.get("script_sha256"), "video": r["video"], "video_url": r["video_url"],
            "num_frames": r["num_frames"],
            "fps": r["fps"], "width": r["width"], "height": r["height"], "seconds": r["seconds"], "seed": r["seed"],
            "prompts": [s["prompt"] for s in segments], "segments": segments, "preset": r["model"]["preset"],
            "weights": r["model"]["weights"], "memory": r["model"]["memory"],
            "config_fingerprint": r["model"]["fingerprint"], "committed_at": r["committed_at"],
            **{name: video.get(name) for name in QUALITY}, **_story(r)}


def metrics_row(r: dict) -> dict:
    t = r["timings"]
    return {"id": r["id"], "num_chunks": r["num_chunks"], "generate_s": t["generate_s"],
            "decode_encode_s": t["decode_encode_s"], "upload_s": t["upload_s"],
            "generation_fps": t["generation_fps"], "peak_kv_bytes": t["peak_kv_bytes"],
            "chunk_seconds": t["chunk_seconds"], "attempts": r["attempts"], "replica": r["replica"]["index"],
            "host": r["replica"]["host"], "device": r["replica"]["device"],
            "bank_updates": len(r["retrieval"]["bank_trace"]),
            **{name: _quality(r)["video"].get(name) for name in QUALITY}, "segment_quality": _segments(r),
            "switch_quality": [{k: w.get(k) for k in SWITCH.names} for w in _quality(r)["switches"]],
            "quality_s": _quality(r).get("seconds"), "quality_error": _quality(r).get("error"),
            **{k: v for k, v in _story(r).items() if k.startswith("story_chunks_")}}


class Committed:
    """The ids committed, each with 64 bits of its script's content hash: what the driver
    checks every manifest line against, in memory (about 100 bytes an id)."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def add(self, video_id: str, digest: str | None) -> None:
        self.ids[video_id] = int(digest[:16], 16) if digest else 0

    def get(self, video_id: str) -> int | None:
        return self.ids.get(video_id)

    def same(self, video_id: str, digest: str) -> bool | None:
        """None: not committed; else whether with this content."""
        held = self.ids.get(video_id)
        return None if held is None else held == int(digest[:16], 16)

    def discard(self, video_id: str) -> None:
        self.ids.pop(video_id, None)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)


class DatasetIndex:
    """The manifest and metrics tables of one output (`storage`)."""

    TABLES = {"manifest": (MANIFEST, manifest_row), "metrics": (METRICS, metrics_row)}

    def __init__(self, storage: Storage, endpoint_url: str | None = None, retries: int = 20):
        endpoint_url = endpoint_url or storage.endpoint_url
        self.storage, self.retries = storage, retries
        protocol = storage.url.split("://", 1)[0] if "://" in storage.url else "file"
        if protocol not in (*S3_PROTOCOLS, "file", "gs", "gcs", "az", "abfs", "abfss"):
            raise ValueError(f"the dataset tables need a local path, s3://, gs:// or az:// output, not {protocol}://")
        self.options = {}
        if protocol in S3_PROTOCOLS:  # credentials stay in the environment / the credential chain
            endpoint = s3_endpoint(endpoint_url)
            if endpoint:
                self.options.update(AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP=str(endpoint.startswith("http:")).lower())
            self.options["AWS_REGION"] = next((v for v in (os.environ.get("AWS_REGION"),
                                                           os.environ.get("AWS_DEFAULT_REGION")) if v), "us-east-1")
        self.requests = 0  # storage requests made through Storage (records, listings): the benchmark reads it

    def uri(self, table: str) -> str:
        url = self.storage.url_for(table)
        return url.removeprefix("file://")

    def table(self, name: str, version: int | None = None):
        """The Delta table, or None when it does not exist (yet)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri(name), version=version, storage_options=self.options)
        except TableNotFoundError:
            return None

    def read(self, name: str, version: int | None = None) -> list[dict]:
        """Every row of a table (at `version`: time travel), for people and tests."""
        table = self.table(name, version)
        return [] if table is None else table.to_pyarrow_table().to_pylist()

    # -- what is committed ---------------------------------------------------------------------
    def committed(self) -> Committed:
        """Every id the manifest table holds, with its content hash (two columns read)."""
        found = Committed()
        manifest = self.table("manifest")
        if manifest is not None:
            for batch in manifest.to_pyarrow_dataset().to_batches(columns=["id", "script_sha256"]):
                for vid, digest in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    found.add(vid, digest)
        return found

    def reconcile(self, committed: Committed) -> tuple[list[dict], list[str]]:
        """Where the tables and the records (the truth) disagree: the committed records the
        tables miss (read, one by one), and the ids the tables hold whose records are gone
        (deleted to render them again). One listing of records/ finds both."""
        names = {n.removesuffix(".json") for n in self.storage.list("records") if n.endswith(".json")}
        self.requests += 1 + len(names) // 1000
        gone = [vid for vid in committed.ids if vid not in names]
        return list(self.records(sorted(n for n in names if n not in committed))), gone

    def remove(self, ids: list[str]) -> None:
        """Drop the rows of videos whose records are gone, one commit per table."""
        for name in self.TABLES:
            table = self.table(name)
            for start in range(0, len(ids) if table is not None else 0, 1000):
                listed = ", ".join(f"'{vid}'" for vid in ids[start:start + 1000])  # ids are [A-Za-z0-9._-]
                table.delete(f"id IN ({listed})")

    def records(self, ids: Iterable[str], threads: int = 16) -> Iterator[dict]:
        """Records by id, read in parallel in bounded batches."""
        ids = iter(ids)
        with ThreadPoolExecutor(threads) as pool:
            while batch := [vid for _, vid in zip(range(BATCH), ids)]:
                self.requests += len(batch)
                yield from pool.map(lambda vid: json.loads(self.storage.read_text(f"records/{vid}.json")), batch)

    # -- changes ---------------------------------------------------------------------------------
    def rows(self, record: dict) -> dict[str, dict]:
        """A record's row in each table."""
        return {name: row(record) for name, (_, row) in self.TABLES.items()}

    def add(self, rows: list[dict[str, dict]]) -> dict[str, int | None]:
        """Merge rows (`rows(record)` each) into both tables, by id (rows already there are
        left as they are), one commit per table; returns each table's version after."""
        return {name: self.compact(name, self._merge(name, [r[name] for r in rows])) for name in self.TABLES}

    def compact(self, name: str, version: int | None = None) -> int | None:
        """The table's small files (one a run) rewritten into few, once there are more than
        COMPACT_FILES, so that the next merges read few files; the rows are the same and
        every version stays readable (nothing is vacuumed). A writer that commits first
        makes it wait for a later update. Returns the table's version after (`version` if none)."""
        from deltalake.exceptions import CommitFailedError

        table = self.table(name)
        if table is None or len(table.file_uris()) <= COMPACT_FILES:
            return version
        try:
            table.optimize.compact()
        except CommitFailedError as e:
            log.info("dataset %s: compaction left to a later update (%s)", name, str(e).splitlines()[0][:120])
            return version
        return self.table(name).version()

    def _merge(self, name: str, rows: list[dict]) -> int | None:
        from deltalake import write_deltalake
        from deltalake.exceptions import CommitFailedError, DeltaError

        schema = self.TABLES[name][0]
        for attempt in range(self.retries):
            try:
                table = self.table(name)
                if table is None:
                    write_deltalake(self.uri(name), pa.Table.from_pylist(rows, schema=schema), mode="append",
                                    storage_options=self.options)
                elif rows:
                    (table.merge(pa.Table.from_pylist(rows, schema=schema), predicate="t.id = s.id",
                                 source_alias="s", target_alias="t")
                     .when_not_matched_insert_all().execute())
                table = self.table(name)
                return table.version() if table is not None else None
            except (CommitFailedError, DeltaError) as e:
                # another writer committed first (or created the table first): merge again on its snapshot
                raced = isinstance(e, CommitFailedError) or table is None and self.table(name) is not None
                if not raced or attempt + 1 == self.retries:
                    raise
                log.info("dataset %s: concurrent commit (%s); merging again", name, str(e).splitlines()[0][:120])
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
        return None

    def rebuild(self) -> int:
        """Both tables anew from every record (a new version that replaces every row)."""
        from deltalake import write_deltalake

        names = [n.removesuffix(".json") for n in self.storage.list("records") if n.endswith(".json")]
        rows = [self.rows(record) for record in self.records(names)]
        for name, (schema, _) in self.TABLES.items():
            write_deltalake(self.uri(name), pa.Table.from_pylist([r[name] for r in rows], schema=schema),
                            mode="overwrite", schema_mode="overwrite", storage_options=self.options)
        return len(names)

    def migrate(self) -> bool:
        """An output indexed the old way (Parquet part files, no Delta log): build the tables
        from the records, then remove the old parts (readers of the old layout see them
        until then). True when it migrated."""
        legacy = {name: [n for n in self.storage.list(name) if n.startswith("part-") and n.endswith(".parquet")]
                  for name in self.TABLES}
        if not any(legacy.values()) or any(self.storage.exists(f"{name}/_delta_log") for name in self.TABLES):
            return False
        self.rebuild()  # Delta readers see only the table: the old parts are not in its log
        for name, parts in legacy.items():
            for part in parts:
                self.storage.delete(f"{name}/{part}")
        return True
