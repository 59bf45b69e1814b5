"""Stream scripts from a manifest at any fsspec URL, one item per record.

The driver may be handed millions of scripts, or a hostile file, so nothing here
holds more than one bounded piece of the input at a time: line formats are read in
fixed-size chunks (an over-long line is skipped to its newline, never buffered),
Parquet batch by batch. A bad record becomes an item with an error and its line
number, and the iteration goes on (system-design.md, "Bad input never stops a job
and never passes silently").

Formats, by extension (after a compression suffix) or else by content:
- `.jsonl` / `.ndjson` / `.json`: one JSON object a line, anything `parse_script`
  accepts (`{"prompts": [...]}` as in the MemFlow benchmark, or id/segments/seed...);
- `.txt`: one prompt a line, a 10 s one-segment script; blank and `#` lines skipped;
- `.parquet`: a `prompts` (list of strings) or `segments` (list of {prompt, seconds})
  column, plus optional id, seed, resolution, fps.
`.gz`, `.bz2`, `.xz` (and `.zst` with zstandard installed) are decompressed on the fly.

A manifest of millions of lines is read for hours: a read that fails on a transient
storage error re-opens the file where it was and goes on (Storage's backoff, minutes),
so a storage outage does not end the job.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Optional

import fsspec
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from cluster.storage import call_with_retries
from cluster.storage import storage_options as fs_options
from memflow.script import Limits, Script, ScriptError, parse_script

MAX_LINE_BYTES = 1 << 20
PREVIEW_CHARS = 200
CHUNK_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 256
COUNT_MAX_BYTES = 256 << 20
SCRIPT_COLUMNS = frozenset({"id", "segments", "prompts", "seed", "resolution", "fps"})
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt",
            ".parquet": "parquet", ".pq": "parquet"}


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (e.g. Parquet columns the schema does not know)."""


@dataclass(frozen=True, slots=True)
class ManifestItem:
    line: int  # 1-based line, or row for Parquet
    script: Optional[Script]
    error: Optional[str]
    raw: str  # preview, at most PREVIEW_CHARS, control characters escaped: safe to log

    @property
    def ok(self) -> bool:
        return self.error is None


def iter_manifest(url: str, storage_options: Optional[dict] = None, *, max_line_bytes: int = MAX_LINE_BYTES,
                  limits: Optional[Limits] = None) -> Iterator[ManifestItem]:
    """Yield one ManifestItem per record of the manifest at `url`, in order; scripts
    outside `limits` (memflow.script.Limits) are bad records."""
    fs, path, compression = _open_args(url, storage_options)
    with _open(fs, path, compression) as f:
        fmt = _format(path, compression, f)
        if fmt == "parquet":
            yield from _parquet_items(f, limits)
        else:
            yield from _line_items(f, fmt, max_line_bytes, limits)


def count_manifest(url: str, storage_options: Optional[dict] = None,
                   max_bytes: int = COUNT_MAX_BYTES) -> Optional[int]:
    """Number of records, for progress totals: Parquet from its footer; line formats
    by a quick scan when uncompressed and at most `max_bytes`; otherwise None."""
    fs, path, compression = _open_args(url, storage_options)
    with _open(fs, path, compression) as f:
        fmt = _format(path, compression, f)
        if fmt == "parquet":
            return pq.ParquetFile(f).metadata.num_rows
        if compression or fs.size(path) > max_bytes:
            return None
        return sum(1 for _, data, _ in _lines(f, MAX_LINE_BYTES) if not _skipped(data, fmt))


# -- line formats ---------------------------------------------------------------

def _line_items(f: BinaryIO, fmt: str, max_line_bytes: int, limits: Optional[Limits]) -> Iterator[ManifestItem]:
    for n, data, head in _lines(f, max_line_bytes):
        if data is None:
            yield ManifestItem(n, None, f"line is longer than {max_line_bytes} bytes; skipped", _preview(head))
            continue
        if _skipped(data, fmt):
            continue
        if b"\0" in data:
            yield ManifestItem(n, None, "binary data (NUL byte) in line", _preview(data))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield ManifestItem(n, None, f"not valid UTF-8 (byte {e.start})", _preview(data))
            continue
        yield _item(n, text, fmt, limits)


def _item(n: int, text: str, fmt: str, limits: Optional[Limits]) -> ManifestItem:
    raw = _preview(text)
    if fmt == "txt":
        record: Any = {"prompts": [text.strip()]}
    else:
        try:
            record = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            return ManifestItem(n, None, f"invalid JSON: {e}", raw)
    try:
        return ManifestItem(n, parse_script(record, limits), None, raw)
    except ScriptError as e:
        return ManifestItem(n, None, str(e), raw)


