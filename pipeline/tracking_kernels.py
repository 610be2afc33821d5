"""The tracker's per-frame arithmetic, compiled with numba: prediction, IoU, the three associations'
costs and their solver-free matching, the Kalman correction and the output ids.

pipeline/tracking.py calls these once or twice per step of its update. With a few dozen objects each
numpy call's fixed cost (about 1 us, several on a busy machine) outweighed its arithmetic: the numpy
tracker made about a hundred calls a frame. Here a step is one call with plain loops. The formulas
are the numpy tracker's, operation for operation, so the results are the same (the mean prediction
may differ from BLAS's matrix product in the last bit; track ids, ages and ends are checked equal by
bench/tracking.py --parts same). `cache=True`: compiled once per machine into __pycache__, then loaded.

Kalman state, as in tracking.py: kf [5, 4, tracks] = mean position, velocity, then the covariance
pp, pv, vv of each coordinate (cx, cy, aspect, height).
"""

from __future__ import annotations

import numpy as np
from numba import njit

POS, VEL, PP, PV, VV = range(5)
TRACKED, LOST = 0, 1


@njit(cache=True)
def prepare(kf, tracked, k, q_scale2, q_fixed2, xyxy, track_classes, det_classes):
    """Predict every track `k` frames ahead (in place; k = 0: no prediction), then the frame's
    measurements z [4, n] (cx, cy, aspect, height) and IoU [tracks, n] (0 across classes)."""
    n_tracks = kf.shape[2]
    n = xyxy.shape[0]
    if k > 0.0:
        kk2, kk = 2 * k, k * k
        for r in range(n_tracks):
            if not tracked[r]:
                kf[VEL, 3, r] = 0.0  # ByteTrack: a track not seen keeps no height velocity
            h2 = kf[POS, 3, r] ** 2  # the noise of one frame is from the height before the step
            for c in range(4):
                pos, vel, pp, pv, vv = kf[POS, c, r], kf[VEL, c, r], kf[PP, c, r], kf[PV, c, r], kf[VV, c, r]
                kf[POS, c, r] = pos + k * vel
                kf[PP, c, r] = (pp + kk2 * pv + kk * vv) + k * (q_scale2[0, c] * h2 + q_fixed2[0, c])
                kf[PV, c, r] = pv + k * vv
                kf[VV, c, r] = vv + k * (q_scale2[1, c] * h2 + q_fixed2[1, c])
    z = np.empty((4, n))
    det_signed = np.empty((4, n))
    det_area = np.empty(n)
    for j in range(n):
        x1, y1, x2, y2 = xyxy[j, 0], xyxy[j, 1], xyxy[j, 2], xyxy[j, 3]
        w, h = x2 - x1, y2 - y1
        z[0, j] = (x1 + x2) * 0.5
        z[1, j] = (y1 + y2) * 0.5
        hz = max(h, 1e-3)
        z[2, j] = w / hz
        z[3, j] = hz
        det_signed[0, j], det_signed[1, j], det_signed[2, j], det_signed[3, j] = -x1, -y1, x2, y2
        det_area[j] = w * h
    similarity = np.empty((n_tracks, n))
    for r in range(n_tracks):
        cx, cy = kf[POS, 0, r], kf[POS, 1, r]
        half_w, half_h = kf[POS, 2, r] * 0.5 * kf[POS, 3, r], kf[POS, 3, r] * 0.5
        ax1, ay1, ax2, ay2 = half_w - cx, half_h - cy, cx + half_w, cy + half_h  # (-x1, -y1, x2, y2)
        area = half_w * half_h * 4.0
        for j in range(n):
            if track_classes[r] != det_classes[j]:
                similarity[r, j] = 0.0
                continue
            ox = min(ax2, det_signed[2, j]) + min(ax1, det_signed[0, j])
            oy = min(ay2, det_signed[3, j]) + min(ay1, det_signed[1, j])
            inter = max(ox, 0.0) * max(oy, 0.0)
            union = max(area + det_area[j] - inter, 1e-9)
            similarity[r, j] = inter / union
    return z, similarity


@njit(cache=True)
def greedy(cost, thresh):
    """Each row's best column, when the rows that can match all want different columns: then that is
    the optimum (see tracking._match). Returns (rows, cols, ok); ok False: a conflict, ask the solver."""
    n_rows, n_cols = cost.shape
    if n_cols == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), True
    limit = thresh + 1e-4
    taken = np.zeros(n_cols, np.bool_)
    rows = np.empty(n_rows, np.int64)
    cols = np.empty(n_rows, np.int64)
    count = 0
    for r in range(n_rows):
        best = 0
        best_cost = cost[r, 0]
        for j in range(1, n_cols):
            if cost[r, j] < best_cost:  # the first of equal minima, as argmin
                best, best_cost = j, cost[r, j]
        if best_cost < limit:
            if taken[best]:
                return rows[:0], cols[:0], False
            taken[best] = True
        if best_cost <= thresh:
            rows[count], cols[count] = r, best
            count += 1
    return rows[:count], cols[:count], True


