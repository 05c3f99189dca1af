"""LUKS1 volumes: the header, key slots, unlocking, creation and key-slot management.

The layout is the LUKS1 on-disk format (cryptsetup's spec 1.2.1) as QEMU writes it
(crypto/block-luks.c): a 592-byte big-endian header at offset 0, eight key slots whose
AF-split, encrypted copies of the master key start at sector 8, each region rounded up
to 8 sectors, and the payload after the last one.  Inside qcow2 the header region lives in
clusters named by the "full disk encryption header pointer" extension, whose length is the
payload offset; the payload offset itself is unused there.

Every access to the header region goes through `LuksVolume`, whose reader and writer take
offsets relative to the start of the LUKS header and are bounded by its length.
"""

from __future__ import annotations

import hmac
import os
import uuid as uuid_mod
from dataclasses import dataclass, field

from construct import Array, Bytes, ConstructError, Int16ub, Int32ub, Struct

from ..errors import (
    BadSecretError,
    CorruptImageError,
    InvalidArgumentError,
    UnsupportedFeatureError,
)
from . import afsplit
from .ciphers import (
    AES_KEY_LEN,
    CIPHER_MODES,
    IVGEN_ALGS,
    KNOWN_UNSUPPORTED_CIPHERS,
    SECTOR_SIZE,
    SectorCipher,
    SectorCrypto,
    check_hash,
    essiv_cipher_key_len,
    digest_len,
    make_ivgen,
    pbkdf2,
    pbkdf2_iterations_for,
    secret_bytes,
)

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
UUID_LEN = 40
NAME_LEN = 32
KEY_SLOT_OFFSET = 4096
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
MIN_SLOT_KEY_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
DEFAULT_ITER_TIME_MS = 2000
ERASE_PASSES = 40  # QEMU overwrites an erased slot's key material 40 times
MAX_MASTER_KEY_LEN = 64  # AES-256-XTS; anything longer is no cipher QEMU knows
UINT32_MAX = 0xFFFFFFFF

KeySlotStruct = Struct(
    "active" / Int32ub,
    "iterations" / Int32ub,
    "salt" / Bytes(SALT_LEN),
    "key_offset_sector" / Int32ub,
    "stripes" / Int32ub,
)

LuksHeaderStruct = Struct(
    "magic" / Bytes(6),
    "version" / Int16ub,
    "cipher_name" / Bytes(NAME_LEN),
    "cipher_mode" / Bytes(NAME_LEN),
    "hash_spec" / Bytes(NAME_LEN),
    "payload_offset_sector" / Int32ub,
    "master_key_len" / Int32ub,
    "master_key_digest" / Bytes(DIGEST_LEN),
    "master_key_salt" / Bytes(SALT_LEN),
    "master_key_iterations" / Int32ub,
    "uuid" / Bytes(UUID_LEN),
    "key_slots" / Array(NUM_KEY_SLOTS, KeySlotStruct),
)
HEADER_SIZE = LuksHeaderStruct.sizeof()  # 592
assert HEADER_SIZE == 592 and KeySlotStruct.sizeof() == 48

# Cipher names in the LUKS header (cryptsetup's) and the key sizes QEMU accepts for them.
_LUKS_CIPHER_SIZES = {
    "aes": (16, 24, 32),
    "cast5": (16,),
    "serpent": (16, 24, 32),
    "twofish": (16, 24, 32),
}


