"""zlib and zstd behind one small interface, and the thread pool that runs them.

QEMU stores zlib clusters as raw deflate with a 4 KiB window and zstd clusters as one
or more zstd frames; both libraries release the GIL, so decompressing many clusters in
a pool keeps every core busy.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import zstandard

from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError

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
    """The shared codec pool."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="qcow2-codec")
    return _pool


def decompress(kind: str, data: bytes, cluster_size: int) -> bytes:
    """One cluster's worth of data; CorruptImageError if the stream is damaged or short."""
    try:
        if kind == ZLIB:
            inflater = zlib.decompressobj(-12)
            out = inflater.decompress(data, cluster_size)
        elif kind == ZSTD:
            reader = zstandard.ZstdDecompressor().decompressobj()
            out = b""
            rest = data
            while rest and len(out) < cluster_size:  # QEMU may write several frames
                out += reader.decompress(rest)
                rest = reader.unused_data
                if rest and reader.eof:
                    reader = zstandard.ZstdDecompressor().decompressobj()
            out = out[:cluster_size]
        else:
            raise UnsupportedFeatureError(f"unknown compression type {kind!r}")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise CorruptImageError(f"compressed cluster cannot be decompressed ({kind}): {exc}") from None
    if len(out) < cluster_size:
        raise CorruptImageError(
            f"compressed cluster decompresses to {len(out)} bytes, expected {cluster_size} ({kind})")
    return out


def compress(kind: str, data: bytes) -> bytes:
    """Compress one cluster the way QEMU does (raw deflate, 4 KiB window / one zstd frame)."""
    if kind == ZLIB:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
        return deflater.compress(data) + deflater.flush()
    if kind == ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    raise UnsupportedFeatureError(f"unknown compression type {kind!r}")
