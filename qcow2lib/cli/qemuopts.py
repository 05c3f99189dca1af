"""QEMU's option syntaxes: "-o" option lists checked against a format's option table
(QemuOpts, CreateOptions) and the keyval syntax of --object."""

from __future__ import annotations

from qcow2lib.records import frozen_record
from qcow2lib.sizes import INT64_MAX, SizeError, parse_number, parse_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


@frozen_record
class OptDesc:
    """One creation option as qemu-img declares it: name, type, help, default."""

    name: str
    kind: str  # "str", "bool", "num" or "size"
    help: str
    default: str | None = None


_KIND_LABEL = {"str": "str", "bool": "bool (on/off)", "num": "num", "size": "size"}
SIZE_OPT = OptDesc("size", "size", "Virtual disk size")

QCOW2_CREATE_OPTS = (
    OptDesc(
        "encryption",
        "bool",
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    OptDesc("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536"),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    OptDesc(
        "preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"
    ),
    OptDesc(
        "compression_type", "str", "Compression method used for image cluster compression", "zlib"
    ),
    SIZE_OPT,
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
)
RAW_CREATE_OPTS = (SIZE_OPT,)
LUKS_CREATE_OPTS = (
    SIZE_OPT,
    OptDesc("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
    OptDesc("cipher-alg", "str", "Name of encryption cipher algorithm"),
    OptDesc("cipher-mode", "str", "Name of encryption cipher mode"),
    OptDesc("ivgen-alg", "str", "Name of IV generator algorithm"),
    OptDesc("ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    OptDesc("hash-alg", "str", "Name of encryption hash algorithm"),
    OptDesc("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
)
# Options of the host file (QEMU's "file" protocol) that every image format inherits.
FILE_CREATE_OPTS = (
    SIZE_OPT,
    OptDesc("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)
VMDK_CREATE_OPTS = (
    SIZE_OPT,
    OptDesc(
        "adapter_type",
        "str",
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Must be 'vmdk' if present"),
    OptDesc("compat6", "bool", "VMDK version 6 image", "off"),
    OptDesc("hwversion", "str", "VMDK hardware version", "undefined"),
    OptDesc("toolsversion", "str", "VMware guest tools version"),
    OptDesc(
        "subformat",
        "str",
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat "
        "| twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    OptDesc(
        "zeroed_grain", "bool", "Enable efficient zero writes using the zeroed-grain GTE feature"
    ),
)
# "file" is QEMU's protocol driver named as a format: the host file's options alone.
FORMAT_CREATE_OPTS = {
    "qcow2": QCOW2_CREATE_OPTS,
    "raw": RAW_CREATE_OPTS,
    "file": FILE_CREATE_OPTS,
    "luks": LUKS_CREATE_OPTS,
    "vmdk": VMDK_CREATE_OPTS,
}

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
UINT32_MAX = (1 << 32) - 1


class CreateError(Exception):
    """A failure of image creation: qemu-img prints "<prog>: <file>: <message>" + hint."""

    def __init__(self, message: str, hint: str = "", reported: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reported = reported  # (a line QEMU's driver reports on its own before it)


def join_option_list(options: str | None, text: str, report: Callable[[str], None]) -> str | None:
    """Another -o argument joined to those before it with ',', as qemu-img joins them; None
    (reported as qemu-img reports it) when joining would change its meaning."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text.startswith(",") or trailing % 2:
        report(f"Invalid option list: {text}")
        return None
    return text if options is None else f"{options},{text}"


def split_option_list(params: str) -> list[tuple[str, str, bool]]:
    """Split "a=b,,c,flag,nofoo" into (name, value, is_help) as QEMU's option parser does.

    ",," inside a value is a literal comma; a bare "flag" means flag=on, "noflag" means
    flag=off, and a bare "help" or "?" asks for the option list.
    """
    items = []
    pos = 0
    while pos < len(params):
        end = pos
        while end < len(params) and params[end] not in "=,":
            end += 1
        if end < len(params) and params[end] == "=":
            name = params[pos:end]
            value_parts = []
            pos = end + 1
            while True:
                comma = params.find(",", pos)
                if comma < 0:
                    comma = len(params)
                if params[comma + 1 : comma + 2] == ",":
                    value_parts.append(params[pos : comma + 1])
                    pos = comma + 2
                    continue
                value_parts.append(params[pos:comma])
                pos = comma
                break
            items.append((name, "".join(value_parts), False))
        else:
            name = params[pos:end]
            pos = end
            if name.startswith("no"):
                items.append((name[2:], "off", False))
            else:
                items.append((name, "on", name in ("help", "?")))
        if pos < len(params):
            pos += 1  # the ',' separating this option from the next
    return items


def int64(value: int) -> int:
    return value - (1 << 64) if value > INT64_MAX else value


class CreateOptions:
    """A set of -o values checked against the format's option table (QEMU's QemuOpts)."""

    def __init__(self, descs: tuple[OptDesc, ...], warn: Callable[[str], None]):
        self.descs = {desc.name: desc for desc in descs}
        self._warn = warn
        self._values: dict[str, tuple[str, Any]] = {}
        self._from_text: set[str] = set()

    def set(self, name: str, text: str) -> None:
        """Set an option from text, parsed per its type; errors carry QEMU's wording."""
        desc = self.descs.get(name)
        if desc is None:
            raise CreateError(f"Invalid parameter '{name}'")
        if desc.kind == "bool":
            if text in ("on", "yes", "true", "y"):
                parsed: Any = True
            elif text in ("off", "no", "false", "n"):
                parsed = False
            else:
                raise CreateError(f"Parameter '{name}' expects 'on' or 'off'")
        elif desc.kind == "num":
            try:
                parsed = parse_number(text)
            except SizeError as exc:
                if exc.out_of_range:
                    raise CreateError(
                        f"Value '{text}' is too large for parameter '{name}'"
                    ) from None
                raise CreateError(f"Parameter '{name}' expects a number") from None
        elif desc.kind == "size":
            try:
                parsed = parse_size(text, warn=self._warn)
            except SizeError as exc:
                if exc.out_of_range:
                    raise CreateError(
                        f"Value '{text}' is out of range for parameter '{name}'"
                    ) from None
                raise CreateError(
                    f"Parameter '{name}' expects a non-negative number below 2^64",
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                    "tera-, peta-\nand exabytes, respectively.\n",
                ) from None
        else:
            parsed = text
        self._values[name] = (text, parsed)
        self._from_text.add(name)

    def set_number(self, name: str, value: int) -> None:
        """Set a size option from a number (the size argument, a backing file's size)."""
        self._values[name] = (str(int64(value)), value & ((1 << 64) - 1))
        self._from_text.discard(name)

    def reparse(self, name: str) -> None:
        """Parse a size given as text once more, as QEMU does when it passes options on.

        Only observable through the deprecation warning for hex sizes with a suffix,
        which qemu-img repeats once per parse.
        """
        if name in self._from_text and self.descs[name].kind == "size":
            parse_size(self._values[name][0], warn=self._warn)

    def is_set(self, name: str) -> bool:
        """Whether the option was given (defaults do not count)."""
        return name in self._values

    def names(self) -> list[str]:
        """The options that were set, first-set first."""
        return list(self._values)

    def get(self, name: str) -> str | None:
        """The text given for an option, else its default text, else None."""
        if name in self._values:
            return self._values[name][0]
        desc = self.descs.get(name)
        return desc.default if desc else None

    def value(self, name: str) -> Any:
        """The parsed value of an option (its default parsed when unset), or None."""
        if name in self._values:
            return self._values[name][1]
        text = self.get(name)
        if text is None:
            return None
        kind = self.descs[name].kind
        if kind == "bool":
            return text == "on"
        return int(text) if kind in ("num", "size") else text

    def render(self) -> str:
        """The "name=value ..." part of qemu-img's "Formatting" line, in table order."""
        parts = []
        for name, desc in self.descs.items():
            text = self.get(name)
            if text is None:
                continue
            if desc.kind == "str":
                parts.append(f"{name}={text.replace(',', ',,')}")
            elif desc.kind in ("num", "size") and self.is_set(name):
                parts.append(f"{name}={int64(self._values[name][1])}")
            else:
                parts.append(f"{name}={text}")
        return " ".join(parts)


def merged_create_opts(fmt: str) -> tuple[OptDesc, ...]:
    """The format's options followed by the host file's, the format winning on a clash."""
    descs = list(FORMAT_CREATE_OPTS[fmt])
    names = {desc.name for desc in descs}
    descs += [desc for desc in FILE_CREATE_OPTS if desc.name not in names]
    return tuple(descs)


def option_help_lines(descs: tuple[OptDesc, ...]) -> str:
    """The option table of `create -o help`: one aligned line per option, sorted."""
    lines = []
    for desc in descs:
        line = f"  {desc.name}=<{_KIND_LABEL[desc.kind]}>"
        lines.append(f"{line:<24} - {desc.help}")
    return "".join(f"{line}\n" for line in sorted(lines, key=lambda s: s.encode()))


def parse_qemu_opts(text: str, implied: str) -> list[tuple[str, str]]:
    """QemuOpts parsing ("flag" -> on, "noflag" -> off, ",," a literal comma) where a first
    item without "=" is the value of `implied` (as --image-opts takes "file")."""
    end = 0
    while end < len(text) and text[end] not in "=,":
        end += 1
    if end < len(text) and text[end] == "=":
        return [(name, value) for name, value, _ in split_option_list(text)]
    parts = []
    pos = 0
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            parts.append(text[pos:])
            rest = ""
            break
        if text[comma + 1 : comma + 2] == ",":
            parts.append(text[pos : comma + 1])
            pos = comma + 2
            continue
        parts.append(text[pos:comma])
        rest = text[comma + 1 :]
        break
    return [(implied, "".join(parts))] + [
        (name, value) for name, value, _ in split_option_list(rest)
    ]


class ObjectError(Exception):
    """A bad --object: QEMU's message, and the hint lines printed after it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _keyval_key(text: str) -> bool:
    """A dotted key as QEMU's keyval parser accepts it (fragments start with a letter)."""
    return all(
        part
        and part[0].isascii()
        and part[0].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in part)
        for part in text.split(".")
    )


def keyval_parse(text: str, implied_key: str) -> tuple[dict[str, str], bool]:
    """QEMU's keyval_parse(): "type,key=value,,more,help" -> ({key: value}, help wanted).

    Only the first item may omit "key=" (it is then `implied_key`'s value, ending at the
    first comma); elsewhere ",," is a literal comma; a bare "help" or "?" asks for help.
    """
    values: dict[str, str] = {}
    want_help = False
    pos = 0
    first = True
    while pos < len(text) or first:
        end = pos
        while end < len(text) and text[end] not in "=,":
            end += 1
        key = text[pos:end]
        if key in ("help", "?") and (end == len(text) or text[end] == ","):
            want_help = True
            pos = end + 1
        elif first and key and (end == len(text) or text[end] == ","):
            values[implied_key] = key
            pos = end + 1
        else:
            if not _keyval_key(key):
                raise ObjectError(f"Invalid parameter '{key}'")
            if end == len(text) or text[end] != "=":
                raise ObjectError(f"Expected '=' after parameter '{key}'")
            pos = end + 1
            parts = []
            while True:
                comma = text.find(",", pos)
                if comma < 0:
                    parts.append(text[pos:])
                    pos = len(text) + 1
                    break
                if text[comma + 1 : comma + 2] == ",":
                    parts.append(text[pos : comma + 1])
                    pos = comma + 2
                    continue
                parts.append(text[pos:comma])
                pos = comma + 1
                break
            values[key] = "".join(parts)
        first = False
        if pos >= len(text):
            break
    return values, want_help
