"""`qemu-img amend` for qcow2: compat level, refcount width, lazy refcounts, size.

The steps run in QEMU's order: upgrade to compat 1.1 first, then the refcount width,
the backing file check, lazy refcounts, the size, and the downgrade to 0.10 last, with
QEMU's error messages.

- 0.10 -> 1.1: snapshot tables still in the short v2 form are rewritten in v3 form, then
  the header becomes a v3 header (112 bytes, feature name table).
- 1.1 -> 0.10: refused for other refcount widths, data files, snapshots of another size,
  extended L2 entries and other incompatible features, or zstd images holding
  compressed clusters. Zero clusters are expanded in every L1 table (active and
  snapshots): preallocated ones keep their cluster (zeros written to it), others become
  unallocated, or, over a backing file, newly allocated zero-filled clusters. The header
  is rewritten as a 72-byte v2 header with no feature bits and no feature table.
- refcount_bits: a new refcount structure of the new width is built after the end of the
  file from the references the metadata makes (as rebuild.py does for dirty images), then
  the header switches to it with one sector write.
- lazy_refcounts: the compatible feature bit (the image is made clean first when
  turning it off).
"""

from __future__ import annotations

from .. import structs as S
from ..blockdev import BlockDevice
from ..errors import (
    AmendError,
    CorruptImageError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    corruption_notice,
)
from ..image import Qcow2Image
from ..sizes import c_hex, parse_number, parse_size
from ..snapshot_table import pack_snapshot_table, read_snapshot_table
from .refcount_width import change_refcount_width
from .resize import resize

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

AMEND_OPTIONS = (
    "compat",
    "size",
    "backing_file",
    "backing_fmt",
    "lazy_refcounts",
    "refcount_bits",
    "data_file",
    "data_file_raw",
)
CREATE_ONLY_OPTIONS = (
    "cluster_size",
    "preallocation",
    "encryption",
    "extended_l2",
    "compression_type",
    "nocow",
    "extent_size_hint",
)


def _bool_option(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value) in ("on", "yes", "true"):
        return True
    if str(value) in ("off", "no", "false"):
        return False
    raise InvalidArgumentError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_options(options: dict) -> dict:
    """qemu-img amend's -o options (strings) to amend() keyword arguments."""
    out: dict = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name == "compat":
            out["compat"] = str(value)
        elif name == "size":
            try:
                out["size"] = value if isinstance(value, int) else parse_size(str(value))
            except InvalidArgumentError:
                raise InvalidArgumentError(
                    "Parameter 'size' expects a non-negative number below 2^64\nOptional "
                    "suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand "
                    "exabytes, respectively."
                ) from None
        elif name == "refcount_bits":
            try:
                out["refcount_bits"] = value if isinstance(value, int) else parse_number(str(value))
            except InvalidArgumentError:
                raise InvalidArgumentError("Parameter 'refcount_bits' expects a number") from None
        elif name == "lazy_refcounts":
            out["lazy_refcounts"] = _bool_option("lazy_refcounts", value)
        elif name in ("backing_file", "backing_fmt"):
            out[name] = value
        elif name in ("data_file", "data_file_raw"):
            out[name] = value
        elif name in CREATE_ONLY_OPTIONS:
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nThis option is only supported for image creation"
            )
        else:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
    return out


