"""The block driver names QEMU 7.2's qemu-img knows, and which of them create or amend images.

qimg implements qcow2 and raw (over a file, a host device or an NBD export). The other
names still matter: qemu-img records them where it only stores a name (the backing format
given to `rebase -u -F`) and refuses, with a message naming the driver, an operation a
driver lacks (bochs cannot create images, only qcow2 and luks amend them). Knowing the
names lets qimg take the first and print the same refusals; what it cannot do with a
known driver it reports as such.

The names are those qemu-img 7.2 as Debian 12 builds it finds without loading a module
(its curl, gluster, iSCSI, NFS, RBD and SSH drivers are modules of qemu-block-extra).
"""

from __future__ import annotations

# bdrv_find_format(): every registered driver, protocols included.
KNOWN_DRIVERS = frozenset(
    (
        "blkdebug",
        "blklogwrites",
        "blkverify",
        "bochs",
        "cloop",
        "compress",
        "copy-before-write",
        "copy-on-read",
        "dmg",
        "file",
        "host_cdrom",
        "host_device",
        "luks",
        "nbd",
        "null-aio",
        "null-co",
        "nvme",
        "parallels",
        "preallocate",
        "qcow",
        "qcow2",
        "qed",
        "quorum",
        "raw",
        "replication",
        "snapshot-access",
        "throttle",
        "vdi",
        "vhdx",
        "vmdk",
        "vpc",
        "vvfat",
    )
)

# The values QEMU's create path accepts for backing_fmt with -u: every driver its QAPI
# schema names, the module drivers and the record/replay filter included.
BLOCKDEV_DRIVERS = KNOWN_DRIVERS | frozenset(
    ("blkreplay", "ftp", "ftps", "gluster", "http", "https", "iscsi", "nfs", "rbd", "ssh")
)

# The drivers that have creation options (the others refuse `create` and `convert -O`).
CREATE_DRIVERS = frozenset(
    (
        "file",
        "host_cdrom",
        "host_device",
        "luks",
        "nbd",
        "nvme",
        "parallels",
        "qcow",
        "qcow2",
        "qed",
        "raw",
        "vdi",
        "vhdx",
        "vmdk",
        "vpc",
    )
)

# The drivers that can amend an image's options.
AMEND_DRIVERS = frozenset(("luks", "qcow2"))


def creation_refusal(fmt: str) -> str | None:
    """qemu-img's message when `fmt` is a known driver that cannot create images, else None."""
    if fmt in KNOWN_DRIVERS and fmt not in CREATE_DRIVERS:
        return f"Format driver '{fmt}' does not support image creation"
    return None


def amend_refusal(fmt: str) -> str | None:
    """qemu-img's message when `fmt` is a known driver that cannot amend images, else None."""
    if fmt in KNOWN_DRIVERS and fmt not in AMEND_DRIVERS:
        return f"Format driver '{fmt}' does not support option amendment"
    return None
