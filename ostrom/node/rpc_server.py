"""The daemon's local RPC server: MessagePack-RPC on a Unix socket, driven by trio.

The wire format and Ostrom's conventions are in `ostrom.protocol.rpc`. This module adds the
socket and its guards:

- The socket file is created in place of a stale one (the daemon holds the data directory's
  lock, so an old socket file there is stale) and set to mode 0600 before `listen`, so nobody
  can connect while it is still open to others. The process umask is not changed: it is
  process-wide and would race with files that worker threads create at the same time.
- Each connection's peer uid (SO_PEERCRED, Linux) must be the daemon's own uid; otherwise the
  peer gets a `permission_denied` error and is closed. Where SO_PEERCRED does not exist the
  0600 mode is the only guard.
- At most `MAX_CONNECTIONS` connections at once; one more gets a `refused` error and is closed.
- At most `MAX_IN_FLIGHT` requests run at once per connection. Further requests wait in the
  socket: the server stops reading until one finishes, so nothing queues without bound.
- Malformed input is answered and the connection carries on, except a message over the size
  bound: it cannot be skipped, so the connection is closed after a `too_large` error.
- A handler's `OstromError` goes back with its code and message; any other exception is logged
  with its traceback and answered with `internal`. The connection lives on either way.
- Parameters must follow the `[]` / `[{name: value}]` convention (`invalid_params` otherwise);
  the handler receives them as sent and may call `rpc.named_params` to get the map.
- When a client closes its sending side, requests already running finish (within
  `EOF_GRACE_SECONDS`) and are answered before the connection closes, so `request | nc -U`
  style scripts get their answers.

Every task lives in a nursery: the server's, and one per connection.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import trio

from ostrom.errors import (
    InternalError,
    InvalidInput,
    OstromError,
    PermissionDenied,
    Refused,
    RpcProtocolError,
    TooLarge,
)
from ostrom.node.quicklock import QuickLock
from ostrom.protocol.rpc import (
    EVENTS_LOST_METHOD,
    MAX_MESSAGE_SIZE,
    BadMessage,
    ErrorInfo,
    Notification,
    Request,
    Response,
    RpcReader,
    encode,
    error_response,
    named_params,
)

if TYPE_CHECKING:
    # mypy reads trio through the trio-stubs that libp2p's trio-typing installs; they export
    # TaskStatus only from trio_typing.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

# Local scripts, the CLI and a few long-lived subscribers; 64 is far above normal use and
# keeps a runaway script from exhausting the daemon's file descriptors.
MAX_CONNECTIONS: Final = 64
# Requests running at once on one connection; enough to pipeline a bulk upload, small enough
# that one client cannot monopolise the daemon.
MAX_IN_FLIGHT: Final = 32
# Notifications waiting for a slow subscriber, by count and by bytes. Events are a few hundred
# bytes, so 1,000 covers a burst (a big sync) while a subscriber that stopped reading costs
# the daemon at most one message's worth of memory.
MAX_QUEUED_NOTIFICATIONS: Final = 1000
MAX_QUEUED_NOTIFICATION_BYTES: Final = MAX_MESSAGE_SIZE
# Bytes asked of the socket per read: what a Unix socket typically delivers at once.
READ_SIZE: Final = 64 * 1024
# Notifications already queued go to a subscriber in one write of up to this many bytes (what
# it reads at once). Each write wakes the subscriber, which on a busy machine may take the
# processor from the daemon there and then: a gossip batch's `record.added` events cost one
# wake, not one each.
NOTIFY_WRITE_BYTES: Final = READ_SIZE
# Pending connections the kernel holds for us; matches MAX_CONNECTIONS.
LISTEN_BACKLOG: Final = 64
# After a client closes its sending side, how long its running requests may take to finish.
EOF_GRACE_SECONDS: Final = 30.0
# How long an error to a refused peer may take to send; the message is tiny, a peer that does
# not take it within a second is not reading.
REJECT_SEND_SECONDS: Final = 1.0
# After accept() fails for lack of descriptors or memory, wait this long before trying again
# (as trio.serve_listeners does) instead of spinning.
ACCEPT_RETRY_SECONDS: Final = 0.1
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
# sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
# An error message longer than this is cut: it goes into one response next to a stable code.
MAX_ERROR_MESSAGE_CHARS: Final = 4096

# The last notification a subscriber that fell behind receives.
_EVENTS_LOST: Final = encode(
    Notification(
        EVENTS_LOST_METHOD,
        [
            {
                "message": "the client did not read its notifications fast enough; events were "
                "lost and the daemon closed the connection (connect and subscribe again)"
            }
        ],
    )
)


class RpcConnection:
    """One client connection, as handlers see it: the peer's uid and a way to push messages."""

    def __init__(self, stream: trio.SocketStream, peer_uid: int | None) -> None:
        self._stream = stream
        self.peer_uid = peer_uid
        """The client's uid from SO_PEERCRED; None where the platform cannot tell."""
        # Taken for every reply and event sent; the send that follows yields on its own.
        self._send_lock = QuickLock()
        self._in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        # One slot over the bound, so the final "events lost" notice always fits.
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[tuple[bytes, bool]](
            MAX_QUEUED_NOTIFICATIONS + 1
        )
        self._queued = 0
        self._queued_bytes = 0
        self._lost = False
        self._closed = False
        self._close_callbacks: list[Callable[[], None]] = []
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def closed(self) -> bool:
        """True once the connection has closed (or is closing)."""
        return self._closed

    def notify(self, method: str, params: list[Any]) -> None:
        """Queue a notification to the client; never blocks.

        When the client has stopped reading and the queue is full, the notification is
        dropped, the client gets a final `events.lost` notification and the connection closes;
        later calls do nothing, as do calls after the connection closed. Raises `InvalidInput`
        or `TooLarge` when the params cannot be sent at all.
        """
        if self._closed or self._lost:
            return
        payload = encode(Notification(method, params))
        if (
            self._queued >= MAX_QUEUED_NOTIFICATIONS
            or self._queued_bytes + len(payload) > MAX_QUEUED_NOTIFICATION_BYTES
        ):
            self._lost = True
            log.warning(
                "RPC client (uid %s) stopped reading notifications; dropping it", self.peer_uid
            )
            self._outbox_send.send_nowait((_EVENTS_LOST, True))
            return
        self._queued += 1
        self._queued_bytes += len(payload)
        self._outbox_send.send_nowait((payload, False))

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run `fn(*args)` for as long as the connection lasts (e.g. forwarding events).

        The task is cancelled when the connection closes. If it raises, the error is logged
        with its traceback and this connection is closed; the daemon carries on. Does nothing
        once the connection has closed.
        """
        if self._closed or self._nursery is None:
            return
        self._nursery.start_soon(self._guarded, fn, args)

    async def _guarded(self, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception("a task of an RPC connection failed; closing the connection")
            self._cancel()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the connection closes (now, if it already has)."""
        if self._closed:
            _run_callback(callback)
        else:
            self._close_callbacks.append(callback)

    # --- the connection's tasks --------------------------------------------------------------

    async def _run(self, handler: Handler) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                nursery.start_soon(self._write_notifications)
                async with trio.open_nursery() as requests:
                    clean_eof = await self._read_loop(handler, requests)
                    if clean_eof:
                        requests.cancel_scope.deadline = trio.current_time() + EOF_GRACE_SECONDS
                    else:
                        requests.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self._outbox_send.close()
            callbacks, self._close_callbacks = self._close_callbacks, []
            for callback in callbacks:
                _run_callback(callback)

    async def _read_loop(self, handler: Handler, requests: trio.Nursery) -> bool:
        """Read and dispatch until the client stops sending; True on a clean end of stream."""
        reader = RpcReader()
        while True:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                return False
            if not data:
                return True
            for item in reader.feed(data):
                if isinstance(item, Request):
                    # Blocks while MAX_IN_FLIGHT requests run: the client's further requests
                    # wait in the socket, not in memory.
                    await self._in_flight.acquire()
                    requests.start_soon(self._answer, handler, item)
                elif isinstance(item, BadMessage):
                    await self._send(_encode_error(item.msgid, item.error))
                    if item.fatal:
                        return False
                elif isinstance(item, Response):
                    error = RpcProtocolError("the daemon sends no requests; responses are invalid")
                    await self._send(encode(error_response(None, error)))
                else:
                    log.debug("ignoring notification %r from an RPC client", item.method)

    async def _answer(self, handler: Handler, request: Request) -> None:
        try:
            payload = await _response_payload(handler, request, self)
            await self._send(payload)
        finally:
            self._in_flight.release()

    async def _write_notifications(self) -> None:
        async for payload, last in self._outbox_receive:
            parts: list[bytes] = []
            size = 0
            # What else is queued already, up to a read's worth, goes in the same write.
            while True:
                if not last:
                    self._queued -= 1
                    self._queued_bytes -= len(payload)
                parts.append(payload)
                size += len(payload)
                if last or size >= NOTIFY_WRITE_BYTES:
                    break
                try:
                    payload, last = self._outbox_receive.receive_nowait()
                except trio.WouldBlock:
                    break
            await self._send(b"".join(parts))  # one part is sent as it is, not copied
            if last:
                self._cancel()
                return

    async def _send(self, payload: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client no longer reads: nothing more can reach it.
                self._cancel()

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


Handler: TypeAlias = Callable[[str, list[Any], RpcConnection], Awaitable[Any]]
"""Runs one method: (method, params, connection) -> result, or raises an OstromError."""


def _run_callback(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        log.exception("an RPC connection's close callback failed")


def _single_ostrom_error(exc: BaseException) -> OstromError | None:
    """The OstromError inside `exc`, also when a nursery wrapped it in a one-error group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OstromError) else None


def _encode_error(msgid: int | None, exc: OstromError) -> bytes:
    info = ErrorInfo.from_exception(exc)
    if len(info.message) > MAX_ERROR_MESSAGE_CHARS:
        info = ErrorInfo(info.code, info.message[:MAX_ERROR_MESSAGE_CHARS] + " [...]")
    return encode(Response(msgid, info, None))


async def _response_payload(handler: Handler, request: Request, conn: RpcConnection) -> bytes:
    """The encoded response to `request`: its result, or the error it raised."""
    msgid, method = request.msgid, request.method
    try:
        named_params(request.params)
        result = await handler(method, request.params, conn)
    except Exception as exc:
        error = _single_ostrom_error(exc)
        if error is None:
            log.exception("RPC method %r failed", method)
            error = InternalError(f"{method} failed with an internal error (see the daemon log)")
        return _encode_error(msgid, error)
    try:
        return encode(Response(msgid, None, result))
    except TooLarge as exc:
        return _encode_error(msgid, exc)
    except InvalidInput:
        log.exception("RPC method %r returned a result MessagePack cannot carry", method)
        return _encode_error(msgid, InternalError(f"{method} returned an unencodable result"))


def _peer_uid(sock: trio.socket.SocketType) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux), else None."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _reject(stream: trio.SocketStream, exc: OstromError) -> None:
    """Tell a peer why it is turned away; the caller closes the stream."""
    with (
        trio.move_on_after(REJECT_SEND_SECONDS),
        suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        # The peer may already be gone; it is being turned away either way.
        await stream.send_all(encode(error_response(None, exc)))


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink(missing_ok=True)


class _Server:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._active = 0
        self._uid = os.getuid()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = _peer_uid(stream.socket)
            if uid is not None and uid != self._uid:
                log.warning("refused an RPC connection from uid %d", uid)
                await _reject(stream, PermissionDenied("only the daemon's own user may connect"))
                return
            if self._active >= MAX_CONNECTIONS:
                log.warning("refused an RPC connection: %d already open", self._active)
                await _reject(
                    stream,
                    Refused(f"the daemon already has {MAX_CONNECTIONS} connections; try later"),
                )
                return
            self._active += 1
            try:
                await RpcConnection(stream, uid)._run(self._handler)
            except Exception:
                # A bug in one connection's handling must not take the daemon down.
                log.exception("an RPC connection failed")
            finally:
                self._active -= 1


async def serve_rpc(
    socket_path: Path,
    handler: Handler,
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on a Unix socket at `socket_path` until cancelled.

    Replaces a stale socket file, calls `task_status.started()` once the socket accepts
    connections, and on cancellation closes every connection and removes the socket file.
    Raises `InvalidInput` when the path is too long for a Unix socket or is another kind of
    file.
    """
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise InvalidInput(
            f"socket path {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; "
            "use a shorter data directory"
        )
    _remove_stale_socket(socket_path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    identity: tuple[int, int] | None = None
    try:
        await sock.bind(os.fspath(socket_path))
        created = socket_path.stat()
        identity = (created.st_dev, created.st_ino)
        # Nobody can connect before listen(), so tightening the mode here leaves no window.
        socket_path.chmod(0o600)
        sock.listen(LISTEN_BACKLOG)
        listener = trio.SocketListener(sock)
        server = _Server(handler)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("RPC accept failed (%s); retrying", exc)
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                nursery.start_soon(server.handle, stream)
    finally:
        sock.close()
        if identity is not None:
            _unlink_if_ours(socket_path, identity)


def _unlink_if_ours(path: Path, identity: tuple[int, int]) -> None:
    """Remove the socket file unless something else has replaced it since we bound it."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == identity:
        path.unlink(missing_ok=True)
