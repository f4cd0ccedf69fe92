"""MessagePack-RPC messages and a push parser for them (sans-IO: bytes in, values out).

Wire format (the public msgpack-rpc specification): a stream of MessagePack objects with no
extra framing, each one of

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]
    notification  [2, method, params]

`msgid` is an unsigned 32-bit integer, `method` a string, `params` an array.

Ostrom's conventions on top of the specification:

- `params` is `[]` or `[{name: value, ...}]`: one map of named parameters with string keys
  (`named_params` checks this). CIDs travel as text strings, keys as hex strings, bytes
  (blocks) as msgpack bin.
- `error` is nil or the map `{"code": str, "message": str}`; `code` is an `OstromError.code`
  from ostrom/errors.py and a client rebuilds the exception with `errors.error_from_code`.
  Extra keys in the map are ignored, so later versions may add some.
- A response whose msgid is nil carries an error about the connection or about bytes that did
  not parse far enough to have a msgid (like JSON-RPC's `"id": null`); the specification
  leaves this case open.
- The daemon pushes events as `[2, "event", [event_map]]`. When a subscriber falls too far
  behind, its last notification is `[2, "events.lost", [{"message": str}]]` and the daemon
  closes the connection.
- One message is at most `MAX_MESSAGE_SIZE` bytes. A longer one cannot be skipped (nothing
  marks where the next message starts), so the reader reports `too_large` as fatal and the
  connection must be closed.
- Bin stays bytes, str must be valid UTF-8, map keys must be strings or bytes, and ext types
  are refused. The one exception is ext type -1 (msgpack's timestamp), which the msgpack
  library decodes itself into a `msgpack.Timestamp`; no Ostrom parameter accepts one, so a
  method's own parameter checks refuse it.

`RpcReader` never raises on bad input: each invalid thing becomes a `BadMessage` among the
parsed messages, so a server can answer it and carry on with the same connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeAlias

import msgpack  # type: ignore[import-untyped]

from ostrom.errors import (
    InvalidInput,
    OstromError,
    RemoteError,
    RpcProtocolError,
    TooLarge,
    error_from_code,
)

# The three message types of the specification.
REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

# A msgid is an unsigned 32-bit integer (msgpack-rpc specification).
MAX_MSGID: Final = 2**32 - 1

# The largest message either side sends or accepts. The largest regular traffic is a batch of
# blocks: at most 4 blocks of at most 1 MiB each plus their CIDs and the map around them,
# a little over 4 MiB. 16 MiB leaves 4x headroom for that and for big listings (100k CIDs as
# text are about 6 MiB) while keeping one connection's buffer bounded.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024

# `feed` hands the unpacker at most this much at a time, so the unpacker's buffer (one partial
# message plus one slice) never needs to grow past MAX_MESSAGE_SIZE + FEED_SLICE; 64 KiB is
# also what a socket read typically returns.
FEED_SLICE: Final = 64 * 1024

# Notification methods the daemon sends (see the module docstring).
EVENT_METHOD: Final = "event"
EVENTS_LOST_METHOD: Final = "events.lost"


def _is_uint32(value: object) -> bool:
    # bool is a subclass of int; msgpack true/false must not pass as a msgid.
    return type(value) is int and 0 <= value <= MAX_MSGID


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The `error` map of a response: a stable code and a readable message."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not isinstance(self.message, str):
            raise InvalidInput("an error's code and message must be strings")

    @classmethod
    def from_exception(cls, exc: OstromError) -> ErrorInfo:
        """The error map for `exc`; a `RemoteError` passes on the code it was received with."""
        code = exc.remote_code if isinstance(exc, RemoteError) else exc.code
        return cls(code, exc.message)

    def to_exception(self) -> OstromError:
        """The same exception class the daemon raised, when this side knows the code."""
        return error_from_code(self.code, self.message)


@dataclass(frozen=True, slots=True)
class Request:
    """`[0, msgid, method, params]`: a call that expects a response with the same msgid."""

    msgid: int
    method: str
    params: list[Any]

    def __post_init__(self) -> None:
        if not _is_uint32(self.msgid):
            raise InvalidInput("a request's msgid must be an unsigned 32-bit integer")
        if not isinstance(self.method, str):
            raise InvalidInput("a request's method must be a string")
        if not isinstance(self.params, list):
            raise InvalidInput("a request's params must be a list")


@dataclass(frozen=True, slots=True)
class Response:
    """`[1, msgid, error, result]`; `msgid` is None only for errors not tied to a request."""

    msgid: int | None
    error: ErrorInfo | None
    result: Any

    def __post_init__(self) -> None:
        if self.msgid is None:
            if self.error is None:
                raise InvalidInput("a response without a msgid must carry an error")
        elif not _is_uint32(self.msgid):
            raise InvalidInput("a response's msgid must be an unsigned 32-bit integer or nil")
        if self.error is not None and not isinstance(self.error, ErrorInfo):
            raise InvalidInput("a response's error must be an ErrorInfo or None")


@dataclass(frozen=True, slots=True)
class Notification:
    """`[2, method, params]`: a one-way message; nobody answers it."""

    method: str
    params: list[Any]

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise InvalidInput("a notification's method must be a string")
        if not isinstance(self.params, list):
            raise InvalidInput("a notification's params must be a list")


Message: TypeAlias = Request | Response | Notification


@dataclass(frozen=True, slots=True)
class BadMessage:
    """Input that is not a valid message, as a value the receiver can answer.

    `msgid` is the request's msgid when the input got far enough to show one, else None.
    `fatal` means the stream cannot be resynchronised (a message over the size bound) and
    the connection must be closed after answering.
    """

    error: RpcProtocolError | TooLarge
    msgid: int | None = None
    fatal: bool = False


def error_response(msgid: int | None, exc: OstromError) -> Response:
    """The response reporting `exc`, for the request `msgid` (None: not tied to a request)."""
    return Response(msgid, ErrorInfo.from_exception(exc), None)


def encode(message: Message) -> bytes:
    """The MessagePack bytes of `message`.

    Raises `InvalidInput` when a parameter or result holds a value MessagePack cannot carry
    (a CID object, a Path, an integer over 64 bits...) and `TooLarge` when the message is over
    `MAX_MESSAGE_SIZE`, which the other side would refuse.
    """
    wire: list[Any]
    if isinstance(message, Request):
        wire = [REQUEST, message.msgid, message.method, message.params]
    elif isinstance(message, Response):
        error = message.error
        error_map = None if error is None else {"code": error.code, "message": error.message}
        wire = [RESPONSE, message.msgid, error_map, message.result]
    else:
        wire = [NOTIFICATION, message.method, message.params]
    try:
        data: bytes = msgpack.packb(wire, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"cannot encode the message as MessagePack: {exc}") from None
    if len(data) > MAX_MESSAGE_SIZE:
        raise TooLarge(
            f"message of {len(data)} bytes is over the {MAX_MESSAGE_SIZE}-byte bound; "
            "split it into smaller calls"
        )
    return data


def named_params(params: list[Any]) -> dict[str, Any]:
    """Ostrom's parameter convention: `[]` gives `{}`, `[{name: value}]` gives that map.

    Raises `InvalidInput` for anything else (positional values, two maps, non-string keys).
    """
    if not params:
        return {}
    if len(params) == 1 and type(params[0]) is dict:
        named: dict[str, Any] = params[0]
        for key in named:
            if type(key) is not str:
                raise InvalidInput("parameter names must be strings")
        return named
    raise InvalidInput("params must be [] or [{name: value, ...}] (one map of named parameters)")


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"MessagePack ext type {code} is not allowed")


def _protocol_error(detail: str, msgid: int | None = None) -> BadMessage:
    return BadMessage(RpcProtocolError(detail), msgid)


def _parse_error(value: Any) -> ErrorInfo | BadMessage:
    if not isinstance(value, Mapping):
        return _protocol_error("a response's error must be nil or a map")
    code = value.get("code")
    message = value.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return _protocol_error("a response's error map needs string 'code' and 'message'")
    return ErrorInfo(code, message)


def parse_message(value: Any) -> Message | BadMessage:
    """Check one decoded MessagePack value against the three message shapes."""
    if type(value) is not list or not value:
        return _protocol_error("a message must be a non-empty array")
    kind = value[0]
    if type(kind) is not int or kind not in (REQUEST, RESPONSE, NOTIFICATION):
        return _protocol_error("a message must start with type 0, 1 or 2")
    if kind == REQUEST:
        msgid = value[1] if len(value) > 1 and _is_uint32(value[1]) else None
        if len(value) != 4:
            return _protocol_error("a request must be [0, msgid, method, params]", msgid)
        if msgid is None:
            return _protocol_error("a request's msgid must be an unsigned 32-bit integer")
        if type(value[2]) is not str:
            return _protocol_error("a request's method must be a string", msgid)
        if type(value[3]) is not list:
            return _protocol_error("a request's params must be an array", msgid)
        return Request(msgid, value[2], value[3])
    if kind == RESPONSE:
        if len(value) != 4:
            return _protocol_error("a response must be [1, msgid, error, result]")
        msgid = value[1]
        if msgid is not None and not _is_uint32(msgid):
            return _protocol_error("a response's msgid must be an unsigned 32-bit integer")
        error: ErrorInfo | None = None
        if value[2] is not None:
            parsed = _parse_error(value[2])
            if isinstance(parsed, BadMessage):
                return BadMessage(parsed.error, msgid)
            error = parsed
        if msgid is None and error is None:
            return _protocol_error("a response without a msgid must carry an error")
        return Response(msgid, error, value[3])
    if len(value) != 3:
        return _protocol_error("a notification must be [2, method, params]")
    if type(value[1]) is not str:
        return _protocol_error("a notification's method must be a string")
    if type(value[2]) is not list:
        return _protocol_error("a notification's params must be an array")
    return Notification(value[1], value[2])


class RpcReader:
    """Push parser: feed it bytes as they arrive, get back complete messages.

    Bytes that are not MessagePack give one `BadMessage` (code `rpc_protocol`) and the
    buffered bytes are discarded, so the stream continues with whatever arrives next. A message
    over `max_message_size` gives a fatal `BadMessage` (code `too_large`); after that the reader
    is `broken` and returns nothing more.
    """

    __slots__ = ("_max", "_offset", "_unpacker", "broken")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max = max_message_size
        self._unpacker = self._new_unpacker()
        self._offset = 0  # the unpacker's position after the last complete message
        self.broken = False

    def _new_unpacker(self) -> Any:
        self._offset = 0
        return msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_buffer_size=self._max + FEED_SLICE,
            max_bin_len=self._max,
            max_str_len=self._max,
            # A container element takes at least one byte, so these bounds follow from the
            # message size; they stop a short header from claiming billions of elements.
            max_array_len=self._max,
            max_map_len=self._max // 2,
            max_ext_len=self._max,
        )

    def _fatal(self, detail: str) -> list[Message | BadMessage]:
        self.broken = True
        error = TooLarge(f"{detail}; messages are at most {self._max} bytes")
        return [BadMessage(error, None, fatal=True)]

    def feed(self, data: bytes) -> list[Message | BadMessage]:
        """Add received bytes; return the messages (and bad input) they complete, in order."""
        if self.broken:
            return []
        out: list[Message | BadMessage] = []
        view = memoryview(data)
        for start in range(0, len(view), FEED_SLICE):
            try:
                self._unpacker.feed(view[start : start + FEED_SLICE])
            except msgpack.BufferFull:
                out.extend(self._fatal("message too large"))
                return out
            if self._drain(out):
                return out
        return out

    def _drain(self, out: list[Message | BadMessage]) -> bool:
        """Move every complete message into `out`; True when the stream is broken."""
        unpacker = self._unpacker
        while True:
            try:
                value = unpacker.unpack()
            except msgpack.OutOfData:
                return False
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                detail = str(exc) or type(exc).__name__
                if "exceeds max_" in detail:
                    # A header claims more than a message may hold; its body cannot be skipped.
                    out.extend(self._fatal(f"message too large ({detail})"))
                    return True
                out.append(_protocol_error(f"not valid MessagePack ({detail}); input discarded"))
                unpacker = self._unpacker = self._new_unpacker()
                continue
            offset = unpacker.tell()
            size = offset - self._offset
            self._offset = offset
            if size > self._max:
                out.extend(self._fatal(f"message of {size} bytes"))
                return True
            out.append(parse_message(value))
