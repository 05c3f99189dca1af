"""Sector ciphers, IV generators, hashes and PBKDF2 -- the primitives LUKS and qcow2 AES share.

Everything works on 512-byte sectors the way QEMU's crypto layer does: the IV of each
sector is computed from its sector number by an IV generator, the cipher is reset with that
IV, and the sector is encrypted on its own.  The block cipher itself comes from the
`cryptography` package (OpenSSL underneath, which runs without the GIL).

Supported: AES-128/192/256 in XTS, CBC, ECB and CTR modes; IV generators plain, plain64
and essiv; hashes md5, sha1, sha224, sha256, sha384, sha512 and ripemd160 (when OpenSSL
provides it).
"""

from __future__ import annotations

import hashlib
import threading
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import BadSecretError, InvalidArgumentError, UnsupportedFeatureError

SECTOR_SIZE = 512
AES_BLOCK = 16
# sectors per vectorised XTS/CBC-decrypt pass (256 KiB; big ints get slow past ~1 MiB)
BATCH_SECTORS = 512

# QEMU's QCryptoHashAlgorithm names and their digest lengths.
HASH_DIGEST_LEN = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}

# QEMU's QCryptoCipherMode names.
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
# QEMU's QCryptoIVGenAlgorithm names.
IVGEN_ALGS = ("plain", "plain64", "essiv")
# QEMU's cipher algorithm names we implement, with their key length in bytes.
AES_KEY_LEN = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
# The ones QEMU knows but this package does not implement.
KNOWN_UNSUPPORTED_CIPHERS = (
    "des",
    "des-rfb",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
)


def check_hash(name: str, what: str = "hash algorithm") -> str:
    """Return `name` if it is a hash QEMU knows and hashlib can compute, else raise."""
    if name not in HASH_DIGEST_LEN:
        raise UnsupportedFeatureError(f"{what} '{name}' not supported")
    try:
        hashlib.new(name)
    except (ValueError, TypeError):
        raise UnsupportedFeatureError(
            f"{what} '{name}' not available in this Python/OpenSSL build"
        ) from None
    return name


def digest_len(name: str) -> int:
    return HASH_DIGEST_LEN[name]


def hash_bytes(name: str, *parts: bytes) -> bytes:
    h = hashlib.new(name)
    for part in parts:
        h.update(part)
    return h.digest()


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (RFC 2898), as QEMU's qcrypto_pbkdf2."""
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length)


# --- PBKDF2 calibration -----------------------------------------------------------------

_calibration: dict[str, float] = {}
_calibration_lock = threading.Lock()
CALIBRATION_CPU_SECONDS = 0.1  # QEMU measures until 0.5 s of CPU; 0.1 s is accurate enough


def _calibrate_block_rate(hash_name: str) -> float:
    """PBKDF2 iterations per CPU second, for one output block of `hash_name`.

    Like QEMU's qcrypto_pbkdf2_count_iters: time a run on the calling thread's CPU clock,
    grow the iteration count until the run is long enough to trust, then scale.  The
    result is cached per hash for the life of the process.
    """
    with _calibration_lock:
        cached = _calibration.get(hash_name)
        if cached:
            return cached
        iterations = 1 << 12
        salt = bytes(32)
        dlen = digest_len(hash_name)
        while True:
            start = time.thread_time()
            pbkdf2(hash_name, b"calibration passphrase", salt, iterations, dlen)
            delta = time.thread_time() - start
            if delta >= CALIBRATION_CPU_SECONDS:
                break
            if delta < CALIBRATION_CPU_SECONDS / 5:
                iterations *= 10
            else:
                iterations = int(iterations * CALIBRATION_CPU_SECONDS * 1.5 / delta)
        rate = iterations / delta
        _calibration[hash_name] = rate
        return rate


