"""zlib and zstd behind one small interface, and the thread pool that runs them.

QEMU stores zlib clusters as raw deflate with a 4 KiB window and zstd clusters as one
or more zstd frames; both libraries release the GIL, so decompressing many clusters in
a pool keeps every core busy.
"""

from __future__ import annotations

import os
import threading

from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

ZLIB, ZSTD = "zlib", "zstd"

_pool: ThreadPoolExecutor | None = None
_pool_size = os.cpu_count() or 2


def set_pool_size(threads: int) -> None:
    """How many threads compress, decompress and cipher at once (default: one per core)."""
    global _pool, _pool_size
    if threads < 1:
        raise InvalidArgumentError(f"codec thread count must be at least 1, not {threads}")
    old, _pool, _pool_size = _pool, None, threads
    if old is not None:
        old.shutdown(wait=True)


def pool() -> ThreadPoolExecutor:
    """The shared codec pool, made (and concurrent.futures imported) on first use."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="qcow2-codec")
    return _pool


def _zstandard():
    """The zstandard module, imported the first time a zstd cluster is met (start-up of
    every command that meets none stays free of it)."""
    import zstandard

    return zstandard


def decompress(kind: str, data: bytes, cluster_size: int, where: str = "") -> bytes:
    """One cluster's worth of data; CorruptImageError if the stream is damaged, short, or
    (zstd) a frame goes on past the cluster. `where` names the cluster in messages.

    Memory stays within about one cluster whatever the stream claims: a cluster of a few
    hundred KiB can inflate to gigabytes (a decompression bomb). As QEMU does, zlib stops
    at the cluster size and keeps what it has, and a zstd frame must end exactly there.
    """
    import zlib  # (here: an extension module to load, which images without compressed
    # clusters never need; qimg starts often)

    errors = (zlib.error, _zstandard().ZstdError) if kind == ZSTD else zlib.error
    try:
        if kind == ZLIB:
            inflater = zlib.decompressobj(-12)
            out = inflater.decompress(data, cluster_size)  # max_length bounds the output
        elif kind == ZSTD:
            out = _zstd_cluster(memoryview(data), cluster_size, where)
        else:
            raise UnsupportedFeatureError(f"unknown compression type {kind!r}")
    except errors as exc:
        raise CorruptImageError(
            f"compressed cluster{where} cannot be decompressed ({kind}): {exc}"
        ) from None
    if len(out) < cluster_size:
        raise CorruptImageError(
            f"compressed cluster{where} decompresses to {len(out)} bytes, "
            f"expected {cluster_size} ({kind})"
        )
    return out


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # and the next 15 values: frames a decoder skips
_ZSTD_BLOCK_MAX = 128 << 10  # the most one block can produce


def _zstd_cluster(data: memoryview, cluster_size: int, where: str) -> bytes:
    """Decode zstd frames (QEMU may write several) until a frame ends with the cluster full.

    The decoder is fed whole blocks, only as many as can fill what is left of the cluster
    (their headers bound what each produces), so it never makes more than one block beyond
    the cluster: a frame that produces data past the cluster, or does not end where the
    cluster does, is refused as QEMU refuses it, long before a bomb can grow.
    """
    chunks: list[bytes] = []
    produced = 0

    def room() -> int:
        return cluster_size - produced

    frame_start = 0
    while frame_start < len(data):
        inflater = _zstandard().ZstdDecompressor().decompressobj()
        fed_end = frame_start
        for piece in _zstd_pieces(data, frame_start, room, where):
            fed_end += len(piece)
            chunk = inflater.decompress(piece)
            chunks.append(chunk)
            produced += len(chunk)
            if produced > cluster_size:
                raise CorruptImageError(
                    f"compressed cluster{where} inflates past the cluster size ({cluster_size} "
                    f"bytes) within one zstd frame"
                )
            if inflater.eof:
                break
        if not inflater.eof:
            if fed_end < len(data):
                raise CorruptImageError(
                    f"compressed cluster{where}: a zstd frame goes on past "
                    f"the end its block headers give (byte {fed_end})"
                )
            break  # the data ends inside the frame
        if produced == cluster_size:
            return b"".join(chunks)
        frame_start = fed_end - len(inflater.unused_data)
    if produced == cluster_size:
        raise CorruptImageError(
            f"compressed cluster{where}: the zstd frame that fills the "
            f"cluster does not end within the compressed data"
        )
    return b"".join(chunks)


def _zstd_pieces(data: memoryview, start: int, room, where: str):
    """The frame at `start` in pieces of whole blocks: each piece holds as many blocks as
    `room()` (what the cluster still lacks) can take by their most output, at least one."""
    piece_start = piece_end = start
    most = 0
    for block_end, block_most in _zstd_blocks(data, start, where):
        if piece_end > piece_start and most + block_most > room():
            yield data[piece_start:piece_end]
            piece_start, most = piece_end, 0
        piece_end, most = block_end, most + block_most
    if piece_end > piece_start:
        yield data[piece_start:piece_end]


def _zstd_blocks(data: memoryview, start: int, where: str):
    """(end offset, most output) of each block of the frame at `start`, from its frame and
    block headers (RFC 8878); the first block's range takes the frame header, the last
    one's the checksum. A frame cut short ends at the end of the data."""
    size = len(data)
    magic = int.from_bytes(data[start : start + 4], "little")
    if size - start < 5:
        yield size, 0
        return
    if magic & ~0xF == _ZSTD_SKIPPABLE:
        yield min(size, start + 8 + int.from_bytes(data[start + 4 : start + 8], "little")), 0
        return
    if magic != _ZSTD_MAGIC:
        raise CorruptImageError(
            f"compressed cluster{where}: no zstd frame at byte {start} of "
            f"the compressed data (magic 0x{magic:08x})"
        )
    descriptor = data[start + 4]
    single_segment = descriptor >> 5 & 1
    pos = (
        start
        + 5
        + (0 if single_segment else 1)
        + (0, 1, 2, 4)[descriptor & 3]
        + (single_segment, 2, 4, 8)[descriptor >> 6]
    )
    while pos + 3 <= size:
        header = int.from_bytes(data[pos : pos + 3], "little")
        block_type, block_size = header >> 1 & 3, header >> 3
        if block_type == 1:  # RLE: one stored byte, repeated block_size times
            pos, most = pos + 4, block_size
        elif block_type == 0:  # raw
            pos, most = pos + 3 + block_size, block_size
        else:  # compressed (or reserved, which the decoder refuses)
            pos, most = pos + 3 + block_size, _ZSTD_BLOCK_MAX
        if header & 1:  # the last block, then the content checksum if there is one
            yield min(size, pos + (4 if descriptor & 4 else 0)), most
            return
        yield min(size, pos), most
    yield size, 0


_per_thread = threading.local()


def compress(kind: str, data: bytes | memoryview) -> bytes:
    """Compress one cluster the way QEMU does (raw deflate, 4 KiB window, memory level 9 / one
    zstd frame), so the same input gives the same bytes."""
    if kind == ZLIB:
        import zlib  # (see decompress)

        deflater = zlib.compressobj(6, zlib.DEFLATED, -12, 9)  # (memLevel 9, as QEMU)
        return deflater.compress(data) + deflater.flush()
    if kind == ZSTD:
        # One compressor per thread, kept: making one sets up a context of its own,
        # which cost as much as compressing a 64 KiB cluster. (A compressor is not
        # safe for two threads at once; its output does not depend on earlier calls.)
        compressor = getattr(_per_thread, "zstd", None)
        if compressor is None:
            compressor = _per_thread.zstd = _zstandard().ZstdCompressor()
        return compressor.compress(data)
    raise UnsupportedFeatureError(f"unknown compression type {kind!r}")
