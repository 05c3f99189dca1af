"""Fuzzing: valid images with damaged metadata, opened, read, checked, repaired and written.

Each case starts from a small image made by the real qemu-img/qemu-io (plain v2/v3, tiny
and odd clusters, compressed zlib/zstd, extended L2, snapshots, lazy refcounts, refcount
widths 1 and 64, backing files, external data files, persistent bitmaps, LUKS and legacy
AES encryption) and applies one to three mutations chosen by hypothesis. A mutation hits
one structure the test finds with its own parser (independent of the engine): a header
field, a header extension, the backing name, an L1/L2 entry, a compressed cluster
descriptor or its payload, the refcount table or a refcount block, the snapshot table or
a snapshot's L1 table, the bitmap directory, the LUKS header or a key slot, any byte, or
the file's length.

The damaged image is then put through everything a user can do to it (`run_case` in the
worker): open it read-only with its chain and read it (and each internal snapshot),
`qimg info`/`snapshot -l`/`check`, `check -r all`, open it read-write, `image.check("all")`,
write (data, zeroes, discard, compressed, a snapshot), flush and close. The rules:

* the only exception allowed to escape the engine or qimg is `Qcow2Error`;
* no case uses more than CASE_CPU_SECONDS (3 s; FUZZ_CPU_LIMIT) of CPU (CPU time, so
  that a loaded machine does not fail the test), nor hangs (still running after
  WALL_LIMIT: killed). The heaviest kept cases do linear work that takes 1-1.7 s on the
  machine they were found on (l1-65536-entries-over-itself: two `qimg check` runs that
  print 4.26 million lines, 250 MB, each; luks-l1-size-65535); CI machines have run
  1.2-1.3 times slower, and the quadratic blow-ups this limit is for took 4.6 s and more;
* no case grows the worker's address space by more than 256 MiB (RLIMIT_AS);
* nothing is written to any file but the image (and the external data file it was made
  with): the engine's host files are watched, and every other file in the case directory
  must keep its bytes, with no new files appearing;
* a write that succeeded reads back.

The cases run in a separate worker process (limits apply to it, and a hang can be
killed); hypothesis runs here. Each mutation hits a structure the seed really has.

Found crashers are kept in tests/fixtures/fuzz/ (listed in MANIFEST there) and replayed
by test_fuzz_regressions. FUZZ_EXAMPLES (default 500) sets the number of generated cases;
FUZZ_RANDOM=1 draws new cases instead of the fixed (derandomized) sequence; FUZZ_COLLECT=dir
keeps going past failures and writes each failing case there (for hunting; the test then
only reports); FUZZ_SHRINK=1 lets hypothesis shrink a failure.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":  # the worker process: import the package from this checkout
    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

FIXTURES = ROOT / "tests" / "fixtures" / "fuzz"
CASE_CPU_SECONDS = float(os.environ.get("FUZZ_CPU_LIMIT", "3.0"))
WALL_LIMIT = 15.0  # a case still running after this is a hang: the worker is killed
MEMORY_LIMIT = 256 << 20  # address space a case may add to the worker's
FUZZ_KDF_BLOCKS = 1_000_000  # the worker's LUKS key derivation budget (see worker_main)
RESTART_EVERY = 100  # cases per worker process
READ_CAP = 4 << 20  # bytes read from the start of the guest disk (and 1 MiB at its end)
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
PASSPHRASE = "pw"

# qcow2 constants (docs/interop/qcow2.txt), kept here so the fuzzer does not trust the engine.
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
INCOMPAT_EXTL2 = 1 << 4
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

HEADER_FIELDS = [  # (name, offset, width) of the fixed header
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
]
HEADER_V3_FIELDS = [
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
]
LUKS_FIELDS = [  # (name, offset, width); width 0 = a byte string of that field's length
    ("magic", 0, -6),
    ("version", 6, 2),
    ("cipher_name", 8, -32),
    ("cipher_mode", 40, -32),
    ("hash_spec", 72, -32),
    ("payload_offset", 104, 4),
    ("key_bytes", 108, 4),
    ("mk_digest", 112, -20),
    ("mk_digest_salt", 132, -32),
    ("mk_digest_iter", 164, 4),
    ("uuid", 168, -40),
]
LUKS_SLOT_FIELDS = [
    ("active", 0, 4),
    ("iterations", 4, 4),
    ("salt", 8, -32),
    ("key_offset", 40, 4),
    ("stripes", 44, 4),
]


# ---------------------------------------------------------------------------------------------
# The worker: runs one case at a time under the limits, answers one JSON line per case
# ---------------------------------------------------------------------------------------------


def run_case(image: str, passphrase: str | None, report: dict) -> None:
    """Everything a user does to an image; Qcow2Error is fine anywhere, nothing else is."""
    import qcow2lib
    import qimg
    from qcow2lib import Qcow2Error
    from qcow2lib import snapshots as snaps

    errors = report["qcow2_errors"]

    times = report.setdefault("times", {})

    @contextlib.contextmanager
    def step(name: str):
        report["step"] = name
        start = time.process_time()
        try:
            yield
        except Qcow2Error as exc:
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
        except BaseException:
            report.setdefault("failed_step", name)  # the innermost step that failed
            raise
        finally:
            times[name] = times.get(name, 0) + time.process_time() - start

    def cli(*args: str) -> None:
        name = report["step"] = "qimg " + " ".join(args)
        out, err = io.StringIO(), StderrWatch()
        start = time.process_time()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                qimg.main([*args, image], prog="qimg")
        except BaseException:
            report.setdefault("failed_step", name)
            raise
        times[name] = time.process_time() - start
        text = err.text()
        if "Traceback" in text:
            raise AssertionError(
                f"qimg {' '.join(args)} printed a traceback:\n"
                f"{text[text.index('Traceback') :][: 64 << 10]}"
            )

    def read_all(dev) -> None:
        size = dev.size
        end = min(size, READ_CAP)
        for pos in range(0, end, 1 << 20):
            dev.read(pos, min(1 << 20, end - pos))
        if size > end:
            tail = max(end, size - (1 << 20))
            dev.read(tail, size - tail)
        dev.extents(0, end)

    with step("open r, read everything"):
        with qcow2lib.open(image, "r", passphrase=passphrase) as dev:
            read_all(dev)
            listed = []
            if dev.format == "qcow2":
                with step("list snapshots"):
                    listed = [s.id for s in snaps.list_snapshots(dev)][:4]
        for snap_id in listed:
            with step(f"read snapshot {snap_id}"):
                with qcow2lib.open(image, "r", passphrase=passphrase, snapshot=snap_id) as view:
                    read_all(view)

    cli("info")
    cli("info", "--output=json", "--backing-chain")
    cli("snapshot", "-l")
    cli("check")
    cli("check", "--output=json")
    with step("open r, check()"):
        with qcow2lib.open(image, "r", passphrase=passphrase, backing=False) as dev:
            if dev.format == "qcow2":
                dev.check()
    cli("check", "-r", "all")

    with step("open r+"):
        dev = qcow2lib.open(image, "r+", passphrase=passphrase)
        try:
            if dev.format == "qcow2":
                with step("check('all')"):
                    dev.check("all")
            size = dev.size
            cs = getattr(dev, "cluster_size", 512)
            writes = [(0, 4096), (size // 2 // 512 * 512, 3 * 512 + 17), (max(0, size - 700), 700)]
            for number, (offset, length) in enumerate(writes):
                length = min(length, size - offset)
                if length <= 0:
                    continue
                data = bytes([0x41 + number]) * length
                with step(f"write {offset}+{length}"):
                    dev.write(offset, data)
                    back = dev.read(offset, length)
                    if back != data:
                        raise AssertionError(
                            f"a write of {length} bytes at {offset} that "
                            f"succeeded does not read back"
                        )
            if size >= 2 * cs:
                with step("write_zeroes"):
                    dev.write_zeroes(cs // 2, cs, may_unmap=True)
                    if dev.read(cs // 2, cs) != bytes(cs):
                        raise AssertionError("write_zeroes that succeeded does not read zeros")
                with step("discard"):
                    dev.discard(0, 2 * cs)
            if dev.format == "qcow2" and size >= cs and not dev.encrypted and not dev.data_file:
                with step("write_compressed"):
                    block = (b"fuzz" * (cs // 4 + 1))[:cs]
                    dev.write_compressed(0, block)
                    if dev.read(0, cs) != block:
                        raise AssertionError("a compressed write that succeeded does not read back")
            if dev.format == "qcow2":
                with step("create_snapshot"):
                    snaps.create_snapshot(dev, "fuzz")
                if size:
                    with step("write after snapshot"):
                        dev.write(0, b"Z" * min(size, 512))
            with step("flush"):
                dev.flush()
        finally:
            with step("close"):
                dev.close()


class StderrWatch:
    """qimg's stderr in the worker: the first 64 KiB, and 64 KiB from the first traceback on.

    `check` of a badly damaged image prints every problem as qemu-img does: up to millions
    of lines (hundreds of MB), which kept whole would count against the case's memory
    limit. Only tracebacks matter here, and the search for one runs in C."""

    KEEP = 64 << 10

    def __init__(self) -> None:
        self.head: list[str] = []
        self.head_size = 0
        self.traceback: list[str] | None = None
        self.traceback_size = 0

    def write(self, text: str) -> int:
        if self.head_size < self.KEEP:
            self.head.append(text[: self.KEEP - self.head_size])
            self.head_size += len(self.head[-1])
        if self.traceback is None:
            at = text.find("Traceback")
            if at >= 0:
                self.traceback = [text[at : at + self.KEEP]]
                self.traceback_size = len(self.traceback[0])
        elif self.traceback_size < self.KEEP:
            self.traceback.append(text[: self.KEEP - self.traceback_size])
            self.traceback_size += len(self.traceback[-1])
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.head) + "".join(self.traceback or ())


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_main() -> None:
    """Read case requests (JSON lines) on stdin, answer each with one JSON line."""
    import resource
    import threading
    import traceback

    from qcow2lib import codecs, hostfile

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray output must not reach the protocol pipe
    state: dict = {"allowed": set(), "violations": []}

    class WatchedHostFile(hostfile.HostFile):
        """Reports any write, truncate or hole punch to a file other than the image's own."""

        def _watch(self, what: str) -> None:
            real = os.path.realpath(self.path)
            if real not in state["allowed"]:
                state["violations"].append(f"{what} on {self.path}")

        def __init__(self, path, writable=False, create=False):
            super().__init__(path, writable=writable, create=create)
            if writable or create:
                self._watch("open for writing")

        def pwrite(self, data, offset):
            self._watch("write")
            return super().pwrite(data, offset)

        def pwritev(self, buffers, offset):
            self._watch("write")
            return super().pwritev(buffers, offset)

        def truncate(self, length):
            self._watch("truncate")
            return super().truncate(length)

        def punch_hole(self, offset, length):
            self._watch("punch hole")
            return super().punch_hole(offset, length)

    hostfile.host_file_class = WatchedHostFile
    # LUKS key derivation may cost an open minutes of CPU (MAX_KDF_BLOCKS: what qemu-img's
    # own slow settings make, on a faster machine): a mutated iteration count within that
    # budget is a valid header, not a hang, but breaks CASE_CPU_SECONDS. The worker's budget
    # is cut to 10 times what the base images' slots cost (about 100k blocks: iter-time=10),
    # so that a mutated count is refused at once, as one past the real budget is.
    from qcow2lib.crypto import luks

    luks.MAX_KDF_BLOCKS = FUZZ_KDF_BLOCKS
    # Start every thread the engine will ever use now, so the limit only meets case data.
    warm_threads = [0.02] * (4 * (os.cpu_count() or 2))
    list(codecs.pool().map(time.sleep, warm_threads))
    warm = json.loads(sys.stdin.readline())
    os.chdir(warm["dir"])
    try:
        state["allowed"] = {os.path.realpath(p) for p in warm["allowed"]}
        run_case(warm["image"], warm.get("passphrase"), {"qcow2_errors": [], "step": ""})
    except BaseException:  # noqa: BLE001 - the warm-up image is valid; report anyway
        proto.write(json.dumps({"ready": False, "error": traceback.format_exc()}) + "\n")
        return
    list(codecs.pool().map(time.sleep, warm_threads))
    baseline = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (baseline + MEMORY_LIMIT, baseline + MEMORY_LIMIT))
    proto.write(
        json.dumps({"ready": True, "baseline": baseline, "threads": threading.active_count()})
        + "\n"
    )
    for line in sys.stdin:
        request = json.loads(line)
        os.chdir(request["dir"])
        state["allowed"] = {os.path.realpath(p) for p in request["allowed"]}
        state["violations"] = []
        report: dict = {"qcow2_errors": [], "step": "", "failure": None, "times": {}}
        cpu0, wall0 = time.process_time(), time.monotonic()
        try:
            run_case(request["image"], request.get("passphrase"), report)
        except MemoryError:
            where = report.get("failed_step", report["step"])
            report["failure"] = (
                f"MemoryError in step {where!r}: the case needed more "
                f"than {MEMORY_LIMIT >> 20} MiB\n{traceback.format_exc()}"
            )
        except BaseException as exc:  # noqa: BLE001 - this is what the fuzzer hunts
            where = report.get("failed_step", report["step"])
            report["failure"] = (
                f"{type(exc).__module__}.{type(exc).__name__} escaped in step "
                f"{where!r}: {exc!r}\n{traceback.format_exc()}"
            )
        report["cpu"] = time.process_time() - cpu0
        report["wall"] = time.monotonic() - wall0
        report["violations"] = state["violations"]
        report["vm_peak"] = _vm_size() - baseline
        proto.write(json.dumps(report) + "\n")


