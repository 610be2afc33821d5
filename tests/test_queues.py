"""Queue policies, end of stream, and the fan-in that merges cameras."""

import threading
import time

from pipeline.buffers import HostSlotPool
from pipeline.queues import CLOSED, BoundedQueue, FanIn


def test_block_policy_waits_for_room():
    q = BoundedQueue(2, "block")
    assert q.put(1) and q.put(2)
    assert q.put(3, timeout=0.05) is False  # full: the producer waits, nothing is dropped
    threading.Timer(0.05, q.get).start()
    assert q.put(3, timeout=2.0)
    assert [q.get(), q.get()] == [2, 3] and q.dropped == 0


def test_drop_oldest_keeps_the_newest_and_counts():
    dropped = []
    q = BoundedQueue(2, "drop_oldest", on_drop=dropped.append)
    for i in range(5):
        q.put(i)
    assert [q.get(), q.get()] == [3, 4]
    assert q.dropped == 3 and dropped == [0, 1, 2]


def test_drop_newest_counts():
    q = BoundedQueue(1, "drop_newest")
    assert q.put("a") and not q.put("b")
    assert q.get() == "a" and q.dropped == 1


def test_close_drains_then_reports_closed_and_wakes_waiters():
    q = BoundedQueue(4)
    q.put(1)
    q.close()
    assert q.get() == 1
    assert q.get() is CLOSED
    assert q.put(2) is False
    waiting = BoundedQueue(1)
    result = []
    t = threading.Thread(target=lambda: result.append(waiting.get()))
    t.start()
    time.sleep(0.05)
    waiting.close()
    t.join(1)
    assert result == [CLOSED]


def test_fan_in_takes_turns_and_never_waits_on_a_silent_camera():
    busy, silent, other = BoundedQueue(10), BoundedQueue(10), BoundedQueue(10)
    for i in range(3):
        busy.put(("busy", i))
        other.put(("other", i))
    fan = FanIn([busy, silent, other])
    got = [fan.get(timeout=0.1) for _ in range(6)]
    assert got == [("busy", 0), ("other", 0), ("busy", 1), ("other", 1), ("busy", 2), ("other", 2)]
    started = time.monotonic()
    assert fan.get(timeout=0.1) is None and time.monotonic() - started < 0.5
    busy.close(), other.close()
    assert fan.get(timeout=0.1) is None  # one camera still open
    silent.close()
    assert fan.get(timeout=0.1) is CLOSED


def test_fan_in_wakes_on_put_from_another_thread():
    q = BoundedQueue(2)
    fan = FanIn([q])
    threading.Timer(0.05, q.put, args=("x",)).start()
    assert fan.get(timeout=2.0) == "x"


def test_slot_pool_applies_back_pressure():
    pool = HostSlotPool(2, (4, 8, 8, 3))
    a, b = pool.acquire(), pool.acquire()
    assert a.array.shape == (4, 8, 8, 3) and a is not b
    assert pool.acquire(timeout=0.05) is None
    pool.release(a)
    assert pool.acquire(timeout=0.05) is a
    pool.close()
    assert pool.acquire(timeout=0.05) is None
