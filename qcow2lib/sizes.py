"""Byte sizes as qemu-img reads and prints them.

Scripts written for qemu-img pass sizes such as "10G", "1.5k", "0x1000" or "512b" and
parse lines such as "virtual size: 1 GiB"; a drop-in replacement has to accept exactly
the same spellings (and reject the same ones) and print the same rounding.
"""

from __future__ import annotations

from .errors import InvalidArgumentError

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
BDRV_MAX_LENGTH = INT64_MAX - (1 << 30) + 1  # QEMU's largest image (INT64_MAX, 1 GiB aligned)

_SUFFIX_POWER = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_IEC_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")

_BLANKS = " \t\n\v\f\r"
_DIGITS = "0123456789abcdef"
# strtod() on the text starting at the '.': digits and an optional exponent. (Compiled
# where a fraction is parsed: importing `re` would cost every qimg start.)
_FRACTION_PATTERN = r"\.([0-9]+)([eE][+-]?[0-9]+)?|\.()"


class SizeError(InvalidArgumentError):
    """A number qemu-img would reject; out_of_range tells overflow from bad syntax."""

    def __init__(self, text: str, out_of_range: bool):
        super().__init__(f"invalid number '{text}'" + (" (out of range)" if out_of_range else ""))
        self.text = text
        self.out_of_range = out_of_range


def _strtox(text: str, pos: int, base: int, signed: bool) -> tuple[int, int, bool] | None:
    """Mimic C's strtoull()/strtoll(): (value, end, overflowed), or None if nothing converts.

    Base 0 picks hex for a "0x" prefix, octal for a leading 0, decimal otherwise.
    """
    i = pos
    while i < len(text) and text[i] in _BLANKS:
        i += 1
    negative = text[i : i + 1] == "-"
    if text[i : i + 1] in ("+", "-"):
        i += 1
    after_prefix = text[i + 2 : i + 3]
    if (
        base in (0, 16)
        and text[i : i + 2] in ("0x", "0X")
        and after_prefix
        and after_prefix.lower() in _DIGITS
    ):
        base = 16
        i += 2
    elif base == 0:
        base = 8 if text[i : i + 1] == "0" else 10
    start = i
    while i < len(text) and text[i].lower() in _DIGITS[:base]:
        i += 1
    if i == start:
        return None
    magnitude = int(text[start:i], base)
    if signed:
        limit = INT64_MAX + 1 if negative else INT64_MAX
        if magnitude > limit:
            return (-limit if negative else limit), i, True
        return (-magnitude if negative else magnitude), i, False
    if magnitude > UINT64_MAX:
        return UINT64_MAX, i, True
    return ((-magnitude) & UINT64_MAX if negative else magnitude), i, False


def parse_number(text: str, *, signed: bool = False) -> int:
    """Parse a whole string as C's strtoull() (or strtoll()) with base 0 would.

    This is how qemu-img reads numeric -o options such as refcount_bits: "0x10" and
    "020" are 16, and an unsigned "-1" wraps to 2**64 - 1 instead of failing.
    """
    parsed = _strtox(text, 0, 0, signed)
    if parsed is None:
        raise SizeError(text, False)
    value, end, overflow = parsed
    if end != len(text):
        raise SizeError(text, False)
    if overflow:
        raise SizeError(text, True)
    return value


# The lines QEMU prints after refusing a size option
SIZE_SUFFIX_HINT = (
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively.\n"
)


def parse_size(
    text: str,
    *,
    unit: int = 1024,
    default_suffix: str = "B",
    warn: Callable[[str], None] | None = None,
) -> int:
    """Parse a size the way qemu-img does (QEMU's qemu_strtosz()).

    Accepts decimal or hex integers, decimal fractions with a scaling suffix and the
    suffixes b/B (bytes), k/K, M, G, T, P, E (powers of `unit`). A negative sign anywhere
    in the number is rejected. `warn` receives QEMU's deprecation notice for a hex number
    with a suffix. Raises SizeError; its out_of_range is set when the value exceeds 64
    bits, which qemu-img reports with a different message.
    """
    parsed = _strtox(text, 0, 10, False)
    if parsed is None:
        raise SizeError(text, False)
    value, end, overflow = parsed
    if overflow:
        raise SizeError(text, end == len(text))
    if "-" in text[:end]:
        raise SizeError(text, False)
    fraction = 0  # 64-bit fixed point, as QEMU computes it
    is_hex = False
    if value == 0 and text[end : end + 1] in ("x", "X"):
        parsed = _strtox(text, 0, 16, False)
        assert parsed is not None  # (its leading "0" converts at least)
        value, end, overflow = parsed
        if overflow:
            raise SizeError(text, end == len(text))
        if text[end : end + 1] == ".":
            raise SizeError(text, False)
        is_hex = True
    elif text[end : end + 1] == ".":
        import re

        match = re.compile(_FRACTION_PATTERN).match(text, end)  # (re caches it)
        assert match is not None  # (its last branch matches any ".")
        if match.group(1) is None:  # strtod() found no digits: skip the '.' only
            end += 1
        elif match.group(2):
            raise SizeError(text, False)
        else:
            scaled = float("0." + match.group(1)) * 2.0**64
            # C's (uint64_t) cast of 2**64 yields 0 on x86-64, which QEMU relies on.
            fraction = int(scaled) if scaled < 2.0**64 else 0
            end = match.end()
    suffix = text[end : end + 1].upper()
    if suffix and suffix in _SUFFIX_POWER:
        if is_hex and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        suffix = default_suffix
    multiplier = unit ** _SUFFIX_POWER[suffix]
    if multiplier == 1:
        if fraction:
            raise SizeError(text, False)
    else:
        scaled_fraction = fraction * multiplier
        value = value * multiplier + (scaled_fraction >> 64) + ((scaled_fraction >> 63) & 1)
        if value > UINT64_MAX:
            raise SizeError(text, end == len(text))
    if end != len(text):
        raise SizeError(text, False)
    return value


def format_size(value: int) -> str:
    """Render a byte count like qemu-img's "virtual size"/"disk size" (e.g. "196 KiB").

    Three significant digits, switching to the next binary prefix once the number
    would reach 1000 of the current one.
    """
    # math.frexp's exponent of the scaled value (>= 0): its integer part's bit length
    exponent = int(value / (1000.0 / 1024.0)).bit_length()
    shift = int((exponent - 1) / 10) * 10  # C division truncates toward zero
    return "%0.3g %sB" % (value / (1 << shift), _IEC_PREFIXES[shift // 10])


def c_hex(value: int) -> str:
    """A number as C's %#x prints it, as QEMU's messages show offsets: no prefix for zero."""
    return f"{value:#x}" if value else "0"
