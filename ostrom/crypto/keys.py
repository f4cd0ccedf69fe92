"""Ed25519 identities: the node's signing key, its key file, and its libp2p peer id.

The key file holds the 32-byte seed in one line of text,
`ostrom-identity-v1 ed25519 <base64 seed>`, so that it can be copied, printed for a backup
and recognised. It is created with mode 0600 and never overwritten.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import base58
import nacl.bindings
import nacl.signing

from ostrom.errors import AlreadyExists, IdentityError, InvalidInput

KEY_FILE_TAG: Final = "ostrom-identity-v1 ed25519"
PUBLIC_KEY_LENGTH: Final = 32
SIGNATURE_LENGTH: Final = 64

# A libp2p peer id for an ed25519 key is the identity multihash (code 0x00, length 36) of the
# protobuf PublicKey message {Type: Ed25519 (1), Data: <32 bytes>}, i.e. 08 01 12 20 <key>.
_PEER_ID_PREFIX: Final = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


# Peer ids kept, most recently used: events and listings name the same few authors again
# and again, and base58 costs about 11 µs. 1,024 entries are about 0.2 MB.
_PEER_ID_CACHE_ENTRIES: Final = 1024


@functools.lru_cache(maxsize=_PEER_ID_CACHE_ENTRIES)
def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (`12D3KooW...`) of an ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_LENGTH:
        raise InvalidInput("an ed25519 public key is 32 bytes")
    return base58.b58encode(_PEER_ID_PREFIX + public_key).decode("ascii")


def public_key_of_peer_id(peer_id: str) -> bytes:
    """The ed25519 public key inside a `12D3KooW...` peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise InvalidInput(f"not a peer id: {peer_id!r}") from None
    if len(raw) != len(_PEER_ID_PREFIX) + PUBLIC_KEY_LENGTH or not raw.startswith(_PEER_ID_PREFIX):
        raise InvalidInput(f"not an ed25519 peer id: {peer_id!r}")
    return raw[len(_PEER_ID_PREFIX) :]


def parse_public_key(text: str) -> bytes:
    """A public key given by a user: 64 hex digits or a `12D3KooW...` peer id."""
    text = text.strip()
    if text.startswith("12D3KooW"):
        return public_key_of_peer_id(text)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"not a public key (64 hex digits or a peer id): {text!r}") from None
    if len(raw) != PUBLIC_KEY_LENGTH:
        raise InvalidInput(f"a public key is 32 bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's or an author's ed25519 key pair."""

    seed: bytes = field(repr=False)
    public_key: bytes
    _secret: bytes = field(repr=False)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError("an ed25519 seed is 32 bytes")
        signing_key = nacl.signing.SigningKey(seed)
        return cls(
            seed=seed,
            public_key=bytes(signing_key.verify_key),
            _secret=bytes(signing_key._signing_key),
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(os.urandom(32))

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """A detached ed25519 signature over `message` (callers add the domain separation)."""
        signed: bytes = nacl.bindings.crypto_sign(message, self._secret)
        return signed[:SIGNATURE_LENGTH]


def write_key_file(path: Path, identity: Identity) -> None:
    """Create `path` (mode 0600) holding `identity`; refuse if it exists."""
    line = f"{KEY_FILE_TAG} {base64.b64encode(identity.seed).decode('ascii')}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExists(
            f"an identity already exists at {path}; it is never overwritten"
        ) from None
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> Identity:
    """Load the identity in `path`."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise IdentityError(f"no identity at {path} (run `ostrom init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read identity {path}: {exc}") from None
    tag, _, encoded = text.strip().rpartition(" ")
    if tag != KEY_FILE_TAG:
        raise IdentityError(f"{path} is not an Ostrom identity file")
    try:
        seed = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise IdentityError(f"{path}: the key is not valid base64") from None
    return Identity.from_seed(seed)
