"""Creating images: option checks as QEMU does them, the initial layout, preallocation.

A new qcow2 file holds, in order, the header cluster, the refcount table, the refcount
blocks that count the metadata, and the L1 table (QEMU's layout). Preallocation then
runs through the engine itself, so it follows the same allocation and write order as
any guest write.
"""

from __future__ import annotations

import errno
import os
import stat

from . import structs as S
from .chain import is_nbd_name, open_image, resolve_backing_path
from .errors import CorruptImageError, InvalidArgumentError, Qcow2Error, Qcow2IOError
from .header import Header
from .hostfile import HostFile, create_host_file, preallocate
from .image import Qcow2Image
from .sizes import BDRV_MAX_LENGTH, INT64_MAX, SizeError, parse_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:  # (the NBD client is imported only when an export is the target)
    from .exports.nbd_client import NBDHostFile

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
FIRST_BLOCK = 4096  # bytes QEMU writes at the start of a new raw file


def _size_argument(size: int | str | None) -> int | None:
    """The virtual size in bytes from an int or a qemu-img size string."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool)):
        return size
    if isinstance(size, str):
        try:
            return parse_size(size)
        except SizeError:
            raise InvalidArgumentError(
                f"invalid image size {size!r}: a number of bytes, "
                f"or with a suffix k, M, G, T, P or E"
            ) from None
    raise InvalidArgumentError(
        f"image size must be an int or a string, not {type(size).__name__} ({size!r})"
    )


def create(
    path: str,
    size: int | str | None,
    *,
    fmt: str = "qcow2",
    cluster_size: int = 65536,
    compat: str = "1.1",
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    preallocation: str = "off",
    data_file: str | None = None,
    data_file_raw: bool = False,
    compression_type: str = "zlib",
    encrypt_format: str | None = None,
    passphrase: str | bytes | None = None,
    encrypt_options: dict | None = None,
) -> None:
    """Create a raw, qcow2 or luks image. `size=None` takes the size of the backing file.

    `size` is in bytes, or a string as qemu-img takes it ("1G", "512M", "0x1000"; powers
    of 1024). Every error is an InvalidArgumentError naming the option and the value.

    encrypt_format "luks" (with encrypt_options as qemu-img's encrypt.* options) or the
    legacy "aes" encrypts the qcow2 image's data with `passphrase`. fmt "luks" makes a
    LUKS volume (QEMU's luks format) opened by `passphrase`, encrypt_options its options.
    """
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"Unsupported preallocation mode '{preallocation}'")
    size = _size_argument(size)
    if size is None:
        if not backing_file:
            raise InvalidArgumentError("Image creation needs a size parameter")
        size = _backing_size(path, backing_file, backing_fmt)
    if size < 0:
        raise InvalidArgumentError(f"Image size must be a non-negative number (size {size})")
    if fmt == "raw":
        _create_raw(path, size, preallocation)
        return
    if fmt == "luks":  # issue 14: the luks format (luks_image.py)
        from .luks_image import new_luks_region, write_luks_image

        region = new_luks_region(passphrase, encrypt_options)
        if len(region) + size > INT64_MAX:  # (QEMU's block/crypto.c, before it writes)
            raise InvalidArgumentError("The requested file size is too large")
        container = _container(path)
        try:
            write_luks_image(container, region, size, preallocation)
        except Qcow2IOError:
            container.close()
            _remove_regular_file(path)  # (as QEMU: no half-made volume is left behind)
            raise
        container.close()
        return
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Unknown file format '{fmt}'")
    size = (size + 511) // 512 * 512
    version = COMPAT_LEVELS.get(str(compat))
    if version is None:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    _check_qcow2_options(
        version,
        size,
        cluster_size,
        backing_file,
        backing_fmt,
        refcount_bits,
        lazy_refcounts,
        extended_l2,
        preallocation,
        data_file,
        data_file_raw,
        compression_type,
    )
    if encrypt_format not in (None, "luks", "aes"):
        raise InvalidArgumentError(f"Invalid parameter '{encrypt_format}' (encrypt.format)")
    if encrypt_format and passphrase is None:
        raise InvalidArgumentError("Parameter 'encrypt.key-secret' is required for cipher")
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"  # raw data files need the identity mapping in the tables
    if data_file:  # QEMU resolves a relative data file name against the working directory
        data = create_host_file(data_file)
        try:
            data.truncate(size)
        finally:
            data.close()
    luks_header = b""
    if encrypt_format == "luks":
        from .crypto import create_luks_header  # loaded only when needed (start-up time)

        luks_header, _ = create_luks_header(passphrase, encrypt_options or {})
    try:
        _write_empty_qcow2(
            path,
            size,
            version,
            cluster_size,
            backing_file,
            backing_fmt,
            refcount_bits,
            lazy_refcounts,
            extended_l2,
            data_file,
            data_file_raw,
            compression_type,
            encrypt_format,
            luks_header,
        )
    except Qcow2IOError:
        _remove_unfinished(path, data_file)
        raise
    if preallocation != "off":
        image = open_image(path, "r+", "qcow2", backing=False, passphrase=passphrase)
        assert isinstance(image, Qcow2Image)  # (opened as qcow2)
        try:
            image.preallocate(preallocation)
        except Qcow2IOError as exc:  # (QEMU grows the new image to its size: that failed)
            failure = exc.prefixed("Could not resize image")
            try:
                image.close()
            except Qcow2Error:  # the failure that stopped the preallocation says it all
                pass
            _remove_unfinished(path, data_file)
            raise failure from None
        image.close()


def _remove_unfinished(path: str, data_file: str | None) -> None:
    """As QEMU: a qcow2 image that could not be made whole is not left behind, nor the
    data file made for it."""
    _remove_regular_file(path)
    if data_file:
        _remove_regular_file(data_file)


def _remove_regular_file(path: str) -> None:
    """Delete a file this call created, if it is a regular file (never a device)."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:  # (gone already, or not ours to delete: the failure is reported)
        pass


def _check_qcow2_options(
    version,
    size,
    cluster_size,
    backing_file,
    backing_fmt,
    refcount_bits,
    lazy_refcounts,
    extended_l2,
    preallocation,
    data_file,
    data_file_raw,
    compression_type,
) -> None:
    def fail(message: str):
        raise InvalidArgumentError(message)

    if extended_l2 and version < 3:
        fail(
            "Extended L2 entries are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    bits = cluster_size.bit_length() - 1
    if not S.MIN_CLUSTER_BITS <= bits <= S.MAX_CLUSTER_BITS or 1 << bits != cluster_size:
        fail("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 512 * S.SUBCLUSTERS:
        fail(
            f"Extended L2 entries are only supported with cluster sizes of at least "
            f"{512 * S.SUBCLUSTERS} bytes"
        )
    if backing_file and preallocation != "off" and not extended_l2:
        fail(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if backing_fmt and not backing_file:
        fail("Backing format cannot be used without backing file")
    if lazy_refcounts and version < 3:
        fail(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use "
            "version=v3 or greater)"
        )
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        fail("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        fail(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    if data_file_raw and not data_file:
        fail("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        fail("Backing file and data-file-raw cannot be used at the same time")
    if data_file and version < 3:
        fail(
            "External data files are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    if compression_type not in ("zlib", "zstd"):
        fail(f"Invalid parameter '{compression_type}'")
    if compression_type != "zlib" and version < 3:
        fail(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    # QEMU grows the new image to its size through the block layer, which checks it first
    # (a size rounded up past INT64_MAX is negative there).
    if size > INT64_MAX:
        fail("Could not resize image: Image size cannot be negative")
    if size > BDRV_MAX_LENGTH:
        fail(f"Could not resize image: offset({size}) exceeds maximum({BDRV_MAX_LENGTH})")
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_entries = -(-size // (cluster_size * l2_entries))
    if l1_entries * 8 > S.MAX_L1_BYTES:
        fail(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
        )


def _backing_size(path: str, backing_file: str, backing_fmt: str | None) -> int:
    with open_image(resolve_backing_path(path, backing_file), "r", backing_fmt) as backing:
        return backing.size


def _container(path: str) -> HostFile | NBDHostFile:
    """The file a new image is written into: a host file (created or emptied), or an NBD
    export, which like a device keeps its size (QEMU's create on the nbd protocol)."""
    if is_nbd_name(path):
        from .exports.nbd_client import NBDClient, NBDHostFile, parse_nbd_name

        return NBDHostFile(NBDClient(parse_nbd_name(path), read_only=False))
    return create_host_file(path)


def _create_raw(path: str, size: int, preallocation: str) -> None:
    file = _container(path)
    if size > INT64_MAX and preallocation != "off":  # (negative in QEMU: a shrink)
        file.close()
        raise InvalidArgumentError("Cannot use preallocation for shrinking files")
    if preallocation == "metadata":  # QEMU fails here too, leaving the file it made empty
        file.close()
        raise InvalidArgumentError("Unsupported preallocation mode: metadata")
    try:
        try:  # (as QEMU's file driver words it; a size past INT64_MAX is negative there)
            if size > INT64_MAX:
                raise Qcow2IOError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            file.truncate(size)
        except Qcow2IOError as exc:
            if file.is_device:  # ("Cannot grow device files", as QEMU's host_device says)
                raise
            raise exc.in_context("Could not resize file") from None
        if preallocation == "off" and size and not file.is_device:
            # As QEMU's file driver: the first block of a new file is allocated (zeros),
            # so that later probes of the file's allocation alignment find a data block.
            file.pwrite(bytes(min(size, FIRST_BLOCK)), 0)
        preallocate(file, 0, size, preallocation)
        if preallocation == "full":
            file.flush()  # (an empty raw file, as qemu-img makes it, holds nothing to sync)
    finally:
        file.close()


def _write_empty_qcow2(
    path,
    size,
    version,
    cluster_size,
    backing_file,
    backing_fmt,
    refcount_bits,
    lazy_refcounts,
    extended_l2,
    data_file,
    data_file_raw,
    compression_type,
    encrypt_format,
    luks_header,
) -> None:
    from array import array  # (the table machinery, loaded when an image is made)

    from .cache import encode_be64
    from .refcount import RefcountBlock

    bits = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    hdr = Header(
        version=version,
        cluster_bits=bits,
        size=size,
        refcount_order=order,
        header_length=112 if version >= 3 else S.HEADER_V2_SIZE,
    )
    if extended_l2:
        hdr.incompatible_features |= S.INCOMPAT_EXTL2
    if compression_type == "zstd":
        hdr.incompatible_features |= S.INCOMPAT_COMPRESSION
        hdr.compression_type = 1
    if data_file:
        hdr.incompatible_features |= S.INCOMPAT_DATA_FILE
        hdr.data_file = data_file
        if data_file_raw:
            hdr.autoclear_features |= S.AUTOCLEAR_DATA_FILE_RAW
    if lazy_refcounts:
        hdr.compatible_features |= S.COMPAT_LAZY_REFCOUNTS
    if backing_file:
        hdr.backing_file = backing_file
        hdr.backing_format = backing_fmt
    if encrypt_format:
        hdr.crypt_method = 2 if encrypt_format == "luks" else 1
    hdr.l1_size = hdr.l1_entries_needed()
    layout = None if luks_header else _qemu_layout(cluster_size, refcount_bits, hdr.l1_size * 8)
    if layout is not None:
        _write_qemu_layout(path, hdr, cluster_size, refcount_bits, *layout)
        return
    l1_clusters = -(-hdr.l1_size * 8 // cluster_size)
    crypto_clusters = -(-len(luks_header) // cluster_size)
    block_entries = cluster_size * 8 // refcount_bits
    table_clusters = blocks = 1
    while True:  # the refcount structure must count itself
        total = 1 + table_clusters + blocks + l1_clusters + crypto_clusters
        need_blocks = -(-total // block_entries)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    hdr.refcount_table_offset = cluster_size
    hdr.refcount_table_clusters = table_clusters
    first_block = 1 + table_clusters
    hdr.l1_table_offset = (first_block + blocks) * cluster_size
    if luks_header:  # after the L1 table, as QEMU lays it out
        hdr.crypto_offset = hdr.l1_table_offset + l1_clusters * cluster_size
        hdr.crypto_length = len(luks_header)
    table = array("Q", [(first_block + i) * cluster_size for i in range(blocks)])
    table.extend([0] * (table_clusters * cluster_size // 8 - blocks))
    file = _container(path)
    step: str | None = _HEADER_STEP
    try:  # (in the order QEMU writes them: see _write_qemu_layout)
        _write_header_cluster(file, hdr.pack(), cluster_size)
        step = _REFCOUNT_STEP
        file.pwrite(encode_be64(table), cluster_size)
        for i in range(blocks):
            block = RefcountBlock(order, bytes(cluster_size))
            for j in range(min(block_entries, total - i * block_entries)):
                block.set(j, 1)
            file.pwrite(block.to_bytes(), (first_block + i) * cluster_size)
            step = _L1_BLOCKS_STEP
        _check_header_kept(file)
        step = _L1_STEP
        if file.is_device:  # a device keeps old bytes where a new file would read zeros
            file.pwrite(bytes(l1_clusters * cluster_size), hdr.l1_table_offset)
        file.truncate(total * cluster_size)
        if luks_header:
            step = "Could not zero fill encryption header"
            file.pwrite(luks_header, hdr.crypto_offset)
        step = None
        file.flush()
    except Qcow2IOError as exc:
        raise _creation_failure(exc, step) from None
    finally:
        file.close()


# What QEMU's qcow2 creation says when writing a step of the new image fails: the header
# cluster, then the refcount table with its first block, then (growing the L1 table to
# the image's size) the L1 table and the refcount blocks it needs.
_HEADER_STEP = "Could not write qcow2 header"
_REFCOUNT_STEP = "Could not write refcount table"
_L1_STEP = "Could not resize image: Failed to grow the L1 table"
_L1_BLOCKS_STEP = "the refcount blocks for the L1 table"


def _creation_failure(exc: Qcow2IOError, step: str | None) -> Qcow2IOError:
    """A write of a new qcow2 image that failed at `step`, as QEMU reports it (None: as
    it is). Where a refcount block the L1 table needs could not be written, QEMU's
    refcount cache still holds it when the image is closed, and says so first."""
    if step is None:
        return exc
    if step is not _L1_BLOCKS_STEP:
        return exc.in_context(step)
    failure = exc.in_context(_L1_STEP)
    failure.reported = f"Failed to flush the refcount block cache: {exc.errno_text()}"
    return failure


def _qemu_layout(
    cluster_size: int, refcount_bits: int, l1_bytes: int
) -> tuple[int, dict[int, int], int] | None:
    """Where qemu-img's create puts the L1 table and the refcount blocks, or None when
    its refcount table (one cluster) would have to grow.

    QEMU first writes the header, a one-cluster refcount table and one refcount block
    (clusters 0-2), then grows the empty L1 table to its size: the table takes the
    clusters from 3 on, but only its bytes are written, so the file ends with it. Each
    refcount block the table's clusters then need goes to the next free cluster; a block
    that lands outside the range it describes is counted by the block covering it, placed
    right after. Returns (L1 offset, {refcount table index: block cluster}, file size).
    """
    block_entries = cluster_size * 8 // refcount_bits
    table_entries = cluster_size // 8
    blocks = {0: 2}
    if not l1_bytes:
        return 0, blocks, 3 * cluster_size
    l1_first = 3
    next_free = l1_first + -(-l1_bytes // cluster_size)

    def place(block_index: int) -> bool:
        nonlocal next_free
        if block_index in blocks:
            return True
        if block_index >= table_entries:
            return False
        cluster = next_free
        next_free += 1
        if cluster // block_entries != block_index and not place(cluster // block_entries):
            return False
        blocks[block_index] = cluster
        return True

    for block_index in range(l1_first // block_entries, (next_free - 1) // block_entries + 1):
        if not place(block_index):
            return None
    file_end = max(l1_first * cluster_size + l1_bytes, (max(blocks.values()) + 1) * cluster_size)
    return l1_first * cluster_size, blocks, file_end


def _write_qemu_layout(
    path: str,
    hdr: Header,
    cluster_size: int,
    refcount_bits: int,
    l1_offset: int,
    blocks: dict[int, int],
    file_end: int,
) -> None:
    """Write a new image laid out by _qemu_layout: header, refcount table and blocks
    counting every cluster in use, the L1 table as zeros. The header's whole cluster and
    the L1 table's bytes are written, not left sparse, so the file's allocation is
    qemu-img's: QEMU takes an image using much less disk than its refcounts count for one
    with preallocated metadata, and then reports zeros where a data cluster is missing."""
    from array import array  # (the table machinery, loaded when an image is made)

    from .cache import encode_be64
    from .refcount import RefcountBlock

    order = refcount_bits.bit_length() - 1
    block_entries = cluster_size * 8 // refcount_bits
    hdr.refcount_table_offset = cluster_size
    hdr.refcount_table_clusters = 1
    hdr.l1_table_offset = l1_offset
    used = {0, 1, *blocks.values()}
    if l1_offset:
        first = l1_offset // cluster_size
        used.update(range(first, first + -(-hdr.l1_size * 8 // cluster_size)))
    table = array("Q", [0] * (cluster_size // 8))
    for block_index, cluster in blocks.items():
        table[block_index] = cluster * cluster_size
    file = _container(path)
    step: str | None = _HEADER_STEP
    try:
        _write_header_cluster(file, hdr.pack(), cluster_size)
        step = _REFCOUNT_STEP
        file.pwrite(encode_be64(table), cluster_size)
        for block_index, cluster in sorted(blocks.items()):
            block = RefcountBlock(order, bytes(cluster_size))
            base = block_index * block_entries
            for used_cluster in used:
                if base <= used_cluster < base + block_entries:
                    block.set(used_cluster - base, 1)
            file.pwrite(block.to_bytes(), cluster * cluster_size)
            step = _L1_BLOCKS_STEP  # (the first block goes with the table, the others with L1)
        _check_header_kept(file)
        step = _L1_STEP
        if file.is_device:  # a device (or NBD export) keeps old bytes and its size
            if l1_offset:
                file.pwrite(bytes(-(-hdr.l1_size * 8 // cluster_size) * cluster_size), l1_offset)
        else:
            if l1_offset:
                file.pwrite(bytes(hdr.l1_size * 8), l1_offset)
            file.truncate(file_end)
        step = None
        file.flush()
    except Qcow2IOError as exc:
        raise _creation_failure(exc, step) from None
    finally:
        file.close()


def _check_header_kept(file) -> None:
    """QEMU opens the image it creates once its header and refcounts are written, and a
    device that does not keep what is written to it (/dev/null) fails there, as here."""
    if file.is_device and file.pread(4, 0) != S.QCOW_MAGIC.to_bytes(4, "big"):
        raise CorruptImageError("Image is not in qcow2 format")


def _write_header_cluster(file, header: bytes, cluster_size: int) -> None:
    """The header with its cluster's zero padding, written whole as QEMU writes it: the
    file's allocated size (QEMU's metadata preallocation heuristic reads it) and a
    device's stale bytes after the header depend on it."""
    file.pwrite(header + bytes(-len(header) % cluster_size), 0)
