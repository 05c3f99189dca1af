"""--object: QEMU's user creatable objects; secrets (passphrases and keys) are defined
here, throttle groups in throttle_groups.py."""

from __future__ import annotations

import os
import sys

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, CliExit
from qcow2lib.cli.qemuopts import ObjectError, keyval_parse

# QEMU's user creatable object types (`--object help`); qimg implements "secret" and
# "throttle-group".
OBJECT_TYPES = (
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-cipher-suites",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
)
# The properties of a secret object; "env" is qimg's own (the secret is read from an
# environment variable, so it appears neither on the command line nor in a file).
SECRET_PROPERTIES = ("data", "env", "file", "format", "iv", "keyid")
IDENTIFIER_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n"


def _is_identifier(text: str) -> bool:
    return (
        bool(text)
        and text[0].isascii()
        and text[0].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in text)
    )


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise ObjectError(
            f"Unable to read {path}: Error reading file \u201c{path}\u201d: Is a directory"
        ) from None
    except OSError as exc:
        raise ObjectError(
            f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {exc.strerror}"
        ) from None


def _base64_decode(data: bytes) -> bytes:
    """GLib's lenient base64 decoding, refusing what QEMU's qbase64_decode refuses."""
    import base64  # (here: only format=base64 secrets need it, and qimg starts often)

    text = data.decode("latin-1")
    body = text.rstrip("=")
    if (
        any(not (c.isascii() and (c.isalnum() or c in "+/")) for c in body)
        or len(text) - len(body) > 2
    ):
        raise ObjectError("Base64 data contains invalid characters")
    body = body[: len(body) - len(body) % 4 if len(body) % 4 == 1 else len(body)]
    return base64.b64decode(body + "=" * (-len(body) % 4))


def add_object(cli: Cli, text: str) -> None:
    """--object TEXT: define a secret (or print the object help and exit 0)."""
    props, want_help = keyval_parse(text, "qom-type")
    qom_type = props.get("qom-type")
    if qom_type in ("help", "?") or (qom_type is None and want_help):
        cli.out(
            "List of user creatable objects:\n" + "".join(f"  {name}\n" for name in OBJECT_TYPES)
        )
        raise CliExit(0)
    if qom_type is None:
        raise ObjectError("Parameter 'qom-type' is missing")
    if qom_type not in OBJECT_TYPES:
        raise ObjectError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if want_help and qom_type == "secret":
        names = {
            "data": "string",
            "env": "string",
            "file": "string",
            "format": "QCryptoSecretFormat",
            "iv": "string",
            "keyid": "string",
        }
        cli.out(
            "secret options:\n" + "".join(f"  {name}=<{kind}>\n" for name, kind in names.items())
        )
        raise CliExit(0)
    if want_help and qom_type == "throttle-group":
        from qcow2lib.cli.throttle_groups import print_help

        print_help(cli)
        raise CliExit(0)
    if "id" not in props:
        raise ObjectError("Parameter 'id' is missing")
    if qom_type not in ("secret", "throttle-group"):
        raise ObjectError(f"Object type '{qom_type}' is not supported yet")
    object_id = props["id"]
    if qom_type == "throttle-group":
        from qcow2lib.cli.throttle_groups import add_throttle_group

        if not _is_identifier(object_id):
            raise ObjectError("Parameter 'id' expects an identifier", IDENTIFIER_HINT)
        del props["qom-type"], props["id"]
        add_throttle_group(cli, object_id, props)
        return
    if props.get("format", "raw") not in ("raw", "base64"):
        raise ObjectError(f"Parameter 'format' does not accept value '{props['format']}'")
    for name in props:
        if name == "loaded":
            raise ObjectError("Property 'secret.loaded' is not writable")
        if name not in SECRET_PROPERTIES and name not in ("qom-type", "id"):
            raise ObjectError(f"Parameter '{name}' is unexpected")
    if not _is_identifier(object_id):
        raise ObjectError("Parameter 'id' expects an identifier", IDENTIFIER_HINT)
    sources = [name for name in ("data", "file", "env") if name in props]
    if "env" in props and len(sources) > 1:
        raise ObjectError("'env' cannot be used together with 'data' or 'file'")
    if "data" in props and "file" in props:
        raise ObjectError("'file' and 'data' are mutually exclusive")
    if not sources:
        raise ObjectError("Either 'file' or 'data' must be provided")
    if "data" in props:
        value = props["data"].encode("utf-8", "surrogateescape")
    elif "file" in props:
        value = _read_secret_file(props["file"])
    else:
        name = props["env"]
        if name.encode("utf-8", "surrogateescape") not in os.environb:
            raise ObjectError(f"Environment variable '{name}' is not set")
        value = os.environb[name.encode("utf-8", "surrogateescape")]
    if "keyid" in props:
        if props["keyid"] not in cli.secrets:
            raise ObjectError(f"No secret with id '{props['keyid']}'")
        raise ObjectError("Encrypted secrets (keyid) are not supported by qimg yet")
    if props.get("format") == "base64":
        value = _base64_decode(value)
    if object_id in cli.secrets or object_id in cli.throttle_groups:
        raise ObjectError(
            f"attempt to add duplicate property '{object_id}' to object (type 'container')"
        )
    cli.secrets[object_id] = value


def process_object(cli: Cli, text: str, code: int = 1) -> None:
    """--object as a command processes it: errors end qemu-img with `code`."""
    try:
        add_object(cli, text)
    except ObjectError as exc:
        cli.error_report(exc.message)
        sys.stderr.write(exc.hint)
        raise CliExit(code) from None


def secret_value(cli: Cli, secret_id: str) -> bytes:
    """The data of a secret object; QEMU's error when there is none."""
    if secret_id not in cli.secrets:
        raise InvalidSecret(f"No secret with id '{secret_id}'")
    return cli.secrets[secret_id]


class InvalidSecret(Qcow2Error):
    """A key-secret naming no --object secret."""
