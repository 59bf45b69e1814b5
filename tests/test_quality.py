"""Quality metrics on constructed inputs whose answers are known, with tiny CLIP and
DINOv2 saved in Hugging Face layout by tests/quality_models.py (no downloads)."""
from __future__ import annotations

import shutil
import tracemalloc

import fsspec
import numpy as np
import pytest
import torch

from cluster.dataset import manifest_row, metrics_row
from memflow.quality import BackboneError, QualityMeter, check_source, load_clip, load_dino

from .quality_models import IMAGE, colour_frames, save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def backbones(folders):
    return load_clip(folders[0]), load_dino(folders[1])


def measure(frames: torch.Tensor, segments, backbones, batch_size: int = 2, fps: int = 16) -> dict:
    """Frames through QualityMeter.observe, as the replica streams them to the encoder."""
    clip, dino = backbones
    meter = QualityMeter(segments, fps, clip=clip, dino=dino, batch_size=batch_size)
    passed = list(meter.observe(f.numpy() for f in frames))
    assert len(passed) == len(frames) and all((p == f.numpy()).all() for p, f in zip(passed, frames))
    return meter.result()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def test_identical_frames_are_perfectly_consistent(backbones):
    frames = colour_frames("green", 1).repeat(6, 1, 1, 1)
    q = measure(frames, [(0, 6, "a green scene")], backbones)
    for scope in (q["video"], q["segments"][0]):
        assert scope["subject_consistency"] == pytest.approx(1, abs=1e-6)
        assert scope["background_consistency"] == pytest.approx(1, abs=1e-6)
        assert scope["temporal_flickering"] == 1.0


