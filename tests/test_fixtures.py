"""Golden images made by QEMU 7.2 (see tests/fixtures/make_fixtures.sh).

qcow2lib must read each fixture to the exact bytes recorded in manifest.json (sha256 of
`qemu-img convert -O raw`); qemu-img is re-run as a guard so a stale manifest shows up as a
fixture problem and not as an engine bug.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
from pathlib import Path

import pytest

try:
    from qemutools import to_raw
except ImportError:  # tests/ imported as a package
    from tests.qemutools import to_raw

try:
    import qcow2lib
except ImportError:  # pragma: no cover - conftest normally puts the source tree on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import qcow2lib

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST)

# metadata qcow2lib must report for some fixtures (contract attributes)
EXPECTED_ATTRS = {
    "v2-16k.qcow2": {"compat": "0.10", "cluster_size": 16384, "refcount_bits": 16},
    "v2-64k.qcow2.xz": {"compat": "0.10", "cluster_size": 65536},
    "v3-extl2-16k.qcow2": {"compat": "1.1", "extended_l2": True, "cluster_size": 16384},
    "v3-rc1-4k.qcow2": {"refcount_bits": 1, "cluster_size": 4096},
    "v3-rc64-512.qcow2": {"refcount_bits": 64, "cluster_size": 512},
    "v3-zstd-4k-compressed.qcow2": {"compression_type": "zstd"},
    "v3-zlib-512-compressed.qcow2": {"compression_type": "zlib", "cluster_size": 512},
    "v3-lazy-dirty-4k.qcow2": {"lazy_refcounts": True, "dirty": True, "corrupt": False},
    "v3-bitmap-4k.qcow2": {"bitmaps": [{"name": "bm0", "granularity": 65536, "flags": ["auto"]}]},
    "chain-base.raw": {"format": "raw"},
    "chain-mid.qcow2": {"backing_filename": "chain-base.raw", "backing_format": "raw"},
    "chain-top.qcow2": {
        "backing_filename": "chain-mid.qcow2",
        "backing_format": "qcow2",
        "extended_l2": True,
    },
    "v3-datafile-raw-4k.qcow2": {"data_file": "v3-datafile-raw-4k.data", "data_file_raw": True},
    "v3-unknown-ext-4k.qcow2": {"data_file": None, "backing_filename": None},
}


def image_path(name: str, tmp_path: Path) -> Path:
    """The fixture as an openable file (.xz ones are decompressed into tmp_path)."""
    src = FIXTURES / name
    if name.endswith(".xz"):
        dst = tmp_path / name[:-3]
        dst.write_bytes(lzma.decompress(src.read_bytes()))
        return dst
    return src


@pytest.fixture
def in_fixtures_dir(monkeypatch):
    # qemu resolves a relative data_file name against its cwd; run everything from here so
    # qemu and qcow2lib agree whichever base qcow2lib uses (the image dir is the same dir).
    monkeypatch.chdir(FIXTURES)


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_qemu_agrees_with_manifest(name, tmp_path, in_fixtures_dir):
    """Guard: the manifest matches what qemu-img says today."""
    path = image_path(name, tmp_path)
    raw = to_raw(path, tmp_path / "out.raw")
    assert len(raw) == MANIFEST[name]["virtual_size"]
    assert sha256(raw) == MANIFEST[name]["sha256_raw"]


@pytest.mark.parametrize("name", NAMES)
def test_qcow2lib_reads_fixture(name, tmp_path, in_fixtures_dir):
    entry = MANIFEST[name]
    path = image_path(name, tmp_path)
    before = sha256(path.read_bytes())
    with qcow2lib.open(str(path), mode="r") as img:
        assert img.size == entry["virtual_size"]
        data = img.read(0, img.size)
        assert len(data) == entry["virtual_size"]
        assert sha256(data) == entry["sha256_raw"], f"{name}: content differs from qemu-img"
        # same content when read in odd chunks
        h = hashlib.sha256()
        pos, step = 0, 4093
        while pos < img.size:
            n = min(step, img.size - pos)
            h.update(img.read(pos, n))
            pos += n
            step = step * 3 // 2 + 1
        assert h.hexdigest() == entry["sha256_raw"], f"{name}: chunked read differs"
        for attr, want in EXPECTED_ATTRS.get(name, {}).items():
            assert getattr(img, attr) == want, (
                f"{name}: {attr}={getattr(img, attr)!r}, want {want!r}"
            )
    # a read-only open must leave the file untouched (no dirty/autoclear bit fixes etc.)
    assert sha256(path.read_bytes()) == before, f"{name}: read-only open modified the file"


def test_manifest_covers_fixture_dir():
    images = {p.name for p in FIXTURES.iterdir() if p.suffix in (".qcow2", ".raw", ".xz")}
    assert images == set(MANIFEST), images ^ set(MANIFEST)
    for name in MANIFEST:
        assert (FIXTURES / name).stat().st_size < 200 * 1024, name
