"""convert's fast paths: the block-wise sparse detection (qemu-img -S) against a
sector-by-sector reading of QEMU's is_allocated_sectors / is_allocated_sectors_min rules,
and the batched, multi-threaded copy (compressed too) against qemu-img's own output,
byte for byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import qcow2lib
import qcow2lib.convert as convert_module
from qcow2lib.cli import main as qimg_main
from qcow2lib.convert import is_allocated_sectors_min, sparse_runs
from qemutools import qemu_create, qemu_img, qemu_io, run_qimg_in, to_raw

SECTOR = 512


def reference_runs(
    zero: list[bool], min_sparse: int, sector_num: int, alignment: int
) -> list[tuple[bool, int]]:
    """The runs qemu-img convert's loop over is_allocated_sectors_min gives, computed from
    one zero flag per sector, one sector at a time."""

    def allocated(first: int, n: int, sector: int) -> tuple[bool, int]:
        is_zero = zero[first]
        run = 1
        while run < n and zero[first + run] == is_zero:
            run += 1
        if run == n:
            return not is_zero, run
        tail = (sector + run) % alignment
        if tail:
            if is_zero and run <= tail:
                is_zero = False
            if is_zero:
                run -= tail
            else:
                run = min(run + alignment - tail, n)
        return not is_zero, run

    def allocated_min(first: int, n: int, sector: int) -> tuple[bool, int]:
        least = min(min_sparse, n)
        ret, count = allocated(first, n, sector)
        if not ret:
            return ret, count
        used = checked = count
        while checked < n:
            ret, count = allocated(first + checked, n - checked, sector + checked)
            checked += count
            if ret:
                used = checked
            elif count >= least:
                break
        return True, used

    runs, pos = [], 0
    while pos < len(zero):
        ret, count = allocated_min(pos, len(zero) - pos, sector_num + pos)
        runs.append((ret, count))
        pos += count
    return runs


def random_buffer(rng: random.Random, sectors: int) -> tuple[bytearray, list[bool]]:
    """Zero and data pieces of every length, data sectors with few non-zero bytes (first,
    middle or last byte only, or one elsewhere), and spare bytes past the sectors used."""
    buf = bytearray((sectors + rng.randint(0, 3)) * SECTOR)
    pos = 0
    while pos < sectors:
        length = rng.choice([1, 2, 7, 8, 9, 16, 64, rng.randint(1, 200)])
        if rng.random() < 0.5:
            for sector in range(pos, min(pos + length, sectors)):
                where = rng.choice([0, 255, 256, 511, rng.randrange(SECTOR)])
                buf[sector * SECTOR + where] = rng.randint(1, 255)
        pos += length
    for index in range(sectors * SECTOR, len(buf)):
        buf[index] = 0xAA  # past n: must not count
    zero = [not any(buf[s * SECTOR : (s + 1) * SECTOR]) for s in range(sectors)]
    return buf, zero


@pytest.mark.parametrize("seed", range(4))
def test_sparse_runs_match_qemu_rules(seed):
    rng = random.Random(seed)
    for _ in range(1500):
        sectors = rng.randint(1, 300)
        buf, zero = random_buffer(rng, sectors)
        min_sparse = rng.choice([1, 2, 3, 8, 9, 16, 24, 64, 100, 128])
        alignment = 1 << (min_sparse.bit_length() - 1)
        if rng.random() < 0.2:
            alignment = rng.choice([1, 2, 4, 8, 16, 32])
        sector_num = rng.choice([0, alignment, 3 * alignment, rng.randint(0, 5000)])
        expected = reference_runs(zero, min_sparse, sector_num, alignment)
        assert sparse_runs(buf, sectors, min_sparse, sector_num, alignment) == expected
        pos, slow = 0, []
        while pos < sectors:
            slow.append(
                is_allocated_sectors_min(
                    buf, pos, sectors - pos, min_sparse, sector_num + pos, alignment
                )
            )
            pos += slow[-1][1]
        assert slow == expected


def test_sparse_runs_examples():
    block = bytearray(8 * SECTOR)
    data = bytearray(b"x" * SECTOR)
    # data, a zero 4 KiB block, data again: the zero block is its own run at -S 4k ...
    buf = data * 8 + block + data * 8
    assert sparse_runs(buf, 24, 8, 0, 8) == [(True, 8), (False, 8), (True, 8)]
    # ... and swallowed at -S 6k (8 sectors are fewer than 12, and more data follows)
    assert sparse_runs(buf, 24, 12, 0, 8) == [(True, 24)]
    # a zero tail shorter than min_sparse stays zero: nothing follows it
    assert sparse_runs(data * 8 + block, 16, 12, 0, 8) == [(True, 8), (False, 8)]
    # a block of the grid with any data in it is data
    assert sparse_runs(data + block[: 15 * SECTOR], 16, 16, 0, 16) == [(True, 16)]
    # starting off the grid (guest sector 7), blocks are counted from guest sector 8
    assert sparse_runs(bytearray(SECTOR) + data * 7 + block, 16, 8, 7, 8) == [
        (False, 1),
        (True, 8),
        (False, 7),
    ]


def mixed_raw(path: Path, chunks: int = 40, chunk: int = 256 << 10) -> None:
    """Chunks of incompressible data, text, zeros written as data, and holes; text tails
    padded with zeros, as file systems leave them."""
    rng = random.Random(13)
    text = b"qcow2 clusters, refcounts and L2 tables. " * (chunk // 40)
    with open(path, "wb") as out:
        out.truncate(chunks * chunk)
        for index in range(chunks):
            kind = rng.choice(["random", "text", "zeros", "hole", "tail"])
            if kind == "hole":
                continue
            data = {
                "random": lambda: rng.randbytes(chunk),
                "text": lambda: text[:chunk].ljust(chunk, b"."),
                "zeros": lambda: bytes(chunk),
                "tail": lambda: (text[: rng.randrange(1, chunk)]).ljust(chunk, b"\0"),
            }[kind]()
            out.seek(index * chunk)
            out.write(data)


@pytest.mark.parametrize(
    "options",
    [
        ["-O", "qcow2"],
        ["-O", "qcow2", "-S", "64k"],
        ["-O", "qcow2", "-c"],
        ["-O", "qcow2", "-c", "-o", "compression_type=zstd,cluster_size=4096"],
        ["-O", "raw"],
        ["-O", "qcow2", "-o", "cluster_size=512"],
    ],
    ids=["qcow2", "sparse-64k", "zlib", "zstd-4k", "raw", "l2-boundaries"],
)
def test_convert_output_is_qemu_img_s(tmp_path, options):
    """Several workers, batches and (for -c) parallel compression, yet the file written
    is the one qemu-img writes, byte for byte."""
    mixed_raw(tmp_path / "src.raw")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", tmp_path / "src.raw", tmp_path / "src.qcow2")
    ours = run_qimg_in(tmp_path, "convert", "-f", "qcow2", *options, "src.qcow2", "ours")
    assert ours.returncode == 0, ours.stderr
    qemu_img("convert", "-f", "qcow2", *options, tmp_path / "src.qcow2", tmp_path / "theirs")
    ours_bytes, theirs_bytes = (tmp_path / "ours").read_bytes(), (tmp_path / "theirs").read_bytes()
    # (Where the file ends with compressed bytes, qemu-img's file goes on with zeros to
    # the end of that sector; ours ends with the data.)
    assert ours_bytes == theirs_bytes[: len(ours_bytes)]
    assert len(theirs_bytes) - len(ours_bytes) < 512
    assert not any(theirs_bytes[len(ours_bytes) :])


def chain_of_three(tmp_path: Path, cluster_size: int) -> Path:
    """base (the mixed content) <- mid <- top, the upper layers rewriting pieces of
    several clusters (and parts of clusters) at scattered offsets; returns top."""
    mixed_raw(tmp_path / "src.raw")
    options = ["-o", f"cluster_size={cluster_size}"]
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        *options,
        tmp_path / "src.raw",
        tmp_path / "base.qcow2",
    )
    size = (tmp_path / "src.raw").stat().st_size
    rng = random.Random(7)
    below = "base.qcow2"
    for name, pattern in (("mid", 0x4D), ("top", 0x54)):
        layer = tmp_path / f"{name}.qcow2"
        qemu_create(
            layer, size, options={"cluster_size": cluster_size}, backing=below, backing_fmt="qcow2"
        )
        writes = []
        for _ in range(24):
            length = rng.randrange(1, 9 * cluster_size)
            writes.append(f"write -P {pattern} {rng.randrange(0, size - length)} {length}")
        qemu_io(layer, *writes, fmt="qcow2")
        below = layer.name
    return tmp_path / "top.qcow2"


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_reads_through_a_chain(tmp_path, cluster_size):
    """Reads of whole runs of clusters take shortcuts past the segment list at each layer
    (one data run, or a range the layer leaves to its backing file); what they read at
    any offset and length, over L2 table boundaries too (512-byte clusters), is what
    qemu-img reads."""
    top = chain_of_three(tmp_path, cluster_size)
    expected = to_raw(top, tmp_path / "top.raw")
    rng = random.Random(cluster_size)
    with qcow2lib.open(str(top), "r") as image:
        for _ in range(300):
            length = rng.randrange(1, 24 * cluster_size)
            offset = rng.randrange(0, image.size - length)
            if rng.random() < 0.5:  # (cluster-aligned, as convert reads)
                offset -= offset % cluster_size
            buffer = bytearray(length)
            image.readinto(offset, buffer)
            assert buffer == expected[offset : offset + length], (offset, length)


@pytest.mark.parametrize("plan_items", [convert_module.PLAN_MAX_ITEMS, 3])
def test_chain_convert_with_kept_or_remade_plan(tmp_path, monkeypatch, plan_items):
    """The workers take the items of the counting pass, or, past PLAN_MAX_ITEMS, walk
    the sources' extents again: either way the file is qemu-img's, byte for byte."""
    top = chain_of_three(tmp_path, 65536)
    monkeypatch.setattr(convert_module, "PLAN_MAX_ITEMS", plan_items)
    assert qimg_main(["convert", "-O", "qcow2", str(top), str(tmp_path / "ours")]) == 0
    qemu_img("convert", "-O", "qcow2", top, tmp_path / "theirs")
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