class Worker:
    """The parent's handle on the worker process (restarted after a hang or a crash)."""

    def __init__(self, warm_up: "Case"):
        self.warm_up = warm_up
        self.proc: subprocess.Popen | None = None
        self.cases = 0
        self.log = warm_up.directory.parent / "worker-stderr.log"

    def _start(self) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="1", PYTHONHASHSEED="0")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--fuzz-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"),
            env=env,
            cwd=str(ROOT),
        )
        self.warm_up.reset()
        self._send(self.warm_up.request())
        answer = self._receive(60)
        if not answer or not answer.get("ready"):
            raise RuntimeError(
                f"the fuzz worker did not start: {answer}\n"
                f"{self.log.read_text(errors='replace')[-3000:]}"
            )

    def _send(self, request: dict) -> None:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return {
                    "failure": f"the worker died (exit {self.proc.wait()}); stderr:\n"
                    f"{self.log.read_text(errors='replace')[-3000:]}"
                }
            buf += chunk
        return json.loads(buf)

    def run(self, case: "Case") -> dict:
        if self.proc is not None and self.cases >= RESTART_EVERY:
            self.stop()  # a long-lived heap only grows: start afresh now and then
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            self.cases = 0
        self.cases += 1
        self._send(case.request())
        answer = self._receive(WALL_LIMIT)
        if answer is None:
            self.stop()
            return {
                "failure": f"hang: the case was still running after {WALL_LIMIT} s",
                "qcow2_errors": [],
                "violations": [],
            }
        if "cpu" not in answer:  # the worker died
            self.stop()
        return answer

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None


