"""On-disk structures of the qcow2 format, declared once with construct.

Only the cold, symmetric structures live here (header, extensions, feature table);
hot tables (L1/L2/refcounts) are plain arrays handled by their own modules, which use
the bit masks defined below.

The construct declarations are built on first use (module __getattr__): importing
construct costs more than the rest of a `qimg info`, and opening an image parses its
fixed header with struct (HEADER_V2_FORMAT, HEADER_V3_TAIL_FORMAT) instead.
"""

import struct

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

# The part of the header every version has, field by field, and the v3 additions.
HEADER_V2_FIELDS = (
    "magic",
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
)
HEADER_V2_FORMAT = struct.Struct(">IIQIIQIIQQIIQ")
HEADER_V2_SIZE = HEADER_V2_FORMAT.size  # 72
HEADER_V3_TAIL_FIELDS = (
    "incompatible_features",
    "compatible_features",
    "autoclear_features",
    "refcount_order",
    "header_length",
)
HEADER_V3_TAIL_FORMAT = struct.Struct(">QQQII")
HEADER_V3_SIZE = HEADER_V2_SIZE + HEADER_V3_TAIL_FORMAT.size  # 104

FEATURE_NAME_ENTRY_FORMAT = struct.Struct(">BB46s")  # type, bit, name padded with NULs
FEATURE_NAME_ENTRY_SIZE = FEATURE_NAME_ENTRY_FORMAT.size  # 48


# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# The feature name table QEMU writes on create, which we write too.
FEATURE_NAMES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

# L1 / L2 / refcount table entries.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

SUBCLUSTERS = 32  # per cluster with extended L2 entries
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
L2_BITMAP_ALL_ZERO = 0xFFFFFFFF << 32

# Limits QEMU also applies; they bound memory taken on behalf of an untrusted file.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21


# One entry of the snapshot table (followed by extra data, id string, name, padding to 8).
SNAPSHOT_ENTRY_HEADER_SIZE = 40  # SnapshotEntryHeader.sizeof()
# The same fields for struct, which every snapshot command reads and writes them with
# (construct's import would cost more than the command; tests keep the two in agreement).
SNAPSHOT_ENTRY_HEADER_FIELDS = (
    "l1_table_offset",
    "l1_size",
    "id_str_size",
    "name_size",
    "date_sec",
    "date_nsec",
    "vm_clock_nsec",
    "vm_state_size",
    "extra_data_size",
)
SNAPSHOT_ENTRY_HEADER_FORMAT = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS

# The bitmaps header extension and one bitmap directory entry (followed by extra data,
# the name, padding to 8), for struct as the snapshot entries are (an image with bitmaps
# is read at every open; tests keep them in agreement with the declarations below).
BITMAPS_EXTENSION_FIELDS = (
    "nb_bitmaps",
    "reserved",
    "bitmap_directory_size",
    "bitmap_directory_offset",
)
BITMAPS_EXTENSION_FORMAT = struct.Struct(">IIQQ")
BITMAP_DIRECTORY_ENTRY_FIELDS = (
    "bitmap_table_offset",
    "bitmap_table_size",
    "flags",
    "type",
    "granularity_bits",
    "name_size",
    "extra_data_size",
)
BITMAP_DIRECTORY_ENTRY_FORMAT = struct.Struct(">QIIBBHI")
BITMAP_DIRECTORY_ENTRY_SIZE = 24  # BitmapDirectoryEntry.sizeof()
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
BITMAP_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _declare() -> dict:
    """The construct declarations (importing construct only now)."""
    from construct import Int8ub, Int16ub, Int32ub, Int64ub, PaddedString, Struct

    HeaderV2 = Struct(
        "magic" / Int32ub,
        "version" / Int32ub,
        "backing_file_offset" / Int64ub,
        "backing_file_size" / Int32ub,
        "cluster_bits" / Int32ub,
        "size" / Int64ub,
        "crypt_method" / Int32ub,
        "l1_size" / Int32ub,
        "l1_table_offset" / Int64ub,
        "refcount_table_offset" / Int64ub,
        "refcount_table_clusters" / Int32ub,
        "nb_snapshots" / Int32ub,
        "snapshots_offset" / Int64ub,
    )
    HeaderV3Tail = Struct(
        "incompatible_features" / Int64ub,
        "compatible_features" / Int64ub,
        "autoclear_features" / Int64ub,
        "refcount_order" / Int32ub,
        "header_length" / Int32ub,
    )
    ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)
    FeatureNameEntry = Struct(
        "type" / Int8ub,  # 0 incompatible, 1 compatible, 2 autoclear
        "bit" / Int8ub,
        "name" / PaddedString(46, "ascii"),
    )
    FullDiskEncryptionPointer = Struct("offset" / Int64ub, "length" / Int64ub)
    SnapshotEntryHeader = Struct(
        "l1_table_offset" / Int64ub,
        "l1_size" / Int32ub,
        "id_str_size" / Int16ub,
        "name_size" / Int16ub,
        "date_sec" / Int32ub,
        "date_nsec" / Int32ub,
        "vm_clock_nsec" / Int64ub,
        "vm_state_size" / Int32ub,
        "extra_data_size" / Int32ub,
    )
    BitmapsExtension = Struct(
        "nb_bitmaps" / Int32ub,
        "reserved" / Int32ub,
        "bitmap_directory_size" / Int64ub,
        "bitmap_directory_offset" / Int64ub,
    )
    BitmapDirectoryEntry = Struct(
        "bitmap_table_offset" / Int64ub,
        "bitmap_table_size" / Int32ub,
        "flags" / Int32ub,
        "type" / Int8ub,
        "granularity_bits" / Int8ub,
        "name_size" / Int16ub,
        "extra_data_size" / Int32ub,
    )
    return dict(
        HeaderV2=HeaderV2,
        HeaderV3Tail=HeaderV3Tail,
        ExtensionHeader=ExtensionHeader,
        FeatureNameEntry=FeatureNameEntry,
        FullDiskEncryptionPointer=FullDiskEncryptionPointer,
        SnapshotEntryHeader=SnapshotEntryHeader,
        BitmapsExtension=BitmapsExtension,
        BitmapDirectoryEntry=BitmapDirectoryEntry,
    )


_DECLARED = (
    "HeaderV2",
    "HeaderV3Tail",
    "ExtensionHeader",
    "FeatureNameEntry",
    "FullDiskEncryptionPointer",
    "SnapshotEntryHeader",
    "BitmapsExtension",
    "BitmapDirectoryEntry",
)


def __getattr__(name: str):
    if name in _DECLARED:
        globals().update(_declare())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
