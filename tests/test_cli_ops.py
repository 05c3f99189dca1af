"""qimg convert/map/compare/resize/measure/rebase/commit/amend/dd against the real qemu-img.

Every comparison copies the same source images into two scratch directories, runs
qemu-img in one and qimg (in-process, as "qemu-img") in the other with the same
arguments, and requires the same exit code, stdout and stderr. Images the commands
write are then checked with the real qemu-img: `check` must be clean, `compare` against
what qemu-img wrote must find them identical, and for qcow2 output the allocation maps
must be the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qcow2lib.cli import common, progress
from qemutools import (
    both_on_small_disks,
    make_launcher,
    qemu_img,
    qemu_io,
    run,
    run_on_a_small_disk,
)
from shared import build_once
from qemutools import inside, run_qimg_in as run_qimg

LUKS = ["--object", "secret,id=sec0,data=secret-pw"]
LUKS_OPEN = "driver=qcow2,file.filename={},encrypt.key-secret=sec0"


def run_qemu(directory: Path, *args) -> subprocess.CompletedProcess:
    """The real qemu-img in `directory`; output kept byte-exact (progress uses "\\r")."""
    result = run(["qemu-img", *args], check=False, cwd=directory, text=False)
    return subprocess.CompletedProcess(
        args,
        result.returncode,
        result.stdout.decode("utf-8", "surrogateescape"),
        result.stderr.decode("utf-8", "surrogateescape"),
    )


def build_sources(directory: Path) -> None:
    """The images every test starts from, made by the real QEMU tools."""
    with inside(directory):
        # a.qcow2: data, a zero run, an internal snapshot, then changes after it
        qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "10M")
        qemu_io(
            "a.qcow2", "write -P 1 0 3M", "write -z 4M 1M", "write -P 2 5M 1M", "write -P 9 9M 512"
        )
        qemu_img("snapshot", "-c", "s1", "a.qcow2")
        qemu_io("a.qcow2", "write -P 3 0 1M", "write -z 5M 64k")
        # r.raw: a raw image with data and holes
        qemu_img("create", "-q", "-f", "raw", "r.raw", "4M")
        qemu_io("r.raw", "write -P 0x41 0 1M", "write -P 0x42 3M 4k", fmt="raw")
        # a 3-deep chain base <- mid <- top
        qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M")
        qemu_io("base.qcow2", "write -P 0x11 0 4M", "write -P 0x12 7M 1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
        qemu_io("mid.qcow2", "write -P 0x22 2M 1M", "write -z 3M 512k")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
        qemu_io("top.qcow2", "write -P 0x33 6M 1M", "write -P 0x34 1M 4k")
        # compressed sources
        qemu_img("convert", "-c", "-O", "qcow2", "a.qcow2", "cz.qcow2")
        qemu_img(
            "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "a.qcow2", "cs.qcow2"
        )
        # a LUKS image
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                *LUKS,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "l.qcow2",
                "6M",
            ]
        )
        run(
            [
                "qemu-io",
                *LUKS,
                "--image-opts",
                LUKS_OPEN.format("l.qcow2"),
                "-c",
                "write -P 0x77 1M 2M",
            ]
        )
        Path("pw.txt").write_text("secret-pw")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory, "cli-ops-sources", build_sources)


class Twins:
    """qemu-img's and qimg's scratch directories, both starting as copies of the sources."""

    def __init__(self, tmp_path: Path, sources: Path):
        self.qemu_dir = tmp_path / "qemu"
        self.qimg_dir = tmp_path / "qimg"
        for directory in self.dirs():
            subprocess.run(
                ["cp", "-a", "--sparse=always", str(sources), str(directory)], check=True
            )

    def dirs(self) -> tuple[Path, Path]:
        return self.qemu_dir, self.qimg_dir

    def both(self, *args):
        return run_qemu(self.qemu_dir, *args), run_qimg(self.qimg_dir, *args)

    def assert_same(self, *args, mask=None) -> subprocess.CompletedProcess:
        expected, actual = self.both(*args)
        assert "Traceback" not in actual.stderr, actual.stderr

        def seen(result, directory):
            texts = [t.replace(str(directory), "<dir>") for t in (result.stdout, result.stderr)]
            return (result.returncode, *(mask(t) if mask else t for t in texts))

        assert seen(actual, self.qimg_dir) == seen(expected, self.qemu_dir), args
        return actual

    def assert_same_image(
        self, name: str, fmt: str | None = None, same_map: bool = True, extra: tuple = ()
    ) -> None:
        """The image qimg wrote: clean, identical in content (and map) to qemu-img's."""
        ours, theirs = self.qimg_dir / name, self.qemu_dir / name
        assert ours.exists() == theirs.exists()
        if not theirs.exists():
            return
        f = ["-f", fmt, "-F", fmt] if fmt else []
        result = qemu_img("compare", *extra, *f, theirs, ours, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        fmt_args = ["-f", fmt] if fmt else []
        info = (
            json.loads(qemu_img("info", "--output=json", *extra[:0], *fmt_args, ours).stdout)
            if not extra
            else None
        )
        if (info or {}).get("format") == "qcow2":
            code = qemu_img("check", ours, check=False).returncode
            assert code == 0
        if same_map and not extra:
            maps = [
                json.loads(qemu_img("map", "--output=json", *fmt_args, path).stdout)
                for path in (theirs, ours)
            ]
            assert guest_map(maps[1]) == guest_map(maps[0])

    def info(self, name: str) -> tuple[dict, dict]:
        """qemu-img info of (qemu-img's, qimg's) image, paths and disk usage left out."""
        infos = []
        for directory in self.dirs():
            text = qemu_img("info", "--output=json", directory / name).stdout
            info = json.loads(text.replace(str(directory), "<dir>"))
            info.pop("actual-size")
            infos.append(info)
        return infos[0], infos[1]

    def assert_same_info(self, *names: str) -> None:
        for name in names:
            if (self.qemu_dir / name).exists():
                theirs, ours = self.info(name)
                assert ours == theirs, name


@pytest.fixture
def twins(tmp_path, sources) -> Twins:
    return Twins(tmp_path, sources)


def guest_map(entries: list[dict]) -> list[dict]:
    """A map without host offsets, runs merged: where the guest sees data, zeros, backing.

    (Where two writers put clusters in the file is theirs to choose.)"""
    merged: list[dict] = []
    for entry in entries:
        entry = {k: v for k, v in entry.items() if k != "offset"}
        last = merged[-1] if merged else None
        if (
            last
            and all(last[k] == entry[k] for k in ("depth", "present", "zero", "data"))
            and last["start"] + last["length"] == entry["start"]
        ):
            last["length"] += entry["length"]
        else:
            merged.append(entry)
    return merged


# --- convert ---------------------------------------------------------------------------------

CONVERT_CASES = [
    ["-O", "qcow2", "a.qcow2", "out"],
    ["-O", "raw", "a.qcow2", "out"],
    ["a.qcow2", "out"],
    ["-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=4k,compat=0.10", "a.qcow2", "out"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "a.qcow2", "out"],
    ["-O", "qcow2", "-o", "preallocation=metadata", "a.qcow2", "out"],
    ["-O", "qcow2", "r.raw", "out"],
    ["-f", "raw", "-O", "qcow2", "r.raw", "out"],
    ["-O", "qcow2", "top.qcow2", "out"],
    ["-O", "qcow2", "-c", "a.qcow2", "out"],
    ["-O", "qcow2", "-c", "-o", "compression_type=zstd", "top.qcow2", "out"],
    ["-O", "qcow2", "-c", "-o", "cluster_size=4k", "r.raw", "out"],
    ["-O", "qcow2", "cz.qcow2", "out"],
    ["-O", "raw", "cs.qcow2", "out"],
    ["-O", "qcow2", "-S", "0", "a.qcow2", "out"],
    ["-O", "qcow2", "-S", "64k", "r.raw", "out"],
    ["-O", "raw", "-S", "0", "r.raw", "out"],
    ["-O", "raw", "-C", "r.raw", "out"],
    ["-O", "qcow2", "-m", "1", "-W", "top.qcow2", "out"],
    ["-O", "qcow2", "-m", "16", "-t", "none", "-T", "writeback", "a.qcow2", "out"],
    ["-O", "qcow2", "-U", "a.qcow2", "out"],
    ["-O", "qcow2", "-q", "a.qcow2", "out"],
    ["-O", "qcow2", "r.raw", "r.raw", "a.qcow2", "out"],
    ["-O", "qcow2", "-l", "s1", "a.qcow2", "out"],
    ["-O", "qcow2", "-l", "1", "a.qcow2", "out"],
    ["-O", "qcow2", "-l", "snapshot.name=s1", "a.qcow2", "out"],
    ["-O", "qcow2", "-l", "snapshot.id=1", "a.qcow2", "out"],
    ["-O", "qcow2", "-l", "snapshot.id=1,snapshot.name=s1", "a.qcow2", "out"],
    ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "out"],
    ["-O", "qcow2", "-o", "backing_file=mid.qcow2,backing_fmt=qcow2", "top.qcow2", "out"],
    ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "-c", "top.qcow2", "out"],
    ["--image-opts", "-O", "qcow2", "driver=qcow2,file.filename=a.qcow2", "out"],
    ["--image-opts", "-O", "qcow2", "file.filename=r.raw", "out"],
    ["-O", "qcow2", "--salvage", "a.qcow2", "out"],
    ["-O", "qcow2", "-r", "1G", "a.qcow2", "out"],
    ["-O", "qcow2", "--bitmaps", "a.qcow2", "out"],
]


