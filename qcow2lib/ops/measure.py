"""`qemu-img measure`: how large a new image would be, as QEMU computes it.

For qcow2 the "fully-allocated" size is the header cluster, every L2 and L1 table and the
refcount structure that counts them plus every data cluster; "required" replaces the data
clusters by those the source actually allocates (block status above the whole chain,
rounded out to clusters). "bitmaps" appears only when QEMU shows it: a v3 target measured
from a qcow2 v3 source. Raw targets need exactly the virtual size.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError, Qcow2IOError
from ..sizes import parse_number, parse_size
from . import error_text, virtual_size

QCOW_MAX_L1_BYTES = 32 * 1024 * 1024
DEFAULT_CLUSTER_SIZE = 65536
REFTABLE_ENTRY_SIZE = 8
L1E_SIZE = 8


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _div_round_up(value: int, divisor: int) -> int:
    return -(-value // divisor)


def refcount_metadata_size(
    clusters: int, cluster_size: int, refcount_order: int, generous_increase: bool = False
) -> tuple[int, int]:
    """(bytes of refcount table and blocks, number of blocks) to count `clusters` clusters
    plus the refcount structure itself (QEMU's fixed-point computation)."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += _div_round_up(table, 2)
            n = 0
            generous_increase = False
            continue
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks


def prealloc_size(
    total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool = False
) -> int:
    """Bytes of a fully allocated qcow2 image of `total_size` (metadata included)."""
    l2e_size = 16 if extended_l2 else 8
    aligned_total = _round_up(total_size, cluster_size)
    meta = cluster_size  # header
    nl2e = aligned_total // cluster_size
    nl2e = _round_up(nl2e, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = nl2e * l2e_size // cluster_size
    nl1e = _round_up(nl1e, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size(
        (meta + aligned_total) // cluster_size, cluster_size, refcount_order
    )[0]
    return meta + aligned_total


# --- option parsing (values may be the strings qemu-img's -o gives, or Python values) -----


def _opt_size(value, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"Parameter '{name}' expects a non-negative number below 2^64")
    if isinstance(value, int):
        return value
    try:
        return parse_size(str(value))
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            f"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            f"and exabytes, respectively.\nInvalid options for file format 'qcow2'"
        ) from None


def _opt_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value)
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise InvalidArgumentError(
        f"Parameter '{name}' expects 'on' or 'off'\nInvalid options for file format 'qcow2'"
    )


def _opt_number(value, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"Parameter '{name}' expects a number")
    if isinstance(value, int):
        return value
    try:
        return parse_number(str(value))
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"Parameter '{name}' expects a number\nInvalid options for file format 'qcow2'"
        ) from None


def _normalize(options: dict | None) -> dict:
    out = {}
    for key, value in (options or {}).items():
        out[key.replace("-", "_") if not key.startswith("encrypt.") else key] = value
    return out


# --- measure ------------------------------------------------------------------------------


def _luks_payload(opts: dict, cluster_size: int) -> int:
    from ..crypto.luks import header_for_options

    luks_opts = {
        k: v
        for k, v in opts.items()
        if k.startswith("encrypt.") and k not in ("encrypt.format", "encrypt.key-secret")
    }
    hdr, _ = header_for_options(luks_opts)
    return _round_up(hdr.payload_offset, cluster_size)


def _source_required(source, cluster_size: int) -> int:
    """Bytes of data clusters the source allocates (block status over the whole chain)."""
    try:
        return _count_required(source, cluster_size)
    except Qcow2IOError as exc:  # (qemu-img's words for a failed block status query)
        raise Qcow2IOError(exc.errno, f"Unable to get block status: {error_text(exc)}") from None


def _count_required(source, cluster_size: int) -> int:
    """Bytes of the target's clusters that the source's data touches: qemu-img rounds
    each data extent out to whole clusters and counts a cluster once, which comes to
    the clusters any data extent (present, not reading as zeros) lies in. The extents
    are taken a batch at a time, unmerged (merging does not change which clusters they
    touch): a fragmented image has tens of thousands."""
    limit = min(virtual_size(source), source.size)
    clusters = 0
    last = -1  # the last cluster counted
    for batch in source.extent_batches(0, limit) if limit > 0 else ():
        for offset, length, is_data, is_zero, _, _, present in batch:
            if is_data and present and length and not is_zero:
                first = offset // cluster_size
                if first == last:  # (the extent before ends in this cluster)
                    first += 1
                last = (offset + length - 1) // cluster_size
                clusters += last - first + 1
    return clusters * cluster_size


