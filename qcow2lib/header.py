"""Loading, validating and rewriting the qcow2 header and its extensions.

Validation happens here, once, before anything is sized from a header field: every
offset is checked for alignment and against the file size, every table against a
memory bound, so later code can trust what it reads from `Header`.
"""

from __future__ import annotations

import struct

from . import structs as S
from .errors import CorruptImageError, UnsupportedFeatureError
from .records import field, record


@record
class Extension:
    """A header extension kept as raw bytes (unknown ones are written back untouched)."""

    type: int
    data: bytes


@record
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = 0
    extra_header_bytes: bytes = b""  # header fields past byte 105 we do not know, kept as is
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    crypto_offset: int = 0
    crypto_length: int = 0
    feature_names: dict = field(default_factory=dict)  # (type, bit) -> name
    extensions: list = field(default_factory=list)  # Extension, in file order, the known ones too

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & S.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def l1_entries_needed(self, size: int | None = None) -> int:
        size = self.size if size is None else size
        per_l1 = self.cluster_size * self.l2_entries
        return (size + per_l1 - 1) // per_l1

    # --- reading -------------------------------------------------------------------------

    @classmethod
    def parse(cls, first_cluster_reader, file_size: int) -> "Header":
        """Parse and validate a header.

        `first_cluster_reader(offset, length)` returns bytes of the image file; reads are
        kept inside the first cluster, where the header and its extensions must live.
        """
        raw = first_cluster_reader(0, S.HEADER_V2_SIZE)
        if file_size < S.HEADER_V2_SIZE:
            # QEMU reads a short file as if zero-padded: without the magic it is "not
            # in qcow2 format" rather than truncated
            magic_ok = raw[:4].ljust(4, b"\0") == S.QCOW_MAGIC.to_bytes(4, "big")
            raise CorruptImageError(
                f"qcow2 header truncated: the file has {file_size} bytes, the header needs "
                f"{S.HEADER_V2_SIZE}",
                qemu_message=None if magic_ok else "Image is not in qcow2 format",
            )
        v2 = dict(zip(S.HEADER_V2_FIELDS, S.HEADER_V2_FORMAT.unpack_from(raw)))
        if v2.pop("magic") != S.QCOW_MAGIC:
            raise CorruptImageError("Image is not in qcow2 format")
        if v2["version"] not in (2, 3):
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {v2['version']}")
        cluster_bits = v2["cluster_bits"]
        if not S.MIN_CLUSTER_BITS <= cluster_bits <= S.MAX_CLUSTER_BITS:
            raise CorruptImageError(
                f"Unsupported cluster size: 2^{cluster_bits} (cluster_bits {cluster_bits})"
            )
        hdr = cls(**v2)
        cluster_size = hdr.cluster_size
        if hdr.version == 2:
            hdr.refcount_order = 4
            hdr.header_length = S.HEADER_V2_SIZE
        else:
            if file_size < S.HEADER_V3_SIZE:
                raise CorruptImageError(
                    f"qcow2 header truncated: the file has {file_size} bytes, a version 3 "
                    f"header needs {S.HEADER_V3_SIZE}"
                )
            tail = S.HEADER_V3_TAIL_FORMAT.unpack_from(
                first_cluster_reader(S.HEADER_V2_SIZE, S.HEADER_V3_TAIL_FORMAT.size)
            )
            for key, value in zip(S.HEADER_V3_TAIL_FIELDS, tail):
                setattr(hdr, key, value)
            if hdr.header_length < S.HEADER_V3_SIZE:
                raise CorruptImageError(
                    f"qcow2 header too short (header_length {hdr.header_length})"
                )
        if hdr.header_length > cluster_size:
            raise CorruptImageError(
                f"qcow2 header exceeds cluster size (header_length {hdr.header_length}, "
                f"cluster size {cluster_size})"
            )
        if hdr.header_length > file_size:
            raise CorruptImageError(
                f"qcow2 header truncated (header_length {hdr.header_length}, file size {file_size})"
            )
        if hdr.header_length > S.HEADER_V3_SIZE:
            extra = first_cluster_reader(S.HEADER_V3_SIZE, hdr.header_length - S.HEADER_V3_SIZE)
            hdr.compression_type = extra[0]
            hdr.extra_header_bytes = extra[8:] if len(extra) > 8 else b""
        if hdr.backing_file_offset > cluster_size:
            raise CorruptImageError(
                f"Invalid backing file offset (backing_file_offset {hdr.backing_file_offset})"
            )
        ext_end = hdr.backing_file_offset or cluster_size
        hdr._read_extensions(first_cluster_reader, min(ext_end, file_size))
        hdr._validate(file_size)
        if hdr.backing_file_offset:
            if hdr.backing_file_size > S.MAX_BACKING_NAME:
                raise CorruptImageError(
                    f"Backing file name too long (backing_file_size {hdr.backing_file_size})"
                )
            end = hdr.backing_file_offset + hdr.backing_file_size
            if end > cluster_size or end > file_size:
                raise CorruptImageError(
                    f"Backing file name lies outside the header cluster (backing_file_offset "
                    f"{hdr.backing_file_offset}, backing_file_size {hdr.backing_file_size})"
                )
            name = first_cluster_reader(hdr.backing_file_offset, hdr.backing_file_size)
            hdr.backing_file = name.decode("utf-8", "surrogateescape")
        return hdr

    def _read_extensions(self, reader, end: int) -> None:
        offset = self.header_length
        seen = 0
        while offset + 8 <= end:
            ext_type, length = struct.unpack(">II", reader(offset, 8))
            offset += 8
            if length > end - offset:
                raise CorruptImageError(
                    f"Header extension too large (type 0x{ext_type:08x}, length {length} at "
                    f"offset {offset - 8})"
                )
            if ext_type == S.EXT_END:
                return
            data = reader(offset, length)
            self._apply_extension(ext_type, data)
            self.extensions.append(Extension(ext_type, data))
            offset += (length + 7) & ~7
            seen += 1

    def _apply_extension(self, ext_type: int, data: bytes) -> None:
        if ext_type == S.EXT_BACKING_FORMAT:
            if len(data) >= 16:
                raise CorruptImageError(
                    f"Backing format extension too long (length {len(data)}, limit 15)"
                )
            self.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
        elif ext_type == S.EXT_FEATURE_TABLE:
            # As QEMU reads it: a last partial entry counts (zero-padded), the table ends
            # at the first entry without a name, and the first name for a bit wins.
            size = S.FEATURE_NAME_ENTRY_SIZE
            data = data + bytes(-len(data) % size)
            for pos in range(0, len(data), size):
                entry = data[pos : pos + size]
                if not entry[2]:
                    break
                name = entry[2:].split(b"\0", 1)[0].decode("ascii", "replace")
                self.feature_names.setdefault((entry[0], entry[1]), name)
        elif ext_type == S.EXT_DATA_FILE:
            self.data_file = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif ext_type == S.EXT_CRYPTO:
            if len(data) != 16:
                raise CorruptImageError(f"CRYPTO header extension size {len(data)}, expected 16")
            self.crypto_offset, self.crypto_length = struct.unpack(">QQ", data)

    def _validate(self, file_size: int) -> None:
        cs = self.cluster_size
        unknown = self.incompatible_features & ~S.INCOMPAT_KNOWN
        if unknown:
            names = []
            for (feature_type, bit), name in self.feature_names.items():  # table order
                if feature_type == 0 and bit < 64 and unknown & (1 << bit):
                    names.append(name[:46])
                    unknown &= ~(1 << bit)
            if unknown:
                names.append(f"Unknown incompatible feature: {unknown:x}")
            text = f"Unsupported qcow2 feature(s): {', '.join(names)}"
            raise UnsupportedFeatureError(
                f"{text} (incompatible_features 0x{self.incompatible_features:x})",
                qemu_message=text,
            )
        if self.compression_type not in S.COMPRESSION_TYPES:
            raise UnsupportedFeatureError(
                f"qcow2: unknown compression type: {self.compression_type} (compression_type)"
            )
        has_bit = bool(self.incompatible_features & S.INCOMPAT_COMPRESSION)
        if self.compression_type == 0 and has_bit:
            raise CorruptImageError(
                "qcow2: Compression type incompatible feature bit must not be set "
                "(compression_type 0)"
            )
        if self.compression_type != 0 and not has_bit:
            raise CorruptImageError(
                f"qcow2: Compression type incompatible feature bit must be set "
                f"(compression_type {self.compression_type})"
            )
        if self.extended_l2 and cs // S.SUBCLUSTERS < 512:
            raise CorruptImageError(
                f"Unsupported subcluster size: {cs // S.SUBCLUSTERS} "
                f"(cluster_bits {self.cluster_bits} "
                f"with extended L2 entries)"
            )
        if self.refcount_order > 6:
            raise CorruptImageError(
                f"Reference count entry width too large; may not exceed 64 bits (refcount_order "
                f"{self.refcount_order})"
            )
        if self.crypt_method not in (0, 1, 2):
            raise UnsupportedFeatureError(
                f"Unsupported encryption method {self.crypt_method} (crypt_method)"
            )
        if self.crypt_method == 2 and not self.crypto_offset:
            raise CorruptImageError(
                "Missing CRYPTO header for crypt method 2 (no full disk "
                "encryption header extension)"
            )
        if self.autoclear_features & S.AUTOCLEAR_DATA_FILE_RAW and not (
            self.incompatible_features & S.INCOMPAT_DATA_FILE
        ):
            raise CorruptImageError(
                "data-file-raw requires a data file (autoclear_features "
                f"0x{self.autoclear_features:x} without the external data "
                "file bit)"
            )
        if self.refcount_table_clusters == 0:
            raise CorruptImageError(
                "Image does not contain a reference count table (refcount_table_clusters 0)"
            )
        self._validate_table(
            "Reference count table",
            "refcount_table_offset",
            self.refcount_table_offset,
            "refcount_table_clusters",
            self.refcount_table_clusters,
            cs,
            S.MAX_REFTABLE_BYTES,
            file_size,
        )
        if self.nb_snapshots:
            self._validate_table(
                "Snapshot table",
                "snapshots_offset",
                self.snapshots_offset,
                "nb_snapshots",
                self.nb_snapshots,
                40,
                40 * S.MAX_SNAPSHOTS,
                None,  # (as in QEMU, a table past the end of the file reads as zeros)
            )
        self._validate_table(
            "Active L1 table",
            "l1_table_offset",
            self.l1_table_offset,
            "l1_size",
            self.l1_size,
            8,
            S.MAX_L1_BYTES,
            file_size,
        )
        needed = self.l1_entries_needed()
        if needed > 0x7FFFFFFF:
            raise CorruptImageError(
                f"Image is too big (size {self.size})", qemu_message="Image is too big"
            )
        if self.l1_size < needed:
            raise CorruptImageError(
                f"L1 table is too small (l1_size {self.l1_size}, size {self.size} needs {needed})",
                qemu_message="L1 table is too small",
            )

    def _validate_table(
        self,
        name: str,
        field_name: str,
        offset: int,
        count_field: str,
        entries: int,
        entry_len: int,
        max_bytes: int,
        file_size: int | None,
    ) -> None:
        """Size and alignment; with file_size, also that the table lies inside the file."""
        if entries > max_bytes // entry_len:
            raise CorruptImageError(
                f"{name} too large ({count_field} {entries})", qemu_message=f"{name} too large"
            )
        if offset % self.cluster_size or (entries and offset == 0):
            raise CorruptImageError(
                f"{name} offset invalid ({field_name} {offset})",
                qemu_message=f"{name} offset invalid",
            )
        if file_size is not None and entries and offset + entries * entry_len > file_size:
            raise CorruptImageError(
                f"{name} offset invalid: {field_name} {offset} with {count_field} {entries} ends "
                f"past the end of the file ({file_size} bytes)"
            )

    # --- writing -------------------------------------------------------------------------

    def pack_fields(self) -> bytes:
        """Only the fixed header fields (header_length bytes), with the backing file name
        pointer as it is on disk: for in-place updates that leave the extensions alone."""
        data = self._pack_fixed(self.backing_file_offset, self.backing_file_size)
        return bytes(data[: self.header_length])

    def _pack_fixed(self, backing_file_offset: int, backing_file_size: int) -> bytearray:
        """The fixed header fields (v2, v3 and the bytes up to header_length), packed
        with the struct formats that tests hold to the construct declarations (every
        header update would otherwise import construct)."""
        v2_fields = dict(
            magic=S.QCOW_MAGIC,
            version=self.version,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            cluster_bits=self.cluster_bits,
            size=self.size,
            crypt_method=self.crypt_method,
            l1_size=self.l1_size,
            l1_table_offset=self.l1_table_offset,
            refcount_table_offset=self.refcount_table_offset,
            refcount_table_clusters=self.refcount_table_clusters,
            nb_snapshots=self.nb_snapshots,
            snapshots_offset=self.snapshots_offset,
        )
        out = bytearray(S.HEADER_V2_FORMAT.pack(*(v2_fields[name] for name in S.HEADER_V2_FIELDS)))
        if self.version >= 3:
            v3_fields = dict(
                incompatible_features=self.incompatible_features,
                compatible_features=self.compatible_features,
                autoclear_features=self.autoclear_features,
                refcount_order=self.refcount_order,
                header_length=self.header_length,
            )
            out += S.HEADER_V3_TAIL_FORMAT.pack(
                *(v3_fields[name] for name in S.HEADER_V3_TAIL_FIELDS)
            )
            if self.header_length > S.HEADER_V3_SIZE:
                extra = bytes([self.compression_type]) + bytes(7) + self.extra_header_bytes
                out += extra[: self.header_length - S.HEADER_V3_SIZE].ljust(
                    self.header_length - S.HEADER_V3_SIZE, b"\0"
                )
        return out

    def pack(self) -> bytes:
        """The header cluster's content: header, extensions, end marker, backing file name.

        Known extensions are regenerated from the fields; unknown ones are kept in order.
        """
        out = self._pack_fixed(0, 0)
        for ext in self._extensions_to_write():
            out += struct.pack(">II", ext.type, len(ext.data))
            out += ext.data + bytes(-len(ext.data) % 8)
        out += bytes(8)  # end of extensions
        if self.backing_file:
            name = self.backing_file.encode("utf-8", "surrogateescape")
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
        if len(out) > self.cluster_size:
            raise CorruptImageError(
                f"Header and extensions ({len(out)} bytes) do not fit in one cluster "
                f"({self.cluster_size} bytes)"
            )
        return bytes(out)

    def _extensions_to_write(self) -> list[Extension]:
        known = {S.EXT_BACKING_FORMAT, S.EXT_FEATURE_TABLE, S.EXT_DATA_FILE, S.EXT_CRYPTO}
        result: list[Extension] = []
        if self.backing_format and self.backing_file:
            result.append(Extension(S.EXT_BACKING_FORMAT, self.backing_format.encode()))
        if self.data_file:
            result.append(
                Extension(S.EXT_DATA_FILE, self.data_file.encode("utf-8", "surrogateescape"))
            )
        if self.crypto_offset:
            result.append(
                Extension(S.EXT_CRYPTO, struct.pack(">QQ", self.crypto_offset, self.crypto_length))
            )
        if self.version >= 3 and self.cluster_size > 4096:
            # As QEMU: small header clusters keep their room for the backing file name.
            table = b"".join(
                S.FEATURE_NAME_ENTRY_FORMAT.pack(t, b, n.encode("ascii"))
                for t, b, n in S.FEATURE_NAMES
            )
            result.append(Extension(S.EXT_FEATURE_TABLE, table))
        result += [e for e in self.extensions if e.type not in known]
        return result
