"""Tracking as a user runs it: the real CLI on a cut of the demo clip (two people walk in one after
the other), tracking and a counting line on, a real ZeroMQ subscriber on the detections and events
topics. Each person keeps one track id while visible, ids are never reused, and the events agree
with the counts in the detections messages."""

from __future__ import annotations

import collections

import pytest

from conftest import PERSON_CLIP, Subscriber, cut_clip, make_config, run_cli, start_cli

START, FRAMES = 460, 440  # frames 460-899: the third and fourth person, with empty floor around them
PEOPLE = 2
LINE = {"name": "middle", "points": [[384, 0], [384, 432]]}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, assets_present_module):
    tmp = tmp_path_factory.mktemp("track-e2e")
    clip = cut_clip(PERSON_CLIP, tmp / "two-people.mp4", START, FRAMES)
    path, config = make_config(tmp, [{"id": "cam1", "url": str(clip), "lines": [LINE]}],
                               publish={"wait_subscribers": 1, "wait_timeout_s": 30}, tracking={"enabled": True})
    # one SUB socket, both topics: one subscription is what the run waits for
    subscriber = Subscriber(config["publish"]["bind"], [b"det/cam1/", b"events/cam1/"])
    process = start_cli("--config", str(path))
    ends = lambda ms: sum(1 for _, m in ms if m["type"] == "end") == 2  # noqa: E731
    try:
        messages = subscriber.collect(ends, timeout=600)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
        subscriber.close()
    return process.returncode, messages, err


@pytest.fixture(scope="module")
def assets_present_module():
    if not PERSON_CLIP.is_file():
        pytest.fail("test assets missing (set ASSETS_DIR)")


def person_tracks(detections):
    tracks = collections.defaultdict(list)  # track id -> frames
    for m in detections:
        for d in m["detections"]:
            if d["label"] == "person" and "track_id" in d:
                tracks[d["track_id"]].append(m["frame"])
    return tracks


def test_every_frame_arrives_with_schema_1_1_and_track_latency(tracked_run):
    returncode, messages, err = tracked_run
    assert returncode == 0, err[-2000:]
    detections = [m for t, m in messages if t == b"det/cam1/" and m["type"] == "detections"]
    assert [m["frame"] for m in detections] == list(range(FRAMES))
    assert detections[0]["schema"] == "vapipe.detections/1.2"
    assert "track" in detections[0]["latency_ms"]


def test_each_person_keeps_one_track_id_while_visible(tracked_run):
    _, messages, _ = tracked_run
    detections = [m for t, m in messages if t == b"det/cam1/" and m["type"] == "detections"]
    tracks = person_tracks(detections)
    long_lived = {i: frames for i, frames in tracks.items() if len(frames) >= 25}  # a second or more
    assert len(long_lived) == PEOPLE, {i: (f[0], f[-1], len(f)) for i, f in tracks.items()}
    # each person is one id from the frame they are first confidently seen to the last: no gap, no second id
    confident = [m["frame"] for m in detections if any(d["label"] == "person" and d["score"] > 0.6 for d in m["detections"])]
    visits = []  # runs of frames with a person, split where the floor is empty for a second
    for frame in confident:
        if visits and frame - visits[-1][-1] <= 25:
            visits[-1].append(frame)
        else:
            visits.append([frame])
    visits = [v for v in visits if len(v) >= 25]
    assert len(visits) == PEOPLE
    for visit in visits:
        ids = {d["track_id"] for m in detections if visit[0] <= m["frame"] <= visit[-1]
               for d in m["detections"] if d["label"] == "person" and d["score"] > 0.6 and "track_id" in d}
        assert len(ids) == 1, (visit[0], visit[-1], ids)
        tracked = sum(1 for m in detections if visit[0] <= m["frame"] <= visit[-1]
                      and any(d.get("track_id") in ids for d in m["detections"]))
        assert tracked >= 0.9 * (visit[-1] - visit[0] + 1)
    # ids are never reused: each id first appears after every smaller one, and appears once a frame
    first_seen = {}
    for m in detections:
        ids = [d["track_id"] for d in m["detections"] if "track_id" in d]
        assert len(ids) == len(set(ids))
        for i in ids:
            first_seen.setdefault(i, m["frame"])
    order = sorted(first_seen, key=lambda i: (first_seen[i], i))
    assert order == sorted(first_seen)


def test_line_events_agree_with_the_counts_in_detections(tracked_run):
    _, messages, _ = tracked_run
    events = [m for t, m in messages if t == b"events/cam1/" and m["type"] != "end"]
    detections = [m for t, m in messages if t == b"det/cam1/" and m["type"] == "detections"]
    last = detections[-1]["analytics"]["lines"]["middle"]
    assert last["points"] == [[384.0, 0.0], [384.0, 432.0]]
    assert all(e["schema"] == "vapipe.events/1" and e["type"] == "line_crossed" and e["line"] == "middle" for e in events)
    assert [e["seq"] for e in events] == list(range(len(events)))
    tally = collections.Counter((e["direction"], e["label"]) for e in events)
    assert tally == collections.Counter({(d, label): n for d in ("in", "out") for label, n in last[d].items()})
    assert events, "the people walk past the middle of the image: some crossing is expected"
    tracks = person_tracks(detections)
    for e in events:
        assert e["track_id"] in tracks and e["frame"] in tracks[e["track_id"]]


def test_a_bad_line_is_one_line_and_exit_2(tmp_path):
    path, _ = make_config(tmp_path, [{"id": "cam1", "url": str(PERSON_CLIP),
                                       "lines": [{"name": "l", "points": [[10, 10], [10, 10]]}]}],
                          tracking={"enabled": True})
    result = run_cli("--config", str(path), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cameras[0].lines[0].points" in lines[0] and "Traceback" not in result.stderr


def test_each_worker_tracks_its_own_cameras(tmp_path, short_clips):
    # the same clip on two cameras in two worker processes: each camera's tracker lives in its worker,
    # so both number their tracks from 1 and give the person the same single id
    people, _ = short_clips
    cameras = [{"id": "a", "url": str(people)}, {"id": "b", "url": str(people)}]
    path, config = make_config(tmp_path, cameras, engine={"lanes": 1}, tracking={"enabled": True},
                               publish={"wait_subscribers": 1, "wait_timeout_s": 60}, runtime={"workers": 2})
    subscriber = Subscriber(config["publish"]["bind"], [b"det/"])
    process = start_cli("--config", str(path))
    try:
        messages = subscriber.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == 2, timeout=600)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
        subscriber.close()
    assert process.returncode == 0, err[-2000:]
    assert "worker 0/2" in err and "worker 1/2" in err
    tracks = {}
    for camera in ("a", "b"):
        detections = [m for _, m in messages if m["camera"] == camera and m["type"] == "detections"]
        tracks[camera] = {i: f for i, f in person_tracks(detections).items() if len(f) >= 25}
        assert len(tracks[camera]) == 1, camera  # one person walks through this cut
    assert tracks["a"] == tracks["b"]  # same clip, same model, same tracker: same ids on the same frames
