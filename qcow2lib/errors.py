"""The one exception hierarchy every caller of qcow2lib catches.

Each error names the field and the value that made it fail, so a user can tell a
damaged image from an unsupported one without reading a traceback.
"""

from __future__ import annotations

import os


class Qcow2Error(Exception):
    """Base of every error qcow2lib raises on purpose.

    qemu_message, when set, is QEMU's own wording of the same failure (which often omits
    the field and value the message names) and qemu_hint the lines QEMU prints after it:
    what a drop-in for QEMU's tools shows instead of the message.
    """

    qemu_message: str | None = None
    qemu_hint: str = ""

    def __init__(self, *args, qemu_message: str | None = None, qemu_hint: str = ""):
        super().__init__(*args)
        self.qemu_message = qemu_message
        self.qemu_hint = qemu_hint


class CorruptImageError(Qcow2Error):
    """The image contradicts the format: a field, table or entry is invalid."""


class SignaledCorruptionError(CorruptImageError):
    """Broken metadata QEMU's driver signals as corruption when a request meets it (an
    unaligned table or cluster offset): a read fails with EIO after QEMU's notice, and an
    image open for writing is marked corrupt (see Qcow2Image._met_corruption)."""


class UnsupportedFeatureError(Qcow2Error):
    """The image is valid but uses something this engine does not implement."""


class Qcow2IOError(Qcow2Error, OSError):
    """The host file failed a read, write or flush (errno is kept). `reported`: a line
    QEMU's driver reports on its own (error_report) before the failure, if any."""

    reported: str | None = None

    def __init__(self, errno_value: int | None, message: str, filename: str | None = None):
        OSError.__init__(self, errno_value, message, filename)

    def errno_text(self) -> str:
        """What QEMU prints for the failed request: the system's text for its errno (a
        host file's message also names the file and the call, which QEMU's does not)."""
        return os.strerror(self.errno) if self.errno else str(self.strerror or self)

    def in_context(self, doing: str) -> "Qcow2IOError":
        """The same failure as QEMU reports it from a step of a larger job: `doing`, then
        the errno's text."""
        return Qcow2IOError(self.errno, f"{doing}: {self.errno_text()}", self.filename)

    def prefixed(self, prefix: str) -> "Qcow2IOError":
        """The same failure as an outer step of QEMU's reports it: `prefix` before it."""
        return Qcow2IOError(self.errno, f"{prefix}: {self.strerror}", self.filename)


class CorruptionIOError(Qcow2IOError, CorruptImageError):
    """A request met broken metadata and failed with EIO, as QEMU fails it; `notice` is the
    line QEMU prints when its driver finds the damage (see emit_notice)."""

    notice: str = ""


def corruption_notice(message: str, fatal: bool = True) -> str:
    """The line QEMU's qcow2 driver prints when it finds `message` wrong: fatal (the image
    is open for writing) marks it corrupt; otherwise it is only reported."""
    if fatal:
        return (
            f"qcow2: Marking image as corrupt: {message}; further corruption events will "
            f"be suppressed"
        )
    return (
        f"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be "
        f"suppressed"
    )


# Where the lines QEMU's drivers print as they find something wrong (an image found
# corrupt) go: qimg sends them to stderr when they happen, as QEMU does; by default the
# library keeps them to itself (each is also the `notice` of the error raised).
_notice_listener = None


def set_notice_listener(listener) -> None:
    """listener(line) is called with each such line (None: nobody is told)."""
    global _notice_listener
    _notice_listener = listener


def emit_notice(line: str) -> None:
    if _notice_listener is not None:
        _notice_listener(line)


def preallocation_failure(exc: Qcow2IOError, mode: str) -> Qcow2IOError:
    """A failed "falloc" or "full" preallocation of a file's new bytes, as QEMU's file
    driver reports it."""
    if mode == "falloc":
        return exc.in_context("Could not preallocate new data")
    return exc.in_context("Could not write zeros for preallocation")


class UntrustedImageError(UnsupportedFeatureError):
    """An image opened as untrusted names something only a trusted image may: an external
    data file, a backing file outside its directory, a raw backing file."""


class InvalidArgumentError(Qcow2Error, ValueError):
    """A caller passed an option or range the image cannot take."""


class AmendError(Qcow2Error):
    """An amendment QEMU refuses; the message is qemu-img's. `notice`: a line QEMU prints
    before it, as it is (the driver's report of marking the image corrupt); `reported`:
    a failure QEMU's driver reports on its own (error_report) before it."""

    def __init__(self, *args, notice: str | None = None, reported: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.notice = notice
        self.reported = reported


class ImageLockedError(Qcow2Error):
    """Another process holds a lock on the image that conflicts with ours."""


class BadSecretError(Qcow2Error):
    """The passphrase or key does not open the image."""


class ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only."""
