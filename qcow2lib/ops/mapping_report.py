"""`qemu-img map`: the allocation map of an image and its chain, JSON and human forms.

`map_entries` gives the entries of `qemu-img map --output=json` as dicts (keys in
QEMU's order: start, length, depth, present, zero, data, offset when known);
`map_json_text` and `map_human_text` render them exactly as qemu-img prints them.
"""
from __future__ import annotations

from ..blockdev import BlockDevice
from . import virtual_size


def _entry(ext) -> dict:
    entry = {"start": ext.offset, "length": ext.length, "depth": ext.depth,
             "present": bool(ext.present), "zero": bool(ext.is_zero), "data": bool(ext.is_data)}
    if ext.host_offset is not None:
        entry["offset"] = ext.host_offset
    return entry


def _mergeable(curr: dict, nxt: dict) -> bool:
    if curr["length"] == 0:
        return False
    for key in ("zero", "data", "depth", "present"):
        if curr[key] != nxt[key]:
            return False
    if ("offset" in curr) != ("offset" in nxt):
        return False
    if "offset" in curr and curr["offset"] + curr["length"] != nxt["offset"]:
        return False
    return True


def map_entries(device: BlockDevice, start: int = 0, length: int | None = None) -> list[dict]:
    """The entries `qemu-img map --output=json [-s start] [-l length]` prints.

    As in qemu-img, the map covers [start, min(start + length, size)); a start at or
    past the end yields one empty entry.
    """
    size = virtual_size(device)
    end = size if length is None else min(start + length, size)
    if start >= end:
        return [{"start": start, "length": 0, "depth": 0, "present": False, "zero": False,
                 "data": False}]
    limit = min(end, device.size)
    entries: list[dict] = []
    if start < limit:
        for ext in device.extents(start, limit - start):
            entry = _entry(ext)
            if entries and _mergeable(entries[-1], entry):
                entries[-1]["length"] += entry["length"]
            else:
                entries.append(entry)
    if limit < end:  # a raw file's partial last sector reads as zeros
        tail = {"start": limit, "length": end - limit, "depth": 0, "present": True,
                "zero": True, "data": False, "offset": limit}
        if entries and _mergeable(entries[-1], tail):
            entries[-1]["length"] += tail["length"]
        else:
            entries.append(tail)
    return entries


def map_json_text(entries: list[dict]) -> str:
    """The exact text of `qemu-img map --output=json`."""
    parts = []
    for entry in entries:
        text = (f'{{ "start": {entry["start"]}, "length": {entry["length"]}, '
                f'"depth": {entry["depth"]}, "present": {str(entry["present"]).lower()}, '
                f'"zero": {str(entry["zero"]).lower()}, "data": {str(entry["data"]).lower()}')
        if "offset" in entry:
            text += f', "offset": {entry["offset"]}'
        parts.append(text + "}")
    return "[" + ",\n".join(parts) + "]\n"


def _hex(value: int) -> str:
    """C's "%#-16" PRIx64: no 0x prefix for zero."""
    return ("0x%x" % value if value else "0").ljust(16)


def layer_filename(device: BlockDevice, depth: int) -> str:
    """The file qemu-img map names for data found at `depth` of the chain."""
    layer = device
    for _ in range(depth):
        if layer.backing is None:
            break
        layer = layer.backing
    data_host = getattr(layer, "data_host", None)
    if data_host is not None:
        return data_host.path
    return layer.filename


def map_human_lines(device: BlockDevice, entries: list[dict]) -> tuple[list[str], str | None]:
    """(stdout lines, error message or None) of `qemu-img map` in human format.

    The error is qemu-img's "File contains external, encrypted or compressed clusters."
    (exit 1); the lines printed before it are still returned.
    """
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    if not entries:
        return lines, None
    entries = [dict(e) for e in entries]
    curr = entries[0]
    for nxt in entries[1:] + [None]:
        if nxt is not None and _mergeable(curr, nxt):
            curr["length"] += nxt["length"]
            continue
        if curr["length"] > 0 or nxt is None:
            if curr["data"] and "offset" not in curr:
                return lines, "File contains external, encrypted or compressed clusters."
            if curr["data"] and not curr["zero"]:
                lines.append(_hex(curr["start"]) + _hex(curr["length"])
                             + _hex(curr.get("offset", 0))
                             + layer_filename(device, curr["depth"]))
            # The human format ignores the difference between 0, ZERO and ZERO|DATA.
            if nxt is not None and (not nxt["data"] or nxt["zero"]):
                nxt["data"] = False
                nxt["zero"] = True
        if nxt is not None:
            curr = nxt
    return lines, None


def map_human_text(device: BlockDevice, start: int = 0, length: int | None = None):
    """(stdout text, error or None) of `qemu-img map` (human format)."""
    lines, error = map_human_lines(device, map_entries(device, start, length))
    return "".join(line + "\n" for line in lines), error
