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


@pytest.mark.parametrize("data, expected", [
    ({"prompts": ["a"], "fps": "16"}, "fps: Input should be a valid integer, got str '16'"),
    ({"prompts": ["a"], "fps": 16.0}, "fps: Input should be a valid integer, got float 16.0"),
    ({"segments": [{"prompt": "a", "seconds": True}]}, "segments.0.seconds: Input should be a valid number, got bool"),
    ({"segments": [{"prompt": "a", "seconds": "5"}]}, "segments.0.seconds: Input should be a valid number, got str"),
    ({"prompts": ["a"], "seed": 1.0}, "seed: Input should be a valid integer, got float"),
    ({"prompts": ["a"], "seed": "7"}, "seed: Input should be a valid integer, got str"),
    ({"prompts": ["a"], "resolution": ["64", 64]}, "resolution.0: Input should be a valid integer, got str"),
    ({"prompts": [7]}, "segments.0.prompt: Input should be a valid string, got int"),
    ({"id": 12, "prompts": ["a"]}, "id: Input should be a valid string, got int"),
])
def test_no_type_coercion(data, expected):
    with pytest.raises(ScriptError) as err:
        parse_script(data)
    assert expected in str(err.value)


def test_int_seconds_are_numbers():
    assert parse_script({"segments": [{"prompt": "a", "seconds": 2}]}).segments[0].seconds == 2.0


@pytest.mark.parametrize("text, field", [
    ('{"prompts": ["a fox \\ud83e"]}', "segments.0.prompt"),  # high surrogate without its pair
    ('{"segments": [{"prompt": "\\udc00 fog", "seconds": 2}]}', "segments.0.prompt"),
    ('{"id": "clip-\\ud800", "prompts": ["a fox"]}', "id"),
])
def test_lone_surrogates_are_not_text(text, field):
    with pytest.raises(ScriptError) as err:
        parse_script(text)
    assert f"{field}: " in str(err.value) and "not valid Unicode text: lone surrogate" in str(err.value)
    str(err.value).encode("utf-8")  # the message itself can be logged
    assert parse_script('{"prompts": ["a fox \\ud83e\\udd8a"]}').segments[0].prompt == "a fox 🦊"  # a pair is fine


def test_limits_reject_what_could_never_finish():
    from memflow.config import PRESETS
    from memflow.script import Limits

    tiny = Limits.for_preset(PRESETS["tiny"])
    cases = [
        ({"segments": [{"prompt": "a", "seconds": 1e9}]}, "seconds: the segments add up to 1e+09 s, above this "
                                                          "job's limit of 600 s"),
        ({"prompts": ["a"] * 61}, "seconds: the segments add up to 610 s"),
        ({"prompts": ["a"], "resolution": [2**70, 16]}, "resolution: 1180591620717411303424x16"),
        ({"prompts": ["a"], "resolution": [480, 832]}, "above this job's limit of 16384 (4x the tiny preset's 64x64)"),
        ({"prompts": ["a"], "fps": 100}, "fps: 100 is above this job's limit of 60"),
    ]
    for data, expected in cases:
        with pytest.raises(ScriptError) as err:
            parse_script(data, tiny)
        assert expected in str(err.value)
    assert parse_script({"prompts": ["a"], "resolution": [128, 128]}, tiny).resolution == (128, 128)
    assert parse_script({"prompts": ["a"], "resolution": [480, 832]}).resolution == (480, 832)  # default limits
    roomy = Limits.for_preset(PRESETS["tiny"], max_seconds=3600, max_pixels=480 * 832, max_fps=None)
    assert parse_script({"prompts": ["a"] * 61, "resolution": [480, 832]}, roomy).plan().num_chunks > 0
    assert roomy.max_fps == 60
