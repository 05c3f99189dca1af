"""The `luks` image format: a LUKS1 volume on a raw container (QEMU's luks driver).

The container (a host file, a device or an NBD export, any `BlockDevice` giving raw
bytes) starts with the LUKS header and its key material; the encrypted guest disk
follows at the header's payload offset. Guest offset X is stored at container offset
payload_offset + X, encrypted sector by sector, each 512-byte sector's IV numbered by
its guest offset / 512 (not the container offset, unlike LUKS inside qcow2).

Without a passphrase the volume opens for its metadata only (what `info` needs); its
data then cannot be read or written (BadSecretError).
"""

from __future__ import annotations

import errno
from _thread import allocate_lock  # (threading's Lock, without importing threading)

from .blockdev import BlockDevice, Extent
from .errors import (
    BadSecretError,
    CorruptImageError,
    InvalidArgumentError,
    Qcow2IOError,
    UnsupportedFeatureError,
)
from .hostfile import preallocate

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from .crypto.ciphers import SectorCrypto

# The crypto package (construct, cryptography) loads only when a LUKS volume is opened or
# made: probing a file's format needs the magic alone (start-up time counts).
LUKS_MAGIC = b"LUKS\xba\xbe"  # (crypto.luks.LUKS_MAGIC)
SECTOR_SIZE = 512
FORMAT = "luks"
ZERO_CHUNK = 1 << 20  # bytes of zeros encrypted per step of write_zeroes


