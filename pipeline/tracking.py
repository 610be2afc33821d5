"""ByteTrack for one camera: `update(detections, timestamp)` returns the same detections with track ids.

The track stage (stages/track.py) keeps one `ByteTracker` per camera; this module knows nothing of
frames, queues or video, so it is tested on scripted sequences. The algorithm is ByteTrack's (Zhang
et al. 2022, as in its reference code and Ultralytics' `BYTETracker`):

1. every track's Kalman filter (state cx, cy, aspect, height and their velocities) predicts to the
   frame's time;
2. high-score detections are matched to confirmed and lost tracks (IoU, fused with the score);
3. low-score detections are matched to the confirmed tracks left over (this is what keeps a track
   through occlusion, when its detector score sags);
4. tracks seen once so far are matched to the high-score detections left; the rest are dropped;
5. unmatched high-score detections above `new_track_thresh` start tracks; lost tracks older than
   `lost_track_buffer_s` end.

Differences on purpose: time is the frames' timestamps, not a frame counter, so a frame dropped by a
live queue is a longer prediction step, not a broken track. The motion model is ByteTrack's per
frame at the camera's usual frame interval (the median of recent intervals, so it suits 10 and
60 fps alike), and a gap of n intervals is one step of n frames (noise scaled with time); association is
per class (a person never takes over a car's id); a track gets its public id when it is confirmed,
from a counter that never goes back, so ids are never reused within a run. State is kept in numpy
arrays, one row a track, so the cost grows little with the number of objects.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.record import Detections

TRACKED, LOST, NEW = 0, 1, 2
POS, VEL, PP, PV, VV = range(5)
_DT_WINDOW = 31  # the camera's frame interval is the median of this many recent intervals
_WP, _WV = 1.0 / 20, 1.0 / 160  # ByteTrack's position and velocity noise weights (relative to height)
# the aspect ratio (third coordinate) has fixed noise in ByteTrack; x, y and height scale with height
_MASK_POS = np.array([1.0, 1.0, 0.0, 1.0])
_FIXED_POS = 1.0 - _MASK_POS


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` [n, 4] with every box in `b` [m, 4] (x1, y1, x2, y2)."""
    iw = np.minimum.outer(a[:, 2], b[:, 2]) - np.maximum.outer(a[:, 0], b[:, 0])
    ih = np.minimum.outer(a[:, 3], b[:, 3]) - np.maximum.outer(a[:, 1], b[:, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(np.add.outer(area_a, area_b) - inter, 1e-9)


def _xyah(xyxy: np.ndarray) -> np.ndarray:
    w = xyxy[:, 2] - xyxy[:, 0]
    h = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-3)
    return np.stack(((xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, w / h, h), axis=1)


def _xyxy(xyah: np.ndarray) -> np.ndarray:
    w = xyah[:, 2] * xyah[:, 3]
    half = np.stack((w, xyah[:, 3]), axis=1) / 2
    return np.concatenate((xyah[:, :2] - half, xyah[:, :2] + half), axis=1)


def _match(cost: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of pairs with cost <= thresh: (rows, cols).

    Costs above `thresh` are clipped to just above it, so every pair that cannot match costs the same
    as leaving its two ends unmatched: the solver then never moves a good match to lower the cost of
    pairs that are dropped anyway (ByteTrack's `lap.lapjv(cost_limit=thresh)` semantics, with scipy).
    """
    if cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cost = np.minimum(cost, thresh + 1e-4)
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] <= thresh
    return rows[keep], cols[keep]


class ByteTracker:
    """One camera's tracker. Not thread-safe: one stage thread calls it, frames in time order."""

    def __init__(self, track_high_thresh: float = 0.25, track_low_thresh: float = 0.1, new_track_thresh: float = 0.25,
                 match_thresh: float = 0.8, lost_track_buffer_s: float = 1.0, fuse_score: bool = True,
                 classes: list[int] | None = None):
        self.high, self.low, self.new = track_high_thresh, track_low_thresh, new_track_thresh
        self.match_thresh, self.buffer_s, self.fuse_score = match_thresh, lost_track_buffer_s, fuse_score
        self.classes = None if classes is None else np.asarray(classes, np.int32)
        self.next_id = 1
        self.last_time: float | None = None
        self.updates = 0
        self._dts = np.zeros(_DT_WINDOW)
        self._dt_count = 0
        self.frame_dt = 1.0  # seconds; estimated from the timestamps
        self.ended: list[int] = []  # public ids of the confirmed tracks that ended in the last update
        self._clear()

    @classmethod
    def from_config(cls, config) -> "ByteTracker":
        """From a `pipeline.config.TrackingConfig`."""
        return cls(config.track_high_thresh, config.track_low_thresh, config.new_track_thresh, config.match_thresh,
                   config.lost_track_buffer_s, config.fuse_score, config.classes)

    def _clear(self) -> None:
        self.ids = np.zeros(0, np.int64)  # public id, -1 until confirmed
        self.state = np.zeros(0, np.int8)
        self.class_ids = np.zeros(0, np.int32)
        # the Kalman state, one [5, 4] block a track (one gather and one scatter per correction):
        # POS mean cx, cy, aspect (w/h), height; VEL their velocities, per frame interval; PP, PV, VV
        # the covariance of each coordinate: position, position x velocity, velocity
        self.kf = np.zeros((0, 5, 4))
        self.start = np.zeros(0)  # time of the first detection
        self.seen = np.zeros(0)  # time of the last matched detection

    def __len__(self) -> int:
        return int(np.count_nonzero(self.state != NEW))

    # -- Kalman filter over every track at once ---------------------------------------------------
    # ByteTrack's filter (F, Q, H, R) never couples one coordinate with another, only each with its
    # own velocity, and starts from a diagonal covariance: its 8x8 covariance is four independent 2x2
    # blocks. Keeping just those (pp, pv, vv per coordinate) gives the same numbers with elementwise
    # arithmetic instead of batched 8x8 matrix products.
    @property
    def pos(self) -> np.ndarray:
        return self.kf[:, POS]

    def _predict(self, dt: float) -> None:
        if not len(self.state) or dt <= 0:
            return
        k = dt / self.frame_dt  # in frames
        kf = self.kf
        kf[self.state != TRACKED, VEL, 3] = 0.0  # ByteTrack: a track not seen keeps no height velocity
        h = kf[:, POS, 3:4]
        q_pos = (_WP * h * _MASK_POS + _FIXED_POS * 1e-2) ** 2  # noise of one frame: a random walk's variance grows with time
        q_vel = (_WV * h * _MASK_POS + _FIXED_POS * 1e-5) ** 2
        kf[:, POS] += k * kf[:, VEL]
        kf[:, PP] += 2 * k * kf[:, PV] + k * k * kf[:, VV] + k * q_pos
        kf[:, PV] += k * kf[:, VV]
        kf[:, VV] += k * q_vel

    def _correct(self, rows: np.ndarray, xyxy: np.ndarray) -> None:
        if not len(rows):
            return
        block = self.kf[rows]
        pos, vel, pp, pv, vv = block[:, POS], block[:, VEL], block[:, PP], block[:, PV], block[:, VV]
        r = (_WP * pos[:, 3:4] * _MASK_POS + _FIXED_POS * 1e-1) ** 2
        s = pp + r
        gain_p, gain_v = pp / s, pv / s
        innovation = _xyah(xyxy) - pos
        vv -= pv * gain_v
        pos += gain_p * innovation
        vel += gain_v * innovation
        pp *= 1 - gain_p
        pv *= 1 - gain_p
        self.kf[rows] = block

    def _add(self, xyxy: np.ndarray, class_ids: np.ndarray, t: float, state: int) -> np.ndarray:
        """Start tracks at these boxes; returns their rows."""
        n = len(xyxy)
        z = _xyah(xyxy)
        h = z[:, 3:4]
        pp = (2 * _WP * h * _MASK_POS + _FIXED_POS * 1e-2) ** 2
        vv = (10 * _WV * h * _MASK_POS + _FIXED_POS * 1e-5) ** 2
        first = len(self.state)
        ids = np.full(n, -1, np.int64)
        if state == TRACKED:
            ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
            self.next_id += n
        self.ids = np.concatenate((self.ids, ids))
        self.state = np.concatenate((self.state, np.full(n, state, np.int8)))
        self.class_ids = np.concatenate((self.class_ids, class_ids.astype(np.int32)))
        block = np.zeros((n, 5, 4))
        block[:, POS], block[:, PP], block[:, VV] = z, pp, vv
        self.kf = np.concatenate((self.kf, block))
        self.start = np.concatenate((self.start, np.full(n, t)))
        self.seen = np.concatenate((self.seen, np.full(n, t)))
        return np.arange(first, first + n)

    def _keep(self, mask: np.ndarray) -> None:
        for name in ("ids", "state", "class_ids", "kf", "start", "seen"):
            setattr(self, name, getattr(self, name)[mask])

    @staticmethod
    def _associate(tracks: np.ndarray, dets: np.ndarray, similarity: np.ndarray, scores: np.ndarray, thresh: float,
                   fuse: bool):
        """Match track rows `tracks` with detection indices `dets` (`similarity`: IoU of every track with
        every detection, 0 across classes): (track rows, det indices) matched, and the unmatched of each."""
        if not len(tracks) or not len(dets):
            return tracks[:0], dets[:0], tracks, dets
        sim = similarity[tracks][:, dets]
        if fuse:
            sim = sim * scores[dets]
        r, c = _match(1.0 - sim, thresh)
        rest_t = np.ones(len(tracks), bool)
        rest_t[r] = False
        rest_d = np.ones(len(dets), bool)
        rest_d[c] = False
        return tracks[r], dets[c], tracks[rest_t], dets[rest_d]

    def _drop_duplicates(self, alive: np.ndarray) -> None:
        """ByteTrack's last step: a current track and a lost one of the same class on the same place
        (IoU > 0.85) are one object twice; the one followed for less time goes."""
        current = np.flatnonzero(alive & (self.state != LOST))
        lost = np.flatnonzero(alive & (self.state == LOST))
        if not len(current) or not len(lost):
            return
        boxes = _xyxy(self.pos)
        same = self.class_ids[current][:, None] == self.class_ids[lost][None, :]
        pairs = np.argwhere((iou_matrix(boxes[current], boxes[lost]) > 0.85) & same)
        followed = self.seen - self.start
        for i, j in pairs:
            a, b = current[i], lost[j]
            alive[b if followed[a] > followed[b] else a] = False

    # -- the update ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """End every track (the stream's clock went backwards: a loop or a reconnect). Ids go on."""
        self.ended = [int(i) for i in self.ids[self.ids >= 0]]
        self._clear()
        self.last_time = None
        self.updates = 0  # like a fresh start: the next frame's tracks are confirmed at once

    def update(self, detections: Detections, timestamp: float) -> Detections:
        """Track one frame's detections (source pixels) taken at `timestamp` (seconds, any origin, increasing).

        Returns the same detections, same order, with `track_ids` (-1: not part of a confirmed track)
        and `track_ages` (seconds since the track's first detection).
        """
        self.ended = []
        t = float(timestamp)
        if self.last_time is not None and t < self.last_time:
            self.reset()
            ended = self.ended
        else:
            ended = []
        dt = 0.0 if self.last_time is None else t - self.last_time
        if dt > 0:
            self._dts[self._dt_count % _DT_WINDOW] = dt
            self._dt_count += 1
            if self._dt_count <= _DT_WINDOW or self._dt_count % 16 == 0:  # a median now and then is enough
                self.frame_dt = float(np.median(self._dts[:min(self._dt_count, _DT_WINDOW)]))
        self._predict(dt)
        self.last_time = t

        boxes = np.asarray(detections.xyxy, np.float64).reshape(-1, 4)
        scores = np.asarray(detections.scores, np.float64)
        class_ids = np.asarray(detections.class_ids, np.int32)
        n = len(scores)
        if self.classes is not None:
            scores = np.where(np.isin(class_ids, self.classes), scores, -1.0)  # other classes: below every threshold
        high = np.flatnonzero(scores >= self.high)
        low = np.flatnonzero((scores >= self.low) & (scores < self.high))
        det_row = np.full(n, -1, np.int64)  # the track row each detection went to

        # one IoU matrix for the whole frame; a track never matches a detection of another class
        similarity = iou_matrix(_xyxy(self.pos), boxes) if len(self.state) and n else np.zeros((len(self.state), n))
        similarity[self.class_ids[:, None] != class_ids[None, :]] = 0.0
        rows = np.arange(len(self.state))
        was_tracked = self.state == TRACKED
        # 1. high-score detections with confirmed and lost tracks
        pool = rows[self.state != NEW]
        mt, md, rest_t, rest_high = self._associate(pool, high, similarity, scores, self.match_thresh,
                                                    self.fuse_score)
        det_row[md] = mt
        # 2. low-score detections with the confirmed tracks still unmatched
        rest_tracked = rest_t[was_tracked[rest_t]]
        mt2, md2, unmatched, _ = self._associate(rest_tracked, low, similarity, scores, 0.5, False)
        det_row[md2] = mt2
        # 3. tracks seen once so far with the high-score detections left
        unconfirmed = rows[self.state == NEW]
        mt3, md3, dead_new, rest_high = self._associate(unconfirmed, rest_high, similarity, scores, 0.7,
                                                        self.fuse_score)
        det_row[md3] = mt3

        matched = np.concatenate((mt, mt2, mt3))
        self._correct(matched, boxes[np.concatenate((md, md2, md3))])
        self.state[matched] = TRACKED
        self.seen[matched] = t
        confirm = mt3  # a second sighting confirms a track: it gets its public id now
        self.ids[confirm] = np.arange(self.next_id, self.next_id + len(confirm))
        self.next_id += len(confirm)
        self.state[unmatched] = LOST

        # 5. new tracks; the very first frame's are confirmed at once (as in ByteTrack)
        fresh = rest_high[scores[rest_high] >= self.new]
        if len(fresh):
            new_rows = self._add(boxes[fresh], class_ids[fresh], t, TRACKED if self.updates == 0 else NEW)
            det_row[fresh] = new_rows
        self.updates += 1

        alive = np.ones(len(self.state), bool)
        alive[dead_new] = False
        alive &= ~((self.state == LOST) & (t - self.seen > self.buffer_s))
        self._drop_duplicates(alive)
        everyone = alive.all()
        if not everyone:
            ended += [int(i) for i in self.ids[~alive & (self.ids >= 0)]]
        self.ended = ended

        track_ids = np.full(n, -1, np.int64)
        ages = np.zeros(n, np.float32)
        has = det_row >= 0
        rows_of = det_row[has]
        ok = self.state[rows_of] == TRACKED
        ids_here = np.where(ok, self.ids[rows_of], -1)
        track_ids[has] = ids_here
        ages[has] = np.where(ids_here >= 0, t - self.start[rows_of], 0.0)
        if not everyone:
            self._keep(alive)
        return Detections(detections.xyxy, detections.scores, detections.class_ids, track_ids, ages)
