"""data-file and backing given as nodes by options (json: names and --image-opts), as
qemu-img 7.2 takes them: every case runs the real qemu-img and qimg in one directory and
compares exit status, output and messages; the engine's side (open_image's data_file and
backing_node) is checked against real QEMU's content."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.containers import NodeReference
from qemutools import QEMU_IMG, QEMU_IO, qemu_img, qemu_io
from qemutools import make_launcher

RAW = "driver=raw,file.filename="
MIB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """t.qcow2 keeps its data (0x11 in the first 64 KiB) in t.data (t2.data: a copy);
    plain.qcow2 has no data file; ov.qcow2 is an empty overlay of base.qcow2 (0x22 in
    all 1 MiB); nob.qcow2 has no backing file; base2.qcow2 holds 0x33 in its first 64
    KiB, rawbase 0x44 everywhere; *.raw are the raw content of the images."""
    directory = tmp_path_factory.mktemp("node-options")
    here = directory.joinpath

    def create(*args: str) -> None:
        subprocess.run([QEMU_IMG, "create", "-q", *args], cwd=directory, check=True)

    create("-f", "qcow2", "-o", f"data_file={here('t.data')}", "t.qcow2", "1M")
    qemu_io(here("t.qcow2"), "write -P 0x11 0 64k", fmt="qcow2")
    shutil.copy(here("t.data"), here("t2.data"))
    create("-f", "qcow2", "plain.qcow2", "1M")
    create("-f", "qcow2", "base.qcow2", "1M")
    qemu_io(here("base.qcow2"), "write -P 0x22 0 1M", fmt="qcow2")
    create("-f", "qcow2", "base2.qcow2", "1M")
    qemu_io(here("base2.qcow2"), "write -P 0x33 0 64k", fmt="qcow2")
    here("rawbase").write_bytes(b"\x44" * MIB)
    create("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    create("-f", "qcow2", "nob.qcow2", "1M")
    for name in ("base", "base2"):
        qemu_img("convert", "-O", "raw", str(here(f"{name}.qcow2")), str(here(f"{name}.raw")))
    here("zero.raw").write_bytes(bytes(MIB))
    here("bin").mkdir()
    make_launcher(here("bin"), "qemu-img")
    return directory


def both(directory: Path, *args: str) -> tuple[tuple, tuple]:
    """(status, stdout, stderr) of the real qemu-img, then of qimg, in `directory`."""
    results = []
    for program in (QEMU_IMG, str(directory / "bin" / "qemu-img")):
        done = subprocess.run(
            [program, *args], cwd=directory, capture_output=True, text=True, timeout=60
        )
        results.append((done.returncode, done.stdout, done.stderr))
    return results[0], results[1]


def assert_like_qemu(directory: Path, *args: str) -> tuple:
    qemu, qimg = both(directory, *args)
    assert qimg == qemu
    return qemu


DATA_FILE_OPTIONS = [
    "data-file.filename=t2.data",
    "data-file.driver=file,data-file.filename=t2.data",
    "data-file.driver=file,data-file.filename=t2.data,data-file.locking=off",
    "data-file.driver=blkdebug,data-file.image.filename=t2.data",
    "data-file.driver=blkdebug,data-file.image.driver=file,data-file.image.filename=t2.data",
    "data-file.driver=raw,data-file.file.filename=t2.data",
    "data-file.driver=host_device,data-file.filename=/dev/null",
    # refused, in QEMU's words
    "data-file=t2.data",
    "data-file=",
    "data-file.driver=bogus",
    "data-file.filename=nonexist",
    "data-file.driver=file",
    "data-file.foo=bar,data-file.filename=t2.data",
    "data-file.filename=t2.data,data-file.locking=bad",
    "data-file.driver=host_device,data-file.filename=t2.data",
    "data-file.driver=raw",
    "data-file.driver=blkdebug",
    "data-file.driver=blkdebug,data-file.image.filename=nonexist",
    "data-file.driver=blkdebug,data-file.image.filename=t2.data,data-file.bogus=1",
    "data-file.driver=blkdebug,data-file.image=foo",
    "data-file.driver=blkdebug,data-file.config=/nonexist,data-file.image.filename=t2.data",
]


@pytest.mark.parametrize("options", DATA_FILE_OPTIONS)
def test_data_file_node(images, options):
    image = f"driver=qcow2,file.filename=t.qcow2,{options}"
    assert_like_qemu(images, "compare", "--image-opts", image, "driver=qcow2,file.filename=t.qcow2")


@pytest.mark.parametrize(
    "options",
    [
        "data-file.filename=t2.data",
        "data-file.driver=blkdebug,data-file.image.filename=t2.data",
        "data-file=foo",
        "data-file.filename=nonexist",
    ],
)
def test_data_file_for_an_image_without_one(images, options):
    """Refused once opened for I/O (after the node itself opens); info never opens it."""
    image = f"driver=qcow2,file.filename=plain.qcow2,{options}"
    plain = "driver=qcow2,file.filename=plain.qcow2"
    assert assert_like_qemu(images, "compare", "--image-opts", image, plain)[0] == 2
    assert_like_qemu(images, "info", "--image-opts", f"file.filename=plain.qcow2,{options}")
    assert_like_qemu(images, "info", "--image-opts", f"driver=raw,file.filename=t.qcow2,{options}")


@pytest.mark.parametrize(
    "data_file",
    [
        "{'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': 't2.data'}}",
        "{'driver': 'blkdebug', 'config': '/dev/null', 'image': {'filename': 't2.data'}}",
        "{'driver': 'blkdebug', 'inject-error': [{'event': 'l1_update'}], "
        "'image': {'driver': 'file', 'filename': 't2.data'}}",
        "{'driver': 'blkdebug', 'image': {'driver': 'blkdebug', 'image': {'filename': 't2.data'}}}",
        "{'driver': 'raw', 'file': {'filename': 't2.data'}}",
        "{'driver': 'blkdebug', 'image': {'filename': 'nonexist'}}",
        "'foo'",
    ],
)
def test_data_file_node_in_map_and_check(images, data_file):
    """map names the node the data lies in as QEMU names it; check opens the node first."""
    name = (
        f"json:{{'driver': 'qcow2', 'file': {{'filename': 't.qcow2'}}, 'data-file': {data_file}}}"
    )
    assert_like_qemu(images, "map", name)
    assert_like_qemu(images, "map", "--output=json", name)
    assert_like_qemu(images, "check", name)


def blkdebug_json(image: str, data: str) -> str:
    """iotest 244's spelling: the data file as a nested blkdebug node."""
    return (
        "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '%s'}, "
        "'data-file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': '%s'}}}"
        % (image, data)
    )