@njit(cache=True)
def match_high(similarity, scores, high, new, fuse, no_match, thresh):
    """1. high-score detections with confirmed and lost tracks: (cost, rows, cols, ok)."""
    n_tracks, n = similarity.shape
    cost = np.empty((n_tracks, n))
    for r in range(n_tracks):
        for j in range(n):
            if new[r]:
                cost[r, j] = no_match
            elif fuse:
                cost[r, j] = 1.0 - similarity[r, j] * (scores[j] if high[j] else -1.0)
            else:
                cost[r, j] = 1.0 - similarity[r, j] if high[j] else no_match
    rows, cols, ok = greedy(cost, thresh)
    return cost, rows, cols, ok


@njit(cache=True)
def match_low(similarity, scores, low_thresh, high, tracked, det_row, thresh):
    """2. low-score detections with the confirmed tracks still unmatched, on that sub-matrix:
    (cost, rows, cols, ok, track rows, detection columns)."""
    n_tracks, n = similarity.shape
    matched = np.zeros(n_tracks, np.bool_)
    for j in range(n):
        if det_row[j] >= 0:
            matched[det_row[j]] = True
    open_tracks = np.nonzero(tracked & ~matched)[0]
    low = np.nonzero((scores >= low_thresh) & ~high)[0]
    cost = np.empty((len(open_tracks), len(low)))
    for a in range(len(open_tracks)):
        for b in range(len(low)):
            cost[a, b] = 1.0 - similarity[open_tracks[a], low[b]]
    if len(open_tracks) and len(low):
        rows, cols, ok = greedy(cost, thresh)
    else:
        rows, cols, ok = np.zeros(0, np.int64), np.zeros(0, np.int64), True
    return cost, rows, cols, ok, open_tracks, low


@njit(cache=True)
def match_new(similarity, scores, high, new, det_row, fuse, no_match, thresh):
    """3. tracks seen once so far with the high-score detections left: (cost, rows, cols, ok);
    cost is None-like (0 x 0) when no detection is left."""
    n_tracks, n = similarity.shape
    open_dets = high & (det_row < 0)
    if not open_dets.any():
        empty = np.zeros(0, np.int64)
        return np.zeros((0, 0)), empty, empty, True
    cost = np.empty((n_tracks, n))
    for r in range(n_tracks):
        for j in range(n):
            if not new[r] or not open_dets[j]:
                cost[r, j] = no_match
            else:
                cost[r, j] = 1.0 - (similarity[r, j] * scores[j] if fuse else similarity[r, j])
    rows, cols, ok = greedy(cost, thresh)
    return cost, rows, cols, ok


@njit(cache=True)
def correct(kf, state, seen, tracked, det_row, z, t, r_scale2, r_fixed2):
    """Kalman update of every matched track with its detection (in place); matched tracks become
    TRACKED and seen at t, tracks that were TRACKED and are not matched become LOST. Returns the
    mask of matched tracks."""
    matched = np.zeros(kf.shape[2], np.bool_)
    for j in range(len(det_row)):
        r = det_row[j]
        if r < 0:
            continue
        matched[r] = True
        state[r] = TRACKED
        seen[r] = t
        h2 = kf[POS, 3, r] ** 2
        for c in range(4):
            pos, pp, pv, vv = kf[POS, c, r], kf[PP, c, r], kf[PV, c, r], kf[VV, c, r]
            inverse = 1.0 / (pp + (r_scale2[c] * h2 + r_fixed2[c]))
            step = inverse * (z[c, j] - pos)
            kf[POS, c, r] = pos + pp * step
            kf[VEL, c, r] += pv * step
            kf[PP, c, r] = pp - pp * pp * inverse
            kf[PV, c, r] = pv - pp * pv * inverse
            kf[VV, c, r] = vv - pv * pv * inverse
    for r in range(len(tracked)):
        if tracked[r] and not matched[r]:
            state[r] = LOST
    return matched


@njit(cache=True)
def output(ids, start, det_row, t):
    """Each detection's public track id (-1: none or not confirmed) and its track's age in seconds."""
    n = len(det_row)
    track_ids = np.full(n, -1, np.int64)
    ages = np.zeros(n, np.float32)
    for j in range(n):
        r = det_row[j]
        if r >= 0 and ids[r] >= 0:
            track_ids[j] = ids[r]
            ages[j] = np.float32(t - start[r])
    return track_ids, ages