@pytest.mark.parametrize("args", CONVERT_CASES, ids=" ".join)
def test_convert(twins, args):
    twins.assert_same("convert", *args)
    fmt = args[args.index("-O") + 1] if "-O" in args else "raw"
    twins.assert_same_image("out", fmt, same_map=fmt == "qcow2")


def test_convert_existing_target(twins):
    """-n writes into an image that already exists (and may already hold data)."""
    for directory in twins.dirs():
        with inside(directory):
            qemu_img("create", "-q", "-f", "qcow2", "out", "12M")
            qemu_io("out", "write -P 0x55 0 12M")
    twins.assert_same("convert", "-n", "-O", "qcow2", "top.qcow2", "out")
    twins.assert_same_image("out", "qcow2")
    for directory in twins.dirs():
        with inside(directory):
            qemu_img("create", "-q", "-f", "qcow2", "zero", "12M")
    twins.assert_same("convert", "-n", "--target-is-zero", "-O", "qcow2", "a.qcow2", "zero")
    twins.assert_same_image("zero", "qcow2")
    twins.assert_same("convert", "-n", "r.raw", "small.raw")  # missing target
    twins.assert_same("convert", "-n", "-O", "qcow2", "a.qcow2", "base.qcow2")  # too small


CONVERT_ERRORS = [
    [],
    ["a.qcow2"],
    ["-x", "a.qcow2", "out"],
    ["-O"],
    ["-C", "-c", "a.qcow2", "out"],
    ["-C", "-S", "4k", "a.qcow2", "out"],
    ["-S", "100", "a.qcow2", "out"],
    ["-S", "32M", "a.qcow2", "out"],
    ["-S", "x", "a.qcow2", "out"],
    ["-m", "0", "a.qcow2", "out"],
    ["-m", "17", "a.qcow2", "out"],
    ["-m", "x", "a", "b"],
    ["-m", "010", "a.qcow2", "out"],
    ["-r", "x", "a.qcow2", "out"],
    ["--target-is-zero", "a.qcow2", "out"],
    ["--target-image-opts", "a.qcow2", "out"],
    ["-n", "-o", "cluster_size=4k", "a.qcow2", "out"],
    ["--skip-broken-bitmaps", "a", "b"],
    ["-C", "--salvage", "a", "b"],
    ["-o", "", "a.qcow2", "out"],
    ["-o", "help", "a.qcow2"],
    ["-O", "qcow2", "-o", "help", "a.qcow2", "out"],
    ["-O", "raw", "-o", "?", "a.qcow2"],
    ["-O", "foo", "-o", "help", "a.qcow2"],
    ["-O", "foo", "a.qcow2", "out"],
    ["-O", "qcow2", "-o", "foo=1", "a.qcow2", "out"],
    ["-O", "qcow2", "-o", "cluster_size=3k", "a.qcow2", "out"],
    ["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd", "a.qcow2", "out"],
    ["-T", "bad", "a.qcow2", "out"],
    ["-t", "bad", "a.qcow2", "out"],
    ["missing.qcow2", "out"],
    ["-f", "qcow2", "r.raw", "out"],
    ["-O", "raw", "a.qcow2", ""],
    ["-l", "nosuch", "a.qcow2", "out"],
    ["-l", "s1", "a.qcow2", "a.qcow2", "out"],
    ["-l", "snapshot.foo=1", "a.qcow2", "out"],
    ["-l", "snapshot.id=9", "a.qcow2", "out"],
    ["-l", "s1", "r.raw", "out"],
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out"],
    ["-O", "raw", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out"],
    ["-O", "raw", "-F", "qcow2", "top.qcow2", "out"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "r.raw", "r.raw", "out"],
    ["-O", "qcow2", "-B", "missing", "-F", "qcow2", "top.qcow2", "out"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "foo", "top.qcow2", "out"],
    ["-n", "--target-is-zero", "-B", "x", "a.qcow2", "out"],
    ["-c", "a.qcow2", "out"],
    ["-n", "-c", "a.qcow2", "r.raw"],
    ["-O", "qcow2", "-c", "-o", "preallocation=full", "a.qcow2", "out"],
    ["-O", "qcow2", "-c", "-o", "encryption=on", "a.qcow2", "out"],
    ["-O", "raw", "--bitmaps", "a.qcow2", "out"],
    ["-O", "qcow2", "--bitmaps", "a.qcow2", "r.raw", "out"],
    ["-O", "qcow2", "l.qcow2", "out"],
    ["--image-opts", "-f", "qcow2", "a.qcow2", "out"],
    ["--image-opts", "a.qcow2", "out"],
    ["--image-opts", "driver=foo,file.filename=a.qcow2", "out"],
    ["--image-opts", "driver=qcow2", "out"],
    ["--image-opts", "driver=qcow2,file.filename=a.qcow2,bogus=1", "out"],
    ["-p", "missing", "out"],
    ["-p", "-O", "raw", "-l", "x", "a.qcow2", "out"],
    ["-O", "qcow2", "a.qcow2", "a.qcow2"],
    ["-n", "-O", "qcow2", "a.qcow2", "a.qcow2"],
    ["-O", "raw", "r.raw", "file:r.raw"],
    ["-l", "snapshot.id", "a.qcow2", "out"],
    ["-l", "snapshot.id=1,nosnapshot.name", "a.qcow2", "out"],
]


@pytest.mark.parametrize("args", CONVERT_ERRORS, ids=" ".join)
def test_convert_errors(twins, args):
    twins.assert_same("convert", *args)


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "-m", "1", "-O", "qcow2", "a.qcow2", "out"],
        ["-p", "-m", "1", "-O", "raw", "top.qcow2", "out"],
        ["-p", "-m", "1", "-O", "qcow2", "-c", "r.raw", "out"],
        ["-p", "-q", "-O", "qcow2", "a.qcow2", "out"],
        ["-p", "-O", "qcow2", "-S", "0", "-m", "1", "a.qcow2", "out"],
    ],
    ids=" ".join,
)
def test_convert_progress(twins, args):
    """qemu-img's exact bar, on stdout, "\r" after each value, "\n" at the end."""
    result = twins.assert_same("convert", *args)
    if "-q" not in args:
        assert result.stdout.startswith("    (0.00/100%)\r")
        assert result.stdout.endswith("    (100.00/100%)\r    (100.00/100%)\r\n")


def test_convert_progress_parallel(twins):
    """With parallel workers the values are those of finished work (qemu-img counts work
    as it is handed out), so only the form is qemu-img's: rising, 0 to 100."""
    expected, actual = twins.both("convert", "-p", "-O", "qcow2", "top.qcow2", "out")
    assert (actual.returncode, actual.stderr) == (expected.returncode, expected.stderr)
    values = [float(v) for v in re.findall(r"    \((\d+\.\d\d)/100%\)\r", actual.stdout)]
    assert actual.stdout == "".join(f"    ({v:.2f}/100%)\r" for v in values) + "\n"
    assert values[0] == 0 and values[-2:] == [100, 100] and values == sorted(values)
    twins.assert_same_image("out", "qcow2")


