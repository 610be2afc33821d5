"""The tracker on scripted sequences, no video: ids that stay, never come back, survive dropped frames
(timestamps, not frame counts) and low scores, and that the stage fills messages from them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.record import Detections, Frame
from pipeline.tracking import ByteTracker, iou_matrix
from stages.publish import SCHEMA, to_message
from stages.track import tracked_cameras

FPS = 25.0


def dets(*rows) -> Detections:
    """rows of (x1, y1, x2, y2, score[, class_id])."""
    if not rows:
        return Detections.empty()
    rows = [r if len(r) == 6 else (*r, 0) for r in rows]
    a = np.asarray(rows, np.float64)
    return Detections(a[:, :4].astype(np.float32), a[:, 4].astype(np.float32), a[:, 5].astype(np.int32))


def walker(x0, y0, vx, vy, w=40, h=100):
    """A box moving at (vx, vy) pixels a second: its detection at time t."""
    return lambda t, score=0.9, cls=0: (x0 + vx * t, y0 + vy * t, x0 + vx * t + w, y0 + vy * t + h, score, cls)


def run(tracker, frames):
    """frames: [(t, Detections)] -> [track_ids per frame]."""
    return [tracker.update(d, t).track_ids.tolist() for t, d in frames]


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float64)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float64)
    assert np.allclose(iou_matrix(a, b), [[1.0, 50 / 150], [0.0, 0.0]])


def test_two_walkers_keep_their_ids_and_first_frame_tracks_are_confirmed_at_once():
    a, b = walker(0, 100, 80, 0), walker(600, 100, -80, 0)
    tracker = ByteTracker()
    ids = run(tracker, [(i / FPS, dets(a(i / FPS), b(i / FPS))) for i in range(50)])
    assert ids[0] == [1, 2]  # ByteTrack confirms the very first frame's tracks
    assert all(frame == [1, 2] for frame in ids)
    out = tracker.update(dets(a(2.0), b(2.0)), 2.0)
    assert np.allclose(out.track_ages, [2.0, 2.0])
    assert np.allclose(out.xyxy, dets(a(2.0), b(2.0)).xyxy)  # boxes are the detector's, untouched


def test_a_new_object_is_confirmed_on_its_second_frame():
    a, b = walker(0, 100, 50, 0), walker(500, 50, 0, 30)
    tracker = ByteTracker()
    tracker.update(dets(a(0)), 0.0)
    first = tracker.update(dets(a(0.04), b(0.04)), 0.04).track_ids.tolist()
    second = tracker.update(dets(a(0.08), b(0.08)), 0.08).track_ids.tolist()
    assert first == [1, -1] and second == [1, 2]


def test_the_frame_interval_is_learnt_from_the_timestamps():
    a = walker(0, 100, 40, 0)
    tracker = ByteTracker()
    for i in range(40):
        if i % 10 != 5:  # a frame in ten dropped
            tracker.update(dets(a(i / 12.5)), i / 12.5)
    assert tracker.frame_dt == pytest.approx(1 / 12.5)


def test_dropped_frames_do_not_break_a_fast_track_because_time_is_the_timestamps():
    # 400 px/s: after a 0.4 s gap the box has moved 160 px (four widths): only the motion model,
    # stepped by the elapsed time, brings the prediction back onto it
    a = walker(0, 100, 400, 0)
    tracker = ByteTracker(lost_track_buffer_s=1.0)
    times = [i / FPS for i in range(20)] + [i / FPS for i in range(30, 45)]  # frames 20-29 dropped
    ids = run(tracker, [(t, dets(a(t))) for t in times])
    assert {i for frame in ids for i in frame} == {1}


def test_a_frame_counter_would_have_broken_it():
    # the same sequence fed as if frames were evenly spaced (what a frame counter assumes) loses the track
    a = walker(0, 100, 400, 0)
    tracker = ByteTracker(lost_track_buffer_s=1.0)
    frames = list(range(20)) + list(range(30, 45))
    ids = run(tracker, [(k / FPS, dets(a(f / FPS))) for k, f in enumerate(frames)])
    assert len({i for frame in ids for i in frame if i >= 0}) > 1


def test_a_short_occlusion_keeps_the_id_and_the_buffer_is_in_seconds():
    a = walker(100, 100, 40, 0)
    for buffer_s, gap_s, same in ((1.0, 0.6, True), (0.5, 0.8, False)):
        tracker = ByteTracker(lost_track_buffer_s=buffer_s)
        before = [(i / FPS, dets(a(i / FPS))) for i in range(25)]
        after = [(1.0 + gap_s + i / FPS, dets(a(1.0 + gap_s + i / FPS))) for i in range(5)]
        ids = run(tracker, before + [(1.0 + k / FPS, dets()) for k in range(int(gap_s * FPS))] + after)
        assert ids[0] == [1]
        assert (ids[-1] == [1]) is same, (buffer_s, gap_s, ids[-5:])
        if not same:
            assert ids[-1] == [2]


def test_ids_are_never_reused():
    tracker = ByteTracker(lost_track_buffer_s=0.2)
    seen = []
    t = 0.0
    for k in range(6):  # six objects, one after another, each gone long before the next comes
        a = walker(50 * k, 100, 30, 0)
        for i in range(10):
            out = tracker.update(dets(a(i / FPS)), t)
            seen += [i for i in out.track_ids.tolist() if i >= 0]
            t += 1 / FPS
        for _ in range(10):
            tracker.update(dets(), t)
            t += 1 / FPS
    assert sorted(set(seen)) == [1, 2, 3, 4, 5, 6]


def test_low_score_detections_keep_a_track_but_never_start_one():
    a = walker(0, 100, 60, 0)
    tracker = ByteTracker()
    frames = [(i / FPS, dets(a(i / FPS, score=0.9))) for i in range(10)]
    frames += [(i / FPS, dets(a(i / FPS, score=0.15))) for i in range(10, 30)]  # partly occluded: low scores
    ids = run(tracker, frames)
    assert all(frame == [1] for frame in ids)
    alone = ByteTracker()
    ids = run(alone, [(i / FPS, dets(a(i / FPS, score=0.2))) for i in range(10)])
    assert all(frame == [-1] for frame in ids)


def test_classes_do_not_swap_ids_and_class_filter():
    tracker = ByteTracker()
    p = walker(100, 100, 0, 0)
    ids = run(tracker, [(i / FPS, dets(p(i / FPS, cls=0))) for i in range(5)]
              + [(i / FPS, dets(p(i / FPS, cls=2))) for i in range(5, 10)])
    assert ids[4] == [1] and ids[5] == [-1] and ids[6] == [2]  # a car at a person's place is a new track
    only_cars = ByteTracker(classes=[2])
    out = only_cars.update(dets(p(0, cls=0), walker(400, 100, 0, 0)(0, cls=2)), 0.0)
    assert out.track_ids.tolist() == [-1, 1]


def test_clock_going_back_ends_every_track():
    a = walker(0, 100, 50, 0)
    tracker = ByteTracker()
    run(tracker, [(10 + i / FPS, dets(a(i / FPS))) for i in range(5)])
    out = tracker.update(dets(a(0)), 0.0)  # a looped file or a reconnected stream restarts its pts
    assert tracker.ended == [1]
    assert out.track_ids.tolist() == [2]


def test_fifty_objects_keep_fifty_ids_in_noise():
    rng = np.random.default_rng(7)
    n = 50
    start = np.stack((np.arange(n) % 10 * 180.0, np.arange(n) // 10 * 210.0), axis=1)
    velocity = rng.uniform(-60, 60, (n, 2))
    tracker = ByteTracker()
    ids, untracked = set(), 0
    for i in range(100):
        t = i / FPS
        xy = start + velocity * t
        boxes = np.concatenate((xy, xy + (60, 150)), axis=1) + rng.normal(0, 1.5, (n, 4))
        out = tracker.update(Detections(boxes.astype(np.float32), rng.uniform(0.55, 0.95, n).astype(np.float32),
                                        np.zeros(n, np.int32)), t)
        ids |= set(out.track_ids.tolist()) - {-1}
        untracked += int(np.count_nonzero(out.track_ids < 0))
    assert ids == set(range(1, n + 1))  # no track lost and restarted under a new id
    assert untracked < 0.01 * n * 100  # boxes passing over each other may miss a frame or two


def test_per_camera_override_and_the_message_fields():
    config = parse_config({
        "cameras": [{"id": "a", "url": "a.mp4"}, {"id": "b", "url": "b.mp4", "tracking": {"enabled": False}},
                    {"id": "c", "url": "c.mp4", "tracking": {"lost_track_buffer_s": 5}}],
        "model": {"path": "m.onnx", "preset": "yolox"},
        "tracking": {"enabled": True, "lost_track_buffer_s": 2},
    }, "x.yaml")
    cameras = tracked_cameras(config, ["person"])
    assert set(cameras) == {"a", "c"}
    assert cameras["a"].tracker.buffer_s == 2 and cameras["c"].tracker.buffer_s == 5
    frame = Frame("a", 0, 0.0, 0.0, None, (640, 480), detections=dets((10, 10, 50, 110, 0.9), (300, 10, 340, 110, 0.2)))
    cameras["a"].process(frame)
    message = to_message(frame, ["person"], 0)
    assert message["schema"] == SCHEMA == "vapipe.detections/1.2"
    first, second = message["detections"]
    assert first["track_id"] == 1 and first["track_age_s"] == 0.0
    assert "track_id" not in second  # untracked detections stay, without the fields
    assert "analytics" not in message  # no zones or lines on this camera


@pytest.mark.parametrize("override,message", [
    ({"tracking": {"track_low_thresh": 0.7}}, "tracking.track_low_thresh: 0.7 is above track_high_thresh"),
    ({"tracking": {"lost_track_buffer_s": 0}}, "tracking.lost_track_buffer_s: Input should be greater than 0"),
    ({"tracking": {"enabled": True, "max_age": 3}}, "tracking.max_age: unknown key"),
])
def test_bad_tracking_config_names_the_key(override, message):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        parse_config({"cameras": [{"id": "a", "url": "a.mp4"}], "model": {"path": "m.onnx", "preset": "yolox"},
                      **override}, "x.yaml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_matching_without_the_solver_finds_the_solvers_optimum():
    # _match skips scipy when every matchable track wants a different detection; on random frames,
    # with conflicts, pairs priced out and pairs above the threshold, it must pick what scipy picks
    from scipy.optimize import linear_sum_assignment

    from pipeline.tracking import _NO_MATCH, _match

    rng = np.random.default_rng(3)
    skipped = 0
    for _ in range(400):
        n, m = rng.integers(1, 12, 2)
        cost = rng.uniform(0.0, 1.0, (n, m)) ** rng.uniform(0.3, 3.0)  # from mostly low to mostly high
        cost[rng.random(n) < 0.2] = _NO_MATCH
        cost[:, rng.random(m) < 0.2] = _NO_MATCH
        thresh = float(rng.uniform(0.3, 0.8))
        rows, cols = linear_sum_assignment(np.minimum(cost, thresh + 1e-4))
        keep = cost[rows, cols] <= thresh
        got = _match(cost, thresh)
        assert list(zip(*got)) == list(zip(rows[keep], cols[keep]))
        best = cost.argmin(1)
        wanted = best[cost.min(1) < thresh + 1e-4]
        skipped += len(set(wanted.tolist())) == len(wanted)
    assert 50 < skipped < 350  # both ways were taken


def test_the_compiled_kernels_compile_once_whatever_the_input_and_settings():
    # numba compiles a kernel again for every new combination of argument types and layouts (seconds,
    # mid-run, on a camera's frame); the tracker passes one: float64 views, int64 class ids, empty
    # frames, tracks that end (the state shrinks), a clock that goes back and every setting must
    # reuse what the first tracker's warm-up compiled
    from pipeline import tracking

    a, b, c = walker(0, 100, 80, 0), walker(600, 100, -80, 0), walker(300, 300, 0, -40)
    for settings in ({}, {"fuse_score": 0}, {"classes": [0]}, {"lost_track_buffer_s": 0.1}, {"track_low_thresh": 0}):
        tracker = ByteTracker(**settings)
        for i in list(range(30)) + list(range(10)):  # the clock goes back once
            t = i / FPS
            rows = [a(t), b(t, score=0.2 if i % 7 == 3 else 0.9, cls=i % 2)] + ([c(t)] if 5 < i < 12 else [])
            table = np.asarray(rows, np.float64)  # float64 and strided: the columns of one table
            frame = Detections(table[:, :4], table[:, 4], table[:, 5].astype(np.int64)) if i % 9 else Detections.empty()
            tracker.update(frame, t)
    kernels = tracking._kernels
    for kernel in (kernels.prepare, kernels.match_high, kernels.match_low, kernels.match_new, kernels.correct,
                   kernels.output):
        assert len(kernel.signatures) == 1, (kernel.__name__, kernel.signatures)


def test_subscribe_summary_shows_track_ids_and_events():
    from run import summary_line
    from stages.publish import to_events

    config = parse_config({"cameras": [{"id": "a", "url": "a.mp4", "lines": [{"name": "door", "points": [[0, 60], [640, 60]]}]}],
                           "model": {"path": "m.onnx", "preset": "yolox"}, "tracking": {"enabled": True}}, "x.yaml")
    camera = tracked_cameras(config, ["person"])["a"]
    lines = []
    for i in range(3):  # a person walks down over the line; a weak detection stays untracked
        frame = Frame("a", i, i / FPS, 0.0, None, (640, 480), detections=dets((10, 10 + 20 * i, 50, 50 + 20 * i, 0.9),
                                                                                (300, 10, 340, 110, 0.2)))
        frame.mark("track")
        camera.process(frame)
        lines.append(summary_line(to_message(frame, ["person"], i)))
        lines += [summary_line(event) for event in to_events(frame, 0)]
    assert lines[0].startswith("a frame=0 lat=") and lines[0].endswith("[person#1 0.90, person 0.20]")
    assert "a line_crossed door in person #1" in lines