# ---------------------------------------------------------------------------------------------
# Base images and cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Base:
    """A valid image (and the files it needs next to it) to mutate."""

    name: str
    image: bytes
    sidecars: dict[str, bytes]  # other files of the case directory (backing, data file)
    data_file: str | None = None  # the sidecar the image may write (its external data file)
    passphrase: str | None = None


class Case:
    """One directory holding a (possibly mutated) image and its sidecars."""

    def __init__(self, directory: Path, base: Base, image: bytes):
        self.directory = directory
        self.base = base
        self.image = image

    @property
    def path(self) -> Path:
        return self.directory / "img.qcow2"

    def reset(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self.path.write_bytes(self.image)
        for name, content in self.base.sidecars.items():
            (self.directory / name).write_bytes(content)

    def request(self) -> dict:
        allowed = [str(self.path)]
        if self.base.data_file:
            allowed.append(str(self.directory / self.base.data_file))
        return {
            "dir": str(self.directory),
            "image": str(self.path),
            "allowed": allowed,
            "passphrase": self.base.passphrase,
        }

    def others(self) -> dict[str, str]:
        """Digest of every file but the image (and its data file), by name."""
        result = {}
        for entry in sorted(self.directory.rglob("*")):
            rel = str(entry.relative_to(self.directory))
            if rel in ("img.qcow2", self.base.data_file):
                continue
            result[rel] = (
                hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
            )
        return result


def verdict(case: Case, answer: dict, before: dict[str, str]) -> str | None:
    """None if the case behaved, else what went wrong."""
    problems = []
    if answer.get("failure"):
        problems.append(answer["failure"])
    if answer.get("cpu", 0) > CASE_CPU_SECONDS:
        slowest = sorted(answer.get("times", {}).items(), key=lambda kv: -kv[1])[:3]
        problems.append(
            f"slow: the case used {answer['cpu']:.2f} s of CPU (limit "
            f"{CASE_CPU_SECONDS} s, wall {answer['wall']:.2f} s; slowest steps: "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in slowest)
            + ")"
        )
    if answer.get("violations"):
        problems.append(f"wrote outside the image: {answer['violations'][:5]}")
    after = case.others()
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"files other than the image changed or appeared: {changed}")
    return "\n".join(problems) or None


