"""`map` fields (present, depth, zero, data, offset) of images qimg wrote, against the same
operations done by the real qemu-img: the allocation qimg leaves must be QEMU's, so that
qemu-img map (and qimg map) report the same entries."""

from __future__ import annotations

import json

import pytest

from qemutools import qemu_img, qemu_io, run_qimg


def qemu_map_json(path) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", path).stdout)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("with_backing", [False, True])
def test_convert_n_zeroes_the_existing_target_as_qemu(tmp_path, compat, with_backing):
    """convert -n does not trust what the target reads: zero runs of the source become
    zero clusters (v3), holes (v2 without a backing file) or written zeros (v2 over a
    backing file), as in qemu-img."""
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "4M")
    qemu_io(source, "write -P 0x33 1M 64k")
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    targets = {}
    for who in ("ours", "theirs"):
        target = tmp_path / f"{who}.qcow2"
        backing = ["-b", base, "-F", "qcow2"] if with_backing else []
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", *backing, target, "4M")
        targets[who] = target
    qemu_img("convert", "-O", "qcow2", "-n", source, targets["theirs"])
    got = run_qimg("convert", "-O", "qcow2", "-n", source, targets["ours"])
    assert (got.returncode, got.stderr) == (0, "")
    assert qemu_map_json(targets["ours"]) == qemu_map_json(targets["theirs"])
    ours = run_qimg("map", "--output=json", targets["ours"])
    assert ours.stdout == qemu_img("map", "--output=json", targets["theirs"]).stdout
    assert qemu_img("compare", source, targets["ours"]).returncode == 0


def test_raw_data_file_image_created_as_qemu_maps_as_qemu(tmp_path):
    """An image with a raw external data file: the holes of the data file are data, not
    zeros, unless QEMU's metadata-preallocation heuristic (allocated size of the qcow2
    file) says otherwise; qimg's create allocates what QEMU's does."""
    images = {}
    for who, create in (("ours", run_qimg), ("theirs", qemu_img)):
        path = tmp_path / f"{who}.qcow2"
        data = tmp_path / f"{who}.qcow2.data"
        result = create(
            "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", path, "8M"
        )
        assert result.returncode == 0
        qemu_io(path, "write -P 0x11 1M 4M", "discard 2M 2M", "write -z 3M 3M", fmt="qcow2")
        images[who] = path
    assert images["ours"].stat().st_blocks == images["theirs"].stat().st_blocks
    expected = qemu_map_json(images["theirs"])
    assert expected[0] == {
        "start": 0,
        "length": 2 * 1024 * 1024,
        "depth": 0,
        "present": True,
        "zero": False,
        "data": True,
        "offset": 0,
    }
    assert qemu_map_json(images["ours"]) == expected
    got = run_qimg("map", "--output=json", images["ours"])
    assert got.stdout == qemu_img("map", "--output=json", images["theirs"]).stdout


@pytest.mark.parametrize(
    "prealloc, base_size, old_size, new_size, data_at",
    [
        ("metadata", "3G", "1G", "3200M", "2G"),
        ("falloc", "10M", "5M", "15M", "9M"),
        ("full", "16M", "8M", "12M", "11M"),
    ],
)
def test_resize_with_preallocation_over_a_longer_backing_file(
    tmp_path, prealloc, base_size, old_size, new_size, data_at
):
    """Growing over a backing file longer than the image: the new area must read zeros.
    QEMU lays each L2 table before the data clusters it maps (refcount blocks after the
    run that needed them), zero-flags metadata preallocation and leaves falloc/full data
    clusters as data (they read zeros already)."""
    images = {}
    for who, resize in (("ours", run_qimg), ("theirs", qemu_img)):
        base = tmp_path / f"{who}-base.qcow2"
        top = tmp_path / f"{who}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, base_size)
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, old_size)
        qemu_io(base, f"write -P 1 {data_at} 64k")
        result = resize("resize", "-q", "-f", "qcow2", "--preallocation", prealloc, top, new_size)
        assert result.returncode == 0
        images[who] = top
    expected = qemu_map_json(images["theirs"])
    assert qemu_map_json(images["ours"]) == expected
    assert all(e["depth"] == 0 for e in expected[1:])
    assert qemu_img("compare", images["ours"], images["theirs"]).returncode == 0