def splitkey_sectors(master_key_len: int, stripes: int) -> int:
    """Sectors of one key slot's material, rounded up to the header size (cryptsetup's rule)."""
    sectors = -(-(master_key_len * stripes) // SECTOR_SIZE)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def _cstr(raw: bytes, field_name: str) -> str:
    if b"\0" not in raw:
        raise CorruptImageError(
            f"LUKS header {field_name} is not NUL terminated ({field_name} {raw!r})"
        )
    return raw.split(b"\0", 1)[0].decode("latin-1")


# The PBKDF2 work one open may do, counted in hash-block computations (an iteration
# yielding a key longer than the hash costs one per digest-sized block), summed over the
# active key slots a wrong passphrase tries: each slot's key, then the master key digest.
# qemu-img 7.2 create with encrypt.iter-time=10000 (10 s) made, on a 2-core Xeon, a slot of
# 44,643,050 iterations (aes-256-xts, 64-byte key: two SHA-256 blocks each) and a digest
# of 11,113,461: 100M blocks (QEMU's nettle does 8.9M a CPU second there, Python's
# OpenSSL-backed hashlib 4.6M). One open may do 8 times that: every image qemu-img makes
# with iter-time up to 10 s opens, also one made on a machine up to 8 times faster, and
# a wrong passphrase costs at most about 3 minutes of CPU there, where a hostile header
# (8 slots of 2^32-1 iterations) would cost hours; it is refused at once.
# Blocks of slower hashes count more, by what one PBKDF2 iteration costs against SHA-256's
# (hashlib, measured: sha384/sha512 2.5x, ripemd160 2.2x, md5 1.25x; sha1, sha224 as
# sha256), so that the bound is the same CPU time whatever hash the header names.
QEMU_ITER_TIME_10S_BLOCKS = 44_643_050 * 2 + 11_113_461
MAX_KDF_BLOCKS = 8 * QEMU_ITER_TIME_10S_BLOCKS  # in SHA-256 blocks
HASH_BLOCK_WEIGHT = {"sha384": 2.5, "sha512": 2.5, "ripemd160": 2.2, "md5": 1.25}


@dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset_sector: int = 0
    stripes: int = STRIPES

    @property
    def is_active(self) -> bool:
        return self.active == SLOT_ENABLED


@dataclass
class LuksHeader:
    """A parsed, validated LUKS1 header with its algorithms resolved."""

    cipher_name: str = "aes"
    cipher_mode_spec: str = "xts-plain64"
    hash_spec: str = "sha256"
    payload_offset_sector: int = 0
    master_key_len: int = 64
    master_key_digest: bytes = bytes(DIGEST_LEN)
    master_key_salt: bytes = bytes(SALT_LEN)
    master_key_iterations: int = MIN_MASTER_KEY_ITERS
    uuid: str = ""
    key_slots: list = field(default_factory=lambda: [KeySlot() for _ in range(NUM_KEY_SLOTS)])
    version: int = LUKS_VERSION
    # Resolved from the strings above by `resolve()`:
    cipher_alg: str = ""  # QEMU name, e.g. "aes-256"
    cipher_mode: str = ""  # xts, cbc, ecb, ctr
    ivgen_alg: str = ""  # plain, plain64, essiv
    ivgen_hash_alg: str | None = None
    hash_alg: str = ""  # PBKDF2 / AF hash

    # --- parsing ---------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes) -> "LuksHeader":
        """Parse and validate the first 592 bytes of a LUKS volume (QEMU's checks)."""
        if len(data) < HEADER_SIZE:
            raise CorruptImageError(
                f"LUKS header truncated ({len(data)} bytes, the header needs {HEADER_SIZE})"
            )
        try:
            raw = LuksHeaderStruct.parse(bytes(data[:HEADER_SIZE]))
        except ConstructError as exc:  # cannot happen with enough bytes, but never leak it
            raise CorruptImageError(f"LUKS header unreadable: {exc}") from None
        if raw.magic != LUKS_MAGIC:
            raise CorruptImageError(f"Volume is not in LUKS format (magic {raw.magic!r})")
        if raw.version != LUKS_VERSION:
            raise UnsupportedFeatureError(
                f"LUKS version {raw.version} is not supported (version {raw.version})"
            )
        hdr = cls(
            cipher_name=_cstr(raw.cipher_name, "cipher_name"),
            cipher_mode_spec=_cstr(raw.cipher_mode, "cipher_mode"),
            hash_spec=_cstr(raw.hash_spec, "hash_spec"),
            payload_offset_sector=raw.payload_offset_sector,
            master_key_len=raw.master_key_len,
            master_key_digest=bytes(raw.master_key_digest),
            master_key_salt=bytes(raw.master_key_salt),
            master_key_iterations=raw.master_key_iterations,
            uuid=raw.uuid.split(b"\0", 1)[0].decode("latin-1"),
            key_slots=[
                KeySlot(s.active, s.iterations, bytes(s.salt), s.key_offset_sector, s.stripes)
                for s in raw.key_slots
            ],
            version=raw.version,
        )
        hdr.check()
        hdr.resolve()
        return hdr

    def check(self) -> None:
        """Structural checks (QEMU's qcrypto_block_luks_check_header), sizes first."""
        if self.payload_offset_sector < HEADER_SECTORS:
            raise CorruptImageError(
                f"LUKS payload is overlapping with the header (payload_offset_sector "
                f"{self.payload_offset_sector})"
            )
        if self.master_key_iterations == 0:
            raise CorruptImageError("LUKS key iteration count is zero (master_key_iterations 0)")
        if not 0 < self.master_key_len <= MAX_MASTER_KEY_LEN:
            raise CorruptImageError(
                f"LUKS master key length out of range (master_key_len {self.master_key_len}, "
                f"limit {MAX_MASTER_KEY_LEN})"
            )
        spans: list[tuple[int, int]] = []
        for i, slot in enumerate(self.key_slots):
            if slot.stripes != STRIPES:
                raise CorruptImageError(
                    f"Keyslot {i} is corrupted (stripes {slot.stripes} != {STRIPES})"
                )
            if slot.active not in (SLOT_ENABLED, SLOT_DISABLED):
                raise CorruptImageError(
                    f"Keyslot {i} state (active/disable) is corrupted (active 0x{slot.active:x})"
                )
            if slot.is_active and slot.iterations == 0:
                raise CorruptImageError(f"Keyslot {i} iteration count is zero (iterations 0)")
            start = slot.key_offset_sector
            length = splitkey_sectors(self.master_key_len, slot.stripes)
            if start < HEADER_SECTORS:
                raise CorruptImageError(
                    f"Keyslot {i} is overlapping with the LUKS header (key_offset_sector {start})"
                )
            if start + length > self.payload_offset_sector:
                raise CorruptImageError(
                    f"Keyslot {i} is overlapping with the encrypted payload (key_offset_sector "
                    f"{start} + {length} sectors > payload_offset_sector "
                    f"{self.payload_offset_sector})"
                )
            for j, (start2, length2) in enumerate(spans):
                if start + length > start2 and start2 + length2 > start:
                    raise CorruptImageError(
                        f"Keyslots {j} and {i} are overlapping in the header (key_offset_sector "
                        f"{start2} and {start})"
                    )
            spans.append((start, length))

    def resolve(self) -> None:
        """Turn the cipher/mode/hash strings into algorithms (QEMU's parse_header)."""
        spec = self.cipher_mode_spec
        if "-" not in spec:
            raise CorruptImageError(f"Unexpected cipher mode string format '{spec}' (cipher_mode)")
        mode, ivgen = spec.split("-", 1)
        ivhash = None
        if ":" in ivgen:
            ivgen, ivhash = ivgen.split(":", 1)
            check_hash(ivhash, "Hash algorithm")
        if mode not in CIPHER_MODES:
            raise UnsupportedFeatureError(
                f"Cipher mode '{mode}' not supported (cipher_mode '{spec}')"
            )
        key_bytes = self.master_key_len
        if mode == "xts":
            if key_bytes % 2:
                raise CorruptImageError(
                    f"XTS master key length must be even (master_key_len {key_bytes})"
                )
            key_bytes //= 2
        sizes = _LUKS_CIPHER_SIZES.get(self.cipher_name)
        if sizes is None or key_bytes not in sizes:
            raise CorruptImageError(
                f"Algorithm '{self.cipher_name}' with key size {key_bytes} bytes not supported "
                f"(cipher_name '{self.cipher_name}', master_key_len {self.master_key_len})"
            )
        if self.cipher_name != "aes":
            raise UnsupportedFeatureError(
                f"LUKS cipher '{self.cipher_name}-{key_bytes * 8}' is not implemented by "
                f"qcow2lib (cipher_name '{self.cipher_name}')"
            )
        self.cipher_alg = f"aes-{key_bytes * 8}"
        self.cipher_mode = mode
        self.hash_alg = check_hash(self.hash_spec, "Hash algorithm")
        if ivgen not in IVGEN_ALGS:
            raise UnsupportedFeatureError(
                f"IV generator '{ivgen}' not supported (cipher_mode '{spec}')"
            )
        self.ivgen_alg = ivgen
        self.ivgen_hash_alg = ivhash
        if ivgen == "essiv":
            if not ivhash:
                raise CorruptImageError(
                    f"Missing IV generator hash specification (cipher_mode '{spec}')"
                )
            essiv_cipher_key_len(key_bytes, ivhash)

    # --- building --------------------------------------------------------------------

    def pack(self) -> bytes:
        """The 592 header bytes."""

        def name(value: str, field_name: str) -> bytes:
            data = value.encode("ascii")
            if len(data) >= NAME_LEN:
                raise InvalidArgumentError(f"{field_name} '{value}' is too long for LUKS header")
            return data.ljust(NAME_LEN, b"\0")

        return LuksHeaderStruct.build(
            dict(
                magic=LUKS_MAGIC,
                version=self.version,
                cipher_name=name(self.cipher_name, "Cipher name"),
                cipher_mode=name(self.cipher_mode_spec, "Cipher mode"),
                hash_spec=name(self.hash_spec, "Hash name"),
                payload_offset_sector=self.payload_offset_sector,
                master_key_len=self.master_key_len,
                master_key_digest=self.master_key_digest,
                master_key_salt=self.master_key_salt,
                master_key_iterations=self.master_key_iterations,
                uuid=self.uuid.encode("ascii")[:UUID_LEN].ljust(UUID_LEN, b"\0"),
                key_slots=[
                    dict(
                        active=s.active,
                        iterations=s.iterations,
                        salt=s.salt,
                        key_offset_sector=s.key_offset_sector,
                        stripes=s.stripes,
                    )
                    for s in self.key_slots
                ],
            )
        )

    # --- derived ---------------------------------------------------------------------

    @property
    def cipher_key_len(self) -> int:
        """Key length of the block cipher (half the master key for XTS)."""
        return AES_KEY_LEN[self.cipher_alg]

    @property
    def payload_offset(self) -> int:
        return self.payload_offset_sector * SECTOR_SIZE

    def split_key_len(self, slot: KeySlot) -> int:
        return self.master_key_len * slot.stripes

    def sector_cipher(self, key: bytes) -> SectorCipher:
        """The cipher used for the payload (master key) and the key material (slot key)."""
        ivgen = make_ivgen(
            self.ivgen_alg,
            key=key,
            cipher_key_len=self.cipher_key_len,
            hash_name=self.ivgen_hash_alg,
        )
        return SectorCipher(self.cipher_mode, key, ivgen)

    def slot_kdf_blocks(self, iterations: int) -> int:
        """PBKDF2 hash blocks one try of a slot with `iterations` costs, in SHA-256 blocks
        (HASH_BLOCK_WEIGHT): its key (as long as the master key), then the digest of the
        master key it yields."""
        block = digest_len(self.hash_alg)
        blocks = iterations * -(-self.master_key_len // block) + self.master_key_iterations * -(
            -DIGEST_LEN // block
        )
        return int(blocks * HASH_BLOCK_WEIGHT.get(self.hash_alg, 1))

    def check_new_slot_work(self, index: int, iterations: int, iter_time: int) -> None:
        """Refuse to give slot `index` `iterations` when the header could then not be
        opened again (see MAX_KDF_BLOCKS), before any key is derived."""
        total = sum(
            self.slot_kdf_blocks(slot.iterations if i != index else iterations)
            for i, slot in enumerate(self.key_slots)
            if slot.is_active or i == index
        )
        if total > MAX_KDF_BLOCKS:
            raise InvalidArgumentError(
                f"iter-time {iter_time} ms gives keyslot {index} {iterations} iterations: the "
                f"active keyslots would cost {total} PBKDF2 blocks to try, more than the limit "
                f"of {MAX_KDF_BLOCKS} one open may spend"
            )

    def check_kdf_work(self) -> None:
        """Refuse, before any key derivation, a header whose active slots would together
        cost more than MAX_KDF_BLOCKS (what a wrong passphrase pays: every slot)."""
        total = 0
        for index, slot in enumerate(self.key_slots):
            if not slot.is_active:
                continue
            total += self.slot_kdf_blocks(slot.iterations)
            if total > MAX_KDF_BLOCKS:
                raise CorruptImageError(
                    f"LUKS key derivation too costly: with keyslot {index} (iterations "
                    f"{slot.iterations}, master_key_iterations {self.master_key_iterations}) "
                    f"one open would compute PBKDF2-{self.hash_alg} worth {total} SHA-256 "
                    f"blocks, more than the limit of {MAX_KDF_BLOCKS}"
                )

    def master_key_matches(self, key: bytes) -> bool:
        digest = pbkdf2(
            self.hash_alg, key, self.master_key_salt, self.master_key_iterations, DIGEST_LEN
        )
        return hmac.compare_digest(digest, self.master_key_digest)

    def info(self) -> dict:
        """The LUKS part of `qemu-img info`'s format-specific data (same keys)."""
        out: dict = {
            "ivgen-alg": self.ivgen_alg,
            "hash-alg": self.hash_alg,
            "cipher-alg": self.cipher_alg,
            "uuid": self.uuid,
            "cipher-mode": self.cipher_mode,
            "slots": [],
            "payload-offset": self.payload_offset,
            "master-key-iters": self.master_key_iterations,
        }
        if self.ivgen_alg == "essiv":
            out["ivgen-hash-alg"] = self.ivgen_hash_alg
        for slot in self.key_slots:
            entry = {"active": slot.is_active}
            if slot.is_active:
                entry["iters"] = slot.iterations
            entry["key-offset"] = slot.key_offset_sector * SECTOR_SIZE
            if slot.is_active:
                entry["stripes"] = slot.stripes
            out["slots"].append(entry)
        return out


# --- options ------------------------------------------------------------------------------

CREATE_OPTIONS = (
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
)
AMEND_OPTIONS = ("state", "new-secret", "old-secret", "keyslot", "iter-time", "secret")


def normalize_options(options, allowed) -> dict:
    """Accept qemu-img spellings: 'encrypt.cipher-alg', 'cipher_alg', 'cipher-alg'."""
    out = {}
    for key, value in (options or {}).items():
        name = key[len("encrypt.") :] if key.startswith("encrypt.") else key
        name = name.replace("_", "-")
        if name == "format":
            if value not in ("luks", None):
                raise InvalidArgumentError(f"encryption format '{value}' is not LUKS (format)")
            continue
        if name not in allowed:
            raise InvalidArgumentError(f"Unknown LUKS option '{key}' (known: {', '.join(allowed)})")
        if value is not None:
            out[name] = value
    return out


def _iter_time(value) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"iter-time must be an integer (iter-time {value!r})") from None
    if result < 0:
        raise InvalidArgumentError(f"iter-time must not be negative (iter-time {result})")
    return result