def test_copy_offloading_into_a_blkdebug_data_file(tmp_path):
    """244's convert -n -C into an image whose data file is a blkdebug node, then compare."""
    for directory in (tmp_path / "qemu", tmp_path / "qimg"):
        directory.mkdir()
        make_launcher(directory, "qemu-img")
        subprocess.run(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", "src.qcow2", "4M"], cwd=directory, check=True
        )
        qemu_io(directory / "src.qcow2", "write -P 0x5a 64k 1M", fmt="qcow2")
        subprocess.run(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "4M"],
            cwd=directory,
            check=True,
        )  # (opened only from `directory`, where the relative name resolves)
    target = blkdebug_json("t.qcow2", "t.data")
    results = []
    for name, program in (("qemu", QEMU_IMG), ("qimg", str(tmp_path / "qimg" / "qemu-img"))):
        cwd = tmp_path / name
        for args in (
            ["convert", "-f", "qcow2", "-O", "qcow2", "-n", "-C", "src.qcow2", target],
            ["compare", "-f", "qcow2", "-F", "qcow2", "src.qcow2", target],
        ):
            done = subprocess.run([program, *args], cwd=cwd, capture_output=True, text=True)
            results.append((name, done.returncode, done.stdout, done.stderr))
    assert [r[1:] for r in results[2:]] == [r[1:] for r in results[:2]]
    assert results[1][2] == "Images are identical.\n"
    # what qimg wrote reads back with the real QEMU
    check = subprocess.run(
        [QEMU_IMG, "compare", "src.qcow2", "t.qcow2"], cwd=tmp_path / "qimg", capture_output=True
    )
    assert check.returncode == 0


