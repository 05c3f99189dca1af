"""qimg on bad input, against the real qemu-img; and images that cannot be trusted.

Bad input (missing files, directories, files that are not images, damaged or truncated
images, wrong -f formats, impossible sizes and options, garbage secrets, images that are
their own backing file, chains that loop): qimg must exit with qemu-img's exit code and
report the error on lines prefixed with its own name (as many as qemu-img prints), never
with a traceback. Each tool works on its own copy of the same files. The exact wording
of create/info is tested in test_cli_create_info.py; here every subcommand qimg has
(create, info, check, snapshot) meets the same inputs.

Untrusted images: a backing file name is only a name. Where an image does not say the
backing format, QEMU 7.2 probes it, and a file without the qcow2 magic is read as raw,
which exposes any host file's bytes through the image: qcow2lib refuses that (qcow2 files
are still probed), and reads what QEMU reads once the format is stated; a stated format
is never second-guessed. A raw image whose format was probed must not be
turned into something else by a guest write to its first sector (QEMU refuses with
EPERM). And `info`/`check`/`snapshot -l` open no file of the chain that qemu-img would
not open (watched with inotify): `info` without --backing-chain touches no backing file.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qemutools import QEMU_IMG, QEMU_IO, qemu_create, qemu_io
from qemutools import make_launcher

pytestmark = pytest.mark.timeout(300)


def set_field(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def build_inputs(directory: Path) -> None:
    """The bad (and some good) inputs, identical in both tools' directories."""

    def here(name):
        return directory / name

    qemu_create(here("img.qcow2"), "1M")
    qemu_io(here("img.qcow2"), "write -P 0x41 0 64k")
    qemu_create(here("raw.img"), "1M", "raw")
    here("empty").write_bytes(b"")
    here("tiny").write_bytes(b"QFI")
    here("text.txt").write_text("just some text\n" * 10)
    here("dir").mkdir()
    # truncated: the header ends in the middle of the fixed fields
    here("trunc.qcow2").write_bytes(here("img.qcow2").read_bytes()[:50])
    # cluster_bits 40
    shutil.copy(here("img.qcow2"), here("bigcluster.qcow2"))
    set_field(here("bigcluster.qcow2"), 20, ">I", 40)
    # corrupt bit set
    shutil.copy(here("img.qcow2"), here("corrupt.qcow2"))
    set_field(here("corrupt.qcow2"), 72, ">Q", 2)
    # an L1 entry pointing past the end of the file (open works, reads fail)
    shutil.copy(here("img.qcow2"), here("badl1.qcow2"))
    l1_offset = struct.unpack(">Q", here("img.qcow2").read_bytes()[40:48])[0]
    set_field(here("badl1.qcow2"), l1_offset, ">Q", (1 << 63) | (1 << 40))
    # its own backing file; a loop of two; a missing backing file
    qemu_create(here("self.qcow2"), "1M")
    subprocess.run(
        [QEMU_IMG, "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", "self.qcow2"],
        cwd=directory,
        check=True,
    )
    qemu_create(here("loop-a.qcow2"), "1M")
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "loop-a.qcow2",
            "-F",
            "qcow2",
            "loop-b.qcow2",
        ],
        cwd=directory,
        check=True,
    )
    subprocess.run(
        [QEMU_IMG, "rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", "loop-a.qcow2"],
        cwd=directory,
        check=True,
    )
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
            "orphan.qcow2",
            "1M",
        ],
        cwd=directory,
        check=True,
    )
    # broken two levels down: each level prefixes "Could not open backing file: "
    for name, backing in (
        ("deep-orphan.qcow2", "orphan.qcow2"),
        ("over-big.qcow2", "bigcluster.qcow2"),
    ):
        subprocess.run(
            [
                QEMU_IMG,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                backing,
                "-F",
                "qcow2",
                name,
                "1M",
            ],
            cwd=directory,
            check=True,
        )
    # an image with a snapshot
    qemu_create(here("snap.qcow2"), "1M")
    subprocess.run([QEMU_IMG, "snapshot", "-c", "first", "snap.qcow2"], cwd=directory, check=True)


