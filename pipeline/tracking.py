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

import statistics

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.record import Detections

TRACKED, LOST, NEW = 0, 1, 2
POS, VEL, PP, PV, VV = range(5)
_DT_WINDOW = 31  # the camera's frame interval is the median of this many recent intervals
_WP, _WV = 1.0 / 20, 1.0 / 160  # ByteTrack's position and velocity noise weights (relative to height)
# the aspect ratio (third coordinate) has fixed noise in ByteTrack; x, y and height scale with height.
# Column vectors: every per-track array here is coordinate-major, [4, tracks] (see _clear)
_MASK_POS = np.array([1.0, 1.0, 0.0, 1.0])[:, None]
_FIXED_POS = 1.0 - _MASK_POS
# One frame's process noise, position and velocity ([2, 4, 1]), and the measurement noise ([4, 1]), are
# (scale x height + fixed) ** 2 where scale and fixed are never both non-zero: scale ** 2 x height ** 2
# + fixed ** 2, so one height ** 2 a frame serves every coordinate
_Q_SCALE2 = np.stack((_WP * _MASK_POS, _WV * _MASK_POS)) ** 2
_Q_FIXED2 = np.stack((_FIXED_POS * 1e-2, _FIXED_POS * 1e-5)) ** 2
_R_SCALE2 = (_WP * _MASK_POS) ** 2
_R_FIXED2 = (_FIXED_POS * 1e-1) ** 2
_HALF = np.full((2, 1), 0.5)
# the same, one value a coordinate, as the kernels take them
_Q_SCALE2_C, _Q_FIXED2_C = _Q_SCALE2[:, :, 0].copy(), _Q_FIXED2[:, :, 0].copy()
_R_SCALE2_C, _R_FIXED2_C = _R_SCALE2[:, 0].copy(), _R_FIXED2[:, 0].copy()
_SIGN = np.array([-1.0, -1.0, 1.0, 1.0])[:, None]  # boxes as (-x1, -y1, x2, y2): see _iou
_NO_MATCH = 2.0  # a cost above every threshold: the pair cannot match


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` [n, 4] with every box in `b` [m, 4] (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64).T, np.asarray(b, np.float64).T
    return _iou(a * _SIGN, _area(a), b * _SIGN, _area(b))


def _area(xyxy: np.ndarray) -> np.ndarray:
    size = xyxy[2:] - xyxy[:2]
    return size[0] * size[1]


def _iou(signed_a: np.ndarray, area_a: np.ndarray, signed_b: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """IoU [n, m] of boxes given coordinate-major as (-x1, -y1, x2, y2), [4, n] and [4, m], and their areas.

    Negating x1 and y1 turns both ends of the overlap into minima, so one np.minimum over [4, n, m]
    gives (-max x1, -max y1, min x2, min y2) and the overlap is its last two rows plus its first two
    (min x2 - max x1 in fewer calls: each numpy call costs more than its arithmetic here).
    """
    corner = np.minimum(signed_a[:, :, None], signed_b[:, None, :])
    overlap = corner[2:] + corner[:2]
    np.maximum(overlap, 0, out=overlap)
    inter = overlap[0] * overlap[1]
    union = area_a[:, None] + area_b
    union -= inter
    np.maximum(union, 1e-9, out=union)
    return np.divide(inter, union, out=inter)


def _xyxy(xyah: np.ndarray) -> np.ndarray:
    """Kalman positions [4, n] (cx, cy, aspect, height) as boxes [n, 4] (x1, y1, x2, y2)."""
    half = xyah[2:] * _HALF
    half[0] *= xyah[3]
    return np.concatenate((xyah[:2] - half, xyah[:2] + half)).T


def _match(cost: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of pairs with cost <= thresh: (rows, cols), rows ascending.

    Costs above `thresh` count as just above it, so every pair that cannot match costs the same as
    leaving its two ends unmatched: the solver then never moves a good match to lower the cost of
    pairs that are dropped anyway (ByteTrack's `lap.lapjv(cost_limit=thresh)` semantics). The total
    is then at least the sum of each row's best cost below that limit, so when those rows all want
    different columns, each taking its best is the optimum (the usual frame: objects apart); only a
    conflict needs scipy's solver. A row or column priced at _NO_MATCH everywhere takes no part.
    """
    return _solve(cost, thresh, *_load_kernels().greedy(np.ascontiguousarray(cost, np.float64), thresh))


def _solve(cost: np.ndarray, thresh: float, rows: np.ndarray, cols: np.ndarray,
           ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """The matching from a kernel's solver-free try (ok) or, on a conflict, from scipy's solver."""
    if ok:
        return rows, cols
    rows, cols = linear_sum_assignment(np.minimum(cost, thresh + 1e-4))
    keep = cost[rows, cols] <= thresh
    return rows[keep], cols[keep]


_kernels = None


def _load_kernels():
    """pipeline.tracking_kernels, imported on the first tracker: numba takes about a second to import
    and load its compiled code (longer the first time on a machine, when it compiles), which a run
    without tracking should not pay. A scripted sequence then runs every kernel once, so that no
    camera's first frames wait for it."""
    global _kernels
    if _kernels is None:
        from pipeline import tracking_kernels

        _kernels = tracking_kernels
        # two walkers A and B; B's score sags once; C is new, confirmed, then lost; D is seen once and
        # dropped (a track ends: the state shrinks); the types here are the only ones update passes
        a, b, c, d = ((0, 0, 10, 20, 0.9), (30, 0, 40, 20, 0.9), (60, 0, 70, 20, 0.9), (90, 0, 100, 20, 0.9))
        weak_b = (30, 0, 40, 20, 0.3)
        warm = ByteTracker(track_high_thresh=0.5)
        for i, rows in enumerate(([a, b], [a, weak_b], [a, b, c], [a, b, c], [a, b], [a, b, d], [a, b])):
            boxes = np.array(rows, np.float64) + (i, 0, i, 0, 0)
            warm.update(Detections(boxes[:, :4].astype(np.float32), boxes[:, 4].astype(np.float32),
                                   np.zeros(len(rows), np.int32)), i / 25)
    return _kernels


class ByteTracker:
    """One camera's tracker. Not thread-safe: one stage thread calls it, frames in time order."""

    def __init__(self, track_high_thresh: float = 0.25, track_low_thresh: float = 0.1, new_track_thresh: float = 0.25,
                 match_thresh: float = 0.8, lost_track_buffer_s: float = 1.0, fuse_score: bool = True,
                 classes: list[int] | None = None):
        # floats and a bool whatever was given: the kernels take them, and other types would compile again
        self.high, self.low, self.new = float(track_high_thresh), float(track_low_thresh), float(new_track_thresh)
        self.match_thresh, self.buffer_s = float(match_thresh), float(lost_track_buffer_s)
        self.fuse_score = bool(fuse_score)
        self.classes = None if classes is None else np.asarray(classes, np.int32)
        self.next_id = 1
        self.last_time: float | None = None
        self.updates = 0
        self._dts = [0.0] * _DT_WINDOW  # a list: statistics.median of 31 floats costs a tenth of np.median's
        self._dt_count = 0
        self.frame_dt = 1.0  # seconds; estimated from the timestamps
        self.ended: list[int] = []  # public ids of the confirmed tracks that ended in the last update
        self._clear()
        self._kernels = _load_kernels()

    @classmethod
    def from_config(cls, config) -> "ByteTracker":
        """From a `pipeline.config.TrackingConfig`."""
        return cls(config.track_high_thresh, config.track_low_thresh, config.new_track_thresh, config.match_thresh,
                   config.lost_track_buffer_s, config.fuse_score, config.classes)

    def _clear(self) -> None:
        self.ids = np.zeros(0, np.int64)  # public id, -1 until confirmed
        self.state = np.zeros(0, np.int8)
        self.class_ids = np.zeros(0, np.int32)
        # the Kalman state of every track, [5, 4, tracks]: POS the mean cx, cy, aspect (w/h), height;
        # VEL their velocities, per frame interval; PP, PV, VV the covariance of each coordinate:
        # position, position x velocity, velocity. Predicted and corrected in place by the kernels.
        self.kf = np.zeros((5, 4, 0))
        self.start = np.zeros(0)  # time of the first detection
        self.seen = np.zeros(0)  # time of the last matched detection

    def __len__(self) -> int:
        return int(np.count_nonzero(self.state != NEW))

    # -- Kalman filter over every track at once ---------------------------------------------------
    # ByteTrack's filter (F, Q, H, R) never couples one coordinate with another, only each with its
    # own velocity, and starts from a diagonal covariance: its 8x8 covariance is four independent 2x2
    # blocks. Keeping just those (pp, pv, vv per coordinate) gives the same numbers with elementwise
    # arithmetic (tracking_kernels.prepare predicts, .correct updates) instead of 8x8 matrix products.
    @property
    def pos(self) -> np.ndarray:
        """Every track's Kalman position, [tracks, 4] (cx, cy, aspect, height)."""
        return self.kf[POS].T

    def _add(self, z: np.ndarray, class_ids: np.ndarray, t: float, state: int) -> np.ndarray:
        """Start tracks at measurements `z` [4, n] (cx, cy, aspect, height); returns their rows."""
        n = z.shape[1]
        h = z[3]
        first = len(self.state)
        ids = np.full(n, -1, np.int64)
        if state == TRACKED:
            ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
            self.next_id += n
        self.ids = np.concatenate((self.ids, ids))
        self.state = np.concatenate((self.state, np.full(n, state, np.int8)))
        self.class_ids = np.concatenate((self.class_ids, class_ids.astype(np.int32)))
        block = np.zeros((5, 4, n))
        block[POS] = z
        block[PP] = (2 * _WP * h * _MASK_POS + _FIXED_POS * 1e-2) ** 2
        block[VV] = (10 * _WV * h * _MASK_POS + _FIXED_POS * 1e-5) ** 2
        self.kf = np.concatenate((self.kf, block), axis=2)
        self.start = np.concatenate((self.start, np.full(n, t)))
        self.seen = np.concatenate((self.seen, np.full(n, t)))
        return np.arange(first, first + n)

    def _keep(self, mask: np.ndarray) -> None:
        for name in ("ids", "state", "class_ids", "start", "seen"):
            setattr(self, name, getattr(self, name)[mask])
        self.kf = np.ascontiguousarray(self.kf[:, :, mask])  # (indexing the last axis leaves it strided)

    def _drop_duplicates(self, alive: np.ndarray, lost: np.ndarray) -> None:
        """ByteTrack's last step: a current track and a lost one of the same class on the same place
        (IoU > 0.85) are one object twice; the one followed for less time goes. `lost`: a mask."""
        current = (alive & ~lost).nonzero()[0]
        lost = (alive & lost).nonzero()[0]
        if not len(current) or not len(lost):
            return
        boxes = _xyxy(self.kf[POS])
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
        # Cost: with a few dozen objects each numpy call's fixed overhead outweighs its arithmetic, so
        # the arithmetic is in compiled kernels (pipeline/tracking_kernels.py), one call a step; what is
        # left here is bookkeeping, skipped when there is nothing to do (no track starts or ends).
        kernels = self._kernels
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
                self.frame_dt = statistics.median(self._dts[:min(self._dt_count, _DT_WINDOW)])
        state = self.state
        n_tracks = len(state)
        tracked = state == TRACKED  # as the frame found them
        new = state == NEW
        n_new = np.count_nonzero(new)
        self.last_time = t

        # contiguous, of fixed types: a kernel called with other types or layouts would compile again
        xyxy = np.ascontiguousarray(detections.xyxy, np.float64).reshape(-1, 4)
        scores = np.ascontiguousarray(detections.scores, np.float64)
        class_ids = np.ascontiguousarray(detections.class_ids, np.int32)
        n = len(scores)
        if self.classes is not None:
            scores = np.where(np.isin(class_ids, self.classes), scores, -1.0)  # other classes: below every threshold
        high = scores >= self.high
        n_high = np.count_nonzero(high)
        det_row = np.full(n, -1, np.int64)  # the track row each detection went to
        confirm = det_row[:0]
        # predicts (k frames ahead: a gap of n intervals is one step of n frames), then the frame's
        # measurements (cx, cy, aspect, height) and its one IoU matrix (0 across classes)
        z, similarity = kernels.prepare(self.kf, tracked, dt / self.frame_dt if n_tracks and dt > 0 else 0.0,
                                        _Q_SCALE2_C, _Q_FIXED2_C, xyxy, self.class_ids, class_ids)

        if n_tracks and n:
            # 1. high-score detections with confirmed and lost tracks (a low-score one is priced out
            # through a score of -1: its cost is 1 + IoU)
            if n_high and n_tracks > n_new:
                cost, rows, cols, ok = kernels.match_high(similarity, scores, high, new, self.fuse_score, _NO_MATCH,
                                                          self.match_thresh)
                rows, cols = _solve(cost, self.match_thresh, rows, cols, ok)
                det_row[cols] = rows
            # 2. low-score detections with the confirmed tracks still unmatched (on that sub-matrix)
            if n_high < n:
                cost, rows, cols, ok, open_tracks, low = kernels.match_low(similarity, scores, self.low, high, tracked,
                                                                          det_row, 0.5)
                if len(rows) or not ok:
                    rows, cols = _solve(cost, 0.5, rows, cols, ok)
                    det_row[low[cols]] = open_tracks[rows]
            # 3. tracks seen once so far with the high-score detections left
            if n_new:
                cost, rows, cols, ok = kernels.match_new(similarity, scores, high, new, det_row, self.fuse_score,
                                                         _NO_MATCH, 0.7)
                confirm, cols = _solve(cost, 0.7, rows, cols, ok)
                det_row[cols] = confirm

        # the Kalman correction of the matched tracks; tracked ones not matched are lost now
        matched = kernels.correct(self.kf, state, self.seen, tracked, det_row, z, t, _R_SCALE2_C, _R_FIXED2_C)
        if len(confirm):  # a second sighting confirms a track: it gets its public id now
            self.ids[confirm] = np.arange(self.next_id, self.next_id + len(confirm))
            self.next_id += len(confirm)

        # 5. new tracks; the very first frame's are confirmed at once (as in ByteTrack)
        fresh = det_row[:0]
        if n_high:
            fresh = high & (det_row < 0)
            if self.new > self.high:
                fresh &= scores >= self.new
            fresh = fresh.nonzero()[0]
            if len(fresh):
                det_row[fresh] = self._add(z[:, fresh], class_ids[fresh], t, TRACKED if self.updates == 0 else NEW)
        self.updates += 1

        # tracks seen once and not again go at once; lost ones when their buffer is over
        lost = state == LOST
        everyone = True
        if n_new or np.count_nonzero(lost):
            alive = ~(new & ~matched) if n_new else np.ones(n_tracks, bool)
            if np.count_nonzero(lost):
                alive &= ~(lost & (t - self.seen[:n_tracks] > self.buffer_s))
                if len(fresh):
                    lost = np.concatenate((lost, np.zeros(len(fresh), bool)))
            if len(fresh):
                alive = np.concatenate((alive, np.ones(len(fresh), bool)))
            if np.count_nonzero(lost):
                self._drop_duplicates(alive, lost)
            everyone = np.count_nonzero(alive) == len(alive)
        if not everyone:
            ended += [int(i) for i in self.ids[~alive & (self.ids >= 0)]]
        self.ended = ended

        # a matched track is a tracked one, so its id is the detection's (-1 for a track not confirmed)
        track_ids, ages = kernels.output(self.ids, self.start, det_row, t)
        if not everyone:
            self._keep(alive)
        return Detections(detections.xyxy, detections.scores, detections.class_ids, track_ids, ages)
