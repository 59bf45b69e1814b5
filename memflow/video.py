"""MP4 in and out with PyAV: H.264 frames streamed to a path or a binary file object.

Frames are encoded as they arrive, so a long video is never held in memory.
A destination that cannot seek (a pipe, an fsspec file open for writing) gets a
fragmented MP4, whose index is written up front instead of patched in at the end.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterable, Iterator

import av
import numpy as np

Source = str | os.PathLike | BinaryIO


def _target(f: Source):
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else f


class Mp4Writer:
    """An H.264 MP4 open for frames: `write` uint8 RGB frames [H, W, 3] (H and W even, as
    yuv420p needs) one at a time, `close` to flush; the first frame sets the size.

    Only `crf=0` (lossless) decodes to the same pixels every time: at other settings the
    x264 that PyAV bundles makes run-to-run different choices for identical input (it reads
    memory it never initialised: runs agree under glibc's MALLOC_PERTURB_)."""

    def __init__(self, dest: Source, fps: int, crf: int = 18):
        self.dest, self.fps, self.crf = _target(dest), fps, crf
        self.count = 0
        self.container = self.stream = self.shape = None

    def _open(self, frame: np.ndarray) -> None:
        height, width = frame.shape[:2]
        if height % 2 or width % 2:
            raise ValueError(f"H.264/yuv420p needs an even width and height, got {width}x{height}; crop or pad the frames")
        seekable = isinstance(self.dest, str) or getattr(self.dest, "seekable", lambda: False)()
        options = {} if seekable else {"movflags": "frag_keyframe+empty_moov"}
        self.container = av.open(self.dest, mode="w", format="mp4", options=options)
        self.stream = self.container.add_stream("libx264", rate=self.fps, options={"crf": str(self.crf)})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.shape = frame.shape

    def write(self, frame: np.ndarray) -> None:
        if self.shape is None:
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 RGB [H, W, 3], got {frame.dtype} {frame.shape}")
            self._open(frame)
        elif frame.shape != self.shape or frame.dtype != np.uint8:
            raise ValueError(f"frame {self.count} is {frame.dtype} {frame.shape}, expected uint8 {self.shape}")
        self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        self.count += 1

    def close(self) -> int:
        """Flush the encoder's delayed frames and finish the file; returns the frame count."""
        if self.container is None:
            raise ValueError("no frames to write")
        self.container.mux(self.stream.encode())
        self.container.close()
        return self.count

    def abort(self) -> None:
        """Give up: close the file as it is (not a valid video)."""
        if self.container is not None:
            self.container.close()


def write_mp4(frames: Iterable[np.ndarray], dest: Source, fps: int, crf: int = 18) -> int:
    """Encode uint8 RGB frames to H.264 MP4 at `fps` as they arrive (see Mp4Writer);
    returns the number of frames written."""
    writer = Mp4Writer(dest, fps, crf)
    try:
        for frame in frames:
            writer.write(frame)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class FrameSpool:
    """Decoded frames kept on local disk, raw, for the videos that contain them: the frames
    before a story branches are decoded once and encoded into every branch's video."""

    def __init__(self, folder: str | os.PathLike):
        fd, self.path = tempfile.mkstemp(prefix="frames-", suffix=".raw", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.shape: tuple | None = None
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
        self.file.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        self.count += 1

    def frames(self) -> Iterator[np.ndarray]:
        """The frames written so far, in order, read back one at a time."""
        self.file.flush()
        size = int(np.prod(self.shape)) if self.shape else 0
        with open(self.path, "rb") as f:
            for _ in range(self.count):
                yield np.frombuffer(f.read(size), dtype=np.uint8).reshape(self.shape)

    def delete(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_frames(src: Source) -> Iterator[np.ndarray]:
    """Decode a video's frames as uint8 RGB [H, W, 3], one at a time."""
    with av.open(_target(src)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def probe_mp4(src: Source) -> dict:
    """Frame count, fps, size and duration, from decoding every frame (not from
    the container's header, which a truncated or fragmented file can get wrong)."""
    with av.open(_target(src)) as container:
        stream = container.streams.video[0]
        frames, start, end = 0, None, None
        for frame in container.decode(stream):
            if frames == 0:
                start, width, height = frame.time, frame.width, frame.height
            end, frames = frame.time, frames + 1
        if frames == 0:
            raise ValueError("the video has no decodable frames")
        if frames > 1 and start is not None and end > start:
            fps = (frames - 1) / (end - start)
        else:
            fps = float(stream.average_rate or stream.guessed_rate)
    return dict(frames=frames, fps=fps, width=width, height=height, seconds=frames / fps)
