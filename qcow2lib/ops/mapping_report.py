"""`qemu-img map`: the allocation map of an image and its chain, JSON and human forms.

The map is streamed: `write_map` writes the text as the extents are found (one window of
the image at a time), so a map of millions of entries needs memory for one window, and
an error part-way leaves the entries before it printed, as qemu-img does.
`map_entries` gives the entries of `qemu-img map --output=json` as dicts (keys in
QEMU's order: start, length, depth, present, zero, data, offset when known) for callers
that want a (bounded) list; `map_json_text` and `map_human_text` render as qemu-img does.
"""

from __future__ import annotations

from ..blockdev import BlockDevice, Extent, merged_batches
from ..cache import keep_freed_memory
from . import virtual_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

_BOOL = ("false", "true")
_JSON_KEYS = ("start", "length", "depth", "present", "zero", "data")


def _merged(device: BlockDevice, start: int, length: int | None) -> Iterator[list[Extent]]:
    """The map's entries, a list at a time: as in qemu-img it covers [start, min(start +
    length, size)), a raw file's partial last sector reads as zeros, and a start at or
    past the end gives one empty entry."""
    size = virtual_size(device)
    end = size if length is None else min(start + length, size)
    if start >= end:
        return iter(([Extent(start, 0, False, False, 0, None, False)],))
    return merged_batches(_extent_batches(device, start, end))


def _extent_batches(device: BlockDevice, start: int, end: int) -> Iterator[list[Extent]]:
    limit = min(end, device.size)
    if start < limit:
        yield from device.extent_batches(start, limit - start)
    if limit < end:
        yield [Extent(limit, end - limit, False, True, 0, limit, True)]


def _json_entry(ext: Extent) -> str:
    text = (
        f'{{ "start": {ext[0]}, "length": {ext[1]}, "depth": {ext[4]}, '
        f'"present": {_BOOL[ext[6]]}, "zero": {_BOOL[ext[3]]}, "data": {_BOOL[ext[2]]}'
    )
    if ext[5] is not None:
        return text + f', "offset": {ext[5]}}}'
    return text + "}"


def _hex(value: int) -> str:
    """C's "%#-16" PRIx64: no 0x prefix for zero."""
    return ("0x%x" % value if value else "0").ljust(16)


# A human map line's offset, length and host offset where none is zero (Python's "%#x"
# writes zero as 0x0, C's as 0): one formatting for the line, not three
_HUMAN_LINE = "%#-16x%#-16x%#-16x"


def _below_filters(device: BlockDevice) -> BlockDevice:
    """The device under any filter nodes (blkdebug): map names the files data lives in."""
    child = getattr(device, "child", None)
    while child is not None:
        device, child = child, getattr(child, "child", None)
    return device


def _layer_at(device: BlockDevice, depth: int) -> BlockDevice:
    """The image at `depth` of the chain (the last one, if the chain is shorter)."""
    layer = _below_filters(device)
    for _ in range(depth):
        if layer.backing is None:
            break
        layer = _below_filters(layer.backing)
    return layer


def layer_filename(device: BlockDevice, depth: int, offset: int = 0) -> str:
    """The file qemu-img map names for data found at `depth` of the chain, at guest
    `offset` (a VMDK image's extents lie in files of their own)."""
    layer = _layer_at(device, depth)
    host_filename = getattr(layer, "host_filename", None)
    if host_filename is not None:
        return host_filename(offset)
    data_host = getattr(layer, "data_host", None)
    if data_host is not None:  # (a blkdebug node above it goes by its own name)
        return getattr(data_host, "node_filename", None) or data_host.path
    node_file: Any = getattr(layer, "file", None)
    node_name = getattr(node_file, "node_name", None)
    if node_name is not None:  # a node (throttle) between the image and its host file:
        # qcow2 names that node as its data's file, raw passes through to the host file
        return node_name if layer.format == "qcow2" else node_file.path
    return layer.filename


HUMAN_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
EXTERNAL_ERROR = "File contains external, encrypted or compressed clusters."


def write_map(
    device: BlockDevice,
    write: Callable[[str], object],
    start: int = 0,
    length: int | None = None,
    output: str = "human",
) -> str | None:
    """Write `qemu-img map [--output=json] [-s start] [-l length]`'s stdout through
    `write`, as the entries are found. Returns qemu-img's exit-1 message of the human
    format (external, encrypted or compressed data) or None; a Qcow2Error raised
    part-way leaves the entries found before it written, as qemu-img leaves them."""
    keep_freed_memory()  # (a walk over every table of the image)
    if output == "json":
        _write_json(device, write, start, length)
        return None
    return _write_human(device, write, start, length)