def test_flush_reaches_a_blkdebug_data_file(tmp_path):
    """244's flush test through the engine: a blkdebug data file failing every flush
    fails the image's flush (as qemu-io does with the same options)."""
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "1M"],
        cwd=tmp_path,
        check=True,
    )
    node = {
        "driver": "blkdebug",
        "inject-error.0.event": "none",
        "inject-error.0.iotype": "flush",
        "image.driver": "file",
        "image.filename": str(tmp_path / "t.data"),
    }
    json_node = (
        "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '%s'}, "
        "'data-file': {'driver': 'blkdebug', 'inject-error': [{'event': 'none', "
        "'iotype': 'flush'}], 'image': {'driver': 'file', 'filename': '%s'}}}"
        % (tmp_path / "t.qcow2", tmp_path / "t.data")
    )
    qemu = subprocess.run(
        [QEMU_IO, "-t", "writeback", "-c", "write 0 512", "-c", "flush", json_node],
        capture_output=True,
        text=True,
    )
    assert qemu.returncode == 1
    image = qcow2lib.open(str(tmp_path / "t.qcow2"), "r+", data_file=node)
    try:
        image.write(0, b"\x01" * 512)
        with pytest.raises(qcow2lib.Qcow2Error) as failure:
            image.flush()
        assert isinstance(failure.value, OSError)
    finally:
        try:
            image.close()
        except qcow2lib.Qcow2Error:
            pass  # (closing flushes again, and the rule still fails it)
    # without the rule the same node writes through
    del node["inject-error.0.event"], node["inject-error.0.iotype"]
    with qcow2lib.open(str(tmp_path / "t.qcow2"), "r+", data_file=node) as image:
        image.write(0, b"\x02" * 512)
    assert (tmp_path / "t.data").read_bytes()[:512] == b"\x02" * 512


