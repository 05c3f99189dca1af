"""The image lock (qcow2lib.imagelock.ImageLock): still a reentrant lock, whatever way
its waiters wait; its speed is bench.py's (the random-read rows with 8 threads)."""

from __future__ import annotations

import threading
import time

from qcow2lib.imagelock import ImageLock


def test_reentrant_and_owned():
    lock = ImageLock()
    assert not lock._is_owned()
    with lock:
        with lock:
            assert lock._is_owned()
        assert lock._is_owned()
    assert not lock._is_owned()
    assert lock.acquire(False)
    lock.release()


def test_excludes_threads_whose_sections_let_the_gil_go():
    """8 threads add to a counter, reading it and writing it back around calls that let
    the GIL go (sleep(0), and a real sleep now and then, longer than the waiters' turns
    at retrying): no addition is lost."""
    lock = ImageLock()
    state = {"count": 0, "inside": 0, "overlaps": 0}

    def add(index: int) -> None:
        for step in range(300):
            with lock:
                state["inside"] += 1
                if state["inside"] != 1:
                    state["overlaps"] += 1
                value = state["count"]
                time.sleep(0.002 if step % 100 == index else 0)
                state["count"] = value + 1
                state["inside"] -= 1

    threads = [threading.Thread(target=add, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert state["count"] == 8 * 300 and state["overlaps"] == 0


def test_a_waiter_gets_the_lock_a_slow_holder_lets_go():
    """A holder that keeps the lock while it waits (the GIL let go) makes a waiter block,
    not spin for ever: the waiter gets the lock right after the release."""
    lock = ImageLock()
    held, got = threading.Event(), []

    def holder() -> None:
        with lock:
            held.set()
            time.sleep(0.3)
            got.append("holder done")

    def waiter() -> None:
        assert held.wait(10)
        with lock:
            got.append("waiter in")

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert got == ["holder done", "waiter in"]


def test_a_condition_waits_on_it_held_twice():
    """threading.Condition built on the lock (as the image's _wait): a wait lets go of
    every level of a reentrant hold and takes them all back."""
    lock = ImageLock()
    condition = threading.Condition(lock)
    ready = []

    def notifier() -> None:
        with lock:  # (only once the waiter let go of both levels)
            ready.append(True)
            condition.notify_all()

    with lock:
        with lock:
            thread = threading.Thread(target=notifier)
            thread.start()
            assert condition.wait_for(lambda: ready, timeout=10)
            assert lock._is_owned()
        assert lock._is_owned()
    thread.join(10)
    assert not lock._is_owned()
