"""Start-up cost: opening a plain qcow2 image and reading what `info` shows imports neither
construct nor the optional codec/crypto packages, and qimg's metadata commands import none
of the heavy modules they do not use; the struct formats used instead agree with the
construct declarations they stand in for, and Extent's run-time tuple class with the
NamedTuple mypy checks."""

from __future__ import annotations

import ast
import gc
import inspect
import json
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qcow2lib import structs as S
from qemutools import qemu_create, qemu_img, qemu_io, run_qimg

ROOT = Path(__file__).resolve().parent.parent


def run_reporting_modules(names, command: str, *argv: str) -> subprocess.CompletedProcess:
    """Run qimg `command` in a fresh interpreter; its last stderr line is
    `exit=N loaded=[...]`, the modules of `names` it imported. -S: as an installed qimg
    starts (the venv's editable-install finder, run by site, would import re, enum and
    pathlib itself and hide them)."""
    script = (
        "import sys\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tools']\n"
        "names = sys.argv[2].split(',')\n"
        "sys.argv = ['qemu-img', *sys.argv[3:]]\n"
        "import qimg\n"
        "code = qimg.main()\n"
        "loaded = ','.join(sorted(name for name in names if name in sys.modules))\n"
        "sys.stderr.write(f'exit={code} loaded=[{loaded}]\\n')\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", script, str(ROOT), ",".join(names), command, *argv],
        capture_output=True,
        text=True,
    )


def test_struct_formats_match_the_construct_declarations() -> None:
    assert S.HEADER_V2_SIZE == S.HeaderV2.sizeof()
    assert S.HEADER_V3_SIZE == S.HEADER_V2_SIZE + S.HeaderV3Tail.sizeof()
    assert S.HEADER_V2_FIELDS == tuple(sub.name for sub in S.HeaderV2.subcons)
    assert S.HEADER_V3_TAIL_FIELDS == tuple(sub.name for sub in S.HeaderV3Tail.subcons)
    values = tuple(range(1, len(S.HEADER_V2_FIELDS) + 1))
    raw = S.HEADER_V2_FORMAT.pack(*values)
    parsed = S.HeaderV2.parse(raw)
    assert tuple(parsed[name] for name in S.HEADER_V2_FIELDS) == values
    assert S.FEATURE_NAME_ENTRY_SIZE == S.FeatureNameEntry.sizeof()
    for kind, bit, name in S.FEATURE_NAMES:
        assert S.FeatureNameEntry.build(
            dict(type=kind, bit=bit, name=name)
        ) == S.FEATURE_NAME_ENTRY_FORMAT.pack(kind, bit, name.encode("ascii"))
    assert S.SNAPSHOT_ENTRY_HEADER_SIZE == S.SnapshotEntryHeader.sizeof()
    assert S.SNAPSHOT_ENTRY_HEADER_FORMAT.size == S.SNAPSHOT_ENTRY_HEADER_SIZE
    assert S.SNAPSHOT_ENTRY_HEADER_FIELDS == tuple(
        sub.name for sub in S.SnapshotEntryHeader.subcons
    )
    values = tuple(range(1, len(S.SNAPSHOT_ENTRY_HEADER_FIELDS) + 1))
    raw = S.SNAPSHOT_ENTRY_HEADER_FORMAT.pack(*values)
    assert S.SnapshotEntryHeader.build(dict(zip(S.SNAPSHOT_ENTRY_HEADER_FIELDS, values))) == raw
    v3_values = tuple(range(7, len(S.HEADER_V3_TAIL_FIELDS) + 7))
    assert S.HeaderV3Tail.build(
        dict(zip(S.HEADER_V3_TAIL_FIELDS, v3_values))
    ) == S.HEADER_V3_TAIL_FORMAT.pack(*v3_values)
    assert S.BITMAP_DIRECTORY_ENTRY_SIZE == S.BitmapDirectoryEntry.sizeof()
    for declared, fields, packer in (
        (S.BitmapsExtension, S.BITMAPS_EXTENSION_FIELDS, S.BITMAPS_EXTENSION_FORMAT),
        (S.BitmapDirectoryEntry, S.BITMAP_DIRECTORY_ENTRY_FIELDS, S.BITMAP_DIRECTORY_ENTRY_FORMAT),
    ):
        assert fields == tuple(sub.name for sub in declared.subcons)
        values = tuple(range(1, len(fields) + 1))
        assert declared.build(dict(zip(fields, values))) == packer.pack(*values)


