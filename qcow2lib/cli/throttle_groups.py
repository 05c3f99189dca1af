"""--object throttle-group: QEMU's throttle groups, which throttle nodes name.

Limits are given one by one (x-bps-total=..., x-iops-size=...) or as the members of
`limits` (limits.bps-total=...); values are integers (C syntax: 0x.. hex, 0.. octal),
without size suffixes. The group is registered with the engine (qcow2lib.throttle) under
its id.
"""

from __future__ import annotations

from qcow2lib import Qcow2Error, throttle
from qcow2lib.cli.common import Cli, parse_strtol
from qcow2lib.cli.qemuopts import ObjectError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT_MAX = (1 << 32) - 1


def _integer(name: str, text: str) -> int:
    """A QOM integer property's value, or QEMU's refusal of it."""
    value = parse_strtol(text)
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise ObjectError(f"Parameter '{name}' expects integer")
    return value


def print_help(cli: Cli) -> None:
    """`--object throttle-group,help`: the group's properties, as QEMU lists them."""
    lines = [f"x-{limit}=<int>" for limit in throttle.LIMITS] + ["limits=<ThrottleLimits>"]
    cli.out("throttle-group options:\n" + "".join(f"  {line}\n" for line in sorted(lines)))


def add_throttle_group(cli: Cli, object_id: str, props: dict[str, str]) -> None:
    """Define throttle group `object_id` from its --object properties (id and qom-type
    already taken out), checked as QEMU checks them."""
    limits: dict[str, int] = {}
    for name, text in props.items():
        if name.startswith("x-") and name[2:] in throttle.LIMITS:
            value = _integer(name, text)
            if value < 0:
                raise ObjectError("Property values cannot be negative")
            if name.endswith("-max-length") and value > UINT_MAX:
                # (QEMU's message lacks the space between "the" and "range")
                raise ObjectError(f"{name} value must be in therange [0, {UINT_MAX}]")
            limits[name[2:]] = value
        elif name == "limits":
            raise ObjectError("Invalid parameter type for 'limits', expected: object")
        elif name.startswith("limits.") and name[7:] in throttle.LIMITS:
            value = _integer(name, text)
            if name.endswith("-max-length") and not 0 <= value <= UINT_MAX:
                raise ObjectError(f"{name[7:]} value must be in the range [0, {UINT_MAX}]")
            limits[name[7:]] = value
        else:
            raise ObjectError(f"Parameter '{name}' is unexpected")
    if object_id in cli.secrets or throttle.has_group(object_id):
        raise ObjectError(
            f"attempt to add duplicate property '{object_id}' to object (type 'container')"
        )
    try:
        throttle.register_group(object_id, throttle.ThrottleGroup(limits))
    except Qcow2Error as exc:
        raise ObjectError(str(exc)) from None
    cli.throttle_groups.append(object_id)
