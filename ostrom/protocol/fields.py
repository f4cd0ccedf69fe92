"""Checks of the fields that signed records share, project records and mesh records alike
(docs/PROTOCOL.md 4.2): each raises `InvalidRecord` naming the record type and the field."""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import PUBLIC_KEY_LENGTH
from ostrom.errors import InvalidRecord

# The largest timestamp: year 9999 in milliseconds; anything larger is a mistake or an attack.
MAX_TS: Final = 253_402_300_799_999

# Control characters, and lone surrogates (text from file names or argv can carry them, and
# they cannot be encoded as UTF-8, so a record holding one could not be signed).
CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def fail(kind: str, message: str) -> InvalidRecord:
    return InvalidRecord(f"{kind}: {message}")


def check_key(kind: str, name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_LENGTH:
        raise fail(kind, f"{name} must be a 32-byte ed25519 public key")
    return value


def check_ts(kind: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TS:
        raise fail(kind, "ts must be milliseconds since the Unix epoch")
    return value


def check_text(
    kind: str,
    name: str,
    value: object,
    *,
    max_length: int,
    line: bool = False,
    required: bool = False,
) -> str:
    if not isinstance(value, str):
        raise fail(kind, f"{name} must be a string")
    if required and not value.strip():
        raise fail(kind, f"{name} must not be empty")
    if len(value) > max_length:
        raise fail(kind, f"{name} is longer than {max_length} characters")
    if line and ("\n" in value or "\t" in value):
        raise fail(kind, f"{name} must be a single line")
    if CONTROL.search(value):
        raise fail(kind, f"{name} contains control characters")
    return value


def check_name(kind: str, name: str, value: object, *, max_length: int) -> str:
    """A name shown in lists: a non-blank line, NFC-normalised, no surrounding spaces (so
    that one name has one spelling)."""
    check_text(kind, name, value, max_length=max_length, line=True, required=True)
    assert isinstance(value, str)
    if value != value.strip() or unicodedata.normalize("NFC", value) != value:
        raise fail(kind, f"{name} must be NFC-normalised with no surrounding spaces")
    return value


def check_link(kind: str, name: str, value: object, *, record: bool = True) -> CID:
    if not isinstance(value, CID):
        raise fail(kind, f"{name} must be a CID link")
    if record and not value.is_dag_cbor:
        raise fail(kind, f"{name} must link to a dag-cbor record")
    return value


def check_links(
    kind: str, name: str, value: object, *, max_count: int, min_count: int = 0, record: bool = True
) -> tuple[CID, ...]:
    if not isinstance(value, tuple):
        raise fail(kind, f"{name} must be a list of links")
    if not min_count <= len(value) <= max_count:
        raise fail(kind, f"{name} must hold {min_count} to {max_count} links")
    for item in value:
        check_link(kind, name, item, record=record)
    if len(set(value)) != len(value):
        raise fail(kind, f"{name} lists a link twice")
    if list(value) != sorted(value):
        raise fail(kind, f"{name} must be sorted by CID bytes")
    return value
