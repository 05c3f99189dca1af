"""One timed API run in a fresh process, for bench/bench.py.

    python3 bench/worker.py '{"op": "read", "impl": "ours", "path": ..., ...}'

Prints {"seconds": ...} as its last line: the time of the work itself (opening the image
included where the operation says so), interpreter start-up and imports excluded. The
parent reads this process's peak RSS from os.wait4.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_whole(impl: str, path: str, bufsize: int, mode: str) -> float:
    """Read the whole guest disk in bufsize pieces: read() makes new bytes per call,
    readinto() fills one buffer. Open and close are inside the timing."""
    if impl == "ours":
        import qcow2lib

        start = time.perf_counter()
        with qcow2lib.open(path) as image:
            size = image.size
            if mode == "readinto":
                buf = bytearray(bufsize)
                view = memoryview(buf)
                for offset in range(0, size, bufsize):
                    image.readinto(offset, view[: min(bufsize, size - offset)])
            else:
                for offset in range(0, size, bufsize):
                    image.read(offset, min(bufsize, size - offset))
        return time.perf_counter() - start
    if impl == "pyqcow":
        import pyqcow

        start = time.perf_counter()
        handle = pyqcow.file()
        handle.open(path)
        size = handle.get_media_size()
        for offset in range(0, size, bufsize):
            handle.read_buffer_at_offset(min(bufsize, size - offset), offset)
        handle.close()
        return time.perf_counter() - start
    if impl == "dissect":
        from dissect.hypervisor.disk.qcow2 import QCow2

        start = time.perf_counter()
        with open(path, "rb") as fh:
            stream = QCow2(fh).open()
            size = stream.size
            stream.seek(0)
            for offset in range(0, size, bufsize):
                stream.read(min(bufsize, size - offset))
        return time.perf_counter() - start
    raise ValueError(f"unknown implementation {impl!r}")


def random_io(
    path: str, count: int, threads: int, step: int, write: bool, bufsize: int = 4096
) -> float:
    """The requests `qemu-img bench -c count -d threads -s bufsize -S step` makes, from
    `threads` threads: request i at (i * step) % size. The I/O loop is timed, as the
    `Run completed in` time of qemu-img bench (open and close are not)."""
    import qcow2lib

    with qcow2lib.open(path, "r+" if write else "r") as image:
        size = image.size

        def run(first: int) -> None:
            buf = bytearray(b"\xa5" * bufsize)
            for index in range(first, count, threads):
                offset = (index * step) % size
                if write:
                    image.write(offset, buf)
                else:
                    image.readinto(offset, buf)

        start = time.perf_counter()
        if threads == 1:
            run(0)
        else:
            pool = [threading.Thread(target=run, args=(first,)) for first in range(threads)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
        return time.perf_counter() - start


def open_close(path: str) -> float:
    import qcow2lib

    start = time.perf_counter()
    qcow2lib.open(path).close()
    return time.perf_counter() - start


def info(path: str) -> float:
    """What `qimg info` does besides starting: open the image and describe it."""
    from qcow2lib.ops.info import image_info_list

    start = time.perf_counter()
    image_info_list(path)
    return time.perf_counter() - start


def main() -> None:
    spec = json.loads(sys.argv[1])
    op = spec.pop("op")
    seconds = {"read": read_whole, "randio": random_io, "open": open_close, "info": info}[op](
        **spec
    )
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
