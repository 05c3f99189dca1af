"""Rate limits (qcow2lib/throttle.py): qemu-img's -r for convert and commit, the
throttle-group object and the throttle filter node.

The limiters' schedules are checked exactly on a fake clock (which sleeps, how long);
the command line against the real qemu-img 7.2 (same messages, output and exit codes),
and a real rate-limited run can finish no sooner than its size and rate allow.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import throttle
from qcow2lib.blockdev import RawDevice
from qcow2lib.convert import convert
from qcow2lib.errors import InvalidArgumentError
from qcow2lib.ops.commit import commit
from qcow2lib.throttle import RateLimiter, ThrottleDevice, ThrottleGroup, check_limits
from qemutools import qemu_img, qemu_io, run
from qemutools import assert_same_in as assert_same
from qemutools import run_qimg_in as run_qimg

MS = 1_000_000  # nanoseconds


class FakeTime:
    """A clock that moves only when slept on; the sleeps are recorded in nanoseconds."""

    def __init__(self) -> None:
        self.now = 0
        self.sleeps: list[int] = []

    def clock(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        ns = round(seconds * 1_000_000_000)
        self.sleeps.append(ns)
        self.now += ns


# -- the block job's limiter (commit -r) --


def test_rate_limiter_runs_ahead_within_a_slice_then_sleeps():
    """10 KiB/s: 1024 bytes per 100 ms slice. Chunks below the quota pass; the one that
    spends it sleeps to the slice's end, stretched by the excess."""
    fake = FakeTime()
    limiter = RateLimiter(10240, clock=fake.clock, sleep=fake.sleep)
    assert limiter.slice_quota == 1024
    limiter.account(512)
    assert fake.sleeps == []
    limiter.account(512)  # 1024 bytes: the slice's quota is spent
    assert fake.sleeps == [100 * MS]
    limiter.account(512)  # t=100 ms is still inside the slice: 1.5 quotas, 150 ms
    assert fake.sleeps == [100 * MS, 50 * MS]
    fake.now += 1000 * MS  # a pause: the next chunk starts a new slice
    limiter.account(3000)  # 3000/1024 slices at once
    assert fake.sleeps[2:] == [int(3000 / 1024 * 100 * MS)]


def test_rate_limiter_unlimited_and_slowest():
    fake = FakeTime()
    unlimited = RateLimiter(0, clock=fake.clock, sleep=fake.sleep)
    for _ in range(100):
        unlimited.account(1 << 30)
    assert fake.sleeps == []
    # one byte per second still lets one byte through per slice, as QEMU's quota floor
    slowest = RateLimiter(1, clock=fake.clock, sleep=fake.sleep)
    assert slowest.slice_quota == 1
    slowest.account(5)
    assert fake.sleeps == [500 * MS]
    with pytest.raises(InvalidArgumentError):
        RateLimiter(-1)


# -- throttle groups: leaky buckets --


def test_group_bps_write_schedule():
    """bps-write 1000: a tenth of a second's worth (100 bytes) may be outstanding; each
    write waits until the bucket has leaked down to that. Reads are not limited."""
    fake = FakeTime()
    group = ThrottleGroup({"bps-write": 1000}, clock=fake.clock, sleep=fake.sleep)
    for _ in range(4):
        group.intercept(400, True)
    assert fake.sleeps == [300 * MS, 400 * MS, 400 * MS]
    group.intercept(1 << 20, False)
    assert len(fake.sleeps) == 3


def test_group_total_counts_both_directions_and_iops_size():
    fake = FakeTime()
    group = ThrottleGroup({"iops-total": 10, "iops-size": 4096}, clock=fake.clock, sleep=fake.sleep)
    group.intercept(8192, True)  # two operations' worth: bucket at 2, allowance 1
    group.intercept(512, False)  # waits for one unit to leak: 100 ms
    assert fake.sleeps == [100 * MS]
    group.intercept(512, False)  # level 2 again after the last: another 100 ms
    assert fake.sleeps == [100 * MS, 100 * MS]