BACKING_CASES = [
    ("file.filename=ov.qcow2", "base.raw"),
    ("file.filename=ov.qcow2,backing.file.filename=base2.qcow2", "base2.raw"),
    ("file.filename=nob.qcow2,backing.file.filename=base2.qcow2", "base2.raw"),
    ("file.filename=ov.qcow2,backing=", "zero.raw"),  # deprecated spelling: warned of
    ("file.filename=ov.qcow2,backing.driver=raw", "base.raw"),
    ("file.filename=ov.qcow2,backing.driver=qcow2", "base.raw"),
    ("file.filename=ov.qcow2,backing.driver=file", "base.raw"),
    ("file.filename=ov.qcow2,backing.driver=raw,backing.file.filename=rawbase", "rawbase"),
    ("file.filename=nob.qcow2,backing.file.filename=rawbase", "rawbase"),  # probed raw
    ("file.filename=nob.qcow2,backing.driver=file,backing.filename=rawbase", "rawbase"),
    ("file.filename=nob.qcow2,backing.file.filename=rawbase,backing.file.locking=off", "rawbase"),
    ("file.filename=ov.qcow2,backing.file.filename=ov.qcow2", "base.raw"),  # opened again
    (
        "file.filename=ov.qcow2,backing.file.filename=base2.qcow2,"
        "backing.backing.file.filename=base.qcow2",
        "base2.raw",
    ),
    ("driver=raw,file.filename=rawbase,backing=", "rawbase"),
    # refused, in QEMU's words
    ("file.filename=ov.qcow2,backing=null", "zero.raw"),  # a node named "null"
    ("file.filename=ov.qcow2,backing.file.filename=rawbase", "rawbase"),  # header's qcow2
    ("file.filename=ov.qcow2,backing.file.filename=nonexist", "rawbase"),
    ("file.filename=ov.qcow2,backing.bogus=1", "rawbase"),
    ("file.filename=ov.qcow2,backing.driver=bogus", "rawbase"),
    ("file.filename=ov.qcow2,backing.file.driver=bogus", "rawbase"),
    ("file.filename=ov.qcow2,backing.file.driver=host_device", "rawbase"),
    ("file.filename=ov.qcow2,backing.file.filename=base2.qcow2,backing.file.bogus=1", "rawbase"),
    ("file.filename=ov.qcow2,backing.file.locking=bad", "rawbase"),
    ("file.filename=ov.qcow2,backing.file=foo", "rawbase"),
    ("file.filename=nob.qcow2,backing.file=foo", "rawbase"),
    ("file.filename=nob.qcow2,backing.driver=qcow2", "rawbase"),
    ("file.filename=nob.qcow2,backing.file.driver=file", "rawbase"),
    ("file.filename=nob.qcow2,backing.driver=file", "rawbase"),
    ("file.filename=ov.qcow2,backing=foo", "rawbase"),
    ("driver=raw,file.filename=rawbase,backing=foo", "rawbase"),
    ("driver=raw,file.filename=rawbase,backing.file.filename=base.qcow2", "rawbase"),
    ("driver=qcow2,file.filename=ov.qcow2,backing=,backing.file.filename=x", "rawbase"),
    (
        "driver=qcow2,file.filename=ov.qcow2,backing.backing=,backing.backing.file.filename=x",
        "rawbase",
    ),
]


@pytest.mark.parametrize("options, content", BACKING_CASES)
def test_backing_node(images, options, content):
    assert_like_qemu(images, "compare", "--image-opts", options, RAW + content)


@pytest.mark.parametrize(
    "name",
    [
        "json:{'file': {'filename': 'ov.qcow2'}, 'backing': null}",
        "json:{'driver': 'raw', 'file': {'filename': 'rawbase'}, 'backing': null}",
        "json:{'file': {'filename': 'ov.qcow2'}, 'backing': {'file': {'filename': 'base2.qcow2'}}}",
    ],
)
def test_backing_in_json_names(images, name):
    """JSON null (no backing node, no warning) and a nested backing object."""
    for command in (["compare", name, "zero.raw"], ["map", "--output=json", name]):
        assert_like_qemu(images, *command)


@pytest.mark.parametrize(
    "options",
    [
        "file.filename=ov.qcow2,l2-cache-size=1M",  # the probed format's options
        "file.filename=ov.qcow2,bogus=1",
        "file.filename=rawbase,bogus=1",
        "file.filename=nonexist,bogus=1",
        "file.filename=ov.qcow2,backing=",
        "file.filename=ov.qcow2,backing=foo",
        "file.filename=ov.qcow2,backing.driver=qcow2",
        "file.filename=ov.qcow2,backing.file.filename=base2.qcow2",
    ],
)
def test_info_with_node_options(images, options):
    """info opens no backing node (only "none" is taken, other backing options are left
    unused) and checks what is left against the probed format."""
    assert_like_qemu(images, "info", "--image-opts", options)
    assert_like_qemu(images, "info", "--backing-chain", "--image-opts", options)


def test_map_and_convert_through_a_runtime_backing(images, tmp_path):
    options = "file.filename=ov.qcow2,backing.file.filename=base2.qcow2"
    for output in ("human", "json"):
        assert_like_qemu(images, "map", f"--output={output}", "--image-opts", options)
    qimg = subprocess.run(
        [
            str(images / "bin" / "qemu-img"),
            "convert",
            "-O",
            "raw",
            "--image-opts",
            options,
            str(tmp_path / "out.raw"),
        ],
        cwd=images,
        capture_output=True,
        text=True,
    )
    assert qimg.returncode == 0, qimg.stderr
    assert (tmp_path / "out.raw").read_bytes() == (images / "base2.raw").read_bytes()