def has_luks_magic(head: bytes) -> bool:
    """Whether the first bytes of a file are a LUKS header's (what format probing asks)."""
    return bytes(head[: len(LUKS_MAGIC)]) == LUKS_MAGIC


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class LuksImage(BlockDevice):
    """A LUKS volume on `container` as a guest disk of container size - payload offset.

    The container's size counts in whole sectors, as QEMU's block layer counts it: a
    partial last sector reads as zeros past the container's end. Discard does nothing
    (QEMU's luks driver passes none down: a hole would decrypt to garbage anyway), and
    zeros are written encrypted, as QEMU writes them.
    """

    format = FORMAT
    encrypted = True

    def __init__(self, container: BlockDevice, passphrase=None):
        self.container = container
        self.filename = container.filename
        self.read_only = container.read_only
        self.file = getattr(container, "file", None)  # the host file, for info's disk size
        from .crypto.luks import LuksVolume

        head = container.read(0, min(container.size, len(LUKS_MAGIC)))
        if not has_luks_magic(head):
            raise CorruptImageError(
                f"'{self.filename}' is not a LUKS volume (magic {bytes(head[:6])!r})",
                qemu_message="Volume is not in LUKS format",
            )
        # (a file shorter than its header reads as zeros past its end, as QEMU reads it:
        # the header's own checks then refuse it, or the payload offset past the end)
        self.volume = LuksVolume.load(self._read_container, None, self._write_header)
        self.header = self.volume.header
        self.payload_offset = self.header.payload_offset
        self.size = self._payload_size(container.size)
        self.crypto: SectorCrypto | None = None
        if passphrase is not None:
            master_key, _ = self.volume.unlock(passphrase)
            self.crypto = self.volume.sector_crypto(master_key, physical_offset=False)
        # Writes that share a sector with another write must not interleave their
        # read-modify-write of it; one lock orders every write (reads run in parallel).
        self._write_lock = allocate_lock()

    def _payload_size(self, container_size: int) -> int:
        """Guest bytes of a container of `container_size` (QEMU: its sector count)."""
        size = _round_up(container_size, SECTOR_SIZE) - self.payload_offset
        if size < 0:
            error = Qcow2IOError(
                errno.EIO,
                f"LUKS payload offset {self.payload_offset} lies past the end of "
                f"'{self.filename}' ({container_size} bytes)",
                self.filename,
            )
            error.qemu_message = "Could not refresh total sector count: Input/output error"
            raise error
        return size

    # -- the container, by absolute offset --

    def _read_container(self, offset: int, length: int) -> bytes:
        """Container bytes; past its end (the partial last sector) zeros, as QEMU reads."""
        available = max(0, min(length, self.container.size - offset))
        data = self.container.read(offset, available) if available else b""
        return data + bytes(length - available)

    def _write_header(self, offset: int, data: bytes) -> None:
        self.container.write(offset, data)

    def _write_container(self, offset: int, data) -> None:
        end = offset + len(data)
        if end > self.container.size:  # the partial last sector grows to a whole one
            resize = getattr(self.container, "resize", None)
            if resize is None:
                data = memoryview(data)[: self.container.size - offset]
            else:
                resize(end)
        self.container.write(offset, data)

    def _require_crypto(self) -> SectorCrypto:
        if self.crypto is None:
            raise BadSecretError(
                f"'{self.filename}' is encrypted: its data cannot be read or written without "
                f"the passphrase (key-secret)",
                qemu_message="Parameter 'key-secret' is required for cipher",
            )
        return self.crypto

    # -- BlockDevice --

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        if not len(view):
            return 0
        crypto = self._require_crypto()
        start = offset // SECTOR_SIZE * SECTOR_SIZE
        end = _round_up(offset + len(view), SECTOR_SIZE)
        sectors = bytearray(self._read_container(self.payload_offset + start, end - start))
        crypto.decrypt(start // SECTOR_SIZE, sectors)
        view[:] = memoryview(sectors)[offset - start : offset - start + len(view)]
        return len(view)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        if len(view):
            self._write_plain(offset, view)

    def _write_plain(self, offset: int, view: memoryview) -> None:
        """Encrypt and store; sectors only partly written are read, merged and rewritten."""
        crypto = self._require_crypto()
        start = offset // SECTOR_SIZE * SECTOR_SIZE
        end = _round_up(offset + len(view), SECTOR_SIZE)
        with self._write_lock:
            sectors = bytearray(end - start)
            head_partial = start != offset
            if head_partial:
                self._read_sector(start, sectors, 0, crypto)
            last = end - SECTOR_SIZE
            if end != offset + len(view) and not (head_partial and last == start):
                self._read_sector(last, sectors, last - start, crypto)
            sectors[offset - start : offset - start + len(view)] = view
            crypto.encrypt(start // SECTOR_SIZE, sectors)
            self._write_container(self.payload_offset + start, sectors)

    def _read_sector(self, guest: int, into: bytearray, at: int, crypto: SectorCrypto) -> None:
        sector = bytearray(self._read_container(self.payload_offset + guest, SECTOR_SIZE))
        crypto.decrypt(guest // SECTOR_SIZE, sector)
        into[at : at + SECTOR_SIZE] = sector

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        self._require_crypto()
        end = offset + length
        while offset < end:
            step = min(ZERO_CHUNK, end - offset)
            self._write_plain(offset, memoryview(bytes(step)))
            offset += step

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)

    def flush(self) -> None:
        if not self._closed:
            self.container.flush()

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """All data: ciphertext tells nothing about zeros or holes (QEMU's answer too)."""
        yield [Extent(offset, length, True, False, 0, None, True)]

    def resize(self, size: int) -> None:
        """New guest size: the container is cut or grown to payload offset + size."""
        if self.read_only:
            raise InvalidArgumentError(f"'{self.filename}' is opened read-only")
        resize = getattr(self.container, "resize", None)
        if resize is None:
            raise UnsupportedFeatureError(
                f"The container of '{self.filename}' ({self.container.format}) cannot be resized"
            )
        resize(self.payload_offset + size)
        self.size = self._payload_size(self.container.size)

    def info(self) -> dict:
        """qemu-img info's format-specific data of a luks image (no passphrase needed)."""
        return self.header.info()

    def amend(self, passphrase, options, force: bool = False) -> list[int]:
        """qemu-img amend's key slot changes (state, keyslot, new-secret, old-secret,
        iter-time, with the passphrases themselves as values); returns the slots changed."""
        if self.read_only:
            raise InvalidArgumentError(f"'{self.filename}' is opened read-only")
        changed = self.volume.amend(passphrase, options, force)
        self.container.flush()
        return changed

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.container.close()
        finally:
            self._closed = True


def open_luks(container: BlockDevice, passphrase=None) -> LuksImage:
    """The luks image on an open container; the container is closed if that fails."""
    try:
        return LuksImage(container, passphrase)
    except BaseException:
        container.close()
        raise


def new_luks_region(passphrase, options: dict | None = None) -> bytes:
    """The header region of a new LUKS volume (header and slot 0 opened by `passphrase`;
    its length is the payload offset). options: qemu-img's create options, see
    crypto.luks.header_for_options. Made before any file is, so a bad option leaves none."""
    if passphrase is None:
        raise InvalidArgumentError("Parameter 'key-secret' is required for cipher")
    from .crypto.luks import create_luks

    region, _, _ = create_luks(passphrase, options)
    return region


def write_luks_image(container, region: bytes, size: int, preallocation: str = "off") -> None:
    """Store a new LUKS volume of `size` guest bytes into `container` (a HostFile, empty or
    an export whose size is kept): the header region (new_luks_region), the other slots'
    zero material left as holes, the payload as preallocated ("off", "falloc", "full";
    "metadata" is "off", as in QEMU: a LUKS volume has no metadata to preallocate)."""
    if preallocation not in ("off", "metadata", "falloc", "full"):
        raise InvalidArgumentError(f"Unsupported preallocation mode: {preallocation}")
    end = len(region) + size
    if preallocation != "full":
        container.truncate(end)
    if preallocation in ("full", "falloc"):  # (worded as QEMU's file driver words failures)
        preallocate(container, 0, end, preallocation)
    block = 4096
    try:
        for offset in range(0, len(region), block):
            piece = region[offset : offset + block]
            if piece.count(0) != len(piece):
                container.pwrite(piece, offset)
    except Qcow2IOError as exc:
        raise exc.in_context("Could not write encryption header") from None
    container.flush()
