#!/usr/bin/env python3
"""Side-by-side speed of qcow2lib/qimg and the reference tools, reported as ratios.

    python3 bench/bench.py [--size-mib 1024] [--dir /tmp]

Each line times one job done both ways in the same run on the same files and prints
ours/theirs (below 1.0 means we are faster). Targets the engine is held to:
  convert          <= 1.0 x qemu-img convert
  read whole image <= 1.0 x pyqcow (libqcow's C binding), when installed
  random 4 KiB I/O <= 1.5 x qemu-img bench
  open 8 TiB image  < 50 ms
  nbdcopy from qimg nbd <= 1.2 x from qemu-nbd (same image, sequential copy)
Nothing here is a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qcow2lib  # noqa: E402

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
# As the console script runs it: imported (its bytecode cached), not compiled each run as
# a script would be.
QIMG = [sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1:2]; del sys.argv[1]; "
        "import qimg; sys.exit(qimg.main())", str(Path(__file__).resolve().parent.parent / "tools")]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(n: int, fn) -> float:
    return min(timed(fn) for _ in range(n))


# Bytecode caching on, as for an installed qimg (pip compiles it): with
# PYTHONDONTWRITEBYTECODE set, every run would compile qimg and qcow2lib again.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, env=ENV)


def bench_run(args) -> float:
    """The seconds a `bench` command reports for its run (start-up not included)."""
    out = subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True,
                         env=ENV)
    return float(out.stdout.rsplit("Run completed in ", 1)[1].split()[0])


def make_source(directory: Path, size: int) -> Path:
    """A qcow2 image, 3/4 written with mixed (partly compressible) data, 1/4 holes."""
    path = directory / "src.qcow2"
    qcow2lib.create(str(path), size)
    rng = random.Random(1)
    chunk = 4 << 20
    with qcow2lib.open(str(path), "r+") as image:
        for offset in range(0, size, chunk):
            if rng.random() < 0.75:
                data = rng.randbytes(chunk // 2) + bytes([rng.randrange(256)]) * (chunk // 2)
                image.write(offset, data)
    return path


def report(name: str, ours: float, theirs: float, target: str) -> None:
    print(f"{name:<34} ours {ours:8.3f}s  theirs {theirs:8.3f}s  ratio {ours / theirs:6.2f}  "
          f"(target {target})")


@contextlib.contextmanager
def nbd_server(command: list, sock: Path):
    """A persistent NBD server process on `sock` while inside; yields its URL."""
    process = subprocess.Popen([str(a) for a in command], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start: exit {process.poll()}")
                time.sleep(0.05)
            finally:
                probe.close()
        yield f"nbd+unix:///?socket={sock}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def bench_exports(directory: Path, src: Path, count: int) -> None:
    """The same clients against `qimg nbd` and `qemu-nbd` serving the same image, one
    server at a time."""
    servers = {"qimg": [*QIMG, "nbd", "-f", "qcow2", "-t", "-e", "0"],
               "qemu": ["qemu-nbd", "-f", "qcow2", "-t", "-e", "0", "--cache=writeback"]}
    copy, reads, writes = {}, {}, {}
    for who, command in servers.items():
        sock = directory / f"{who}.sock"
        with nbd_server([*command, "-r", "-k", sock, src], sock) as url:
            copy[who] = best_of(2, lambda: run(["nbdcopy", url, "null:"]))
            reads[who] = min(bench_run([QEMU_IMG, "bench", "-f", "raw", "-c", str(count),
                                        "-d", "16", "-s", "4k", "-S", "1M", url])
                             for _ in range(2))
        with nbd_server([*command, "-k", sock, src], sock) as url:
            writes[who] = min(bench_run([QEMU_IMG, "bench", "-w", "-f", "raw", "-c",
                                         str(count), "-d", "16", "-s", "4k", "-S", "1M", url])
                              for _ in range(2))
    report("nbdcopy from NBD server", copy["qimg"], copy["qemu"], "<= 1.2 x qemu-nbd")
    report("qemu-img bench 4 KiB reads on NBD", reads["qimg"], reads["qemu"], "vs qemu-nbd")
    report("qemu-img bench 4 KiB writes on NBD", writes["qimg"], writes["qemu"], "vs qemu-nbd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--only", choices=["exports"], default=None,
                        help="run only the NBD export cases")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        src = make_source(directory, size)
        if args.only == "exports":
            bench_exports(directory, src, 20000)
            return
        raw = directory / "src.raw"
        run([QEMU_IMG, "convert", "-O", "raw", src, raw])

        for label, source, fmt, out_fmt in (("convert qcow2 -> raw", src, "qcow2", "raw"),
                                            ("convert raw -> qcow2", raw, "raw", "qcow2"),
                                            ("convert qcow2 -> qcow2 -c", src, "qcow2", "qcow2 -c")):
            extra = ["-c"] if out_fmt.endswith("-c") else []
            out = directory / "out.img"
            theirs = best_of(2, lambda: run([QEMU_IMG, "convert", "-f", fmt, "-O",
                                             out_fmt.split()[0], *extra, source, out]))
            ours = best_of(2, lambda: run([*QIMG, "convert", "-f", fmt, "-O", out_fmt.split()[0],
                                           *extra, source, out]))
            report(label, ours, theirs, "<= 1.0")

        def read_all_ours() -> None:
            with qcow2lib.open(str(src)) as image:
                buf = bytearray(4 << 20)
                for offset in range(0, image.size, len(buf)):
                    image.readinto(offset, buf)

        try:
            import pyqcow

            def read_all_pyqcow() -> None:
                handle = pyqcow.file()
                handle.open(str(src))
                for offset in range(0, size, 4 << 20):
                    handle.read_buffer_at_offset(4 << 20, offset)
                handle.close()

            report("read whole image (API)", best_of(3, read_all_ours), best_of(3, read_all_pyqcow),
                   "<= 1.0 x pyqcow")
        except ImportError:
            print("read whole image: pyqcow not installed (pip install libqcow-python)")

        count = 20000

        def random_io(write: bool) -> None:
            rng = random.Random(2)
            block = bytearray(4096)
            with qcow2lib.open(str(src), "r+") as image:
                for _ in range(count):
                    offset = rng.randrange(size // 4096) * 4096
                    if write:
                        image.write(offset, block)
                    else:
                        image.readinto(offset, block)

        for write in (False, True):
            flag = ["-w"] if write else []
            theirs = best_of(2, lambda: run([QEMU_IMG, "bench", *flag, "-c", str(count), "-d", "1",
                                             "-s", "4k", "-t", "writeback", "-i", "threads", src]))
            ours = best_of(2, lambda: random_io(write))
            report(f"random 4 KiB {'writes' if write else 'reads'} x{count}", ours, theirs,
                   "<= 1.5 x qemu-img bench")
            # The same `bench` command through both tools, each timing only its run (a
            # 1 MiB step spreads the requests over the image, as random I/O would).
            args = ["bench", *flag, "-c", str(count), "-d", "1", "-s", "4k", "-S", "1M",
                    "-t", "writeback", src]
            report(f"bench 4 KiB {'writes' if write else 'reads'} (same command)",
                   min(bench_run([*QIMG, *args]) for _ in range(2)),
                   min(bench_run([QEMU_IMG, *args]) for _ in range(2)), "<= 1.5")

        if shutil.which("nbdcopy") and shutil.which("qemu-nbd"):
            bench_exports(directory, src, count)
        else:
            print("NBD exports: nbdcopy (libnbd-bin) or qemu-nbd not installed")

        big = directory / "big.qcow2"
        qcow2lib.create(str(big), 8 << 40)

        def open_big() -> None:
            qcow2lib.open(str(big)).close()

        print(f"{'open 8 TiB image':<34} ours {best_of(5, open_big) * 1000:8.2f} ms (target < 50 ms)")


if __name__ == "__main__":
    main()
