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

from .errors import InvalidArgumentError, Qcow2IOError, UnsupportedFeatureError
from .hostfile import open_host_file
from .records import record

_BOOLS = {"on": True, "off": False}


@record
class QuorumTarget:
    """The children's files and the vote threshold of a quorum node."""

    name: str
    children: list[str]
    threshold: int


def target_from_options(name: str, options: dict[str, str]) -> QuorumTarget:
    """Options of the node without "driver": vote-threshold, children.N.driver (file or
    host_device) and children.N.filename, read-pattern, rewrite-corrupted, blkverify."""
    children: dict[int, dict[str, str]] = {}
    threshold = None
    for key, value in options.items():
        if key.startswith("children."):
            index, _, sub = key[len("children.") :].partition(".")
            if not index.isdigit() or not sub:
                raise InvalidArgumentError(f"Invalid parameter '{key}'")
            children.setdefault(int(index), {})[sub] = value
        elif key == "vote-threshold":
            if not value.isdigit():
                raise InvalidArgumentError("Parameter 'vote-threshold' expects a number")
            threshold = int(value)
        elif key == "read-pattern":
            if value not in ("quorum", "fifo"):
                raise InvalidArgumentError(
                    f"Parameter 'read-pattern' does not accept value '{value}'"
                )
        elif key in ("rewrite-corrupted", "blkverify"):
            if value not in _BOOLS:
                raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
            if _BOOLS[value]:
                raise UnsupportedFeatureError(f"qimg's quorum does not support {key}=on")
        else:
            raise InvalidArgumentError(
                f"Block protocol 'quorum' doesn't support the option '{key}'"
            )
    if threshold is None:
        raise InvalidArgumentError("Parameter 'vote-threshold' is missing")
    files = []
    for child_index in sorted(children):
        child = children[child_index]
        if child.get("driver", "file") not in ("file", "host_device") or set(child) - {
            "driver",
            "filename",
        }:
            raise UnsupportedFeatureError("qimg's quorum children must be plain files (filename)")
        if "filename" not in child:
            raise InvalidArgumentError('A block device must be specified for "children"')
        files.append(child["filename"])
    if not files:
        raise InvalidArgumentError("Number of provided children must be 1 or more")
    if threshold < 1:
        raise InvalidArgumentError("Parameter 'vote-threshold' expects a value >= 1")
    if threshold > len(files):
        raise InvalidArgumentError("threshold may not exceed children count")
    return QuorumTarget(name, files, threshold)


class QuorumFile:
    """HostFile's interface over the children's host files."""

    path = None  # no one directory holds it

    def __init__(self, target: QuorumTarget, writable: bool):
        self.threshold = target.threshold
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

    def _vote(self, versions: list[bytes]) -> bytes:
        counts: dict[bytes, int] = {}
        for version in versions:
            counts[version] = counts.get(version, 0) + 1
        # QEMU keeps the newest version first: of versions with equal votes, the one a
        # later child returned wins
        winner = max(reversed(counts), key=lambda version: counts[version])
        if counts[winner] < self.threshold:  # no version has enough votes
            raise Qcow2IOError(errno.EIO, os.strerror(errno.EIO))
        return winner

    def size(self) -> int:
        return self.children[0].size()

    def allocated_bytes(self) -> int:
        """The space of all copies, as qemu-img counts a quorum's disk size."""
        return sum(child.allocated_bytes() for child in self.children)

    def pread(self, length: int, offset: int) -> bytes:
        return self._vote([child.pread(length, offset) for child in self.children])

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
