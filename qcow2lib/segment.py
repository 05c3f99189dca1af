"""What a guest range is, as a lookup of the cluster map answers: a `Segment` of one kind.

Apart from mapping.py so that the image module can name the kinds without loading the
cluster map's machinery (arrays, run finding) at start-up: `qimg info` needs none of it.
"""

from __future__ import annotations

DATA, ZERO, BACKING, COMPRESSED = "data", "zero", "backing", "compressed"


class Segment:
    """A guest range with one meaning.

    kind DATA: host_offset is where guest_offset lives. ZERO: reads zeros (host_offset is
    the preallocated cluster, or None). BACKING: not allocated here. COMPRESSED: one
    cluster's compressed bytes at host_offset, `compressed_size` long; `cluster_offset` is
    the guest offset of that cluster's start.

    A plain class with slots (made per extent on the hot path; a dataclass would import
    `dataclasses` into every qimg start).
    """

    __slots__ = (
        "guest_offset",
        "length",
        "kind",
        "host_offset",
        "compressed_size",
        "cluster_offset",
    )

    def __init__(
        self,
        guest_offset: int,
        length: int,
        kind: str,
        host_offset: int | None = None,
        compressed_size: int = 0,
        cluster_offset: int = 0,
    ):
        self.guest_offset = guest_offset
        self.length = length
        self.kind = kind
        self.host_offset = host_offset
        self.compressed_size = compressed_size
        self.cluster_offset = cluster_offset

    def _values(self) -> tuple:
        return (
            self.guest_offset,
            self.length,
            self.kind,
            self.host_offset,
            self.compressed_size,
            self.cluster_offset,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        raise TypeError("unhashable type: 'Segment' (mutable, compared by value)")

    def __repr__(self) -> str:
        items = ", ".join(
            f"{name}={value!r}" for name, value in zip(self.__slots__, self._values())
        )
        return f"Segment({items})"
