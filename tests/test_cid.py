"""CIDs: our binary and text forms agree with py-cid, the maintained implementation."""

from __future__ import annotations

import contextlib

import cid as pycid
import multihash
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError


@given(st.binary(max_size=512), st.sampled_from(["dag-cbor", "raw"]))
def test_text_form_and_parse_agree_with_pycid(data: bytes, codec: str) -> None:
    ours = CID.of_dag_cbor(data) if codec == "dag-cbor" else CID.of_raw(data)
    theirs = pycid.CIDv1(codec, multihash.digest(data, "sha2-256").encode())
    assert ours.raw == bytes(theirs.buffer)
    assert str(ours) == theirs.encode("base32").decode()
    assert CID.parse(str(ours)) == ours
    # Other multibases of the same CID go through py-cid and give the same CID.
    assert CID.parse(theirs.encode("base58btc").decode()) == ours


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b",
        "b" + "a" * 58,  # canonical length, but not one of our CID prefixes
        "bafyreigarbage!!",
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",  # CIDv0
        "z" * 59,
    ],
)
def test_garbage_is_a_decode_error(text: str) -> None:
    with pytest.raises(DecodeError):
        CID.parse(text)


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_decode_error(text: str) -> None:
    with contextlib.suppress(DecodeError):
        CID.parse(text)
