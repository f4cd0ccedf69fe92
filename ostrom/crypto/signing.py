"""Domain-separated ed25519 signatures over records.

A signature covers `DOMAIN + payload`, never the payload alone, so that a signature made
for an Ostrom record cannot be replayed as a signature over anything else the same key
signs (a libp2p handshake, a gossip envelope, a mesh description).
"""

from __future__ import annotations

from typing import Final

import nacl.bindings
import nacl.exceptions

from ostrom.crypto.keys import PUBLIC_KEY_LENGTH, SIGNATURE_LENGTH, Identity
from ostrom.errors import BadSignature

# The prefix every record signature covers; the NUL ends it, so no payload can extend it.
RECORD_DOMAIN: Final = b"ostrom/record/v1\x00"


def sign(identity: Identity, domain: bytes, payload: bytes) -> bytes:
    return identity.sign(domain + payload)


def verify(public_key: bytes, signature: bytes, domain: bytes, payload: bytes) -> None:
    """Raise `BadSignature` unless `signature` is `public_key`'s over `domain + payload`."""
    if len(public_key) != PUBLIC_KEY_LENGTH or len(signature) != SIGNATURE_LENGTH:
        raise BadSignature("malformed key or signature")
    try:
        nacl.bindings.crypto_sign_open(signature + domain + payload, public_key)
    except nacl.exceptions.BadSignatureError:
        raise BadSignature("signature does not verify against the author's key") from None
    except (ValueError, TypeError, nacl.exceptions.CryptoError):
        raise BadSignature("malformed key or signature") from None
