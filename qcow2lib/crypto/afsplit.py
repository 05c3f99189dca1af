"""LUKS anti-forensic splitter (AF split / merge), as in the LUKS1 spec and QEMU's afsplit.c.

A key of `blocklen` bytes is stored as `stripes` blocks: stripes-1 random blocks and a last
block equal to key xor diffuse(...diffuse(r1) xor r2 ...).  The diffusion hashes the block
digest-sized piece by piece, each piece prefixed with its index as a big-endian uint32.
"""

from __future__ import annotations

import hashlib
import os

from .ciphers import digest_len


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(hash_name: str, block: bytes) -> bytes:
    dlen = digest_len(hash_name)
    out = []
    for index, start in enumerate(range(0, len(block), dlen)):
        piece = block[start : start + dlen]
        h = hashlib.new(hash_name)
        h.update(index.to_bytes(4, "big"))
        h.update(piece)
        out.append(h.digest()[: len(piece)])
    return b"".join(out)


def af_merge(hash_name: str, material: bytes, blocklen: int, stripes: int) -> bytes:
    """Recover the key from `stripes` blocks of `blocklen` bytes."""
    if len(material) < blocklen * stripes:
        raise ValueError(f"AF material {len(material)} bytes, need {blocklen * stripes}")
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_name, _xor(material[i * blocklen : (i + 1) * blocklen], block))
    last = stripes - 1
    return _xor(material[last * blocklen : (last + 1) * blocklen], block)


def af_split(hash_name: str, key: bytes, stripes: int, random=os.urandom) -> bytes:
    """Spread `key` over `stripes` blocks; the inverse of `af_merge`."""
    blocklen = len(key)
    noise = random(blocklen * (stripes - 1))
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_name, _xor(noise[i * blocklen : (i + 1) * blocklen], block))
    return noise + _xor(key, block)
