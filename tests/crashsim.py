"""Power-loss simulation: record what the engine sends to its files, replay crash states.

`Recorder` swaps a recording HostFile into qcow2lib. Every write, truncate, hole punch
and flush the engine issues is logged per file. A crash state is the starting content
plus every operation before some flush, plus any subset of the operations issued after
it and before the next flush (a disk may persist those in any order, sector by sector).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from qcow2lib import hostfile

SECTOR = 512


@dataclass
class Op:
    kind: str  # "write", "truncate", "punch", "flush"
    path: str
    offset: int = 0
    data: bytes = b""
    length: int = 0


@dataclass
class Recorder:
    """Context manager that logs file operations of every image opened inside it."""

    watched: set[str]
    ops: list[Op] = field(default_factory=list)

    def __enter__(self):
        recorder = self

        class RecordingHostFile(hostfile.HostFile):
            def _watched(self) -> bool:
                return os.path.realpath(self.path) in recorder.watched

            def pwrite(self, data, offset):
                if self._watched():
                    recorder.ops.append(
                        Op(
                            "write",
                            os.path.realpath(self.path),
                            offset,
                            bytes(memoryview(data).cast("B")),
                        )
                    )
                super().pwrite(data, offset)

            def pwritev(self, buffers, offset):
                if self._watched():
                    blob = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
                    recorder.ops.append(Op("write", os.path.realpath(self.path), offset, blob))
                super().pwritev(buffers, offset)

            def truncate(self, length):
                if self._watched():
                    recorder.ops.append(Op("truncate", os.path.realpath(self.path), length=length))
                super().truncate(length)

            def punch_hole(self, offset, length):
                if self._watched():
                    recorder.ops.append(
                        Op("punch", os.path.realpath(self.path), offset, length=length)
                    )
                return super().punch_hole(offset, length)

            def flush(self):
                super().flush()
                if self._watched():
                    recorder.ops.append(Op("flush", os.path.realpath(self.path)))

        self._saved = hostfile.host_file_class
        hostfile.host_file_class = RecordingHostFile
        return self

    def __exit__(self, *exc):
        hostfile.host_file_class = self._saved


def _apply(files: dict[str, bytearray], op: Op, sectors: set[int] | None = None) -> None:
    content = files[op.path]
    if op.kind == "write":
        end = op.offset + len(op.data)
        if len(content) < end:
            content.extend(bytes(end - len(content)))
        if sectors is None:
            content[op.offset : end] = op.data
        else:  # only the chosen sectors of this write reached the disk
            for index in sectors:
                start = max(op.offset, index * SECTOR)
                stop = min(end, (index + 1) * SECTOR)
                content[start:stop] = op.data[start - op.offset : stop - op.offset]
    elif op.kind == "truncate":
        if op.length < len(content):
            del content[op.length :]
        else:
            content.extend(bytes(op.length - len(content)))
    elif op.kind == "punch":
        stop = min(len(content), op.offset + op.length)
        if op.offset < stop:
            content[op.offset : stop] = bytes(stop - op.offset)


def crash_states(
    initial: dict[str, bytes], ops: list[Op], rng: random.Random, points: set[int], subsets: int = 2
):
    """Yield (description, files, crash_index) for simulated power losses at `points`.

    A crash before op t keeps every earlier operation that a later flush of its own file
    (before t) made durable; each other earlier operation may or may not have reached the
    disk, a write possibly only in some of its sectors. For every t we yield the state
    where everything issued reached the disk in order, and `subsets` random others.
    """
    next_flush = [len(ops)] * len(ops)
    pending: dict[str, list[int]] = {}
    for index, op in enumerate(ops):
        if op.kind == "flush":
            for waiting in pending.pop(op.path, []):
                next_flush[waiting] = index
        else:
            pending.setdefault(op.path, []).append(index)
    landed = {p: bytearray(c) for p, c in initial.items()}  # every op before t, in order
    for t in range(len(ops) + 1):
        if t:
            if ops[t - 1].kind != "flush":
                _apply(landed, ops[t - 1])
        if t not in points:
            continue
        yield f"crash before op {t} (all issued writes landed)", landed, t
        maybe = {i for i in range(t) if ops[i].kind != "flush" and next_flush[i] >= t}
        for trial in range(subsets if maybe else 0):
            files = {p: bytearray(c) for p, c in initial.items()}
            for index, op in enumerate(ops[:t]):
                if op.kind == "flush":
                    continue
                if index not in maybe:
                    _apply(files, op)
                elif op.kind == "write":
                    first = op.offset // SECTOR
                    last = (op.offset + len(op.data) - 1) // SECTOR
                    _apply(files, op, {s for s in range(first, last + 1) if rng.random() < 0.5})
                elif rng.random() < 0.5:
                    _apply(files, op)
            yield (
                f"crash before op {t} (random subset {trial} of {len(maybe)} unflushed ops)",
                files,
                t,
            )


def write_state(files: dict[str, bytearray], mapping: dict[str, Path]) -> None:
    """Write a crash state's file contents to the paths the test opens."""
    for real, content in files.items():
        mapping[real].write_bytes(bytes(content))
