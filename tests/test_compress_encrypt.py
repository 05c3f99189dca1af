"""Compressed clusters and encryption written by qcow2lib, judged by real QEMU.

Compressed: qcow2lib writes zlib and zstd clusters (several per host cluster, the last
image cluster partial) and random overwrites turn them back into normal clusters;
`qemu-img check` stays clean and `qemu-img compare` equal. Encrypted: qcow2lib creates
LUKS images with each cipher/mode/ivgen QEMU offers and legacy AES ones; QEMU reads them
with the same passphrase; images QEMU made are read by qcow2lib.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qemutools import QEMU_IMG, QEMU_IO, assert_clean, qemu_compare, qemu_img, run
from qemu_luks import PASS as LUKS_PASS
from qemu_luks import copy_image

SECRET = "s3cret-passphrase"


def _patterned(rng: random.Random, length: int) -> bytes:
    """Data that compresses (runs) with some noise, so sizes vary from cluster to cluster."""
    out = bytearray()
    while len(out) < length:
        out += bytes([rng.randrange(256)]) * rng.randrange(1, 300) + rng.randbytes(
            rng.randrange(0, 40)
        )
    return bytes(out[:length])


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize(
    "cluster_size,extended_l2", [(4096, False), (65536, False), (2 << 20, False), (65536, True)]
)
def test_compressed_writes_are_valid_for_qemu(
    tmp_path: Path, compression: str, cluster_size: int, extended_l2: bool
) -> None:
    rng = random.Random(f"{compression}-{cluster_size}-{extended_l2}")
    size = max(16 * cluster_size, 4 << 20) + cluster_size // 2  # partial last cluster
    path = tmp_path / "c.qcow2"
    qcow2lib.create(
        str(path),
        size,
        cluster_size=cluster_size,
        extended_l2=extended_l2,
        compression_type=compression,
    )
    model = bytearray(size)
    with qcow2lib.open(str(path), "r+") as image:
        for start in range(0, size, cluster_size):
            if rng.random() < 0.8:
                length = min(cluster_size, size - start)
                data = _patterned(rng, length) if rng.random() < 0.9 else os.urandom(length)
                image.write_compressed(start, data)
                model[start : start + length] = data
        assert image.read(0, size) == model
        image.flush()
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert_clean(path)
    assert qemu_compare(path, raw, "qcow2", "raw") == 0
    info = qemu_img("check", "--output=json", path).stdout
    assert '"compressed-clusters"' in info
    # Overwrite parts of compressed clusters: they become normal clusters.
    with qcow2lib.open(str(path), "r+") as image:
        for _ in range(25):
            offset = rng.randrange(size - 1)
            length = min(size - offset, rng.randrange(1, 3 * cluster_size))
            data = rng.randbytes(length)
            image.write(offset, data)
            model[offset : offset + length] = data
        assert image.read(0, size) == model
    raw.write_bytes(model)
    assert_clean(path)
    assert qemu_compare(path, raw, "qcow2", "raw") == 0


def test_incompressible_cluster_is_stored_plain(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    qcow2lib.create(str(path), 1 << 20, cluster_size=4096)
    noise = os.urandom(4096)
    with qcow2lib.open(str(path), "r+") as image:
        image.write_compressed(0, noise)
        image.write_compressed(4096, bytes(4096))
        extents = image.extents(0, 8192)
        assert image.read(0, 4096) == noise
    assert extents[0].host_offset is not None  # stored as a normal cluster
    assert_clean(path)


def test_compressed_write_rejects_partial_cluster(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    qcow2lib.create(str(path), 1 << 20, cluster_size=4096)
    with qcow2lib.open(str(path), "r+") as image:
        with pytest.raises(qcow2lib.InvalidArgumentError, match="whole clusters"):
            image.write_compressed(100, bytes(4096))
        with pytest.raises(qcow2lib.InvalidArgumentError, match="whole clusters"):
            image.write_compressed(0, bytes(1000))


LUKS_VARIANTS = [
    {"cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64"},
    {"cipher-alg": "aes-128", "cipher-mode": "xts", "ivgen-alg": "plain64"},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "plain"},
    {"cipher-alg": "aes-256", "cipher-mode": "cbc", "ivgen-alg": "plain64", "hash-alg": "sha512"},
    {
        "cipher-alg": "aes-128",
        "cipher-mode": "cbc",
        "ivgen-alg": "essiv",
        "ivgen-hash-alg": "sha256",
    },
]


def _qemu_create_encrypted(path: Path, options: str, size: str) -> None:
    run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            f"secret,id=sec0,data={SECRET}",
            "-o",
            options,
            path,
            size,
        ]
    )


def _image_opts(path: Path) -> list[str]:
    return [
        "--object",
        f"secret,id=sec0,data={SECRET}",
        "--image-opts",
        f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0",
    ]


def _random_writes(image, model: bytearray, rng: random.Random, count: int) -> None:
    for _ in range(count):
        offset = rng.randrange(len(model) - 1)
        length = min(len(model) - offset, rng.choice([1, 511, 4096, 70000, rng.randrange(1, 9000)]))
        data = rng.randbytes(length)
        image.write(offset, data)
        model[offset : offset + length] = data


@pytest.mark.parametrize("options", LUKS_VARIANTS, ids=lambda o: "-".join(o.values()))
def test_luks_images_written_by_qcow2lib_read_by_qemu(tmp_path: Path, options: dict) -> None:
    rng = random.Random(str(options))
    size = 6 << 20
    path = tmp_path / "luks.qcow2"
    qcow2lib.create(
        str(path),
        size,
        cluster_size=65536,
        encrypt_format="luks",
        passphrase=SECRET,
        encrypt_options={**options, "iter-time": 10},
    )
    model = bytearray(size)
    with qcow2lib.open(str(path), "r+", passphrase=SECRET) as image:
        _random_writes(image, model, rng, 30)
        image.write_zeroes(1 << 20, 300000)
        model[1 << 20 : (1 << 20) + 300000] = bytes(300000)
        marker = b"PLAINTEXT-MARKER" * 256
        image.write(5 << 20, marker)
        model[5 << 20 : (5 << 20) + len(marker)] = marker
        assert image.read(0, size) == model
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    result = subprocess.run(
        [QEMU_IMG, "compare", *_image_opts(path), f"driver=raw,file.filename={raw}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check = subprocess.run([QEMU_IMG, "check", *_image_opts(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = qemu_img("info", path).stdout
    assert "encrypted: yes" in info
    assert b"PLAINTEXT-MARKER" not in path.read_bytes()  # only ciphertext reaches the file


@pytest.mark.parametrize(
    "name", ["aes256-xts-plain64", "aes128-xts-plain64", "aes128-cbc-plain-sha1"]
)
def test_luks_images_written_by_qemu_read_by_qcow2lib(
    tmp_path: Path, tmp_path_factory, name: str
) -> None:
    """A copy of an image QEMU encrypted (tests/qemu_luks.py), written again by qemu-io at
    unaligned offsets and with zeros, read by qcow2lib as qemu-img converts it."""
    path = copy_image(tmp_path_factory, name, tmp_path / "q.qcow2")
    secret = ["--object", f"secret,id=sec0,data={LUKS_PASS}"]
    opts = ["--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    subprocess.run(
        [
            QEMU_IO,
            *secret,
            *opts,
            "-c",
            "write -P 0x5a 0 70000",
            "-c",
            "write -P 0xa5 3000001 5000",
            "-c",
            "write -z 2M 64k",
        ],
        check=True,
        capture_output=True,
    )
    raw = tmp_path / "q.raw"
    qemu_img("convert", *secret, "-O", "raw", *opts, raw)
    with qcow2lib.open(str(path), passphrase=LUKS_PASS) as image:
        assert image.read(0, image.size) == raw.read_bytes()
    with qcow2lib.open(str(path), "r+", passphrase=LUKS_PASS) as image:
        image.write(10, b"qcow2lib")
    result = subprocess.run(
        [QEMU_IO, *secret, *opts, "-c", "read -v 10 8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "qcow2lib" in result.stdout


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "luks.qcow2"
    qcow2lib.create(
        str(path),
        1 << 20,
        encrypt_format="luks",
        passphrase=SECRET,
        encrypt_options={"iter-time": 10},
    )
    with pytest.raises(qcow2lib.BadSecretError, match="Invalid password"):
        qcow2lib.open(str(path), passphrase="not it")
    with qcow2lib.open(str(path)) as image:  # metadata only: info works without a secret
        assert image.encrypted
        with pytest.raises(qcow2lib.BadSecretError, match="passphrase"):
            image.read(0, 512)


def test_compression_refused_in_encrypted_image(tmp_path: Path) -> None:
    path = tmp_path / "luks.qcow2"
    qcow2lib.create(
        str(path),
        1 << 20,
        encrypt_format="luks",
        passphrase=SECRET,
        encrypt_options={"iter-time": 10},
    )
    with qcow2lib.open(str(path), "r+", passphrase=SECRET) as image:
        with pytest.raises(qcow2lib.UnsupportedFeatureError, match="encryption"):
            image.write_compressed(0, bytes(65536))


def test_legacy_aes_both_ways(tmp_path: Path) -> None:
    ours = tmp_path / "ours.qcow2"
    qcow2lib.create(str(ours), 2 << 20, cluster_size=4096, encrypt_format="aes", passphrase=SECRET)
    model = bytearray(2 << 20)
    with qcow2lib.open(str(ours), "r+", passphrase=SECRET) as image:
        _random_writes(image, model, random.Random(5), 20)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    result = subprocess.run(
        [QEMU_IMG, "compare", *_image_opts(ours), f"driver=raw,file.filename={raw}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    theirs = tmp_path / "theirs.qcow2"
    _qemu_create_encrypted(theirs, "encrypt.format=aes,encrypt.key-secret=sec0", "2M")
    subprocess.run(
        [QEMU_IO, *_image_opts(theirs), "-c", "write -P 0x33 4095 10000"],
        check=True,
        capture_output=True,
    )
    with qcow2lib.open(str(theirs), passphrase=SECRET) as image:
        data = image.read(0, image.size)
    expected = bytearray(2 << 20)
    expected[4095:14095] = b"\x33" * 10000
    assert data == expected
