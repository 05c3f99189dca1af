"""What `qemu-img info` reports about an image, as the same dict QEMU serialises.

Keys, nesting and presence rules follow QEMU's ImageInfo schema, and every dict is built
in schema order, so a caller can print it exactly like qemu-img (see tools/qimg.py)
or hand it to programs that already parse `qemu-img info --output=json`.
"""
from __future__ import annotations

import os

import qcow2lib

from ..errors import InvalidArgumentError, Qcow2Error
from ..snapshots import read_snapshot_table
from . import error_text, full_backing_filename, host_path

FORMATS = ("qcow2", "raw")


class ImageOpenError(Qcow2Error):
    """An image of the chain could not be opened; the message names it like qemu-img."""


def _qcow2_specific(img) -> dict:
    """The "format-specific" data of a qcow2 image, members in QEMU's schema order."""
    if img.compat == "0.10":
        return {"compat": "0.10", "refcount-bits": img.refcount_bits,
                "compression-type": img.compression_type}
    data: dict = {"compat": img.compat}
    if img.header.data_file is not None:
        data["data-file"] = img.header.data_file
        data["data-file-raw"] = img.data_file_raw
    data["extended-l2"] = img.extended_l2
    data["lazy-refcounts"] = img.lazy_refcounts
    data["corrupt"] = img.corrupt
    data["refcount-bits"] = img.refcount_bits
    data["compression-type"] = img.compression_type
    return data


def _snapshot_list(img) -> list[dict]:
    """The internal snapshots of a qcow2 image as QEMU's SnapshotInfo dicts."""
    hdr = img.header
    snapshots, _ = read_snapshot_table(img.file, hdr.snapshots_offset, hdr.nb_snapshots,
                                       img.cluster_size, img.file.size())
    infos = []
    for snap in snapshots:
        info = {"id": snap.id, "name": snap.name, "vm-state-size": snap.vm_state_size,
                "date-sec": snap.date_sec, "date-nsec": snap.date_nsec,
                "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
                "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000}
        if snap.icount is not None and snap.icount != (1 << 64) - 1:
            info["icount"] = snap.icount
        infos.append(info)
    return infos


def image_info(filename: str, fmt: str | None = None) -> dict:
    """The `qemu-img info` dict of one image, its backing file left unopened.

    `filename` is taken as qemu-img takes it (a "file:" prefix is allowed); `fmt` None
    probes the format. Raises ImageOpenError naming the file when it cannot be opened.
    """
    try:
        if fmt is not None and fmt not in FORMATS:
            raise InvalidArgumentError(f"Unknown driver '{fmt}'")
        path = host_path(filename)
        img = qcow2lib.open(path, "r", fmt=fmt, backing=False)
    except Qcow2Error as exc:
        raise ImageOpenError(f"Could not open '{filename}': {error_text(exc)}") from exc
    with img:
        info: dict = {"filename": path, "format": img.format,
                      "dirty-flag": img.format == "qcow2" and img.dirty}
        info["actual-size"] = os.stat(path).st_blocks * 512
        info["virtual-size"] = img.size
        if img.format == "qcow2":
            info["cluster-size"] = img.cluster_size
            if img.encrypted:
                info["encrypted"] = True
            if img.backing_filename:
                info["backing-filename"] = img.backing_filename
                info["full-backing-filename"] = full_backing_filename(path, img.backing_filename)
                if img.backing_format:
                    info["backing-filename-format"] = img.backing_format
            if img.header.nb_snapshots:
                info["snapshots"] = _snapshot_list(img)
            info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(img)}
    return info


def image_info_list(filename: str, fmt: str | None = None, backing_chain: bool = False) -> list[dict]:
    """`qemu-img info [--backing-chain]`: the top image, then each backing file in turn.

    Backing files are opened by their full backing filename with the recorded backing
    format (probed when none is recorded). A name seen twice is a loop and raises
    CorruptImageError with qemu-img's message.
    """
    seen: set[str] = set()
    infos: list[dict] = []
    name: str | None = filename
    while name is not None:
        if name in seen:
            raise qcow2lib.CorruptImageError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        info = image_info(name, fmt)
        infos.append(info)
        name = fmt = None
        if backing_chain:
            name = info.get("full-backing-filename")
            fmt = info.get("backing-filename-format")
    return infos