def run_on_terminal(directory: Path, *args) -> tuple[int, str]:
    """The installed qimg with a pseudo-terminal as its stdout: (exit code, output)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.chdir(directory)
            os.execvp("qimg", ["qimg", *map(str, args)])
        finally:
            os._exit(127)
    output = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode()


def test_convert_progress_on_terminal(tmp_path):
    """On a terminal -p also shows bytes done of the total, the throughput and the time
    left; piped (the other tests) it stays qemu-img's bare percentages."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "big.qcow2", "64M")
    qemu_io(tmp_path / "big.qcow2", "write -P 5 0 48M")
    code, output = run_on_terminal(
        tmp_path, "convert", "-p", "-m", "1", "-O", "qcow2", "-c", "big.qcow2", "out.qcow2"
    )
    assert code == 0, output
    lines = output.split("\r")
    assert lines[0] == "    (0.00/100%)\x1b[K"
    assert re.fullmatch(
        r"    \(100\.00/100%\)  48 MiB of 48 MiB(, [0-9.]+ [KMG]iB/s)?\x1b\[K", lines[-3]
    ), lines[-3]
    assert lines[-1] == "\n"
    assert qemu_img("compare", tmp_path / "big.qcow2", tmp_path / "out.qcow2").returncode == 0


def test_progress_details_on_terminal(monkeypatch):
    """The terminal line's arithmetic: bytes, rate over the elapsed time, time left."""
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "_stdout_is_terminal", lambda: True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        meter = progress.Progress(common.Cli("qemu-img"), True, 1.0)
        meter.print(0, 100)
        clock[0] += 4.0
        meter.callback(100 << 20, 1 << 30)  # 100 MiB of 1 GiB in 4 s: 25 MiB/s
        clock[0] += 0.1
        meter.callback((100 << 20) + 1, 1 << 30)  # moved too little, too soon: no line
        clock[0] += 0.3
        meter.callback((101 << 20), 1 << 30)  # too little, but a refresh is due
        meter.end()
    assert out.getvalue().split("\r") == [
        "    (0.00/100%)\x1b[K",
        "    (9.77/100%)  100 MiB of 1 GiB, 25 MiB/s, 0:00:36 left\x1b[K",
        "    (9.86/100%)  101 MiB of 1 GiB, 23 MiB/s, 0:00:40 left\x1b[K",
        "\n",
    ]


def test_convert_round_trips(twins):
    """raw -> qcow2 -> raw gives the same bytes; a 3-deep chain flattens to its content."""
    d = twins.qimg_dir
    assert run_qimg(d, "convert", "-O", "qcow2", "r.raw", "x.qcow2").returncode == 0
    assert run_qimg(d, "convert", "-O", "raw", "x.qcow2", "y.raw").returncode == 0
    assert (d / "y.raw").read_bytes() == (d / "r.raw").read_bytes()
    assert run_qimg(d, "convert", "-O", "qcow2", "top.qcow2", "flat.qcow2").returncode == 0
    info = json.loads(qemu_img("info", "--output=json", d / "flat.qcow2").stdout)
    assert "backing-filename" not in info
    assert qemu_img("compare", d / "flat.qcow2", d / "top.qcow2", check=False).returncode == 0
    assert qemu_img("check", d / "flat.qcow2", check=False).returncode == 0


def test_convert_backing_overlay(twins):
    """-B gives an overlay that reads, over its backing file, as the source does."""
    d = twins.qimg_dir
    # over the source's own backing file, and over an unrelated one
    for backing in ("mid.qcow2", "base.qcow2", "a.qcow2"):
        result = run_qimg(
            d, "convert", "-O", "qcow2", "-B", backing, "-F", "qcow2", "top.qcow2", "ov.qcow2"
        )
        assert result.returncode == 0, result.stderr
        info = json.loads(qemu_img("info", "--output=json", d / "ov.qcow2").stdout)
        assert info["backing-filename"] == backing
        assert qemu_img("compare", d / "ov.qcow2", d / "top.qcow2", check=False).returncode == 0
        assert qemu_img("check", d / "ov.qcow2", check=False).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed(twins, ctype):
    d = twins.qimg_dir
    result = run_qimg(
        d, "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", "top.qcow2", "c.qcow2"
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(qemu_img("info", "--output=json", d / "c.qcow2").stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    assert qemu_img("compare", d / "c.qcow2", d / "top.qcow2", check=False).returncode == 0
    assert qemu_img("check", d / "c.qcow2", check=False).returncode == 0
    assert info["actual-size"] < 4 << 20


def test_convert_to_and_from_luks(twins):
    d = twins.qimg_dir
    result = run_qimg(
        d,
        "convert",
        *LUKS,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "a.qcow2",
        "enc.qcow2",
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    info = json.loads(qemu_img("info", "--output=json", d / "enc.qcow2").stdout)
    assert info["encrypted"] and info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    compare = run(
        [
            "qemu-img",
            "compare",
            *LUKS,
            "--image-opts",
            LUKS_OPEN.format(d / "enc.qcow2"),
            f"driver=qcow2,file.filename={d}/a.qcow2",
        ],
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # and back, the secret read from a file this time
    result = run_qimg(
        d,
        "convert",
        "--object",
        "secret,id=sec0,file=pw.txt",
        "--image-opts",
        LUKS_OPEN.format("enc.qcow2"),
        "plain.raw",
    )
    assert result.returncode == 0, result.stderr
    assert (
        qemu_img("compare", "-F", "raw", d / "a.qcow2", d / "plain.raw", check=False).returncode
        == 0
    )
    # the QEMU-made LUKS image, read with the secret from the environment (qimg's env=)
    os.environ["QIMG_TEST_SECRET"] = "secret-pw"
    try:
        result = run_qimg(
            d,
            "convert",
            "--object",
            "secret,id=sec0,env=QIMG_TEST_SECRET",
            "--image-opts",
            LUKS_OPEN.format("l.qcow2"),
            "-O",
            "qcow2",
            "l2.qcow2",
        )
    finally:
        del os.environ["QIMG_TEST_SECRET"]
    assert result.returncode == 0, result.stderr
    compare = run(
        [
            "qemu-img",
            "compare",
            *LUKS,
            "--image-opts",
            LUKS_OPEN.format(d / "l.qcow2"),
            f"driver=qcow2,file.filename={d}/l2.qcow2",
        ],
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_convert_legacy_aes(twins):
    twins.assert_same(
        "convert",
        *LUKS,
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "r.raw",
        "aes.qcow2",
    )
    d = twins.qimg_dir
    compare = run(
        [
            "qemu-img",
            "compare",
            *LUKS,
            "--image-opts",
            LUKS_OPEN.format(d / "aes.qcow2"),
            f"driver=raw,file.filename={d}/r.raw",
        ],
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "qcow2", "-o", "encrypt.format=luks", "a.qcow2", "out"],
        ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=nope", "a.qcow2", "out"],
        ["-O", "qcow2", "-o", "encrypt.key-secret=sec0", "a.qcow2", "out"],
        ["-O", "qcow2", "-o", "encrypt.format=foo,encrypt.key-secret=sec0", "a.qcow2", "out"],
        [
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=x",
            "a.qcow2",
            "out",
        ],
        [
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.hash-alg=sha1",
            "a.qcow2",
            "out",
        ],
        ["-O", "qcow2", "-c", "-o", "encrypt.format=luks,encrypt.key-secret=sec0", "a.qcow2", "o"],
        ["--image-opts", "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=nope", "out"],
        ["l.qcow2", "out"],
    ],
    ids=" ".join,
)
def test_convert_encryption_errors(twins, args):
    twins.assert_same("convert", *LUKS, *args)


def test_convert_wrong_passphrase(twins):
    twins.assert_same(
        "convert",
        "--object",
        "secret,id=sec0,data=wrong",
        "--image-opts",
        LUKS_OPEN.format("l.qcow2"),
        "out",
    )


# --- --object ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "secret,id=s0,data=abc",
        "secret,id=s0,file=missing",
        "secret,id=s0,file=/",
        "foo",
        "foo,id=x",
        "secret",
        "secret,data=x",
        "secret,id=s0",
        "secret,id=s0,data=x,file=pw.txt",
        "secret,id=s0,data=eHl6,format=base64",
        "secret,id=s0,data=!!,format=base64",
        "secret,id=s0,data=x,format=foo",
        "secret,id=s0,data=x,bogus=1",
        "help",
        "secret,help",
        "secret,id=s0,data=x,keyid=k",
        "secret,id=0s,data=x",
        "id=s0,data=x",
        "secret,bogus=1",
        "secret,id=0,bogus=1",
        "secret,id=s0,data=x,data=y",
        "secret,id=s0,flag",
        "secret,id=s0,data=x,,y",
        ",id=s0",
        "secret,,id=s0",
        "secret,id=s0,data=x,loaded=on",
        "secret,id=s0,file=pw.txt,format=raw",
    ],
    ids=str,
)
def test_object_option(twins, spec):
    if spec == "secret,help":
        # qimg lists its own "env" property as well
        expected, actual = twins.both("info", "--object", spec, "a.qcow2")
        assert actual.stdout.replace("  env=<string>\n", "") == expected.stdout
        return
    twins.assert_same("info", "--object", spec, "a.qcow2", mask=_mask_disk_size)


def test_object_duplicate_id(twins):
    twins.assert_same(
        "info", "--object", "secret,id=a,data=x", "--object", "secret,id=a,data=y", "a.qcow2"
    )


def test_object_secret_from_environment(twins, monkeypatch):
    d = twins.qimg_dir
    monkeypatch.setenv("QIMG_PW", "secret-pw")
    result = run_qimg(
        d,
        "map",
        "--object",
        "secret,id=sec0,env=QIMG_PW",
        "--image-opts",
        LUKS_OPEN.format("l.qcow2"),
        "--output=json",
    )
    assert result.returncode == 0, result.stderr
    result = run_qimg(d, "info", "--object", "secret,id=sec0,env=QIMG_UNSET", "a.qcow2")
    assert (result.returncode, result.stderr) == (
        1,
        "qemu-img: Environment variable 'QIMG_UNSET' is not set\n",
    )
    result = run_qimg(d, "info", "--object", "secret,id=sec0,env=QIMG_PW,data=x", "a.qcow2")
    assert result.returncode == 1
    assert "env" in result.stderr


def _mask_disk_size(text: str) -> str:
    return re.sub(r"^disk size: .*$", "disk size: <masked>", text, flags=re.M)


# --- map ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["a.qcow2"],
        ["--output=json", "a.qcow2"],
        ["top.qcow2"],
        ["--output=json", "top.qcow2"],
        ["cz.qcow2"],
        ["--output=json", "cz.qcow2"],
        ["r.raw"],
        ["--output", "json", "r.raw"],
        ["-f", "raw", "a.qcow2"],
        ["--output=json", "-s", "1M", "-l", "2M", "top.qcow2"],
        ["--start-offset=3M", "--max-length=100", "top.qcow2"],
        ["-s", "20M", "top.qcow2"],
        ["--output=json", "-s", "20M", "top.qcow2"],
        ["-l", "0", "--output=json", "top.qcow2"],
        ["--output=human", "mid.qcow2"],
        ["-U", "a.qcow2"],
        ["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
        ["--output=json", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["l.qcow2"],
        ["-s", "x", "a.qcow2"],
        ["-l", "-1", "a.qcow2"],
        [],
        ["a", "b"],
        ["--output=xml", "a.qcow2"],
        ["missing"],
        ["-x", "a.qcow2"],
        ["--output"],
    ],
    ids=" ".join,
)
def test_map(twins, args):
    twins.assert_same("map", *LUKS, *args)


def test_map_of_image_truncated_below_its_data(twins):
    """A data cluster past the end of the file (the image was cut short under a running
    VM, iotest 102): map reports it where the L2 entry points, as QEMU's block status."""
    for directory in twins.dirs():
        image = directory / "cut.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", image, "64K")
        qemu_io(image, "write -P 7 0 64k")
        qemu_img("resize", "-q", "-f", "raw", "--shrink", image, str(5 * 65536))
    twins.assert_same("map", "cut.qcow2")
    twins.assert_same("map", "--output=json", "cut.qcow2")


