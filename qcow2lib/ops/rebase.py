"""`qemu-img rebase`: point an overlay at another backing file (or at none).

Safe mode (the default) keeps the guest content: every range the overlay does not
allocate itself is compared between the old chain and the new backing file, and where
they differ the old content is copied into the overlay (zeros written as zero clusters
where the old chain ended). When the new backing file is a layer of the old chain, ranges
the layers above it never touched are skipped without reading. Then the header's backing
name and format are rewritten. `new_backing` "" or None removes the backing file
(flattening the overlay). unsafe=True only rewrites the header.
"""

from __future__ import annotations

import os

from ..blockdev import BlockDevice
from ..chain import open_image, probe_format
from ..drivers import KNOWN_DRIVERS
from ..errors import CorruptImageError, InvalidArgumentError, Qcow2Error, Qcow2IOError
from ..hostfile import fill_zeros, io_buffer
from . import error_text, extents_above, full_backing_filename

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

IO_BUF_SIZE = 2 << 20
_ZEROS_VIEW = memoryview(bytes(IO_BUF_SIZE))


class RebaseError(Qcow2Error):
    """A rebase failed; the message is qemu-img's."""


class _Buffers:
    """A rebase's two read buffers, reused for every range."""

    def __init__(self) -> None:
        self.old = io_buffer(IO_BUF_SIZE)
        self.new = io_buffer(IO_BUF_SIZE)


def _differing_runs(
    old: bytearray, new: memoryview, offset: int, n: int, unit: int
) -> list[tuple[int, int]]:
    """[start, end) of each run of the overlay's allocation units (clusters, or
    subclusters with extended L2: `unit` bytes from a multiple of it in the guest, the
    first and last clipped to the range) in which old[:n] and new[:n] differ, for the
    guest range at `offset`.

    QEMU compares sector by sector and writes each differing run of sectors; each write
    fills the rest of its units from the old chain (copy-on-write), which is what `old`
    holds. Writing `old` over the whole units instead allocates the same units with the
    same content, and takes one comparison a unit, one write a run of units and no
    copy-on-write reads."""
    first = -offset % unit or unit
    starts = [0, *range(first, n, unit)]
    ends = [*starts[1:], n]
    same = bytes(map(old.startswith, map(new.__getitem__, map(slice, starts, ends)), starts))
    runs = []
    index = same.find(0)
    while index >= 0:
        stop = same.find(1, index)
        if stop < 0:
            stop = len(same)
        runs.append((starts[index], ends[stop - 1]))
        index = same.find(0, stop)
    return runs


def _header_backing_check(image, backing_name: str | None, backing_fmt: str | None) -> None:
    """Refuse, with qemu-img's messages, a header change QEMU would refuse."""
    if image.format != "qcow2":
        raise RebaseError(
            f"Could not change the backing file to '{backing_name or ''}': Operation not supported"
        )
    if backing_name and not backing_fmt:
        raise RebaseError(
            f"Could not change the backing file to '{backing_name}': backing "
            f"format must be specified"
        )
    if backing_name and (image.data_file_raw or len(backing_name.encode()) > 1023):
        raise RebaseError(
            f"Could not change the backing file to '{backing_name}': Invalid argument"
        )


def set_backing(image, backing_name: str | None, backing_fmt: str | None) -> None:
    """Rewrite the header's backing file name and format (None removes them)."""
    hdr = image.header
    old = (hdr.backing_file, hdr.backing_format)
    hdr.backing_file = backing_name or None
    hdr.backing_format = backing_fmt if backing_name else None
    try:
        hdr.pack()
    except CorruptImageError:
        hdr.backing_file, hdr.backing_format = old
        raise RebaseError(
            f"Could not change the backing file to '{backing_name}': No space "
            f"left in the file header"
        ) from None
    image.flush()  # everything copied is durable before the header points elsewhere
    image._write_header()
    image.file.flush()
    image.backing_filename = hdr.backing_file
    image.backing_format = hdr.backing_format


