"""Records of committed videos made up for dataset tests and the scale benchmark: the shape
the replicas write (cluster/replica.py build_record), no rendering."""
from __future__ import annotations

from memflow.script import Script, content_hash


def synthetic_record(video_id: str, segments: int = 2, chunks: int = 20) -> dict:
    prompts = [f"{video_id}: scene {i}" for i in range(segments)]
    frames = 1 + 4 * (3 * chunks - 1)
    bounds = [round(i * frames / segments) for i in range(segments + 1)]
    script = {"id": video_id, "segments": [{"prompt": p, "seconds": 5.0} for p in prompts], "seed": 0,
              "prompts": None, "resolution": None, "fps": 16}
    return {
        "id": video_id, "video": f"videos/{video_id}.mp4", "video_url": f"s3://bucket/out/videos/{video_id}.mp4",
        "script": script, "script_sha256": content_hash(Script.model_validate(script)),  # as the driver hashes lines
        "seed": 0, "fps": 16, "width": 64, "height": 64, "num_frames": frames, "seconds": frames / 16,
        "num_chunks": chunks, "encoding": {"codec": "h264", "crf": 18},
        "segments": [{"index": i, "prompt": p, "start_frame": bounds[i], "end_frame": bounds[i + 1],
                      "start_s": bounds[i] / 16, "end_s": bounds[i + 1] / 16} for i, p in enumerate(prompts)],
        "model": {"preset": "tiny", "weights": "random", "memory": "nam", "fidelity": "reference",
                  "fingerprint": "0" * 16},
        "timings": {"generate_s": 1.0, "decode_encode_s": 0.1, "generate_wall_s": 1.2, "upload_s": 0.05,
                    "chunk_seconds": [0.05] * chunks, "generation_fps": 200.0, "peak_kv_bytes": 1 << 20},
        "replica": {"index": 0, "host": "h", "node_id": "n", "actor_id": "a", "device": "cpu"},
        "attempts": 1, "retrieval": {"bank_trace": [], "sma_trace": [], "service": None},
        "quality": None, "story": {"root": video_id, "parent": None, "fork_chunk": None, "prefix": None,
                                   "chunks": {"shared": 0, "replayed": 0, "generated": chunks}},
        "committed_at": "2026-12-01T00:00:00Z",
    }
