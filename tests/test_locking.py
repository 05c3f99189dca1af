"""Image locking against the real QEMU tools, in both directions.

QEMU locks images with open file description (OFD) locks on single bytes: byte 100+i is
held by a user of permission i (consistent read, write, write unchanged, resize), byte
200+i by a user who does not let others have permission i. Which bytes a process holds
is visible in /proc/locks, so the tests compare qcow2lib with qemu-io byte for byte, and
then check behaviour: with an image held by qemu-io and with the same image held by
qcow2lib (for writing, for reading, and for reading with force-share / -U), every probe
(qemu-io, qemu-img, qcow2lib, qimg opening the image or its backing file) must meet the
same answer. A holder is a `qemu-io` process reading commands from a pipe, so it keeps
the image open (and can still write to it) for as long as the test needs.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

import qcow2lib
import qimg
from qcow2lib import ImageLockedError
from qemutools import QEMU_IMG, QEMU_IO, qemu_create, qemu_io

pytestmark = pytest.mark.timeout(120)


def held(path) -> list[int]:
    """The byte offsets of `path` that some process holds a lock on (from /proc/locks)."""
    st = os.stat(path)
    found: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "->":  # a blocked waiter
                continue
            major, minor, inode = fields[5].split(":")
            if int(inode) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                end = st.st_size if fields[7] == "EOF" else int(fields[7])
                found.update(range(int(fields[6]), end + 1))
    return sorted(found)


class QemuHolder:
    """A qemu-io process keeping an image open until the block ends."""

    def __init__(self, image, *options: str):
        self.args = [QEMU_IO, *options, str(image)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "QemuHolder":
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.expect_prompt()
        return self

    def expect_prompt(self, timeout: float = 20) -> str:
        """Wait for qemu-io's prompt: it prints it once the image is open (locks taken)."""
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(b"qemu-io> "):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"qemu-io did not get ready: {out!r}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"qemu-io exited ({self.proc.wait()}): {out!r}")
            out += chunk
        return out.decode(errors="replace")

    def command(self, text: str) -> str:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect_prompt()

    def __exit__(self, *exc) -> None:
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


QEMU_ROLE_OPTIONS = {"rw": [], "ro": ["-r"], "ro-U": ["-r", "-U"]}
LIB_ROLE_ARGS = {"rw": ("r+", False), "ro": ("r", False), "ro-U": ("r", True)}


@contextlib.contextmanager
def holder(kind: str, role: str, image):
    """Hold `image` (and its chain) as qemu-io or as qcow2lib would in `role`."""
    if kind == "qemu-io":
        with QemuHolder(image, *QEMU_ROLE_OPTIONS[role]):
            yield
    else:
        mode, force_share = LIB_ROLE_ARGS[role]
        with qcow2lib.open(str(image), mode, force_share=force_share):
            yield


