"""qimg with encrypted images: --object secrets, --image-opts, LUKS and legacy AES.

As in test_cli_ops, qemu-img and qimg (in-process, named "qemu-img") run with the same
arguments on copies of the same images; output and exit codes must match. LUKS headers
hold random salts and PBKDF iteration counts calibrated to the machine, so images that
qimg creates are compared with qemu-img's on everything else, and must open with the
real qemu-img using the same secret.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from qemutools import run
from shared import build_once
from test_cli_ops import LUKS_OPEN, Twins, inside, run_qemu, run_qimg

SECRET = ["--object", "secret,id=sec0,data=secret-pw"]
SECRETS = SECRET + ["--object", "secret,id=sec1,data=other-pw"]
FAST = "encrypt.iter-time=10"
# over2.qcow2 (secret sec1) over l.qcow2 (secret sec0): each layer is given its own secret
OVER2_OPEN = (
    "driver=qcow2,file.filename=over2.qcow2,encrypt.key-secret=sec1,backing.encrypt.key-secret=sec0"
)


def qemu(*args, check: bool = True):
    """The real qemu-img, retried when QEMU's PBKDF calibration gives up."""
    return run(["qemu-img", *map(str, args)], check=check)


def build_sources(directory: Path) -> None:
    with inside(directory):
        qemu(
            "create",
            "-q",
            "-f",
            "qcow2",
            *SECRET,
            "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
            "l.qcow2",
            "4M",
        )
        run(
            [
                "qemu-io",
                *SECRET,
                "--image-opts",
                LUKS_OPEN.format("l.qcow2"),
                "-c",
                "write -P 0x77 1M 1M",
                "-c",
                "write -z 2M 64k",
            ]
        )
        qemu(
            "create",
            "-q",
            "-f",
            "qcow2",
            *SECRET,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "aes.qcow2",
            "4M",
        )
        run(
            [
                "qemu-io",
                *SECRET,
                "--image-opts",
                LUKS_OPEN.format("aes.qcow2"),
                "-c",
                "write -P 0x66 0 512k",
            ]
        )
        qemu("create", "-q", "-f", "qcow2", "plain.qcow2", "4M")
        run(["qemu-io", "-c", "write -P 0x77 1M 1M", "plain.qcow2"])
        # an encrypted overlay over an encrypted base (same secret)
        qemu(
            "create",
            "-q",
            "-f",
            "qcow2",
            *SECRET,
            "-b",
            "l.qcow2",
            "-F",
            "qcow2",
            "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
            "over.qcow2",
            "4M",
        )
        # an overlay with its own secret over l.qcow2, with data of its own
        qemu(
            "create",
            "-q",
            "-f",
            "qcow2",
            *SECRETS,
            "-b",
            "l.qcow2",
            "-F",
            "qcow2",
            "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec1,{FAST}",
            "over2.qcow2",
            "4M",
        )
        run(
            [
                "qemu-io",
                *SECRETS,
                "--image-opts",
                OVER2_OPEN,
                "-c",
                "write -P 0x55 1536k 1M",
                "-c",
                "write -z 3M 512k",
            ]
        )
        Path("pw.txt").write_text("secret-pw")
        Path("pw.b64").write_text(base64.b64encode(b"secret-pw").decode())


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory, "cli-encrypt-sources", build_sources)


@pytest.fixture
def twins(tmp_path, sources) -> Twins:
    return Twins(tmp_path, sources)


def luks_summary(info: dict) -> dict:
    """What two LUKS headers made with the same options share (no salts, uuid, iterations)."""
    data = info["format-specific"]["data"]
    encrypt = dict(data.get("encrypt", {}))
    for key in ("uuid", "master-key-iters"):
        encrypt.pop(key, None)
    encrypt["slots"] = [
        {k: v for k, v in slot.items() if k != "iters"} for slot in encrypt.get("slots", [])
    ]
    summary = {
        k: v for k, v in info.items() if k not in ("actual-size", "filename", "format-specific")
    }
    summary["data"] = {**data, "encrypt": encrypt}
    return summary


def image_info(path: Path) -> dict:
    return json.loads(qemu("info", "--output=json", path).stdout)


