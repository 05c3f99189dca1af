"""Consistency check and repair with QEMU's verdicts (`qemu-img check [-r leaks|all]`).

The checker does what QEMU 7.2 does, in the same order, and reports the same problem
lines, counts and exit codes:

* it reads the snapshot table tolerantly (broken entries are counted, not raised),
* it builds an in-memory refcount table (IMRT) from every reference the metadata
  makes (header, L1/L2 tables of the active image and of every snapshot, data and
  compressed clusters, snapshot table, refcount table and blocks, encryption header,
  bitmaps), checking each L1/L2 entry on the way (reserved bits, alignment, references
  past the end of the file, extended L2 bitmaps),
* it compares the IMRT with the refcounts on disk: too high is a leak, too low a
  corruption, a referenced cluster with refcount 0 (or a broken refcount block) asks for
  the whole refcount structure to be rebuilt,
* it checks the COPIED flags of active L1 and L2 entries against the refcounts.

Repair "leaks" lowers leaked refcounts; repair "all" also raises refcounts that are too
low, rewrites COPIED flags, zeroes misaligned preallocated zero clusters, rebuilds the
refcount structure where it is broken (QEMU's algorithm and allocation order, so the
repaired file is laid out as qemu-img would lay it out) and rewrites an incomplete
snapshot table. As qemu-img does, a check that repaired something runs again without
repairing and reports that second run with the first run's fixed counts.

Everything is read from the file directly and tolerantly: a bad entry is counted and
reported, never raised. Only an unreadable file raises.
"""

from __future__ import annotations

import errno
import os
from array import array

from .. import structs as S
from ..cache import decode_be64, keep_freed_memory
from ..errors import CorruptImageError, Qcow2Error, ReadOnlyError
from ..header import Header
from .compare import _Compare
from .repair import _RebuildError, _Repair
from .report import (
    FIX_ERRORS,
    FIX_LEAKS,
    CheckReport,
    _Abort,
    _Result,
    format_check_human,
    format_check_json,
    format_check_stderr,
)
from .target import _INT64_MAX, _INT_MAX, _RefcountArray, _Target
from ..runs import RunFinder
from .walk import _Replay, _Walk

__all__ = [
    "FIX_ERRORS",
    "FIX_LEAKS",
    "CheckReport",
    "check_image",
    "check_path",
    "format_check_human",
    "format_check_json",
    "format_check_stderr",
    "repair_dirty_image",
]

_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


