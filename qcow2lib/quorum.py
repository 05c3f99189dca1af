"""QEMU's quorum driver beneath an image: several copies of one file, read by vote.

json:{"driver": "qcow2", "file": {"driver": "quorum", "vote-threshold": N, "children":
[{"driver": "file", "filename": A}, ...]}}. Every read is made from every child; the
content most children agree on is returned if at least `vote-threshold` of them do, else
the read fails with EIO (as QEMU's quorum, which also reports the disagreement as an
event qimg has no monitor for). Writes and flushes go to every child. The image above
lies in no one directory, so relative backing names cannot be resolved through it.
"""

from __future__ import annotations

import errno
import os

from .blockdev import BlockDevice, Extent
from .errors import InvalidArgumentError, Qcow2Error, Qcow2IOError, UnsupportedFeatureError
from .hostfile import open_host_file
from .records import field, record

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

_BOOLS = {  # QEMU's spellings of a boolean option
    "on": True,
    "yes": True,
    "true": True,
    "y": True,
    "off": False,
    "no": False,
    "false": False,
    "n": False,
}


@record
class QuorumTarget:
    """The children's files, the vote threshold and the read pattern of a quorum node."""

    name: str
    children: list[str]
    threshold: int
    fifo: bool = False  # read-pattern=fifo: the first child that answers, no vote
    options: dict = field(default_factory=dict)  # its own options, as given (typed if JSON)
    drivers: list[str] = field(default_factory=list)  # the children's: file or host_device
    # A node of its own (driver=quorum): each child's options, flattened (any node);
    # beneath an image format the children are host files (`children`).
    child_options: list[dict[str, str]] = field(default_factory=list)

    def display_name(self, format_name: str | None = None) -> str:
        """QEMU's json: name of the node (or, with `format_name`, of the image of that
        format above it): its options as given, its children's and its driver, in QDict
        order."""
        from .qobject import node_tree, qemu_json_compact

        if self.child_options:
            children = [node_tree(dict(options)) for options in self.child_options]
        else:
            drivers = self.drivers or ["file"] * len(self.children)
            children = [
                {"driver": driver, "filename": filename}
                for driver, filename in zip(drivers, self.children)
            ]
        node = {**self.options, "children": children, "driver": "quorum"}
        tree = node if format_name is None else {"driver": format_name, "file": node}
        return "json:" + qemu_json_compact(tree)


_RUNTIME_OPTIONS = ("vote-threshold", "read-pattern", "rewrite-corrupted", "blkverify")


