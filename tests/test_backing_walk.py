"""Walks over a backing chain (map, convert, compare): each layer's backing file answers
the ranges it leaves unallocated from one forward walk of its tables (image._BackingCursor),
and a plain read-only chain's data is read where its extents say (convert's direct reads).
What qemu-img prints and writes is the reference: chains fragmented at random, a top layer
longer than the layers below, windows of map, and an error in a backing file part-way."""

from __future__ import annotations

import random
import struct

import pytest

import qcow2lib
from qcow2lib import image as image_module
from qcow2lib.convert import convert
from qemutools import qemu_img, qemu_io, random_io_command, run_qimg

MiB = 1 << 20


def scatter_writes(path, seed: int, size: int, count: int) -> None:
    """qemu-io writes at random places: small and large, some zero writes and discards."""
    rng = random.Random(seed)
    lengths = [4096, 65536, 3 * 65536, MiB]
    qemu_io(path, *(random_io_command(rng, size, 4096, lengths, 0.1, 0.2) for _ in range(count)))


def fragmented_chain(tmp_path, seed: int) -> tuple:
    """base (24 MiB) <- mid (32 MiB) <- top (40 MiB), each written at random: the top
    reaches past the layers below (zeros there)."""
    base, mid, top = (tmp_path / f"{name}.qcow2" for name in ("base", "mid", "top"))
    cluster = [4096, 65536][seed % 2]
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", base, 24 * MiB)
    scatter_writes(base, seed, 24 * MiB, 200)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid, 32 * MiB)
    scatter_writes(mid, seed + 100, 32 * MiB, 150)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, 40 * MiB)
    scatter_writes(top, seed + 200, 40 * MiB, 300)
    return base, mid, top


def same_as_qemu(*args) -> None:
    ours = run_qimg(*args)
    theirs = qemu_img(*args, check=False)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    ), args


@pytest.mark.parametrize("seed", range(4))
def test_map_and_convert_of_fragmented_chains_as_qemu(tmp_path, seed):
    _, _, top = fragmented_chain(tmp_path, seed)
    rng = random.Random(seed)
    windows = [[], ["-s", "0", "-l", "1M"]]
    for _ in range(3):
        start = rng.randrange(0, 40 * MiB)
        windows.append(["-s", str(start), "-l", str(rng.randrange(1, 40 * MiB - start + 1))])
    for window in windows:
        for output in (["--output=json"], []):
            same_as_qemu("map", *output, *window, str(top))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert run_qimg("convert", "-O", "qcow2", top, ours).returncode == 0
    qemu_img("convert", "-O", "qcow2", top, theirs)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, ours)
    assert qemu_img("map", "--output=json", ours).stdout == (
        qemu_img("map", "--output=json", theirs).stdout
    )
    qemu_img("check", ours)


def test_a_backing_file_is_walked_once_for_the_many_ranges_above_it(tmp_path, monkeypatch):
    """A top layer of 256 small extents over its backing file: one walk of the backing
    file's tables (a range asked again before the last restarts it), not one per range."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 64 * MiB)
    qemu_io(base, *(f"write -P 7 {offset} 64k" for offset in range(0, 64 * MiB, 128 * 1024)))
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, 64 * MiB)
    qemu_io(top, *(f"write -P 9 {offset + 4096} 4k" for offset in range(0, 64 * MiB, 256 * 1024)))
    walks: list[tuple[str, int]] = []
    real = image_module.Qcow2Image.extent_batches

    def counting(self, offset, length):
        walks.append((self.filename, offset))
        return real(self, offset, length)

    monkeypatch.setattr(image_module.Qcow2Image, "extent_batches", counting)
    with qcow2lib.open(str(top)) as image:
        extents = list(image.iter_extents(0, image.size))
        assert [name for name, _ in walks].count(str(base)) == 1
        walks.clear()
        again = list(image.iter_extents(8 * MiB, 8 * MiB))  # (a walk of its own)
        assert [name for name, _ in walks].count(str(base)) == 1
    inside = [
        ext._replace(offset=max(ext.offset, 8 * MiB))
        for ext in extents
        if ext.offset + ext.length > 8 * MiB and ext.offset < 16 * MiB
    ]
    assert [(e.offset, e.is_data, e.depth) for e in again] == [
        (e.offset, e.is_data, e.depth) for e in inside
    ]
    # the data of the backing file's extents seen through the top: depth 1, its offsets
    data = [e for e in extents if e.is_data]
    assert {e.depth for e in data} == {0, 1} and len(data) == 512


def test_an_error_in_the_backing_file_reaches_the_range_that_needs_it(tmp_path):
    """A bad L2 entry in the backing file, past ranges the top leaves unallocated: map
    prints the entries before it, then the error, as qemu-img does; a window that ends
    before it is whole."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 16 * MiB)
    qemu_io(base, "write -P 1 0 8M")
    with open(base, "r+b") as f:
        l1_offset = struct.unpack_from(">Q", f.read(72), 40)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8 * 100)  # guest cluster 100 (6.25 MiB): an unaligned offset
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_offset + 8 * 100)
        f.write(struct.pack(">Q", entry | 0x200))
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, 16 * MiB)
    qemu_io(top, *(f"write -P 2 {offset} 4k" for offset in range(0, 16 * MiB, MiB)))
    for output in (["--output=json"], []):
        same_as_qemu("map", *output, str(top))
        same_as_qemu("map", *output, "-l", "6M", str(top))


@pytest.mark.parametrize("layers", ["plain", "compressed base", "writable source"])
def test_convert_reads_a_plain_chain_where_its_extents_point(tmp_path, monkeypatch, layers):
    """A plain chain opened read-only: convert reads its data from the layers' files
    directly, never through Qcow2Image.readinto; a layer whose data must be decoded
    (compressed clusters) or an image others may write (opened r+) is read through the
    image. The copy is the chain's content either way."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 8 * MiB)
    qemu_io(base, "write -P 3 0 3M", "write -P 4 5M 1M")
    if layers == "compressed base":
        packed = tmp_path / "packed.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", base, packed)
        base = packed
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, 8 * MiB)
    qemu_io(top, "write -P 5 1M 64k", "write -P 6 6M 4k")
    through_image: list[int] = []
    real = image_module.Qcow2Image.readinto

    def counting(self, offset, buffer):
        through_image.append(offset)
        return real(self, offset, buffer)

    monkeypatch.setattr(image_module.Qcow2Image, "readinto", counting)
    out = tmp_path / "out.raw"
    qemu_img("create", "-q", "-f", "raw", out, 8 * MiB)
    with qcow2lib.open(str(top), "r+" if layers == "writable source" else "r") as source:
        with qcow2lib.open(str(out), "r+", fmt="raw") as target:
            convert(source, target, copy_range=False)
    assert (not through_image) == (layers == "plain")
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, out)