class Twins:
    def __init__(self, root: Path):
        self.template = root / "template"
        self.template.mkdir()
        build_inputs(self.template)
        self.qemu_dir = root / "qemu"
        self.qimg_dir = root / "qimg"
        self.reset()
        bindir = root / "bin"
        bindir.mkdir()
        self.launcher = make_launcher(bindir, "qimg")

    def reset(self) -> None:
        """Give both directories the pristine inputs (a case may have changed them)."""
        for directory in (self.qemu_dir, self.qimg_dir):
            if directory.exists():
                shutil.rmtree(directory)
            subprocess.run(["cp", "-a", str(self.template), str(directory)], check=True)

    def run(
        self, args: list[str]
    ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        qemu = subprocess.run(
            [QEMU_IMG, *args], cwd=self.qemu_dir, capture_output=True, text=True, timeout=60
        )
        qimg = subprocess.run(
            [str(self.launcher), *args],
            cwd=self.qimg_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return qemu, qimg


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    return Twins(tmp_path_factory.mktemp("bad-input"))


def assert_like_qemu(twins: Twins, args: list[str]) -> None:
    qemu, qimg = twins.run(args)
    shown = (
        f"qimg {' '.join(args)}\n--- qemu-img (exit {qemu.returncode}):\n{qemu.stderr}"
        f"--- qimg (exit {qimg.returncode}):\n{qimg.stderr}"
    )
    assert "Traceback" not in qimg.stderr + qimg.stdout, shown
    assert qimg.returncode == qemu.returncode, shown
    qemu_errors = [line for line in qemu.stderr.splitlines() if line.startswith("qemu-img: ")]
    qimg_errors = [line for line in qimg.stderr.splitlines() if line.startswith("qimg: ")]
    if qemu.returncode != 0 and qemu_errors:
        # the error line first, after the warnings qemu-img prints too (a probed raw image)
        warnings = qemu.stderr[: qemu.stderr.index("qemu-img: ")]
        assert qimg.stderr.startswith(warnings + "qimg: "), shown
    assert len(qimg_errors) == len(qemu_errors), shown


CREATE_CASES = [
    ["create", "-f", "qcow2", "dir", "1M"],  # a directory's name
    ["create", "-f", "raw", "dir", "1M"],
    ["create", "-f", "qcow2", "raw.img/sub", "1M"],  # through a regular file
    ["create", "-f", "qcow2", "x" * 300, "1M"],  # name too long
    ["create", "-f", "qcow2", "nodir/new.qcow2", "1M"],
    ["create", "-f", "raw", "huge.raw", "8E"],  # beyond any file system
    ["create", "-f", "qcow2", "new.qcow2", "-1"],
    ["create", "-f", "qcow2", "new.qcow2", "1Q"],
    ["create", "-f", "qcow2", "new.qcow2", "99999999999999999999"],
    ["create", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=65", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=2.0", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "data_file=dir", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "text.txt", "-F", "qcow2", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "trunc.qcow2", "-F", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "-b", "bigcluster.qcow2", "-F", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "-b", "dir", "-F", "raw", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "-b", "empty", "-F", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "--object", "secret,id=s0", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "--object", "garbage", "new.qcow2", "1M"],
]

INFO_CASES = [
    ["info", "missing"],
    ["info", "dir"],
    ["info", "empty"],
    ["info", "tiny"],
    ["info", "text.txt"],
    ["info", "trunc.qcow2"],
    ["info", "bigcluster.qcow2"],
    ["info", "corrupt.qcow2"],
    ["info", "badl1.qcow2"],
    ["info", "-f", "qcow2", "text.txt"],
    ["info", "-f", "qcow2", "empty"],
    ["info", "-f", "vmdk", "img.qcow2"],
    ["info", "-f", "", "img.qcow2"],
    ["info", "self.qcow2"],
    ["info", "--backing-chain", "self.qcow2"],
    ["info", "-U", "--backing-chain", "loop-b.qcow2"],
    ["info", "--backing-chain", "orphan.qcow2"],
    ["info", "/dev/null"],
    ["info", "--output", "yaml", "missing"],
    ["info", "raw.img/x"],
    ["info", "--object", "secret,id=s0,data=pw,format=base64", "img.qcow2"],
    ["info", "--object", "secret,id=s0,file=/nonexistent", "img.qcow2"],
    ["info", "--object", "secret", "img.qcow2"],
]

CHECK_CASES = [
    ["check", "missing"],
    ["check", "dir"],
    ["check", "empty"],
    ["check", "tiny"],
    ["check", "text.txt"],
    ["check", "raw.img"],
    ["check", "trunc.qcow2"],
    ["check", "bigcluster.qcow2"],
    ["check", "corrupt.qcow2"],
    ["check", "badl1.qcow2"],
    ["check", "-f", "qcow2", "raw.img"],
    ["check", "-f", "vmdk", "img.qcow2"],
    ["check", "-f", "raw", "img.qcow2"],
    ["check", "orphan.qcow2"],
    ["check", "deep-orphan.qcow2"],
    ["check", "over-big.qcow2"],
    ["compare", "deep-orphan.qcow2", "img.qcow2"],
    ["map", "over-big.qcow2"],
    ["convert", "-O", "raw", "deep-orphan.qcow2", "out.raw"],
    ["check", "-r", "everything", "img.qcow2"],
    ["check", "-r", "all", "raw.img"],
    ["check", "-r", "leaks", "missing"],
    ["check", "-U", "-r", "all", "img.qcow2"],
    ["check", "--output=xml", "img.qcow2"],
    ["check", "-r", "all", "trunc.qcow2"],
    ["check", "-r", "all", "bigcluster.qcow2"],
    ["check", "--output=json", "empty"],
    ["check", "/dev/null"],
    ["check", "--object", "secret,id=s0", "img.qcow2"],
]

SNAPSHOT_CASES = [
    ["snapshot", "-l", "missing"],
    ["snapshot", "-l", "dir"],
    ["snapshot", "-l", "empty"],
    ["snapshot", "-l", "text.txt"],
    ["snapshot", "-l", "trunc.qcow2"],
    ["snapshot", "-l", "bigcluster.qcow2"],
    ["snapshot", "-l", "orphan.qcow2"],
    ["snapshot", "-c", "s", "raw.img"],
    ["snapshot", "-c", "s", "corrupt.qcow2"],
    ["snapshot", "-c", "s", "trunc.qcow2"],
    ["snapshot", "-c", "s", "self.qcow2"],
    ["snapshot", "-c", "s", "badl1.qcow2"],
    ["snapshot", "-a", "nosuch", "snap.qcow2"],
    ["snapshot", "-d", "nosuch", "snap.qcow2"],
    ["snapshot", "-a", "first", "raw.img"],
    ["snapshot", "-d", "first", "raw.img"],
    ["snapshot", "-a", "first", "missing"],
    ["snapshot", "-l", "-c", "x", "snap.qcow2"],
    ["snapshot", "-c", "s", "-U", "snap.qcow2"],
    ["snapshot", "-c"],
    ["snapshot", "-l"],
    ["snapshot", "snap.qcow2"],
    ["snapshot", "-c", "s", "--object", "secret,id=s0", "snap.qcow2"],
]


@pytest.mark.parametrize(
    "args",
    CREATE_CASES + INFO_CASES + CHECK_CASES + SNAPSHOT_CASES,
    ids=lambda args: " ".join(a[:24] for a in args),
)
def test_bad_input_like_qemu_img(twins, args):
    try:
        assert_like_qemu(twins, args)
    finally:
        if args[0] in ("create", "snapshot") or "-r" in args:
            twins.reset()


# QEMU 7.2 hangs on these (a backing chain that loops is only detected by info
# --backing-chain): qimg must fail at once, in one line, with exit code 1.
LOOP_CASES = [
    ["create", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", "new.qcow2"],
    ["check", "self.qcow2"],
    ["check", "loop-a.qcow2"],
    ["check", "-r", "all", "self.qcow2"],
    ["snapshot", "-l", "self.qcow2"],
    ["snapshot", "-l", "loop-a.qcow2"],
    ["snapshot", "-c", "s", "self.qcow2"],
]


@pytest.mark.parametrize("args", LOOP_CASES, ids=lambda args: " ".join(args))
def test_backing_loops_fail_in_one_line(twins, args):
    try:
        result = subprocess.run(
            [str(twins.launcher), *args],
            cwd=twins.qimg_dir,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 1, result
        lines = result.stderr.splitlines()
        assert lines and lines[0].startswith("qimg: ") and "loop" in result.stderr.lower(), (
            result.stderr
        )
        assert len([line for line in lines if line.startswith("qimg: ")]) == 1, result.stderr
        assert not (twins.qimg_dir / "new.qcow2").exists()
    finally:
        twins.reset()


def test_qemu_img_answers_are_what_we_compare_against(twins):
    """Guard: the inputs are as bad as intended (qemu-img itself fails on them)."""
    for args, code in (
        (["info", "missing"], 1),
        (["check", "raw.img"], 63),
        (["check", "bigcluster.qcow2"], 1),
        (["info", "--backing-chain", "self.qcow2"], 1),
        (["snapshot", "-l", "trunc.qcow2"], 1),
    ):
        qemu, _ = twins.run(args)
        assert qemu.returncode == code, (args, qemu.stderr)


# ---------------------------------------------------------------------------------------------
# Untrusted images
# ---------------------------------------------------------------------------------------------


def forget_backing_format(path: Path) -> None:
    """Turn the backing format extension into an unknown one (as in images made before
    QEMU stored it, or by another tool): the backing format must then be probed."""
    with open(path, "r+b") as f:
        header = f.read(65536)
        offset = struct.unpack_from(">I", header, 100)[0]
        while True:
            ext_type, length = struct.unpack_from(">II", header, offset)
            assert ext_type, "no backing format extension"
            if ext_type == 0xE2792ACA:
                f.seek(offset)
                f.write(struct.pack(">I", 0x0BADF00D))
                return
            offset += 8 + (length + 7) // 8 * 8


def qemu_raw(image: Path, out: Path) -> bytes:
    subprocess.run(
        [QEMU_IMG, "convert", "-O", "raw", str(image), str(out)], check=True, capture_output=True
    )
    return out.read_bytes()


def top_over(directory: Path, backing_name: str, backing_fmt: str | None) -> Path:
    top = directory / "top.qcow2"
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing_name,
            "-F",
            backing_fmt or "raw",
            str(top),
            "1M",
        ],
        check=True,
    )
    if backing_fmt is None:
        forget_backing_format(top)
    return top


def test_backing_without_format_is_probed_as_qcow2_only(tmp_path):
    """No backing format stored and a qcow2 file behind the name: probed as qcow2, as QEMU
    7.2 does; the engine reads through the chain what QEMU reads and writes nothing to
    the backing file."""
    host = tmp_path / "host.file"
    qemu_create(host, "1M")
    qemu_io(host, "write -P 0x5a 0 64k")
    before = host.read_bytes()
    top = top_over(tmp_path, "host.file", None)
    with qcow2lib.open(str(top), "r") as img:
        assert img.backing_format is None
        assert img.backing.format == "qcow2"
        ours = img.read(0, img.size)
    assert ours == qemu_raw(top, tmp_path / "qemu.raw")
    with qcow2lib.open(str(top), "r+") as img:
        img.write(4096, b"top" * 100)
    assert host.read_bytes() == before


def test_backing_host_file_is_not_opened_as_raw_unless_stated(tmp_path):
    """No backing format stored and a plain host file behind the name: QEMU 7.2 would probe
    it as raw and show its bytes to the guest; qcow2lib and qimg refuse to read through it
    (one clear line) until the format is stated, and then read what QEMU reads. (`info
    --backing-chain` still describes the file: its size and format, not its bytes.)"""
    host = tmp_path / "host.file"
    host.write_bytes(b"secret host data" + bytes((1 << 20) - 16))
    top = top_over(tmp_path, "host.file", None)
    with pytest.raises(qcow2lib.UnsupportedFeatureError, match="host.file.*not opened as raw"):
        qcow2lib.open(str(top), "r")
    (tmp_path / "bin").mkdir()
    launcher = make_launcher(tmp_path / "bin", "qimg")
    for args in (
        ["convert", "-O", "raw", "top.qcow2", "out.raw"],
        ["map", "top.qcow2"],
        ["compare", "top.qcow2", "host.file"],
        ["commit", "top.qcow2"],
    ):
        result = subprocess.run([launcher, *args], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr, args
        assert result.stderr.count("\n") == 1 and "not opened as raw" in result.stderr, (
            args,
            result.stderr,
        )
    assert not (tmp_path / "out.raw").exists() or not (
        tmp_path / "out.raw"
    ).read_bytes().startswith(b"secret")
    subprocess.run(
        [launcher, "rebase", "-u", "-b", "host.file", "-F", "raw", "top.qcow2"],
        cwd=tmp_path,
        check=True,
    )
    with qcow2lib.open(str(top), "r") as img:
        assert img.backing.format == "raw"
        assert img.read(0, img.size) == qemu_raw(top, tmp_path / "qemu.raw")


def test_stated_backing_format_is_never_second_guessed(tmp_path):
    """backing_fmt=qcow2 over a raw file: refused (as QEMU refuses); backing_fmt=raw over a
    qcow2 file: its bytes are the backing content (the qcow2 header is data), as in QEMU."""
    raw = tmp_path / "plain.raw"
    raw.write_bytes(os.urandom(1 << 20))
    q = tmp_path / "real.qcow2"
    qemu_create(q, "1M")
    top = top_over(tmp_path, "plain.raw", "qcow2")
    with pytest.raises(qcow2lib.Qcow2Error):
        qcow2lib.open(str(top), "r")
    assert (
        subprocess.run([QEMU_IO, "-c", "read 0 512", str(top)], capture_output=True).returncode != 0
    )
    top.unlink()
    top = top_over(tmp_path, "real.qcow2", "raw")
    with qcow2lib.open(str(top), "r") as img:
        assert img.backing.format == "raw"
        ours = img.read(0, img.size)
    assert ours[:4] == b"QFI\xfb"
    assert ours == qemu_raw(top, tmp_path / "qemu.raw")


def test_probed_raw_image_cannot_become_another_format(tmp_path):
    """A raw image opened without a format: a write to its first sector that would make it
    probe as qcow2 is refused (QEMU: "Operation not permitted"), other writes are fine; with
    the format stated the write goes through (as with qemu-io -f raw)."""
    header = tmp_path / "q.qcow2"
    qemu_create(header, "1M")
    qcow2_sector = header.read_bytes()[:512]
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    result = subprocess.run(
        [QEMU_IO, "-c", f"write -s {header} 0 512", str(disk)], capture_output=True, text=True
    )
    assert "Operation not permitted" in result.stdout + result.stderr
    with qcow2lib.open(str(disk), "r+") as img:
        assert img.format == "raw"
        img.write(512, b"x" * 512)
        img.write(0, b"plain data".ljust(512, b"\0"))
        with pytest.raises(qcow2lib.Qcow2Error):
            img.write(0, qcow2_sector)
        with pytest.raises(qcow2lib.Qcow2Error):
            img.write(0, qcow2_sector + b"\0" * 512)
    assert qcow2lib.probe_format(str(disk)) == "raw"
    with qcow2lib.open(str(disk), "r+", fmt="raw") as img:
        img.write(0, qcow2_sector)
    assert qcow2lib.probe_format(str(disk)) == "qcow2"


# --- which files of a chain each command opens (inotify) --------------------------------------

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
IN_MODIFY, IN_CLOSE_WRITE, IN_OPEN = 0x2, 0x8, 0x20


class OpenWatch:
    """Report which of some files were opened (and which written) while it ran."""

    def __init__(self, paths: list[Path]):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, ctypes.get_errno()
        self.names = {}
        for path in paths:
            wd = _libc.inotify_add_watch(
                self.fd, str(path).encode(), IN_OPEN | IN_MODIFY | IN_CLOSE_WRITE
            )
            assert wd >= 0, (path, ctypes.get_errno())
            self.names[wd] = path.name

    def events(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 65536)
            pos = 0
            while pos < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, pos)
                pos += 16 + length
                kinds = seen.setdefault(self.names[wd], set())
                if mask & IN_OPEN:
                    kinds.add("open")
                if mask & (IN_MODIFY | IN_CLOSE_WRITE):
                    kinds.add("write")
        return seen

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    """top.qcow2 -> mid.qcow2 -> base.raw, and data.qcow2 with an external data file."""
    directory = tmp_path_factory.mktemp("chain")
    (directory / "base.raw").write_bytes(b"base" * (1 << 18))
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"],
        cwd=directory,
        check=True,
    )
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        cwd=directory,
        check=True,
    )
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "1M"],
        cwd=directory,
        check=True,
    )
    bindir = directory / "bin"
    bindir.mkdir()
    return directory, make_launcher(bindir, "qimg")


