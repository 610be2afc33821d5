"""Drawing for the viewer: detections (box, label, score, track id), track trails, zones and lines
with their counts, and a small status panel.

Pure functions over a BGR image and parts of a `vapipe.detections/1.x` message, so they serve
windows, recordings and snapshots alike. Each class keeps one colour everywhere (a
fixed palette indexed by class id), so a person is the same colour in every window and run.
"""

from __future__ import annotations

import cv2
import numpy as np

# Ultralytics' palette (RGB hex): saturated and distinct on video; class id picks the entry.
_PALETTE_HEX = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
                "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")
PALETTE = tuple((int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)) for h in _PALETTE_HEX)  # BGR

FONT = cv2.FONT_HERSHEY_SIMPLEX
BOX_THICKNESS = 2


def class_color(class_id: int) -> tuple[int, int, int]:
    """The BGR colour of a class: stable across frames, cameras and runs."""
    return PALETTE[int(class_id) % len(PALETTE)]


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def label_for(detection: dict) -> str:
    text = f"{detection.get('label', detection.get('class_id', '?'))} {detection.get('score', 0):.2f}"
    track = detection.get("track_id")
    return f"#{track} {text}" if track is not None else text


def draw_detections(image: np.ndarray, detections: list[dict], scale: float = 1.0) -> np.ndarray:
    """Draw each detection's box (source pixels times `scale`) and label onto `image`, in place."""
    h, w = image.shape[:2]
    font_scale = max(0.35, min(0.6, w / 1400))
    for det in detections:
        color = class_color(det.get("class_id", 0))
        x1, y1, x2, y2 = (int(round(v * scale)) for v in det["box"])
        cv2.rectangle(image, (x1, y1), (x2, y2), color, BOX_THICKNESS, cv2.LINE_8)
        text = label_for(det)
        (tw, th), base = cv2.getTextSize(text, FONT, font_scale, 1)
        # the label sits on the box's top edge, inside the image (below the edge when the box touches the top)
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
        left = min(max(0, x1), max(0, w - tw - 4))
        cv2.rectangle(image, (left, top), (left + tw + 4, top + th + base + 2), color, cv2.FILLED)
        cv2.putText(image, text, (left + 2, top + th + 1), FONT, font_scale, _text_color(color), 1, cv2.LINE_AA)
    return image


def draw_status(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """A small translucent panel in the top-left corner with one line of text per entry, in place."""
    if not lines:
        return image
    font_scale = 0.45
    sizes = [cv2.getTextSize(line, FONT, font_scale, 1) for line in lines]
    line_h = max(th + base for (_tw, th), base in sizes) + 4
    width = max(tw for (tw, _th), _base in sizes) + 12
    height = line_h * len(lines) + 6
    width, height = min(width, image.shape[1]), min(height, image.shape[0])
    region = image[:height, :width]
    region[...] = (region * 0.45).astype(np.uint8)  # darken instead of a solid box: the video stays visible
    for i, line in enumerate(lines):
        y = 4 + line_h * (i + 1) - 6
        cv2.putText(image, line, (6, y), FONT, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def blank_canvas(source_w: int, source_h: int, width: int) -> tuple[np.ndarray, float]:
    """A dark canvas in the source's aspect ratio, for cameras that publish no preview frames."""
    scale = width / max(1, source_w)
    canvas = np.full((max(1, round(source_h * scale)), width, 3), 32, np.uint8)
    return canvas, scale


def track_color(track_id: int) -> tuple[int, int, int]:
    """A colour per track (trails), so two people of one class are told apart."""
    return PALETTE[(int(track_id) * 7) % len(PALETTE)]


def draw_trails(image: np.ndarray, trails: dict, scale: float = 1.0) -> np.ndarray:
    """Each track's recent bottom-centre points (source pixels), as a polyline fading to its newest point."""
    for track, points in trails.items():
        if len(points) < 2:
            continue
        color = track_color(track)
        pts = np.round(np.asarray(points, np.float64) * scale).astype(np.int32)
        for i in range(1, len(pts)):
            thickness = 1 if i < len(pts) // 2 else 2
            cv2.line(image, tuple(pts[i - 1]), tuple(pts[i]), color, thickness, cv2.LINE_AA)
        cv2.circle(image, tuple(pts[-1]), 3, color, cv2.FILLED, cv2.LINE_AA)
    return image


ZONE_COLOR = (255, 200, 0)  # BGR: cyan-blue
LINE_COLOR = (0, 255, 255)  # BGR: yellow


def _tag(image: np.ndarray, text: str, org: tuple[int, int], color) -> None:
    (tw, th), base = cv2.getTextSize(text, FONT, 0.45, 1)
    x = min(max(0, org[0]), max(0, image.shape[1] - tw - 4))
    y = min(max(th + base + 2, org[1]), image.shape[0] - 1)
    cv2.rectangle(image, (x, y - th - base - 2), (x + tw + 4, y), color, cv2.FILLED)
    cv2.putText(image, text, (x + 2, y - base - 1), FONT, 0.45, _text_color(color), 1, cv2.LINE_AA)


def _counts(counts: dict) -> str:
    return " ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "0"


def draw_analytics(image: np.ndarray, analytics: dict | None, scale: float = 1.0) -> np.ndarray:
    """Zones (translucent polygons with their occupancy) and counting lines (with an arrow for the `in`
    side and the counts), from a message's `analytics`, in place."""
    if not analytics:
        return image
    tags = []  # drawn after every shape, so no line crosses a label
    for name, zone in analytics.get("zones", {}).items():
        polygon = np.round(np.asarray(zone["polygon"], np.float64) * scale).astype(np.int32)
        overlay = image.copy()
        cv2.fillPoly(overlay, [polygon], ZONE_COLOR)
        cv2.addWeighted(overlay, 0.2, image, 0.8, 0, dst=image)
        cv2.polylines(image, [polygon], True, ZONE_COLOR, 2, cv2.LINE_AA)
        corner = polygon[np.lexsort((polygon[:, 0], polygon[:, 1]))[0]]  # top-left-most vertex
        tags.append((f"{name}: {_counts(zone.get('occupancy', {}))}", (int(corner[0]) + 4, int(corner[1]) - 3), ZONE_COLOR))
    for name, line in analytics.get("lines", {}).items():
        a, b = (np.asarray(p, np.float64) * scale for p in line["points"])
        cv2.line(image, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), LINE_COLOR, 2, cv2.LINE_AA)
        # the arrow points to the side a crossing into counts as "in" (right of a->b, y down)
        direction = b - a
        normal = np.array([-direction[1], direction[0]]) / max(np.hypot(*direction), 1e-6)
        middle = (a + b) / 2
        cv2.arrowedLine(image, tuple(np.round(middle).astype(int)), tuple(np.round(middle + 25 * normal).astype(int)),
                        LINE_COLOR, 2, cv2.LINE_AA, tipLength=0.35)
        top = a if a[1] <= b[1] else b  # the label sits above the line's upper end
        tags.append((f"{name}  in {_counts(line.get('in', {}))}  out {_counts(line.get('out', {}))}",
                     (int(top[0]) - 30, int(top[1]) - 4), LINE_COLOR))
    for text, org, color in tags:
        _tag(image, text, org, color)
    return image