def test_opening_and_reading_an_image_imports_no_construct(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import qcow2lib\n"
        "with qcow2lib.open(sys.argv[2], 'r') as img:\n"
        "    data = img.read(0, 65536)\n"
        "    extents = len(img.extents())\n"
        "print(json.dumps({'ok': data == b'a' * 65536, 'extents': extents, 'loaded': sorted(\n"
        "    m for m in ('construct', 'cryptography', 'zstandard') if m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    assert result == {"ok": True, "extents": 2, "loaded": []}


# Modules that cost start-up time and that the metadata commands below never need: re
# (3 ms with enum; a new snapshot's ID is parsed by hand), the optional codec/crypto
# packages, construct (rare structures and whole-header writes only), the ctypes package
# (hole punching and buffer addresses use _ctypes beneath it, even in the commands that
# free clusters), the codec thread pool (compressed clusters), JSON (--output=json) and
# datetime (dates given as datetime).
LAZY_FOR_METADATA_COMMANDS = (
    "re",
    "construct",
    "cryptography",
    "zstandard",
    "ctypes",
    "concurrent.futures",
    "json",
    "datetime",
)


@pytest.mark.parametrize(
    "command",
    [
        ["info"],
        ["check"],
        ["map"],
        ["snapshot", "-l"],
        ["snapshot", "-c", "new"],
        ["snapshot", "-a", "s0"],
        ["snapshot", "-d", "s0"],
    ],
    ids=lambda command: " ".join(command),
)
def test_cli_metadata_commands_import_no_heavy_modules(tmp_path: Path, command: list) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    qemu_img("snapshot", "-c", "s0", path)
    qemu_io(path, "write -P 0x62 0 64k")  # (apply and delete then free clusters)
    lazy = list(LAZY_FOR_METADATA_COMMANDS)
    if command[0] == "snapshot" and command[1] != "-l":  # (info's formatting: -l's alone)
        lazy += ["qcow2lib.cli.info", "qcow2lib.ops.info"]
    script = (
        "import sys, os\n"
        "sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], 'tools')]\n"
        "names = sys.argv[2].split(',')\n"
        "sys.argv = ['qimg', *sys.argv[3:]]\n"
        "import qimg\n"
        "code = qimg.main()\n"
        "loaded = ','.join(sorted(name for name in names if name in sys.modules))\n"
        "sys.stderr.write(f'exit={code} loaded=[{loaded}]\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), ",".join(lazy)] + command + [str(path)],
        capture_output=True,
        text=True,
    )
    assert done.stderr.splitlines()[-1] == "exit=0 loaded=[]", done.stderr
    if command[:2] == ["snapshot", "-l"]:
        assert " s0 " in done.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["info", "{}"],
        ["check", "{}"],
        ["map", "{}"],
        ["bitmap", "--add", "{}", "b1"],
        ["bitmap", "--remove", "{}", "b0"],
        ["amend", "-o", "lazy_refcounts=on", "{}"],
    ],
    ids=lambda command: command[0] if command[0] != "bitmap" else " ".join(command[:2]),
)
def test_commands_on_an_image_with_bitmaps_import_no_construct(tmp_path: Path, command) -> None:
    """A persistent dirty bitmap (as libvirt's incremental backups leave them) is read at
    every open: its extension and directory entries are parsed with struct, and amend
    loads the LUKS machinery only for encrypt.* options."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_img("bitmap", "--add", path, "b0")
    argv = [arg.format(path) for arg in command[1:]]
    done = run_reporting_modules(list(LAZY_FOR_METADATA_COMMANDS), command[0], *argv)
    assert done.stderr.splitlines()[-1] == "exit=0 loaded=[]", done.stderr


# What qimg costs beyond the interpreter's own start is mostly its imports (issue 13), and
# scripts start it thousands of times. On a qcow2 image without compressed clusters,
# info, check and map need none of these: the optional packages, zlib, dataclasses
# (inspect, ast, dis, tokenize), typing, re and enum, signal (it imports enum), threading
# and functools (an image makes its condition variable at the first wait), math, JSON (only
# --output=json), the snapshot machinery (only images with snapshots), bitmaps, codecs
# and encryption (only images that have them), --object and option-string parsing, the
# nodes only named images open (blkdebug, null-co, quorum, throttle) and what only other
# commands use.
NOT_FOR_INFO_CHECK_MAP = (
    "construct",
    "cryptography",
    "zstandard",
    "threading",
    "functools",
    "math",
    "dataclasses",
    "inspect",
    "typing",
    "re",
    "enum",
    "signal",
    "json",
    "base64",
    "copy",
    "zlib",
    "ctypes",
    "concurrent.futures",
    "datetime",
    "pathlib",
    "qcow2lib.snapshots",
    "qcow2lib.rebuild",
    "qcow2lib.bitmaps",
    "qcow2lib.codecs",
    "qcow2lib.crypto",
    "qcow2lib.luks_image",
    "qcow2lib.cli.secrets",
    "qcow2lib.cli.qemuopts",
    "qcow2lib.blkdebug",
    "qcow2lib.nulldev",
    "qcow2lib.quorum",
    "qcow2lib.throttle",
)


@pytest.mark.parametrize("snapshot", [False, True], ids=["plain", "with a snapshot"])
@pytest.mark.parametrize("command", ["info", "check", "map"])
def test_info_check_and_map_import_nothing_they_do_not_use(
    tmp_path: Path, command: str, snapshot: bool
) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    lazy = NOT_FOR_INFO_CHECK_MAP
    if snapshot:
        qemu_img("snapshot", "-c", "s0", path)
    if command == "info":  # (nor the tables' machinery: the snapshot list is read alone)
        lazy += NOT_FOR_INFO
    done = run_reporting_modules(lazy, command, str(path))
    assert done.stderr.splitlines()[-1] == "exit=0 loaded=[]", done.stderr
    assert done.stdout == qemu_img(command, path).stdout


# what info and snapshot -l never read: the L1, L2 and refcount tables (array imports
# collections: 2 ms of a 15 ms start)
NOT_FOR_INFO = ("array", "collections", "qcow2lib.mapping", "qcow2lib.refcount")


def test_snapshot_list_imports_only_what_info_does(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    qemu_img("snapshot", "-c", "s0", path)
    done = run_reporting_modules(NOT_FOR_INFO_CHECK_MAP + NOT_FOR_INFO, "snapshot", "-l", str(path))
    assert done.stderr.splitlines()[-1] == "exit=0 loaded=[]", done.stderr
    assert done.stdout == qemu_img("snapshot", "-l", path).stdout


# Everything `qimg info` on a plain qcow2 image loads beyond a bare interpreter's modules
# (python -S), so that nothing joins its start-up path unnoticed: a module that appears
# here needs a reason (what every info run uses), or to be imported where it is used.
INFO_MODULES = frozenset(
    {
        # the standard library: os and struct, fcntl (locks), gc (freezing before exit),
        # itertools, _collections (Extent's and Segment's field descriptor), _operator (the
        # C functions extent batches are joined with; operator.py is 0.2 ms more) and
        # `from __future__ import annotations`. Not array: it imports collections (2 ms of
        # a 15 ms start); the L1, L2 and refcount tables info never reads are made at their
        # first use.
        *("os", "os.path", "posixpath", "genericpath", "stat", "_stat", "_collections_abc"),
        *("struct", "_struct", "errno", "fcntl", "gc", "_collections", "itertools"),
        "_operator",
        "__future__",
        # the engine's opening path
        *("qcow2lib", "qcow2lib.errors", "qcow2lib.structs", "qcow2lib.hostfile"),
        *("qcow2lib.blockdev", "qcow2lib.records", "qcow2lib.header", "qcow2lib.segment"),
        *("qcow2lib.overlap", "qcow2lib.image", "qcow2lib.imagelock", "qcow2lib.nodes"),
        "qcow2lib.chain",
        *("qcow2lib.create", "qcow2lib.sizes", "qcow2lib.qobject"),
        *("qcow2lib.ops", "qcow2lib.ops.info"),
        # the CLI: dispatch, getopt, image names, the command
        *("qcow2lib.cli", "qcow2lib.cli.common", "qcow2lib.cli.gnu_getopt"),
        *("qcow2lib.cli.images", "qcow2lib.cli.info"),
    }
)


@pytest.mark.parametrize("output", ["human", "json"])
def test_info_on_a_plain_image_imports_only_what_it_needs(tmp_path: Path, output: str) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "64M")
    script = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tools']\n"
        "sys.argv = ['qemu-img', *sys.argv[2:]]\n"
        "import qimg\n"
        "code = qimg.main()\n"
        "loaded = ' '.join(sorted(set(sys.modules) - before))\n"
        "sys.stderr.write(f'exit={code} loaded={loaded}\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", script, str(ROOT), "info", f"--output={output}", str(path)],
        capture_output=True,
        text=True,
    )
    status, loaded = done.stderr.splitlines()[-1].split(" loaded=")
    assert status == "exit=0", done.stderr
    extra = set(loaded.split()) - INFO_MODULES - {"qimg"}
    if output == "json":  # (the JSON output alone needs the json package)
        extra = {name for name in extra if name != "json" and not name.startswith("json.")}
    assert not extra, f"qimg info imports more than it needs: {sorted(extra)}"
    assert done.stdout == qemu_img("info", f"--output={output}", path).stdout


# create, convert and compare, the commands scripts run most after info: typing alone
# (with re and enum, which it imports) cost create a third of its start-up; threading (and
# functools) only convert's worker threads need, not -p's progress line.
NOT_FOR_CREATE_CONVERT_COMPARE = (
    "typing",
    "re",
    "enum",
    "dataclasses",
    "json",
    "math",
    "ctypes",  # (buffer addresses come from _ctypes, beneath it)
    "qcow2lib.snapshots",  # (the overlap check reads a snapshot table only where one is)
)


@pytest.mark.parametrize("command", ["create", "convert", "compare"])
def test_create_convert_and_compare_import_no_typing_or_re(tmp_path: Path, command: str) -> None:
    source = tmp_path / "a.qcow2"
    qemu_create(source, "4M")
    qemu_io(source, "write -P 0x61 0 1M")  # (convert reads it in one piece, to a buffer)
    target = tmp_path / "b.qcow2"
    lazy = NOT_FOR_CREATE_CONVERT_COMPARE
    if command == "create":
        argv = ["-f", "qcow2", str(target), "4M"]
    elif command == "convert":
        argv = ["-p", "-O", "qcow2", str(source), str(target)]
    else:
        qemu_img("convert", "-O", "qcow2", source, target)
        argv = ["-p", str(source), str(target)]
    if command != "convert":
        lazy += ("threading", "functools")
    done = run_reporting_modules(lazy, command, *argv)
    assert done.stderr.splitlines()[-1] == "exit=0 loaded=[]", done.stderr
    qemu_img("check", target)  # (check=True: a clean image, or the test fails)
    if command != "create":
        qemu_img("compare", source, target)


def test_extent_at_run_time_is_the_namedtuple_mypy_checks() -> None:
    """blockdev declares Extent twice (typing's NamedTuple for mypy, a tuple class of its
    own at run time, so that neither typing nor collections is imported): the fields and
    defaults must be the same, and it must behave as the namedtuple it stands in for."""
    from qcow2lib.blockdev import Extent

    tree = ast.parse((ROOT / "qcow2lib" / "blockdev.py").read_text())
    declared = next(
        node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "Extent"
    )
    fields = [item for item in declared.body if isinstance(item, ast.AnnAssign)]
    assert Extent._fields == tuple(item.target.id for item in fields)
    parameters = inspect.signature(Extent).parameters
    assert tuple(parameters) == Extent._fields
    assert {
        name: parameter.default
        for name, parameter in parameters.items()
        if parameter.default is not parameter.empty
    } == {item.target.id: ast.literal_eval(item.value) for item in fields if item.value}
    extent = Extent(0, 512, True, False, 0)
    assert extent == (0, 512, True, False, 0, None, True)
    assert (extent.host_offset, extent.present) == (None, True)
    assert extent._replace(length=1024, depth=1) == (0, 1024, True, False, 1, None, True)
    assert pickle.loads(pickle.dumps(extent)) == extent
    assert repr(extent) == (
        "Extent(offset=0, length=512, is_data=True, is_zero=False, depth=0, "
        "host_offset=None, present=True)"
    )


def test_only_a_qimg_process_freezes_its_objects_for_exit(tmp_path: Path) -> None:
    """As a program, qimg spares the interpreter's exit its garbage collections
    (gc.freeze); called in-process, with argv given, it leaves the collector alone."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    frozen = gc.get_freeze_count()
    assert run_qimg("info", path).returncode == 0
    assert gc.get_freeze_count() == frozen and gc.isenabled()
    script = (
        "import gc, sys, os\n"
        "sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], 'tools')]\n"
        "sys.argv = ['qemu-img', 'info', sys.argv[2]]\n"
        "import qimg\n"
        "code = qimg.main()\n"
        "sys.stderr.write(f'exit={code} frozen={gc.get_freeze_count() > 0}\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(path)], capture_output=True, text=True
    )
    assert done.stderr == "exit=0 frozen=True\n", done.stderr
    assert done.stdout == qemu_img("info", path).stdout