# --- compare -----------------------------------------------------------------------------------


def make_compare_images(twins: Twins) -> None:
    for directory in twins.dirs():
        with inside(directory):
            qemu_img("convert", "-O", "raw", "a.qcow2", "a.raw")
            qemu_img("create", "-q", "-f", "qcow2", "big.qcow2", "12M")
            qemu_img("convert", "-n", "-O", "qcow2", "a.qcow2", "big.qcow2")
            shutil.copy("big.qcow2", "big2.qcow2")
            qemu_io("big2.qcow2", "write -P 5 11M 4k")


@pytest.mark.parametrize(
    "args",
    [
        ["a.qcow2", "cz.qcow2"],
        ["a.qcow2", "cs.qcow2"],
        ["a.qcow2", "top.qcow2"],
        ["-s", "a.qcow2", "cz.qcow2"],
        ["-s", "a.qcow2", "a.raw"],
        ["a.qcow2", "a.raw"],
        ["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
        ["-F", "qcow2", "a.qcow2", "a.raw"],
        ["a.qcow2", "big.qcow2"],
        ["-s", "a.qcow2", "big.qcow2"],
        ["a.qcow2", "big2.qcow2"],
        ["big2.qcow2", "a.qcow2"],
        ["-q", "a.qcow2", "top.qcow2"],
        ["-q", "a.qcow2", "a.qcow2"],
        ["a.qcow2"],
        [],
        ["a", "b", "c"],
        ["a.qcow2", "missing"],
        ["missing", "a.qcow2"],
        ["-T", "foo", "a.qcow2", "cz.qcow2"],
        ["--object", "foo", "a.qcow2", "cz.qcow2"],
        ["--object", "secret,id=s0", "a.qcow2", "cz.qcow2"],
        ["-x", "a", "b"],
        ["-U", "a.qcow2", "cz.qcow2"],
        ["l.qcow2", "a.qcow2"],
        ["--image-opts", "driver=qcow2,file.filename=a.qcow2", "file.filename=a.raw"],
        ["--image-opts", LUKS_OPEN.format("l.qcow2"), "driver=qcow2,file.filename=a.qcow2"],
        ["-p", "a.qcow2", "top.qcow2"],
        ["-p", "a.qcow2", "big.qcow2"],
        ["-p", "-q", "a", "b"],
    ],
    ids=" ".join,
)
def test_compare(twins, args):
    make_compare_images(twins)
    twins.assert_same("compare", *LUKS, *args)


# --- resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["a.qcow2", "20M"],
        ["a.qcow2", "+1M"],
        ["a.qcow2", "-1M"],
        ["--shrink", "a.qcow2", "-1M"],
        ["--shrink", "a.qcow2", "1M"],
        ["a.qcow2", "10M"],
        ["-q", "a.qcow2", "+1G"],
        ["r.raw", "+1000"],
        ["-f", "raw", "r.raw", "1M"],
        ["-f", "raw", "--shrink", "r.raw", "1M"],
        ["a.qcow2", "+1000"],
        ["a.qcow2"],
        [],
        ["a.qcow2", "x"],
        ["a.qcow2", "-20M"],
        ["a.qcow2", "0"],
        ["--preallocation=full", "a.qcow2", "12M"],
        ["--preallocation=metadata", "a.qcow2", "12M"],
        ["--preallocation=falloc", "-f", "raw", "r.raw", "12M"],
        ["--preallocation=foo", "a.qcow2", "12M"],
        ["--preallocation=full", "a.qcow2", "5M"],
        ["top.qcow2", "10M"],
        ["mid.qcow2", "+4M"],
        ["missing", "1M"],
        ["a", "b", "1M"],
        ["a.qcow2", "1T"],
        ["a.qcow2", "+9E"],
        ["-f", "qcow2", "r.raw", "1M"],
        ["--image-opts", "driver=qcow2,file.filename=a.qcow2", "11M"],
        ["-x", "a.qcow2", "1M"],
        ["a.qcow2", "-x"],
        ["--shrink", "cz.qcow2", "3M"],
        ["l.qcow2", "8M"],
        ["--image-opts", LUKS_OPEN.format("l.qcow2"), "8M"],
        # sizes past what the L1 table, QEMU's block layer or the file system can take
        ["a.qcow2", "4E"],
        ["a.qcow2", str(2**63 - 2**30)],
        ["a.qcow2", str(2**63 - 2**30 + 512)],
        ["a.qcow2", str(2**63 - 1)],
        ["-f", "raw", "r.raw", str(2**63 - 1)],
        ["-f", "raw", "r.raw", "17T"],
        ["--preallocation=falloc", "-f", "raw", "r.raw", "17T"],
        ["--preallocation=full", "-f", "raw", "r.raw", str(2**63 - 1)],
    ],
    ids=" ".join,
)
def test_resize(twins, args):
    twins.assert_same("resize", *LUKS, *args)
    for name in ("a.qcow2", "top.qcow2", "mid.qcow2", "cz.qcow2"):
        twins.assert_same_image(name, "qcow2")
    ours, theirs = (
        json.loads(qemu_img("info", "--output=json", d / "a.qcow2").stdout)
        for d in (twins.qimg_dir, twins.qemu_dir)
    )
    assert ours["virtual-size"] == theirs["virtual-size"]
    assert (twins.qimg_dir / "r.raw").stat().st_size == (twins.qemu_dir / "r.raw").stat().st_size