def pbkdf2_iterations_for(hash_name: str, out_len: int, iter_time_ms: int) -> int:
    """Iterations that take about `iter_time_ms` of CPU for an `out_len`-byte PBKDF2 output.

    Like QEMU: the per-second count scaled by iter_time/1000 (no floor applied here).
    """
    blocks = -(-out_len // digest_len(hash_name))
    per_second = int(_calibrate_block_rate(hash_name) / blocks)
    return per_second * iter_time_ms // 1000


# --- IV generators ----------------------------------------------------------------------


class IVGen:
    """Computes the 16-byte IVs of a run of consecutive sectors."""

    name = "none"

    def ivs(self, first_sector: int, count: int) -> list[bytes]:
        raise NotImplementedError


class PlainIVGen(IVGen):
    """IV = low 32 bits of the sector number, little endian, zero padded."""

    name = "plain"

    def ivs(self, first_sector: int, count: int) -> list[bytes]:
        return [
            ((first_sector + i) & 0xFFFFFFFF).to_bytes(AES_BLOCK, "little") for i in range(count)
        ]


class Plain64IVGen(IVGen):
    """IV = the 64-bit sector number, little endian, zero padded."""

    name = "plain64"

    def ivs(self, first_sector: int, count: int) -> list[bytes]:
        return [
            ((first_sector + i) & 0xFFFFFFFFFFFFFFFF).to_bytes(AES_BLOCK, "little")
            for i in range(count)
        ]


class EssivIVGen(IVGen):
    """IV = E_salt(le64(sector) zero padded), salt = hash(key) (QEMU ivgen-essiv.c).

    The ESSIV cipher is AES with the key length equal to the digest length (dm-crypt's
    quirk, see `essiv_cipher_key_len`), in ECB mode.
    """

    name = "essiv"

    def __init__(self, hash_name: str, key: bytes, essiv_key_len: int):
        salt = hash_bytes(hash_name, key)
        self._alg = algorithms.AES(salt[: min(len(salt), essiv_key_len)])

    def ivs(self, first_sector: int, count: int) -> list[bytes]:
        data = b"".join(
            ((first_sector + i) & 0xFFFFFFFFFFFFFFFF).to_bytes(AES_BLOCK, "little")
            for i in range(count)
        )
        enc = Cipher(self._alg, modes.ECB()).encryptor()
        out = enc.update(data) + enc.finalize()
        return [out[i : i + AES_BLOCK] for i in range(0, len(out), AES_BLOCK)]


def essiv_cipher_key_len(cipher_key_len: int, hash_name: str) -> int:
    """Key length of the ESSIV cipher for an AES cipher with `cipher_key_len`-byte keys.

    QEMU (qcrypto_block_luks_essiv_cipher): the cipher itself if its key length equals the
    digest length, else the AES variant whose key length is the digest length.
    """
    dlen = digest_len(hash_name)
    if dlen == cipher_key_len or dlen in (16, 24, 32):
        return dlen
    raise UnsupportedFeatureError(
        f"No AES cipher with key size {dlen} available (ivgen hash '{hash_name}' with essiv)"
    )


def make_ivgen(
    name: str, *, key: bytes = b"", cipher_key_len: int = 16, hash_name: str | None = None
) -> IVGen:
    """The IV generator `name`; `key` is the (possibly XTS double) cipher key for essiv."""
    if name == "plain":
        return PlainIVGen()
    if name == "plain64":
        return Plain64IVGen()
    if name == "essiv":
        if not hash_name:
            raise InvalidArgumentError("IV generator 'essiv' needs a hash (ivgen-hash-alg)")
        return EssivIVGen(hash_name, key, essiv_cipher_key_len(cipher_key_len, hash_name))
    raise UnsupportedFeatureError(f"IV generator '{name}' not supported")


# --- sector cipher ----------------------------------------------------------------------


def _as_writable_view(buf) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise InvalidArgumentError("the buffer to encrypt/decrypt in place is read-only")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class SectorCipher:
    """A block cipher plus IV generator applied sector by sector, in place.

    `mode` is one of CIPHER_MODES, `key` the full cipher key (both halves for XTS).
    Buffers may end with a partial sector (LUKS key material does), which is processed
    as a shorter data unit, as QEMU would.
    """

    def __init__(self, mode: str, key: bytes, ivgen: IVGen, sector_size: int = SECTOR_SIZE):
        if mode not in CIPHER_MODES:
            raise UnsupportedFeatureError(f"Cipher mode '{mode}' not supported")
        if mode == "xts":
            if len(key) not in (32, 48, 64):
                raise UnsupportedFeatureError(
                    f"AES-XTS needs a 32, 48 or 64 byte key, not {len(key)} bytes"
                )
            if key[: len(key) // 2] == key[len(key) // 2 :]:
                # OpenSSL refuses XTS keys whose halves are equal.
                raise UnsupportedFeatureError("AES-XTS key halves are identical")
        elif len(key) not in (16, 24, 32):
            raise UnsupportedFeatureError(
                f"AES needs a 16, 24 or 32 byte key, not {len(key)} bytes"
            )
        self.mode = mode
        self.sector_size = sector_size
        self.ivgen = ivgen
        if mode == "xts":
            half = len(key) // 2
            self._alg_data = algorithms.AES(key[:half])
            self._alg_tweak = algorithms.AES(key[half:])
            # OpenSSL's XTS takes AES-128 and AES-256 keys only; AES-192 (a 48-byte key, as
            # QEMU allows) goes through the ECB-based _xts_batch, whole sectors only.
            self._alg = algorithms.AES(key) if len(key) != 48 else None
        else:
            self._alg = algorithms.AES(key)

    # The per-sector workers return the transformed bytes of one data unit.
    def _one(self, iv: bytes, data: bytes, encrypt: bool) -> bytes:
        alg = self._alg
        if alg is None:  # (XTS with an AES-192 key only)
            raise UnsupportedFeatureError(
                f"AES-192-XTS on a partial data unit ({len(data)} bytes) is not supported"
            )
        mode: modes.Mode
        if self.mode == "xts":
            mode = modes.XTS(iv)
        elif self.mode == "cbc":
            mode = modes.CBC(iv)
        else:  # ctr
            mode = modes.CTR(iv)
        cipher = Cipher(alg, mode)
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        return ctx.update(data) + ctx.finalize()

    def _check_len(self, length: int) -> None:
        tail = length % self.sector_size
        if self.mode in ("cbc", "ecb") and length % AES_BLOCK:
            raise InvalidArgumentError(
                f"length {length} is not a multiple of the AES block size ({self.mode})"
            )
        if self.mode == "xts" and tail and tail < AES_BLOCK:
            raise InvalidArgumentError(f"length {length} leaves an XTS data unit under 16 bytes")

    def encrypt(self, first_sector: int, buf) -> None:
        self._run(first_sector, buf, True)

    def decrypt(self, first_sector: int, buf) -> None:
        self._run(first_sector, buf, False)

    def _run(self, first_sector: int, buf, encrypt: bool) -> None:
        view = _as_writable_view(buf)
        length = len(view)
        if not length:
            return
        self._check_len(length)
        ss = self.sector_size
        if self.mode == "ecb":
            assert self._alg is not None  # (None in XTS mode only)
            cipher = Cipher(self._alg, modes.ECB())
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            view[:] = ctx.update(bytes(view)) + ctx.finalize()
            return
        count = -(-length // ss)
        if self.mode == "xts" and ss % AES_BLOCK == 0:
            full = length // ss
            for start in range(0, full, BATCH_SECTORS):
                n = min(BATCH_SECTORS, full - start)
                chunk = view[start * ss : (start + n) * ss]
                chunk[:] = self._xts_batch(
                    self.ivgen.ivs(first_sector + start, n), bytes(chunk), encrypt
                )
            if full == count:
                return
            ivs = self.ivgen.ivs(first_sector + full, 1)
            first = full
        else:
            ivs = self.ivgen.ivs(first_sector, count)
            first = 0
            if self.mode == "cbc" and not encrypt:
                for start in range(0, count, BATCH_SECTORS):
                    self._cbc_decrypt_all(
                        view[start * ss : (start + BATCH_SECTORS) * ss],
                        ivs[start : start + BATCH_SECTORS],
                    )
                return
        data = bytes(view[first * ss :])
        view[first * ss :] = b"".join(
            self._one(ivs[i - first], data[(i - first) * ss : (i - first + 1) * ss], encrypt)
            for i in range(first, count)
        )

    def _xts_batch(self, ivs: list[bytes], data: bytes, encrypt: bool) -> bytes:
        """XTS (IEEE 1619) of whole sectors, all at once, without per-sector cipher objects.

        Each sector's tweak T0 = E_K2(iv); block j of the sector uses T0 * alpha^j in
        GF(2^128).  The tweaks of every sector are advanced together as 128-bit lanes of one
        integer, scattered into a tweak stream in sector order, and the data goes through a
        single ECB pass: C = E_K1(P xor T) xor T.
        """
        n = len(ivs)
        ss = self.sector_size
        units = ss // AES_BLOCK
        enc = Cipher(self._alg_tweak, modes.ECB()).encryptor()
        lanes = int.from_bytes(enc.update(b"".join(ivs)), "little")
        lane_bytes = AES_BLOCK * n
        lane_lsb = int.from_bytes((b"\x01" + bytes(AES_BLOCK - 1)) * n, "little")
        keep = ((1 << (128 * n)) - 1) ^ lane_lsb
        stream = bytearray(n * ss)
        for j in range(units):
            raw = lanes.to_bytes(lane_bytes, "little")
            for k in range(AES_BLOCK):
                stream[j * AES_BLOCK + k :: ss] = raw[k::AES_BLOCK]
            carry = (lanes >> 127) & lane_lsb
            lanes = ((lanes << 1) & keep) ^ (carry * 0x87)
        tweak = int.from_bytes(stream, "little")
        size = len(data)
        whitened = (int.from_bytes(data, "little") ^ tweak).to_bytes(size, "little")
        cipher = Cipher(self._alg_data, modes.ECB())
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        return (int.from_bytes(ctx.update(whitened), "little") ^ tweak).to_bytes(size, "little")

    def _cbc_decrypt_all(self, view: memoryview, ivs: list[bytes]) -> None:
        """CBC decryption of many sectors in one ECB pass: P_i = D(C_i) xor C_(i-1)."""
        ct = bytes(view)
        ss = self.sector_size
        assert self._alg is not None  # (None in XTS mode only)
        ctx = Cipher(self._alg, modes.ECB()).decryptor()
        plain_blocks = ctx.update(ct) + ctx.finalize()
        chain = b"".join(
            ivs[i] + ct[i * ss : min((i + 1) * ss, len(ct)) - AES_BLOCK] for i in range(len(ivs))
        )
        mixed = int.from_bytes(plain_blocks, "little") ^ int.from_bytes(chain, "little")
        view[:] = mixed.to_bytes(len(ct), "little")


# --- the object the engine uses ---------------------------------------------------------


def secret_bytes(passphrase, what: str = "key-secret") -> bytes:
    """The passphrase as QEMU sees it: UTF-8 bytes, cut at the first NUL (it uses strlen)."""
    if passphrase is None:
        raise BadSecretError(f"A passphrase is required to open this encrypted image ({what})")
    if isinstance(passphrase, str):
        data = passphrase.encode("utf-8")
    elif isinstance(passphrase, (bytes, bytearray, memoryview)):
        data = bytes(passphrase)
    else:
        raise InvalidArgumentError(f"{what} must be str or bytes, not {type(passphrase).__name__}")
    return data.split(b"\0", 1)[0]


class SectorCrypto:
    """Encrypts/decrypts guest data in place, 512-byte sector by sector.

    `encrypt(sector, buf)` / `decrypt(sector, buf)`: `buf` is a writable buffer
    (bytearray, memoryview) whose length is a multiple of `payload_sector_size`;
    `sector` is the number of its first 512-byte sector, which is where the IVs come from:

    * qcow2 with LUKS (crypt_method 2): the *host* offset in the image (or data) file / 512
      (`physical_offset` is True);
    * qcow2 with legacy AES (crypt_method 1): the *guest* offset / 512;
    * a raw LUKS volume: the guest offset / 512, i.e. relative to the payload start
      (`payload_offset` tells where the payload starts in the file).

    `sector_number(host_offset, guest_offset)` picks the right one.  The object keeps no
    per-call state, so threads may share it.
    """

    sector_size = SECTOR_SIZE
    payload_sector_size = SECTOR_SIZE

    def __init__(
        self, cipher: SectorCipher, format: str, physical_offset: bool, payload_offset: int = 0
    ):
        self.cipher = cipher
        self.format = format
        self.physical_offset = physical_offset
        self.payload_offset = payload_offset

    def sector_number(self, host_offset: int, guest_offset: int) -> int:
        offset = host_offset if self.physical_offset else guest_offset
        if offset % SECTOR_SIZE:
            raise InvalidArgumentError(f"offset {offset} is not aligned to {SECTOR_SIZE} bytes")
        return offset // SECTOR_SIZE

    def _check(self, sector: int, buf) -> None:
        if not isinstance(sector, int) or sector < 0 or sector >= 1 << 64:
            raise InvalidArgumentError(f"sector number {sector!r} out of range")
        length = memoryview(buf).nbytes
        if length % SECTOR_SIZE:
            raise InvalidArgumentError(
                f"buffer length {length} is not a multiple of the {SECTOR_SIZE}-byte sector"
            )

    def encrypt(self, sector: int, buf) -> None:
        self._check(sector, buf)
        self.cipher.encrypt(sector, buf)

    def decrypt(self, sector: int, buf) -> None:
        self._check(sector, buf)
        self.cipher.decrypt(sector, buf)

    def __repr__(self) -> str:
        return (
            f"<SectorCrypto {self.format} {self.cipher.mode}-{self.cipher.ivgen.name} "
            f"physical_offset={self.physical_offset}>"
        )