@pytest.mark.parametrize(
    "args",
    [
        ["info", "top.qcow2"],
        ["info", "-U", "top.qcow2"],
        ["info", "-f", "qcow2", "top.qcow2"],
        ["info", "--backing-chain", "top.qcow2"],
        ["info", "-U", "--backing-chain", "top.qcow2"],
        ["check", "top.qcow2"],
        ["check", "-U", "top.qcow2"],
        ["check", "-r", "leaks", "top.qcow2"],
        ["snapshot", "-l", "top.qcow2"],
        ["snapshot", "-l", "-U", "top.qcow2"],
        ["info", "data.qcow2"],
        ["info", "-U", "data.qcow2"],
        ["check", "data.qcow2"],
    ],
)
def test_commands_open_no_more_of_the_chain_than_qemu_img(chain_dir, args):
    """qimg opens a backing or data file only where qemu-img does, and never for writing
    where qemu-img only reads it (info without --backing-chain opens no backing file)."""
    directory, launcher = chain_dir
    watched = [directory / name for name in ("mid.qcow2", "base.raw", "data.raw")]
    seen = {}
    for tool, command in (("qemu-img", [QEMU_IMG]), ("qimg", [str(launcher)])):
        watch = OpenWatch(watched)
        try:
            result = subprocess.run(
                command + args, cwd=directory, capture_output=True, text=True, timeout=60
            )
            seen[tool] = (result.returncode, watch.events())
        finally:
            watch.close()
    (qemu_code, qemu_seen), (qimg_code, qimg_seen) = seen["qemu-img"], seen["qimg"]
    assert qimg_code == qemu_code, (qemu_seen, qimg_seen)
    for name, kinds in qimg_seen.items():
        assert kinds <= qemu_seen.get(name, set()), (
            f"qimg {' '.join(args)}: {name} {sorted(kinds)}; qemu-img: "
            f"{sorted(qemu_seen.get(name, set()))}"
        )
    if args[0] == "info" and "--backing-chain" not in args:
        assert not qimg_seen.get("mid.qcow2") and not qimg_seen.get("base.raw")