def target_from_options(name: str, options: dict[str, str], beneath: bool = True) -> QuorumTarget:
    """Options of the node without "driver": vote-threshold, children.N.driver (file or
    host_device) and children.N.filename, read-pattern, rewrite-corrupted, blkverify;
    refused in QEMU's order and words (the children array, the counts, the options'
    types, the threshold, the read pattern, then each child, then unknown options)."""
    children: dict[str, dict[str, str]] = {}
    runtime: dict[str, str] = {}
    unknown = []
    for key, value in options.items():
        if key.startswith("children."):
            index, _, sub = key[len("children.") :].partition(".")
            children.setdefault(index, {})[sub] = value
        elif key in _RUNTIME_OPTIONS:
            runtime[key] = value
        else:
            unknown.append(key)
    if set(children) != {str(index) for index in range(len(children))}:
        raise InvalidArgumentError("Option children is not a valid array")
    if not children:
        raise InvalidArgumentError("Number of provided children must be 1 or more")
    threshold_text = runtime.get("vote-threshold", "0")
    if not threshold_text.isdigit():
        raise InvalidArgumentError("Parameter 'vote-threshold' expects a number")
    flags = {}
    for key in ("rewrite-corrupted", "blkverify"):
        value = runtime.get(key, "off")
        if value not in _BOOLS:
            raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
        flags[key] = _BOOLS[value]
    threshold = int(threshold_text)
    if threshold < 1:
        raise InvalidArgumentError("Parameter 'vote-threshold' expects a value >= 1")
    if threshold > len(children):
        raise InvalidArgumentError("threshold may not exceed children count")
    pattern = runtime.get("read-pattern", "quorum")
    if pattern not in ("quorum", "fifo"):
        raise InvalidArgumentError("Please set read-pattern as fifo or quorum")
    if pattern == "quorum":  # (fifo reads ignore both)
        if flags["blkverify"] and (len(children) != 2 or threshold != 2):
            raise InvalidArgumentError(
                "blkverify=on can only be set if there are exactly two files and "
                "vote-threshold is 2"
            )
        if flags["rewrite-corrupted"] and flags["blkverify"]:
            raise InvalidArgumentError("rewrite-corrupted=on cannot be used with blkverify=on")
        for key, on in flags.items():
            if on:
                raise UnsupportedFeatureError(f"qimg's quorum does not support {key}=on")
    files = []
    ordered = [children[str(position)] for position in range(len(children))]
    for child in ordered:
        if "driver" not in child:  # (QEMU probes no format for a quorum's child)
            raise InvalidArgumentError("Must specify either driver or file")
        if child["driver"] in ("file", "host_device") and "filename" not in child:
            raise InvalidArgumentError(f"The '{child['driver']}' block driver requires a file name")
        if beneath:
            if child["driver"] not in ("file", "host_device") or set(child) - {
                "driver",
                "filename",
            }:
                raise UnsupportedFeatureError(
                    "qimg's quorum beneath an image takes host files as children (filename)"
                )
            files.append(child["filename"])
    if unknown:
        raise InvalidArgumentError(
            f"Block format 'quorum' does not support the option '{unknown[0]}'"
        )
    drivers = [child["driver"] for child in ordered]
    options = _given_options(name, runtime, beneath)
    child_options = [] if beneath else ordered
    return QuorumTarget(name, files, threshold, pattern == "fifo", options, drivers, child_options)


def _given_options(name: str, runtime: dict[str, str], beneath: bool) -> dict:
    """The node's own options for its json: name: from a json: image name with their
    JSON types (QEMU prints 1 where the name said 1, "1" where options said "1")."""
    if name.startswith("json:"):
        from .chain import json_text_tree

        try:
            tree = json_text_tree(name)
            node = tree.get("file") if beneath else tree
        except InvalidArgumentError:
            node = None
        if isinstance(node, dict) and node.get("driver") == "quorum":
            return {key: value for key, value in node.items() if key in runtime}
    return dict(runtime)


def vote(versions: list[bytes], threshold: int) -> bytes:
    """The version most children returned, if at least `threshold` did; else EIO."""
    counts: dict[bytes, int] = {}
    for version in versions:
        counts[version] = counts.get(version, 0) + 1
    # QEMU keeps the newest version first: of versions with equal votes, the one a later
    # child returned wins
    winner = max(reversed(counts), key=lambda version: counts[version])
    if counts[winner] < threshold:  # no version has enough votes
        raise Qcow2IOError(errno.EIO, os.strerror(errno.EIO))
    return winner