def _scaled_iterations(
    hash_alg: str, out_len: int, iter_time: int, divisor: int, floor: int, what: str
) -> int:
    iters = pbkdf2_iterations_for(hash_alg, out_len, iter_time) // divisor
    if iters > UINT32_MAX:
        raise InvalidArgumentError(f"PBKDF iterations {iters} larger than {UINT32_MAX} ({what})")
    return max(iters, floor)


def header_for_options(options) -> tuple[LuksHeader, int]:
    """A header (no keys yet) for qemu-img's LUKS create options; returns it and iter-time."""
    opts = normalize_options(options, CREATE_OPTIONS)
    cipher_alg = str(opts.get("cipher-alg", "aes-256"))
    cipher_mode = str(opts.get("cipher-mode", "xts"))
    ivgen_alg = str(opts.get("ivgen-alg", "plain64"))
    hash_alg = check_hash(str(opts.get("hash-alg", "sha256")), "Hash algorithm")
    ivgen_hash = opts.get("ivgen-hash-alg")
    if ivgen_alg == "essiv" and ivgen_hash is None:
        ivgen_hash = "sha256"
    iter_time = _iter_time(opts.get("iter-time", DEFAULT_ITER_TIME_MS))
    if cipher_alg not in AES_KEY_LEN:
        if cipher_alg in KNOWN_UNSUPPORTED_CIPHERS:
            raise UnsupportedFeatureError(
                f"cipher-alg '{cipher_alg}' is not implemented by qcow2lib (use aes-128, "
                f"aes-192 or aes-256)"
            )
        raise InvalidArgumentError(f"Invalid parameter '{cipher_alg}' (cipher-alg)")
    if cipher_mode not in CIPHER_MODES:
        raise InvalidArgumentError(f"Invalid parameter '{cipher_mode}' (cipher-mode)")
    if ivgen_alg not in IVGEN_ALGS:
        raise InvalidArgumentError(f"Invalid parameter '{ivgen_alg}' (ivgen-alg)")
    spec = f"{cipher_mode}-{ivgen_alg}"
    if ivgen_hash is not None:
        ivgen_hash = check_hash(str(ivgen_hash), "Hash algorithm")
        spec += f":{ivgen_hash}"
    key_len = AES_KEY_LEN[cipher_alg] * (2 if cipher_mode == "xts" else 1)
    if key_len * STRIPES % SECTOR_SIZE:
        # QEMU 7.2 asserts on key material that is not a whole number of sectors (it
        # would abort opening the volume), so do not make one.
        raise UnsupportedFeatureError(
            f"cipher-alg '{cipher_alg}' with cipher-mode '{cipher_mode}' gives key material "
            f"of {key_len * STRIPES} bytes, not a multiple of {SECTOR_SIZE}; QEMU cannot open it"
        )
    split_sectors = splitkey_sectors(key_len, STRIPES)
    hdr = LuksHeader(
        cipher_name="aes",
        cipher_mode_spec=spec,
        hash_spec=hash_alg,
        payload_offset_sector=HEADER_SECTORS + NUM_KEY_SLOTS * split_sectors,
        master_key_len=key_len,
        key_slots=[
            KeySlot(SLOT_DISABLED, 0, bytes(SALT_LEN), HEADER_SECTORS + i * split_sectors, STRIPES)
            for i in range(NUM_KEY_SLOTS)
        ],
    )
    hdr.resolve()
    return hdr, iter_time


