import io

import fsspec
import numpy as np
import pytest

from memflow.video import probe_mp4, read_frames, write_mp4

H, W, N, FPS = 48, 64, 33, 16


def _frames(n=N, h=H, w=W):
    """A smooth gradient that moves a couple of pixels per frame."""
    y, x = np.mgrid[0:h, 0:w] / 32 * np.pi
    for t in range(n):
        r = np.sin(x + t / 8)
        g = np.cos(y - t / 16)
        b = np.sin(x + y)
        yield (128 + 100 * np.stack([r, g, b], -1)).astype(np.uint8)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255**2 / mse)


class _Unseekable(io.RawIOBase):
    """A write-only sink that cannot seek, like a pipe or an fsspec file in "wb" mode."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.data += bytes(b)
        return len(b)


def _check(src):
    assert probe_mp4(src) == dict(frames=N, fps=pytest.approx(FPS), width=W, height=H,
                                  seconds=pytest.approx(N / FPS))


def test_write_probe_and_read_back(tmp_path):
    path = tmp_path / "a.mp4"
    assert write_mp4(_frames(), path, FPS) == N
    _check(path)
    _check(str(path))
    got = list(read_frames(path))
    assert len(got) == N
    for a, b in zip(_frames(), got):
        assert b.dtype == np.uint8 and b.shape == (H, W, 3)
        assert _psnr(a, b) > 30
    assert not all(np.array_equal(got[0], g) for g in got[1:])  # the motion survives


def test_seekable_file_object():
    buf = io.BytesIO()
    assert write_mp4(_frames(), buf, FPS) == N
    buf.seek(0)
    _check(buf)


def test_unseekable_file_object_gets_fragmented_mp4():
    sink = _Unseekable()
    assert write_mp4(_frames(), sink, FPS) == N
    _check(io.BytesIO(bytes(sink.data)))
    assert b"moof" in sink.data  # fragmented


def test_fsspec_file(tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open("/clip.mp4", "wb") as f:
        write_mp4(_frames(), f, FPS)
    with fs.open("/clip.mp4", "rb") as f:
        _check(f)


def test_frames_are_encoded_as_they_arrive():
    buf, written = io.BytesIO(), []

    def source():
        for frame in _frames(96, 32, 32):
            written.append(buf.getbuffer().nbytes)
            yield frame

    assert write_mp4(source(), buf, FPS) == 96
    assert written[-1] > 0  # packets reached the file before the last frame was pulled


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(_frames(w=W - 1), tmp_path / "odd.mp4", FPS)
    with pytest.raises(ValueError, match="no frames"):
        write_mp4([], tmp_path / "none.mp4", FPS)
    frames = list(_frames(3))
    frames[2] = frames[2][:, :-2]
    with pytest.raises(ValueError, match="frame 2"):
        write_mp4(frames, tmp_path / "ragged.mp4", FPS)


def test_lossless_encoding_decodes_to_the_same_pixels_every_time(tmp_path):
    """Regression renders rely on it: crf=0 keeps the encoder's run-to-run choices out of the pixels."""
    decoded = []
    for i in range(4):
        write_mp4(_frames(), tmp_path / f"{i}.mp4", FPS, crf=0)
        decoded.append(np.stack(list(read_frames(tmp_path / f"{i}.mp4"))))
    for other in decoded[1:]:
        assert np.array_equal(decoded[0], other)
    write_mp4(_frames(), tmp_path / "lossy.mp4", FPS, crf=28)
    lossy = np.stack(list(read_frames(tmp_path / "lossy.mp4")))
    source = np.stack(list(_frames()))
    assert _psnr(source, decoded[0]) > _psnr(source, lossy)