def test_resize_shrink_needs_flag(twins):
    """Any shrink is refused without --shrink, and the image is left alone."""
    d = twins.qimg_dir
    before = (d / "a.qcow2").read_bytes()
    for size in ("-512", "10M-512", "1M"):
        result = run_qimg(
            d,
            "resize",
            "a.qcow2",
            size if size[0] == "-" else str(10 * 1024 * 1024 - 512) if size == "10M-512" else size,
        )
        assert result.returncode == 1
        assert result.stderr.startswith(
            "qemu-img: Use the --shrink option to perform a shrink "
            "operation.\nqemu-img: warning: Shrinking an image "
        )
    assert (d / "a.qcow2").read_bytes() == before


# --- measure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--out=json", "--size", "1M"],
        ["--size=1M", "extra", "extra2"],
        ["a.qcow2", "--size", "1M"],
        ["--image-opts", "--size", "1M"],
        ["--size", "1M", "--output=xml"],
        ["--size", "x"],
        ["--size", "1M", "-O", "foo"],
        ["--size", "1M", "-O", "qcow2", "-o", "foo=1"],
        ["--size", "1M", "-o", "help"],
        ["-O", "qcow2", "--size", "1M", "-o", "cluster_size=3k"],
        ["--size", "1G", "-O", "qcow2"],
        ["--size", "1G", "-O", "qcow2", "--output=json"],
        ["a.qcow2"],
        ["-O", "qcow2", "a.qcow2"],
        ["-O", "qcow2", "--output=json", "a.qcow2"],
        ["-O", "qcow2", "top.qcow2"],
        ["-O", "qcow2", "-o", "compat=0.10", "a.qcow2"],
        ["-O", "qcow2", "-l", "s1", "a.qcow2"],
        ["-O", "qcow2", "-l", "snapshot.name=s1", "r.raw"],
        ["-O", "qcow2", "-o", "cluster_size=4k,preallocation=full", "r.raw"],
        ["-O", "qcow2", "-o", "size=x", "--size", "1M"],
        [
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "--size",
            "1G",
        ],
        ["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=on,refcount_bits=1", "--size", "100G"],
        ["-O", "qcow2", "-o", "backing_file=a.qcow2", "top.qcow2"],
        [],
        ["missing"],
        ["-O", "raw", "-o", "preallocation=metadata", "--size", "1M"],
        ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1M"],
        ["-O", "qcow2", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["-O", "qcow2", "l.qcow2"],
        ["-O", "qcow2", "-U", "cz.qcow2"],
        ["-f", "raw", "a.qcow2"],
        ["-O", "file", "--size", "1M"],
        ["-O", "file", "-o", "foo=bar", "--size", "1M"],
        ["-O", "file", "a.qcow2"],
    ],
    ids=" ".join,
)
def test_measure(twins, args):
    twins.assert_same("measure", *LUKS, *args)


@pytest.mark.parametrize(
    "args", [["-x"], ["--foo=1"], ["--si"], ["--size"], ["-f"], ["--help=1"], ["--o"]], ids=" ".join
)
def test_measure_getopt_errors(twins, args):
    """measure lets glibc print its complaint, then prints the help (exit 0)."""
    expected, actual = twins.both("measure", *args)
    assert actual.returncode == expected.returncode == 0
    assert actual.stderr == expected.stderr
    assert actual.stdout.startswith("qemu-img version 7.2")


# --- rebase ------------------------------------------------------------------------------------


def make_rebase_images(twins: Twins) -> None:
    for directory in twins.dirs():
        with inside(directory):
            qemu_img("create", "-q", "-f", "qcow2", "other.qcow2", "4M")
            qemu_io("other.qcow2", "write -P 0x44 0 4M")
            qemu_img("convert", "-O", "raw", "base.qcow2", "base.raw")
            qemu_img("convert", "-O", "raw", "top.qcow2", "top.raw")


@pytest.mark.parametrize(
    "args",
    [
        ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-b", "", "top.qcow2"],
        ["-b", "base.raw", "-F", "raw", "top.qcow2"],
        ["-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-u", "-b", "x.qcow2", "-F", "qcow2", "top.qcow2"],
        ["-u", "-b", "", "top.qcow2"],
        ["-b", "base.qcow2", "top.qcow2"],
        ["-u", "-b", "base.qcow2", "top.qcow2"],
        ["-b", "missing", "-F", "qcow2", "top.qcow2"],
        ["-b", "missing", "top.qcow2"],  # the open fails first, then the missing format
        ["-u", "-b", "missing", "top.qcow2"],
        ["-b", "missing", "-F", "qcow2", "top.raw"],
        ["-b", "base.qcow2", "-F", "foo", "top.qcow2"],
        ["top.qcow2"],
        ["-b", "x"],
        ["-b", "x", "a", "b"],
        ["-q", "-p", "-b", "", "top.qcow2"],
        ["-b", "base.qcow2", "-F", "qcow2", "missing.qcow2"],
        ["-b", "base.qcow2", "-F", "qcow2", "top.raw"],
        ["-t", "foo", "-b", "x", "top.qcow2"],
        ["-T", "foo", "-b", "x", "top.qcow2"],
        ["-p", "-t", "foo", "-b", "x", "top.qcow2"],
        ["-u", "top.qcow2"],
        ["-b", "other.qcow2", "-F", "qcow2", "-f", "qcow2", "top.qcow2"],
        ["-b", "a.qcow2", "-F", "qcow2", "-U", "mid.qcow2"],
        ["--image-opts", "-b", "", "driver=qcow2,file.filename=top.qcow2"],
    ],
    ids=" ".join,
)
def test_rebase(twins, args):
    make_rebase_images(twins)
    twins.assert_same("rebase", *args)
    if "x.qcow2" in args:
        return  # the overlay now names a backing file that does not exist
    for name in ("top.qcow2", "mid.qcow2"):
        twins.assert_same_info(name)
        twins.assert_same_image(name, "qcow2", same_map=False)


def test_rebase_keeps_content(twins):
    """Safe mode: whatever the new backing file, the guest sees the same data."""
    make_rebase_images(twins)
    d = twins.qimg_dir
    for args in (
        ["-b", "other.qcow2", "-F", "qcow2"],
        ["-b", "base.qcow2", "-F", "qcow2"],
        ["-b", "base.raw", "-F", "raw"],
        ["-b", ""],
    ):
        result = run_qimg(d, "rebase", *args, "top.qcow2")
        assert result.returncode == 0, result.stderr
        assert (
            qemu_img("compare", "-F", "raw", d / "top.qcow2", d / "top.raw", check=False).returncode
            == 0
        )
        assert qemu_img("check", d / "top.qcow2", check=False).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", d / "top.qcow2").stdout)
    assert "backing-filename" not in info