def opens_with_qemu(path: Path, secret: str = "secret-pw") -> None:
    """The real qemu-img reads the image with the secret, and check finds nothing."""
    obj = ["--object", f"secret,id=sec0,data={secret}"]
    result = qemu("check", *obj, "--image-opts", LUKS_OPEN.format(path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- create ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST},encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha512",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST},encrypt.cipher-alg=aes-256,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST},compat=0.10",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST},cluster_size=4k",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST},preallocation=metadata",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "encryption=on,encrypt.key-secret=sec0",
    ],
    ids=str,
)
def test_create_encrypted(twins, options):
    """Same "Formatting" line and result; legacy AES gets no warning (qemu-img 7.2 has none)."""
    result = twins.assert_same("create", *SECRET, "-f", "qcow2", "-o", options, "e.qcow2", "1M")
    assert result.stderr == ""
    theirs, ours = (image_info(d / "e.qcow2") for d in twins.dirs())
    assert luks_summary(ours) == luks_summary(theirs)
    opens_with_qemu(twins.qimg_dir / "e.qcow2")


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "encrypt.format=luks", "e.qcow2", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=nope", "e.qcow2", "1M"],
        ["-o", "encrypt.key-secret=sec0", "e.qcow2", "1M"],
        ["-o", "encrypt.format=foo,encrypt.key-secret=sec0", "e.qcow2", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo", "e", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=foo", "e", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=foo", "e", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=x", "e", "1M"],
        ["-o", "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128", "e", "1M"],
        ["-o", "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0", "e", "1M"],
        ["-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.foo=1", "e", "1M"],
    ],
    ids=" ".join,
)
def test_create_encryption_errors(twins, args):
    twins.assert_same("create", *SECRET, "-f", "qcow2", *args)


def test_create_with_secret_from_file_and_environment(twins, monkeypatch):
    d = twins.qimg_dir
    monkeypatch.setenv("QIMG_SECRET", "secret-pw")
    for obj in (
        "secret,id=sec0,file=pw.txt",
        "secret,id=sec0,file=pw.b64,format=base64",
        "secret,id=sec0,env=QIMG_SECRET",
        f"secret,id=sec0,data={base64.b64encode(b'secret-pw').decode()},format=base64",
    ):
        result = run_qimg(
            d,
            "create",
            "-q",
            "--object",
            obj,
            "-f",
            "qcow2",
            "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
            "e.qcow2",
            "1M",
        )
        assert (result.returncode, result.stderr) == (0, "")
        opens_with_qemu(d / "e.qcow2")


def test_help_documents_secret_env(twins):
    result = run_qimg(twins.qimg_dir, "--help")
    assert "env=" in result.stdout
    result = run_qimg(twins.qimg_dir, "info", "--object", "secret,help", "l.qcow2")
    assert "  env=<string>\n" in result.stdout