def amend(
    image: BlockDevice,
    *,
    compat: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool | None = None,
    size: int | None = None,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    data_file: str | None = None,
    data_file_raw: bool | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Amend `image`, a qcow2 image opened read-write (see the module docstring; the
    caller closes it).

    Raises AmendError / InvalidArgumentError / UnsupportedFeatureError with qemu-img's
    messages. The image content is kept; qemu-img check is clean afterwards.
    """
    if not isinstance(image, Qcow2Image):
        raise UnsupportedFeatureError(
            f"Format driver '{image.format}' does not support option amendment"
        )
    _amend(
        image,
        compat,
        refcount_bits,
        lazy_refcounts,
        size,
        backing_file,
        backing_fmt,
        data_file,
        data_file_raw,
        progress,
    )


def _amend(
    image,
    compat,
    refcount_bits,
    lazy_refcounts,
    size,
    backing_file,
    backing_fmt,
    data_file,
    data_file_raw,
    progress,
) -> None:
    hdr = image.header
    old_version = new_version = hdr.version
    if compat is not None:
        if compat in ("0.10", "v2"):
            new_version = 2
        elif compat in ("1.1", "v3"):
            new_version = 3
        else:
            raise AmendError(f"Unknown compatibility level {compat}")
    new_bits = image.refcount_bits if refcount_bits is None else refcount_bits
    if new_bits <= 0 or new_bits > 64 or new_bits & (new_bits - 1):
        raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
    if data_file is not None and image.data_host is None:
        raise AmendError("data-file can only be set for images that use an external data file")
    if (
        data_file_raw is not None
        and _bool_option("data_file_raw", data_file_raw)
        and not image.data_file_raw
    ):
        raise AmendError("data-file-raw cannot be set on existing images")
    status = _AmendStatus(
        progress, (new_version != old_version) + (new_bits != image.refcount_bits)
    )
    if new_version > old_version:
        status.start("upgrade")
        status(0, 2)  # QEMU's two steps: the snapshot table, then the header
        _upgrade(image)
        status(1, 2)
        status(2, 2)
    if new_bits != image.refcount_bits:
        if new_version < 3 and new_bits != 16:
            raise AmendError(
                "Refcount widths other than 16 bits require compatibility level "
                "1.1 or above (use compat=1.1 or greater)"
            )
        status.start("refcount width")
        change_refcount_width(image, new_bits, status)
    if backing_file is not None or backing_fmt is not None:
        if backing_file != image.backing_filename or backing_fmt != image.backing_format:
            raise AmendError(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."
            )
    if lazy_refcounts is not None and lazy_refcounts != image.lazy_refcounts:
        if lazy_refcounts and new_version < 3:
            raise AmendError(
                "Lazy refcounts only supported with compatibility level 1.1 and "
                "above (use compat=1.1 or greater)"
            )
        set_lazy_refcounts(image, lazy_refcounts)
    if size:
        resize(image, size, shrink=True)
    if (
        data_file_raw is not None
        and not _bool_option("data_file_raw", data_file_raw)
        and image.data_file_raw
    ):
        # The data file stops being a raw image of the guest (it may then get a backing
        # file, for one): only clearing the bit is allowed, as in QEMU.
        hdr.autoclear_features &= ~S.AUTOCLEAR_DATA_FILE_RAW
        image.data_file_raw = False
        image.flush()
        image._write_header()
        image.file.flush()
    if data_file is not None and (data_file or None) != hdr.data_file:
        # A new name for the external data file; "" removes it (it must then be given
        # at open), as QEMU's amend does.
        hdr.data_file = data_file or None
        image.flush()
        image._write_header()
        image.file.flush()
    if new_version < old_version:
        status.start("downgrade")
        _downgrade(image, status)
    image.flush()


class _AmendStatus:
    """Progress over several amend operations, as QEMU reports it: each operation reports
    (offset, work size) and the total is projected from the operations seen so far."""

    def __init__(self, progress, total_operations: int):
        self.progress = progress
        self.total_operations = total_operations
        self.current: str | None = None
        self.last: str | None = None
        self.offset_completed = self.operations_completed = self.last_work_size = 0

    def start(self, operation: str) -> None:
        self.current = operation

    def __call__(self, offset: int, work_size: int) -> None:
        if self.progress is None or not self.total_operations:
            return
        if self.current != self.last:
            if self.last is not None:
                self.offset_completed += self.last_work_size
                self.operations_completed += 1
            self.last = self.current
        self.last_work_size = work_size
        current = self.offset_completed + work_size
        remaining = self.total_operations - self.operations_completed - 1
        projected = current * remaining // (self.operations_completed + 1)
        self.progress(self.offset_completed + offset, current + projected)


# --- lazy refcounts -----------------------------------------------------------------------


def set_lazy_refcounts(image, on: bool) -> None:
    hdr = image.header
    image.flush()  # metadata and refcounts consistent on disk: the image is clean
    if on:
        hdr.compatible_features |= S.COMPAT_LAZY_REFCOUNTS
        hdr.incompatible_features |= S.INCOMPAT_DIRTY  # the engine's state while open
    else:
        hdr.compatible_features &= ~S.COMPAT_LAZY_REFCOUNTS
        hdr.incompatible_features &= ~S.INCOMPAT_DIRTY
    image._write_header_fields()
    image.file.flush()
    image.lazy_refcounts = on


# --- refcount width -----------------------------------------------------------------------


# --- version changes ----------------------------------------------------------------------


def _snapshots(image):
    hdr = image.header
    if not hdr.nb_snapshots:
        return [], 0
    return read_snapshot_table(
        image.file, hdr.snapshots_offset, hdr.nb_snapshots, image.file.size()
    )


def _write_header_or_fail(image) -> None:
    """Rewrite the header cluster (the caller flushed all metadata before changing it)."""
    try:
        image.header.pack()
    except CorruptImageError:
        raise AmendError("Failed to update the image header: No space left on device") from None
    image.file.flush()
    image._write_header()
    image.file.flush()


def _upgrade(image) -> None:
    hdr = image.header
    snapshots, table_bytes = _snapshots(image)
    old_table = None
    if any(len(snap.extra_data) < 16 for snap in snapshots):
        data = pack_snapshot_table(snapshots, image.size)
        cs = image.cluster_size
        clusters = -(-len(data) // cs)
        with image._lock:
            first = image.refcounts.allocate(clusters)
        offset = first << image.cluster_bits
        image.guard_write(offset, clusters * cs)
        image.file.pwrite(data + bytes(clusters * cs - len(data)), offset)
        image._host_size = max(image._host_size, offset + clusters * cs)
        old_table = (hdr.snapshots_offset, table_bytes)
    image.flush()  # the new table and its refcounts on disk before the header changes
    old = (hdr.version, hdr.header_length, hdr.snapshots_offset)
    if old_table is not None:
        hdr.snapshots_offset = offset
    hdr.version = 3
    hdr.header_length = 112
    hdr.refcount_order = 4
    hdr.compression_type = 0
    hdr.extra_header_bytes = b""
    try:
        _write_header_or_fail(image)
    except BaseException:
        hdr.version, hdr.header_length, hdr.snapshots_offset = old
        raise
    if old_table is not None and old_table[1]:
        first = old_table[0] >> image.cluster_bits
        last = (old_table[0] + old_table[1] - 1) >> image.cluster_bits
        with image._lock:
            image.refcounts.free(first, last - first + 1)
    image.compat = "1.1"
    image.map.version = 3
    image.flush()


def _l1_tables(image, snapshots) -> list:
    """The active L1 table and the snapshots' (refused as QEMU's zero cluster expansion
    refuses them)."""
    from ..snapshots import SnapshotL1Error, read_l1

    tables = [image.map.l1]
    for snap in snapshots:
        try:
            tables.append(read_l1(image, snap))
        except SnapshotL1Error as exc:
            raise AmendError(
                str(exc),
                qemu_message=f"Failed to turn zero into data clusters: {exc.errno_text()}",
                reported=exc.strerror,
            ) from None
    return tables


def _has_compressed_clusters(image, snapshots) -> bool:
    seen = set()
    for l1 in _l1_tables(image, snapshots):
        for entry in l1:
            l2_offset = entry & S.L1E_OFFSET_MASK
            if not l2_offset or l2_offset in seen:
                continue
            seen.add(l2_offset)
            table = image.map.l2_cache.get(l2_offset)
            if any(e & S.OFLAG_COMPRESSED for e in table[:: image.map.entry_words]):
                return True
    return False


def _expand_zero_clusters(image, snapshots, status=None) -> None:
    """v2 has no zero flag: turn every zero cluster into a real one (or a hole).
    `status(visited, total)` follows the L1 entries visited, as QEMU reports them."""
    bits = image.cluster_bits
    cs = image.cluster_size
    zeros = bytes(cs)
    # (a backing node given by options counts, and "backing": null leaves none)
    has_backing = image.backing is not None or (
        bool(image.backing_filename) and not image.backing_dropped
    )
    seen = set()
    tables = _l1_tables(image, snapshots)
    total = sum(len(l1) for l1 in tables)
    visited = 0
    with image._lock:
        for l1 in tables:
            for l1_index, l1_entry in enumerate(l1):
                visited += 1
                if status is not None:
                    status(visited, total)
                l2_offset = l1_entry & S.L1E_OFFSET_MASK
                if not l2_offset or l2_offset in seen:
                    continue
                if l2_offset % cs:
                    _expansion_corrupt(
                        image,
                        f"L2 table offset {c_hex(l2_offset)} unaligned "
                        f"(L1 index: {c_hex(l1_index)})",
                    )
                seen.add(l2_offset)
                table = image.map.l2_cache.get(l2_offset)
                l2_refcount = image.refcounts.get(l2_offset >> bits)
                dirty = False
                for j, entry in enumerate(table):
                    if entry & S.OFLAG_COMPRESSED or not entry & S.OFLAG_ZERO:
                        continue
                    host = entry & S.L2E_OFFSET_MASK
                    if host % cs:  # (never written to: it would land across two clusters)
                        _expansion_corrupt(
                            image,
                            f"Cluster allocation offset {c_hex(host)} unaligned "
                            f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(j)})",
                        )
                    if host and image.refcounts.get(host >> bits) <= l2_refcount:
                        # Preallocated zero cluster only this table uses: make it hold zeros.
                        image.guard_write(host, cs)
                        image.file.pwrite(zeros, host)
                        table[j] = entry & ~S.OFLAG_ZERO
                        dirty = True
                        continue
                    if host:
                        # Shared with a snapshot's table (QEMU would zero the snapshot's
                        # data here): drop the references of this table's paths instead.
                        for _ in range(l2_refcount):
                            image.refcounts.free(host >> bits, 1)
                    if not has_backing:
                        table[j] = 0
                    else:
                        cluster = image.refcounts.allocate(1)
                        if l2_refcount > 1:
                            image.refcounts.update(cluster, 1, l2_refcount - 1)
                        image.guard_write(cluster << bits, cs)
                        image.file.pwrite(zeros, cluster << bits)
                        image._host_size = max(image._host_size, (cluster + 1) << bits)
                        table[j] = (cluster << bits) | (S.OFLAG_COPIED if l2_refcount == 1 else 0)
                    dirty = True
                if dirty:
                    image.map.l2_cache.mark_dirty(l2_offset)
                blocks = image.refcounts.blocks
                if len(blocks.dirty) > blocks.max_entries // 4:
                    image.flush()  # keep the refcount block cache from filling with dirt
        image._last_decompressed = None
    image.flush()
    if snapshots:  # references dropped above may leave active clusters unshared
        from ..snapshots import refresh_copied_flags

        with image._lock:
            refresh_copied_flags(image)
        image.flush()


def _expansion_corrupt(image, message: str) -> None:
    """Zero cluster expansion met broken metadata: mark the image corrupt and fail, with
    QEMU's notice and error, before anything is written through it."""
    error = AmendError(
        f"zero cluster expansion: {message}",
        qemu_message="Failed to turn zero into data clusters: Input/output error",
        notice=corruption_notice(message),
    )
    image._signal_corruption(error)
    raise error


