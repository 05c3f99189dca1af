"""What a guest range is, as a lookup of the cluster map answers: a `Segment` of one kind.

Apart from mapping.py so that the image module can name the kinds without loading the
cluster map's machinery (arrays, run finding) at start-up: `qimg info` needs none of it.
"""

from __future__ import annotations

from itertools import repeat

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import NamedTuple

DATA, ZERO, BACKING, COMPRESSED = "data", "zero", "backing", "compressed"


if TYPE_CHECKING:

    class Segment(NamedTuple):
        """A guest range with one meaning.

        kind DATA: host_offset is where guest_offset lives. ZERO: reads zeros (host_offset is
        the preallocated cluster, or None). BACKING: not allocated here. COMPRESSED: one
        cluster's compressed bytes at host_offset, `compressed_size` long; `cluster_offset` is
        the guest offset of that cluster's start.

        An immutable tuple with named fields (a map of a fragmented image makes one per
        extent, hundreds of thousands): the walks make them a column at a time, without a
        Python frame each, through `new_segments`.
        """

        guest_offset: int
        length: int
        kind: str
        host_offset: int | None = None
        compressed_size: int = 0
        cluster_offset: int = 0

        def longer(self, length: int) -> Segment: ...

else:  # the same tuple without typing's NamedTuple or collections' namedtuple (their imports
    # cost start-up time); keep both field lists in step: mypy checks the one above, the
    # code runs this one.
    from _collections import _tuplegetter  # (the field descriptor namedtuple itself uses)

    class Segment(tuple):
        """A guest range with one meaning (see the declaration above)."""

        __slots__ = ()
        _fields = (
            "guest_offset",
            "length",
            "kind",
            "host_offset",
            "compressed_size",
            "cluster_offset",
        )

        def __new__(
            cls,
            guest_offset: int,
            length: int,
            kind: str,
            host_offset: int | None = None,
            compressed_size: int = 0,
            cluster_offset: int = 0,
        ) -> Segment:
            return tuple.__new__(
                cls, (guest_offset, length, kind, host_offset, compressed_size, cluster_offset)
            )

        def __repr__(self) -> str:
            items = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self))
            return f"Segment({items})"

        def longer(self, length: int) -> Segment:
            """This segment, `length` bytes longer (a neighbour that continues it joined)."""
            return tuple.__new__(Segment, (self[0], self[1] + length, *self[2:]))

        guest_offset = _tuplegetter(0, "guest offset of the range")
        length = _tuplegetter(1, "bytes")
        kind = _tuplegetter(2, "DATA, ZERO, BACKING or COMPRESSED")
        host_offset = _tuplegetter(3, "where the range lies in the file, if anywhere")
        compressed_size = _tuplegetter(4, "bytes of a compressed cluster's data")
        cluster_offset = _tuplegetter(5, "guest offset of a compressed cluster's start")


def new_segments(
    guest_offsets: Iterable[int],
    lengths: Iterable[int],
    kinds: Iterable[str],
    host_offsets: Iterable[int | None],
) -> Iterator[Segment]:
    """Segments made from columns, at C speed (what Segment(...) is, without its frame)."""
    return map(
        _new_tuple,
        repeat(Segment),
        zip(guest_offsets, lengths, kinds, host_offsets, repeat(0), repeat(0)),
    )


_new_tuple = tuple.__new__
