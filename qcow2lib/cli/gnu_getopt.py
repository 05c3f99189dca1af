"""glibc's getopt_long(), as qemu-img parses its arguments (permutation, abbreviations,
the exact optind that its error messages expose)."""

from __future__ import annotations

import os

from qcow2lib.records import frozen_record


@frozen_record
class LongOpt:
    """One entry of getopt_long()'s option table; `val` is what next() returns for it."""

    name: str
    has_arg: bool
    val: str


class GetoptLong:
    """glibc's getopt_long(), including the argv permutation qemu-img's messages expose.

    qemu-img reports errors with argv[optind - 1], so which argument gets blamed depends
    on glibc's exact optind bookkeeping (e.g. "-xU" blames the argument before it); this
    class keeps the same state. next() returns the option character or long option value,
    ':' for a missing argument, '?' for an unknown option, None at the end; self.argv is
    permuted in place so that non-options end up from self.optind on.
    """

    def __init__(self, argv: list[str], shortopts: str, longopts: tuple[LongOpt, ...] = ()):
        self.argv = list(argv)
        self.optind = 1
        self.optarg = ""  # the argument of the option next() returned ("" if it takes none)
        self.error_message = ""  # what glibc prints for the last error (opterr mode)
        self._longopts = longopts
        self._nextchar = ""
        self._first_nonopt = self._last_nonopt = 1
        self._require_order = shortopts.startswith("+") or "POSIXLY_CORRECT" in os.environ
        self._shortopts = shortopts.removeprefix("+")
        self._colon = self._shortopts.startswith(":")

    @staticmethod
    def _nonoption(arg: str) -> bool:
        return not arg.startswith("-") or arg == "-"

    def _exchange(self) -> None:
        bottom, middle, top = self._first_nonopt, self._last_nonopt, self.optind
        self.argv[bottom:top] = self.argv[middle:top] + self.argv[bottom:middle]
        self._first_nonopt += top - middle
        self._last_nonopt = top

    def next(self) -> str | None:
        """The next option (see the class docstring); sets optarg for options with one."""
        self.optarg = ""
        argv, argc = self.argv, len(self.argv)
        if not self._nextchar:
            self._last_nonopt = min(self._last_nonopt, self.optind)
            self._first_nonopt = min(self._first_nonopt, self.optind)
            if not self._require_order:
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._last_nonopt != self.optind:
                    self._first_nonopt = self.optind
                while self.optind < argc and self._nonoption(argv[self.optind]):
                    self.optind += 1
                self._last_nonopt = self.optind
            if self.optind != argc and argv[self.optind] == "--":
                self.optind += 1
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._first_nonopt == self._last_nonopt:
                    self._first_nonopt = self.optind
                self._last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self._first_nonopt != self._last_nonopt:
                    self.optind = self._first_nonopt
                return None
            if self._nonoption(argv[self.optind]):
                return None  # only reached in REQUIRE_ORDER mode
            if argv[self.optind].startswith("--"):
                return self._long_option(argv[self.optind][2:])
            self._nextchar = argv[self.optind][1:]
        char, self._nextchar = self._nextchar[0], self._nextchar[1:]
        if not self._nextchar:
            self.optind += 1
        pos = self._shortopts.find(char)
        if pos < 0 or char in ":;":
            self.error_message = f"invalid option -- '{char}'"
            return "?"
        if self._shortopts[pos + 1 : pos + 2] == ":":
            if self._nextchar:
                self.optarg = self._nextchar
                self.optind += 1
            elif self.optind == argc:
                self.error_message = f"option requires an argument -- '{char}'"
                char = ":" if self._colon else "?"
            else:
                self.optarg = argv[self.optind]
                self.optind += 1
            self._nextchar = ""
        return char

    def _long_option(self, text: str) -> str:
        name, eq, value = text.partition("=")
        found = next((opt for opt in self._longopts if opt.name == name), None)
        if found is None:
            candidates = [opt for opt in self._longopts if opt.name.startswith(name)]
            if candidates and any(
                (opt.has_arg, opt.val) != (candidates[0].has_arg, candidates[0].val)
                for opt in candidates[1:]
            ):
                self.optind += 1
                names = "".join(f" '--{opt.name}'" for opt in candidates)
                self.error_message = f"option '--{name}' is ambiguous; possibilities:{names}"
                return "?"  # ambiguous abbreviation
            found = candidates[0] if candidates else None
        self.optind += 1
        if found is None:
            self.error_message = f"unrecognized option '--{text}'"
            return "?"
        if eq:
            if not found.has_arg:
                self.error_message = f"option '--{found.name}' doesn't allow an argument"
                return "?"
            self.optarg = value
        elif found.has_arg:
            if self.optind >= len(self.argv):
                self.error_message = f"option '--{found.name}' requires an argument"
                return ":" if self._colon else "?"
            self.optarg = self.argv[self.optind]
            self.optind += 1
        return found.val