def _downgrade(image, status=None) -> None:
    hdr = image.header
    if hdr.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if image.data_host is not None or hdr.incompatible_features & S.INCOMPAT_DATA_FILE:
        raise AmendError("Cannot downgrade an image with a data file")
    snapshots, _ = _snapshots(image)
    for snap in snapshots:
        disk_size = image.size if snap.disk_size is None else snap.disk_size
        if snap.vm_state_size > 0xFFFFFFFF or disk_size != image.size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    image.flush()  # clean: the dirty bit we hold for lazy refcounts can go
    incompatible = hdr.incompatible_features & ~S.INCOMPAT_DIRTY
    if incompatible & ~S.INCOMPAT_COMPRESSION:
        raise AmendError(
            f"Cannot downgrade an image with incompatible features "
            f"{incompatible & ~S.INCOMPAT_COMPRESSION:#x} set"
        )
    if incompatible & S.INCOMPAT_COMPRESSION and _has_compressed_clusters(image, snapshots):
        raise AmendError(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters"
        )
    _expand_zero_clusters(image, snapshots, status)
    old = (
        hdr.version,
        hdr.header_length,
        hdr.incompatible_features,
        hdr.compatible_features,
        hdr.autoclear_features,
        hdr.compression_type,
    )
    hdr.incompatible_features = 0
    hdr.compatible_features = 0
    hdr.autoclear_features = 0
    hdr.compression_type = 0
    hdr.version = 2
    hdr.header_length = S.HEADER_V2_SIZE
    try:
        _write_header_or_fail(image)
    except BaseException:
        (
            hdr.version,
            hdr.header_length,
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.compression_type,
        ) = old
        raise
    image.lazy_refcounts = False
    image.compat = "0.10"
    image.compression_type = "zlib"
    image.map.version = 2
