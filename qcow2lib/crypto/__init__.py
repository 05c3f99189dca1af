"""Disk encryption for qcow2lib: LUKS1 (qcow2 crypt_method 2, raw LUKS) and legacy qcow2 AES.

The engine calls:

* `open_crypto(crypt_method, read_fn, luks_offset, luks_length, passphrase)` ->
  `SectorCrypto` (None for crypt_method 0).  `read_fn(offset, length)` reads the *image
  file* at an absolute offset; luks_offset/luks_length come from the qcow2 "full disk
  encryption header pointer" extension (0, 0 for AES).
* `crypto.encrypt(sector, buf)` / `crypto.decrypt(sector, buf)` in place on a writable
  buffer whose length is a multiple of 512, `sector` being the first 512-byte sector's
  number: `crypto.sector_number(host_offset, guest_offset)` gives it -- the host offset / 512
  for LUKS in qcow2 (`crypto.physical_offset` is True), the guest offset / 512 for AES.
  A run may cross cluster boundaries only if it is contiguous in *both* numbering spaces
  that matter (host for LUKS, guest for AES); simplest is to call once per contiguous run.
* `create_luks_header(passphrase, options)` -> (header_bytes, master_key): write
  header_bytes into freshly allocated clusters, set the crypto extension to
  (their offset, len(header_bytes)), crypt_method 2; then
  `luks_crypto_from_key(header_bytes, master_key)` gives the SectorCrypto for the new image
  without another PBKDF2 run.
* `amend_luks(read_fn, write_fn, luks_offset, luks_length, passphrase, options)` for
  qemu-img amend's encrypt.* options (add / erase key slots).
* `luks_info(read_fn, luks_offset, luks_length)` for `qemu-img info` (no passphrase).
"""

from __future__ import annotations

from ..errors import BadSecretError, CorruptImageError, InvalidArgumentError
from .aes_legacy import legacy_key, open_aes_legacy
from .ciphers import SECTOR_SIZE, SectorCipher, SectorCrypto
from .luks import HEADER_SIZE, LuksHeader, LuksVolume, create_luks

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

__all__ = [
    "CRYPT_NONE",
    "CRYPT_AES",
    "CRYPT_LUKS",
    "SECTOR_SIZE",
    "SectorCrypto",
    "SectorCipher",
    "LuksHeader",
    "LuksVolume",
    "open_crypto",
    "open_luks_header",
    "create_luks_header",
    "luks_crypto_from_key",
    "amend_luks",
    "luks_info",
    "open_luks_raw",
    "open_aes_legacy",
    "legacy_key",
]


def _relative(fn, base: int):
    return lambda offset, *args: fn(base + offset, *args)


def open_luks_header(
    read_fn, luks_offset: int, luks_length: int, write_fn=None, cluster_size: int | None = None
) -> LuksVolume:
    """Parse and validate the LUKS header of a qcow2 image (no passphrase needed)."""
    if not luks_offset:
        raise CorruptImageError("Missing CRYPTO header for crypt method 2 (crypto_offset 0)")
    if cluster_size and luks_offset % cluster_size:
        raise CorruptImageError(
            f"Encryption header offset '{luks_offset}' is not a multiple of cluster size "
            f"'{cluster_size}' (crypto_offset)"
        )
    if luks_length < HEADER_SIZE:
        raise CorruptImageError(
            f"Encryption header too small (crypto_length {luks_length}, need {HEADER_SIZE})"
        )
    return LuksVolume.load(
        _relative(read_fn, luks_offset),
        luks_length,
        _relative(write_fn, luks_offset) if write_fn else None,
    )


def open_crypto(
    header_crypt_method: int,
    read_fn,
    luks_offset: int = 0,
    luks_length: int = 0,
    passphrase=None,
    *,
    cluster_size: int | None = None,
) -> SectorCrypto | None:
    """The SectorCrypto of a qcow2 image, unlocked with `passphrase`.

    crypt_method 0 -> None; 1 -> legacy AES (guest sectors; any passphrase "works");
    2 -> LUKS (host sectors), BadSecretError if no key slot opens with `passphrase`.
    """
    if header_crypt_method == CRYPT_NONE:
        return None
    if header_crypt_method == CRYPT_AES:
        if luks_offset:
            raise CorruptImageError(
                "CRYPTO header extension only expected with LUKS encryption method (crypt_method 1)"
            )
        if passphrase is None:
            raise BadSecretError("Parameter 'encrypt.key-secret' is required for cipher")
        return open_aes_legacy(passphrase)
    if header_crypt_method == CRYPT_LUKS:
        vol = open_luks_header(read_fn, luks_offset, luks_length, cluster_size=cluster_size)
        if passphrase is None:
            raise BadSecretError("Parameter 'encrypt.key-secret' is required for cipher")
        master_key, _ = vol.unlock(passphrase)
        return vol.sector_crypto(master_key, physical_offset=True)
    raise InvalidArgumentError(
        f"Unsupported encryption method {header_crypt_method} (crypt_method)"
    )


def create_luks_header(passphrase, options=None) -> tuple[bytes, bytes]:
    """A new LUKS header region for qcow2: (bytes to store, master key).

    options: qemu-img's encrypt.* create options -- cipher-alg (aes-128/192/256, default
    aes-256), cipher-mode (xts default, cbc, ecb, ctr), ivgen-alg (plain64 default, plain,
    essiv), ivgen-hash-alg (sha256 default for essiv), hash-alg (sha256), iter-time (ms,
    2000).  Keys may be spelled 'encrypt.cipher-alg', 'cipher-alg' or 'cipher_alg'.
    The length of the bytes is the crypto extension's length (a multiple of 512).
    """
    region, master_key, _ = create_luks(passphrase, options)
    return region, master_key


def luks_crypto_from_key(
    header_bytes: bytes, master_key: bytes, physical_offset: bool = True
) -> SectorCrypto:
    """The SectorCrypto for a header you hold and its master key (no PBKDF2)."""
    hdr = LuksHeader.parse(header_bytes[:HEADER_SIZE])
    if not hdr.master_key_matches(master_key):
        raise BadSecretError("master key does not match the LUKS header's digest")
    return LuksVolume(hdr, None).sector_crypto(master_key, physical_offset)


def amend_luks(
    read_fn, write_fn, luks_offset: int, luks_length: int, passphrase, options, force: bool = False
) -> list[int]:
    """qemu-img amend on the LUKS header of a qcow2 image; returns the slots changed.

    options: state=active|inactive, new-secret, old-secret, keyslot, iter-time, secret --
    with the passphrases themselves as values.  write_fn(offset, data) writes the image file
    at an absolute offset (inside the header clusters only).
    """
    vol = open_luks_header(read_fn, luks_offset, luks_length, write_fn)
    return vol.amend(passphrase, options, force)


def luks_info(read_fn, luks_offset: int, luks_length: int) -> dict:
    """qemu-img info's "encrypt" dict for a LUKS qcow2 image (format included)."""
    info = open_luks_header(read_fn, luks_offset, luks_length).header.info()
    return {"format": "luks", **info}


def open_luks_raw(read_fn, passphrase, file_size: int | None = None) -> SectorCrypto:
    """A raw LUKS volume (QEMU's 'luks' driver): sector = guest offset / 512 and the
    ciphertext of guest offset X lives at file offset `crypto.payload_offset + X`."""
    vol = LuksVolume.load(read_fn, file_size)
    master_key, _ = vol.unlock(passphrase)
    return vol.sector_crypto(master_key, physical_offset=False)