# --- info, check, map, compare, snapshot with secrets -----------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["info", "l.qcow2"],
        ["info", "--output=json", "aes.qcow2"],
        ["info", *SECRET, "--image-opts", "driver=qcow2,file.filename=l.qcow2"],
        ["info", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["info", "--output=json", "--image-opts", "file.filename=aes.qcow2,encrypt.key-secret=x"],
        ["info", "--image-opts", "driver=qcow2,file.filename=missing"],
        ["check", "l.qcow2"],
        ["check", *SECRET, "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["check", *SECRET, "--output=json", "--image-opts", LUKS_OPEN.format("aes.qcow2")],
        [
            "check",
            "--object",
            "secret,id=sec0,data=bad",
            "--image-opts",
            LUKS_OPEN.format("l.qcow2"),
        ],
        ["check", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["map", "l.qcow2"],
        ["map", *SECRET, "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["map", *SECRET, "--output=json", "--image-opts", LUKS_OPEN.format("over.qcow2")],
        [
            "map",
            *SECRET,
            "--output=json",
            "--image-opts",
            LUKS_OPEN.format("over.qcow2") + ",backing.encrypt.key-secret=sec0",
        ],
        [
            "map",
            *SECRET,
            "--image-opts",
            "driver=qcow2,file.filename=over.qcow2,backing.encrypt.key-secret=sec0",
        ],
        [
            "compare",
            *SECRET,
            "--image-opts",
            LUKS_OPEN.format("l.qcow2"),
            "driver=qcow2,file.filename=plain.qcow2",
        ],
        [
            "compare",
            *SECRET,
            "--image-opts",
            LUKS_OPEN.format("aes.qcow2"),
            "driver=qcow2,file.filename=plain.qcow2",
        ],
        [
            "compare",
            "--object",
            "secret,id=sec0,data=bad",
            "--image-opts",
            LUKS_OPEN.format("l.qcow2"),
            "driver=qcow2,file.filename=plain.qcow2",
        ],
        ["compare", "l.qcow2", "plain.qcow2"],
        ["snapshot", *SECRET, "-l", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["measure", *SECRET, "-O", "qcow2", "--image-opts", LUKS_OPEN.format("l.qcow2")],
        ["resize", *SECRET, "--image-opts", LUKS_OPEN.format("l.qcow2"), "8M"],
        ["resize", "l.qcow2", "8M"],
    ],
    ids=" ".join,
)
def test_commands_on_encrypted_images(twins, args):
    def mask(text: str) -> str:
        import re

        text = re.sub(r"^disk size: .*$", "disk size: <masked>", text, flags=re.M)
        return re.sub(r'"actual-size": \d+', '"actual-size": <masked>', text)

    twins.assert_same(*args, mask=mask)


def test_snapshot_of_encrypted_image(twins):
    d = twins.qimg_dir
    result = run_qimg(
        d, "snapshot", *SECRET, "-c", "s1", "--image-opts", LUKS_OPEN.format("l.qcow2")
    )
    assert (result.returncode, result.stderr) == (0, "")
    opens_with_qemu(d / "l.qcow2")
    result = run_qimg(
        d, "convert", *SECRET, "-l", "s1", "--image-opts", LUKS_OPEN.format("l.qcow2"), "snap.raw"
    )
    assert result.returncode == 0, result.stderr
    compare = qemu(
        "compare",
        *SECRET,
        "--image-opts",
        LUKS_OPEN.format(d / "l.qcow2"),
        f"driver=raw,file.filename={d}/snap.raw",
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


# --- convert -----------------------------------------------------------------------------------


def test_convert_between_encryptions(twins):
    """AES -> LUKS -> plain, each step read by the real qemu-img."""
    d = twins.qimg_dir
    result = run_qimg(
        d,
        "convert",
        *SECRET,
        "--image-opts",
        LUKS_OPEN.format("aes.qcow2"),
        "-O",
        "qcow2",
        "-o",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
        "l2.qcow2",
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    opens_with_qemu(d / "l2.qcow2")
    compare = qemu(
        "compare",
        *SECRET,
        "--image-opts",
        LUKS_OPEN.format(d / "l2.qcow2"),
        LUKS_OPEN.format(d / "aes.qcow2"),
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # the encrypted chain, flattened into a new LUKS image with another secret
    result = run_qimg(
        d,
        "convert",
        *SECRETS,
        "--image-opts",
        LUKS_OPEN.format("over.qcow2") + ",backing.encrypt.key-secret=sec0",
        "-O",
        "qcow2",
        "-o",
        f"encrypt.format=luks,encrypt.key-secret=sec1,{FAST}",
        "flat.qcow2",
    )
    assert result.returncode == 0, result.stderr
    opens_with_qemu(d / "flat.qcow2", "other-pw")
    result = run_qimg(
        d,
        "compare",
        *SECRETS,
        "--image-opts",
        "driver=qcow2,file.filename=flat.qcow2,encrypt.key-secret=sec1",
        "driver=qcow2,file.filename=plain.qcow2",
    )
    assert (result.returncode, result.stdout) == (0, "Images are identical.\n")


def test_convert_encrypted_matches_qemu(twins):
    twins.assert_same(
        "convert", *SECRET, "--image-opts", LUKS_OPEN.format("l.qcow2"), "-O", "raw", "out.raw"
    )
    assert (twins.qimg_dir / "out.raw").read_bytes() == (twins.qemu_dir / "out.raw").read_bytes()
    twins.assert_same(
        "convert",
        *SECRET,
        "-O",
        "qcow2",
        "-o",
        f"encrypt.format=luks,encrypt.key-secret=sec0,{FAST}",
        "plain.qcow2",
        "enc.qcow2",
    )
    theirs, ours = (image_info(d / "enc.qcow2") for d in twins.dirs())
    assert luks_summary(ours) == luks_summary(theirs)
    opens_with_qemu(twins.qimg_dir / "enc.qcow2")


# --- amend: LUKS key slots ---------------------------------------------------------------------


def slot_states(path: Path) -> list[bool]:
    info = image_info(path)
    return [slot["active"] for slot in info["format-specific"]["data"]["encrypt"]["slots"]]


AMEND_STEPS = [
    "encrypt.state=active",
    f"encrypt.state=active,encrypt.new-secret=sec1,{FAST}",
    f"encrypt.state=active,encrypt.new-secret=sec1,{FAST},encrypt.keyslot=1",
    f"encrypt.state=active,encrypt.new-secret=sec1,{FAST},encrypt.keyslot=5",
    "encrypt.state=inactive,encrypt.keyslot=3",
    "encrypt.state=inactive,encrypt.keyslot=0",
    "encrypt.state=inactive,encrypt.keyslot=9",
    "encrypt.state=foo",
    "encrypt.keyslot=1",
    "encrypt.state=active,encrypt.new-secret=nope",
    "encrypt.state=active,encrypt.new-secret=sec1,encrypt.old-secret=sec0",
    "encrypt.state=inactive,encrypt.new-secret=sec1",
    "encrypt.state=inactive,encrypt.old-secret=sec1",
    "encrypt.state=inactive,encrypt.old-secret=sec0",
    "encrypt.state=inactive,encrypt.keyslot=1",
]


def test_amend_key_slots(twins):
    """One sequence of slot changes, run by both tools on the same LUKS image."""
    for options in AMEND_STEPS:
        # (QEMU ends one of its messages with a space; qcow2lib does not)
        twins.assert_same(
            "amend",
            *SECRETS,
            "--image-opts",
            LUKS_OPEN.format("l.qcow2"),
            "-o",
            options,
            mask=lambda text: text.replace(" \n", "\n"),
        )
        theirs, ours = (slot_states(d / "l.qcow2") for d in twins.dirs())
        assert ours == theirs, options
    opens_with_qemu(twins.qimg_dir / "l.qcow2", "other-pw")  # slot 5; sec0's slot is gone


def test_amend_new_secret_opens_image(twins):
    d = twins.qimg_dir
    result = run_qimg(
        d,
        "amend",
        *SECRETS,
        "--image-opts",
        LUKS_OPEN.format("l.qcow2"),
        "-o",
        f"encrypt.state=active,encrypt.new-secret=sec1,{FAST}",
    )
    assert (result.returncode, result.stderr) == (0, "")
    opens_with_qemu(d / "l.qcow2", "other-pw")
    # remove the original passphrase: only the new one opens the image afterwards
    result = run_qimg(
        d,
        "amend",
        *SECRETS,
        "--image-opts",
        "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec1",
        "-o",
        "encrypt.state=inactive,encrypt.old-secret=sec0",
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert slot_states(d / "l.qcow2")[:2] == [False, True]
    opens_with_qemu(d / "l.qcow2", "other-pw")
    result = qemu("check", *SECRET, "--image-opts", LUKS_OPEN.format(d / "l.qcow2"), check=False)
    assert result.returncode == 1 and "Invalid password" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "encrypt.state=active", "l.qcow2"],
        ["-o", "encrypt.keyslot=1", "plain.qcow2"],
        [
            "--image-opts",
            "-o",
            "encrypt.state=active,encrypt.new-secret=sec1",
            LUKS_OPEN.format("aes.qcow2"),
        ],
        [
            "--force",
            "--image-opts",
            "-o",
            "encrypt.state=inactive,encrypt.keyslot=0",
            LUKS_OPEN.format("l.qcow2"),
        ],
        [
            "--image-opts",
            "-o",
            "encrypt.state=active,encrypt.new-secret=sec1,compat=1.7",
            LUKS_OPEN.format("l.qcow2"),
        ],
    ],
    ids=" ".join,
)
def test_amend_encryption_errors(twins, args):
    twins.assert_same("amend", *SECRETS, *args)


# --- commit, rebase and amend of encrypted chains ----------------------------------------------


def assert_same_content(twins: Twins, image_opts: str) -> None:
    """qemu-img's and qimg's copies of an encrypted image read the same (per qemu-img),
    and qemu-img check finds qimg's clean."""
    ours, theirs = (
        image_opts.replace("file.filename=", f"file.filename={d}/")
        for d in (twins.qimg_dir, twins.qemu_dir)
    )
    result = qemu("compare", *SECRETS, "--image-opts", theirs, ours, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    result = qemu("check", *SECRETS, "--image-opts", ours, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_commit_encrypted_chain(twins):
    """Each layer unlocked by its own secret; the base ends up with the overlay's data."""
    twins.assert_same("commit", *SECRETS, "--image-opts", OVER2_OPEN)
    assert_same_content(twins, LUKS_OPEN.format("l.qcow2"))
    assert_same_content(twins, OVER2_OPEN)


def test_rebase_encrypted_chain_flattens(twins):
    twins.assert_same("rebase", *SECRETS, "--image-opts", "-b", "", OVER2_OPEN)
    assert_same_content(twins, OVER2_OPEN.split(",backing.")[0])
    for directory in twins.dirs():  # l.qcow2's data now lives in the overlay itself
        (directory / "l.qcow2").unlink()
    assert_same_content(twins, OVER2_OPEN.split(",backing.")[0])


def test_rebase_encrypted_onto_plain(twins):
    """With options for the backing file the new backing name must be absolute (QEMU
    cannot resolve a relative one against the image's json: name)."""
    results = [
        runner(
            directory,
            "rebase",
            *SECRETS,
            "--image-opts",
            "-b",
            directory / "plain.qcow2",
            "-F",
            "qcow2",
            OVER2_OPEN,
        )
        for runner, directory in ((run_qemu, twins.qemu_dir), (run_qimg, twins.qimg_dir))
    ]
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == [(0, "", "")] * 2
    assert_same_content(twins, OVER2_OPEN.split(",backing.")[0])


@pytest.mark.parametrize(
    "args",
    [
        ["commit", "--image-opts", OVER2_OPEN.split(",backing.")[0]],  # no secret for the base
        ["commit", "--image-opts", OVER2_OPEN.replace("sec0", "sec1")],  # the wrong one
        ["rebase", "-u", "-b", "", "--image-opts", OVER2_OPEN],
        ["rebase", "-b", "over.qcow2", "-F", "qcow2", "--image-opts", OVER2_OPEN],
        ["rebase", "-b", "plain.qcow2", "-F", "qcow2", "--image-opts", OVER2_OPEN],
        ["rebase", "-b", "", "--image-opts", OVER2_OPEN.split(",backing.")[0]],
    ],
    ids=" ".join,
)
def test_encrypted_chain_errors(twins, args):
    twins.assert_same(args[0], *SECRETS, *args[1:])


def test_amend_encrypted_refcount_bits(twins):
    """Changing the refcount width rewrites metadata only: no secret is needed."""
    twins.assert_same("amend", "-o", "refcount_bits=4", "l.qcow2")
    twins.assert_same("amend", "-o", "compat=0.10", "l.qcow2")  # LUKS needs version 3
    assert_same_content(twins, LUKS_OPEN.format("l.qcow2"))


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        "secret,id=sec0,file=pw.txt",
        "secret,id=sec0,file=pw.b64,format=base64",
        "secret,id=sec0,data=c2VjcmV0LXB3,format=base64",
        "secret,id=sec0,data=wrong",
        "secret,id=sec0,file=missing.txt",
        "secret,id=sec0,data=!,format=base64",
    ],
    ids=str,
)
def test_secret_sources(twins, obj):
    twins.assert_same(
        "map", "--object", obj, "--output=json", "--image-opts", LUKS_OPEN.format("l.qcow2")
    )


def test_secret_from_environment(twins, monkeypatch):
    """qimg's env= secrets: the passphrase never appears on the command line or on disk."""
    d = twins.qimg_dir
    monkeypatch.setenv("QIMG_SECRET", "secret-pw")
    expected = run_qimg(
        d, "map", *SECRET, "--output=json", "--image-opts", LUKS_OPEN.format("l.qcow2")
    )
    result = run_qimg(
        d,
        "map",
        "--object",
        "secret,id=sec0,env=QIMG_SECRET",
        "--output=json",
        "--image-opts",
        LUKS_OPEN.format("l.qcow2"),
    )
    assert (result.returncode, result.stdout) == (0, expected.stdout)
    monkeypatch.setenv("QIMG_SECRET", "wrong")
    result = run_qimg(
        d,
        "map",
        "--object",
        "secret,id=sec0,env=QIMG_SECRET",
        "--image-opts",
        LUKS_OPEN.format("l.qcow2"),
    )
    assert result.returncode == 1
    assert result.stderr.endswith("Invalid password, cannot unlock any keyslot\n")


def test_backing_options_naming_the_recorded_backing_file(twins):
    """iotest 198's spelling: backing.driver and backing.file.filename name the backing file
    the image records; another one named so replaces it at run time, as in QEMU."""
    named = OVER2_OPEN.replace(
        ",backing.", ",backing.driver=qcow2,backing.file.filename=l.qcow2,backing.", 1
    )
    twins.assert_same("commit", *SECRETS, "--image-opts", named)
    assert_same_content(twins, OVER2_OPEN)
    other = OVER2_OPEN.replace(
        ",backing.encrypt.key-secret=sec0", ",backing.file.filename=plain.qcow2"
    )
    twins.assert_same("map", *SECRETS, "--image-opts", other)
    twins.assert_same(
        "compare", *SECRETS, "--image-opts", other, "driver=raw,file.filename=plain.qcow2"
    )
