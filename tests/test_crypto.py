"""The encryption layer (qcow2lib.crypto) against images encrypted by QEMU 7.2, and back.

QEMU makes qcow2 images with LUKS (several cipher/mode/ivgen/hash combinations), a raw LUKS
volume and a qcow2 image with legacy AES; qemu-io writes patterns through its own crypto.
The tests find the data cluster through the L1/L2 tables by hand, decrypt it with our code
(host sector numbers for LUKS in qcow2, guest ones for AES, payload-relative ones for raw
LUKS), encrypt new patterns that qemu-io must read back, and build LUKS volumes and key
slots that QEMU must open.

PBKDF2 is kept cheap with iter-time=10; the QEMU images come from tests/qemu_luks.py, made
once per run because each `qemu-img create` spends seconds calibrating PBKDF2.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from qemutools import QEMU_IMG, run

try:
    import qcow2lib  # noqa: F401
except ImportError:  # pragma: no cover - conftest normally puts the source tree on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcow2lib.crypto import (
    amend_luks,
    create_luks_header,
    legacy_key,
    luks_crypto_from_key,
    luks_info,
    open_crypto,
    open_luks_header,
    open_luks_raw,
)
from qcow2lib.crypto.afsplit import af_merge, af_split
from qcow2lib.crypto.ciphers import SectorCipher, make_ivgen
from qcow2lib.crypto.luks import HEADER_SIZE, LuksHeader, LuksHeaderStruct, LuksVolume
from qcow2lib.errors import (
    BadSecretError,
    CorruptImageError,
    InvalidArgumentError,
    UnsupportedFeatureError,
)
from qcow2lib.header import Header
from qemu_luks import (
    AES_PASSES,
    LUKS_CONFIGS,
    MB,
    PASS,
    WRITES,
    luks_opts,
    qcow2_opts,
    qio,
    qio_ok,
    run_retrying,
    secret_args,
)
from qemu_luks import qemu_images as luks_images

NEW = "another secret"
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00

# --- image access by hand ---------------------------------------------------------------


class ImageFile:
    def __init__(self, path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.header = Header.parse(self.read, self.size)

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data):
        os.pwrite(self.fd, bytes(data), offset)

    def host_offset(self, guest):
        """Host offset of a guest offset (standard L2 entries, allocated cluster)."""
        cs = self.header.cluster_size
        l2_entries = cs // 8
        l1_index, l2_index = divmod(guest // cs, l2_entries)
        l1e = struct.unpack(">Q", self.read(self.header.l1_table_offset + 8 * l1_index, 8))[0]
        l2 = l1e & L2_OFFSET_MASK
        assert l2, f"no L2 table for guest offset {guest}"
        l2e = struct.unpack(">Q", self.read(l2 + 8 * l2_index, 8))[0]
        cluster = l2e & L2_OFFSET_MASK
        assert cluster, f"guest offset {guest} is not allocated"
        return cluster + guest % cs

    def crypto(self, passphrase=PASS):
        h = self.header
        return open_crypto(
            h.crypt_method,
            self.read,
            h.crypto_offset,
            h.crypto_length,
            passphrase,
            cluster_size=h.cluster_size,
        )

    def close(self):
        os.close(self.fd)


def decrypt_guest(img: ImageFile, crypto, guest, length) -> bytes:
    host = img.host_offset(guest)
    buf = bytearray(img.read(host, length))
    crypto.decrypt(crypto.sector_number(host, guest), buf)
    return bytes(buf)


def encrypt_guest(img: ImageFile, crypto, guest, data) -> None:
    host = img.host_offset(guest)
    buf = bytearray(data)
    crypto.encrypt(crypto.sector_number(host, guest), buf)
    img.write(host, buf)


# --- QEMU-made images, built once per run (tests/qemu_luks.py) ------------------------------


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory):
    """The images QEMU made, read by the tests (a test that changes one copies it first)."""
    return luks_images(tmp_path_factory)


def fresh_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copyfile(src, dst)
    return dst


def qemu_info_encrypt(path) -> dict:
    out = run([QEMU_IMG, "info", "--output=json", path]).stdout
    return json.loads(out)["format-specific"]["data"]["encrypt"]


# --- qcow2 + LUKS made by QEMU -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LUKS_CONFIGS))
def test_qcow2_luks_decrypts_qemu_data(qemu_images, name):
    img = ImageFile(qemu_images[name])
    try:
        assert img.header.crypt_method == 2 and img.header.crypto_offset
        crypto = img.crypto()
        assert crypto.physical_offset and crypto.payload_sector_size == 512
        for guest, length, pattern in WRITES:
            assert decrypt_guest(img, crypto, guest, length) == bytes([pattern]) * length
        # our header reading agrees with qemu-img info
        info = luks_info(img.read, img.header.crypto_offset, img.header.crypto_length)
        assert info == qemu_info_encrypt(img.path)
        expect = LUKS_CONFIGS[name]
        assert info["cipher-alg"] == expect["cipher-alg"]
        assert info["cipher-mode"] == expect["cipher-mode"]
        assert info["ivgen-alg"] == expect["ivgen-alg"]
        assert info["hash-alg"] == expect.get("hash-alg", "sha256")
    finally:
        img.close()


@pytest.mark.parametrize("name", sorted(LUKS_CONFIGS))
def test_qcow2_luks_qemu_reads_our_encryption(qemu_images, name, tmp_path):
    path = fresh_copy(qemu_images[name], tmp_path)
    img = ImageFile(path)
    try:
        crypto = img.crypto()
        encrypt_guest(img, crypto, 0, b"\xc3" * 65536)
        encrypt_guest(img, crypto, MB + 4096, b"\x11" * 4096)
    finally:
        img.close()
    qio_ok(
        qcow2_opts(path),
        "read -P 0xc3 0 64k",
        f"read -P 0x11 {MB + 4096} 4k",
        f"read -P 0x6b {MB + 8192} 4k",
    )


def test_qcow2_luks_wrong_passphrase(qemu_images):
    img = ImageFile(qemu_images["aes256-xts-plain64"])
    try:
        with pytest.raises(BadSecretError, match="Invalid password"):
            img.crypto("not the passphrase")
        with pytest.raises(BadSecretError):
            img.crypto(None)
    finally:
        img.close()


def test_qcow2_luks_key_material_outside_extension(qemu_images):
    img = ImageFile(qemu_images["aes256-xts-plain64"])
    try:
        h = img.header
        # a crypto_length cut short: the header parses, the key slot region is out of bounds
        with pytest.raises(CorruptImageError, match="payload_offset_sector|outside"):
            open_crypto(2, img.read, h.crypto_offset, 8192, PASS)
        with pytest.raises(CorruptImageError, match="crypto_offset"):
            open_crypto(
                2,
                img.read,
                h.crypto_offset + 512,
                h.crypto_length,
                PASS,
                cluster_size=h.cluster_size,
            )
        with pytest.raises(CorruptImageError, match="Missing CRYPTO header"):
            open_crypto(2, img.read, 0, 0, PASS)
    finally:
        img.close()


# --- raw LUKS -------------------------------------------------------------------------------


def test_raw_luks_made_by_qemu(qemu_images):
    path = qemu_images["raw-luks"]
    with open(path, "rb") as f:
        data = f.read()
    crypto = open_luks_raw(lambda off, n: data[off : off + n], PASS, len(data))
    assert not crypto.physical_offset
    assert crypto.payload_offset == 2068480  # aes-256-xts: 8 + 8 * 504 sectors
    for guest, pattern in ((0, 0x5A), (65536, 0x33)):
        buf = bytearray(data[crypto.payload_offset + guest : crypto.payload_offset + guest + 65536])
        crypto.decrypt(crypto.sector_number(crypto.payload_offset + guest, guest), buf)
        assert buf == bytes([pattern]) * 65536
    with pytest.raises(BadSecretError):
        open_luks_raw(lambda off, n: data[off : off + n], "wrong", len(data))


def make_luks_file(path: Path, options, size=MB, passphrase=PASS, pattern=0x5A) -> bytes:
    """A raw LUKS volume of our own: our header, then a payload whose first 64 KiB are the
    pattern and the rest zeros, encrypted with payload-relative sector numbers."""
    header, master_key = create_luks_header(passphrase, {**options, "iter-time": 10})
    crypto = luks_crypto_from_key(header, master_key, physical_offset=False)
    assert crypto.payload_offset == len(header)
    payload = bytearray(bytes([pattern]) * 65536 + bytes(size - 65536))
    crypto.encrypt(0, payload)
    path.write_bytes(header + payload)
    return master_key


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cipher-alg": "aes-128", "cipher-mode": "xts", "hash-alg": "sha1"},
        {"cipher-alg": "aes-256", "cipher-mode": "cbc", "ivgen-alg": "essiv"},
        {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "plain", "hash-alg": "sha512"},
        {"cipher-alg": "aes-256", "cipher-mode": "ctr", "hash-alg": "md5"},
        {"cipher-alg": "aes-128", "cipher-mode": "ecb"},
        {"cipher-alg": "aes-192", "cipher-mode": "xts"},
    ],
    ids=[
        "default",
        "aes128-xts-sha1",
        "aes256-cbc-essiv",
        "aes128-cbc-plain-sha512",
        "ctr-md5",
        "ecb",
        "aes192-xts",
    ],
)
def test_our_luks_file_read_by_qemu(tmp_path, options):
    path = tmp_path / "ours.luks"
    make_luks_file(path, options)
    qio_ok(luks_opts(path), "read -P 0x5a 0 64k", "read -P 0 64k 960k")
    info = json.loads(
        run(
            [
                QEMU_IMG,
                "info",
                "--output=json",
                *secret_args(sec0=PASS),
                "--image-opts",
                luks_opts(path),
            ]
        ).stdout
    )
    assert info["virtual-size"] == MB
    data = info["format-specific"]["data"]
    assert data["cipher-alg"] == options.get("cipher-alg", "aes-256")
    assert data["cipher-mode"] == options.get("cipher-mode", "xts")
    assert data["ivgen-alg"] == options.get("ivgen-alg", "plain64")
    assert data["hash-alg"] == options.get("hash-alg", "sha256")
    if options.get("ivgen-alg") == "essiv":
        assert data["ivgen-hash-alg"] == "sha256"


def test_created_header_parses_back():
    header, master_key = create_luks_header(
        PASS,
        {
            "encrypt.cipher-alg": "aes-128",
            "cipher_mode": "cbc",
            "ivgen-alg": "essiv",
            "iter-time": 10,
        },
    )
    assert len(header) % 512 == 0
    hdr = LuksHeader.parse(header)
    assert (hdr.cipher_alg, hdr.cipher_mode, hdr.ivgen_alg, hdr.ivgen_hash_alg, hdr.hash_alg) == (
        "aes-128",
        "cbc",
        "essiv",
        "sha256",
        "sha256",
    )
    assert hdr.cipher_mode_spec == "cbc-essiv:sha256"
    assert hdr.master_key_len == 16 == len(master_key)
    assert hdr.payload_offset == len(header)
    assert hdr.master_key_iterations >= 1000
    assert [s.is_active for s in hdr.key_slots] == [True] + [False] * 7
    assert hdr.key_slots[0].iterations >= 1000
    assert hdr.pack() == header[:HEADER_SIZE]
    vol = LuksVolume.load(lambda off, n: header[off : off + n], len(header))
    assert vol.unlock(PASS) == (master_key, 0)
    with pytest.raises(BadSecretError):
        vol.unlock("nope")
    with pytest.raises(BadSecretError):
        luks_crypto_from_key(header, bytes(16))


def test_create_options_rejected():
    with pytest.raises(UnsupportedFeatureError, match="twofish-256"):
        create_luks_header(PASS, {"cipher-alg": "twofish-256", "iter-time": 0})
    with pytest.raises(InvalidArgumentError, match="bogus"):
        create_luks_header(PASS, {"cipher-mode": "bogus", "iter-time": 0})
    with pytest.raises(InvalidArgumentError, match="no-such-option"):
        create_luks_header(PASS, {"no-such-option": 1})
    with pytest.raises(UnsupportedFeatureError, match="aes-192"):
        # 24-byte keys x 4000 stripes is not whole sectors: QEMU would abort on it
        create_luks_header(PASS, {"cipher-alg": "aes-192", "cipher-mode": "cbc", "iter-time": 0})
    with pytest.raises(UnsupportedFeatureError, match="sha1"):
        # ESSIV needs a digest as long as an AES key; sha1's 20 bytes are not
        create_luks_header(
            PASS,
            {"cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha1", "iter-time": 0},
        )


# --- key slots ------------------------------------------------------------------------------


def file_io(path):
    fd = os.open(path, os.O_RDWR)
    return fd, (lambda off, n: os.pread(fd, n, off)), (lambda off, data: os.pwrite(fd, data, off))


def test_keyslot_add_remove_raw_luks(tmp_path):
    path = tmp_path / "slots.luks"
    make_luks_file(path, {"cipher-alg": "aes-128"})
    size = path.stat().st_size
    fd, read, write = file_io(path)
    try:
        vol = LuksVolume.load(read, size, write)
        assert vol.amend(PASS, {"state": "active", "new-secret": NEW, "iter-time": 10}) == [1]
        vol = LuksVolume.load(read, size, write)
        assert vol.unlock(PASS)[1] == 0 and vol.unlock(NEW)[1] == 1
        assert vol.unlock(PASS)[0] == vol.unlock(NEW)[0]
    finally:
        os.close(fd)
    qio_ok(luks_opts(path), "read -P 0x5a 0 64k", sec0=NEW)
    qio_ok(luks_opts(path), "read -P 0x5a 0 64k", sec0=PASS)

    fd, read, write = file_io(path)
    try:
        vol = LuksVolume.load(read, size, write)
        assert vol.amend(None, {"state": "inactive", "old-secret": PASS}) == [0]
        vol = LuksVolume.load(read, size, write)
        with pytest.raises(BadSecretError):
            vol.unlock(PASS)
        assert vol.unlock(NEW)[1] == 1
        # the last active slot is not erased without force
        with pytest.raises(InvalidArgumentError, match="only active keyslot"):
            vol.amend(None, {"state": "inactive", "keyslot": 1})
        with pytest.raises(InvalidArgumentError, match="new-secret"):
            vol.amend(NEW, {"state": "active"})
        with pytest.raises(BadSecretError):
            vol.amend("wrong", {"state": "active", "new-secret": "x", "iter-time": 0})
        with pytest.raises(InvalidArgumentError, match="already erased"):
            vol.amend(None, {"state": "inactive", "keyslot": 3})
    finally:
        os.close(fd)
    assert qio(luks_opts(path), "read -P 0x5a 0 64k", sec0=PASS).returncode != 0
    qio_ok(luks_opts(path), "read -P 0x5a 0 64k", sec0=NEW)


def test_keyslots_in_qcow2_interop(qemu_images, tmp_path):
    path = fresh_copy(qemu_images["aes128-cbc-essiv"], tmp_path)
    # QEMU adds a slot; we open with it
    run_retrying(
        [
            QEMU_IMG,
            "amend",
            *secret_args(sec0=PASS, sec1=NEW),
            "--image-opts",
            qcow2_opts(path),
            "-o",
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
        ]
    )
    img = ImageFile(path)
    try:
        assert decrypt_guest(img, img.crypto(NEW), 0, 65536) == b"\x5a" * 65536
        # we erase QEMU's original slot and add a third passphrase in slot 5
        h = img.header
        assert amend_luks(
            img.read,
            img.write,
            h.crypto_offset,
            h.crypto_length,
            None,
            {"encrypt.state": "inactive", "encrypt.old-secret": PASS},
        ) == [0]
        assert amend_luks(
            img.read,
            img.write,
            h.crypto_offset,
            h.crypto_length,
            NEW,
            {"state": "active", "new-secret": "third", "keyslot": 5, "iter-time": 10},
        ) == [5]
        with pytest.raises(BadSecretError):
            img.crypto(PASS)
    finally:
        img.close()
    assert qio(qcow2_opts(path), "read -P 0x5a 0 64k", sec0=PASS).returncode != 0
    qio_ok(qcow2_opts(path), "read -P 0x5a 0 64k", sec0="third")
    slots = qemu_info_encrypt(path)["slots"]
    assert [s["active"] for s in slots] == [False, True, False, False, False, True, False, False]


# --- legacy qcow2 AES -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AES_PASSES))
def test_legacy_aes(qemu_images, name, tmp_path):
    passphrase = AES_PASSES[name]
    path = fresh_copy(qemu_images[name], tmp_path)
    img = ImageFile(path)
    try:
        assert img.header.crypt_method == 1 and not img.header.crypto_offset
        crypto = img.crypto(passphrase)
        assert not crypto.physical_offset  # IVs come from guest sectors
        for guest, length, pattern in WRITES:
            assert decrypt_guest(img, crypto, guest, length) == bytes([pattern]) * length
        # a wrong passphrase "opens" (no check exists in the format) but decrypts to garbage
        wrong = img.crypto(passphrase + "x" if len(passphrase) < 16 else "x" + passphrase)
        assert decrypt_guest(img, wrong, 0, 512) != b"\x5a" * 512
        encrypt_guest(img, crypto, 0, b"\xa7" * 65536)
    finally:
        img.close()
    qio_ok(qcow2_opts(path), "read -P 0xa7 0 64k", f"read -P 0x6b {MB + 4096} 8k", sec0=passphrase)


def test_legacy_key_derivation():
    assert legacy_key("PASS") == b"PASS" + bytes(12)
    assert legacy_key("0123456789abcdefXYZ") == b"0123456789abcdef"
    assert legacy_key(b"ab\0cd") == b"ab" + bytes(14)  # QEMU uses strlen()


# --- malformed LUKS headers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def good_header():
    header, _ = create_luks_header(PASS, {"iter-time": 0})
    return header


def mutate(header: bytes, **changes) -> bytes:
    raw = LuksHeaderStruct.parse(header[:HEADER_SIZE])
    slot_changes = changes.pop("slot0", {})
    for key, value in changes.items():
        raw[key] = value
    for key, value in slot_changes.items():
        raw.key_slots[0][key] = value
    return LuksHeaderStruct.build(raw) + header[HEADER_SIZE:]


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"magic": b"LUKS\0\0"}, CorruptImageError, "not in LUKS format"),
        ({"version": 2}, UnsupportedFeatureError, "version 2"),
        ({"master_key_len": 1 << 30}, CorruptImageError, "master_key_len 1073741824"),
        ({"master_key_len": 0}, CorruptImageError, "master_key_len 0"),
        ({"master_key_len": 40}, CorruptImageError, "master_key_len 40"),
        ({"payload_offset_sector": 0}, CorruptImageError, "payload_offset_sector 0"),
        (
            {"payload_offset_sector": 100},
            CorruptImageError,
            "overlapping with the encrypted payload",
        ),
        ({"master_key_iterations": 0}, CorruptImageError, "master_key_iterations 0"),
        ({"slot0": {"stripes": 1 << 31}}, CorruptImageError, "stripes 2147483648"),
        ({"slot0": {"active": 7}}, CorruptImageError, "active 0x7"),
        ({"slot0": {"iterations": 0}}, CorruptImageError, "Keyslot 0 iteration count"),
        ({"slot0": {"key_offset_sector": 2}}, CorruptImageError, "key_offset_sector 2"),
        ({"slot0": {"key_offset_sector": 512}}, CorruptImageError, "overlapping"),
        ({"slot0": {"key_offset_sector": 0xFFFFFFF0}}, CorruptImageError, "key_offset_sector"),
        ({"cipher_name": b"x" * 32}, CorruptImageError, "cipher_name is not NUL terminated"),
        ({"cipher_name": b"serpent".ljust(32, b"\0")}, UnsupportedFeatureError, "serpent"),
        ({"cipher_mode": b"xts".ljust(32, b"\0")}, CorruptImageError, "cipher mode string"),
        ({"cipher_mode": b"gcm-plain64".ljust(32, b"\0")}, UnsupportedFeatureError, "gcm"),
        (
            {"cipher_mode": b"xts-essiv".ljust(32, b"\0")},
            CorruptImageError,
            "Missing IV generator hash",
        ),
        ({"hash_spec": b"whirlpool".ljust(32, b"\0")}, UnsupportedFeatureError, "whirlpool"),
    ],
)
def test_malformed_luks_header(good_header, changes, error, match):
    bad = mutate(good_header, **changes)
    with pytest.raises(error, match=match):
        open_luks_header(lambda off, n: bad[off - 65536 : off - 65536 + n], 65536, len(bad))


def test_truncated_luks_header(good_header):
    with pytest.raises(CorruptImageError, match="crypto_length 100"):
        open_luks_header(lambda off, n: good_header[:n], 65536, 100)
    with pytest.raises(CorruptImageError, match="truncated"):
        open_luks_header(lambda off, n: b"LUKS", 65536, len(good_header))


# --- primitives -------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
def test_afsplit_roundtrip(hash_name):
    key = os.urandom(64)
    material = af_split(hash_name, key, 4000)
    assert len(material) == 64 * 4000
    assert af_merge(hash_name, material, 64, 4000) == key
    assert af_merge(hash_name, bytes(64) + material[64:], 64, 4000) != key


def test_cbc_batch_decrypt_matches_per_sector():
    key = os.urandom(32)
    cipher = SectorCipher(
        "cbc", key, make_ivgen("essiv", key=key, cipher_key_len=32, hash_name="sha256")
    )
    plain = os.urandom(4096)
    buf = bytearray(plain)
    cipher.encrypt(77, buf)
    one_by_one = bytearray(buf)
    for i in range(8):
        sector = memoryview(one_by_one)[i * 512 : (i + 1) * 512]
        cipher.decrypt(77 + i, sector)
    cipher.decrypt(77, buf)
    assert buf == one_by_one == plain


def test_buffer_checks(qemu_images):
    img = ImageFile(qemu_images["aes128-xts-plain64"])
    try:
        crypto = img.crypto()
    finally:
        img.close()
    with pytest.raises(InvalidArgumentError, match="multiple"):
        crypto.decrypt(0, bytearray(100))
    with pytest.raises(InvalidArgumentError, match="read-only"):
        crypto.decrypt(0, bytes(512))
    with pytest.raises(InvalidArgumentError, match="sector"):
        crypto.encrypt(-1, bytearray(512))


def test_iter_time_calibration():
    """iter-time scales the slot's PBKDF2 iterations (QEMU: iterations/s * ms / 1000, floor
    1000; the master key digest gets an eighth of it)."""
    header, _ = create_luks_header(PASS, {"iter-time": 50})
    hdr = LuksHeader.parse(header)
    assert hdr.key_slots[0].iterations > 5000
    assert hdr.master_key_iterations >= 1000
    header, _ = create_luks_header(PASS, {"iter-time": 0})
    hdr = LuksHeader.parse(header)
    assert hdr.key_slots[0].iterations == 1000 and hdr.master_key_iterations == 1000