# --- commit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["top.qcow2"],
        ["-d", "top.qcow2"],
        ["-b", "base.qcow2", "top.qcow2"],
        ["-b", "mid.qcow2", "top.qcow2"],
        ["-b", "nosuch", "top.qcow2"],
        ["-q", "mid.qcow2"],
        ["base.qcow2"],
        ["-p", "-q", "top.qcow2"],
        [],
        ["a", "b"],
        ["-t", "foo", "top.qcow2"],
        ["missing"],
        ["-r", "x", "top.qcow2"],
        ["-f", "raw", "r.raw"],
        ["-x", "top.qcow2"],
        ["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
        ["-r", "1M", "-t", "none", "t"],
    ],
    ids=" ".join,
)
def test_commit(twins, args):
    twins.assert_same("commit", *args)
    for name in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        twins.assert_same_image(name, "qcow2", same_map=False)


def test_commit_makes_base_equal_top(twins):
    d = twins.qimg_dir
    qemu_img("convert", "-O", "raw", d / "top.qcow2", d / "top.raw")
    result = run_qimg(d, "commit", "-b", "base.qcow2", "top.qcow2")
    assert (result.returncode, result.stdout) == (0, "Image committed.\n")
    assert (
        qemu_img("compare", "-F", "raw", d / "base.qcow2", d / "top.raw", check=False).returncode
        == 0
    )
    assert qemu_img("check", d / "base.qcow2", check=False).returncode == 0
    # a plain commit empties the overlay: it then reads through to the (new) base
    result = run_qimg(d, "commit", "mid.qcow2")
    assert result.returncode == 0
    assert json.loads(qemu_img("map", "--output=json", d / "mid.qcow2").stdout)[0]["depth"] == 1


# --- amend -------------------------------------------------------------------------------------


def make_amend_images(twins: Twins) -> None:
    for directory in twins.dirs():
        with inside(directory):
            qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M")
            qemu_io("v2.qcow2", "write -P 1 0 3M", "write -P 2 8M 64k")


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "-o", "help"],
        ["-f", "raw", "-o", "help"],
        ["-f", "foo", "-o", "help"],
        ["-o", "help", "a.qcow2"],
        ["-o", "help"],
        ["a.qcow2"],
        ["-o", "cluster_size=4k", "a.qcow2"],
        ["-o", "foo=1", "a.qcow2"],
        ["-o", "compat=0.10", "-f", "raw", "r.raw"],
        ["-o", "compat=0.10", "r.raw"],
        ["-o", "compat=1.3", "a.qcow2"],
        ["-o", "size=x", "a.qcow2"],
        ["-o", "refcount_bits=x", "a.qcow2"],
        ["-o", "lazy_refcounts=x", "a.qcow2"],
        ["-o", "compat=0.10", "a.qcow2"],
        ["-o", "compat=0.10", "top.qcow2"],
        ["-o", "compat=0.10", "cs.qcow2"],
        ["-o", "compat=1.1", "v2.qcow2"],
        ["-o", "compat=v3,lazy_refcounts=on", "v2.qcow2"],
        ["-o", "lazy_refcounts=on", "v2.qcow2"],
        ["-o", "refcount_bits=8", "v2.qcow2"],
        ["-o", "refcount_bits=3", "a.qcow2"],
        ["-o", "refcount_bits=1", "a.qcow2"],
        ["-o", "refcount_bits=64,lazy_refcounts=on", "a.qcow2"],
        ["-o", "size=20M", "a.qcow2"],
        ["-o", "size=1M", "a.qcow2"],
        ["-o", "backing_file=x", "top.qcow2"],
        ["-o", "backing_file=mid.qcow2,backing_fmt=qcow2", "top.qcow2"],
        ["-o", "encrypt.keyslot=1", "a.qcow2"],
        ["-o", "data_file=x", "a.qcow2"],
        ["-o", "data_file_raw=on", "a.qcow2"],
        ["-o", "compat=0.10", "missing"],
        ["-o", "compat=1.1", "a", "b"],
        ["-o", "", "a.qcow2"],
        ["-t", "foo", "-o", "compat=1.1", "a"],
        ["-q", "-o", "compat=0.10", "a.qcow2"],
        ["-p", "-o", "compat=1.3", "a.qcow2"],
        ["--image-opts", "-o", "compat=0.10", "driver=qcow2,file.filename=a.qcow2"],
        ["-o", "cluster_size=4k,foo=1", "a.qcow2"],
        ["-x", "a.qcow2"],
    ],
    ids=" ".join,
)
def test_amend(twins, args):
    make_amend_images(twins)
    twins.assert_same("amend", *args)
    for name in ("a.qcow2", "v2.qcow2", "top.qcow2", "cs.qcow2"):
        twins.assert_same_info(name)
        twins.assert_same_image(name, "qcow2", same_map=False)


def test_amend_between_compat_levels(twins):
    """Down to 0.10 and back up: content kept, qemu-img check clean each time."""
    make_amend_images(twins)
    d = twins.qimg_dir
    qemu_img("convert", "-O", "raw", d / "a.qcow2", d / "a.raw")
    for step in (
        ["compat=0.10"],
        ["compat=1.1"],
        ["refcount_bits=2"],
        ["lazy_refcounts=on"],
        ["compat=1.1,refcount_bits=16,lazy_refcounts=off"],
        ["compat=0.10"],
    ):
        result = run_qimg(d, "amend", "-o", *step, "a.qcow2")
        assert result.returncode == 0, result.stderr
        assert qemu_img("check", d / "a.qcow2", check=False).returncode == 0
        assert (
            qemu_img("compare", "-F", "raw", d / "a.qcow2", d / "a.raw", check=False).returncode
            == 0
        )
    info = json.loads(qemu_img("info", "--output=json", d / "a.qcow2").stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "-o", "compat=0.10", "a.qcow2"],
        ["-p", "-o", "compat=1.1,refcount_bits=8", "v2.qcow2"],
        ["-p", "-o", "lazy_refcounts=on", "a.qcow2"],
    ],
    ids=" ".join,
)
def test_amend_progress(twins, args):
    """The same bar (how many steps QEMU's driver reports in between is its own)."""
    make_amend_images(twins)
    expected, actual = twins.both("amend", *args)
    assert (actual.returncode, actual.stderr) == (expected.returncode, expected.stderr)
    for result in (expected, actual):
        assert result.stdout.startswith("    (0.00/100%)\r")
        assert result.stdout.endswith("    (100.00/100%)\r\n")
    twins.assert_same_info("a.qcow2", "v2.qcow2")


# How the image is made (qemu-img create options, size, qemu-io commands), the amend options.
REFCOUNT_WIDTH_CASES = {
    # iotest 112: the first new block fills up with its own count, so the new refcount table
    # needs another block and QEMU walks four times (progress goes back, 66.67 -> 50.00)
    "fourth walk": ("refcount_bits=1,cluster_size=512", "64k", ["write 0 29696"], "64"),
    "narrower": ("cluster_size=65536", "64M", ["write 16M 32M"], "1"),
    "wider": ("refcount_bits=1", "64M", ["write 16M 32M"], "64"),
    "small clusters, spread": (
        "cluster_size=512",
        "16M",
        ["write 0 64k", "write 4M 512", "write 12M 1M"],
        "2",
    ),
    "small clusters, wider": ("cluster_size=512", "4M", ["write 0 1M", "write 3M 4k"], "64"),
    "v2 upgraded too": ("compat=0.10", "32M", ["write 1M 2M"], "8,compat=1.1"),
    "refused": ("refcount_bits=2", "16M", ["write 0 64k", "write 8M 64k"], "1"),
}


def _poke_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


