"""What `qemu-img check` reports (CheckReport, its JSON, human and stderr forms) and the
counters and failures of one check run (_Result, _Abort), with the repair modes."""

from __future__ import annotations

from ..records import field, record

FIX_LEAKS = 1
FIX_ERRORS = 2


def _hash_order(keys: list[str]) -> list[str]:
    """The order QEMU's QDict (512 buckets, tdb hash, newest first) prints keys in."""

    def bucket(name: str) -> int:
        value = (0x238F13AF * len(name)) & 0xFFFFFFFF
        for i, ch in enumerate(name.encode()):
            value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512

    return sorted(keys, key=lambda k: (bucket(k), -keys.index(k)))


_JSON_FIELDS = [
    "filename",
    "format",
    "check-errors",
    "image-end-offset",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
]
_JSON_ORDER = _hash_order(_JSON_FIELDS)
_OPTIONAL_FIELDS = set(_JSON_FIELDS) - {"filename", "format", "check-errors"}


@record
class CheckReport:
    """What `qemu-img check` reports.

    `messages` are the lines QEMU prints to stderr while checking (and repairing), in
    order; `error` is qemu-img's final error line without its program prefix ("Check
    failed: ..." or "Could not open ...") or None; `repaired` says that the check fixed
    something and was run again (the counts are then those of the second run, with the
    fixed counts of the first).
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    repaired: bool = False
    error: str | None = None
    failed: bool = False  # the check did not complete: no summary is printed
    not_supported: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 not completed, 2 corrupt, 3 leaks only, 63 unsupported."""
        if self.not_supported:
            return 63
        if self.failed or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json_dict(self) -> dict:
        """`qemu-img check --output=json`, keys in qemu-img's order (optional ones only if
        non-zero)."""
        values = {
            "filename": self.filename,
            "format": self.format,
            "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        return {k: values[k] for k in _JSON_ORDER if k not in _OPTIONAL_FIELDS or values[k]}


def format_check_json(report: CheckReport) -> str:
    """stdout of `qemu-img check --output=json` (empty when the check did not complete)."""
    if report.failed or report.not_supported:
        return ""
    import json  # here, not at the top: human output does not pay for it at start-up

    return json.dumps(report.to_json_dict(), indent=4) + "\n"


def format_check_human(report: CheckReport, filename: str | None = None) -> str:
    """stdout of `qemu-img check` (human output)."""
    del filename  # qemu-img's human summary does not name the file
    out = []
    if report.repaired:
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {report.leaks_fixed} leaked clusters\n"
            f"    {report.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if report.failed or report.not_supported:
        return "".join(out)
    if not (report.corruptions or report.leaks or report.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if report.corruptions:
            out.append(
                f"\n{report.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if report.leaks:
            out.append(
                f"\n{report.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if report.check_errors:
            out.append(f"\n{report.check_errors} internal errors have occurred during the check.\n")
    if report.total_clusters and report.allocated_clusters:
        out.append(
            f"{report.allocated_clusters}/{report.total_clusters} = "
            f"{report.allocated_clusters * 100.0 / report.total_clusters:.2f}% allocated, "
            f"{report.fragmented_clusters * 100.0 / report.allocated_clusters:.2f}% "
            f"fragmented, "
            f"{report.compressed_clusters * 100.0 / report.allocated_clusters:.2f}% "
            f"compressed clusters\n"
        )
    if report.image_end_offset:
        out.append(f"Image end offset: {report.image_end_offset}\n")
    return "".join(out)


def format_check_stderr(report: CheckReport, prog: str = "qemu-img") -> str:
    """stderr of `qemu-img check`: the problem lines, then the final error if any."""
    lines = list(report.messages)
    if report.error:
        lines.append(f"{prog}: {report.error}")
    return "".join(line + "\n" for line in lines)


class _Abort(Exception):
    """A check step failed with -errno (the check does not complete)."""

    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


class _Result:
    """BdrvCheckResult."""

    __slots__ = (
        "corruptions",
        "leaks",
        "check_errors",
        "corruptions_fixed",
        "leaks_fixed",
        "image_end_offset",
        "total_clusters",
        "allocated_clusters",
        "fragmented_clusters",
        "compressed_clusters",
    )
    corruptions: int
    leaks: int
    check_errors: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def copy(self) -> "_Result":
        other = _Result()
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def add(self, src: "_Result", allocation_info: bool) -> None:
        self.corruptions += src.corruptions
        self.leaks += src.leaks
        self.check_errors += src.check_errors
        self.corruptions_fixed += src.corruptions_fixed
        self.leaks_fixed += src.leaks_fixed
        if allocation_info:
            for name in (
                "image_end_offset",
                "total_clusters",
                "allocated_clusters",
                "fragmented_clusters",
                "compressed_clusters",
            ):
                setattr(self, name, getattr(src, name))
