"""The viewer's tracking drawings: trails kept per track from `track_id`s, zones and lines with their
counts drawn where the message's `analytics` says, counts in the status panel."""

from __future__ import annotations

import numpy as np

from viewer.annotate import LINE_COLOR, ZONE_COLOR, draw_analytics, draw_trails, track_color
from viewer.stream import TRAIL_FORGET_FRAMES, CameraStream, count_lines

ANALYTICS = {
    "lines": {"door": {"points": [[100.0, 50.0], [100.0, 150.0]], "in": {"person": 2}, "out": {}}},
    "zones": {"desk": {"polygon": [[150.0, 100.0], [190.0, 100.0], [190.0, 140.0], [150.0, 140.0]],
                       "occupancy": {"person": 1}, "entered": {"person": 3}, "left": {"person": 2}}},
}


def message(frame: int, detections: list[dict]) -> dict:
    return {"type": "detections", "camera": "c", "seq": frame, "frame": frame, "detections": detections}


def test_trails_follow_track_ids_and_are_forgotten():
    stream = CameraStream("c")
    for f in range(5):
        stream.on_detections(message(f, [{"class_id": 0, "box": [10 + f, 0, 20 + f, 50], "track_id": 7},
                                         {"class_id": 0, "box": [60, 0, 70, 50]}]))  # untracked: no trail
    trails = stream.trails_at(4)
    assert list(trails) == [7]
    assert trails[7] == [(15.0 + f, 50.0) for f in range(5)]  # bottom centres, oldest first
    stream.on_detections(message(5 + TRAIL_FORGET_FRAMES, []))
    assert stream.trails == {}


def test_count_lines_for_the_status_panel():
    assert count_lines(ANALYTICS) == ["line door: in person 2 | out 0", "zone desk: now person 1 | entered person 3"]
    assert count_lines(None) == []


def test_zones_lines_and_trails_are_drawn_where_the_message_says():
    image = np.zeros((200, 300, 3), np.uint8)
    draw_analytics(image, ANALYTICS, scale=1.0)
    assert tuple(image[100, 100]) == LINE_COLOR  # on the line
    assert tuple(image[120, 150]) == ZONE_COLOR  # on the zone's edge
    inside = image[125, 175].astype(int)
    assert 0 < inside[0] < 255 and inside[2] == 0  # translucent fill
    assert not image[10:40, 250:].any()  # nothing far from them
    image = np.zeros((200, 300, 3), np.uint8)
    draw_trails(image, {3: [(20.0, 20.0), (60.0, 20.0), (100.0, 20.0)]}, scale=0.5)
    assert tuple(image[10, 20]) == track_color(3)  # scaled: the trail from (10, 10) to (50, 10)
    assert not image[100:].any()
