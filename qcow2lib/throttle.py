"""Rate limits: qemu-img's -r, QEMU's throttle groups and its throttle filter node.

QEMU limits I/O in two ways, and qimg follows each where QEMU uses it:

- `RateLimiter`, a block job's speed (`commit -r`): time passes in slices of 100 ms, each
  with a quota of bytes. The copy runs ahead while the slice's quota lasts; a chunk that
  spends it makes the copy sleep until the slice, stretched to cover the excess, ends.
- `ThrottleGroup`, leaky buckets (bytes and operations per second, in total, read or
  write, with optional bursts), as QEMU's throttle-group object. A request waits until
  every bucket it fills has leaked down to its allowance (a tenth of a second's worth,
  or the burst), then is counted. `convert -r` puts a bps-write group on the target, as
  qemu-img does; the throttle node (`ThrottleDevice`, driver "throttle") puts a named
  group above any block device.

Both take an injectable clock (nanoseconds) and sleep (seconds), so the schedule can be
checked exactly without timing anything.
"""

from __future__ import annotations

import threading
import time

from .blockdev import BlockDevice, FilterDevice
from .errors import InvalidArgumentError, UnsupportedFeatureError
from .hostfile import HostFileFilter
from .records import field, record

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TypeAlias

NS_PER_SECOND = 1_000_000_000
SLICE_NS = 100_000_000  # a block job's time slice (QEMU's BLOCK_JOB_SLICE_TIME)
THROTTLE_VALUE_MAX = 1_000_000_000_000_000  # the largest rate or burst a group accepts
BURST_LENGTH_MAX = (1 << 32) - 1  # seconds a burst may last (C's UINT_MAX)
# The buckets of a group, in QEMU's order: bytes, then operations; total, read, write.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
# Every limit a group takes: NAME (the average rate), NAME-max (the burst rate),
# NAME-max-length (the burst's length in seconds) for each bucket, and iops-size.
LIMITS = tuple(
    f"{bucket}{suffix}" for bucket in BUCKETS for suffix in ("", "-max", "-max-length")
) + ("iops-size",)

Clock: TypeAlias = "Callable[[], int]"
Sleep: TypeAlias = "Callable[[float], None]"


class RateLimiter:
    """A block job's speed limit in bytes per second (0: unlimited), in 100 ms slices."""

    def __init__(
        self,
        bytes_per_second: int,
        *,
        slice_ns: int = SLICE_NS,
        clock: Clock = time.monotonic_ns,
        sleep: Sleep = time.sleep,
    ):
        if bytes_per_second < 0:
            raise InvalidArgumentError(f"rate limit {bytes_per_second} is negative")
        self.slice_ns = slice_ns
        # the bytes one slice lets through (at least one, however slow the rate)
        self.slice_quota = (
            max(int(bytes_per_second * slice_ns / NS_PER_SECOND), 1) if bytes_per_second else 0
        )
        self.clock = clock
        self.sleep = sleep
        self.slice_start = 0
        self.slice_end = -1  # no slice yet: the first chunk starts one
        self.dispatched = 0
        self._lock = threading.Lock()

    def delay_ns(self, length: int) -> int:
        """Count `length` bytes just copied; the nanoseconds to wait before the next chunk."""
        if not self.slice_quota:
            return 0
        with self._lock:
            now = self.clock()
            if self.slice_end < now:  # the last (perhaps stretched) slice is over
                self.slice_start, self.slice_end = now, now + self.slice_ns
                self.dispatched = 0
            self.dispatched += length
            if self.dispatched < self.slice_quota:
                return 0
            slices = self.dispatched / self.slice_quota
            self.slice_end = self.slice_start + int(slices * self.slice_ns)
            return self.slice_end - now

    def account(self, length: int) -> None:
        """Count `length` bytes just copied, and sleep as long as the rate asks."""
        delay = self.delay_ns(length)
        if delay > 0:
            self.sleep(delay / NS_PER_SECOND)