def _chain_depth(image, path: str) -> tuple[int, object] | None:
    """(depth, device) of the layer of image's chain that is the file `path`, if any."""
    depth, layer = 1, image.backing
    while layer is not None:
        try:
            if os.path.samefile(layer.filename, path):
                return depth, layer
        except OSError:
            pass
        layer = layer.backing
        depth += 1
    return None


def rebase(
    image: BlockDevice,
    new_backing: str | None,
    new_backing_fmt: str | None = None,
    *,
    unsafe: bool = False,
    progress: Callable[[int, int], None] | None = None,
    force_share: bool = False,
    untrusted: bool = False,
) -> None:
    """Change the backing file of `image` (see the module docstring).

    `image` is opened read-write, with its backing chain unless unsafe (the caller closes
    it). new_backing is a name, not a device, because it is what the header stores: it is
    stored as given, and a relative name is resolved against the image's filename to open
    it. Raises RebaseError (or another Qcow2Error) with qemu-img's messages.
    progress(done_bytes, total_bytes) is called during the safe-mode copy. As with
    qemu-img, a new backing file outside the old chain is opened without any passphrase;
    force_share and untrusted are given to that open (see open_image).
    """
    if new_backing_fmt is not None and new_backing_fmt not in KNOWN_DRIVERS:
        raise InvalidArgumentError(f"Invalid format name: '{new_backing_fmt}'")
    new_backing = new_backing or None
    if unsafe:
        _header_backing_check(image, new_backing, new_backing_fmt)
    else:  # (which checks the header change once the new backing file is open)
        _safe_copy(image, new_backing, new_backing_fmt, progress, force_share, untrusted)
    set_backing(image, new_backing, new_backing_fmt)


def _open_new_backing(
    image,
    new_backing: str,
    new_fmt: str | None,
    force_share: bool,
    untrusted: bool,
):
    """(device, depth in the old chain or None, whether we opened it)."""
    real_path = full_backing_filename(image.filename, new_backing)
    found = _chain_depth(image, real_path) if os.path.exists(real_path) else None
    if found is not None:
        return found[1], found[0], False
    try:
        fmt = new_fmt or probe_format(real_path)
        device = open_image(real_path, "r", fmt, force_share=force_share, untrusted=untrusted)
    except Qcow2Error as exc:
        raise RebaseError(
            f"Could not open new backing file '{new_backing}': {error_text(exc)}"
        ) from exc
    layer: BlockDevice | None = device
    depth = 0
    while layer is not None:  # qemu-img gives the new backing file no secrets
        if getattr(layer, "encrypted", False):
            device.close()
            raise RebaseError(
                f"Could not open new backing file '{new_backing}': "
                + "Could not open backing file: " * depth
                + "Parameter 'encrypt.key-secret' is required for cipher"
            )
        layer, depth = layer.backing, depth + 1
    return device, None, True


def _safe_copy(image, new_backing, new_fmt, progress, force_share, untrusted: bool) -> None:
    old = image.backing
    new, prefix_depth, opened = None, None, False
    if new_backing:
        new, prefix_depth, opened = _open_new_backing(
            image, new_backing, new_fmt, force_share, untrusted
        )
    try:
        # As qemu-img: a new backing file that does not open is the failure reported,
        # before a header change it would refuse (refused here before copying anything).
        _header_backing_check(image, new_backing, new_fmt)
        if new_backing and not image.backing_filename:
            # The image is about to get a backing file: from now on an unallocated
            # cluster shows the new backing file, so zeroing one must write an explicit
            # zero flag rather than leave the hole (which reads zeros only while nothing
            # is behind it).
            image.backing_filename = new_backing
        size = image.size
        old_size = old.size if old is not None else 0
        new_size = new.size if new is not None else 0
        buffers = _Buffers()
        done = 0
        # What is allocated above the new backing file when it is a layer of the old
        # chain (what lies there or below is unchanged), else above the old backing file.
        above = prefix_depth if prefix_depth is not None else 1
        extents = extents_above(image, above, size)
        while True:
            try:
                ext = next(extents, None)
            except Qcow2Error as exc:
                text = exc.errno_text() if isinstance(exc, Qcow2IOError) else str(exc)
                raise RebaseError(f"error while reading image metadata: {text}") from exc
            if ext is None:
                break
            end = ext.offset + ext.length
            if ext.present and ext.depth == 0:  # allocated in the overlay itself
                done += ext.length
                continue
            if prefix_depth is not None and not ext.present and ext.depth == prefix_depth - 1:
                # Comes from the new backing file itself (or below it): unchanged. (A
                # range past the end of a layer above it read zeros: it has a lower depth.)
                done += ext.length
                continue
            offset = ext.offset
            while offset < end:
                n = min(IO_BUF_SIZE, end - offset)
                for limit in (old_size, new_size):  # split where a backing file ends
                    if offset < limit < offset + n:
                        n = limit - offset
                _copy_differences(image, old, new, old_size, new_size, offset, n, buffers)
                offset += n
                done += n
                if progress is not None:
                    progress(done, size)
        if progress is not None:
            progress(size, size)
    finally:
        if opened and new is not None:
            new.close()


