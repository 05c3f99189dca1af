"""Children given as nodes by options beyond the common cases of test_node_options.py, as
qemu-img 7.2 takes them: commit, rebase and amend through a backing node the options give,
check of an image whose file is a filter node, data files and backing nodes of other
drivers. Every case runs the real qemu-img and qimg on the same inputs and compares exit
status, output and messages (and, where the command writes, the images it leaves)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qemutools import (
    QEMU_IMG,
    assert_same_in,
    assert_same_result,
    qemu_io,
    run,
    run_qimg_in,
    wait_for_listener,
)

MIB = 1 << 20


def create(directory: Path, *args: str) -> None:
    subprocess.run([QEMU_IMG, "create", "-q", *args], cwd=directory, check=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """base.qcow2 (0x22 in all 1 MiB) under ov.qcow2 (0x55 in its first 4 KiB);
    base2.qcow2 (0x33 in its first 64 KiB); top.qcow2 -> mid.qcow2 -> base2.qcow2 (0x66
    at 64 KiB in top, 0x77 at 128 KiB in mid); rawbase (0x44 everywhere); nob.qcow2 has
    no backing file (0x55 in its first 4 KiB); zov.qcow2 (2 MiB over base.qcow2) and
    znob.qcow2 (no backing file) hold zero clusters; small.qcow2 is a 512 KiB overlay of
    base.qcow2; t.qcow2 keeps its data (0x11 in the first 64 KiB) in t.data (t2.data: a
    copy; dq.qcow2: a qcow2 image of the same content)."""
    tmp_path = tmp_path_factory.mktemp("node-children")
    create(tmp_path, "-f", "qcow2", "base.qcow2", "1M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x22 0 1M", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "base2.qcow2", "1M")
    qemu_io(tmp_path / "base2.qcow2", "write -P 0x33 0 64k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    qemu_io(tmp_path / "ov.qcow2", "write -P 0x55 0 4k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "nob.qcow2", "1M")
    qemu_io(tmp_path / "nob.qcow2", "write -P 0x55 0 4k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2", "mid.qcow2")
    create(tmp_path, "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x66 64k 64k", fmt="qcow2")
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x77 128k 64k", fmt="qcow2")
    (tmp_path / "rawbase").write_bytes(b"\x44" * MIB)
    create(tmp_path, "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "zov.qcow2", "2M")
    qemu_io(tmp_path / "zov.qcow2", "write -z 0 256k", "write -P 0x12 256k 64k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "znob.qcow2", "1M")
    qemu_io(tmp_path / "znob.qcow2", "write -z 0 256k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "small.qcow2", "512k")
    qemu_io(tmp_path / "small.qcow2", "write -P 0x13 0 64k", fmt="qcow2")
    create(tmp_path, "-f", "qcow2", "-o", f"data_file={tmp_path / 't.data'}", "t.qcow2", "1M")
    qemu_io(tmp_path / "t.qcow2", "write -P 0x11 0 64k", fmt="qcow2")
    shutil.copy(tmp_path / "t.data", tmp_path / "t2.data")
    create(tmp_path, "-f", "qcow2", "dq.qcow2", "1M")
    qemu_io(tmp_path / "dq.qcow2", "write -P 0x11 0 64k", fmt="qcow2")
    (tmp_path / "sub").mkdir()  # sub/ov.qcow2 over sub/base.qcow2, copies of the above
    for name in ("ov.qcow2", "base.qcow2", "base2.qcow2"):
        shutil.copy(tmp_path / name, tmp_path / "sub" / name)
    return tmp_path


@pytest.fixture
def scratch(images: Path, tmp_path: Path) -> Path:
    """A copy of the images for a test that changes them."""
    shutil.copytree(images, tmp_path / "images")
    return tmp_path / "images"


def image_state(directory: Path, names: list[Path]) -> list:
    """What a command may have changed in the files `names` (relative to `directory`):
    each one's allocation map (qcow2 images without their backing files; host offsets
    left out), backing name and content; None for a file that is not there."""
    state: list = []
    for name in names:
        path = directory / name
        if not path.is_file():
            state.append((name, None))
            continue
        data = path.read_bytes()
        if data[:4] == b"QFI\xfb":
            unbacked = (
                "json:{'driver': 'qcow2', 'file': {'filename': '%s'}, 'backing': null}" % path
            )
            done = subprocess.run(
                [QEMU_IMG, "map", "-U", "--output=json", unbacked], capture_output=True, text=True
            )
            info = subprocess.run(
                [QEMU_IMG, "info", "-U", str(path)], capture_output=True, text=True
            ).stdout
            raw_copy = directory.parent / f"{directory.name}.raw"
            subprocess.run(
                [QEMU_IMG, "convert", "-U", "-O", "raw", unbacked, str(raw_copy)], check=True
            )
            raw = raw_copy.read_bytes()
            raw_copy.unlink()
            backing = [
                line.replace(str(directory), "DIR")
                for line in info.splitlines()
                if line.startswith("backing")
            ]
            extents: list[dict] = []  # (where clusters land is the order of QEMU's writes)
            for extent in json.loads(done.stdout or "[]"):
                extent.pop("offset", None)
                last = extents[-1] if extents else {}
                if {**last, "start": 0, "length": 0} == {**extent, "start": 0, "length": 0}:
                    last["length"] += extent["length"]
                else:
                    extents.append(extent)
            state.append((path.relative_to(directory), extents, done.stderr, backing, raw))
        else:
            state.append((path.relative_to(directory), data))
    return state


def assert_same_effect(images: Path, tmp_path: Path, *args: str) -> None:
    """qimg and qemu-img, each run on its own copy of `images`, print the same and leave
    the same images behind."""
    copies = {}
    tmp_path.mkdir(exist_ok=True)
    for name in ("qemu", "qimg"):
        copies[name] = tmp_path / f"run-{name}"
        shutil.copytree(images, copies[name])
    ours = run_qimg_in(copies["qimg"], *args)
    theirs = run([QEMU_IMG, *args], check=False, cwd=copies["qemu"])
    assert_same_result(ours, theirs, args)
    # files with the same bytes in both copies are the same images: QEMU looks at the rest
    names = sorted({path.relative_to(copy) for copy in copies.values() for path in copy.rglob("*")})
    differing = [
        name
        for name in names
        if not (copies["qimg"] / name).is_dir()
        and not _same_file(copies["qimg"] / name, copies["qemu"] / name)
    ]
    assert image_state(copies["qimg"], differing) == image_state(copies["qemu"], differing), args


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


# -- 2. check of an image above a filter node ------------------------------------------

THROTTLE_GROUP = "throttle-group,id=tg0,x-bps-total=100000000"


@pytest.mark.parametrize(
    "image",
    [
        "driver=qcow2,file.driver=blkdebug,file.image.filename=base.qcow2",
        "file.driver=blkdebug,file.image.filename=ov.qcow2",
        "driver=qcow2,file.driver=throttle,file.throttle-group=tg0,file.file.filename=base.qcow2",
        "file.driver=throttle,file.throttle-group=tg0,file.file.filename=ov.qcow2",
        # no check for a raw image, refused opens
        "driver=raw,file.driver=blkdebug,file.image.filename=base.qcow2",
        "file.driver=blkdebug,file.image.filename=rawbase",
        "driver=qcow2,file.driver=blkdebug,file.image.filename=nonexist",
        "driver=qcow2,file.driver=throttle,file.throttle-group=nogroup,file.file.filename=base.qcow2",
    ],
)
@pytest.mark.parametrize("extra", [[], ["--output=json"], ["-r", "all"], ["-r", "leaks", "-q"]])
def test_check_through_a_filter_node(images, image, extra):
    assert_same_in(images, "check", "--object", THROTTLE_GROUP, *extra, "--image-opts", image)


def leak_a_cluster(path: Path) -> None:
    """Count one cluster past the image's end as used: a leak that check reports."""
    with open(path, "r+b") as file:
        header = file.read(72)
        table = int.from_bytes(header[48:56], "big")
        file.seek(table)
        refblock = int.from_bytes(file.read(8), "big")
        end = file.seek(0, 2)
        cluster = -(-end // 65536)
        file.truncate((cluster + 1) * 65536)
        file.seek(refblock + 2 * cluster)
        file.write((1).to_bytes(2, "big"))


def test_check_through_a_filter_node_finds_what_is_wrong(scratch, tmp_path):
    """A leaked cluster is reported, then repaired through the filter, as qemu-img does."""
    images = scratch
    leak_a_cluster(images / "base2.qcow2")
    image = "driver=qcow2,file.driver=blkdebug,file.image.filename=base2.qcow2"
    for extra in ([], ["--output=json"]):
        assert assert_same_in(images, "check", *extra, "--image-opts", image).returncode == 3
    name = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image': {'filename': '%s'}}}"
    assert_same_effect(images, tmp_path, "check", "-r", "all", name % "base2.qcow2")


@pytest.mark.parametrize(
    "image",
    [
        "driver=qcow2,file.driver=blkdebug,file.image.filename=base.qcow2",
        "file.driver=blkdebug,file.image.filename=ov.qcow2",
        "file.driver=blkdebug,file.image.filename=rawbase",
        "file.driver=blkdebug,file.config=/dev/null,file.image.filename=base.qcow2",
        "file.driver=throttle,file.throttle-group=tg0,file.file.filename=ov.qcow2",
    ],
)
@pytest.mark.parametrize("command", [["info"], ["map"], ["map", "--output=json"]])
def test_info_and_map_name_a_filter_node_as_qemu(images, image, command):
    """QEMU names an image above blkdebug by the node's blkdebug:CONFIG:FILE name (map
    shows it for qcow2 data; raw data passes through to the host file)."""
    assert_same_in(images, *command, "--object", THROTTLE_GROUP, "--image-opts", image)


@pytest.mark.parametrize(
    "options",
    ["compat=0.10", "lazy_refcounts=on", "size=2M"],
)
def test_amend_through_a_filter_node(images, tmp_path, options):
    image = "driver=qcow2,file.driver=blkdebug,file.image.filename=zov.qcow2"
    assert_same_effect(images, tmp_path, "amend", "-o", options, "--image-opts", image)


# -- 1. commit, rebase and amend through the backing node options give ------------------

COMMIT_CASES = [
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing.file.filename=base2.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing.driver=raw"],  # qcow2 bytes
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing.driver=qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=nob.qcow2,backing.file.filename=rawbase"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.file.filename=ov.qcow2"],
    ["-d", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.file.filename=ov.qcow2"],
    [
        "--image-opts",
        "driver=qcow2,file.filename=top.qcow2,backing.file.filename=mid.qcow2,"
        "backing.backing.file.filename=base.qcow2",
    ],
    # -b: a node named by the options is found by its name as given
    ["-b", "base.qcow2", "--image-opts", "file.filename=top.qcow2,backing.file.filename=ov.qcow2"],
    [
        "-b",
        "base2.qcow2",
        "--image-opts",
        "file.filename=top.qcow2,backing.file.filename=base2.qcow2",
    ],
    ["-b", "mid.qcow2", "--image-opts", "file.filename=top.qcow2,backing.driver=qcow2"],
    [
        "-b",
        "base2.qcow2",
        "--image-opts",
        "file.filename=top.qcow2,backing.file.filename=mid.qcow2",
    ],
    [
        "-b",
        "base.qcow2",
        "--image-opts",
        "file.filename=top.qcow2,backing.file.filename=mid.qcow2,"
        "backing.backing.file.filename=base.qcow2",
    ],
    ["-b", "nonexist", "--image-opts", "file.filename=top.qcow2,backing.file.filename=ov.qcow2"],
    ["-b", "base.qcow2", "--image-opts", "file.filename=sub/ov.qcow2,backing.driver=qcow2"],
    ["-b", "sub/base.qcow2", "--image-opts", "file.filename=sub/ov.qcow2,backing.driver=qcow2"],
    # no backing node, or one that does not open
    ["json:{'driver': 'qcow2', 'file': {'filename': 'ov.qcow2'}, 'backing': null}"],
    ["-b", "base.qcow2", "json:{'file': {'filename': 'ov.qcow2'}, 'backing': null}"],
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing="],
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing=null"],
    ["--image-opts", "driver=qcow2,file.filename=ov.qcow2,backing.file.filename=nonexist"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.backing.file.filename=nonexist"],
]


@pytest.mark.parametrize("args", COMMIT_CASES)
def test_commit_into_the_given_backing_node(images, tmp_path, args):
    assert_same_effect(images, tmp_path, "commit", *args)


REBASE_CASES = [
    # the old backing content is read from the node the options give
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.driver=raw",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.driver=qcow2",
    ],
    [
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.driver=raw",
    ],
    ["-b", "", "--image-opts", "file.filename=ov.qcow2,backing.file.filename=rawbase"],
    ["-b", "", "--image-opts", "file.filename=top.qcow2,backing.backing.file.filename=rawbase"],
    ["-b", "", "json:{'file': {'filename': 'ov.qcow2'}, 'backing': null}"],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "json:{'file': {'filename': 'nob.qcow2'}, 'backing': null}",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=top.qcow2,backing.backing.file.filename=rawbase",
    ],
    # a node other than the header's names the image json:, and a relative -b then fails
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.file.filename=base.qcow2",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.file.filename=rawbase",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=top.qcow2,backing.backing.driver=raw",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "json:{'file': {'filename': 'ov.qcow2'}, 'backing': null}",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=sub/ov.qcow2,backing.driver=qcow2",
    ],
    [
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=sub/ov.qcow2,backing.driver=raw",
    ],
    ["-b", "base2.qcow2", "-F", "qcow2", "sub/ov.qcow2"],
    # -u opens no backing node, and takes no options for one
    [
        "-u",
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "file.filename=ov.qcow2,backing.driver=raw",
    ],
    [
        "-u",
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "json:{'file': {'filename': 'ov.qcow2'}, 'backing': null}",
    ],
]