def _write_json(device: BlockDevice, write, start: int, length: int | None) -> None:
    """The entries go out a batch at a time, each batch's text made in one pass; every
    line ends in ",\n" but the last, which closes the list (unless an error cuts it
    short: then the lines found before it are written as they are, as qemu-img's)."""
    write("[")
    states: dict[tuple, str] = {}
    held = ""  # the text of the last batch, written once it is known whether more follow
    try:
        for batch in _merged(device, start, length):
            if held:
                write(held)
            held = _json_lines(batch, states)
    except BaseException:
        write(held)
        raise
    write(held[:-2] + "]\n" if held else "]\n")


def _json_lines(extents: list[Extent], states: dict[tuple, str]) -> str:
    """The JSON lines of `extents`, each ending in ",\n". What lies between the length
    and the offset depends only on the extent's state, so it is made once per state."""
    lines: list[str] = []
    add = lines.append
    for offset, length, is_data, is_zero, depth, host_offset, present in extents:
        state = (depth, present, is_zero, is_data)
        fields = states.get(state)
        if fields is None:
            fields = states[state] = (
                f'"depth": {depth}, "present": {_BOOL[present]}, "zero": {_BOOL[is_zero]}, '
                f'"data": {_BOOL[is_data]}'
            )
        if host_offset is None:
            add(f'{{ "start": {offset}, "length": {length}, {fields}}},\n')
        else:
            add(f'{{ "start": {offset}, "length": {length}, {fields}, "offset": {host_offset}}},\n')
    return "".join(lines)


def _write_human(device: BlockDevice, write, start: int, length: int | None) -> str | None:
    """qemu-img's human format prints data entries only. Its rule, applied to entries
    already merged as in JSON: an entry with data and no host offset is an error, except
    one that also reads as zero and is not the first (the format folds those into zero)."""
    write(HUMAN_HEADER)
    pending: list[str] = []
    # depth -> (the file, a line's format with it): for layers in one file
    names: dict[int, tuple[str, str]] = {}

    first = True
    try:
        for batch in _merged(device, start, length):
            for ext in batch:
                if ext[2] and (first or not ext[3]):
                    if ext[5] is None:
                        return EXTERNAL_ERROR
                    if not ext[3]:
                        named = names.get(ext[4])
                        if named is None:
                            name = layer_filename(device, ext[4], ext[0])
                            named = (name, _HUMAN_LINE + name.replace("%", "%%") + "\n")
                            if not hasattr(_layer_at(device, ext[4]), "host_filename"):
                                names[ext[4]] = named
                        if ext[0] and ext[5]:  # (one format for the three: none is zero)
                            pending.append(named[1] % (ext[0], ext[1], ext[5]))
                        else:
                            pending.append(
                                _hex(ext[0]) + _hex(ext[1]) + _hex(ext[5]) + named[0] + "\n"
                            )
                first = False
            write("".join(pending))
            pending.clear()
    finally:
        write("".join(pending))
    return None


def map_entries(device: BlockDevice, start: int = 0, length: int | None = None) -> list[dict]:
    """The entries `qemu-img map --output=json [-s start] [-l length]` prints, as a list
    (for bounded ranges: `write_map` streams a whole image)."""
    entries = []
    for ext in (ext for batch in _merged(device, start, length) for ext in batch):
        entry = dict(
            zip(_JSON_KEYS, (ext[0], ext[1], ext[4], bool(ext[6]), bool(ext[3]), bool(ext[2])))
        )
        if ext[5] is not None:
            entry["offset"] = ext[5]
        entries.append(entry)
    return entries


def map_json_text(entries: list[dict]) -> str:
    """The exact text of `qemu-img map --output=json` for a list of entries."""
    return (
        "["
        + ",\n".join(
            _json_entry(
                Extent(
                    e["start"],
                    e["length"],
                    e["data"],
                    e["zero"],
                    e["depth"],
                    e.get("offset"),
                    e["present"],
                )
            )
            for e in entries
        )
        + "]\n"
    )


def map_human_text(device: BlockDevice, start: int = 0, length: int | None = None):
    """(stdout text, error or None) of `qemu-img map` (human format)."""
    parts: list[str] = []
    error = write_map(device, parts.append, start, length, "human")
    return "".join(parts), error
