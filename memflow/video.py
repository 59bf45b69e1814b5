"""MP4 in and out with PyAV: H.264 frames streamed to a path or a binary file object.

Frames are encoded as they arrive, so a long video is never held in memory.
A destination that cannot seek (a pipe, an fsspec file open for writing) gets a
fragmented MP4, whose index is written up front instead of patched in at the end.
"""
from __future__ import annotations

import itertools
import os
from typing import BinaryIO, Iterable, Iterator

import av
import numpy as np

Source = str | os.PathLike | BinaryIO


def _target(f: Source):
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else f


def write_mp4(frames: Iterable[np.ndarray], dest: Source, fps: int, crf: int = 18) -> int:
    """Encode uint8 RGB frames [H, W, 3] (H and W even, as yuv420p needs) to H.264
    MP4 at `fps`; returns the number of frames written.

    Only `crf=0` (lossless) decodes to the same pixels every time: at other settings the
    x264 that PyAV bundles makes run-to-run different choices for identical input (it reads
    memory it never initialised: runs agree under glibc's MALLOC_PERTURB_)."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to write")
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB [H, W, 3], got {first.dtype} {first.shape}")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"H.264/yuv420p needs an even width and height, got {width}x{height}; crop or pad the frames")
    target = _target(dest)
    seekable = isinstance(target, str) or getattr(target, "seekable", lambda: False)()
    options = {} if seekable else {"movflags": "frag_keyframe+empty_moov"}
    count = 0
    with av.open(target, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in itertools.chain([first], it):
            if frame.shape != first.shape or frame.dtype != np.uint8:
                raise ValueError(f"frame {count} is {frame.dtype} {frame.shape}, expected uint8 {first.shape}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            count += 1
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return count


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