def test_a_noise_frame_between_identical_ones_costs_what_the_formula_says(backbones):
    """Frames A A N A A: the noise frame scores s = max(0, <a, n>) against both neighbours
    (first = previous = A), the frame after it (s + 1) / 2, the others 1:
    consistency = (1 + s + (s + 1) / 2 + 1) / 4. Flicker: two frame pairs differ by m."""
    clip, dino = backbones
    a = colour_frames("red", 1)[0]
    n = torch.randint(0, 256, a.shape, generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    q = measure(torch.stack([a, a, n, a, a]), [(0, 5, "a red scene")], backbones)
    m = float((a.double() - n.double()).abs().mean())
    assert q["video"]["temporal_flickering"] == pytest.approx(1 - (2 * m / 4) / 255, abs=1e-12)
    for backbone, name in ((dino, "subject_consistency"), (clip, "background_consistency")):
        fa, fn = backbone.image_features(torch.stack([a, n]))
        s = max(0.0, cos(fa, fn))
        assert s < 0.95, "the noise frame must look different to the backbone"
        assert q["video"][name] == pytest.approx((1 + s + (s + 1) / 2 + 1) / 4, abs=1e-5)


def test_segments_and_switch_windows_see_only_their_frames(backbones):
    """Two segments of identical frames each, a different one across the switch: each
    segment is perfectly consistent, the window across the switch is not, by the formula."""
    clip, dino = backbones
    red, blue = colour_frames("red", 1)[0], colour_frames("blue", 1)[0]
    frames = torch.stack([red] * 4 + [blue] * 4)
    q = measure(frames, [(0, 4, "a red fox"), (4, 8, "the blue sea")], backbones, batch_size=3, fps=2)
    assert [s["subject_consistency"] for s in q["segments"]] == pytest.approx([1, 1], abs=1e-6)
    assert [s["temporal_flickering"] for s in q["segments"]] == [1.0, 1.0]
    (switch,) = q["switches"]
    assert (switch["frame"], switch["start_frame"], switch["end_frame"]) == (4, 2, 6)  # 1 s = 2 frames each side
    assert "clip_score" not in switch
    fr, fb = dino.image_features(torch.stack([red, blue]))
    s = max(0.0, cos(fr, fb))  # window R R B B: pairs (R,R)=1, (B vs first R, prev R)=s, (B: s, 1)
    assert switch["subject_consistency"] == pytest.approx((1 + s + (s + 1) / 2) / 3, abs=1e-5)
    m = float((red.double() - blue.double()).abs().mean())
    assert switch["temporal_flickering"] == pytest.approx(1 - m / 3 / 255, abs=1e-12)


def test_text_alignment_right_prompts_beat_shuffled_ones(backbones):
    clip, _ = backbones
    frames = torch.cat([colour_frames("red", 5, seed=1), colour_frames("blue", 7, seed=2)])
    right = measure(frames, [(0, 5, "a red fox"), (5, 12, "the blue sea")], backbones)
    shuffled = measure(frames, [(0, 5, "the blue sea"), (5, 12, "a red fox")], backbones)
    for r, s in zip(right["segments"], shuffled["segments"]):
        assert r["clip_score"] > 90 and s["clip_score"] < 10
    # the formula: mean over a segment's frames of 100 * max(0, <image, text>)
    text = clip.text_features(["a red fox"])[0]
    expected = float(np.mean([100 * max(0.0, cos(f, text)) for f in clip.image_features(frames[:5])]))
    assert right["segments"][0]["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert right["video"]["clip_score"] == pytest.approx(
        (5 * right["segments"][0]["clip_score"] + 7 * right["segments"][1]["clip_score"]) / 12, abs=1e-9)


def test_without_backbones_only_flicker_is_measured():
    frames = colour_frames("red", 3)
    q = measure(frames, [(0, 3, "a red fox")], (None, None))
    assert q["video"]["temporal_flickering"] is not None
    assert q["video"]["clip_score"] is q["video"]["subject_consistency"] is q["video"]["background_consistency"] is None
    assert q["backbones"] == {"clip": None, "dino": None}


def test_frames_stream_through_in_bounded_memory(backbones):
    """160 frames pass; Python-side memory holds about one batch of them, not the video."""
    frame_bytes = 64 * 64 * 3
    clip, dino = backbones
    meter = QualityMeter([(0, 80, "a red fox"), (80, 160, "the blue sea")], 16, clip=clip, dino=dino, batch_size=8)
    tracemalloc.start()
    try:
        count = sum(1 for _ in meter.observe(colour_frames("red", 1, seed=i)[0].numpy() for i in range(160)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == meter.result()["frames"] == 160
    assert peak < 40 * frame_bytes, f"peak {peak} bytes: frames are being kept"


def test_preprocessing_follows_the_folder_processor(folders, backbones, tmp_path):
    """Our torch preprocessing (on the metric device) vs transformers' own image processor,
    for a CLIP folder written by CLIPProcessor.save_pretrained too (processor_config.json
    under transformers 5, which must load as well)."""
    from memflow.quality.backbones import _image_processor  # AutoImageProcessor, as transformers allows

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 72), torch.linspace(0, 1, 48), indexing="ij")
    smooth = (torch.stack([yy, xx, yy * xx], -1) * 255).round().to(torch.uint8)[None]
    joint = save_tiny_clip(tmp_path / "clip-processor", processor=True)
    joint_clip = load_clip(joint)
    frame = colour_frames("red", 1)
    assert torch.allclose(joint_clip.image_features(frame), backbones[0].image_features(frame), atol=1e-5)
    assert joint_clip.text_features(["a red scene"]).shape == backbones[0].text_features(["a red scene"]).shape
    for folder, backbone in zip([*folders, joint], [*backbones, joint_clip]):
        reference = _image_processor(folder)(images=[smooth[0].numpy()], return_tensors="pt")
        ours = backbone.preprocess(smooth)
        assert ours.shape == reference["pixel_values"].shape == (1, 3, IMAGE, IMAGE)
        assert (ours - reference["pixel_values"]).abs().max() < 0.05


def test_backbones_load_from_a_url_once_into_the_cache(folders, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.put(str(folders[0]), "/models/clip", recursive=True)
    try:
        first = load_clip("memory://models/clip", cache_dir=tmp_path)
        fs.rm("/models/clip", recursive=True)  # gone remotely: the cached copy serves
        again = load_clip("memory://models/clip", cache_dir=tmp_path)
    finally:
        if fs.exists("/models"):
            fs.rm("/models", recursive=True)
    frame = colour_frames("blue", 1)
    assert torch.equal(first.image_features(frame), again.image_features(frame))
    assert again.source == "memory://models/clip"


def test_unusable_backbones_fail_naming_the_flag(folders, tmp_path):
    clip_dir, dino_dir = folders
    with pytest.raises(BackboneError, match="--clip-model .*no such folder"):
        load_clip(tmp_path / "missing")
    with pytest.raises(BackboneError, match="--clip-model .*not a CLIP-style model"):
        load_clip(dino_dir)
    with pytest.raises(BackboneError, match="--dino-model .*not a vision-only model"):
        load_dino(clip_dir)
    bare = tmp_path / "bare"
    shutil.copytree(dino_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(BackboneError, match="--dino-model .*no image processor that transformers can load"):
        load_dino(bare)
    with pytest.raises(BackboneError, match="--dino-model .*no config.json"):
        check_source(str(tmp_path / "missing"), "--dino-model")
    check_source(str(clip_dir), "--clip-model")


def test_records_without_quality_still_index():
    """Records committed before the metrics existed get null metric columns."""
    record = {"id": "old", "video": "videos/old.mp4", "video_url": "file:///x/videos/old.mp4", "num_frames": 9,
              "fps": 16, "width": 64, "height": 64, "seconds": 9 / 16, "seed": 0, "num_chunks": 1,
              "segments": [{"index": 0, "prompt": "p", "start_frame": 0, "end_frame": 9, "start_s": 0.0,
                            "end_s": 9 / 16}],
              "model": {"preset": "tiny", "weights": "random", "memory": "nam+sma", "fingerprint": "f"},
              "committed_at": "2026-01-01T00:00:00Z", "attempts": 1,
              "timings": {"generate_s": 1.0, "decode_encode_s": 0.1, "upload_s": 0.1, "generation_fps": 9.0,
                          "peak_kv_bytes": 1, "chunk_seconds": [1.0]},
              "replica": {"index": 0, "host": "h", "device": "cpu"}, "retrieval": {"bank_trace": []}}
    manifest, metrics = manifest_row(record), metrics_row(record)
    assert manifest["clip_score"] is None and manifest["segments"][0]["subject_consistency"] is None
    assert metrics["segment_quality"][0]["prompt"] == "p" and metrics["switch_quality"] == []


def test_regression_compares_a_metric_only_with_the_same_backbone():
    from jobs.compare import quality_values

    def record(clip, value):
        return {"quality": {"video": {"clip_score": value, "temporal_flickering": 0.5},
                            "backbones": {"clip": clip, "dino": None}}}

    assert quality_values(record("s3://m/clip-b32", 30.0), record("s3://m/clip-b32", 29.0), "clip_score") == \
        (30.0, 29.0, True)
    assert quality_values(record("s3://m/clip-b32", 30.0), record("s3://m/clip-l14", 29.0), "clip_score")[2] is False
    assert quality_values(record("s3://m/clip-b32", 30.0), record("s3://m/clip-l14", 29.0), "temporal_flickering")[2]
    assert quality_values(record(None, None), record("s3://m/clip-b32", 29.0), "clip_score") == (None, 29.0, False)
    assert quality_values({}, record(None, None), "temporal_flickering") == (None, 0.5, False)  # an older baseline


def test_a_failing_metric_never_costs_the_video(backbones):
    """A backbone that fails mid-video (a GPU out of memory, say; simulated, since it cannot
    be provoked on a CPU): every frame still reaches the encoder, the error is recorded."""
    clip, dino = backbones

    class FailsOnSecondBatch:
        device, source, calls = dino.device, "flaky", 0

        def image_features(self, frames):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA out of memory")
            return dino.image_features(frames)

    meter = QualityMeter([(0, 10, "a red fox")], 16, clip=clip, dino=FailsOnSecondBatch(), batch_size=4)
    frames = colour_frames("red", 10)
    assert len(list(meter.observe(f.numpy() for f in frames))) == 10
    q = meter.result()
    assert q["error"] == "RuntimeError: CUDA out of memory" and q["frames"] == 4
    assert all(v is None for v in q["video"].values()) and q["segments"] == []