def test_group_burst():
    """bps-total 100, bursts of 1000 for 2 s: the main bucket allows 2000 bytes, the
    burst bucket a tenth of the burst rate (100 bytes)."""
    fake = FakeTime()
    group = ThrottleGroup(
        {"bps-total": 100, "bps-total-max": 1000, "bps-total-max-length": 2},
        clock=fake.clock,
        sleep=fake.sleep,
    )
    group.intercept(500, True)
    group.intercept(500, False)  # burst level 500: 400 over at 1000/s
    assert fake.sleeps == [400 * MS]


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"bps-total": 1, "bps-read": 1}, "cannot be used at the same time"),
        ({"iops-total-max": 1, "iops-write-max": 1}, "cannot be used at the same time"),
        ({"iops-size": 512}, "iops size requires an iops value to be set"),
        ({"bps-read": 10**15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
        ({"bps-read-max-length": 0}, "the burst length cannot be 0"),
        ({"bps-read-max-length": 2}, "burst length set without burst rate"),
        (
            {"bps-read": 1, "bps-read-max": 10**9, "bps-read-max-length": 10**7},
            "burst length too high for this burst rate",
        ),
        ({"bps-read-max": 5}, "bps_max/iops_max require corresponding bps/iops values"),
        ({"bps-read": 10, "bps-read-max": 5}, "bps_max/iops_max cannot be lower than bps/iops"),
        ({"bps": 5}, "Parameter 'bps' is unexpected"),
    ],
)
def test_group_limits_checked(limits, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[")):
        check_limits(limits)


def test_throttle_device_limits_each_request(tmp_path: Path):
    """The filter passes content through and waits before reads, writes, zero writes and
    discards; flushes and block status are not limited."""
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x11" * 65536)
    fake = FakeTime()
    group = ThrottleGroup({"iops-total": 10}, clock=fake.clock, sleep=fake.sleep)
    with ThrottleDevice(RawDevice(str(path), "r+"), group, "node") as device:
        assert (device.format, device.size) == ("throttle", 65536)
        assert device.read(0, 4096) == b"\x11" * 4096  # level 1, allowance 1
        device.write(4096, b"\x22" * 512)  # level 1 is not over the allowance: no wait
        device.write_zeroes(8192, 4096)  # level 2: 100 ms
        device.discard(16384, 4096)  # 100 ms
        device.flush()
        assert [e.offset for e in device.extents(0, 65536)][:1] == [0]
        assert fake.sleeps == [100 * MS] * 2
        assert device.read(4096, 512) == b"\x22" * 512
    assert path.read_bytes()[8192:12288] == bytes(4096)


def test_throttle_file_limits_each_request(tmp_path: Path):
    """Beneath an image, the node limits its host file's reads, writes and hole punches."""
    from qcow2lib.hostfile import open_host_file
    from qcow2lib.throttle import ThrottleFile

    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x11" * 65536)
    fake = FakeTime()
    group = ThrottleGroup({"iops-total": 10}, clock=fake.clock, sleep=fake.sleep)
    file = ThrottleFile(open_host_file(str(path), writable=True), group, "node")
    try:
        assert file.pread(512, 0) == b"\x11" * 512
        file.pwrite(b"\x22" * 512, 512)
        file.pwritev([b"\x33" * 512, b"\x44" * 512], 1024)  # one request
        buf = bytearray(2048)
        file.readinto(memoryview(buf), 0)
        file.punch_hole(4096, 4096)
        assert fake.sleeps == [100 * MS] * 3
        assert bytes(buf) == b"\x11" * 512 + b"\x22" * 512 + b"\x33" * 512 + b"\x44" * 512
    finally:
        file.close()


# -- the engine's copies with -r, on the fake clock --


def _striped_raw(path: Path, stripes: int, stripe: int = 65536) -> None:
    """Data stripes with holes between them: each stripe is one write of the copy."""
    with open(path, "wb") as f:
        for index in range(stripes):
            f.seek(2 * index * stripe)
            f.write(bytes([index + 1]) * stripe)
        f.truncate(2 * stripes * stripe)


def test_convert_rate_limit_schedule(tmp_path: Path):
    """convert(rate_limit=R) throttles writes as qemu-img -r does: each 64 KiB stripe
    after the first waits until all but R/10 bytes of the earlier ones have drained."""
    _striped_raw(tmp_path / "src.raw", 4)
    qemu_img("create", "-q", "-f", "raw", tmp_path / "dst.raw", "512K")
    fake = FakeTime()
    with (
        qcow2lib.open(str(tmp_path / "src.raw"), "r", "raw") as source,
        qcow2lib.open(str(tmp_path / "dst.raw"), "r+", "raw") as target,
    ):
        convert(
            source,
            target,
            copy_range=False,  # (QEMU's copy offloading bypasses the limit)
            rate_limit=262144,
            clock=fake.clock,
            sleep=fake.sleep,
        )
    # the first write passes; the second waits until 64 KiB - R/10 drained (150 ms), each
    # later one for its own 64 KiB (250 ms)
    assert fake.sleeps == [pytest.approx(ns, abs=2) for ns in (150 * MS, 250 * MS, 250 * MS)]
    assert (tmp_path / "src.raw").read_bytes() == (tmp_path / "dst.raw").read_bytes()


def test_commit_rate_limit_schedule(tmp_path: Path):
    """commit(rate_limit=R) sleeps after each copied chunk as QEMU's job does: 64 KiB at
    128 KiB/s is 5.0001 slices of 13107 bytes; zero runs count nothing."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 9 0 64k", "write -z 512k 64k")
    fake = FakeTime()
    with qcow2lib.open(str(top), "r+", "qcow2", backing=False) as image:
        commit(image, rate_limit=131072, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == [int(65536 / 13107 * 100 * MS)]
    assert run(["qemu-img", "compare", tmp_path / "base.qcow2", top]).returncode == 0


# -- the command line against qemu-img --


@pytest.mark.parametrize("command", ["convert", "commit"])
@pytest.mark.parametrize("rate", ["-1", "abc", "10x", "1.5.5", "9223372036854775808", "16E"])
def test_rate_limit_refused_as_qemu_img(tmp_path: Path, command: str, rate: str):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    args = ["-O", "raw", "a.qcow2", "b.raw"] if command == "convert" else ["a.qcow2"]
    assert assert_same(tmp_path, command, "-r", rate, *args).returncode == 1


def test_convert_rate_limit_takes_its_time(tmp_path: Path):
    """A real -r run cannot finish sooner than its arithmetic allows (qemu-img alike): of
    four 64 KiB stripes at 256 KiB/s, the first passes, the next waits until all but a
    tenth of a second's worth drained (150 ms), the last two 250 ms each."""
    _striped_raw(tmp_path / "src.raw", 4)
    lower_bound = 0.15 + 0.25 + 0.25
    for tool in ("qimg", "qemu-img"):
        (tmp_path / "out.raw").unlink(missing_ok=True)
        args = ["convert", "-r", "256k", "-f", "raw", "-O", "raw", "src.raw", "out.raw"]
        start = time.monotonic()
        if tool == "qimg":
            result = run_qimg(tmp_path, *args)
        else:
            result = run(["qemu-img", *args], check=False, cwd=tmp_path)
        elapsed = time.monotonic() - start
        assert (result.returncode, result.stderr) == (0, ""), tool
        assert elapsed >= lower_bound, tool
        assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "src.raw").read_bytes()


def test_commit_rate_limit_takes_its_time(tmp_path: Path):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    qemu_io(tmp_path / "top.qcow2", "write -P 9 0 64k")
    start = time.monotonic()
    result = run_qimg(tmp_path, "commit", "-r", "128k", "top.qcow2")
    assert (result.returncode, result.stdout) == (0, "Image committed.\n")
    assert time.monotonic() - start >= 65536 / 13107 * 0.1


OBJECT = "throttle-group,id=G,x-bps-total=1048576"
NODES = [
    "driver=throttle,throttle-group=G,file.driver=qcow2,file.file.filename=t.qcow2",
    "driver=throttle,throttle-group=G,file.driver=raw,file.file.filename=r.raw",
    "driver=throttle,throttle-group=G,file.driver=file,file.filename=r.raw",
    "driver=throttle,throttle-group=G,file.filename=r.raw",
    "driver=throttle,throttle-group=G,file.driver=null-co",
    "driver=throttle,throttle-group=G,file.driver=null-co,file.size=4096",
    # beneath an image format (file.driver=throttle), the format stated or probed
    "driver=qcow2,file.driver=throttle,file.throttle-group=G,file.file.filename=t.qcow2",
    "driver=qcow2,file.driver=throttle,file.throttle-group=G,file.file.filename=top.qcow2",
    "file.driver=throttle,file.throttle-group=G,file.file.filename=t.qcow2",
    "driver=raw,file.driver=throttle,file.throttle-group=G,file.file.filename=r.raw",
    "driver=qcow2,file.driver=throttle,file.throttle-group=H,file.file.filename=t.qcow2",
    # refused: no group, an unknown group, no child, an unknown option
    "driver=throttle,file.driver=file,file.filename=r.raw",
    "driver=throttle,throttle-group=H,file.filename=r.raw",
    "driver=throttle,throttle-group=G",
    "driver=throttle,throttle-group=G,foo=1,file.filename=r.raw",
]


@pytest.fixture
def node_images(tmp_path: Path) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "t.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "t.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 6 64k 64k")
    qemu_io(tmp_path / "t.qcow2", "write -P 5 0 64k", "write -z 128k 64k")
    (tmp_path / "r.raw").write_bytes(b"\x05" * 65536 + bytes(65536 * 15))
    return tmp_path


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("output", ["human", "json"])
def test_info_of_throttle_node(node_images: Path, node: str, output: str):
    args = ["--output", output, "--backing-chain", "--object", OBJECT, "--image-opts", node]
    assert_same(node_images, "info", *args)


# (1 GiB of null-co read at 1 MiB/s would take a quarter of an hour, in both tools)
@pytest.mark.parametrize("node", [node for node in NODES if not node.endswith("null-co")])
def test_map_and_compare_through_throttle_node(node_images: Path, node: str):
    for output in ("human", "json"):
        assert_same(
            node_images, "map", "--output", output, "--object", OBJECT, "--image-opts", node
        )
    assert_same(node_images, "compare", "--object", OBJECT, "--image-opts", node, node)


JSON_NODE = (
    'json:{"driver": "throttle", "throttle-group": "G", '
    '"file": {"driver": "qcow2", "file": {"driver": "file", "filename": "t.qcow2"}}}'
)


@pytest.mark.parametrize(
    "args",
    [
        ["info", JSON_NODE],
        [
            "info",
            'json:{"driver":"throttle","throttle-group":"G","file":{"driver":"null-co","size":4096}}',
        ],
        ["map", JSON_NODE],
        ["map", "--output=json", JSON_NODE],
        ["compare", JSON_NODE, "t.qcow2"],
        ["compare", JSON_NODE, "r.raw"],
        ["compare", "r.raw", JSON_NODE],
        ["check", JSON_NODE],
        ["check", "--output=json", JSON_NODE],
    ],
)
def test_commands_through_throttle_node(node_images: Path, args: list[str]):
    assert_same(node_images, args[0], "--object", OBJECT, *args[1:])


def test_convert_through_throttle_nodes(node_images: Path):
    """A throttle node as source, and as target (--target-image-opts), gives qemu-img's
    bytes."""
    for tool in ("qimg", "qemu-img"):
        out = node_images / f"{tool}.raw"
        args = ["convert", "--object", OBJECT, JSON_NODE, "-O", "raw", out]
        if tool == "qimg":
            result = run_qimg(node_images, *args)
        else:
            result = run(["qemu-img", *args], check=False, cwd=node_images)
        assert result.returncode == 0, result.stderr
    assert (node_images / "qimg.raw").read_bytes() == (node_images / "qemu-img.raw").read_bytes()
    qemu_img("create", "-q", "-f", "qcow2", node_images / "target.qcow2", "1M")
    node = "driver=throttle,throttle-group=G,file.driver=qcow2,file.file.filename=target.qcow2"
    result = run_qimg(
        node_images, "convert", "--object", OBJECT, "-n", "--target-image-opts", "t.qcow2", node
    )
    assert (result.returncode, result.stderr) == (0, "")
    compared = run(["qemu-img", "compare", "t.qcow2", "target.qcow2"], check=False, cwd=node_images)
    assert compared.returncode == 0, compared.stdout


@pytest.mark.parametrize(
    "properties",
    [
        "id=G,limits.bps-total=1000",
        "id=G,x-bps-total=-1",
        "id=G,x-bps-total=1k",
        "id=G,x-bps-total= 5",
        "id=G,x-bps-total=",
        "id=G,x-bps-total=9223372036854775808",
        "id=G,x-bps-total=0x10",
        "id=G,x-bps-total=+5",
        "id=G,x-bps-total=010",
        "id=G,x-bps-total=1000,x-bps-read=10",
        "id=G,x-iops-size=10",
        "id=G,x-iops-total=1,x-iops-size=4096",
        "id=G,x-bps-total-max-length=4294967296",
        "id=G,x-bps-total-max-length=2",
        "id=G,x-bps-total-max-length=0",
        "id=G,x-bps-total-max=10",
        "id=G,x-bps-total=100,x-bps-total-max=10",
        "id=G,x-bps-total=1000000000000001",
        "id=G,x-bps-total=100,x-bps-total-max=1000,x-bps-total-max-length=1000000000000",
        "id=G,foo=1",
        "x-bps-total=1",
        "id=1G",
        "id=G,limits.bps-total=-1",
        "id=G,limits.bps-total=abc",
        "id=G,limits.foo=1",
        "id=G,limits=1",
        "id=G,limits.bps-total-max-length=4294967296",
        "help",
        "id=G,help",
    ],
)
def test_throttle_group_object_as_qemu_img(tmp_path: Path, properties: str):
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    assert_same(tmp_path, "info", "--object", f"throttle-group,{properties}", "r.raw")


def test_throttle_group_ids_shared_with_secrets_and_dropped_after_the_command(tmp_path: Path):
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    for first, second in [
        ("secret,id=G,data=x", "throttle-group,id=G"),
        ("throttle-group,id=G", "secret,id=G,data=x"),
        ("throttle-group,id=G", "throttle-group,id=G"),
    ]:
        result = assert_same(tmp_path, "info", "--object", first, "--object", second, "r.raw")
        assert "duplicate property 'G'" in result.stderr
    assert not throttle.has_group("G")  # qimg.main ran in this process and dropped it


@pytest.mark.parametrize("node", [NODES[0], NODES[3]])
def test_resize_through_throttle_node(node_images: Path, node: str):
    """A filter is resized by resizing its child (as qemu-img does); a shrink still asks
    for --shrink."""
    image = "t.qcow2" if "qcow2" in node else "r.raw"
    for tool in ("qimg", "qemu-img"):
        shutil.copy(node_images / image, node_images / f"{tool}-{image}")
    ours, theirs = (node.replace(image, f"{tool}-{image}") for tool in ("qimg", "qemu-img"))
    for args in (["2M"], ["1M"], ["--shrink", "1M"]):
        mine = run_qimg(node_images, "resize", "--object", OBJECT, "--image-opts", ours, *args)
        real = run(
            ["qemu-img", "resize", "--object", OBJECT, "--image-opts", theirs, *args],
            check=False,
            cwd=node_images,
        )
        assert (mine.returncode, mine.stdout, mine.stderr) == (
            real.returncode,
            real.stdout,
            real.stderr,
        )
        sizes = {(node_images / f"{tool}-{image}").stat().st_size for tool in ("qimg", "qemu-img")}
        assert len(sizes) == 1, args