class _reading:
    """Failures of the reads inside become `what`, as qemu-img's rebase words them."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, traceback) -> None:
        if isinstance(exc, Qcow2Error):
            raise RebaseError(self.what) from exc


def _read(device, device_size: int, offset: int, n: int, buf: bytearray) -> memoryview:
    view = memoryview(buf)[:n]
    inside = max(0, min(n, device_size - offset)) if device is not None else 0
    if inside:
        device.readinto(offset, view[:inside])
    if inside < n:  # (past the device, or none: zeros, cleared in place, no new buffer)
        fill_zeros(view[inside:])
    return view


def _write_explicit_zeros(image, offset: int, length: int) -> None:
    """Make the range read zeros whatever the backing file is (it is about to change):
    zero clusters where whole v3 clusters are covered, zero data elsewhere. (write_zeroes
    alone would skip ranges that read as zeros through the *current* backing file.)"""
    cs = image.cluster_size
    end = offset + length
    first, last = -(-offset // cs) * cs, end // cs * cs
    if image.compat != "1.1" or first >= last:
        first = last = end
    for start, stop in ((offset, min(first, end)), (max(last, offset), end)):
        pos = start
        while pos < stop:
            n = min(stop - pos, IO_BUF_SIZE)
            image.write(pos, bytes(n))
            pos += n
    if first < last:
        image.write_zeroes(first, last - first)


def _reads_zeros(device, device_size: int, offset: int, n: int) -> bool:
    """Whether the range reads as zeros, known from the device's map alone (no read)."""
    inside = max(0, min(n, device_size - offset)) if device is not None else 0
    return not inside or all(ext.is_zero for ext in device.iter_extents(offset, inside))


def _copy_differences(image, old, new, old_size, new_size, offset, n, buffers) -> None:
    from_old = "error while reading from old backing file"
    from_new = "error while reading from new backing file"
    with _reading(from_old):
        old_zeros = _reads_zeros(old, old_size, offset, n)
    with _reading(from_new):
        if old_zeros and _reads_zeros(new, new_size, offset, n):
            return  # the same zeros through both backing files
    with _reading(from_old):
        view_old = _read(old, old_size, offset, n, buffers.old)
    if new is None or offset >= new_size:  # (a flattening: the new side is zeros, unread)
        view_new = _ZEROS_VIEW
    else:
        with _reading(from_new):
            view_new = _read(new, new_size, offset, n, buffers.new)
        if buffers.old.startswith(view_new):  # (memcmp: the views are the buffers' first n)
            return
    runs = _differing_runs(buffers.old, view_new, offset, n, image.map.subcluster_size)
    old_is_zero = offset >= old_size
    try:
        for start, end in runs:
            if old_is_zero:
                _write_explicit_zeros(image, offset + start, end - start)
            else:
                image.write(offset + start, view_old[start:end])
    except Qcow2IOError as exc:
        raise RebaseError(f"Error while writing to COW image: {exc.errno_text()}") from exc