class _Check(_Walk, _Compare, _Repair):
    """One run of qcow2_co_check_locked with one repair mode."""

    def __init__(self, t: _Target, fix: int):
        self.t = t
        self.fix = fix
        self.out = t.out
        self.res = _Result()
        self.imrt = _RefcountArray(t.order)
        self.nb_clusters = 0
        self.rebuild = False
        # Repeated L1 entries (see _Replay): the clusters counted while recording one, and
        # the repeats whose increments are deferred. `spent` bounds what the deferred
        # increments (and those made since) add to any cluster, `bound` the largest count
        # before them: while bound + spent stays within the refcount maximum no increment
        # can overflow, so applying them late changes nothing QEMU would print.
        self._recorded: list[int] | None = None
        self._overflowed = False
        self._pending: list[_Replay] = []
        self._spent = 0
        self._bound = 0
        self._deferring = True
        # Snapshots sharing one L1 table (see calculate): every inc() counts `_times` paths.
        self._times = 1
        # Snapshots sharing L2 tables (see _defer_table): while the snapshots are walked with
        # sharing, the plain tables met are counted up here (uses of each, and its runs)
        # and their clusters counted once per distinct run at the end.
        self._sharing_tables = False
        self._table_uses: dict[int, int] = {}
        self._table_runs: dict[int, list] = {}
        self._table_runs_held = 0  # runs in _table_runs
        self._tables_deferred = 0  # tables put aside in this walk of the snapshots
        # The test for an L2 table without unusual entries (mask, [(byte of an entry,
        # the values it may have)]), and the runs of the tables last found (_plain_runs).
        self._plain_mask: tuple[int | None, list[tuple[int, bytes]]] = (None, [])
        self._plain_cache: dict[tuple, list | None] = {}
        self._plain_cached = 0  # tables and runs in _plain_cache
        self._run_finder = RunFinder()
        # Snapshots' tables that are near copies of one another (_near_copy_runs): the
        # index among its L1 table's entries of the entry being walked (None in the
        # active walk), and the plain table last met at each.
        self._l1_slot: int | None = None
        self._near_tables: dict = {}  # slot -> walk._NearTable
        self._overflows = 0
        # The non-zero entries of the L1 table checked last: (offset, size), t.writes
        # when read, entries, those repeated.
        self._l1_entries: tuple | None = None

    # --- qcow2_check_refcounts ----------------------------------------------------------
    def check_refcounts(self) -> _Result:
        t = self.t
        fix = self.fix
        self.nb_clusters = -(-t.file_size() // t.cs)
        if self.nb_clusters > _INT_MAX:
            self.res.check_errors += 1
            raise _Abort(errno.EFBIG)
        self.res.total_clusters = -(-(t.hdr.size // 512 * 512) // t.cs)
        self.calculate(fix)
        pre_compare = self.res.copy()
        highest = self.compare(0)
        if self.rebuild and fix & FIX_ERRORS:
            old = self.res.copy()
            fresh_leaks = 0
            self.out.append("Rebuilding refcount structure")
            try:
                self.rebuild_structure()
            except _RebuildError as exc:
                self.res.check_errors += 1
                self.out.append(f"{t.prog}: {exc.message}: {os.strerror(exc.errno)}")
                raise _Abort(exc.errno) from exc
            self.res.corruptions = 0
            self.res.leaks = 0
            self.rebuild = False
            self.imrt.clear()
            self.calculate(0)
            if fix & FIX_LEAKS:
                saved = self.res
                self.res = _Result()
                highest = self.compare(FIX_LEAKS)
                if self.rebuild:
                    self.out.append("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = self.res.leaks
                self.res = saved
            if self.res.corruptions < old.corruptions:
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions
            if self.res.leaks < old.leaks:
                self.res.leaks_fixed += old.leaks - self.res.leaks
            self.res.leaks += fresh_leaks
        elif fix:
            if self.rebuild:
                self.out.append("ERROR need to rebuild refcount structures")
                self.res.check_errors += 1
                raise _Abort(errno.EIO)
            if self.res.leaks or self.res.corruptions:
                self.res = pre_compare
                highest = self.compare(fix)
        self.check_oflag_copied()
        self.res.image_end_offset = (highest + 1) * t.cs
        return self.res


def _co_check(t: _Target, fix: int) -> tuple[_Result, int]:
    """qcow2_co_check_locked: (result, 0) or (result, errno) when the check failed."""
    result = _Result()
    snapshot_res = _Result()
    check = _Check(t, fix)
    try:
        check.read_snapshot_table(snapshot_res)
    except _Abort as exc:
        result.add(snapshot_res, False)
        return result, exc.errno
    try:
        refcount_res = check.check_refcounts()
    except _Abort as exc:
        result.add(check.res, True)
        result.add(snapshot_res, False)
        return result, exc.errno
    result.add(refcount_res, True)
    try:
        check.fix_snapshot_table(snapshot_res)
    except _Abort as exc:
        result.add(snapshot_res, False)
        return result, exc.errno
    result.add(snapshot_res, False)
    if fix and not result.check_errors and not result.corruptions:
        features = t.hdr.incompatible_features
        if t.hdr.version >= 3:
            if features & S.INCOMPAT_DIRTY and not t.keep_dirty:
                t.flush_if_alive()
                features &= ~S.INCOMPAT_DIRTY
            features &= ~S.INCOMPAT_CORRUPT
            if features != t.hdr.incompatible_features:
                t.hdr.incompatible_features = features
                t.write_header_features()
    return result, 0


def _img_check(t: _Target, fix: int, report: CheckReport) -> CheckReport:
    """qemu-img's img_check around the driver's check, and the flush when it closes."""
    try:
        return _img_check_open(t, fix, report)
    finally:
        t.flush_if_alive()


def _img_check_open(t: _Target, fix: int, report: CheckReport) -> CheckReport:
    result, err = _co_check(t, fix)
    if not err and (result.corruptions_fixed or result.leaks_fixed):
        report.repaired = True
        leaks_fixed, corruptions_fixed = result.leaks_fixed, result.corruptions_fixed
        if t.dead:  # the repair met a fatal corruption: QEMU has no driver to check with
            result, err = _Result(), errno.ENOMEDIUM
        else:
            result, err = _co_check(t, 0)
        result.leaks_fixed, result.corruptions_fixed = leaks_fixed, corruptions_fixed
    if err:
        report.failed = True
        report.error = f"Check failed: {os.strerror(err)}"
        if report.repaired:
            report.leaks_fixed, report.corruptions_fixed = (
                result.leaks_fixed,
                result.corruptions_fixed,
            )
        return report
    for name in (
        "check_errors",
        "corruptions",
        "leaks",
        "corruptions_fixed",
        "leaks_fixed",
        "image_end_offset",
        "total_clusters",
        "allocated_clusters",
        "fragmented_clusters",
        "compressed_clusters",
    ):
        setattr(report, name, getattr(result, name))
    if report.check_errors:
        report.error = "Check failed"
    return report


_PROBE_BYTES = 2048  # what QEMU's format probes read of a file (vmdk.PROBE_SIZE)


def _probed(head: bytes) -> str:
    """The format QEMU probes a file starting with `head` as (of those check tells apart)."""
    if head[:4] == S.QCOW_MAGIC.to_bytes(4, "big"):
        return "qcow2"
    from ..vmdk import is_vmdk

    return "vmdk" if is_vmdk(head) else "raw"


def _check_vmdk(filename: str, fix: int, force_share: bool, report: CheckReport) -> CheckReport:
    """QEMU's VMDK check: every allocated grain must start inside the file. It repairs
    nothing, and a bad grain ends the check as a failure (EINVAL)."""
    from ..vmdk import open_vmdk

    if fix:
        report.not_supported = True
        report.error = "This image format does not support checks"
        return report
    try:
        image = open_vmdk(filename, force_share=force_share)
    except Qcow2Error as exc:
        report.failed = True
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        report.error = f"Could not open '{filename}': {reason}"
        return report
    try:
        with image:
            sector = image.first_grain_past_eof()
    except Qcow2Error as exc:
        report.failed = True
        report.error = f"Check failed: {exc}"
        return report
    if sector is not None:
        report.messages.append(f"ERROR: cluster offset for sector {sector} points after EOF")
        report.corruptions = 1
        report.failed = True
        report.error = "Check failed: Invalid argument"
    return report


# --- entry points ------------------------------------------------------------------------


def check_image(image, repair: str | None = None, prog: str = "qemu-img") -> CheckReport:
    """Check (and with repair="leaks"/"all" repair) an open Qcow2Image, as qemu-img check does.

    A repair needs the image opened read-write. The image's caches are written back first
    and reloaded afterwards, so it stays usable.
    """
    if repair not in _REPAIR_MODES:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}"
        )
    fix = _REPAIR_MODES[repair]
    report = CheckReport(filename=image.filename, format=getattr(image, "format", "qcow2"))
    if report.format != "qcow2":
        report.not_supported = True
        report.error = "This image format does not support checks"
        return report
    if fix and image.read_only:
        raise ReadOnlyError(f"repairing '{image.filename}' needs it opened read-write (mode 'r+')")
    with image._lock:
        if not image.read_only:
            image._write_back_all()
        t = _Target(
            image.file, image.header, image.filename, not image.read_only, report.messages, prog
        )
        # The engine keeps the dirty bit set itself while a lazy-refcounts image is open.
        t.keep_dirty = bool(image.lazy_refcounts and not image.read_only)
        try:
            _img_check(t, fix, report)
        finally:
            if fix:
                _reload_engine_state(image)
    return report


def repair_dirty_image(image) -> list[str]:
    """QEMU's repair of a dirty image (lazy refcounts, not closed cleanly) when it is
    opened read-write: one check that fixes errors and leaks, run before anything else
    changes the file, so the repaired layout is QEMU's. Returns the lines QEMU prints
    while doing it; raises CorruptImageError if the image could not be repaired.

    The caller (the engine's open) holds the only reference to `image`, has read its
    header and tables, and writes nothing before this returns."""
    messages: list[str] = []
    t = _Target(image.file, image.header, image.filename, True, messages, "qemu-img")
    try:
        result, err = _co_check(t, FIX_LEAKS | FIX_ERRORS)
    finally:
        t.flush_if_alive()
        _reload_engine_state(image)
    if err or result.check_errors:
        raise CorruptImageError(f"Could not repair dirty image: {os.strerror(err or errno.EIO)}")
    return messages


def _reload_engine_state(image) -> None:
    """The repair wrote to the file behind the engine's back: reload what it caches."""
    hdr = image.header
    size = image.file.size()
    image._host_size = max(getattr(image, "_host_size", 0), size)
    image._last_decompressed = None
    image._prealloc_detected = None
    image._snapshot_table = None  # (a repair may rewrite it in place)
    image.corrupt = bool(hdr.incompatible_features & S.INCOMPAT_CORRUPT)
    image.map.l1 = (
        decode_be64(image.file.pread(hdr.l1_size * 8, hdr.l1_table_offset))
        if hdr.l1_size
        else array("Q")
    )
    image.map.l1_dirty.clear()
    image.map.l2_cache.clear()
    try:
        image.use_refcount_table(hdr.refcount_table_offset, hdr.refcount_table_clusters, size)
    except Qcow2Error:
        pass  # still broken (a check without "all" left it so): the engine will refuse writes


class _CheckModeHeader(Header):
    """The header as QEMU reads it for a check (BDRV_O_CHECK): tables are only checked
    for size and alignment (not against the file size), the snapshot table not at all,
    and a missing refcount table is allowed."""

    def _validate(self, file_size: int) -> None:
        saved = (self.nb_snapshots, self.refcount_table_clusters)
        self.nb_snapshots = 0
        if self.refcount_table_clusters == 0:
            self.refcount_table_clusters = 1
        try:
            super()._validate(file_size)
        finally:
            self.nb_snapshots, self.refcount_table_clusters = saved

    def _validate_table(
        self, name, field_name, offset, count_field, entries, entry_len, max_bytes, file_size
    ) -> None:
        if entries > max_bytes // entry_len:
            raise CorruptImageError(f"{name} too large ({count_field} {entries})")
        if _INT64_MAX - entries * entry_len < offset or offset % self.cluster_size:
            raise CorruptImageError(f"{name} offset invalid ({field_name} {offset})")


def check_path(
    filename: str,
    repair: str | None = None,
    fmt: str | None = None,
    force_share: bool = False,
    prog: str = "qemu-img",
) -> CheckReport:
    """`qemu-img check [-r leaks|all] [-f fmt] [-U] FILE`: open in check mode, check, report.

    Failing to open gives a report with `error` set and exit code 1, as qemu-img does.
    """
    from ..hostfile import HostFile, open_host_file

    if repair not in _REPAIR_MODES:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}"
        )
    fix = _REPAIR_MODES[repair]
    report = CheckReport(filename=filename)
    keep_freed_memory()  # (a walk over every table of the image)
    from ..chain import is_nbd_name

    nbd = is_nbd_name(filename)
    if nbd:  # the image is in an NBD export (opened again below, for the check itself)
        from ..exports.nbd_client import NBDClient, NBDHostFile, parse_nbd_name

        def open_container():
            return NBDHostFile(NBDClient(parse_nbd_name(filename), read_only=not fix))
    else:

        def open_container():
            return HostFile(filename, writable=bool(fix))

    if fmt is None and nbd:
        try:
            probe = open_container()
        except Qcow2Error as exc:
            report.failed = True
            report.error = f"Could not open '{filename}': {exc}"
            return report
        try:
            head = probe.pread(_PROBE_BYTES, 0)
        finally:
            probe.close()
        fmt = _probed(head)
    elif fmt is None:
        try:  # through HostFile, which refuses a FIFO instead of waiting for a writer; opened
            # for writing when repairing, as QEMU opens it (a directory: EISDIR then)
            probe = open_host_file(filename, writable=bool(fix))
            try:
                head = probe.pread(_PROBE_BYTES, 0)
            finally:
                probe.close()
        except Qcow2Error as exc:
            report.failed = True
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            report.error = f"Could not open '{filename}': {reason}"
            return report
        fmt = _probed(head)
    report.format = fmt
    if fmt == "vmdk" and not nbd:
        return _check_vmdk(filename, fix, force_share, report)
    if fmt != "qcow2":
        if fmt not in ("raw", "file", "host_device", "nbd", "luks"):
            report.failed = True
            report.error = f"Unknown driver '{fmt}'"
            return report
        report.not_supported = True
        report.error = "This image format does not support checks"
        return report
    try:
        file = open_container()
    except Qcow2Error as exc:
        report.failed = True
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        report.error = f"Could not open '{filename}': {reason}"
        return report
    try:
        try:
            if hasattr(file, "lock_for_use"):
                file.lock_for_use(force_share)
            size = file.size()
            header = _CheckModeHeader.parse(lambda off, n: file.pread(n, off), size)
            _check_openable(filename, header)
        except Qcow2Error as exc:
            report.failed = True
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if exc.qemu_message is not None:
                message = exc.qemu_message
            report.error = f"Could not open '{filename}': {message}"
            return report
        t = _Target(file, header, filename, bool(fix), report.messages, prog)
        return _img_check(t, fix, report)
    finally:
        file.close()


def _check_openable(filename: str, header: Header) -> None:
    """What else makes QEMU's open fail: a missing external data file or backing file
    (and what qcow2lib refuses to open as one: a FIFO, socket or character device)."""
    from ..errors import Qcow2IOError
    from ..hostfile import refuse_special_file

    if header.incompatible_features & S.INCOMPAT_DATA_FILE:
        if not header.data_file:
            raise CorruptImageError("'data-file' is required for this image")
        # QEMU opens the name as the header has it: a relative one from the working directory.
        if not os.path.exists(header.data_file):
            raise Qcow2IOError(
                errno.ENOENT, f"Could not open '{header.data_file}': No such file or directory"
            )
        refuse_special_file(header.data_file, "external data file", filename)
    elif header.data_file:
        raise CorruptImageError("'data-file' can only be set for images with an external data file")
    if header.backing_file:
        path = (
            header.backing_file
            if os.path.isabs(header.backing_file)
            else os.path.join(os.path.dirname(filename), header.backing_file)
        )
        if not os.path.exists(path):
            raise Qcow2IOError(
                errno.ENOENT,
                f"Could not open backing file: Could not open '{path}': No such file or directory",
            )
        refuse_special_file(path, "backing file", filename)