@pytest.mark.parametrize("case", ["unaligned L1 entry", "unaligned preallocated zero cluster"])
def test_amend_downgrade_refuses_broken_tables_as_qemu(twins, case):
    """Zero cluster expansion (compat=0.10) never reads or writes through a misaligned
    offset: it marks the image corrupt and fails with QEMU's notice and error, leaving the
    file exactly as qemu-img leaves it (iotest 060)."""
    for directory in twins.dirs():
        image = directory / "bad.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", image, "64M")
        qemu_io(image, "write 0 64k")
        header = image.read_bytes()[:48]
        l1_offset = int.from_bytes(header[40:48], "big")
        l2_offset = 0x40000  # (cluster 4: header, refcount table and block, L1 table before)
        with open(image, "rb") as f:
            f.seek(l1_offset)
            assert int.from_bytes(f.read(8), "big") & ~(1 << 63) == l2_offset
        if case == "unaligned L1 entry":
            _poke_u64(image, l1_offset, (1 << 63) | 0x42A00)
        else:  # COPIED, offset 0x52a00, zero flag
            _poke_u64(image, l2_offset, (1 << 63) | 0x52A00 | 1)
    result = twins.assert_same("amend", "-o", "compat=0.10", "bad.qcow2")
    assert result.returncode == 1 and "Marking image as corrupt" in result.stderr
    ours, theirs = (directory / "bad.qcow2" for directory in (twins.qimg_dir, twins.qemu_dir))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("case", REFCOUNT_WIDTH_CASES)
def test_amend_refcount_width_progress_is_qemus(twins, case):
    """QEMU walks its refcount table until its allocations settle and reports each walk:
    qimg's line is the same character for character, regressions included."""
    options, size, writes, bits = REFCOUNT_WIDTH_CASES[case]
    first, second = twins.dirs()
    with inside(first):
        qemu_img("create", "-q", "-f", "qcow2", "-o", options, "r.qcow2", size)
        qemu_io("r.qcow2", *writes)
        if case == "refused":  # a count of 2 does not fit in one bit
            qemu_img("snapshot", "-c", "s", "r.qcow2")
    shutil.copyfile(first / "r.qcow2", second / "r.qcow2")
    expected, actual = twins.both("amend", "-p", "-o", f"refcount_bits={bits}", "r.qcow2")
    assert (actual.returncode, actual.stderr) == (expected.returncode, expected.stderr)
    assert actual.stdout == expected.stdout
    twins.assert_same_info("r.qcow2")
    assert qemu_img("check", twins.qimg_dir / "r.qcow2", check=False).returncode == 0


# --- dd ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["if=a.qcow2", "of=o.raw"],
        ["if=a.qcow2", "of=o.qcow2", "-O", "qcow2"],
        ["-O", "qcow2", "bs=1M", "count=4", "skip=1", "if=top.qcow2", "of=o.qcow2"],
        ["bs=4k", "count=3", "if=a.qcow2", "of=o.raw"],
        ["bs=3000", "skip=2", "if=r.raw", "of=o.raw"],
        ["skip=100000", "if=r.raw", "of=o.raw"],
        ["bs=300", "if=pw.txt", "of=o.raw"],
        ["if=r.raw"],
        ["of=r.raw"],
        [],
        ["foo", "if=a", "of=b"],
        ["foo=1", "if=r.raw", "of=o"],
        ["bs=0", "if=r.raw", "of=o.raw"],
        ["bs=x", "if=r.raw", "of=o.raw"],
        ["bs=3G", "if=r.raw", "of=o.raw"],
        ["count=x", "if=r.raw", "of=o.raw"],
        ["skip=-1", "if=r.raw", "of=o.raw"],
        ["if=missing", "of=o.raw"],
        ["-O", "foo", "if=r.raw", "of=o.raw"],
        ["-f", "raw", "if=a.qcow2", "of=o.raw"],
        ["-O", "qcow2", "count=0", "if=r.raw", "of=o.qcow2"],
        ["if=r.raw", "of="],
        ["if=r.raw", "of=nodir/x"],
        ["-U", "if=cz.qcow2", "of=o.raw"],
        ["--image-opts", f"if={LUKS_OPEN.format('l.qcow2')}", "of=o.raw"],
        ["if=l.qcow2", "of=o"],
    ],
    ids=" ".join,
)
def test_dd(twins, args):
    twins.assert_same("dd", *LUKS, *args)
    twins.assert_same_image("o.raw", "raw", same_map=False)
    twins.assert_same_image("o.qcow2", "qcow2")


def test_convert_cache_modes(twins, monkeypatch):
    """Like qemu-img, convert writes its target with cache=unsafe (no fdatasync after the
    target is created) unless -t asks for another mode."""
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(
        os,
        "fdatasync",
        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fdatasync(fd)),
    )
    d = twins.qimg_dir
    counts = {}
    for cache in ("", "unsafe", "writeback", "none"):
        for fmt in ("raw", "qcow2"):
            synced.clear()
            target = d / f"{cache or 'default'}.{fmt}"
            result = run_qimg(
                d, "convert", *(["-t", cache] if cache else []), "-O", fmt, "a.qcow2", target
            )
            assert result.returncode == 0, result.stderr
            counts[cache, fmt] = synced.count(str(target))
            assert qemu_img("compare", d / "a.qcow2", target).returncode == 0
    assert counts["", "raw"] == counts["unsafe", "raw"] == 0, counts
    assert counts["", "qcow2"] == counts["unsafe", "qcow2"], counts  # creating it syncs
    for cache in ("writeback", "none"):
        assert counts[cache, "raw"] > 0 and counts[cache, "qcow2"] > counts["", "qcow2"], counts


def _run_with_reader_gone(argv: list, after_first_line: bool) -> tuple[int, bytes]:
    """Run a program whose stdout is a pipe that its reader closes, after reading one line
    or before reading anything (as `| head -1` and `| true` do): (exit code, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_LAUNCHER_ENV)
    assert proc.stdout is not None and proc.stderr is not None
    if after_first_line:
        proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


_ROOT = Path(__file__).resolve().parent.parent
_LAUNCHER_ENV = dict(os.environ, PYTHONPATH=str(_ROOT))


def _programs() -> dict[str, list[str]]:
    import sys

    return {"qimg": [sys.executable, str(_ROOT / "tools" / "qimg")], "qemu-img": ["qemu-img"]}


def test_the_qimg_command_runs_on_when_its_reader_goes_away(tmp_path: Path) -> None:
    """qemu-img ignores SIGPIPE and drops what it can no longer write: `map | head -1`
    ends with map's exit code and no message, and `convert -p` whose progress reader went
    away still writes the whole copy. The qimg program does the same."""
    source = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(source), "64M")
    # (16384 extents: map's output is many pipes long, written in several batches)
    qemu_io(source, *(f"write -P 0x5a {offset} 512" for offset in range(0, 64 << 20, 8 << 10)))
    for name, program in _programs().items():
        mapped = _run_with_reader_gone([*program, "map", "--output=json", str(source)], True)
        assert mapped == (0, b""), name
        copy = tmp_path / f"{name}.raw"
        converted = _run_with_reader_gone(
            [*program, "convert", "-p", "-O", "raw", str(source), str(copy)], False
        )
        assert converted == (0, b""), name
        qemu_img("compare", str(source), str(copy))


@pytest.mark.parametrize(
    "redirect",
    ["stdout closed", "stderr closed", "stdout a full disk"],
)
def test_the_qimg_command_drops_what_it_cannot_write(tmp_path: Path, redirect: str) -> None:
    """Output to a descriptor closed before the start, or to a full disk, is dropped as
    qemu-img's stdio drops it: the same exit code (info of an image, 0; of a missing one,
    1), no message, and nothing written where an image took the closed descriptor."""
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    before = image.read_bytes()
    target = str(image if redirect != "stderr closed" else tmp_path / "missing.qcow2")
    results = {}
    for name, program in _programs().items():
        with open("/dev/full", "w") as full:
            closed = {"stdout closed": 1, "stderr closed": 2}.get(redirect)
            proc = subprocess.run(
                [*program, "info", target],
                stdout=full if closed is None else None,
                stderr=subprocess.PIPE if closed != 2 else None,
                env=_LAUNCHER_ENV,
                # (the descriptor closed in the child, between fork and exec)
                preexec_fn=None if closed is None else (lambda fd=closed: os.close(fd)),
            )
        results[name] = (proc.returncode, proc.stderr)
    assert results["qimg"] == results["qemu-img"]
    assert results["qemu-img"][0] == (1 if redirect == "stderr closed" else 0)
    assert image.read_bytes() == before


_IMAGE_700K = "qemu-img create -f qcow2 a.qcow2 10M; qemu-io -c 'write -P 1 0 700k' a.qcow2"
_CHAIN = (
    "qemu-img create -f qcow2 -o cluster_size=4096 base.qcow2 10M;"
    "qemu-io -c 'write -P 1 0 300k' base.qcow2;"
    "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=4096 top.qcow2;"
    "qemu-io -c 'write -P 2 100k 500k' top.qcow2"
)


@pytest.mark.parametrize(
    "size, setup, args",
    [
        # the new refcount blocks do not fit; then they do
        ("1M", _IMAGE_700K, ["amend", "-o", "refcount_bits=64", "a.qcow2"]),
        ("1100k", _IMAGE_700K, ["amend", "-o", "refcount_bits=64", "a.qcow2"]),
        # the block job's failure; then a commit that fits
        ("1M", _CHAIN, ["commit", "top.qcow2"]),
        ("1200k", _CHAIN, ["commit", "top.qcow2"]),
    ],
)
def test_changes_on_a_full_disk(tmp_path: Path, size: str, setup: str, args: list[str]) -> None:
    """A refcount width change or a commit on a disk too small for it: qemu-img's message
    for the step that failed, its exit code, and images `qemu-img check` finds as
    qemu-img's run leaves them."""
    theirs, ours = both_on_small_disks(tmp_path, size, args, setup)
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert "No errors were found" in theirs.stdout