@record
class _Bucket:
    """One leaky bucket: `level` units poured in and not yet leaked at `avg` per second;
    `burst_level` the same at the burst rate `max`, for bursts longer than a second."""

    avg: int = 0
    max: int = 0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, elapsed_ns: int) -> None:
        self.level = max(self.level - self.avg * elapsed_ns / NS_PER_SECOND, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * elapsed_ns / NS_PER_SECOND, 0.0)

    def wait_ns(self) -> int:
        """How long a request must wait before this bucket lets it through."""
        if not self.avg:
            return 0
        if self.max:  # all I/O at the burst rate first, then the average
            allowance = float(self.max * self.burst_length)
            burst_allowance = self.max / 10
        else:  # without a burst rate, a tenth of a second's worth may go at once
            allowance = self.avg / 10
            burst_allowance = 0.0
        extra = self.level - allowance
        if extra > 0:
            return int(extra * NS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_allowance
            if extra > 0:
                return int(extra * NS_PER_SECOND / self.max)
        return 0

    def pour(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units


def check_limits(limits: Mapping[str, int]) -> None:
    """A group's limits as QEMU validates them (InvalidArgumentError with its message)."""
    for name, value in limits.items():
        if name not in LIMITS:
            raise InvalidArgumentError(f"Parameter '{name}' is unexpected")
        if name.endswith("-max-length") and not 0 <= value <= BURST_LENGTH_MAX:
            raise InvalidArgumentError(f"{name} value must be in the range [0, {BURST_LENGTH_MAX}]")

    def get(name: str, default: int = 0) -> int:
        return limits.get(name, default)

    for kind in ("bps", "iops"):
        for suffix in ("", "-max"):
            if get(f"{kind}-total{suffix}") and (
                get(f"{kind}-read{suffix}") or get(f"{kind}-write{suffix}")
            ):
                raise InvalidArgumentError(
                    "bps/iops/max total values and read/write values "
                    "cannot be used at the same time"
                )
    if get("iops-size") and not any(get(f"iops-{kind}") for kind in ("total", "read", "write")):
        raise InvalidArgumentError("iops size requires an iops value to be set")
    for bucket in BUCKETS:
        avg, burst, length = get(bucket), get(f"{bucket}-max"), get(f"{bucket}-max-length", 1)
        if not (0 <= avg <= THROTTLE_VALUE_MAX and 0 <= burst <= THROTTLE_VALUE_MAX):
            raise InvalidArgumentError(
                f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
            )
        if not length:
            raise InvalidArgumentError("the burst length cannot be 0")
        if length > 1 and not burst:
            raise InvalidArgumentError("burst length set without burst rate")
        if burst and length > THROTTLE_VALUE_MAX // burst:
            raise InvalidArgumentError("burst length too high for this burst rate")
        if burst and not avg:
            raise InvalidArgumentError("bps_max/iops_max require corresponding bps/iops values")
        if burst and burst < avg:
            raise InvalidArgumentError("bps_max/iops_max cannot be lower than bps/iops")


class ThrottleGroup:
    """QEMU's throttle group: leaky buckets shared by every node (and direction) using it.

    `limits` maps names of LIMITS to values (missing ones: no limit); they are checked
    as QEMU checks them. Requests of one direction are served in turn, as QEMU queues
    them: each waits (sleeps) until the buckets it fills allow it, then is counted.
    """

    def __init__(
        self,
        limits: Mapping[str, int] | None = None,
        *,
        clock: Clock = time.monotonic_ns,
        sleep: Sleep = time.sleep,
    ):
        limits = dict(limits or {})
        check_limits(limits)
        self.limits = limits
        self.buckets = {
            name: _Bucket(
                limits.get(name, 0),
                limits.get(f"{name}-max", 0),
                limits.get(f"{name}-max-length", 1),
            )
            for name in BUCKETS
        }
        self.op_size = limits.get("iops-size", 0)
        self.clock = clock
        self.sleep = sleep
        self.previous_leak = clock()
        self._state = threading.Lock()
        self._turns = (threading.Lock(), threading.Lock())  # reads, writes

    @classmethod
    def write_rate(
        cls, bytes_per_second: int, *, clock: Clock = time.monotonic_ns, sleep: Sleep = time.sleep
    ) -> ThrottleGroup:
        """A group limiting writes to `bytes_per_second`, any rate taken as it is (as
        qemu-img's -r sets it, past the limits a throttle-group object accepts)."""
        group = cls(clock=clock, sleep=sleep)
        group.buckets["bps-write"].avg = bytes_per_second
        return group

    @property
    def enabled(self) -> bool:
        return any(bucket.avg for bucket in self.buckets.values())

    def _wait_ns(self, is_write: bool) -> int:
        with self._state:
            now = self.clock()
            elapsed, self.previous_leak = now - self.previous_leak, now
            if elapsed > 0:
                for bucket in self.buckets.values():
                    bucket.leak(elapsed)
            kind = "write" if is_write else "read"
            names = ("bps-total", "iops-total", f"bps-{kind}", f"iops-{kind}")
            return max(self.buckets[name].wait_ns() for name in names)

    def _pour(self, is_write: bool, length: int) -> None:
        units = length / self.op_size if self.op_size and length > self.op_size else 1.0
        kind = "write" if is_write else "read"
        with self._state:
            for name in ("bps-total", f"bps-{kind}"):
                self.buckets[name].pour(length)
            for name in ("iops-total", f"iops-{kind}"):
                self.buckets[name].pour(units)

    def intercept(self, length: int, is_write: bool) -> None:
        """Before a request of `length` bytes: wait for its turn and its allowance."""
        if not self.enabled:
            return
        with self._turns[is_write]:
            wait = self._wait_ns(is_write)
            if wait > 0:
                self.sleep(wait / NS_PER_SECOND)
            self._pour(is_write, length)


# The groups --object throttle-group defined, by id: throttle nodes name theirs.
_GROUPS: dict[str, ThrottleGroup] = {}


def register_group(name: str, group: ThrottleGroup) -> None:
    """Make `group` known as `name` to throttle nodes opened later."""
    if name in _GROUPS:
        raise InvalidArgumentError("A group with this name already exists")
    _GROUPS[name] = group


def unregister_group(name: str) -> None:
    _GROUPS.pop(name, None)


def has_group(name: str) -> bool:
    return name in _GROUPS


def find_group(name: str) -> ThrottleGroup:
    if name not in _GROUPS:
        raise InvalidArgumentError(f"Throttle group '{name}' does not exist")
    return _GROUPS[name]


@record
class ThrottleTarget:
    """A throttle node to open: its group's name and its child's options (flattened).
    `beneath`: the node is an image's file (file.driver=throttle), not the top node."""

    name: str
    group: str
    child: dict[str, str] = field(default_factory=dict)
    beneath: bool = False

    def display_name(self, format_name: str | None = None) -> str:
        """QEMU's json: name of the node (the group, the driver, the child's options), or
        with `format_name` that of the image of that format above it."""
        from .qobject import qemu_json_compact

        tree = self._tree()
        if format_name is not None:
            tree = {"driver": format_name, "file": tree}
        return "json:" + qemu_json_compact(tree)

    def _tree(self) -> dict:
        from .qobject import node_tree, spelled_node

        child = node_tree(self.child)
        if self.name.startswith("json:"):  # its numbers and booleans stay such
            import json

            from .chain import json_text_tree

            given: object = json_text_tree(self.name)
            if self.beneath:  # the image's file is this node
                given = given.get("file") if isinstance(given, dict) else None
            given = given.get("file") if isinstance(given, dict) else None
            if isinstance(given, dict) and all("." not in key for key in given):
                child = spelled_node(json.loads(json.dumps(given)))
        return {"throttle-group": self.group, "driver": "throttle", "file": child}

    def host_filename(self) -> str:
        """The host file beneath the node when it sits beneath an image format."""
        child = self.child
        if child.get("driver", "file") not in ("file", "host_device") or "filename" not in child:
            raise UnsupportedFeatureError(
                "qimg puts throttle beneath an image format only above a host file"
            )
        return child["filename"]


def target_from_options(
    name: str, options: Mapping[str, str], beneath: bool = False
) -> ThrottleTarget:
    """A throttle node given as options (json: or --image-opts, flattened, without
    "driver"): throttle-group, and the child as file.* options. beneath: the node is
    an image's file."""
    child = {key[5:]: value for key, value in options.items() if key.startswith("file.")}
    for key in options:
        if key != "throttle-group" and not key.startswith("file."):
            if key == "file":  # a reference to another node, which qimg has none of
                value = options[key]
                raise InvalidArgumentError(f"Cannot find device='{value}' nor node-name='{value}'")
            raise InvalidArgumentError(
                f"Block format 'throttle' does not support the option '{key}'"
            )
    if not child:
        raise InvalidArgumentError('A block device must be specified for "file"')
    group = options.get("throttle-group")
    if group is None:
        raise InvalidArgumentError("Please specify a throttle group")
    find_group(group)  # refused now if it does not exist, as QEMU refuses it
    return ThrottleTarget(name, group, child, beneath)


class ThrottleDevice(FilterDevice):
    """QEMU's throttle filter: `child`'s content, each read, write, zero write and
    discard first waiting for `group`'s allowance (flushes and block status pass)."""

    format = "throttle"

    def __init__(self, child: BlockDevice, group: ThrottleGroup, filename: str):
        super().__init__(child, filename)
        self.group = group

    def intercept(self, kind: str, offset: int, length: int) -> None:
        if kind not in ("flush", "block-status"):
            self.group.intercept(length, kind != "read")


class ThrottleFile(HostFileFilter):
    """A host file seen through a throttle node beneath an image: HostFile's interface,
    reads, writes and hole punches waiting for the group's allowance first."""

    def __init__(self, file, group: ThrottleGroup, node_name: str):
        super().__init__(file)
        self.group = group
        self.node_name = node_name  # QEMU's name of the node, which map shows

    def pread(self, length: int, offset: int) -> bytes:
        self.group.intercept(length, False)
        return self._file.pread(length, offset)

    def readinto(self, buf, offset: int) -> None:
        self.group.intercept(memoryview(buf).nbytes, False)
        self._file.readinto(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self.group.intercept(memoryview(data).nbytes, True)
        self._file.pwrite(data, offset)

    def pwritev(self, buffers: list, offset: int) -> None:
        self.group.intercept(sum(memoryview(b).nbytes for b in buffers), True)
        self._file.pwritev(buffers, offset)

    def punch_hole(self, offset: int, length: int) -> bool:
        self.group.intercept(length, True)
        return self._file.punch_hole(offset, length)


def open_throttle_file(target: ThrottleTarget, writable: bool) -> ThrottleFile:
    """The host file beneath a throttle node that an image format sits on."""
    from .hostfile import open_host_file

    group = find_group(target.group)
    host = open_host_file(target.host_filename(), writable=writable)
    return ThrottleFile(host, group, target.display_name())


def open_throttle(target: ThrottleTarget, mode: str, **kwargs) -> ThrottleDevice:
    """The throttle node of `target` above its child, opened as open_image opens it."""
    from .chain import open_image, options_image_target

    group = find_group(target.group)
    child_options = dict(target.child)
    if "driver" not in child_options and "filename" in child_options:
        child_options["driver"] = "file"  # a bare filename: the file protocol, not probed
    child_target, child_fmt = options_image_target(child_options, target.name)
    child = open_image(child_target, mode, child_fmt, **kwargs)
    return ThrottleDevice(child, group, target.display_name())
