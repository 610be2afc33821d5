"""Analytics on tracks: polygon zones and counting lines, per camera, in source pixels.

Like the tracker, a function of its inputs: `Analytics.update(detections_with_track_ids, ended_ids)`
returns this frame's counts (published with the detections) and its events (published on
`events/<camera>/`). Each tracked box is reduced to one anchor point (its bottom centre by default:
where a person stands). Untracked detections are ignored: without an id nothing can enter, leave or
cross.

- A **line** from `a` to `b` counts a crossing when a track's anchor goes from one side of the line
  to the other through the segment itself. Points on the line belong to neither side, so touching
  it and going back counts nothing, and walking round an end of the segment counts nothing.
  Direction `in` is from the left of a->b to its right as seen in the image (for a line drawn left
  to right: moving down the image), `out` the other way; crossing back counts once each way.
- A **zone** reports its occupancy per class each frame, and `enter` / `leave` events per track: a
  track born inside enters; a track that ends inside (the tracker gave it up) leaves.
"""

from __future__ import annotations

import numpy as np

from pipeline.record import Detections


def anchors(xyxy: np.ndarray, anchor: str) -> np.ndarray:
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    x = (xyxy[:, 0] + xyxy[:, 2]) / 2
    y = xyxy[:, 3] if anchor == "bottom_center" else (xyxy[:, 1] + xyxy[:, 3]) / 2
    return np.stack((x, y), axis=1)


