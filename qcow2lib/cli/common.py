"""One qemu-img invocation: its output channels, message conventions and exit."""

from __future__ import annotations

import os
import sys

from qcow2lib.cli.gnu_getopt import GetoptLong
from qcow2lib.sizes import INT64_MAX, SizeError, parse_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import NoReturn


class CliExit(Exception):
    """Ends the command with an exit code (qemu-img calls exit() from deep inside)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class DroppingStream:
    """stdout or stderr of the qimg program, treated as qemu-img's stdio treats them: what
    cannot be written is dropped without a message, and the command runs to its end with
    its own exit code. A reader that went away (`qimg map ... | head -1`: qemu-img ignores
    SIGPIPE), a full disk, a descriptor closed before the start: at the first failure the
    stream's descriptor is pointed at /dev/null, and what was still buffered and all that
    follows goes there. Everything else is the wrapped stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._drop_the_rest()
            return self._stream.write(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._drop_the_rest()
            self._stream.flush()

    def _drop_the_rest(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    @classmethod
    def around(cls, stream) -> DroppingStream:
        """The wrapper of a standard stream; of /dev/null where the descriptor was closed
        before the start (Python's stream is then None; the descriptor, taken by /dev/null
        here, can no more become an image's, which a stray message would write into)."""
        if stream is None:
            stream = open(os.devnull, "w", encoding="utf-8", errors="surrogateescape")
        return cls(stream)


class Cli:
    """Output channels and qemu-img's message conventions for one invocation."""

    def __init__(self, prog: str):
        self.prog = prog
        self.secrets: dict[str, bytes] = {}  # --object secret,id=ID,... values
        # --object throttle-group ids, registered with the engine until the command ends
        self.throttle_groups: list[str] = []

    def out(self, text: str) -> None:
        """Write to the current stdout (looked up each time, so capturing works)."""
        sys.stdout.write(text)

    def error_report(self, message: str) -> None:
        """One error line prefixed with the program name, like QEMU's error_report()."""
        sys.stderr.write(f"{self.prog}: {message}\n")

    def warn_report(self, message: str) -> None:
        """A warning line; qemu-img goes on after it."""
        sys.stderr.write(f"{self.prog}: warning: {message}\n")

    def error_exit(self, message: str) -> NoReturn:
        """A usage error: the message, the pointer to --help, exit status 1."""
        self.error_report(message)
        sys.stderr.write(f"Try '{self.prog} --help' for more information\n")
        raise CliExit(1)

    def help(self) -> NoReturn:
        """qemu-img's full help (any -h, global or per command), then exit status 0."""
        from qcow2lib.cli.help import help_text

        self.out(help_text(self.prog))
        raise CliExit(0)

    def option_error(self, getopt: GetoptLong, code: str) -> NoReturn:
        """Report a getopt error (':' missing argument, '?' unknown) as qemu-img does."""
        culprit = getopt.argv[getopt.optind - 1]
        if code == ":":
            self.error_exit(f"missing argument for option '{culprit}'")
        self.error_exit(f"unrecognized option '{culprit}'")

    def unsupported(self, what: str) -> NoReturn:
        """Refuse a qemu-img feature qimg does not implement yet, plainly and with status 1."""
        self.error_report(f"{what} is not supported yet")
        raise CliExit(1)


def cvtnum(cli: Cli, name: str, text: str, maximum: int = INT64_MAX) -> int | None:
    """Parse a size argument, reporting errors as qemu-img does; None after an error."""
    try:
        value = parse_size(text, warn=cli.warn_report)
    except SizeError as exc:
        if not exc.out_of_range:
            cli.error_report(
                f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for"
            )
            cli.error_report("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            return None
        value = INT64_MAX + 1
    if value > maximum:
        cli.error_report(f"Invalid {name} specified. Must be between 0 and {maximum}.")
        return None
    return value


def parse_strtol(text: str) -> int | None:
    """QEMU's qemu_strtol(text, NULL, 0): the whole string one C integer (0x.., 0.. octal)."""
    body = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if body[:1] in "+-" and body:
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    try:
        if body[:2].lower() == "0x":
            value = int(body[2:], 16) if body[2:] and body[2:].isalnum() else None
        elif body.startswith("0") and len(body) > 1:
            value = int(body[1:], 8)
        else:
            value = int(body, 10) if body.isdigit() else None
    except ValueError:
        return None
    if value is None or not body.isascii():
        return None
    return sign * value
