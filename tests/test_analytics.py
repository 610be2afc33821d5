"""Zones and lines on scripted tracks: exact counts and directions, touches that are not crossings,
crossing back, going round the end of a line, tracks born inside and tracks that end inside."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analytics import Analytics, inside_polygon, segments_intersect
from pipeline.config import LineConfig, ZoneConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.record import Detections

LABELS = ["person", "bicycle", "car"]
# a horizontal line from (100, 200) to (300, 200): "in" is downward (left of a->b to its right, y down)
LINE = LineConfig(name="door", points=[(100, 200), (300, 200)])


def feet(*tracks) -> Detections:
    """tracks: (track_id, x, y[, class_id]): a 20x40 box whose bottom centre is (x, y)."""
    rows = [t if len(t) == 4 else (*t, 0) for t in tracks]
    boxes = np.array([(x - 10, y - 40, x + 10, y) for _i, x, y, _c in rows], np.float32).reshape(-1, 4)
    return Detections(boxes, np.full(len(rows), 0.9, np.float32), np.array([r[3] for r in rows], np.int32),
                      np.array([r[0] for r in rows], np.int64), np.zeros(len(rows), np.float32))


def play(analytics: Analytics, frames, ended=None):
    """frames: list of lists of (track_id, x, y[, cls]); returns (last summary, all events)."""
    events, summary = [], None
    for i, tracks in enumerate(frames):
        summary, new = analytics.update(feet(*tracks), (ended or {}).get(i, ()))
        events += new
    return summary, events


def path(track, points, cls=0):
    return [[(track, x, y, cls)] for x, y in points]


def crossings(events):
    return [(e["track_id"], e["direction"], e["label"]) for e in events if e["type"] == "line_crossed"]


def test_line_counts_exact_directions():
    down = path(1, [(150, 150), (150, 190), (150, 210), (150, 260)])
    up = path(2, [(250, 260), (250, 230), (250, 170)])
    summary, events = play(Analytics(lines=[LINE], labels=LABELS), down + up)
    assert crossings(events) == [(1, "in", "person"), (2, "out", "person")]
    assert summary["lines"]["door"]["in"] == {"person": 1} and summary["lines"]["door"]["out"] == {"person": 1}
    assert summary["lines"]["door"]["points"] == [[100.0, 200.0], [300.0, 200.0]]


def test_touching_the_line_without_crossing_counts_nothing():
    touch = path(1, [(150, 150), (150, 190), (150, 200), (150, 200), (150, 180), (150, 120)])
    summary, events = play(Analytics(lines=[LINE], labels=LABELS), touch)
    assert crossings(events) == []
    assert summary["lines"]["door"]["in"] == {} and summary["lines"]["door"]["out"] == {}


def test_stepping_onto_the_line_then_over_counts_once():
    over = path(1, [(150, 150), (150, 200), (150, 200), (150, 230)])
    _, events = play(Analytics(lines=[LINE], labels=LABELS), over)
    assert crossings(events) == [(1, "in", "person")]


def test_crossing_back_counts_each_way():
    back = path(1, [(150, 150), (150, 250), (150, 150), (150, 250)])
    summary, events = play(Analytics(lines=[LINE], labels=LABELS), back)
    assert crossings(events) == [(1, "in", "person"), (1, "out", "person"), (1, "in", "person")]
    assert summary["lines"]["door"]["in"] == {"person": 2} and summary["lines"]["door"]["out"] == {"person": 1}


def test_going_round_the_end_of_the_line_is_not_a_crossing():
    around = path(1, [(50, 150), (50, 250), (200, 260)])  # passes left of the segment's end at x=100
    _, events = play(Analytics(lines=[LINE], labels=LABELS), around)
    assert crossings(events) == []


def test_per_class_counts_class_filter_and_untracked_boxes():
    line = LineConfig(name="door", points=[(100, 200), (300, 200)], classes=[0, 2])
    frames = [[(1, 150, 150, 0), (2, 200, 150, 2), (3, 250, 150, 1), (-1, 120, 150, 0)],
              [(1, 150, 250, 0), (2, 200, 250, 2), (3, 250, 250, 1), (-1, 120, 250, 0)]]
    summary, events = play(Analytics(lines=[line], labels=LABELS), frames)
    assert sorted(crossings(events)) == [(1, "in", "person"), (2, "in", "car")]  # bicycle filtered, -1 untracked
    assert summary["lines"]["door"]["in"] == {"person": 1, "car": 1}


def test_a_track_that_disappears_and_returns_on_the_other_side_crosses():
    frames = path(1, [(150, 150)]) + [[]] * 3 + path(1, [(150, 260)])
    _, events = play(Analytics(lines=[LINE], labels=LABELS), frames)
    assert crossings(events) == [(1, "in", "person")]


def test_zone_occupancy_enter_and_leave():
    zone = ZoneConfig(name="desk", polygon=[(0, 0), (100, 0), (100, 100), (0, 100)])
    frames = [
        [(1, 50, 50), (2, 150, 50)],            # 1 born inside: enters
        [(1, 55, 50), (2, 90, 50), (3, 20, 20, 2)],  # 2 walks in; a car appears inside
        [(1, 150, 50), (2, 90, 50), (3, 20, 20, 2)],  # 1 walks out
        [(2, 90, 50)],                          # 3 gone from view (not yet ended: still counted as inside)
        [(2, 90, 50)],                          # the tracker ends 3: it leaves
    ]
    analytics = Analytics(zones=[zone], labels=LABELS)
    occupancy, events = [], []
    for i, tracks in enumerate(frames):
        summary, new = analytics.update(feet(*tracks), [3] if i == 4 else [])
        occupancy.append(summary["zones"]["desk"]["occupancy"])
        events += [(e["type"], e["track_id"], e["label"]) for e in new]
    assert occupancy == [{"person": 1}, {"person": 2, "car": 1}, {"person": 1, "car": 1}, {"person": 1},
                         {"person": 1}]
    assert events == [("zone_entered", 1, "person"), ("zone_entered", 2, "person"), ("zone_entered", 3, "car"),
                      ("zone_left", 1, "person"), ("zone_left", 3, "car")]
    assert summary["zones"]["desk"]["entered"] == {"person": 2, "car": 1}
    assert summary["zones"]["desk"]["left"] == {"person": 1, "car": 1}


def test_geometry_helpers():
    square = np.array([(0, 0), (10, 0), (10, 10), (0, 10)], np.float64)
    assert inside_polygon(np.array([(5, 5), (15, 5), (-1, 5), (5, 11)], np.float64), square).tolist() == \
        [True, False, False, False]
    p = np.array
    assert segments_intersect(p([0, -1]), p([0, 1]), p([-1, 0]), p([1, 0]))
    assert segments_intersect(p([0, 0]), p([0, 1]), p([-1, 0]), p([1, 0]))  # touching counts
    assert not segments_intersect(p([2, -1]), p([2, 1]), p([-1, 0]), p([1, 0]))


BASE = {"cameras": [{"id": "a", "url": "a.mp4"}], "model": {"path": "m.onnx", "preset": "yolox"}}


@pytest.mark.parametrize("camera,tracking,message", [
    ({"lines": [{"name": "l", "points": [[0, 0], [1, 1]]}]}, {}, "cameras[0].lines: needs tracking"),
    ({"zones": [{"name": "z", "polygon": [[0, 0], [1, 1]]}]}, {"enabled": True},
     "cameras[0].zones[0].polygon: List should have at least 3 items"),
    ({"lines": [{"name": "l", "points": [[5, 5], [5, 5]]}]}, {"enabled": True},
     "cameras[0].lines[0].points: Value error, the two points of a line must differ"),
    ({"lines": [{"name": "l", "points": [[0, 0], [-1, 5]]}]}, {"enabled": True},
     "cameras[0].lines[0].points[1][0]: Input should be greater than or equal to 0"),
    ({"lines": [{"name": "x", "points": [[0, 0], [1, 5]]}], "zones": [{"name": "x", "polygon": [[0, 0], [9, 0], [0, 9]]}]},
     {"enabled": True}, "cameras[0]: zone/line name 'x' is used twice"),
    ({"lines": [{"name": "l", "point": [[0, 0], [1, 5]]}]}, {"enabled": True}, "cameras[0].lines[0].points: required key is missing"),
])
def test_bad_zone_or_line_config_is_one_line_naming_the_key(camera, tracking, message):
    data = {**BASE, "cameras": [{**BASE["cameras"][0], **camera}], "tracking": tracking}
    with pytest.raises(ConfigError) as error:
        parse_config(data, "x.yaml")
    assert message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_zones_and_lines_with_tracking_on_one_camera_only():
    data = {"cameras": [{"id": "a", "url": "a.mp4", "tracking": {"enabled": True},
                         "lines": [{"name": "l", "points": [[0, 0], [100, 0]]}]}, {"id": "b", "url": "b.mp4"}],
            "model": BASE["model"]}
    config = parse_config(data, "x.yaml")
    assert config.tracking_for(config.cameras[0]).enabled and not config.tracking_for(config.cameras[1]).enabled


def test_the_tracking_example_config_loads():
    from pathlib import Path

    from pipeline.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "tracking.yaml")
    camera = config.cameras[0]
    assert config.tracking_for(camera).enabled and camera.lines[0].name == "entrance" and camera.zones[0].name == "table"