@pytest.fixture
def chain(tmp_path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_create(base, "1M")
    qemu_io(base, "write -P 0x61 0 64k")
    qemu_create(top, "1M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x62 64k 4k")
    return top, base


# --- probes: each returns True if it could open the image, False if a lock refused it ---------


def _tool(args: list[str]) -> bool:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode == 0:
        return True
    text = result.stdout + result.stderr
    assert "lock" in text, f"{args} failed for another reason than a lock: {text}"
    return False


def _lib(path, mode, force_share=False, backing=True) -> bool:
    try:
        with qcow2lib.open(str(path), mode, force_share=force_share, backing=backing) as img:
            img.read(0, 512)
        return True
    except ImageLockedError:
        return False


def _qimg(*args) -> bool:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qimg.main([str(a) for a in args], prog="qimg")
    if code == 0:
        return True
    assert "lock" in err.getvalue(), f"qimg {args} failed for another reason: {err.getvalue()}"
    return False


def probes(top: Path, base: Path) -> dict:
    return {
        "qemu-io write top": lambda: _tool([QEMU_IO, "-c", "write -P 0x63 0 512", top]),
        "qemu-io read top": lambda: _tool([QEMU_IO, "-r", "-c", "read 0 512", top]),
        "qemu-io -U read top": lambda: _tool([QEMU_IO, "-r", "-U", "-c", "read 0 512", top]),
        "qemu-io write base": lambda: _tool([QEMU_IO, "-c", "write -P 0x61 0 512", base]),
        "qemu-io read base": lambda: _tool([QEMU_IO, "-r", "-c", "read 0 512", base]),
        "qemu-img info top": lambda: _tool([QEMU_IMG, "info", top]),
        "qemu-img info -U top": lambda: _tool([QEMU_IMG, "info", "-U", top]),
        "qemu-img info --backing-chain top": lambda: _tool(
            [QEMU_IMG, "info", "--backing-chain", top]
        ),
        "qemu-img check top": lambda: _tool([QEMU_IMG, "check", top]),
        "qemu-img check -U top": lambda: _tool([QEMU_IMG, "check", "-U", top]),
        "qemu-img info base": lambda: _tool([QEMU_IMG, "info", base]),
        "qcow2lib r+ top": lambda: _lib(top, "r+"),
        "qcow2lib r top": lambda: _lib(top, "r"),
        "qcow2lib r force_share top": lambda: _lib(top, "r", True),
        "qcow2lib r+ base": lambda: _lib(base, "r+"),
        "qcow2lib r base": lambda: _lib(base, "r"),
        "qimg info top": lambda: _qimg("info", top),
        "qimg info -U top": lambda: _qimg("info", "-U", top),
        "qimg info -U --backing-chain top": lambda: _qimg("info", "-U", "--backing-chain", top),
        "qimg check top": lambda: _qimg("check", top),
        "qimg check -U top": lambda: _qimg("check", "-U", top),
        "qimg snapshot -l -U top": lambda: _qimg("snapshot", "-l", "-U", top),
    }


# What QEMU answers each probe (True: it opens) when qemu-io holds the chain in a role.
EXPECTED_UNDER_QEMU = {
    "rw": {
        "qemu-io write top": False,
        "qemu-io read top": False,
        "qemu-io -U read top": True,
        "qemu-io write base": False,
        "qemu-io read base": True,
        "qemu-img info top": False,
        "qemu-img info -U top": True,
        "qemu-img check top": False,
        "qemu-img check -U top": True,
        "qemu-img info base": True,
    },
    "ro": {
        "qemu-io write top": False,
        "qemu-io read top": True,
        "qemu-io write base": False,
        "qemu-img info top": True,
        "qemu-img check top": True,
    },
    "ro-U": {"qemu-io write top": True, "qemu-io write base": True, "qemu-io read top": True},
}


@pytest.mark.parametrize("role", ["rw", "ro", "ro-U"])
def test_same_answers_whoever_holds_the_image(chain, role):
    """Every probe meets the same answer whether qemu-io or qcow2lib holds the chain."""
    top, base = chain
    answers = {}
    for kind in ("qemu-io", "qcow2lib"):
        with holder(kind, role, top):
            answers[kind] = {name: probe() for name, probe in probes(top, base).items()}
        assert held(top) == [] and held(base) == [], f"{kind} left locks behind"
    for name, expected in EXPECTED_UNDER_QEMU[role].items():
        assert answers["qemu-io"][name] == expected, f"QEMU itself: {name}"
    different = {
        name: (answers["qemu-io"][name], answers["qcow2lib"][name])
        for name in answers["qemu-io"]
        if answers["qemu-io"][name] != answers["qcow2lib"][name]
    }
    assert not different, f"(held by qemu-io, held by qcow2lib) differ: {different}"


@pytest.mark.parametrize("layer", ["image", "backing file"])
@pytest.mark.parametrize("role", ["rw", "ro", "ro-U"])
def test_lock_bytes_match_qemu(chain, role, layer):
    """qcow2lib holds exactly the lock bytes qemu-io holds for the same use."""
    top, base = chain
    path = top if layer == "image" else base
    with holder("qemu-io", role, top):
        qemu_bytes = held(path)
    with holder("qcow2lib", role, top):
        lib_bytes = held(path)
    assert qemu_bytes, "qemu-io took no locks"
    assert lib_bytes == qemu_bytes, (
        f"{layer} held for {role}: qcow2lib locks bytes {lib_bytes}, QEMU {qemu_bytes}"
    )


def test_qemu_writer_keeps_writing_while_qcow2lib_inspects_with_force_share(chain):
    """-U / force_share: qcow2lib reads an image QEMU is writing (as qemu-img -U does),
    takes no lock that gets in QEMU's way, and QEMU's later writes still succeed."""
    top, base = chain
    with QemuHolder(top) as qemu:
        with pytest.raises(ImageLockedError, match="lock"):
            qcow2lib.open(str(top), "r")
        with pytest.raises(ImageLockedError, match="lock"):
            qcow2lib.open(str(top), "r+")
        with pytest.raises(qcow2lib.InvalidArgumentError, match="force-share"):
            qcow2lib.open(str(top), "r+", force_share=True)
        with qcow2lib.open(str(top), "r", force_share=True) as img:
            assert img.read(64 << 10, 4096) == b"\x62" * 4096
            assert img.read(0, 512) == b"\x61" * 512
            out = qemu.command("write -P 0x64 128k 4k")
            assert "wrote 4096/4096" in out, out
        out = qemu.command("flush")
        assert "error" not in out.lower(), out
    with qcow2lib.open(str(top), "r") as img:
        assert img.read(128 << 10, 4096) == b"\x64" * 4096


def test_qemu_cannot_write_what_qcow2lib_writes(chain):
    """While qcow2lib has the image open for writing, QEMU refuses to write it or its
    backing file, refuses a plain `qemu-img info`, and reads it only with -U."""
    top, base = chain
    with qcow2lib.open(str(top), "r+") as img:
        img.write(0, b"L" * 4096)
        img.flush()
        for args in (
            [QEMU_IO, "-c", "write 0 512", top],
            [QEMU_IO, "-c", "write 0 512", base],
            [QEMU_IMG, "info", top],
            [QEMU_IMG, "check", top],
            [QEMU_IMG, "snapshot", "-c", "s", top],
            [QEMU_IMG, "resize", top, "2M"],
            [QEMU_IMG, "commit", top],
            [QEMU_IMG, "amend", "-o", "compat=0.10", top],
            [QEMU_IMG, "check", "-r", "all", top],
        ):
            result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
            assert result.returncode != 0, args
            assert "lock" in result.stdout + result.stderr, (args, result.stderr)
        result = subprocess.run(
            [QEMU_IO, "-r", "-U", "-c", "read -P 0x4c 0 4096", str(top)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "read 4096/4096" in result.stdout, result
        result = subprocess.run([QEMU_IMG, "info", "-U", str(top)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert held(top) == [] and held(base) == []
    qemu_io(top, "write -P 0x65 0 512")  # free again once closed


def test_external_data_file_is_locked_too(tmp_path, monkeypatch):
    """An image with an external data file: QEMU holding the image keeps qcow2lib out, and
    qcow2lib holding it keeps QEMU from writing the image or its data file.

    (QEMU itself, holding such an image, lets another process write the data file as raw:
    qemu-io shares the write permission on the data child. qcow2lib does not.)"""
    monkeypatch.chdir(tmp_path)  # QEMU takes a relative data file name from the cwd
    image = Path("img.qcow2")
    data = Path("data.raw")
    qemu_create(image, "1M", options={"data_file": "data.raw"})
    qemu_io(image, "write -P 0x44 0 8k")
    with QemuHolder(image):
        assert held(data), "QEMU locks the data file"
        for mode in ("r", "r+"):
            with pytest.raises(ImageLockedError):
                qcow2lib.open(str(image), mode)
        with qcow2lib.open(str(image), "r", force_share=True) as img:
            assert img.read(0, 8192) == b"\x44" * 8192
        assert _qimg("info", "-U", image)
        assert not _qimg("info", image)
    assert held(data) == []
    with qcow2lib.open(str(image), "r+") as img:
        assert held(data), "qcow2lib locks the data file"
        for args in (
            [QEMU_IO, "-c", "write 0 512", image],
            [QEMU_IO, "-f", "raw", "-c", "write 0 512", data],
            [QEMU_IMG, "info", image],
        ):
            assert not _tool(args), args
        assert _tool([QEMU_IO, "-r", "-U", "-c", "read -P 0x44 0 512", image])
    assert held(data) == [] and held(image) == []


def test_failed_opens_leave_no_locks(chain, tmp_path):
    """An open that fails half way (backing file locked, backing file missing, data file
    missing, damaged header) releases every lock it took."""
    top, base = chain
    with QemuHolder(base):  # a writer on the backing file: reading the chain is refused
        with pytest.raises(ImageLockedError):
            qcow2lib.open(str(top), "r+")
        assert held(top) == [], "the top image stayed locked after its backing file failed"
        assert _tool([QEMU_IO, "-r", "-U", "-c", "read 0 512", top])
    orphan = tmp_path / "orphan.qcow2"
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            str(orphan),
            "1M",
        ],
        check=True,
    )
    with pytest.raises(qcow2lib.Qcow2Error):
        qcow2lib.open(str(orphan), "r+")
    assert held(orphan) == []
    nodata = tmp_path / "nodata.qcow2"
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=nodata.raw",
            "nodata.qcow2",
            "1M",
        ],
        cwd=tmp_path,
        check=True,
    )
    os.unlink(tmp_path / "nodata.raw")
    with pytest.raises(qcow2lib.Qcow2Error):
        qcow2lib.open(str(nodata), "r+")
    assert held(nodata) == []
    damaged = tmp_path / "damaged.qcow2"
    qemu_create(damaged, "1M")
    with open(damaged, "r+b") as f:
        f.seek(20)
        f.write((40).to_bytes(4, "big"))  # cluster_bits 40
    with pytest.raises(qcow2lib.Qcow2Error):
        qcow2lib.open(str(damaged), "r+")
    assert held(damaged) == []


def test_two_handles_in_one_process(chain):
    """Locks are per open file, so two handles in one process exclude each other as two
    processes would (a writer excludes any other writer and plain readers)."""
    top, _ = chain
    with qcow2lib.open(str(top), "r+"):
        with pytest.raises(ImageLockedError):
            qcow2lib.open(str(top), "r+")
        with pytest.raises(ImageLockedError):
            qcow2lib.open(str(top), "r")
        qcow2lib.open(str(top), "r", force_share=True).close()
    with qcow2lib.open(str(top), "r"):
        qcow2lib.open(str(top), "r").close()
        with pytest.raises(ImageLockedError):
            qcow2lib.open(str(top), "r+")
    assert held(top) == []


def _run_qimg_as_qemu_img(args) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qimg.main([str(a) for a in args], prog="qemu-img")
    return code, err.getvalue()


@pytest.mark.parametrize(
    "args",
    [
        ["check", "{top}"],
        ["check", "-U", "{top}"],
        ["check", "-r", "all", "{top}"],
        ["check", "-r", "leaks", "-U", "{top}"],
        ["snapshot", "-l", "{top}"],
        ["snapshot", "-l", "-U", "{top}"],
        ["snapshot", "-c", "s1", "{top}"],
        ["snapshot", "-d", "s1", "{top}"],
        ["snapshot", "-c", "s1", "-U", "{top}"],
        ["info", "-U", "--backing-chain", "{top}"],
        ["check", "{base}"],
        ["snapshot", "-c", "s1", "{base}"],
        ["info", "--image-opts", "driver=qcow2,file.filename={top},file.locking=off"],
        ["info", "--image-opts", "driver=qcow2,file.filename={top},file.locking=on"],
        ["info", "--image-opts", "driver=qcow2,file.filename={top},file.locking=maybe"],
        ["info", "--image-opts", "driver=file,filename={top},locking=off"],
        ["resize", "--image-opts", "driver=raw,file.filename={top},file.locking=off", "+512"],
        ["resize", "--image-opts", "driver=raw,file.filename={top}", "+512"],
    ],
)
def test_qimg_on_an_image_qemu_holds(chain, args):
    """qimg's check/snapshot on an image qemu-io is writing: qemu-img's exit code and
    its exact messages (the lock that failed, and the hint to look for another process)."""
    top, base = chain
    argv = [a.format(top=top, base=base) for a in args]
    with QemuHolder(top):
        expected = subprocess.run([QEMU_IMG, *argv], capture_output=True, text=True)
        code, err = _run_qimg_as_qemu_img(argv)
    assert (code, err) == (expected.returncode, expected.stderr)
