"""The dataset index: manifest/ and metrics/ Parquet, compacted from the records.

Records are the source of truth (a script is done iff its record exists), so the
Parquet index is rebuilt from them at the end of every run rather than appended
per result. That makes it exact by construction: a resumed run, a retried
script or a driver that died after a commit can neither duplicate nor drop a row.
The cost is reading every record once per run (in parallel, in bounded batches).
"""
from __future__ import annotations

import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from memflow.quality import METRICS as QUALITY, SWITCH_METRICS

from .storage import Storage

ROWS_PER_PART = 5000

# Quality metrics (memflow.quality): null where not measured (no backbone given, older records).
_QUALITY = [(name, pa.float64()) for name in QUALITY]
SEGMENT = pa.struct([("index", pa.int32()), ("prompt", pa.string()), ("start_frame", pa.int64()),
                     ("end_frame", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64()), *_QUALITY])
SWITCH = pa.struct([("from_segment", pa.int32()), ("to_segment", pa.int32()), ("frame", pa.int64()),
                    ("start_frame", pa.int64()), ("end_frame", pa.int64()),
                    *[(name, pa.float64()) for name in SWITCH_METRICS]])
MANIFEST = pa.schema([("id", pa.string()), ("video", pa.string()), ("video_url", pa.string()),
                      ("num_frames", pa.int64()), ("fps", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
                      ("seconds", pa.float64()), ("seed", pa.int64()), ("prompts", pa.list_(pa.string())),
                      ("segments", pa.list_(SEGMENT)), ("preset", pa.string()), ("weights", pa.string()),
                      ("memory", pa.string()), ("config_fingerprint", pa.string()), ("committed_at", pa.string()),
                      *_QUALITY])
METRICS = pa.schema([("id", pa.string()), ("num_chunks", pa.int64()), ("generate_s", pa.float64()),
                     ("decode_encode_s", pa.float64()), ("upload_s", pa.float64()), ("generation_fps", pa.float64()),
                     ("peak_kv_bytes", pa.int64()), ("chunk_seconds", pa.list_(pa.float64())),
                     ("attempts", pa.int32()), ("replica", pa.int32()), ("host", pa.string()),
                     ("device", pa.string()), ("bank_updates", pa.int32()), *_QUALITY,
                     ("segment_quality", pa.list_(SEGMENT)), ("switch_quality", pa.list_(SWITCH)),
                     ("quality_s", pa.float64()), ("quality_error", pa.string())])


def _quality(r: dict) -> dict:
    return r.get("quality") or {"video": {}, "segments": [], "switches": []}


def _segments(r: dict) -> list[dict]:
    """The record's segments with their quality metrics merged in (by index)."""
    scores = {q["index"]: q for q in _quality(r)["segments"]}
    return [{k: s.get(k, scores.get(s["index"], {}).get(k)) for k in SEGMENT.names} for s in r["segments"]]


def manifest_row(r: dict) -> dict:
    segments = _segments(r)
    video = _quality(r)["video"]
    return {"id": r["id"], "video": r["video"], "video_url": r["video_url"], "num_frames": r["num_frames"],
            "fps": r["fps"], "width": r["width"], "height": r["height"], "seconds": r["seconds"], "seed": r["seed"],
            "prompts": [s["prompt"] for s in segments], "segments": segments, "preset": r["model"]["preset"],
            "weights": r["model"]["weights"], "memory": r["model"]["memory"],
            "config_fingerprint": r["model"]["fingerprint"], "committed_at": r["committed_at"],
            **{name: video.get(name) for name in QUALITY}}


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
            "quality_s": _quality(r).get("seconds"), "quality_error": _quality(r).get("error")}


def iter_records(storage: Storage, threads: int = 16) -> Iterator[dict]:
    names = [n for n in storage.list("records") if n.endswith(".json")]
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(names), ROWS_PER_PART):
            batch = names[start:start + ROWS_PER_PART]
            yield from pool.map(lambda n: json.loads(storage.read_text(f"records/{n}")), batch)


class _Parts:
    """Rows to Parquet part files of at most ROWS_PER_PART rows, each one atomic write."""

    def __init__(self, storage: Storage, folder: str, schema: pa.Schema, tag: str):
        self.storage, self.folder, self.schema, self.tag = storage, folder, schema, tag
        self.rows: list[dict] = []
        self.written: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        name = f"part-{self.tag}-{len(self.written):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), buf)
        self.storage.write_bytes(f"{self.folder}/{name}", buf.getvalue())
        self.written.append(name)
        self.rows.clear()

    def close(self) -> None:
        """Write the last part and drop parts of earlier compactions."""
        if self.rows or not self.written:
            self.flush()
        for name in self.storage.list(self.folder):
            if name.endswith(".parquet") and name not in self.written:
                self.storage.delete(f"{self.folder}/{name}")


def compact(storage: Storage) -> int:
    """Rewrite manifest/ and metrics/ from all records; returns the number of rows."""
    tag = uuid.uuid4().hex[:8]
    manifest = _Parts(storage, "manifest", MANIFEST, tag)
    metrics = _Parts(storage, "metrics", METRICS, tag)
    count = 0
    for record in iter_records(storage):
        manifest.add(manifest_row(record))
        metrics.add(metrics_row(record))
        count += 1
    manifest.close()
    metrics.close()
    return count