def test_the_qimg_command_starts_without_re(tmp_path: Path) -> None:
    """The installed command is tools/qimg, not a generated console-script wrapper (that
    one imports `re` before qimg runs: a fifth of `qimg info`'s start-up)."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "tools" / "qimg"), "info", str(path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"image: {path}\nfile format: qcow2\n")
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "qcow2lib.cli.info" in imported
    assert "re" not in imported
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["script-files"] == ["tools/qimg"]
    assert "scripts" not in pyproject["project"]


def test_the_qimg_command_ends_with_all_its_output_and_its_exit_code(tmp_path: Path) -> None:
    """tools/qimg ends the process without taking the interpreter apart: what qimg wrote
    to a pipe (far more than a pipe holds) still arrives whole, and the exit code is
    main's (1: the images differ)."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "16M", options={"cluster_size": 4096})
    qemu_io(path, *(f"write -P 0x5a {offset} 512" for offset in range(0, 16 << 20, 8 << 10)))
    launcher = [sys.executable, str(ROOT / "tools" / "qimg")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    mapped = subprocess.run(
        [*launcher, "map", "--output=json", str(path)], capture_output=True, text=True, env=env
    )
    expected = qemu_img("map", "--output=json", str(path)).stdout
    assert len(expected) > 4 * 65536
    assert (mapped.returncode, mapped.stderr, mapped.stdout) == (0, "", expected)
    other = tmp_path / "b.qcow2"
    qemu_create(other, "16M")
    differ = [str(path), str(other)]
    compared = subprocess.run([*launcher, "compare", *differ], capture_output=True, env=env)
    reference = qemu_img("compare", *differ, check=False)
    assert reference.returncode == 1
    assert (compared.returncode, compared.stdout) == (1, reference.stdout.encode())


def test_the_qimg_command_loads_array_without_collections(tmp_path: Path) -> None:
    """tools/qimg imports `array` without the collections package that array's own
    import would bring in (nothing on the metadata commands' paths needs it), and leaves
    no trace of how: array is still a registered MutableSequence, and a later `import
    collections.abc` (as a convert's threads make) loads the real package, whose ABCs
    are the same objects."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "16M", options={"cluster_size": 4096})
    qemu_io(path, "write -P 0x5a 0 64k", "write -P 0x33 1M 4k")
    launcher = str(ROOT / "tools" / "qimg")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for command in (["check"], ["map", "--output=json"], ["measure", "-O", "qcow2"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", launcher, *command, str(path)],
            capture_output=True,
            text=True,
            env=env,
        )
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in done.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert done.stdout == qemu_img(*command, path).stdout
        assert "array" in imported, command
        assert not imported & {"collections", "collections.abc", "typing"}, command
    # in the launcher's own process, at its exit: the registration and the real package
    script = (
        "import atexit, sys\n"
        "def report():\n"
        "    import array, collections.abc, _collections_abc\n"
        "    registered = isinstance(array.array('b'), collections.abc.MutableSequence)\n"
        "    same = collections.abc.Sequence is _collections_abc.Sequence\n"
        "    real = hasattr(collections, 'OrderedDict') and collections.abc.__name__\n"
        "    sys.stderr.write(f'registered={registered} same={same} real={real}\\n')\n"
        "atexit.register(report)\n"
        "launcher = sys.argv[1]\n"
        "sys.argv = ['qemu-img', *sys.argv[2:]]\n"
        "exec(compile(open(launcher).read(), launcher, 'exec'), {'__name__': '__main__'})\n"
    )
    out = tmp_path / "b.qcow2"
    for args in (["check", str(path)], ["convert", "-O", "qcow2", str(path), str(out)]):
        done = subprocess.run(
            [sys.executable, "-c", script, launcher, *args], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        report = done.stderr.splitlines()[-1]
        assert report == "registered=True same=True real=collections.abc", done.stderr
    assert qemu_img("compare", path, out).returncode == 0