@pytest.mark.parametrize("args", REBASE_CASES)
def test_rebase_reads_the_given_backing_node(images, tmp_path, args):
    assert_same_effect(images, tmp_path, "rebase", *args)


def test_rebase_onto_an_absolute_name_through_a_given_node(images, tmp_path):
    """An absolute -b resolves whatever the image is named: the old content comes from
    the node the options give (rawbase's 0x44, not base.qcow2's 0x22)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(images / "base2.qcow2", elsewhere)
    for name in ("rawbase", "base.qcow2"):
        args = [
            "rebase",
            "-b",
            str(elsewhere / "base2.qcow2"),
            "-F",
            "qcow2",
            "--image-opts",
            f"file.filename=ov.qcow2,backing.file.filename={name}",
        ]
        assert_same_effect(images, tmp_path / name, *args)


AMEND_CASES = [
    # the v2 downgrade keeps zero clusters as data only over a backing node
    ["-o", "compat=0.10", "--image-opts", "file.filename=zov.qcow2,backing="],
    ["-o", "compat=0.10", "json:{'file': {'filename': 'zov.qcow2'}, 'backing': null}"],
    [
        "-o",
        "compat=0.10",
        "--image-opts",
        "file.filename=zov.qcow2,backing.file.filename=base2.qcow2",
    ],
    [
        "-o",
        "compat=0.10",
        "--image-opts",
        "file.filename=znob.qcow2,backing.file.filename=base2.qcow2",
    ],
    ["-o", "compat=0.10", "zov.qcow2"],
    # growing zero-fills where the backing node, not the header's file, would show through
    ["-o", "size=1M", "--image-opts", "file.filename=small.qcow2,backing="],
    [
        "-o",
        "size=1M",
        "--image-opts",
        "file.filename=small.qcow2,backing.file.filename=base2.qcow2",
    ],
    [
        "-o",
        "size=1M",
        "--image-opts",
        "file.filename=small.qcow2,backing.driver=raw,backing.file.filename=rawbase",
    ],
    # the header's backing file name is still what amend compares
    [
        "-o",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "--image-opts",
        "file.filename=small.qcow2,backing.file.filename=base2.qcow2",
    ],
    [
        "-o",
        "backing_file=base2.qcow2,backing_fmt=qcow2",
        "--image-opts",
        "file.filename=small.qcow2,backing.file.filename=base2.qcow2",
    ],
    # refused opens
    ["-o", "size=1M", "--image-opts", "file.filename=small.qcow2,backing.file.filename=rawbase"],
    ["-o", "lazy_refcounts=on", "--image-opts", "file.filename=small.qcow2,backing=null"],
    [
        "-o",
        "lazy_refcounts=on",
        "--image-opts",
        "file.filename=small.qcow2,backing.file.filename=nonexist",
    ],
]


@pytest.mark.parametrize("args", AMEND_CASES)
def test_amend_through_the_given_backing_node(images, tmp_path, args):
    assert_same_effect(images, tmp_path, "amend", *args)


# -- 3. a data file given as a null-co, qcow2 or nbd node ---------------------------------


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path):
    """The real qemu-nbd serving a raw file on a Unix socket, for any number of clients."""
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "8", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_listener(sock, proc, 10)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


DATA_FILE_NODES = [
    "data-file.driver=null-co",
    "data-file.driver=null-aio",
    "data-file.driver=null-co,data-file.size=1M",
    "data-file.driver=null-co,data-file.read-zeroes=on",
    "data-file.driver=null-co,data-file.size=4k",  # shorter than the data
    "data-file.driver=raw,data-file.file.driver=null-co",
    "data-file.driver=blkdebug,data-file.image.driver=null-co",
    "data-file.driver=qcow2,data-file.file.filename=dq.qcow2",
    "data-file.driver=qcow2,data-file.file.driver=file,data-file.file.filename=dq.qcow2",
    # refused, in QEMU's words
    "data-file.driver=null-co,data-file.bogus=1",
    "data-file.driver=qcow2,data-file.file.filename=t2.data",
    "data-file.driver=qcow2",
    "data-file.driver=qcow2,data-file.file=foo",
    "data-file.driver=qcow2,data-file.file.filename=nonexist",
    "data-file.driver=nbd",
    "data-file.driver=nbd,data-file.server.type=unix,data-file.server.path=nonexist.sock",
]


@pytest.mark.parametrize("options", DATA_FILE_NODES)
@pytest.mark.parametrize("command", [["compare"], ["map"], ["map", "--output=json"]])
def test_data_file_of_another_driver(images, options, command):
    image = f"driver=qcow2,file.filename=t.qcow2,{options}"
    args = [*command, "--image-opts", image]
    if command == ["compare"]:
        args.append("driver=qcow2,file.filename=t.qcow2")
    assert_same_in(images, *args)


def test_data_file_served_by_qemu_nbd(images, tmp_path):
    with qemu_nbd(images / "t2.data", tmp_path / "nbd.sock") as sock:
        server = f"server.type=unix,server.path={sock}"
        for node in (
            f"data-file.driver=nbd,data-file.{server.replace(',', ',data-file.')}",
            "data-file.driver=raw,data-file.file.driver=nbd,"
            f"data-file.file.{server.replace(',', ',data-file.file.')}",
            "data-file.driver=blkdebug,data-file.image.driver=nbd,"
            f"data-file.image.{server.replace(',', ',data-file.image.')}",
        ):
            image = f"driver=qcow2,file.filename=t.qcow2,{node}"
            for command in (["map"], ["map", "--output=json"], ["check"]):
                assert_same_in(images, *command, "--image-opts", image)
            assert_same_in(images, "compare", "--image-opts", image, "file.filename=t.qcow2")


@pytest.mark.parametrize(
    "node",
    [
        "data-file.driver=qcow2,data-file.file.filename=dq.qcow2",
        "data-file.driver=null-co",
        "data-file.driver=raw,data-file.file.driver=null-co",
    ],
)
def test_writes_into_a_data_file_node(scratch, tmp_path, node):
    """What convert -n writes lands in the node (the qcow2 one's clusters allocated as
    QEMU allocates them; the null one's lost) and the image's metadata as QEMU's."""
    create(scratch, "-f", "qcow2", "src.qcow2", "1M")
    # (over data already there, not zeros: qimg leaves the data file's bytes of a cluster
    # it zeroes alone, where QEMU discards them)
    qemu_io(scratch / "src.qcow2", "write -P 0x5a 0 192k", "write -z 512k 64k", fmt="qcow2")
    target = f"driver=qcow2,file.filename=t.qcow2,{node}"
    args = ("convert", "-n", "src.qcow2", "--target-image-opts", target)
    assert_same_effect(scratch, tmp_path / "runs", *args)


# -- 4. a backing node over blkdebug, nbd, quorum or null-co -----------------------------

QUORUM_CHILD = "vote-threshold=1,{0}children.0.driver=file,{0}children.0.filename="
BACKING_NODES = [
    "backing.driver=blkdebug,backing.image.filename=base2.qcow2",  # its bytes, raw
    "backing.driver=blkdebug,backing.image.driver=qcow2,backing.image.file.filename=base2.qcow2",
    "backing.driver=blkdebug,backing.config=/dev/null,backing.image.filename=rawbase",
    "backing.driver=qcow2,backing.file.driver=blkdebug,backing.file.image.filename=base2.qcow2",
    "backing.file.driver=blkdebug,backing.file.image.filename=base2.qcow2",
    "backing.driver=blkdebug",  # the header's file as its image (none: refused)
    "backing.driver=blkdebug,backing.image.driver=null-co",
    "backing.driver=null-co",
    "backing.driver=null-aio",
    "backing.driver=null-co,backing.size=512k",
    "backing.driver=null-co,backing.read-zeroes=on",
    "backing.driver=raw,backing.file.driver=null-co",
    "backing.file.driver=null-co",
    "backing.driver=qcow2,backing.file.driver=null-co",
    "backing.driver=qcow2,backing.file.driver=quorum,backing.file."
    + QUORUM_CHILD.format("backing.file.")
    + "base2.qcow2",
    "backing.driver=quorum",
    "backing.driver=quorum,backing.vote-threshold=2,backing.children.0.filename=rawbase",
    "backing.driver=nbd",
]


@pytest.mark.parametrize("options", BACKING_NODES)
@pytest.mark.parametrize("image", ["ov.qcow2", "nob.qcow2"])
@pytest.mark.parametrize("command", [["map"], ["map", "--output=json"]])
def test_backing_node_of_another_driver(images, command, image, options):
    """Beneath an image without a backing file name the node opens as given; when the
    header names one, QEMU gives the node that name as its file name too, which blkdebug
    alone takes (as its image) and the others refuse in their own words."""
    assert_same_in(images, *command, "--image-opts", f"file.filename={image},{options}")


@pytest.mark.parametrize("command", [["map"], ["map", "--output=json"]])
def test_quorum_backing_node_refused_with_a_header_name(images, command):
    """(Without one, QEMU opens a quorum as the backing node, which qimg does not: it
    opens a quorum only beneath an image format.)"""
    node = "backing.driver=quorum,backing." + QUORUM_CHILD.format("backing.") + "rawbase"
    assert_same_in(images, *command, "--image-opts", f"file.filename=ov.qcow2,{node}")


@pytest.mark.parametrize("image", ["ov.qcow2", "nob.qcow2"])
def test_backing_node_served_by_qemu_nbd(images, tmp_path, image):
    with qemu_nbd(images / "rawbase", tmp_path / "nbd.sock") as sock:
        for node in (
            f"backing.driver=nbd,backing.server.type=unix,backing.server.path={sock}",
            f"backing.driver=nbd,backing.path={sock}",
            "backing.driver=raw,backing.file.driver=nbd,backing.file.server.type=unix,"
            f"backing.file.server.path={sock}",
            f"backing.file.driver=nbd,backing.file.server.type=unix,backing.file.server.path={sock}",
            "backing.driver=blkdebug,backing.image.driver=nbd,backing.image.server.type=unix,"
            f"backing.image.server.path={sock}",
        ):
            options = f"file.filename={image},{node}"
            for command in (["map"], ["map", "--output=json"]):
                assert_same_in(images, *command, "--image-opts", options)
            assert_same_in(images, "compare", "--image-opts", options, "file.filename=nob.qcow2")


@pytest.mark.parametrize(
    "options",
    [
        "backing.driver=null-co",
        "backing.driver=blkdebug,backing.image.filename=rawbase",
        "backing.driver=qcow2,backing.file.driver=blkdebug,backing.file.image.filename=base2.qcow2",
    ],
)
def test_commit_into_a_backing_node_of_another_driver(images, tmp_path, options):
    """Committing writes into the node (into the blkdebug node's file; the null one's
    writes vanish)."""
    args = ("commit", "--image-opts", f"driver=qcow2,file.filename=nob.qcow2,{options}")
    assert_same_effect(images, tmp_path, *args)