def _cross(o: np.ndarray, a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """z of (a - o) x (p - o) for each point p [n, 2]: > 0 right of o->a in image coordinates (y down)."""
    return (a[0] - o[0]) * (p[..., 1] - o[1]) - (a[1] - o[1]) * (p[..., 0] - o[0])


def segments_intersect(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether segment p-q meets segment a-b (touching counts)."""
    d1, d2 = _cross(a, b, p), _cross(a, b, q)
    d3, d4 = _cross(p, q, a), _cross(p, q, b)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True

    def on(o, e, r, d):  # r collinear with o-e and within its bounding box
        return d == 0 and min(o[0], e[0]) <= r[0] <= max(o[0], e[0]) and min(o[1], e[1]) <= r[1] <= max(o[1], e[1])

    return on(a, b, p, d1) or on(a, b, q, d2) or on(p, q, a, d3) or on(p, q, b, d4)


def inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule for each point [n, 2] in the polygon [v, 2] (points on an edge may go either way)."""
    if not len(points):
        return np.zeros(0, bool)
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return (np.count_nonzero(straddles & (x < x_at), axis=1) % 2) == 1


def _bump(counts: dict, key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class LineCounter:
    def __init__(self, name: str, points, classes=None, anchor: str = "bottom_center"):
        self.name, self.anchor = name, anchor
        self.a, self.b = (np.asarray(p, np.float64) for p in points)
        self.classes = None if classes is None else set(int(c) for c in classes)
        self.sides: dict[int, tuple[int, np.ndarray]] = {}  # track id -> (last side not on the line, last point)
        self.counts = {"in": {}, "out": {}}  # direction -> label -> crossings since start

    def update(self, ids, class_ids, points, labels) -> list[dict]:
        events = []
        sides = np.sign(_cross(self.a, self.b, points)).astype(int)
        for track, class_id, side, point in zip(ids, class_ids, sides.tolist(), points):
            if self.classes is not None and class_id not in self.classes:
                continue
            last_side, last_point = self.sides.get(track, (0, None))
            if side and last_side and side != last_side and segments_intersect(last_point, point, self.a, self.b):
                direction = "in" if side > 0 else "out"
                label = labels(class_id)
                _bump(self.counts[direction], label)
                events.append({"type": "line_crossed", "line": self.name, "direction": direction, "track_id": track,
                               "class_id": class_id, "label": label, "point": [round(float(v), 1) for v in point]})
            # on the line: keep the side it came from, and the point (the path from there is what crosses)
            self.sides[track] = (side or last_side, point)
        return events

    def forget(self, track: int) -> None:
        self.sides.pop(track, None)

    def summary(self) -> dict:
        return {"points": [self.a.tolist(), self.b.tolist()], "in": dict(self.counts["in"]),
                "out": dict(self.counts["out"])}


class ZoneCounter:
    def __init__(self, name: str, polygon, classes=None, anchor: str = "bottom_center"):
        self.name, self.anchor = name, anchor
        self.polygon = np.asarray(polygon, np.float64)
        self.classes = None if classes is None else set(int(c) for c in classes)
        self.inside: dict[int, tuple[int, str]] = {}  # track id -> (class id, label) of tracks inside
        self.occupancy: dict[str, int] = {}
        self.entered: dict[str, int] = {}
        self.left: dict[str, int] = {}

    def _event(self, kind: str, track: int, class_id: int, label: str, point=None) -> dict:
        event = {"type": kind, "zone": self.name, "track_id": track, "class_id": class_id, "label": label}
        if point is not None:
            event["point"] = [round(float(v), 1) for v in point]
        return event

    def update(self, ids, class_ids, points, labels) -> list[dict]:
        events = []
        inside = inside_polygon(points, self.polygon)
        occupancy: dict[str, int] = {}
        for track, class_id, now_in, point in zip(ids, class_ids, inside.tolist(), points):
            if self.classes is not None and class_id not in self.classes:
                continue
            was_in = track in self.inside
            if now_in:
                label = labels(class_id)
                _bump(occupancy, label)
                if not was_in:
                    self.inside[track] = (class_id, label)
                    _bump(self.entered, label)
                    events.append(self._event("zone_entered", track, class_id, label, point))
            elif was_in:
                class_id, label = self.inside.pop(track)
                _bump(self.left, label)
                events.append(self._event("zone_left", track, class_id, label, point))
        self.occupancy = occupancy
        return events

    def forget(self, track: int) -> list[dict]:
        if track not in self.inside:
            return []
        class_id, label = self.inside.pop(track)
        _bump(self.left, label)
        return [self._event("zone_left", track, class_id, label)]

    def summary(self) -> dict:
        return {"polygon": self.polygon.tolist(), "occupancy": dict(self.occupancy), "entered": dict(self.entered),
                "left": dict(self.left)}


class Analytics:
    """One camera's zones and lines."""

    def __init__(self, zones=(), lines=(), labels: list[str] | None = None):
        """`zones` / `lines`: `pipeline.config.ZoneConfig` / `LineConfig` (or objects with the same fields)."""
        self.labels = list(labels or [])
        self.zones = [ZoneCounter(z.name, z.polygon, z.classes, z.anchor) for z in zones]
        self.lines = [LineCounter(l.name, l.points, l.classes, l.anchor) for l in lines]

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else str(class_id)

    def update(self, detections: Detections, ended_ids=()) -> tuple[dict, list[dict]]:
        """Counts after this frame, and its events. `ended_ids`: tracks the tracker gave up on."""
        events: list[dict] = []
        ids = detections.track_ids
        tracked = np.zeros(len(detections), bool) if ids is None else ids >= 0
        track_ids = ids[tracked].tolist() if ids is not None else []
        class_ids = np.asarray(detections.class_ids)[tracked].tolist()
        boxes = np.asarray(detections.xyxy)[tracked]
        for counter in (*self.zones, *self.lines):
            events += counter.update(track_ids, class_ids, anchors(boxes, counter.anchor), self.label)
        for track in ended_ids:
            for zone in self.zones:
                events += zone.forget(track)
            for line in self.lines:
                line.forget(track)
        summary = {}
        if self.zones:
            summary["zones"] = {z.name: z.summary() for z in self.zones}
        if self.lines:
            summary["lines"] = {l.name: l.summary() for l in self.lines}
        return summary, events
