"""qcow2's legacy encryption (crypt_method 1, "aes"), QEMU's crypto/block-qcow.c.

Broken by design and kept only to read (and rewrite) old images: the key is the
passphrase's bytes, truncated or zero-padded to 16 bytes (no KDF, no salt); each 512-byte
sector is AES-128-CBC encrypted with the "plain64" IV, i.e. the little-endian 64-bit
*guest* sector number (offset in the virtual disk / 512) -- not the host offset, unlike
LUKS in qcow2.  There is no header and no way to check the passphrase: a wrong one just
decrypts to garbage.
"""

from __future__ import annotations

from .ciphers import Plain64IVGen, SectorCipher, SectorCrypto, secret_bytes

KEY_LEN = 16


def legacy_key(passphrase) -> bytes:
    """QEMU's key: strlen(passphrase) bytes, at most 16, zero padded to 16."""
    return secret_bytes(passphrase)[:KEY_LEN].ljust(KEY_LEN, b"\0")


def open_aes_legacy(passphrase) -> SectorCrypto:
    """The SectorCrypto of a crypt_method 1 image (sector = guest offset / 512)."""
    return SectorCrypto(
        SectorCipher("cbc", legacy_key(passphrase), Plain64IVGen()), "aes", physical_offset=False
    )