@pytest.mark.parametrize("operation", [["-d", "s1"], ["-c", "s2"], ["-a", "s1"]])
def test_snapshot_operations_without_room_change_nothing(
    tmp_path: Path, operation: list[str]
) -> None:
    """A snapshot operation writes its shadow state past the end of the file before it
    switches (qcow2lib/shadow.py). Where the file system has no room for it, the operation
    is refused before anything is written: the snapshot table as it was, and an image
    `qemu-img check` finds clean, where failing half way would have left a deleted
    snapshot's clusters leaked. With room, qimg does what qemu-img does."""
    setup = (
        "qemu-img create -f qcow2 -o cluster_size=4096 a.qcow2 10M;"
        "qemu-io -c 'write -P 1 0 600k' a.qcow2; qemu-img snapshot -c s1 a.qcow2;"
        "qemu-io -c 'write -P 2 0 600k' a.qcow2"
    )
    program = str(make_launcher(tmp_path, "qemu-img"))
    (tmp_path / "full").mkdir()
    argv = ["sh", "-c", f'{program} snapshot "$@" a.qcow2; qemu-img snapshot -l a.qcow2', "sh"]
    done = run_on_a_small_disk(tmp_path / "full", "1M", [*argv, *operation], setup)
    failure = {  # (each as qemu-img words its operation's failure)
        "-d": "Could not delete snapshot 's1': No space left on device",
        "-c": "Could not create snapshot 's2': -28 (No space left on device)",
        "-a": "Could not apply snapshot 's1': Failed to load snapshot: No space left on device",
    }[operation[0]]
    assert done.stderr == f"qemu-img: {failure}\n"
    listed = re.findall(r"^\d+ +(\S+) +\d+ B ", done.stdout, re.MULTILINE)
    assert listed == ["s1"]
    assert "No errors were found on the image." in done.stdout
    (tmp_path / "roomy").mkdir()
    theirs, ours = both_on_small_disks(
        tmp_path / "roomy", "2M", ["snapshot", *operation, "a.qcow2"], setup
    )
    assert ours.stdout == theirs.stdout
    assert "exit 0" in theirs.stdout and "No errors were found on the image." in theirs.stdout


def test_deleting_a_snapshot_on_a_full_disk(tmp_path: Path) -> None:
    """Users delete snapshots to make room. On a file system with no room left, a deletion
    whose commits leave the active tables as they are (the snapshot's clusters are its
    own: the disk has moved on since) writes no shadow state, and _require_room measures
    that before anything is written: qimg deletes the snapshot as qemu-img does, and the
    image is clean. One whose active tables change (the snapshot shares them) needs room
    for their copies, and is refused with nothing written."""
    setup = (
        "qemu-img create -f qcow2 -o cluster_size=4096 a.qcow2 10M;"
        "qemu-io -c 'write -P 1 0 600k' a.qcow2; qemu-img snapshot -c s1 a.qcow2;"
        "qemu-io -c 'write -P 2 0 600k' a.qcow2; cat /dev/zero > fill"
    )
    args = ["snapshot", "-d", "s1", "a.qcow2"]
    theirs, ours = both_on_small_disks(tmp_path, "2M", args, setup)
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert "exit 0" in ours.stdout and "No errors were found on the image." in ours.stdout
    shared = setup.replace("qemu-io -c 'write -P 2 0 600k' a.qcow2;", "")
    program = str(make_launcher(tmp_path, "qemu-img"))
    (tmp_path / "shared").mkdir()
    argv = ["sh", "-c", f"{program} snapshot -d s1 a.qcow2; qemu-img snapshot -l a.qcow2"]
    done = run_on_a_small_disk(tmp_path / "shared", "2M", argv, shared)
    assert done.stderr == "qemu-img: Could not delete snapshot 's1': No space left on device\n"
    assert re.findall(r"^\d+ +(\S+) +\d+ B ", done.stdout, re.MULTILINE) == ["s1"]
    assert "No errors were found on the image." in done.stdout


def test_applying_a_snapshot_on_a_nearly_full_disk(tmp_path: Path) -> None:
    """A revert after the disk moved on leaves the snapshot's L2 tables as they are: its
    commit copies only the L1 table and refcount blocks into the shadow state, which
    32 KiB of room holds where room_needed's bound (every active table) does not; the
    image reads the snapshot's data, as after qemu-img's revert."""
    writes = " ".join(f"-c 'write -P {{0}} {index * 3}M 32k'" for index in range(20))
    setup = (
        "qemu-img create -f qcow2 -o cluster_size=4096 a.qcow2 64M;"
        f"qemu-io {writes.format(1)} a.qcow2; qemu-img snapshot -c s1 a.qcow2;"
        f"qemu-io {writes.format(2)} a.qcow2;"
        "dd if=/dev/zero of=room bs=4k count=8; cat /dev/zero > fill; rm room"
    )
    check = 'qemu-io -c "read -q -P 1 57M 32k" a.qcow2 && echo "read back"'
    args = ["sh", "-c", f"qemu-img snapshot -a s1 a.qcow2 && {check}"]
    qimg_dir = tmp_path / "qimg-bin"
    qimg_dir.mkdir()
    make_launcher(qimg_dir, "qemu-img")
    runs = []
    for name, path in (("theirs", ""), ("ours", f"{qimg_dir}:")):
        (tmp_path / name).mkdir()
        program = ["env", f"PATH={path}{os.environ['PATH']}", *args]
        runs.append(run_on_a_small_disk(tmp_path / name, "4M", program, setup))
    theirs, ours = runs
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert "read back" in ours.stdout
    assert "exit 0" in ours.stdout and "No errors were found on the image." in ours.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "qcow2", "-o", "preallocation=falloc"],
        ["-O", "qcow2", "-o", "preallocation=full"],
        ["-O", "raw", "-o", "preallocation=full"],
        ["-O", "raw", "-o", "preallocation=falloc"],
    ],
    ids=" ".join,
)
def test_convert_keeps_the_target_preallocated(twins, args):
    """A target convert makes reads zeros where nothing is written (QEMU's has_zero_init),
    so qemu-img writes none into it: a preallocated target keeps every cluster and block
    it reserved, where zero writes that may unmap would have given the source's zero runs
    back (a.qcow2 has some: 1 MiB and 64 KiB ones). st_blocks also counts the file system's
    own blocks (an ext4 extent tree block, one more when the free space was fragmented,
    as CI once saw), so the two may differ by a few blocks, never by a run."""
    twins.assert_same("convert", *args, "a.qcow2", "out")
    fmt = args[1]
    twins.assert_same_image("out", fmt, same_map=fmt == "qcow2")
    ours, theirs = ((d / "out").stat().st_blocks for d in (twins.qimg_dir, twins.qemu_dir))
    assert abs(ours - theirs) * 512 < 64 << 10
