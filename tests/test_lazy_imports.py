"""Start-up cost: opening a plain qcow2 image and reading what `info` shows imports neither
construct nor the optional codec/crypto packages; the struct formats used instead agree
with the construct declarations they stand in for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qcow2lib import structs as S
from qemutools import qemu_create, qemu_io

ROOT = Path(__file__).resolve().parent.parent


def test_struct_formats_match_the_construct_declarations() -> None:
    assert S.HEADER_V2_SIZE == S.HeaderV2.sizeof()
    assert S.HEADER_V3_SIZE == S.HEADER_V2_SIZE + S.HeaderV3Tail.sizeof()
    assert S.HEADER_V2_FIELDS == tuple(sub.name for sub in S.HeaderV2.subcons)
    assert S.HEADER_V3_TAIL_FIELDS == tuple(sub.name for sub in S.HeaderV3Tail.subcons)
    values = tuple(range(1, len(S.HEADER_V2_FIELDS) + 1))
    raw = S.HEADER_V2_FORMAT.pack(*values)
    parsed = S.HeaderV2.parse(raw)
    assert tuple(parsed[name] for name in S.HEADER_V2_FIELDS) == values
    assert S.FEATURE_NAME_ENTRY_SIZE == S.FeatureNameEntry.sizeof()
    assert S.SNAPSHOT_ENTRY_HEADER_SIZE == S.SnapshotEntryHeader.sizeof()
    assert S.BITMAP_DIRECTORY_ENTRY_SIZE == S.BitmapDirectoryEntry.sizeof()


def test_opening_and_reading_an_image_imports_no_construct(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import qcow2lib\n"
        "with qcow2lib.open(sys.argv[2], 'r') as img:\n"
        "    data = img.read(0, 65536)\n"
        "    extents = len(img.extents())\n"
        "print(json.dumps({'ok': data == b'a' * 65536, 'extents': extents, 'loaded': sorted(\n"
        "    m for m in ('construct', 'cryptography', 'zstandard') if m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out)
    assert result == {"ok": True, "extents": 2, "loaded": []}