# --- the volume: header plus its key material region -----------------------------------


class LuksVolume:
    """A LUKS header region reachable through `read_fn(offset, length)` (and `write_fn(offset,
    data)` to change key slots), offsets relative to the header start, bounded by `length`
    (the qcow2 crypto extension length, or the raw file size; None = unbounded)."""

    def __init__(
        self,
        header: LuksHeader,
        read_fn,
        write_fn=None,
        length: int | None = None,
        random=os.urandom,
    ):
        self.header = header
        self._read_fn = read_fn
        self._write_fn = write_fn
        self.length = length
        self._random = random

    @classmethod
    def load(cls, read_fn, length: int | None = None, write_fn=None) -> "LuksVolume":
        if length is not None and length < HEADER_SIZE:
            raise CorruptImageError(
                f"LUKS header region too small (length {length}, the header needs {HEADER_SIZE})"
            )
        vol = cls(LuksHeader(), read_fn, write_fn, length)
        vol.header = LuksHeader.parse(vol._read(0, HEADER_SIZE, "LUKS header"))
        return vol

    def _bounds(self, offset: int, size: int, what: str) -> None:
        if self.length is not None and offset + size > self.length:
            raise CorruptImageError(
                f"{what} lies outside of the encryption header (offset {offset}, length {size}, "
                f"header length {self.length})"
            )

    def _read(self, offset: int, size: int, what: str) -> bytes:
        self._bounds(offset, size, what)
        data = bytes(self._read_fn(offset, size))
        if len(data) != size:
            raise CorruptImageError(
                f"{what} truncated: read {len(data)} of {size} bytes at offset {offset}"
            )
        return data

    def _write(self, offset: int, data: bytes, what: str) -> None:
        if self._write_fn is None:
            raise InvalidArgumentError("the LUKS header was opened without a writer")
        self._bounds(offset, len(data), what)
        self._write_fn(offset, data)

    def store_header(self) -> None:
        self._write(0, self.header.pack(), "LUKS header")

    # --- unlocking -------------------------------------------------------------------

    def try_slot(self, index: int, passphrase) -> bytes | None:
        """The master key if slot `index` is active and opens with `passphrase`, else None."""
        hdr = self.header
        slot = hdr.key_slots[index]
        if not slot.is_active:
            return None
        hdr.check_kdf_work()
        password = secret_bytes(passphrase)
        slot_key = pbkdf2(hdr.hash_alg, password, slot.salt, slot.iterations, hdr.master_key_len)
        material = bytearray(
            self._read(
                slot.key_offset_sector * SECTOR_SIZE,
                hdr.split_key_len(slot),
                f"Keyslot {index} key material",
            )
        )
        hdr.sector_cipher(slot_key).decrypt(0, material)
        key = afsplit.af_merge(hdr.hash_alg, bytes(material), hdr.master_key_len, slot.stripes)
        return key if hdr.master_key_matches(key) else None

    def unlock(self, passphrase) -> tuple[bytes, int]:
        """(master key, slot index) for the first active slot `passphrase` opens."""
        password = secret_bytes(passphrase)
        for index in range(NUM_KEY_SLOTS):
            key = self.try_slot(index, password)
            if key is not None:
                return key, index
        raise BadSecretError("Invalid password, cannot unlock any keyslot")

    def sector_crypto(self, master_key: bytes, physical_offset: bool) -> SectorCrypto:
        if len(master_key) != self.header.master_key_len:
            raise InvalidArgumentError(
                f"master key is {len(master_key)} bytes, the header says "
                f"{self.header.master_key_len}"
            )
        return SectorCrypto(
            self.header.sector_cipher(master_key),
            "luks",
            physical_offset,
            self.header.payload_offset,
        )

    # --- key slots -------------------------------------------------------------------

    def active_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.header.key_slots) if s.is_active]

    def store_key(
        self, index: int, passphrase, master_key: bytes, iter_time: int = DEFAULT_ITER_TIME_MS
    ) -> None:
        """Put `master_key` in slot `index` under `passphrase`: material first, then header."""
        hdr = self.header
        slot = hdr.key_slots[index]
        password = secret_bytes(passphrase, "new-secret")
        salt = self._random(SALT_LEN)
        iterations = _scaled_iterations(
            hdr.hash_alg,
            hdr.master_key_len,
            iter_time,
            1,
            MIN_SLOT_KEY_ITERS,
            "key slot iterations",
        )
        hdr.check_new_slot_work(index, iterations, iter_time)
        slot_key = pbkdf2(hdr.hash_alg, password, salt, iterations, hdr.master_key_len)
        material = bytearray(afsplit.af_split(hdr.hash_alg, master_key, slot.stripes, self._random))
        hdr.sector_cipher(slot_key).encrypt(0, material)
        self._write(
            slot.key_offset_sector * SECTOR_SIZE, bytes(material), f"Keyslot {index} key material"
        )
        slot.salt = salt
        slot.iterations = iterations
        slot.active = SLOT_ENABLED
        self.store_header()

    def erase_key(self, index: int) -> None:
        """Disable slot `index` in the header, then overwrite its key material."""
        slot = self.header.key_slots[index]
        slot.salt = bytes(SALT_LEN)
        slot.iterations = 0
        slot.active = SLOT_DISABLED
        self.store_header()
        size = self.header.split_key_len(slot)
        for _ in range(ERASE_PASSES):
            self._write(
                slot.key_offset_sector * SECTOR_SIZE,
                self._random(size),
                f"Keyslot {index} key material",
            )

    def _check_index(self, keyslot) -> int:
        try:
            index = int(keyslot)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"Invalid keyslot {keyslot!r} (keyslot)") from None
        if not 0 <= index < NUM_KEY_SLOTS:
            raise InvalidArgumentError(
                f"Invalid keyslot {index} specified, must be between 0 and {NUM_KEY_SLOTS - 1}"
            )
        return index

    def add_key_slot(
        self,
        passphrase,
        new_passphrase,
        keyslot=None,
        iter_time: int = DEFAULT_ITER_TIME_MS,
        force: bool = False,
    ) -> int:
        """qemu-img amend state=active: unlock with `passphrase`, store under `new_passphrase`."""
        if keyslot is not None:
            index = self._check_index(keyslot)
        else:
            free = [i for i in range(NUM_KEY_SLOTS) if i not in self.active_slots()]
            if not free:
                raise InvalidArgumentError("Can't add a keyslot - all keyslots are in use")
            index = free[0]
        if not force and self.header.key_slots[index].is_active:
            raise InvalidArgumentError(
                f"Refusing to overwrite active keyslot {index} - please erase it first"
            )
        try:
            master_key, _ = self.unlock(passphrase)
        except BadSecretError:
            raise BadSecretError(
                "Invalid password, cannot unlock any keyslot (failed to retrieve the master key)"
            ) from None
        self.store_key(index, new_passphrase, master_key, iter_time)
        return index

    def erase_key_slots(self, keyslot=None, old_passphrase=None, force: bool = False) -> list[int]:
        """qemu-img amend state=inactive: erase `keyslot`, or every slot `old_passphrase` opens."""
        if keyslot is not None:
            index = self._check_index(keyslot)
            if old_passphrase is not None and self.try_slot(index, old_passphrase) is None:
                raise BadSecretError(
                    f"Given keyslot {index} doesn't contain the given old password for erase "
                    f"operation"
                )
            if not force and not self.header.key_slots[index].is_active:
                raise InvalidArgumentError(f"Given keyslot {index} is already erased (inactive)")
            if not force and len(self.active_slots()) == 1:
                raise InvalidArgumentError(
                    f"Attempt to erase the only active keyslot {index} which will erase all the "
                    f"data in the image irreversibly - refusing operation"
                )
            self.erase_key(index)
            return [index]
        if old_passphrase is not None:
            matching = [
                i for i in range(NUM_KEY_SLOTS) if self.try_slot(i, old_passphrase) is not None
            ]
            if not matching:
                raise BadSecretError("No keyslots match given (old) password for erase operation")
            if not force and len(matching) == len(self.active_slots()):
                raise InvalidArgumentError(
                    "All the active keyslots match the (old) password that was given and erasing "
                    "them will erase all the data in the image irreversibly - refusing operation"
                )
            for index in matching:
                self.erase_key(index)
            return matching
        raise InvalidArgumentError(
            "To erase keyslot(s), either explicit keyslot index or the password currently "
            "contained in them must be given"
        )

    def amend(self, passphrase, options, force: bool = False) -> list[int]:
        """Apply qemu-img amend's LUKS options; returns the slot indexes changed.

        options: state ("active"/"inactive"), new-secret, old-secret, keyslot, iter-time and
        secret (the passphrase that unlocks the master key; default `passphrase`).  Secrets
        are the passphrases themselves, not secret object ids.
        """
        opts = normalize_options(options, AMEND_OPTIONS)
        state = opts.get("state")
        if state == "active":
            if "new-secret" not in opts:
                raise InvalidArgumentError("'new-secret' is required to activate a keyslot")
            if "old-secret" in opts:
                raise InvalidArgumentError(
                    "'old-secret' must not be given when activating keyslots"
                )
            iter_time = _iter_time(opts.get("iter-time", DEFAULT_ITER_TIME_MS))
            secret = opts.get("secret", passphrase)
            return [
                self.add_key_slot(secret, opts["new-secret"], opts.get("keyslot"), iter_time, force)
            ]
        if state == "inactive":
            for bad in ("new-secret", "iter-time", "secret"):
                if bad in opts:
                    raise InvalidArgumentError(f"'{bad}' must not be given when erasing keyslots")
            return self.erase_key_slots(opts.get("keyslot"), opts.get("old-secret"), force)
        raise InvalidArgumentError(f"Invalid parameter '{state}' (state: active or inactive)")