def qemu(*args, cwd=None) -> None:
    from qemutools import run  # (here: the worker process never needs it)

    result = run(args, check=False, cwd=cwd)
    if result.returncode:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed ({result.returncode}): "
            f"{result.stdout}{result.stderr}"
        )


def build_bases(directory: Path) -> dict[str, Base]:
    """The seed images, made by qemu-img/qemu-io, each small (virtual size at most 4 MiB)."""
    directory.mkdir(parents=True, exist_ok=True)
    bases: dict[str, Base] = {}

    def io_cmds(path, *commands, extra=()):
        args = ["qemu-io", *extra]
        for command in commands:
            args += ["-c", command]
        qemu(*args, path, cwd=directory)

    def create(name, size, options="", *extra):
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if options:
            args += ["-o", options]
        qemu(*args, *extra, name, size, cwd=directory)

    def add(key, name="img.qcow2", sidecars=(), data_file=None, passphrase=None):
        bases[key] = Base(
            key,
            (directory / name).read_bytes(),
            {s: (directory / s).read_bytes() for s in sidecars},
            data_file,
            passphrase,
        )

    scattered = [
        "write -P 0x11 0 3k",
        "write -P 0x22 64k 4k",
        "write -P 0x33 300k 9k",
        "write -P 0x44 1M 512",
        "write -P 0x55 1984k 64k",
    ]

    # plain v3, 512-byte clusters: many L2 tables and refcount blocks
    (directory / "v3-512").mkdir()
    create("v3-512/img.qcow2", "2M", "cluster_size=512")
    io_cmds("v3-512/img.qcow2", *scattered, "write -z 8k 4k")
    # v2 (compat 0.10), 4 KiB clusters
    (directory / "v2").mkdir()
    create("v2/img.qcow2", "2M", "compat=0.10,cluster_size=4k")
    io_cmds("v2/img.qcow2", *scattered)
    # 64 KiB clusters, odd virtual size, zero clusters and a discard
    (directory / "v3-64k").mkdir()
    create("v3-64k/img.qcow2", "3000001")
    io_cmds("v3-64k/img.qcow2", *scattered[:4], "write -z 128k 128k", "discard 64k 64k")
    # snapshots: shared L2 tables, snapshot L1 tables, a VM-state-less table of two entries
    (directory / "snap").mkdir()
    create("snap/img.qcow2", "1M", "cluster_size=4k")
    io_cmds("snap/img.qcow2", "write -P 1 0 40k", "write -P 2 600k 8k")
    qemu("qemu-img", "snapshot", "-c", "first", "snap/img.qcow2", cwd=directory)
    io_cmds("snap/img.qcow2", "write -P 3 4k 4k", "write -P 4 900k 4k")
    qemu("qemu-img", "snapshot", "-c", "second", "snap/img.qcow2", cwd=directory)
    io_cmds("snap/img.qcow2", "write -P 5 8k 4k")
    # compressed clusters (zlib, 4 KiB; zstd, 512 bytes)
    for key, opts in (
        ("zlib", "cluster_size=4k"),
        ("zstd", "cluster_size=512,compression_type=zstd"),
    ):
        (directory / key).mkdir()
        raw = directory / key / "src.raw"
        noise = random.Random(f"seed-{key}").randbytes(8192)  # the same seeds every run
        raw.write_bytes(
            (b"compressible " * 40000)[: 256 << 10] + noise + bytes(64 << 10) + b"tail" * 4096
        )
        qemu(
            "qemu-img",
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            raw,
            f"{key}/img.qcow2",
            cwd=directory,
        )
        raw.unlink()
    # extended L2 (subcluster allocation and zero bits)
    (directory / "extl2").mkdir()
    create("extl2/img.qcow2", "2M", "extended_l2=on,cluster_size=16k")
    io_cmds(
        "extl2/img.qcow2",
        "write -P 7 0 1k",
        "write -P 8 20k 2k",
        "write -z 40k 1k",
        "write -P 9 1M 64k",
    )
    # lazy refcounts with the dirty bit set (refcounts rebuilt when opened read-write)
    (directory / "lazy").mkdir()
    create("lazy/img.qcow2", "1M", "lazy_refcounts=on,cluster_size=4k")
    io_cmds("lazy/img.qcow2", *scattered[:3])
    with open(directory / "lazy/img.qcow2", "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0] | 1
        f.seek(72)
        f.write(struct.pack(">Q", value))
    # refcount widths 1 and 64
    for key, opts in (
        ("rc1", "refcount_bits=1,cluster_size=4k"),
        ("rc64", "refcount_bits=64,cluster_size=512"),
    ):
        (directory / key).mkdir()
        create(f"{key}/img.qcow2", "1M", opts)
        io_cmds(f"{key}/img.qcow2", *scattered[:3])
    # backing chains: qcow2 and raw backing files (sidecars: must never change)
    (directory / "backing").mkdir()
    create("backing/base.qcow2", "1M", "cluster_size=4k")
    io_cmds("backing/base.qcow2", "write -P 0x61 0 256k")
    create("backing/img.qcow2", "1M", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2")
    io_cmds("backing/img.qcow2", "write -P 0x62 4k 4k", "write -P 0x63 200k 8k")
    (directory / "rawbacking").mkdir()
    (directory / "rawbacking/base.raw").write_bytes(b"backing!" * (64 << 10))
    create(
        "rawbacking/img.qcow2", "512k", "cluster_size=4k,compat=0.10", "-b", "base.raw", "-F", "raw"
    )
    io_cmds("rawbacking/img.qcow2", "write -P 0x64 4k 4k")
    # external data files (plain and data_file_raw)
    for key, opts in (
        ("datafile", "data_file=data.raw,cluster_size=4k"),
        ("datafile-raw", "data_file=data.raw,data_file_raw=on,cluster_size=4k"),
    ):
        (directory / key).mkdir()
        qemu(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "img.qcow2",
            "1M",
            cwd=directory / key,
        )  # QEMU takes a relative data file name from the cwd
        qemu(
            "qemu-io",
            *[a for c in scattered[:3] for a in ("-c", c)],
            "img.qcow2",
            cwd=directory / key,
        )
    # persistent bitmaps
    (directory / "bitmaps").mkdir()
    create("bitmaps/img.qcow2", "1M", "cluster_size=4k")
    qemu("qemu-img", "bitmap", "--add", "bitmaps/img.qcow2", "b0", cwd=directory)
    qemu(
        "qemu-img",
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "bitmaps/img.qcow2",
        "b1",
        cwd=directory,
    )
    # encryption: LUKS (with a small iteration count) and legacy AES
    secret = ["--object", f"secret,id=s0,data={PASSPHRASE}"]
    (directory / "luks").mkdir()
    qemu(
        "qemu-img",
        "create",
        "-q",
        *secret,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4k",
        "luks/img.qcow2",
        "256k",
        cwd=directory,
    )
    (directory / "aes").mkdir()
    qemu(
        "qemu-img",
        "create",
        "-q",
        *secret,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0,cluster_size=4k",
        "aes/img.qcow2",
        "256k",
        cwd=directory,
    )
    for key in ("luks", "aes"):
        qemu(
            "qemu-io",
            *secret,
            "--image-opts",
            "-c",
            "write -P 0x71 0 12k",
            "-c",
            "write -P 0x72 100k 4k",
            f"driver=qcow2,file.filename={key}/img.qcow2,encrypt.key-secret=s0",
            cwd=directory,
        )

    for key in (
        "v3-512",
        "v2",
        "v3-64k",
        "snap",
        "zlib",
        "zstd",
        "extl2",
        "lazy",
        "rc1",
        "rc64",
        "bitmaps",
    ):
        add(key, f"{key}/img.qcow2")
    add("backing", "backing/img.qcow2", sidecars=())
    bases["backing"].sidecars = {"base.qcow2": (directory / "backing/base.qcow2").read_bytes()}
    add("rawbacking", "rawbacking/img.qcow2")
    bases["rawbacking"].sidecars = {"base.raw": (directory / "rawbacking/base.raw").read_bytes()}
    for key in ("datafile", "datafile-raw"):
        add(key, f"{key}/img.qcow2")
        bases[key].sidecars = {"data.raw": (directory / key / "data.raw").read_bytes()}
        bases[key].data_file = "data.raw"
    for key in ("luks", "aes"):
        add(key, f"{key}/img.qcow2", passphrase=PASSPHRASE)
    return bases


# ---------------------------------------------------------------------------------------------
# Finding the structures to mutate (own parser, following the spec)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    offset: int
    width: int  # 1, 2, 4 or 8: a big-endian integer; negative: a byte string of -width bytes
    label: str


CATEGORIES = (
    "header",
    "extension",
    "backing_name",
    "l1",
    "l2",
    "compressed",
    "refcount_table",
    "refcount_block",
    "snapshot_table",
    "snapshot_l1",
    "bitmaps",
    "luks",
    "any_byte",
    "length",
)


def _u(data: bytes, offset: int, width: int) -> int:
    if offset < 0 or offset + width > len(data):
        return 0
    return int.from_bytes(data[offset : offset + width], "big")


def find_targets(data: bytes) -> dict[str, list[Target]]:
    """Every structure of a valid image the mutations may hit, by category."""
    found: dict[str, list[Target]] = {c: [] for c in CATEGORIES}

    def add(category, offset, width, label):
        size = abs(width)
        if 0 <= offset and offset + size <= len(data) and size:
            found[category].append(Target(offset, width, label))

    version = _u(data, 4, 4)
    cluster_bits = _u(data, 20, 4)
    tables = 9 <= cluster_bits <= 21  # a damaged cluster size leaves only the header to hit
    if not tables:
        cluster_bits = 16
    cs = 1 << cluster_bits
    for name, off, width in HEADER_FIELDS:
        add("header", off, width, name)
    header_length = 72
    incompat = 0
    refcount_order = 4
    if version >= 3:
        for name, off, width in HEADER_V3_FIELDS:
            add("header", off, width, name)
        header_length = _u(data, 100, 4)
        incompat = _u(data, 72, 8)
        refcount_order = _u(data, 96, 4)
        if header_length > 104:
            add("header", 104, 1, "compression_type")
    backing_offset, backing_size = _u(data, 8, 8), _u(data, 16, 4)
    if backing_offset:
        add("backing_name", backing_offset, -max(1, backing_size), "backing file name")
        for i in range(min(backing_size, 64)):
            add("backing_name", backing_offset + i, 1, f"backing name byte {i}")
    extl2 = bool(incompat & INCOMPAT_EXTL2)
    crypto_ext = bitmaps_ext = None
    pos = header_length
    while pos + 8 <= min(len(data), cs):
        ext_type, length = _u(data, pos, 4), _u(data, pos + 4, 4)
        add("extension", pos, 4, f"extension type at {pos}")
        add("extension", pos + 4, 4, f"extension length at {pos}")
        if ext_type == 0:
            break
        if length:
            add("extension", pos + 8, -min(length, 64), f"extension {ext_type:#x} data")
        if ext_type == EXT_CRYPTO:
            crypto_ext = (_u(data, pos + 8, 8), _u(data, pos + 16, 8))
            add("extension", pos + 8, 8, "crypto header offset")
            add("extension", pos + 16, 8, "crypto header length")
        elif ext_type == EXT_BITMAPS:
            bitmaps_ext = (_u(data, pos + 8, 4), _u(data, pos + 16, 8), _u(data, pos + 24, 8))
            for off, width, name in (
                (8, 4, "nb_bitmaps"),
                (12, 4, "reserved"),
                (16, 8, "bitmap_directory_size"),
                (24, 8, "bitmap_directory_offset"),
            ):
                add("bitmaps", pos + off, width, name)
        elif ext_type == EXT_FEATURE_TABLE:
            for entry in range(min(length // 48, 8)):
                add("extension", pos + 8 + entry * 48, 1, "feature type")
                add("extension", pos + 8 + entry * 48 + 1, 1, "feature bit")
        elif ext_type in (EXT_BACKING_FORMAT, EXT_DATA_FILE):
            add("extension", pos + 8, -max(1, min(length, 32)), f"{ext_type:#x} string")
        pos += 8 + (length + 7) // 8 * 8

    # L1 and L2 tables (the active ones), compressed descriptors and payloads
    def walk_l1(l1_offset, l1_size, category_l1, category_l2):
        for i in range(min(l1_size, cs // 8 * 4)):
            entry = _u(data, l1_offset + i * 8, 8)
            if entry or i < 2:
                add(category_l1, l1_offset + i * 8, 8, f"L1[{i}]")
            l2 = entry & OFFSET_MASK
            if not l2 or l2 + cs > len(data):
                continue
            step = 16 if extl2 else 8
            for j in range(cs // step):
                e = _u(data, l2 + j * step, 8)
                if not e and j % 64:
                    continue
                if category_l2 is None:
                    continue
                if e & OFLAG_COMPRESSED:
                    add("compressed", l2 + j * step, 8, f"compressed descriptor L2[{i}][{j}]")
                    x = 62 - (cluster_bits - 8)
                    host = e & ((1 << x) - 1)
                    sectors = ((e >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
                    add(
                        "compressed",
                        host,
                        -min(sectors * 512 - (host & 511), 64),
                        "compressed payload",
                    )
                    add("compressed", host, 1, "compressed payload first byte")
                else:
                    add(category_l2, l2 + j * step, 8, f"L2[{i}][{j}]")
                if extl2:
                    add(category_l2, l2 + j * step + 8, 8, f"L2 bitmap[{i}][{j}]")

    if tables:
        walk_l1(_u(data, 40, 8), _u(data, 36, 4), "l1", "l2")

    # refcount table and blocks
    rt_offset, rt_clusters = _u(data, 48, 8), _u(data, 56, 4)
    rc_bits = 1 << refcount_order if refcount_order < 7 else 16
    for i in range(min(rt_clusters * cs // 8, 4096) if tables else 0):
        entry = _u(data, rt_offset + i * 8, 8)
        if not entry and i > 1:
            continue
        add("refcount_table", rt_offset + i * 8, 8, f"reftable[{i}]")
        block = entry & OFFSET_MASK
        if block and block + cs <= len(data):
            width = max(1, rc_bits // 8)
            used = min(len(data) // cs + 2, cs * 8 // rc_bits)
            for k in range(0, used * rc_bits // 8, width):
                add("refcount_block", block + k, width, f"refblock {i} byte {k}")

    # snapshot table and the snapshots' L1 tables
    nb, snap_offset = _u(data, 60, 4), _u(data, 64, 8)
    pos = snap_offset
    for index in range(min(nb, 8) if tables else 0):
        for off, width, name in (
            (0, 8, "l1_table_offset"),
            (8, 4, "l1_size"),
            (12, 2, "id_str_size"),
            (14, 2, "name_size"),
            (16, 4, "date_sec"),
            (20, 4, "date_nsec"),
            (24, 8, "vm_clock_nsec"),
            (32, 4, "vm_state_size"),
            (36, 4, "extra_data_size"),
        ):
            add("snapshot_table", pos + off, width, f"snapshot {index} {name}")
        extra, id_len, name_len = (
            _u(data, pos + 36, 4),
            _u(data, pos + 12, 2),
            _u(data, pos + 14, 2),
        )
        for off in range(0, min(extra, 24), 8):
            add("snapshot_table", pos + 40 + off, 8, f"snapshot {index} extra data {off}")
        add(
            "snapshot_table",
            pos + 40 + extra,
            -max(1, id_len + name_len),
            f"snapshot {index} id and name",
        )
        walk_l1(_u(data, pos, 8), _u(data, pos + 8, 4), "snapshot_l1", None)
        pos += 40 + extra + id_len + name_len
        pos += -pos % 8

    # bitmap directory and bitmap tables
    if bitmaps_ext:
        count, dir_size, dir_offset = bitmaps_ext
        pos = dir_offset
        for index in range(min(count, 8)):
            for off, width, name in (
                (0, 8, "bitmap_table_offset"),
                (8, 4, "bitmap_table_size"),
                (12, 4, "flags"),
                (16, 1, "type"),
                (17, 1, "granularity_bits"),
                (18, 2, "name_size"),
                (20, 4, "extra_data_size"),
            ):
                add("bitmaps", pos + off, width, f"bitmap {index} {name}")
            table, table_size = _u(data, pos, 8), _u(data, pos + 8, 4)
            for k in range(min(table_size, 4)):
                add("bitmaps", table + 8 * k, 8, f"bitmap {index} table[{k}]")
            name_size, extra = _u(data, pos + 18, 2), _u(data, pos + 20, 4)
            pos += 24 + extra + name_size
            pos += -pos % 8

    # the LUKS header
    if crypto_ext and _u(data, 32, 4) == 2:
        base = crypto_ext[0]
        for name, off, width in LUKS_FIELDS:
            add("luks", base + off, width, f"luks {name}")
        for slot in range(8):
            for name, off, width in LUKS_SLOT_FIELDS:
                if slot and name == "salt":
                    continue
                add("luks", base + 208 + slot * 48 + off, width, f"luks slot {slot} {name}")
        key_offset = _u(data, base + 208 + 40, 4)
        add("luks", base + key_offset * 512, -64, "luks slot 0 key material")

    for off in range(0, len(data), 512):
        add("any_byte", off, -1, f"byte in sector {off // 512}")
    found["length"].append(Target(0, 0, "file length"))
    return found


def interesting_values(width: int, old: int, data_len: int, cs: int, hints: list[int]) -> list[int]:
    top = (1 << (8 * width)) - 1
    values = [
        0,
        1,
        top,
        1 << (8 * width - 1),
        (1 << (8 * width - 1)) - 1,
        old ^ 1,
        old + 1,
        old - 1,
        old + cs,
        old - cs,
        cs,
        512,
        data_len,
        data_len - cs,
        data_len + cs,
        old * 2,
        old << 8,
        old >> 8,
        9,
        21,
        63,
        64,
        255,
        65535,
    ]
    if width == 8:  # table entries: flags and pointers at other structures
        values += [
            old | OFLAG_COPIED,
            old & ~OFLAG_COPIED,
            old | OFLAG_COMPRESSED,
            old | 1,
            old ^ (1 << 56),
            old ^ (1 << 9),
            (old & ~OFFSET_MASK) | (1 << 55),
        ]
        values += [h | (old & ~OFFSET_MASK) for h in hints]
    return [v & top for v in values]


def apply_mutation(
    data: bytearray,
    targets: dict[str, list[Target]],
    category: str,
    index: int,
    op: int,
    param: int,
    cs: int,
    hints: list[int],
) -> str:
    """Change `data` in place; returns a description of the change."""
    if category == "length":
        choices = [
            len(data) // 2,
            len(data) - 1,
            len(data) - cs,
            512,
            72,
            len(data) + 1,
            (param % max(1, len(data))) // 512 * 512,
            param % max(1, len(data)),
        ]
        new_len = max(0, choices[op % len(choices)])
        if new_len < len(data):
            del data[new_len:]
        else:
            data.extend(b"\xa5" * (new_len - len(data)))
        return f"file length -> {new_len}"
    pool = targets[category] or targets["header"] or targets["any_byte"]
    if not pool:  # nothing left of the file
        return "nothing to mutate"
    target = pool[index % len(pool)]
    if target.width > 0:
        old = int.from_bytes(data[target.offset : target.offset + target.width], "big")
        kind = op % 4
        if kind == 0:
            values = interesting_values(target.width, old, len(data), cs, hints)
            new = values[param % len(values)]
        elif kind == 1:
            new = param % (1 << (8 * target.width))
        elif kind == 2:
            new = old ^ (1 << (param % (8 * target.width)))
        else:
            new = (old + (param % 4097) - 2048) % (1 << (8 * target.width))
        data[target.offset : target.offset + target.width] = new.to_bytes(target.width, "big")
        return f"{target.label} @{target.offset}: {old:#x} -> {new:#x}"
    length = -target.width
    chunk = data[target.offset : target.offset + length]
    kind = op % 5
    if kind == 0:
        bit = param % (8 * length)
        chunk[bit // 8] ^= 1 << (bit % 8)
    elif kind == 1:
        chunk[param % length] = (param >> 8) & 0xFF
    elif kind == 2:
        chunk[:] = bytes(length)
    elif kind == 3:
        chunk[:] = b"\xff" * length
    else:
        chunk[:] = bytes((param >> (i % 56)) & 0xFF for i in range(length))
    data[target.offset : target.offset + length] = chunk
    return f"{target.label} @{target.offset}+{length}: op {kind}"


def apply_recipe(image: bytes, recipe: list[list]) -> bytes:
    """Set fields named by their find_targets labels: [[label, value], ...].

    For crashers of seeds made afresh each run with random content (LUKS keys), where a
    stored image would be large and the damage is one field."""
    data = bytearray(image)
    for label, value in recipe:
        found = [t for ts in find_targets(bytes(data)).values() for t in ts if t.label == label]
        assert found, f"no field labelled {label!r}"
        target = found[0]
        data[target.offset : target.offset + target.width] = value.to_bytes(target.width, "big")
    return bytes(data)


def hints_for(data: bytes) -> list[int]:
    """Offsets of structures a pointer may be bent to (overlaps are the interesting bugs)."""
    return [0, _u(data, 40, 8), _u(data, 48, 8), _u(data, 64, 8), len(data) // 512 * 512, 1 << 40]


def mutate(base: Base, mutations: list[tuple[str, int, int, int]]) -> tuple[bytes, list[str]]:
    data = bytearray(base.image)
    cs = 1 << _u(base.image, 20, 4)
    notes = []
    for category, index, op, param in mutations:
        targets = find_targets(bytes(data))  # the previous mutation may have moved things
        notes.append(
            apply_mutation(data, targets, category, index, op, param, cs, hints_for(bytes(data)))
        )
    return bytes(data), notes


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

if __name__ != "__main__":
    import pytest
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    pytestmark = pytest.mark.timeout(900)

    @pytest.fixture(scope="module")
    def bases(tmp_path_factory) -> dict[str, Base]:
        """The seeds, made once for the run (by the first worker that asks) and kept as a
        pickle of their bytes, which every case copies."""
        import pickle

        from shared import build_once

        def build(directory: Path) -> None:
            seeds = build_bases(directory / "images")
            (directory / "bases.pickle").write_bytes(pickle.dumps(seeds))

        directory = build_once(tmp_path_factory, "fuzz-bases", build)
        return pickle.loads((directory / "bases.pickle").read_bytes())

    @pytest.fixture(scope="module")
    def worker(bases, tmp_path_factory):
        root = tmp_path_factory.mktemp("fuzz-cases")
        warm = Case(root / "warm", bases["zlib"], bases["zlib"].image)
        handle = Worker(warm)
        yield handle
        handle.stop()

    @pytest.fixture(scope="module")
    def case_root(tmp_path_factory) -> Path:
        return tmp_path_factory.mktemp("fuzz-run")

    def run_one(worker: Worker, case: Case) -> str | None:
        case.reset()
        before = case.others()
        return verdict(case, worker.run(case), before)

    def test_bases_are_valid_and_pass_cleanly(bases, worker, case_root):
        """Every seed image goes through the whole case without an engine complaint."""
        assert sorted(bases) == sorted(BASE_NAMES)
        for name, base in bases.items():
            targets = find_targets(base.image)
            case = Case(case_root / f"seed-{name}", base, base.image)
            case.reset()
            before = case.others()
            answer = worker.run(case)
            problem = verdict(case, answer, before)
            assert problem is None, f"{name}: {problem}"
            # QEMU too refuses snapshots with 1-bit refcounts or an external data file.
            expected = (
                ("create_snapshot", "write after snapshot")
                if name in ("rc1", "datafile", "datafile-raw")
                else ()
            )
            assert not [e for e in answer["qcow2_errors"] if not e.startswith(expected)], (
                f"{name}: a valid image raised {answer['qcow2_errors']}"
            )
            assert targets["header"] and targets["l1"] and targets["refcount_block"], name
        assert find_targets(bases["snap"].image)["snapshot_table"]
        assert find_targets(bases["snap"].image)["snapshot_l1"]
        assert find_targets(bases["zlib"].image)["compressed"]
        assert find_targets(bases["zstd"].image)["compressed"]
        assert find_targets(bases["luks"].image)["luks"]
        assert find_targets(bases["bitmaps"].image)["bitmaps"]
        assert find_targets(bases["backing"].image)["backing_name"]

    BASE_NAMES = [
        "v3-512",
        "v2",
        "v3-64k",
        "snap",
        "zlib",
        "zstd",
        "extl2",
        "lazy",
        "rc1",
        "rc64",
        "backing",
        "rawbacking",
        "datafile",
        "datafile-raw",
        "bitmaps",
        "luks",
        "aes",
    ]
    COLLECT = os.environ.get("FUZZ_COLLECT")

    def mutations_for(categories: list[str]):
        """One to three mutations, each on a structure the base image really has."""
        mutation = st.tuples(
            st.sampled_from(categories),
            st.integers(0, 1 << 16),
            st.integers(0, 255),
            st.integers(0, (1 << 64) - 1),
        )
        return st.lists(mutation, min_size=1, max_size=3)

    def test_fuzz_mutated_images(bases, worker, case_root):
        seen: list[tuple[str, list[str], str]] = []
        runs = [0]

        present = {
            name: [c for c, found in find_targets(bases[name].image).items() if found]
            for name in BASE_NAMES
        }
        case_strategy = st.sampled_from(BASE_NAMES).flatmap(
            lambda name: st.tuples(st.just(name), mutations_for(present[name]))
        )

        # No shrinking unless asked for: a slow case shrinks one slow run at a time, and the
        # failure message already names each mutation.
        phases = [Phase.explicit, Phase.reuse, Phase.generate]
        if os.environ.get("FUZZ_SHRINK"):
            phases.append(Phase.shrink)

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            phases=phases,
            derandomize=not os.environ.get("FUZZ_RANDOM"),
            suppress_health_check=list(HealthCheck),
        )
        @given(drawn=case_strategy)
        def fuzz(drawn):
            name, mutations = drawn
            base = bases[name]
            image, notes = mutate(base, mutations)
            case = Case(case_root / "case", base, image)
            problem = run_one(worker, case)
            runs[0] += 1
            if problem and COLLECT:
                out = Path(COLLECT)
                out.mkdir(parents=True, exist_ok=True)
                key = hashlib.sha256(image).hexdigest()[:12]
                (out / f"{name}-{key}.qcow2").write_bytes(image)
                (out / f"{name}-{key}.txt").write_text(
                    f"base {name}\nmutations {mutations}\n" + "\n".join(notes) + "\n\n" + problem
                )
                seen.append((name, notes, problem.splitlines()[0]))
                return
            assert problem is None, (
                f"base {name}, mutations:\n  " + "\n  ".join(notes) + f"\n{problem}"
            )

        worker.stop()  # a fresh worker: each case meets the same heap, whatever ran before
        fuzz()
        print(f"\n{runs[0]} fuzz cases run")
        if COLLECT:
            print(f"\n{len(seen)} failing cases written to {COLLECT}")
            for name, notes, first in seen:
                print(f"  {name}: {notes} -> {first[:300]}")

    # --- regression fixtures ------------------------------------------------------------------

    def load_manifest() -> list[dict]:
        """tests/fixtures/fuzz/MANIFEST: `file base=NAME [passphrase=X] -- description`."""
        entries = []
        manifest = FIXTURES / "MANIFEST"
        for line in manifest.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            head, _, description = line.partition(" -- ")
            fields = head.split()
            entry = {"file": fields[0], "description": description.strip()}
            entry.update(field.split("=", 1) for field in fields[1:])
            entries.append(entry)
        return entries

    MANIFEST_ENTRIES = load_manifest() if (FIXTURES / "MANIFEST").exists() else []

    def test_fixture_manifest_lists_every_file():
        listed = {entry["file"] for entry in MANIFEST_ENTRIES}
        present = {p.name for p in FIXTURES.iterdir()} - {"MANIFEST"}
        assert listed == present
        assert all(entry["description"] for entry in MANIFEST_ENTRIES)
        assert all((FIXTURES / name).stat().st_size < 64 << 10 for name in present)
        assert all(name.endswith((".qcow2.gz", ".json")) for name in present)

    @pytest.mark.parametrize("entry", MANIFEST_ENTRIES, ids=[e["file"] for e in MANIFEST_ENTRIES])
    def test_fuzz_regressions(entry, bases, worker, case_root):
        """Each kept crasher now goes through the whole case as the fuzzer requires."""
        base = bases[entry["base"]]
        if entry["file"].endswith(".json"):  # a recipe: labelled fields of the fresh seed
            image = apply_recipe(base.image, json.loads((FIXTURES / entry["file"]).read_text()))
        else:
            image = gzip.decompress((FIXTURES / entry["file"]).read_bytes())
        case = Case(case_root / "regression", base, image)
        worker.stop()  # each crasher in a fresh worker
        problem = run_one(worker, case)
        assert problem is None, f"{entry['file']} ({entry['description']}):\n{problem}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--fuzz-worker"]:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        worker_main()
