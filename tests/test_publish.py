"""Topics per camera that cannot collide by prefix, and the `subscribe` command a user runs."""

import subprocess
import sys

from conftest import BOTTLE_CLIP, ROOT, SHORT_FRAMES, Subscriber, make_config, start_cli


def test_camera_topics_do_not_collide_by_prefix(tmp_path, short_clips):
    _people, bottles = short_clips
    path, config = make_config(tmp_path, [{"id": "cam1", "url": str(bottles)}, {"id": "cam10", "url": str(bottles)}],
                               publish={"wait_subscribers": 2})
    only_cam1 = Subscriber(config["publish"]["bind"], [b"det/cam1/"])
    everything = Subscriber(config["publish"]["bind"], [b"det/"])
    pipeline = start_cli("--config", str(path))
    try:
        everything_msgs = everything.collect(lambda ms: sum(m["type"] == "end" for _, m in ms) == 2, timeout=240)
        cam1_msgs = only_cam1.collect(lambda ms: ms[-1][1]["type"] == "end", timeout=30)
        _out, err = pipeline.communicate(timeout=60)  # reads its log as it exits: a full pipe would block it
        assert pipeline.returncode == 0, err[-2000:]
    finally:
        pipeline.kill()
        only_cam1.close(), everything.close()
    assert {m["camera"] for _, m in cam1_msgs} == {"cam1"}
    assert {t for t, _ in everything_msgs} == {b"det/cam1/", b"det/cam10/"}
    per_camera = {c: [m["frame"] for _, m in everything_msgs if m["camera"] == c and m["type"] == "detections"] for c in ("cam1", "cam10")}
    assert per_camera["cam1"] == per_camera["cam10"] == list(range(SHORT_FRAMES))
    assert [m["frame"] for _, m in cam1_msgs if m["type"] == "detections"] == per_camera["cam1"]


def test_subscribe_command_prints_messages(tmp_path):
    path, config = make_config(tmp_path, [{"id": "door", "url": str(BOTTLE_CLIP), "loop": True, "realtime": True}])
    pipeline = start_cli("--config", str(path))
    try:
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), "subscribe", "--connect", config["publish"]["bind"],
                                 "--camera", "door", "--count", "5", "--timeout", "90", "--summary"],
                                capture_output=True, text=True, timeout=120)
    finally:
        pipeline.terminate()
        pipeline.communicate(timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("door frame=") for line in lines)
