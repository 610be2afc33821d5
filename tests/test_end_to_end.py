"""The main job as a user runs it: the CLI on the demo clip, a real ZeroMQ subscriber, and the
detections checked against a plain per-frame implementation of the same model (with the
default rectangle letterbox; tests/test_rect_letterbox.py compares it with the square one)."""

import pytest

from conftest import MODEL, PERSON_CLIP, make_config, run_and_collect
from reference import ReferenceDetector, read_frames, unmatched

CLIP_FRAMES = 1394  # one-by-one-person-detection.mp4
PERSON = 0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, assets_present_module):
    tmp = tmp_path_factory.mktemp("e2e")
    path, config = make_config(tmp, [{"id": "cam1", "url": str(PERSON_CLIP)}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 20})
    return run_and_collect(path, config["publish"]["bind"], b"det/cam1/", "--summary-json", str(tmp / "summary.json"))


@pytest.fixture(scope="module")
def assets_present_module():
    if not MODEL.is_file() or not PERSON_CLIP.is_file():
        pytest.fail("test assets missing (set ASSETS_DIR)")


def test_every_frame_arrives_in_order(demo_run):
    returncode, messages, err = demo_run
    assert returncode == 0, err
    assert messages[-1][1]["type"] == "end" and messages[-1][1]["reason"] == "eof"  # read to its end
    assert "frames the file declares" not in err  # a sound file: nothing missing, no warning
    detections = [m for t, m in messages if m["type"] == "detections"]
    assert all(t == b"det/cam1/" for t, _ in messages)
    assert [m["frame"] for m in detections] == list(range(CLIP_FRAMES))
    assert [m["seq"] for m in detections] == list(range(CLIP_FRAMES))
    first = detections[0]
    assert first["schema"] == "vapipe.detections/1.2" and first["camera"] == "cam1"
    assert all("track_id" not in d for m in detections for d in m["detections"])  # tracking is off by default
    assert "analytics" not in first and "track" not in first["latency_ms"]
    assert (first["width"], first["height"]) == (768, 432)
    assert set(first["latency_ms"]) >= {"source", "batch", "letterbox", "infer", "postprocess", "publish", "total"}
    pts = [m["pts"] for m in detections]
    assert all(b > a for a, b in zip(pts, pts[1:]))


def test_people_walking_through_are_detected_in_source_pixels(demo_run):
    _, messages, _ = demo_run
    detections = [m for _, m in messages if m["type"] == "detections"]
    with_person = [m for m in detections if any(d["label"] == "person" and d["score"] > 0.5 for d in m["detections"])]
    # people walk through for most of the clip, one by one, with empty scenes between them
    assert 0.3 * CLIP_FRAMES < len(with_person) < CLIP_FRAMES
    for m in with_person:
        for d in m["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 432
    # a standing person is taller than wide, in source pixels (the letterbox did not squash it)
    tall = [d for m in with_person for d in m["detections"] if d["label"] == "person" and d["score"] > 0.7]
    assert sum((d["box"][3] - d["box"][1]) > (d["box"][2] - d["box"][0]) for d in tall) > 0.9 * len(tall)


def test_detections_equal_a_plain_per_frame_implementation(demo_run):
    _, messages, _ = demo_run
    by_frame = {m["frame"]: m for _, m in messages if m["type"] == "detections"}
    sample = set(range(0, CLIP_FRAMES, 23))
    frames = read_frames(PERSON_CLIP, sample)
    reference = ReferenceDetector(MODEL, conf=0.3, iou=0.45, rect=True)  # the default letterbox: rect
    compared_boxes = 0
    for index in sorted(sample):
        expected = reference(frames[index])
        problems = unmatched(expected, by_frame[index]["detections"], min_iou=0.9, score_tol=0.01, conf=0.3)
        assert not problems, f"frame {index}: {problems}"
        compared_boxes += len(expected)
    assert compared_boxes > 20  # the sample really compared detections, not empty frames
