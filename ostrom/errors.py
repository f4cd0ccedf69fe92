"""The one exception tree of Ostrom.

Every error a user, a script or a peer can cause is an `OstromError` with a stable `code`.
The RPC server sends `code` and the message to the client; the client raises the same class
again from the code, so a script can catch `NotFound` whether it ran in-process or over
the socket.
"""

from __future__ import annotations

from typing import ClassVar


class OstromError(Exception):
    """Base of every error Ostrom raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- input from users, scripts and files -------------------------------------------------------


class InvalidInput(OstromError):
    """An argument is missing, of the wrong type, or out of range."""

    code = "invalid_params"


class InvalidLicense(InvalidInput):
    """A license is not a valid SPDX license expression."""

    code = "invalid_license"


class UnsafePath(InvalidInput):
    """A path would escape its tree: absolute, `..`, a symlink out, or not normalised."""

    code = "unsafe_path"


class NotFound(OstromError):
    """No record, project, block or file by that name."""

    code = "not_found"


class Ambiguous(OstromError):
    """A CID prefix or project name matches more than one thing."""

    code = "ambiguous"


class AlreadyExists(OstromError):
    """Creating something that must not be overwritten (an identity key, a file)."""

    code = "already_exists"


class Refused(OstromError):
    """A well-formed request that would break a project rule (e.g. a quorum no one can reach)."""

    code = "refused"


class QuotaExceeded(Refused):
    """Storing more would pass a storage limit the node's owner set: `limit` names which
    (`storage` or `project_storage`)."""

    code = "quota_exceeded"

    def __init__(self, message: str, limit: str = "storage") -> None:
        super().__init__(message)
        self.limit = limit


# --- bytes that fail to decode or verify -------------------------------------------------------


class DecodeError(OstromError):
    """Bytes are not a valid encoding (CBOR, DAG-CBOR, CID, CAR, MessagePack)."""

    code = "malformed"


class TooLarge(DecodeError):
    """A record, block, frame or list is over its bound."""

    code = "too_large"


class InvalidRecord(OstromError):
    """A record decodes but breaks the record rules (unknown type, missing or bad field)."""

    code = "invalid_record"


class BadSignature(InvalidRecord):
    """A record's signature does not verify against its author's key."""

    code = "bad_signature"


class BlockMismatch(InvalidRecord):
    """A block's bytes do not hash to the CID it was stored or sent under."""

    code = "block_mismatch"


# --- the local node ----------------------------------------------------------------------------


class StoreCorrupt(OstromError):
    """Stored bytes no longer match their CID; they are never served."""

    code = "store_corrupt"


class DaemonNotRunning(OstromError):
    """No daemon answers on the data directory's socket."""

    code = "daemon_not_running"


class DaemonAlreadyRunning(OstromError):
    """Another daemon holds the data directory's lock."""

    code = "daemon_already_running"


class IdentityError(OstromError):
    """The identity key file is missing, unreadable or malformed."""

    code = "identity_error"


class PermissionDenied(OstromError):
    """A caller on the socket is not the daemon's own user."""

    code = "permission_denied"


# --- the network -------------------------------------------------------------------------------


class PeerUnreachable(OstromError):
    """A peer cannot be dialled, or a stream to it failed (reset, lost connection, timeout)."""

    code = "peer_unreachable"


# --- the RPC protocol --------------------------------------------------------------------------


class RpcProtocolError(DecodeError):
    """A message on the RPC socket is not a valid MessagePack-RPC message."""

    code = "rpc_protocol"


class MethodNotFound(OstromError):
    """The RPC method does not exist."""

    code = "method_not_found"


class RemoteError(OstromError):
    """An error from the daemon whose code this client does not know."""

    code = "remote_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.remote_code = code


class InternalError(OstromError):
    """A bug in the daemon; the request failed but the daemon keeps running."""

    code = "internal"


def _all_subclasses(cls: type[OstromError]) -> list[type[OstromError]]:
    out: list[type[OstromError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_ALL_ERRORS: list[type[OstromError]] = [OstromError, *_all_subclasses(OstromError)]
ERRORS_BY_CODE: dict[str, type[OstromError]] = {
    cls.code: cls for cls in _ALL_ERRORS if cls is not RemoteError
}


def error_from_code(code: str, message: str) -> OstromError:
    """Rebuild the error a daemon reported, as the same class when this side knows the code."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message)
    return cls(message)