def test_runtime_backing_leaves_the_header(images, tmp_path):
    """The engine opens the node the options give; the header still names its own."""
    before = (images / "ov.qcow2").read_bytes()
    with qcow2lib.open(
        str(images / "ov.qcow2"), backing_node={"file.filename": str(images / "base2.qcow2")}
    ) as device:
        assert device.read(0, 65536) == b"\x33" * 65536
        assert device.read(65536, 4096) == bytes(4096)
        assert device.backing_filename == "base.qcow2"
    with qcow2lib.open(str(images / "ov.qcow2"), backing_node=NodeReference("")) as device:
        assert device.read(0, MIB) == bytes(MIB)
    assert (images / "ov.qcow2").read_bytes() == before
    # no backing node: unallocated clusters are zeros (zeroing part of one is free),
    # unlike an image opened without its backing file (their content unknown)
    shutil.copy(images / "ov.qcow2", tmp_path / "ov.qcow2")
    with qcow2lib.open(str(tmp_path / "ov.qcow2"), "r+", backing_node=NodeReference("")) as device:
        assert device.can_zero_fast(512, 1024)
    with qcow2lib.open(str(tmp_path / "ov.qcow2"), "r+", backing=False) as device:
        assert not device.can_zero_fast(512, 1024)


def test_untrusted_image_names_resolve_as_before(tmp_path):
    """A hostile header's name stays confined when options only change its driver; a file
    the caller names itself is opened as asked."""
    outside = tmp_path / "secret"
    outside.write_bytes(b"\x99" * 65536)
    inner = tmp_path / "inner"
    inner.mkdir()
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        str(outside),
        "-F",
        "raw",
        str(inner / "hostile.qcow2"),
        "64k",
    )
    for node in ({"driver": "raw"}, {"driver": "file"}, {"file.locking": "off"}):
        with pytest.raises(qcow2lib.UntrustedImageError):
            qcow2lib.open(str(inner / "hostile.qcow2"), untrusted=True, backing_node=node)
    given = {"driver": "raw", "file.filename": str(outside)}
    with qcow2lib.open(str(inner / "hostile.qcow2"), untrusted=True, backing_node=given) as device:
        assert device.read(0, 16) == b"\x99" * 16


def test_data_file_raw_hides_a_runtime_backing(tmp_path):
    """244's last case: a data_file_raw image reads as its raw data file whatever backing
    node options give it."""
    for directory in (tmp_path / "qemu", tmp_path / "qimg"):
        directory.mkdir()
        make_launcher(directory, "qemu-img")
    results = []
    for name, program in (("qemu", QEMU_IMG), ("qimg", str(tmp_path / "qimg" / "qemu-img"))):
        cwd = tmp_path / name
        steps = [
            ["create", "-f", "qcow2", "-o", "data_file=t.data,data_file_raw=on", "t.qcow2", "1M"],
            ["create", "-f", "qcow2", "t.base", "1M"],
        ]
        for args in steps:
            done = subprocess.run([program, *args], cwd=cwd, capture_output=True, text=True)
            results.append((done.returncode, done.stdout, done.stderr))
        qemu_io(cwd / "t.base", "write -P 42 0 1M", fmt="qcow2")
        done = subprocess.run(
            [
                program,
                "compare",
                "--image-opts",
                "driver=raw,file.filename=t.data",
                "file.filename=t.qcow2,backing.file.filename=t.base",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        results.append((done.returncode, done.stdout, done.stderr))
    assert results[3:] == results[:3]
    assert results[2] == (0, "Images are identical.\n", "")