class QuorumFile:
    """HostFile's interface over the children's host files."""

    path = None  # no one directory holds it

    def __init__(self, target: QuorumTarget, writable: bool):
        self.threshold = target.threshold
        self.fifo = target.fifo
        self.writable = writable
        self.no_flush = False
        self.children = []
        try:
            for path in target.children:
                self.children.append(open_host_file(path, writable=writable))
        except BaseException:
            self.close()
            raise
        sizes = {child.size() for child in self.children}
        if len(sizes) > 1:
            self.close()
            raise Qcow2IOError(errno.EIO, "quorum children differ in size")
        self.is_device = False

    def _read(self, length: int, offset: int) -> bytes:
        if not self.fifo:
            return self._vote([child.pread(length, offset) for child in self.children])
        for child in self.children[:-1]:  # the first child that answers
            try:
                return child.pread(length, offset)
            except Qcow2IOError:
                continue
        return self.children[-1].pread(length, offset)

    def _vote(self, versions: list[bytes]) -> bytes:
        return vote(versions, self.threshold)

    def size(self) -> int:
        return self.children[0].size()

    def allocated_bytes(self) -> int:
        """The space of all copies, as qemu-img counts a quorum's disk size."""
        return sum(child.allocated_bytes() for child in self.children)

    def pread(self, length: int, offset: int) -> bytes:
        return self._read(length, offset)

    def readinto(self, buf, offset: int) -> None:
        buf[:] = self.pread(len(buf), offset)

    def pwrite(self, data, offset: int) -> None:
        for child in self.children:
            child.pwrite(data, offset)

    def pwritev(self, buffers: list, offset: int) -> None:
        for child in self.children:
            child.pwritev(buffers, offset)

    def flush(self) -> None:
        if not self.no_flush:
            for child in self.children:
                child.flush()

    def data_run(self, offset: int, end: int) -> tuple[bool, int]:
        return True, end

    def punch_hole(self, offset: int, length: int) -> bool:
        return False

    def truncate(self, length: int) -> None:
        for child in self.children:
            child.truncate(length)

    def allocate(self, offset: int, length: int) -> None:
        for child in self.children:
            child.allocate(offset, length)

    def lock_for_use(self, force_share: bool = False) -> None:
        for child in self.children:
            child.lock_for_use(force_share)

    def close(self) -> None:
        for child in self.children:
            child.close()
        self.children = []


class QuorumDevice(BlockDevice):
    """A quorum node of its own (driver=quorum): its children are any devices; reads
    vote (or, read-pattern=fifo, take the first child that answers), writes, zero writes
    and flushes go to every child. Block status is QEMU's: zero where every child says
    so, data elsewhere, never a host offset."""

    format = "quorum"

    def __init__(self, target: QuorumTarget, children: list[BlockDevice]):
        self.children = children
        self.threshold = target.threshold
        self.fifo = target.fifo
        self.filename = target.display_name()
        self.read_only = any(child.read_only for child in children)
        if len({child.size for child in children}) > 1:
            raise Qcow2IOError(errno.EIO, "Could not get the size: Input/output error")
        self.size = children[0].size

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        if self.fifo:
            for child in self.children[:-1]:
                try:
                    return child.readinto(offset, view)
                except Qcow2IOError:
                    continue
            return self.children[-1].readinto(offset, view)
        versions = [child.read(offset, len(view)) for child in self.children]
        view[:] = vote(versions, self.threshold)
        return len(view)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        for child in self.children:
            child.write(offset, view)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        for child in self.children:
            child.write_zeroes(offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        """QEMU's quorum passes no discard on: the request does nothing."""
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        for child in self.children:
            child.flush()

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        end = offset + length
        streams = [child.iter_extents(offset, length) for child in self.children]
        current = [next(stream) for stream in streams]
        batch: list[Extent] = []
        while offset < end:
            # QEMU's rule: data as far as the farthest copy that says data, else zero as
            # far as the nearest change of any copy
            data_ends = [e.offset + e.length for e in current if not e.is_zero]
            zero = not data_ends
            stop = min(e.offset + e.length for e in current) if zero else max(data_ends)
            batch.append(Extent(offset, stop - offset, not zero, zero, 0))
            offset = stop
            for position, stream in enumerate(streams):
                while (
                    offset < end and current[position].offset + current[position].length <= offset
                ):
                    current[position] = next(stream)
            if len(batch) >= 4096:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        for child in self.children:
            try:
                child.close()
            except Qcow2Error as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def open_quorum(target: QuorumTarget, mode: str, **kwargs) -> QuorumDevice:
    """The quorum node of `target` above its children, each opened as open_image opens
    a node given by options."""
    from .chain import open_image, options_image_target

    children: list[BlockDevice] = []
    try:
        for options in target.child_options:
            child_target, child_fmt = options_image_target(dict(options), target.name)
            children.append(open_image(child_target, mode, child_fmt, **kwargs))
        return QuorumDevice(target, children)
    except BaseException:
        for child in children:
            child.close()
        raise
