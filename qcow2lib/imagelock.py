"""The image lock: a reentrant lock whose waiters do not queue up behind the GIL."""

from __future__ import annotations

from _thread import RLock
from time import sleep

# Times a waiter lets the GIL go and tries again before it blocks on the lock.
_YIELDS = 8


class ImageLock:
    """A reentrant lock (an RLock underneath) for critical sections that mostly run
    without letting the GIL go: translating a request, a copy from the page cache.

    Why not a plain RLock: a thread blocked in its acquire owns the lock the moment the
    holder releases it, before it has the GIL. The holder, still running, then blocks on
    its own next request, handing the GIL to the new owner, and so on: every request
    waits for two hand-overs of the GIL, a convoy that a single preemption inside a
    section starts and that never ends while the threads keep asking (8 threads of 4 KiB
    cached reads took 2.7 times as long as one thread making them all). Here a waiter
    first lets the GIL go (time.sleep(0)) and retries without blocking, a few times: the
    holder finishes its section meanwhile, and whoever runs next takes the lock that is
    then free. Only a holder that waits for the disk makes waiters block.

    `with lock:` waits that way; `acquire` and `release` are the RLock's own (for the
    rare callers that take the lock by hand), as are the methods threading.Condition
    uses, so that a Condition can be built on this lock.
    """

    __slots__ = ("acquire", "release", "_is_owned", "_release_save", "_acquire_restore")

    def __init__(self) -> None:
        rlock = RLock()
        self.acquire = rlock.acquire
        self.release = rlock.release
        # (the methods threading.Condition uses, which typeshed leaves out)
        self._is_owned = rlock._is_owned  # type: ignore[attr-defined]
        self._release_save = rlock._release_save  # type: ignore[attr-defined]
        self._acquire_restore = rlock._acquire_restore  # type: ignore[attr-defined]

    def __enter__(self) -> bool:
        acquire = self.acquire
        if acquire(False):
            return True
        for _ in range(_YIELDS):
            sleep(0)
            if acquire(False):
                return True
        return acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