def _skipped(data: Optional[bytes], fmt: str) -> bool:
    """Blank lines (and `#` comments in text manifests) are not records."""
    if data is None:
        return False
    s = data.strip()
    return not s or (fmt == "txt" and s.startswith(b"#"))


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, Optional[bytes], bytes]]:
    """(line number, content without newline or None if longer than max_bytes, first
    bytes of the line), reading fixed-size chunks so memory stays bounded by max_bytes."""
    buf = bytearray()
    head = b""
    too_long = False
    n = 0
    while True:
        chunk = f.read(CHUNK_BYTES)
        if not chunk:
            break
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            n += 1
            piece = chunk[start:end]
            if too_long or len(buf) + len(piece) > max_bytes:
                yield n, None, head or bytes((buf or piece)[:PREVIEW_CHARS])
            else:
                buf += piece
                yield n, _line_bytes(buf, n), b""
            buf.clear()
            head, too_long, start = b"", False, end + 1
        if not too_long:
            buf += chunk[start:]
            if len(buf) > max_bytes:
                head, too_long = bytes(buf[:PREVIEW_CHARS]), True
                buf.clear()
    if too_long:
        yield n + 1, None, head
    elif buf:
        yield n + 1, _line_bytes(buf, n + 1), b""


def _line_bytes(buf: bytearray, n: int) -> bytes:
    data = bytes(buf).removesuffix(b"\r")
    return data.removeprefix(b"\xef\xbb\xbf") if n == 1 else data  # UTF-8 BOM


# -- Parquet --------------------------------------------------------------------

def _parquet_items(f: BinaryIO, limits: Optional[Limits]) -> Iterator[ManifestItem]:
    pf = pq.ParquetFile(f)
    unknown = set(pf.schema_arrow.names) - SCRIPT_COLUMNS
    if unknown:
        raise ManifestError(f"Parquet manifest has unknown columns {sorted(unknown)}; "
                            f"allowed: {sorted(SCRIPT_COLUMNS)}")
    n = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            n += 1
            record = {k: v for k, v in row.items() if v is not None}  # nulls mean "default"
            raw = _preview(json.dumps(record, ensure_ascii=False, default=str))
            try:
                yield ManifestItem(n, parse_script(record, limits), None, raw)
            except ScriptError as e:
                yield ManifestItem(n, None, str(e), raw)


# -- helpers --------------------------------------------------------------------

class _Resumable(io.RawIOBase):
    """A file on any fsspec filesystem whose reads survive transient storage errors: a
    failed read re-opens the file at the offset reached and tries again."""

    def __init__(self, fs, path: str):
        self.fs, self.path, self.pos = fs, path, 0
        self.f = call_with_retries(fs.open, path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = call_with_retries(self._read, len(buffer))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except Exception:
            self.f = self.fs.open(self.path, "rb")  # a file object that failed mid-read is not trusted again
            self.f.seek(self.pos)
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.f.close()
        super().close()


def _open(fs, path: str, compression: Optional[str]) -> BinaryIO:
    from fsspec.compression import compr

    raw = _Resumable(fs, path)
    return compr[compression](raw, mode="rb") if compression else raw


def _open_args(url: str, options: Optional[dict]) -> tuple[Any, str, Optional[str]]:
    fs, path = fsspec.core.url_to_fs(url, **fs_options(url, **(options or {})))
    return fs, path, infer_compression(path)


def _format(path: str, compression: Optional[str], f: BinaryIO) -> str:
    """Format from the extension under any compression suffix, else from the first bytes."""
    name = path.rsplit("/", 1)[-1].lower()
    if compression:
        name = name.rsplit(".", 1)[0]
    ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in _FORMATS:
        return _FORMATS[ext]
    head = f.read(64)
    f.seek(0)
    if head.startswith(b"PAR1"):
        return "parquet"
    return "jsonl" if head.lstrip().startswith(b"{") else "txt"


def _preview(data: bytes | str) -> str:
    """At most PREVIEW_CHARS characters, control characters escaped (no terminal tricks in logs)."""
    if isinstance(data, bytes):
        data = data[: PREVIEW_CHARS * 4].decode("utf-8", "backslashreplace")
    if data[:PREVIEW_CHARS].isprintable():  # most lines: nothing to escape
        return data[:PREVIEW_CHARS]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in data[:PREVIEW_CHARS])
    return out[:PREVIEW_CHARS]
