"""`qemu-img compare`: are two images' guest contents the same?

Exit codes and messages are qemu-img's: 0 "Images are identical.", 1 "Content mismatch
at offset N!" (N is the first differing 512-byte sector, as QEMU compares sector by
sector), 1 "Strict mode: Image size mismatch!" / "Strict mode: Offset N block status
mismatch!" with strict=True, 3 when block status fails, 4 when a read fails. When the
sizes differ (not strict) the extra area must read as zeros and the output starts with
"Warning: Image size mismatch!".

Runs that both extent maps call zero are never read; a run that only one side calls
zero is checked by reading that other side alone.
"""

from __future__ import annotations

from ..blockdev import BlockDevice, Extent
from ..errors import Qcow2Error
from ..hostfile import io_buffer
from . import error_text, virtual_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

IO_BUF_SIZE = 2 << 20
SECTOR = 512
_ZEROS = bytes(IO_BUF_SIZE)
_ZEROS_VIEW = memoryview(_ZEROS)


class _ReadFailed(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _read(dev: BlockDevice, name: str, offset: int, length: int, buf: bytearray) -> bytearray:
    """`buf` (one of a compare's two reused buffers: a new one per read costs a page fault
    for each of its pages), its first `length` bytes read from `offset`; past the end of
    the device (a raw file's partial last sector) they read zeros."""
    inside = max(0, min(length, dev.size - offset))
    if inside < length:
        buf[inside:length] = _ZEROS_VIEW[: length - inside]
    if inside:
        try:
            dev.readinto(offset, memoryview(buf)[:inside])
        except Qcow2Error as exc:
            raise _ReadFailed(
                f"Error while reading offset {offset} of {name}: {error_text(exc)}"
            ) from exc
    return buf


def _is_zero(buf: bytearray, start: int, end: int) -> bool:
    return buf.startswith(_ZEROS_VIEW[: end - start], start)


def find_nonzero(buf: bytearray, length: int) -> int:
    """Offset of the first 512-byte sector of buf[:length] (at most IO_BUF_SIZE) holding a
    non-zero byte, or -1 (QEMU's find_nonzero: a sector-aligned index)."""
    if _is_zero(buf, 0, length):
        return -1
    step = 64 * SECTOR
    for block in range(0, length, step):
        block_end = min(length, block + step)
        if _is_zero(buf, block, block_end):
            continue
        for sector in range(block, block_end, SECTOR):
            if not _is_zero(buf, sector, min(block_end, sector + SECTOR)):
                return sector
    return -1


def first_difference(buf1: bytearray, buf2: bytearray, length: int) -> int:
    """Sector-aligned offset of the first differing sector of buf1[:length] and
    buf2[:length], or -1 when they are equal (compared with memcmp: startswith at an
    offset, no slice copied)."""
    view2 = memoryview(buf2)
    if buf1.startswith(view2[:length]):
        return -1
    step = 64 * SECTOR
    for block in range(0, length, step):
        block_end = min(length, block + step)
        if buf1.startswith(view2[block:block_end], block):
            continue
        for sector in range(block, block_end, SECTOR):
            if not buf1.startswith(view2[sector : min(block_end, sector + SECTOR)], sector):
                return sector
    return -1


def _status(ext, size: int) -> tuple:
    """The block status flags QEMU compares in strict mode (data, zero, allocated,
    offset valid, end of file)."""
    return (
        ext.is_data,
        ext.is_zero,
        ext.present,
        ext.host_offset is not None,
        ext.offset + ext.length >= size,
    )


def _extents(dev: BlockDevice, name: str, start: int, end: int) -> Iterator[Extent]:
    """Extents over [start, end), the partial last sector of a raw file included, streamed
    (a block status failure part-way is reported when the walk reaches it, as qemu-img)."""
    limit = min(end, dev.size)
    try:
        if limit > start:
            yield from dev.iter_extents(start, limit - start)
    except Qcow2Error as exc:
        raise _StatusFailed(f"Sector allocation test failed for {name}") from exc
    if limit < end:
        yield Extent(limit, end - limit, False, True, 0, limit, True)


class _StatusFailed(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def compare(
    a: BlockDevice,
    b: BlockDevice,
    *,
    strict: bool = False,
    name_a: str | None = None,
    name_b: str | None = None,
    progress=None,
) -> tuple[int, str]:
    """Compare the guest content of two open devices (with their chains), as qemu-img.

    Returns (exit code, output). For codes 0 and 1 the output is what qemu-img prints on
    stdout (several lines joined by newlines, without the final one); for codes 3 and 4
    it is the error message qemu-img prints on stderr (after "qemu-img: "). The names
    used in error messages default to the devices' filenames. progress(done, total) is
    called as bytes are checked.
    """
    name_a = name_a or a.filename
    name_b = name_b or b.filename
    out: list[str] = []  # lines printed before a failure (the size warning) stay printed
    try:
        return _compare(a, b, strict, name_a, name_b, progress, out)
    except _ReadFailed as exc:
        return 4, "\n".join(out + [exc.message])
    except _StatusFailed as exc:
        return 3, "\n".join(out + [exc.message])


def _compare(a, b, strict, name_a, name_b, progress, out: list[str]) -> tuple[int, str]:
    size1, size2 = virtual_size(a), virtual_size(b)
    total = min(size1, size2)
    progress_base = max(size1, size2)
    if strict and size1 != size2:
        return 1, "Strict mode: Image size mismatch!"
    buf1, buf2 = io_buffer(IO_BUF_SIZE), io_buffer(IO_BUF_SIZE)
    ext1 = _extents(a, name_a, 0, total)
    ext2 = _extents(b, name_b, 0, total)
    e1 = e2 = None
    offset = 0
    while offset < total:
        while e1 is None or e1.offset + e1.length <= offset:
            e1 = next(ext1)
        while e2 is None or e2.offset + e2.length <= offset:
            e2 = next(ext2)
        end = min(e1.offset + e1.length, e2.offset + e2.length, total)
        if strict:
            s1 = _status(e1, size1)
            s2 = _status(e2, size2)
            if s1 != s2:
                return 1, f"Strict mode: Offset {offset} block status mismatch!"
        if e1.is_zero and e2.is_zero:
            offset = end
        else:
            while offset < end:
                chunk = min(end - offset, IO_BUF_SIZE)
                if e1.present == e2.present:
                    _read(a, name_a, offset, chunk, buf1)
                    _read(b, name_b, offset, chunk, buf2)
                    diff = first_difference(buf1, buf2, chunk)
                else:
                    dev, name = (a, name_a) if e1.present else (b, name_b)
                    diff = find_nonzero(_read(dev, name, offset, chunk, buf1), chunk)
                if diff >= 0:
                    return 1, "\n".join(out + [f"Content mismatch at offset {offset + diff}!"])
                offset += chunk
                if progress:
                    progress(offset, progress_base)
        offset = end
        if progress:
            progress(offset, progress_base)
    if size1 != size2:
        out.append("Warning: Image size mismatch!")
        dev, name, size = (a, name_a, size1) if size1 > size2 else (b, name_b, size2)
        for ext in _extents(dev, name, total, size):
            if not ext.present or ext.is_zero:
                continue
            pos, ext_end = ext.offset, ext.offset + ext.length
            while pos < ext_end:
                chunk = min(ext_end - pos, IO_BUF_SIZE)
                diff = find_nonzero(_read(dev, name, pos, chunk, buf1), chunk)
                if diff >= 0:
                    return 1, "\n".join(out + [f"Content mismatch at offset {pos + diff}!"])
                pos += chunk
        if progress:
            progress(progress_base, progress_base)
    out.append("Images are identical.")
    return 0, "\n".join(out)
