"""Guest memory shared by a vhost-user front-end, and split virtqueues laid out in it.

Everything here reads structures a guest wrote, so every index, address and length is
checked before use: a bad descriptor raises `VirtqueueError` (the ring is unusable and
must stop) and a data buffer outside guest memory raises `GuestMemoryError` (only that
request fails). Nothing is ever read or written outside the mapped regions.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import sys
import threading
from typing import NamedTuple

from ..errors import Qcow2Error

# One guest buffer of a request: (guest_addr, length). A plain tuple, not a NamedTuple:
# a request carries up to a queue's worth of them and they are made per request.
Segment = tuple[int, int]
MAX_QUEUE_SIZE = 32768  # the largest split virtqueue the virtio spec allows
IN_ORDER_TABLE_MAX = 1024  # indirect tables up to this long are unpacked at once

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")


@functools.lru_cache(maxsize=16)
def _in_order_links(count: int) -> bytes:
    """The `next` fields (u16 each) of a table of `count` descriptors chained in order,
    all but the last: 1, 2, ..., count - 1."""
    return struct.pack(f"<{count - 1}H", *range(1, count))


@functools.lru_cache(maxsize=64)
def _in_order_flags(count: int, readable_count: int) -> bytes:
    """The flags (u16 each) of such a table whose first `readable_count` are readable."""
    if readable_count == count:
        flags = [DESC_F_NEXT] * (count - 1) + [0]
    else:
        writable = count - readable_count
        flags = [DESC_F_NEXT] * readable_count + [DESC_F_NEXT | DESC_F_WRITE] * (writable - 1)
        flags.append(DESC_F_WRITE)
    return struct.pack(f"<{count}H", *flags)


def _in_order_table(table: memoryview) -> tuple[list[int], list[int], int] | None:
    """(addresses, lengths, readable count) of an indirect table laid out as Linux lays
    them out: every descriptor chained to the next, readable ones first, no other flags.
    Read as arrays compared in one go, never walked one by one; None when the table is
    anything else (the walk then checks it, and names what is wrong)."""
    if sys.byteorder != "little":  # (the lists below are read in host order; the walk copes)
        return None
    count = len(table) // 16
    halves = table.cast("H")  # a descriptor: addr (4 halves), len (2), flags, next
    flags = halves[6::8].tobytes()
    first_writable = flags.find(b"\x03\x00")  # NEXT | WRITE
    if first_writable < 0:
        readable_count = count - 1 if flags[-2:] == b"\x02\x00" else count
    elif first_writable % 2:
        return None
    else:
        readable_count = first_writable // 2
    if flags != _in_order_flags(count, readable_count):
        return None
    if count > 1 and halves[7 : 8 * count - 8 : 8].tobytes() != _in_order_links(count):
        return None
    # two lists at C speed, no tuple per descriptor
    return table.cast("Q")[0::2].tolist(), table.cast("I")[2::4].tolist(), readable_count


class GuestMemoryError(Qcow2Error):
    """A guest address range is not inside the memory table the front-end gave us."""


class VirtqueueError(Qcow2Error):
    """The driver broke the ring's rules (bad index, loop, bad indirect table): the
    queue stops, as a device that needs a reset would."""


class MemoryRegion(NamedTuple):
    guest_phys_addr: int
    size: int
    user_addr: int  # where the front-end mapped it (ring addresses use this)
    mapping: mmap.mmap
    start: int  # offset of guest_phys_addr inside `mapping`
    view: memoryview  # the region's bytes, indexed from guest_phys_addr: slices are cheap


class GuestMemory:
    """The regions of one SET_MEM_TABLE, mapped shared. Requests in flight hold a use
    (`acquire`/`release`) so a replaced table is unmapped only when the last one ends."""

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = sorted(regions, key=lambda r: r.guest_phys_addr)
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    @classmethod
    def map_regions(
        cls, descriptions: list[tuple[int, int, int, int]], fds: list[int]
    ) -> "GuestMemory":
        """Map each (guest_phys_addr, size, user_addr, mmap_offset) from its fd."""
        regions: list[MemoryRegion] = []
        try:
            for (guest_addr, size, user_addr, mmap_offset), fd in zip(descriptions, fds):
                if size == 0 or guest_addr + size > 1 << 64 or user_addr + size > 1 << 64:
                    raise GuestMemoryError(
                        f"memory region guest_phys_addr {guest_addr:#x} "
                        f"size {size:#x} is empty or wraps around"
                    )
                aligned = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
                try:
                    mapping = mmap.mmap(
                        fd,
                        size + mmap_offset - aligned,
                        mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=aligned,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise GuestMemoryError(
                        f"cannot map memory region guest_phys_addr "
                        f"{guest_addr:#x} size {size:#x} mmap_offset "
                        f"{mmap_offset:#x}: {exc}"
                    ) from None
                start = mmap_offset - aligned
                view = memoryview(mapping)[start : start + size]
                regions.append(MemoryRegion(guest_addr, size, user_addr, mapping, start, view))
        except BaseException:
            for region in regions:
                region.view.release()
                region.mapping.close()
            raise
        return cls(regions)

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            unmap = self._retired and self._users == 0
        if unmap:
            self._unmap()

    def retire(self) -> None:
        """No new users; unmap now or when the last request in flight releases it."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            unmap = self._users == 0
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        """Unmap every region. Views of a request are gone once it has released the
        memory; should one still be alive, the region is unmapped when the last goes."""
        for region in self.regions:
            region.view.release()
            try:
                region.mapping.close()
            except BufferError:
                pass

    def _pieces(self, guest_addr: int, length: int):
        """(region, offset in the region, length) pieces covering [guest_addr, +length)."""
        end = guest_addr + length
        if guest_addr < 0 or end > 1 << 64:
            raise GuestMemoryError(
                f"guest address {guest_addr:#x} length {length:#x} wraps around the address space"
            )
        pos = guest_addr
        while pos < end:
            for region in self.regions:
                if region.guest_phys_addr <= pos < region.guest_phys_addr + region.size:
                    n = min(end, region.guest_phys_addr + region.size) - pos
                    yield region, pos - region.guest_phys_addr, n
                    pos += n
                    break
            else:
                raise GuestMemoryError(
                    f"guest address {pos:#x} (buffer {guest_addr:#x} length "
                    f"{length:#x}) is outside guest memory"
                )

    def resolve(self, segments: list[Segment]) -> list[memoryview]:
        """Byte views of guest memory covering every segment, in order, or
        GuestMemoryError when any byte lies outside guest memory. The hot path of data
        requests: one pass, neighbours in guest memory merged into one view (fewer views
        to make and fewer iovecs), the region of the last segment tried first."""
        views: list[memoryview] = []
        append = views.append
        region = self.regions[0]
        base, size, memory = region.guest_phys_addr, region.size, region.view
        run_start = run_end = -1  # the run of adjacent segments not yet made a view
        for guest_addr, length in segments:
            start = guest_addr - base
            if start < 0 or start + length > size:
                for region in self.regions:
                    start = guest_addr - region.guest_phys_addr
                    if 0 <= start and start + length <= region.size:
                        break
                else:  # across regions, or outside: piece by piece, which names the bad byte
                    if run_end > run_start:
                        append(memory[run_start:run_end])
                    run_start = run_end = -1
                    for piece_region, piece_start, n in self._pieces(guest_addr, length):
                        append(piece_region.view[piece_start : piece_start + n])
                    continue
                if run_end > run_start:
                    append(memory[run_start:run_end])
                run_start = run_end = -1
                base, size, memory = region.guest_phys_addr, region.size, region.view
            if start == run_end:
                run_end += length
            else:
                if run_end > run_start:
                    append(memory[run_start:run_end])
                run_start, run_end = start, start + length
        if run_end > run_start:
            append(memory[run_start:run_end])
        return views

    def resolve_lists(self, addrs: list[int], lengths: list[int]) -> list[memoryview]:
        """resolve() of segments given as two lists (an in-order chain's): when they all
        lie in one region, found from their bounds at C speed, one view per buffer (the
        driver merged neighbours already: Linux gives physically contiguous pages one
        descriptor); anything else takes resolve()."""
        if addrs:
            low = min(addrs)
            high = max(addrs) + max(lengths)  # (at least the end of the furthest buffer)
            for region in self.regions:
                base = region.guest_phys_addr
                if base <= low and high <= base + region.size:
                    memory = region.view
                    return [memory[a - base : a - base + n] for a, n in zip(addrs, lengths)]
        return self.resolve(list(zip(addrs, lengths)))

    def check(self, guest_addr: int, length: int) -> None:
        for _ in self._pieces(guest_addr, length):
            pass

    def read(self, guest_addr: int, length: int) -> bytes:
        return b"".join(
            region.view[start : start + n] for region, start, n in self._pieces(guest_addr, length)
        )

    def write(self, guest_addr: int, data) -> None:
        view = memoryview(data).cast("B")
        done = 0
        for region, start, n in self._pieces(guest_addr, len(view)):
            region.view[start : start + n] = view[done : done + n]
            done += n

    def _region_holding(self, guest_addr: int, length: int) -> tuple[MemoryRegion, int]:
        """The one region holding all of a ring structure, and its offset there."""
        for region in self.regions:
            start = guest_addr - region.guest_phys_addr
            if 0 <= start and start + length <= region.size:
                return region, start
        self.check(guest_addr, length)  # names the byte outside memory, if one is
        raise GuestMemoryError(
            f"guest range {guest_addr:#x} length {length:#x} spans several memory regions"
        )

    def locate(self, guest_addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The one mapping holding all of a ring structure, and its offset there."""
        region, start = self._region_holding(guest_addr, length)
        return region.mapping, region.start + start

    def locate_view(self, guest_addr: int, length: int) -> memoryview:
        """A view of a structure that must lie in one region (an indirect table)."""
        region, start = self._region_holding(guest_addr, length)
        return region.view[start : start + length]

    def user_to_guest(self, user_addr: int) -> int:
        """Translate a front-end virtual address (vring addresses) to a guest address."""
        for region in self.regions:
            if region.user_addr <= user_addr < region.user_addr + region.size:
                return region.guest_phys_addr + user_addr - region.user_addr
        raise GuestMemoryError(f"front-end address {user_addr:#x} is not in any memory region")


class DescriptorChain:
    """One chain's buffers: device-readable segments, then device-writable ones. A chain
    read from an in-order indirect table keeps the table's addresses and lengths as two
    lists (`addrs`, `lengths`; the first `readable_count` readable) and makes segment
    lists only when asked, so a data request needs no tuple per guest page."""

    __slots__ = ("head", "addrs", "lengths", "readable_count", "_readable", "_writable")

    def __init__(
        self,
        head: int,
        readable: list[Segment] | None = None,
        writable: list[Segment] | None = None,
        *,
        addrs: list[int] | None = None,
        lengths: list[int] | None = None,
        readable_count: int = 0,
    ):
        self.head = head
        self.addrs = addrs
        self.lengths = lengths
        self.readable_count = readable_count
        self._readable = readable
        self._writable = writable

    @property
    def readable(self) -> list[Segment]:
        if self._readable is None:
            assert self.addrs is not None and self.lengths is not None  # (one or the other)
            count = self.readable_count
            self._readable = list(zip(self.addrs[:count], self.lengths[:count]))
        return self._readable

    @property
    def writable(self) -> list[Segment]:
        if self._writable is None:
            assert self.addrs is not None and self.lengths is not None  # (one or the other)
            count = self.readable_count
            self._writable = list(zip(self.addrs[count:], self.lengths[count:]))
        return self._writable


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX rule: notify when event_idx lies in (old_idx, new_idx]."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class SplitVirtqueue:
    """One split virtqueue: the device side of the descriptor table, available ring and
    used ring. Not thread-safe: the owner serialises pop and push."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        last_avail_idx: int,
        event_idx: bool,
        indirect: bool,
    ):
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = desc_addr
        self.desc_map, self.desc_offset = memory.locate(desc_addr, 16 * size)
        self.avail_map, self.avail_offset = memory.locate(avail_addr, 6 + 2 * size)
        self.used_map, self.used_offset = memory.locate(used_addr, 6 + 8 * size)
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = U16.unpack_from(self.used_map, self.used_offset + 2)[0]

    # -- available side --
    def avail_idx(self) -> int:
        return U16.unpack_from(self.avail_map, self.avail_offset + 2)[0]

    def pending(self) -> int:
        pending = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"available index moved {pending} entries past the last one "
                f"seen, more than the queue size {self.size}"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the ring is empty."""
        if not self.pending():
            return None
        slot = self.avail_offset + 4 + 2 * (self.last_avail_idx % self.size)
        head = U16.unpack_from(self.avail_map, slot)[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def publish_avail_event(self) -> None:
        """With EVENT_IDX, ask for a kick only once the driver passes what we have seen."""
        if self.event_idx:
            U16.pack_into(self.used_map, self.used_offset + 4 + 8 * self.size, self.last_avail_idx)

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise VirtqueueError(f"available ring head {head} is past the queue size {self.size}")
        readable: list[Segment] = []
        writable: list[Segment] = []
        table: mmap.mmap | memoryview = self.desc_map  # (then an indirect table's view)
        base, count = self.desc_offset, self.size
        unpack_from = DESCRIPTOR.unpack_from
        index, seen, in_indirect = head, 0, False
        while True:
            addr, length, flags, next_index = unpack_from(table, base + 16 * index)
            seen += 1
            if seen > count:
                raise VirtqueueError(
                    f"descriptor chain from head {head} is longer than its "
                    f"table ({count} entries): a loop"
                )
            if flags & DESC_F_INDIRECT:
                if in_indirect or not self.indirect:
                    raise VirtqueueError(
                        f"descriptor {index} of chain {head} is indirect "
                        + (
                            "inside an indirect table"
                            if in_indirect
                            else "but INDIRECT_DESC was not negotiated"
                        )
                    )
                if flags & DESC_F_NEXT:
                    raise VirtqueueError(
                        f"indirect descriptor {index} of chain {head} also has NEXT set"
                    )
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(
                        f"indirect table length {length} of chain {head} is "
                        f"not a multiple of 16 up to {16 * MAX_QUEUE_SIZE}"
                    )
                try:
                    indirect = self.memory.locate_view(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"indirect table of chain {head}: {exc}") from None
                table, base = indirect, 0
                if seen == 1 and length <= 16 * IN_ORDER_TABLE_MAX:  # the table is the chain
                    lists = _in_order_table(indirect)
                    if lists is not None:
                        addrs, lengths, readable_count = lists
                        return DescriptorChain(
                            head, addrs=addrs, lengths=lengths, readable_count=readable_count
                        )
                in_indirect = True
                index, seen, count = 0, 0, length // 16
                continue
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(
                    f"descriptor chain {head} has a device-readable buffer "
                    f"after a device-writable one"
                )
            else:
                readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            if next_index >= count:
                raise VirtqueueError(
                    f"descriptor {index} of chain {head} links to {next_index}, "
                    f"past its table of {count} entries"
                )
            index = next_index

    # -- used side --
    def push(self, head: int, written: int) -> bool:
        """Return a chain to the driver; True when the driver asked to be notified."""
        slot = self.used_offset + 4 + 8 * (self.used_idx % self.size)
        USED_ELEM.pack_into(self.used_map, slot, head, written)
        old_idx = self.used_idx
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.used_map, self.used_offset + 2, self.used_idx)
        if self.event_idx:
            used_event = U16.unpack_from(self.avail_map, self.avail_offset + 4 + 2 * self.size)[0]
            return need_event(used_event, self.used_idx, old_idx)
        flags = U16.unpack_from(self.avail_map, self.avail_offset)[0]
        return not flags & AVAIL_F_NO_INTERRUPT


def signal_eventfd(fd: int | None) -> None:
    """Add one to an eventfd (a kick or a call); a closed or full one is not our error."""
    if fd is not None:
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass
