"""raw's offset and size options: an image that is a window of its file (a partition of a
whole-disk image, say), side by side with qemu-img, and through the API."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import InvalidArgumentError, UnsupportedFeatureError
from qemutools import QEMU_IMG, assert_same_in, qemu_img, run, run_both_in, run_qimg_in

MIB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """An 8 MiB raw disk: data at 1 MiB (300000 bytes) and at 5 MiB (70000), holes between."""
    path = tmp_path / "disk.img"
    rng = random.Random(7)
    with open(path, "wb") as out:
        out.truncate(8 * MIB)
        out.seek(MIB)
        out.write(rng.randbytes(300000))
        out.seek(5 * MIB)
        out.write(b"x" * 70000)
    return path


def _json_name(path: Path, **options) -> str:
    tree = {"driver": "raw", **options, "file": {"driver": "file", "filename": str(path)}}
    return "json:" + json.dumps(tree)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "options",
    [
        {"offset": MIB, "size": 4 * MIB},
        {"offset": "1M", "size": "4M"},  # (strings stay strings in QEMU's json: name)
        {"offset": 4 * MIB + 512},
        {"size": 2 * MIB},
        {"offset": 8 * MIB},  # (an empty window at the end)
    ],
    ids=repr,
)
@pytest.mark.parametrize(
    "command", [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"]]
)
def test_window_described_as_qemu_img_describes_it(
    tmp_path: Path, disk: Path, options: dict, command: list[str]
) -> None:
    """info and map of a window: its size, the json: name with the options as written,
    and the file offsets its data and holes lie at."""
    assert_same_in(tmp_path, *command, _json_name(disk, **options))


@pytest.mark.parametrize(
    "text",
    [
        "driver=raw,offset=1M,size=4M,file.filename=disk.img",
        "offset=1M,file.filename=disk.img",  # (probed as raw, then windowed)
    ],
)
def test_window_given_as_image_options(tmp_path: Path, disk: Path, text: str) -> None:
    for command in (["info"], ["map", "--output=json"]):
        assert_same_in(tmp_path, *command, "--image-opts", text)


@pytest.mark.parametrize(
    "options",
    [
        {"offset": 9 * MIB},  # past the end of the file
        {"offset": MIB, "size": 8 * MIB},  # reaching past it
        {"offset": MIB, "size": 1000},  # not whole sectors
        {"offset": -1},
        {"offset": "x"},
        {"size": "99999999999999999999999"},
    ],
    ids=repr,
)
def test_windows_refused_as_qemu_img_refuses_them(
    tmp_path: Path, disk: Path, options: dict
) -> None:
    assert assert_same_in(tmp_path, "info", _json_name(disk, **options)).returncode == 1


def test_offset_of_a_qcow2_image_refused(tmp_path: Path) -> None:
    """offset and size are raw's options: a qcow2 image, named or probed, refuses them."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    for driver in ({"driver": "qcow2"}, {}):
        tree = {**driver, "offset": 512, "file": {"driver": "file", "filename": "a.qcow2"}}
        result = assert_same_in(tmp_path, "info", "json:" + json.dumps(tree))
        assert "does not support the option 'offset'" in result.stderr


@pytest.mark.parametrize("output_format", ["raw", "qcow2"])
def test_window_converted(tmp_path: Path, disk: Path, output_format: str) -> None:
    """convert reads the window's bytes alone (the copy_file_range path included)."""
    name = _json_name(disk, offset=MIB, size=4 * MIB)
    run_both_in(tmp_path, "convert", "-O", output_format, name, "theirs.img")
    ours, theirs = run_both_in(tmp_path, "convert", "-O", output_format, name, "ours.img")
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    raw = tmp_path / "ours.raw"
    qemu_img("convert", "-O", "raw", tmp_path / "ours.img", raw)
    assert raw.read_bytes() == disk.read_bytes()[MIB : 5 * MIB]
    assert_same_in(tmp_path, "compare", name, "ours.img")


def _each_on_a_fresh_copy(tmp_path: Path, disk: Path, *args) -> list[tuple]:
    """(exit code, stdout, stderr, t.img's bytes after) of qimg's run of `args`, then of
    qemu-img's, each on a fresh copy of `disk` as t.img (qemu-img runs first: what else
    the command writes is qimg's)."""
    outcomes = []
    for runner in (
        lambda: run([QEMU_IMG, *args], check=False, cwd=tmp_path),
        lambda: run_qimg_in(tmp_path, *args),
    ):
        (tmp_path / "t.img").write_bytes(disk.read_bytes())
        done = runner()
        after = (tmp_path / "t.img").read_bytes()
        outcomes.append((done.returncode, done.stdout, done.stderr, after))
    return outcomes[::-1]


