"""The script schema: field-named errors, switch points, frame ranges, stable ids."""
import pytest

from memflow.script import ScriptError, parse_script


@pytest.mark.parametrize("data, field", [
    ({"segments": []}, "segments"),
    ({}, "segments"),
    ({"segments": [{"prompt": "  ", "seconds": 2}]}, "segments.0.prompt"),
    ({"segments": [{"prompt": "a", "seconds": 0}]}, "segments.0.seconds"),
    ({"segments": [{"prompt": "a", "seconds": 2}, {"prompt": "b", "seconds": -1}]}, "segments.1.seconds"),
    ({"prompts": ["a"], "resolution": [480, 830]}, "resolution"),
    ({"prompts": ["a"], "colour": "red"}, "colour"),
    ({"segments": [{"prompt": "a", "seconds": 2, "mood": "x"}]}, "segments.0.mood"),
    ({"prompts": ["a"], "segments": [{"prompt": "a", "seconds": 2}]}, "not both"),
    ({"segments": [{"prompt": "a", "seconds": 2}, {"prompt": "b", "seconds": 0.25}]}, "segments[1].seconds"),
    ({"prompts": ["a"], "seed": -1}, "seed"),
])
def test_bad_scripts_name_the_field(data, field):
    with pytest.raises(ScriptError) as err:
        parse_script(data)
    assert field in str(err.value)


def test_benchmark_form_switch_points():
    plan = parse_script({"prompts": [f"p{i}" for i in range(6)]}).plan()
    assert plan.num_latent_frames == 240 and plan.num_chunks == 80
    # switches at latent frames 40, 80, ... take effect at the next chunk start
    assert [s.start_frame for s in plan.segments] == [0, 42, 81, 120, 162, 201]
    assert plan.num_video_frames == 957
    assert plan.segments[0].video_start == 0 and plan.segments[-1].video_end == 957
    for a, b in zip(plan.segments, plan.segments[1:]):
        assert a.video_end == b.video_start and a.end_chunk == b.start_chunk


def test_switch_points_are_per_script():
    a = parse_script({"segments": [{"prompt": "x", "seconds": 3}, {"prompt": "y", "seconds": 5}]}).plan()
    b = parse_script({"segments": [{"prompt": "x", "seconds": 5}, {"prompt": "y", "seconds": 3}]}).plan()
    assert a.switch_chunks == [4] and b.switch_chunks == [7]
    assert a.num_chunks == b.num_chunks == 11


def test_ids_are_stable_and_safe():
    s = {"prompts": ["a cat"], "seed": 3}
    assert parse_script(s).video_id == parse_script(dict(s)).video_id
    assert parse_script(s).video_id != parse_script({**s, "seed": 4}).video_id
    for hostile in ["../../etc/passwd", "/abs/path", "a\\b", "..", "ünï cøde", "x" * 400]:
        vid = parse_script({**s, "id": hostile}).video_id
        assert "/" not in vid and "\\" not in vid and not vid.startswith(".") and 0 < len(vid) <= 120
    assert parse_script({**s, "id": "../a"}).video_id != parse_script({**s, "id": "._a"}).video_id
    assert parse_script({**s, "id": "clean-id_1.v2"}).video_id == "clean-id_1.v2"


def test_short_segments_get_a_chunk_each_as_in_the_reference():
    """Switches at latent frames 24, 25, 26 (fps 4: one latent frame a second): the reference
    switches at chunks 8, 9 and 10 (one switch per chunk, each at the first chunk at or after
    its frame that no earlier switch took)."""
    plan = parse_script({"fps": 4, "segments": [{"prompt": "a", "seconds": 24}, {"prompt": "b", "seconds": 1},
                                                {"prompt": "c", "seconds": 1}, {"prompt": "d", "seconds": 25}]}).plan()
    assert plan.switch_chunks == [8, 9, 10] and plan.num_chunks == 17
    with pytest.raises(ScriptError, match=r"segments\[2\].seconds: no chunk is left"):
        parse_script({"fps": 4, "segments": [{"prompt": "a", "seconds": 1}, {"prompt": "b", "seconds": 1},
                                             {"prompt": "c", "seconds": 1}]})
