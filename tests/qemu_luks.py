"""Images QEMU encrypts, made once per test run and shared by the test files.

Each LUKS `qemu-img create` spends about 2 s of CPU calibrating PBKDF2, whatever iter-time
says, so the suite makes each kind once (tests/shared.py): qcow2 images with LUKS in several
cipher/mode/ivgen/hash combinations and with legacy AES, holding WRITES as qemu-io wrote
them; a raw LUKS volume; and BLANK, a qcow2 image with QEMU's default LUKS and nothing
written. All take PASS (the AES ones their AES_PASSES). Tests read them in place and change
only copies (`copy_image`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qemutools import QEMU_IMG, QEMU_IO, run
from shared import build_once

PASS = "PASS"
MB = 1 << 20
BLANK = "blank-luks"

# name -> qemu-img encrypt.* options (iter-time is added for all)
LUKS_CONFIGS = {
    "aes128-xts-plain64": {"cipher-alg": "aes-128", "cipher-mode": "xts", "ivgen-alg": "plain64"},
    "aes256-xts-plain64": {"cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64"},
    # two AES-192 keys: OpenSSL has no such XTS, the engine builds it on AES-192-ECB
    "aes192-xts-plain64": {"cipher-alg": "aes-192", "cipher-mode": "xts", "ivgen-alg": "plain64"},
    "aes128-cbc-plain-sha1": {
        "cipher-alg": "aes-128",
        "cipher-mode": "cbc",
        "ivgen-alg": "plain",
        "hash-alg": "sha1",
    },
    "aes256-cbc-plain64-sha512": {
        "cipher-alg": "aes-256",
        "cipher-mode": "cbc",
        "ivgen-alg": "plain64",
        "hash-alg": "sha512",
    },
    # ESSIV with sha256 runs AES-256 for the IVs under an AES-128 data cipher (dm-crypt's rule)
    "aes128-cbc-essiv": {
        "cipher-alg": "aes-128",
        "cipher-mode": "cbc",
        "ivgen-alg": "essiv",
        "ivgen-hash-alg": "sha256",
    },
}
AES_PASSES = {"aes-short": "PASS", "aes-long": "a passphrase longer than sixteen bytes"}
# (guest offset, length, pattern) written by qemu-io; 1 MiB lands in another host cluster
WRITES = [(0, 65536, 0x5A), (MB + 4096, 8192, 0x6B)]


def secret_args(**secrets) -> list[str]:
    out = []
    for sid, data in secrets.items():
        out += ["--object", f"secret,id={sid},data={data}"]
    return out


def qio(image_opts: str, *commands: str, **secrets) -> subprocess.CompletedProcess:
    """qemu-io on --image-opts; returns the result (caller checks)."""
    args = [QEMU_IO, *secret_args(**(secrets or {"sec0": PASS})), "--image-opts"]
    for command in commands:
        args += ["-c", command]
    args.append(image_opts)
    return run(args, check=False)


def qio_ok(image_opts: str, *commands: str, **secrets) -> None:
    result = qio(image_opts, *commands, **secrets)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "fail" not in out.lower() and "error" not in out.lower(), out


def qcow2_opts(path, secret="sec0") -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret}"


def luks_opts(path, secret="sec0") -> str:
    return f"driver=luks,file.filename={path},key-secret={secret}"


def run_retrying(args) -> subprocess.CompletedProcess:
    """Run a qemu-img that must succeed (run() retries QEMU's PBKDF2 calibration flake)."""
    result = run(args, check=False)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def image_paths(base: Path) -> dict[str, Path]:
    """Where build_qemu_images puts each image."""
    paths = {name: base / f"{name}.qcow2" for name in [*LUKS_CONFIGS, *AES_PASSES]}
    paths["raw-luks"] = base / "x.luks"
    paths[BLANK] = base / f"{BLANK}.qcow2"
    return paths


def create_args(fmt: str, secret: str, options: str, path: Path, size: str) -> list:
    return [
        QEMU_IMG,
        "create",
        "-q",
        "-f",
        fmt,
        *secret_args(sec0=secret),
        "-o",
        options,
        path,
        size,
    ]


def build_qemu_images(base: Path) -> None:
    """Create every image side by side, then write WRITES into the non-blank ones."""
    paths = image_paths(base)
    luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    jobs = [
        create_args(
            "qcow2",
            PASS,
            ",".join([luks, *(f"encrypt.{k}={v}" for k, v in options.items())]),
            paths[name],
            "4M",
        )
        for name, options in LUKS_CONFIGS.items()
    ]
    jobs.append(create_args("qcow2", PASS, luks, paths[BLANK], "4M"))
    jobs.append(create_args("luks", PASS, "key-secret=sec0,iter-time=10", paths["raw-luks"], "1M"))
    for name, secret in AES_PASSES.items():
        options = "encrypt.format=aes,encrypt.key-secret=sec0"
        jobs.append(create_args("qcow2", secret, options, paths[name], "4M"))
    # each LUKS create burns ~1-2 s of CPU calibrating PBKDF2: run them side by side
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        list(pool.map(run_retrying, jobs))

    writes = [f"write -P 0x{p:x} {off} {length}" for off, length, p in WRITES]
    for name in LUKS_CONFIGS:
        qio_ok(qcow2_opts(paths[name]), *writes)
    for name, secret in AES_PASSES.items():
        qio_ok(qcow2_opts(paths[name]), *writes, sec0=secret)
    qio_ok(luks_opts(paths["raw-luks"]), "write -P 0x5a 0 64k", "write -P 0x33 64k 64k")


def qemu_images(tmp_path_factory) -> dict[str, Path]:
    """Every image by name, built once for the run."""
    return image_paths(build_once(tmp_path_factory, "crypto", build_qemu_images))


def copy_image(tmp_path_factory, name: str, dest: Path) -> Path:
    """A copy of the image `name` at `dest`, for a test that changes it."""
    shutil.copyfile(qemu_images(tmp_path_factory)[name], dest)
    return dest