@pytest.mark.parametrize("copy_range", [[], ["-C"]], ids=["", "-C"])
def test_convert_into_a_window_leaves_the_rest_of_the_file(
    tmp_path: Path, disk: Path, copy_range: list[str]
) -> None:
    """convert -n from a window into a window (a partition) reads and writes there and
    nowhere else, with copy_file_range (-C) as with reads and writes."""
    source = random.Random(3).randbytes(3 * MIB)
    (tmp_path / "src.img").write_bytes(source)
    window = _json_name(Path("src.img"), offset=MIB, size=MIB)
    target = "driver=raw,offset=2M,size=1M,file.filename=t.img"
    args = ("convert", "-n", *copy_range, window, "--target-image-opts", target)
    ours, theirs = _each_on_a_fresh_copy(tmp_path, disk, *args)
    assert ours == theirs
    expected = bytearray(disk.read_bytes())
    expected[2 * MIB : 3 * MIB] = source[MIB : 2 * MIB]
    assert ours[:3] == (0, "", "") and ours[3] == expected


@pytest.mark.parametrize(
    "args",
    [
        ["--image-opts", "driver=raw,offset=2M,size=1M,file.filename=t.img", "3M"],  # fixed
        ["--image-opts", "driver=raw,offset=2M,file.filename=t.img", "+1M"],
        [
            "--preallocation=falloc",
            "--image-opts",
            "driver=raw,offset=2M,file.filename=t.img",
            "+1M",
        ],
        ["--shrink", "--image-opts", "driver=raw,offset=2M,file.filename=t.img", "1M"],
    ],
)
def test_window_resized_as_qemu_img_resizes_it(tmp_path: Path, disk: Path, args: list[str]) -> None:
    """A window with a size is fixed; without one it ends with the file, which grows or
    shrinks to its new end."""
    ours, theirs = _each_on_a_fresh_copy(tmp_path, disk, "resize", *args)
    assert ours == theirs


def test_window_through_the_api(tmp_path: Path, disk: Path) -> None:
    """qcow2lib.open(raw_window=...): reads, writes, zeroing, discards and extents in the
    window's offsets, nothing outside it touched, nothing past its end allowed."""
    before = disk.read_bytes()
    with qcow2lib.open(str(disk), "r+", fmt="raw", raw_window=(MIB, 4 * MIB)) as window:
        assert window.size == 4 * MIB
        assert window.read(0, 300000) == before[MIB : MIB + 300000]
        window.write(4 * MIB - 3, b"end")
        window.write_zeroes(0, 4096, may_unmap=True)
        window.discard(MIB, MIB)
        with pytest.raises(InvalidArgumentError):
            window.write(4 * MIB - 2, b"end")
        extents = window.extents()
        with pytest.raises(UnsupportedFeatureError, match="fixed-size"):
            window.resize(2 * MIB)
    assert extents[0].offset == 0 and extents[-1].offset + extents[-1].length == 4 * MIB
    assert all(extent.host_offset == extent.offset + MIB for extent in extents)
    after = disk.read_bytes()
    expected = bytearray(before)
    expected[MIB : MIB + 4096] = bytes(4096)
    expected[5 * MIB - 3 : 5 * MIB] = b"end"
    assert after[: 2 * MIB] == expected[: 2 * MIB] and after[3 * MIB :] == expected[3 * MIB :]
    with pytest.raises(InvalidArgumentError, match=r"Offset \(9437184\) cannot be greater"):
        qcow2lib.open(str(disk), fmt="raw", raw_window=(9 * MIB, None))
    with pytest.raises(InvalidArgumentError, match="does not support the option 'offset'"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
        qcow2lib.open(str(tmp_path / "a.qcow2"), raw_window=(0, None))


def test_backing_node_window(tmp_path: Path, disk: Path) -> None:
    """A raw backing node given with offset and size options (backing.offset=...)."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", tmp_path / "o.qcow2", "4M")
    base = "driver=qcow2,file.filename=o.qcow2,backing.driver=raw,backing.file.filename=disk.img"
    for extra in ("backing.offset=1M", "backing.offset=1M,backing.size=4M", "backing.offset=x"):
        for command in (["map", "--output=json"], ["info", "--backing-chain"]):
            assert_same_in(tmp_path, *command, "--image-opts", f"{base},{extra}")
    ours, theirs = _each_on_a_fresh_copy(
        tmp_path, disk, "convert", "-O", "raw", "--image-opts", f"{base},backing.offset=1M", "c.img"
    )
    assert ours[:3] == theirs[:3] == (0, "", "")
    assert (tmp_path / "c.img").read_bytes() == disk.read_bytes()[MIB : 5 * MIB]


def test_window_served_over_nbd(tmp_path: Path, disk: Path) -> None:
    """A read-only window names host file pieces at its own offsets, which the NBD export
    sends as they are (sendfile); a client reads the window's bytes and nothing around
    them, and sees the size of the window."""
    import threading

    from qcow2lib.exports.nbd import NBDServer

    with qcow2lib.open(str(disk), fmt="raw", raw_window=(MIB + 512, 2 * MIB)) as window:
        assert window.host_pieces(0, 4096) == [(window.file.fd, MIB + 512, 4096)]
        server = NBDServer(window, unix_path=tmp_path / "nbd.sock", persistent=True)
        server.start()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"nbd+unix:///?socket={tmp_path / 'nbd.sock'}"
            qemu_img("convert", "-f", "raw", "-O", "raw", url, tmp_path / "copy.raw")
        finally:
            server.shutdown()
            thread.join(10)
    assert (tmp_path / "copy.raw").read_bytes() == disk.read_bytes()[MIB + 512 : 3 * MIB + 512]