def measure(
    size: int | None = None, source=None, fmt: str = "qcow2", options: dict | None = None
) -> dict:
    """What `qemu-img measure` reports, as its JSON dict.

    size: the virtual size (--size); source: an open BlockDevice (with its chain) to
    measure instead; fmt: the output format, qcow2, raw or luks (-O; note qemu-img's own
    default is "raw", so the CLI must pass fmt="raw" when -O is absent); options: the -o
    options (cluster_size, compat, refcount_bits, preallocation, backing_file, extended_l2,
    size, encrypt.*; for luks its own),
    as strings or Python values. Returns {"required", "fully-allocated"} plus "bitmaps"
    where qemu-img shows it. Raises InvalidArgumentError with qemu-img's messages.
    """
    opts = _normalize(options)
    if size is not None:
        opts["size"] = size
    if fmt == "raw":
        return _measure_raw(opts, source)
    if fmt == "luks":  # issue 14
        return _measure_luks(opts, source)
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Unknown file format '{fmt}'")
    known = {
        "size",
        "compat",
        "backing_file",
        "backing_fmt",
        "encryption",
        "cluster_size",
        "preallocation",
        "lazy_refcounts",
        "refcount_bits",
        "extended_l2",
        "compression_type",
        "data_file",
        "data_file_raw",
        "nocow",
    }
    for key in opts:
        if key not in known and not key.startswith("encrypt."):
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nInvalid options for file format '{fmt}'"
            )
    extended_l2 = _opt_bool(opts.get("extended_l2", False), "extended_l2")
    cluster_size = _opt_size(opts.get("cluster_size", DEFAULT_CLUSTER_SIZE), "cluster_size")
    bits = cluster_size.bit_length() - 1
    if not 9 <= bits <= 21 or 1 << bits != cluster_size:
        raise InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 512 * 32:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes "
            f"of at least {512 * 32} bytes"
        )
    compat = opts.get("compat")
    if compat is None:
        version = 3
    elif str(compat) == "0.10":
        version = 2
    elif str(compat) == "1.1":
        version = 3
    else:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = _opt_number(opts.get("refcount_bits", 16), "refcount_bits")
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgumentError(
            "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if version < 3 and refcount_bits != 16:
        raise InvalidArgumentError(
            "Different refcount widths than 16 bits require "
            "compatibility level 1.1 or above (use compat=1.1 or "
            "greater)"
        )
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise InvalidArgumentError(f"invalid parameter value: {prealloc}")
    has_backing = bool(opts.get("backing_file"))
    luks_payload = 0
    encrypt_format = opts.get("encrypt.format")
    if encrypt_format == "luks":
        luks_payload = _luks_payload(opts, cluster_size)
    elif encrypt_format is not None and encrypt_format != "aes":
        raise InvalidArgumentError(f"Invalid parameter '{encrypt_format}'")

    vsize = _opt_size(opts.get("size", 0), "size")
    vsize = _round_up(vsize, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    l2_tables = _div_round_up(vsize // cluster_size, cluster_size // l2e_size)
    if l2_tables * L1E_SIZE > QCOW_MAX_L1_BYTES:
        raise InvalidArgumentError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        vsize = _round_up(virtual_size(source), cluster_size)
        if has_backing:
            required = vsize  # the new backing file may share nothing with the source
        else:
            required = _source_required(source, cluster_size)
    if prealloc in ("full", "falloc"):
        required = vsize
    order = refcount_bits.bit_length() - 1
    fully = luks_payload + prealloc_size(vsize, cluster_size, order, extended_l2)
    info = {}
    if (
        version >= 3
        and source is not None
        and source.format == "qcow2"
        and getattr(source, "compat", "1.1") != "0.10"
    ):
        info["bitmaps"] = _bitmaps_size(source, cluster_size)  # QEMU prints it first
    info["required"] = fully - vsize + required
    info["fully-allocated"] = fully
    return info


def _bitmaps_size(source, cluster_size: int) -> int:
    """Room for the source's persistent bitmaps in the new image (fully allocated)."""
    total = 0
    directory = 0
    length = virtual_size(source)
    for bitmap in getattr(source, "bitmaps", []) or []:
        granularity = bitmap["granularity"]
        nbytes = _div_round_up(_div_round_up(length, granularity), 8)
        clusters = _div_round_up(nbytes, cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * 8, cluster_size)
        directory += _round_up(24 + len(bitmap["name"].encode("utf-8")), 8)
    return total + _round_up(directory, cluster_size)


def _measure_raw(opts: dict, source) -> dict:
    for key in opts:
        if key not in ("size", "preallocation", "nocow", "extent_size_hint"):
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nInvalid options for file format 'raw'"
            )
    if "preallocation" in opts and str(opts["preallocation"]) not in ("off", "falloc", "full"):
        raise InvalidArgumentError(f"invalid parameter value: {opts['preallocation']}")
    if source is not None:
        required = virtual_size(source)
    else:
        required = _round_up(_opt_size(opts.get("size", 0), "size"), 512)
    return {"required": required, "fully-allocated": required}


LUKS_MEASURE_OPTIONS = (
    "size",
    "key_secret",
    "cipher_alg",
    "cipher_mode",
    "ivgen_alg",
    "ivgen_hash_alg",
    "hash_alg",
    "iter_time",
    "preallocation",
    "nocow",
    "extent_size_hint",
)


def _measure_luks(opts: dict, source) -> dict:
    """A luks image needs its header region (payload offset, from the options alone: no
    key is derived) and the guest bytes after it, whatever they hold."""
    from ..crypto.luks import header_for_options

    for key in opts:
        if key not in LUKS_MEASURE_OPTIONS:
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nInvalid options for file format 'luks'"
            )
    header, _ = header_for_options(
        {key: value for key, value in opts.items() if key in LUKS_MEASURE_OPTIONS[2:8]}
    )
    if source is not None:
        size = virtual_size(source)
    else:
        size = _opt_size(opts.get("size", 0), "size")
    total = header.payload_offset + size
    return {"required": total, "fully-allocated": total}


def measure_human(info: dict) -> str:
    """qemu-img measure's human output (bitmaps last, unlike the JSON)."""
    lines = [
        f"required size: {info['required']}",
        f"fully allocated size: {info['fully-allocated']}",
    ]
    if "bitmaps" in info:
        lines.append(f"bitmaps size: {info['bitmaps']}")
    return "\n".join(lines) + "\n"


def measure_json(info: dict) -> str:
    """qemu-img measure --output=json text (QEMU's pretty JSON, 4-space indent)."""
    lines = ["{"]
    items = list(info.items())
    for i, (key, value) in enumerate(items):
        lines.append(f'    "{key}": {value}' + ("," if i < len(items) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["measure", "measure_human", "measure_json", "prealloc_size", "refcount_metadata_size"]