def create_luks(passphrase, options=None, random=os.urandom) -> tuple[bytes, bytes, LuksHeader]:
    """A new LUKS header region: (bytes of length payload_offset, master key, header).

    The region holds the header and slot 0 (opened by `passphrase`); the other slots'
    material is zero, as QEMU leaves it.  Iterations are calibrated from iter-time the way
    QEMU does (master key digest: iter-time/8 worth, key slot: iter-time worth, floor 1000).
    """
    password = secret_bytes(passphrase)
    hdr, iter_time = header_for_options(options)
    hdr.uuid = str(uuid_mod.UUID(bytes=random(16), version=4))
    hdr.master_key_salt = random(SALT_LEN)
    master_key = random(hdr.master_key_len)
    if hdr.cipher_mode == "xts":
        while master_key[: len(master_key) // 2] == master_key[len(master_key) // 2 :]:
            master_key = random(hdr.master_key_len)
    hdr.master_key_iterations = _scaled_iterations(
        hdr.hash_alg, DIGEST_LEN, iter_time, 8, MIN_MASTER_KEY_ITERS, "master key iterations"
    )
    hdr.check_new_slot_work(
        0,
        _scaled_iterations(
            hdr.hash_alg,
            hdr.master_key_len,
            iter_time,
            1,
            MIN_SLOT_KEY_ITERS,
            "key slot iterations",
        ),
        iter_time,
    )
    hdr.master_key_digest = pbkdf2(
        hdr.hash_alg, master_key, hdr.master_key_salt, hdr.master_key_iterations, DIGEST_LEN
    )
    region = bytearray(hdr.payload_offset)

    def read(offset, size):
        return bytes(region[offset : offset + size])

    def write(offset, data):
        region[offset : offset + len(data)] = data

    vol = LuksVolume(hdr, read, write, len(region), random)
    vol.store_key(0, password, master_key, iter_time)
    return bytes(region), master_key, hdr
