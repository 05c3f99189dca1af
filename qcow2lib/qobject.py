"""QEMU's JSON and human renderings of its dicts and lists (QObjects), byte for byte,
including the hash-table order in which QEMU's dicts list their keys."""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any


def _tdb_hash(key: str) -> int:
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_items(d: dict) -> list[tuple[str, Any]]:
    """The items of `d` (filled in QEMU's insertion order) in QDict iteration order.

    QEMU stores dicts in a 512-bucket hash table, each bucket a list with the newest
    entry first, and prints them bucket by bucket; scripts diffing output see that order.
    """
    buckets: dict[int, list[tuple[str, Any]]] = {}
    for key, value in d.items():
        buckets.setdefault(_tdb_hash(key) % 512, []).insert(0, (key, value))
    return [item for bucket in sorted(buckets) for item in buckets[bucket]]


def _codepoints(data: bytes):
    """Decode like QEMU's mod_utf8_codepoint(): invalid sequences yield -1, byte-wise."""
    i = 0
    while i < len(data):
        byte = data[i]
        i += 1
        if byte < 0x80:
            yield byte
            continue
        if byte >= 0xFE or not byte & 0x40:
            yield -1
            continue
        length = 0
        mask = 0x80
        while byte & mask:
            length += 1
            mask >>= 1
        cp = byte & (mask - 1)
        for _ in range(1, length):
            if i >= len(data) or data[i] & 0xC0 != 0x80:
                cp = -1
                break
            cp = (cp << 6) | (data[i] & 0x3F)
            i += 1
        else:
            min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
            if (
                cp > 0x10FFFF
                or 0xFDD0 <= cp <= 0xFDEF
                or cp & 0xFFFE == 0xFFFE
                or 0xD800 <= cp <= 0xDFFF
                or (cp < min_cp and not (cp == 0 and length == 2))
            ):
                cp = -1
        yield cp


_ESCAPES = {
    0x22: '\\"',
    0x5C: "\\\\",
    0x08: "\\b",
    0x0C: "\\f",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
}


def _json_string(text: str) -> str:
    parts = ['"']
    for cp in _codepoints(text.encode("utf-8", "surrogateescape")):
        if cp in _ESCAPES:
            parts.append(_ESCAPES[cp])
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            parts.append(
                "\\u%04X\\u%04X"
                % (0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF))
            )
        elif cp < 0x20 or cp >= 0x7F:
            parts.append("\\u%04X" % cp)
        else:
            parts.append(chr(cp))
    parts.append('"')
    return "".join(parts)


def qemu_json(value: Any, depth: int = 0) -> str:
    """Pretty JSON exactly as qemu-img prints it (4-space indent, QDict key order)."""
    if value is None:  # QNull ("backing": null in a node's options)
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_string(value)
    pad = "\n" + " " * 4 * (depth + 1)
    if isinstance(value, dict):
        members = [f"{_json_string(k)}: {qemu_json(v, depth + 1)}" for k, v in qdict_items(value)]
        opening, closing = "{", "}"
    else:
        members = [qemu_json(v, depth + 1) for v in value]
        opening, closing = "[", "]"
    body = "".join(("," if i else "") + pad + member for i, member in enumerate(members))
    return f"{opening}{body}\n{' ' * 4 * depth}{closing}"


def qemu_json_compact(value: Any) -> str:
    """QEMU's one-line JSON (qobject_to_json), dict members in QDict order."""
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{_json_string(k)}: {qemu_json_compact(v)}" for k, v in qdict_items(value))
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(qemu_json_compact(v) for v in value) + "]"
    return qemu_json(value)


def dump_qobject(value: Any, indent: int) -> str:
    """QEMU's human rendering of a nested dict/list ("Format specific information")."""
    lines = []
    items = (
        [(key.replace("-", " "), v) for key, v in qdict_items(value)]
        if isinstance(value, dict)
        else [(f"[{i}]", v) for i, v in enumerate(value)]
    )
    for label, item in items:
        if isinstance(item, (dict, list)):
            lines.append(f"{' ' * 4 * indent}{label}:\n{dump_qobject(item, indent + 1)}")
        else:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            lines.append(f"{' ' * 4 * indent}{label}: {text}\n")
    return "".join(lines)


def node_tree(options: dict[str, Any]) -> dict:
    """A node's flattened options ("file.filename") as QEMU spells the node out in a
    json: name: nested, "driver" first, a bare filename under the "file" driver."""
    nested: dict = {}
    for key, value in options.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spelled_node(nested)


def spelled_node(node: dict) -> dict:
    """A nested node (as a json: name gives it) as QEMU spells it out (see node_tree)."""
    driver = node.pop("driver", "file" if "filename" in node else None)
    out: dict = {} if driver is None else {"driver": driver}
    for key, value in node.items():
        out[key] = spelled_node(value) if isinstance(value, dict) else value
    return out


def qdict_flatten(tree: dict) -> dict:
    """QEMU's qdict_flatten() of a parsed json: name: nested objects and lists become
    dotted keys ("inject-error.0.event"), values keep their JSON types, and the keys are
    inserted in the order QEMU inserts them (each object walked in QDict order, the top
    one again from its start after each member it flattens), which decides how keys
    that share a hash bucket are listed later."""
    flat = dict(tree)
    while True:
        for key, value in qdict_items(flat):
            if isinstance(value, (dict, list)) and value:
                _flatten_into(value, flat, key)
                del flat[key]
                break
        else:
            return flat


def _flatten_into(value: dict | list, target: dict, prefix: str) -> None:
    items = qdict_items(value) if isinstance(value, dict) else list(enumerate(value))
    for key, item in items:
        name = f"{prefix}.{key}"
        if isinstance(item, (dict, list)) and item:
            _flatten_into(item, target, name)
        else:
            target[name] = item


def reinserted(options: dict, prefix: str = "") -> dict:
    """The options QEMU copies from one dict to the next (a join, or a child's options
    taken from its parent's under `prefix`, which is dropped): inserted in the order the
    first dict lists them."""
    return {
        key[len(prefix) :]: value for key, value in qdict_items(options) if key.startswith(prefix)
    }
