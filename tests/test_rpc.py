"""The local MessagePack-RPC layer: codec, trio server and blocking client."""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ostrom.client import Connection
from ostrom.errors import (
    DaemonNotRunning,
    InternalError,
    InvalidInput,
    MethodNotFound,
    NotFound,
    OstromError,
    PermissionDenied,
    Refused,
    RemoteError,
    RpcProtocolError,
    TooLarge,
)
from ostrom.node import rpc_server
from ostrom.node.rpc_server import (
    MAX_CONNECTIONS,
    MAX_IN_FLIGHT,
    MAX_QUEUED_NOTIFICATIONS,
    RpcConnection,
    serve_rpc,
)
from ostrom.protocol.rpc import (
    EVENTS_LOST_METHOD,
    MAX_MESSAGE_SIZE,
    BadMessage,
    ErrorInfo,
    Message,
    Notification,
    Request,
    Response,
    RpcReader,
    encode,
    error_response,
    named_params,
)

# Every test that talks to a server finishes well within this; a hang fails instead of stalling.
DEADLINE = 10.0


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# --- codec -----------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
msgids = st.integers(min_value=0, max_value=2**32 - 1)
methods = st.text(max_size=30)
params_lists = st.lists(msgpack_values, max_size=3)
messages = st.one_of(
    st.builds(Request, msgids, methods, params_lists),
    st.builds(
        Response,
        msgids,
        st.none() | st.builds(ErrorInfo, st.text(max_size=10), st.text(max_size=30)),
        msgpack_values,
    ),
    st.builds(Response, st.none(), st.builds(ErrorInfo, st.text(max_size=5), st.text()), st.none()),
    st.builds(Notification, methods, params_lists),
)


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_messages_round_trip_in_any_split(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = RpcReader()
    out: list[Message | BadMessage] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(reader.feed(stream[start:end]))
    assert out == batch


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_reader_never_raises_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    reader = RpcReader(max_message_size=256)
    for chunk in chunks:
        for item in reader.feed(chunk):
            assert isinstance(item, Request | Response | Notification | BadMessage)
            if isinstance(item, BadMessage):
                assert item.error.code in ("rpc_protocol", "too_large")


@given(st.lists(msgpack_values, max_size=4))
def test_reader_never_raises_on_arbitrary_values(values: list[Any]) -> None:
    reader = RpcReader()
    items = reader.feed(b"".join(_pack(v) for v in values))
    assert len(items) == len(values)


def test_garbage_is_reported_then_the_stream_continues() -> None:
    reader = RpcReader()
    [bad] = reader.feed(b"\xc1")  # 0xc1 is the one byte MessagePack never uses
    assert isinstance(bad, BadMessage)
    assert bad.msgid is None and not bad.fatal
    assert bad.error.code == "rpc_protocol"
    assert reader.feed(encode(Request(3, "echo", []))) == [Request(3, "echo", [])]


@pytest.mark.parametrize(
    ("value", "msgid"),
    [
        (5, None),
        ([], None),
        ({"a": 1}, None),
        ([9, 1, "m", []], None),
        ([True, 1, "m", []], None),
        ([0, 7, "m"], 7),
        ([0, 7, "m", [], 1], 7),
        ([0, 7, 5, []], 7),
        ([0, 7, b"m", []], 7),
        ([0, 7, "m", {"a": 1}], 7),
        ([0, 7, "m", "x"], 7),
        ([0, -1, "m", []], None),
        ([0, 2**32, "m", []], None),
        ([0, True, "m", []], None),
        ([0, None, "m", []], None),
        ([1, 7, {"code": 5, "message": "m"}, None], 7),
        ([1, 7, "error", None], 7),
        ([1, None, None, 3], None),
        ([2, 5, []], None),
        ([2, "m"], None),
    ],
)
def test_invalid_shapes_become_bad_messages(value: Any, msgid: int | None) -> None:
    [item] = RpcReader().feed(_pack(value))
    assert isinstance(item, BadMessage)
    assert item.error.code == "rpc_protocol"
    assert item.msgid == msgid
    assert not item.fatal


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([0, 1, "m", [msgpack.ExtType(5, b"x")]]),  # ext types are refused
        msgpack.packb([0, 1, "m", [{1: 2}]]),  # integer map key
        b"\x94\x00\x01\xa1\xff\x90",  # invalid UTF-8 in the method name
        b"\x91" * 2000 + b"\x00",  # nested deeper than msgpack allows
    ],
)
def test_undecodable_values_are_reported(data: bytes) -> None:
    reader = RpcReader()
    [item] = reader.feed(data)
    assert isinstance(item, BadMessage)
    assert item.error.code == "rpc_protocol"
    assert reader.feed(encode(Notification("n", []))) == [Notification("n", [])]


def test_message_size_bound_is_exact() -> None:
    limit = 1024
    fits = Notification("n", [b""])
    filler = limit - len(encode(fits))
    at_limit = encode(Notification("n", [b"x" * (filler - 1)]))  # bin8 -> bin16 header grows by 1
    assert len(at_limit) == limit
    assert RpcReader(limit).feed(at_limit) == [Notification("n", [b"x" * (filler - 1)])]
    over = encode(Notification("n", [b"x" * filler]))
    assert len(over) == limit + 1
    reader = RpcReader(limit)
    [item] = reader.feed(over)
    assert isinstance(item, BadMessage) and item.fatal and item.error.code == "too_large"
    assert reader.broken
    assert reader.feed(encode(Notification("n", []))) == []


def test_header_claiming_too_many_elements_is_fatal() -> None:
    [item] = RpcReader().feed(b"\xdd\xff\xff\xff\xff")
    assert isinstance(item, BadMessage) and item.fatal and item.error.code == "too_large"


def test_message_too_large_for_the_buffer_is_fatal() -> None:
    reader = RpcReader(1024)
    items = reader.feed(b"\xc6" + struct.pack(">I", 100_000) + bytes(100_000))
    assert [(type(i), i.fatal) for i in items if isinstance(i, BadMessage)] == [(BadMessage, True)]


def test_encode_refuses_unencodable_and_oversized() -> None:
    with pytest.raises(InvalidInput):
        encode(Request(1, "m", [object()]))
    with pytest.raises(InvalidInput):
        encode(Request(1, "m", [2**64]))
    with pytest.raises(TooLarge):
        encode(Notification("n", [bytes(MAX_MESSAGE_SIZE)]))


def test_message_values_are_validated() -> None:
    with pytest.raises(InvalidInput):
        Request(2**32, "m", [])
    with pytest.raises(InvalidInput):
        Request(True, "m", [])
    with pytest.raises(InvalidInput):
        Response(None, None, 1)
    with pytest.raises(InvalidInput):
        Notification("n", ("tuple",))  # type: ignore[arg-type]


def test_named_params() -> None:
    assert named_params([]) == {}
    assert named_params([{"a": 1}]) == {"a": 1}
    bad_params: list[list[Any]] = [[1], [{"a": 1}, {}], [{1: 2}], [[]]]
    for bad in bad_params:
        with pytest.raises(InvalidInput):
            named_params(bad)


def test_errors_carry_their_class_over_the_wire() -> None:
    [response] = RpcReader().feed(encode(error_response(4, NotFound("no project x"))))
    assert isinstance(response, Response) and response.error is not None
    exc = response.error.to_exception()
    assert type(exc) is NotFound and exc.message == "no project x"
    unknown = ErrorInfo("from_the_future", "hm").to_exception()
    assert isinstance(unknown, RemoteError) and unknown.remote_code == "from_the_future"
    assert ErrorInfo.from_exception(unknown).code == "from_the_future"


# --- a server with a toy handler -------------------------------------------------------------


class Toy:
    """A handler with one method per behaviour under test."""

    def __init__(self) -> None:
        self.running = 0
        self.most_running = 0
        self.gate = trio.Event()
        self.closed = trio.Event()

    async def __call__(self, method: str, params: list[Any], conn: RpcConnection) -> Any:
        args = named_params(params)
        if method == "echo":
            return args
        if method == "not_found":
            raise NotFound("no such thing")
        if method == "bug":
            raise ValueError("boom")
        if method == "grouped":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._raise_not_found)
        if method == "unencodable":
            return object()
        if method == "slow":
            await trio.sleep(args["seconds"])
            return "done"
        if method == "gated":
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            await self.gate.wait()
            self.running -= 1
            return "released"
        if method == "whoami":
            return conn.peer_uid
        if method == "subscribe":
            conn.on_close(self.closed.set)
            for n in range(args["count"]):
                conn.notify("event", [{"n": n}])
            return "subscribed"
        if method == "background":
            conn.start_soon(self._count_to, conn, args["count"])
            return "started"
        if method == "background_bug":
            conn.start_soon(self._crash)
            return "started"
        raise MethodNotFound(f"no method {method!r}")

    async def _raise_not_found(self) -> None:
        raise NotFound("inside a nursery")

    async def _count_to(self, conn: RpcConnection, count: int) -> None:
        for n in range(count):
            await trio.sleep(0)
            conn.notify("event", [{"n": n}])

    async def _crash(self) -> None:
        await trio.sleep(0)
        raise ValueError("background boom")


@pytest.fixture
def toy() -> Toy:
    return Toy()


@pytest.fixture
async def sock(nursery: trio.Nursery, tmp_path: Path, toy: Toy) -> Path:
    path = tmp_path / "rpc.sock"
    await nursery.start(serve_rpc, path, toy)
    return path


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(DEADLINE):
        return await trio.to_thread.run_sync(fn)


class Raw:
    """A raw connection: bytes out, parsed messages in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = RpcReader()
        self.pending: list[Message | BadMessage] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Message | BadMessage | None:
        """The next message, or None at end of stream."""
        with trio.fail_after(DEADLINE):
            while not self.pending:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    async def call(self, msgid: int, method: str, params: list[Any]) -> Response:
        await self.send(encode(Request(msgid, method, params)))
        response = await self.receive()
        assert isinstance(response, Response) and response.msgid == msgid
        return response


@pytest.fixture
async def raw(sock: Path) -> AsyncIterator[Raw]:
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        yield Raw(stream)


# --- server behaviour ------------------------------------------------------------------------


async def test_call_round_trip(sock: Path) -> None:
    params = {"text": "héllo", "blob": bytes(range(256)) * 100, "nested": [{"k": [1, None]}]}

    def run() -> Any:
        with Connection(sock, timeout=5) as conn:
            return conn.call("echo", params), conn.call("echo")

    assert await in_thread(run) == (params, {})


async def test_errors_are_rebuilt_and_the_connection_lives_on(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def run() -> list[OstromError]:
        raised: list[OstromError] = []
        with Connection(sock, timeout=5) as conn:
            for method in ("not_found", "bug", "nope", "grouped", "unencodable"):
                with pytest.raises(OstromError) as info:
                    conn.call(method)
                raised.append(info.value)
            assert conn.call("echo", {"still": "alive"}) == {"still": "alive"}
        return raised

    with caplog.at_level(logging.ERROR, logger="ostrom.node.rpc_server"):
        not_found, bug, unknown, grouped, unencodable = await in_thread(run)
    assert type(not_found) is NotFound and not_found.message == "no such thing"
    assert type(bug) is InternalError and "boom" not in bug.message
    assert type(unknown) is MethodNotFound
    assert type(grouped) is NotFound and grouped.message == "inside a nursery"
    assert type(unencodable) is InternalError
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert any("boom" in str(r.exc_info[1]) for r in tracebacks if r.exc_info)


async def test_malformed_bytes_then_a_valid_call(raw: Raw) -> None:
    await raw.send(b"\xc1")
    error = await raw.receive()
    assert isinstance(error, Response) and error.msgid is None
    assert error.error is not None and error.error.code == "rpc_protocol"
    response = await raw.call(1, "echo", [{"a": 1}])
    assert response.error is None and response.result == {"a": 1}


@pytest.mark.parametrize(
    ("value", "msgid", "code"),
    [
        ([0, 5, "echo", "x"], 5, "rpc_protocol"),  # params not an array
        ([0, 5, "echo", [1, 2]], 5, "invalid_params"),  # not [] or [map]
        ([0, 5, "echo", [{1: 2}]], None, "rpc_protocol"),  # non-string key
        ([0, 5, 3, []], 5, "rpc_protocol"),  # method not a string
        ([0, -5, "echo", []], None, "rpc_protocol"),  # msgid not uint32
        ([1, 5, None, 1], None, "rpc_protocol"),  # clients send no responses
        ("hello", None, "rpc_protocol"),
        ([0, 5, "nope", []], 5, "method_not_found"),
    ],
)
async def test_invalid_requests_are_answered(
    raw: Raw, value: Any, msgid: int | None, code: str
) -> None:
    await raw.send(_pack(value))
    response = await raw.receive()
    assert isinstance(response, Response) and response.msgid == msgid
    assert response.error is not None and response.error.code == code
    assert (await raw.call(6, "echo", [])).result == {}


async def test_client_notifications_are_ignored(raw: Raw) -> None:
    await raw.send(encode(Notification("hello", [])))
    assert (await raw.call(1, "echo", [])).result == {}


async def test_oversized_message_closes_only_that_connection(sock: Path, raw: Raw) -> None:
    other = Raw(await trio.open_unix_socket(str(sock)))
    async with other.stream:
        size = MAX_MESSAGE_SIZE + 2 * 65536
        await raw.send(b"\xc6" + struct.pack(">I", size))
        # The server may close before taking all of it.
        with (
            trio.move_on_after(DEADLINE),
            suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await raw.send(bytes(size))
        error = await raw.receive()
        assert isinstance(error, Response) and error.error is not None
        assert error.error.code == "too_large"
        assert await raw.receive() is None
        assert (await other.call(1, "echo", [{"ok": True}])).result == {"ok": True}


async def test_half_closed_client_still_gets_its_answer(raw: Raw) -> None:
    await raw.send(encode(Request(1, "slow", [{"seconds": 0.05}])))
    await raw.stream.send_eof()
    response = await raw.receive()
    assert isinstance(response, Response) and response.result == "done"
    assert await raw.receive() is None


async def test_socket_file_is_private_and_checks_the_peer(sock: Path) -> None:
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    def whoami() -> Any:
        with Connection(sock, timeout=5) as conn:
            return conn.call("whoami")

    if hasattr(socket, "SO_PEERCRED"):
        assert await in_thread(whoami) == os.getuid()


async def test_other_uid_is_refused(
    nursery: trio.Nursery, tmp_path: Path, toy: Toy, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("SO_PEERCRED is Linux-only")
    path = tmp_path / "rpc.sock"
    with monkeypatch.context() as patch:
        # The server compares peers with the uid it sees at start; pretend it is someone else.
        patch.setattr(os, "getuid", lambda: os.geteuid() + 1)
        await nursery.start(serve_rpc, path, toy)

    def run() -> None:
        with Connection(path, timeout=5) as conn, pytest.raises(PermissionDenied):
            conn.call("echo")

    await in_thread(run)


async def test_stale_socket_is_replaced_and_other_files_are_not(
    nursery: trio.Nursery, tmp_path: Path, toy: Toy
) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(stale))
    await nursery.start(serve_rpc, stale, toy)
    stream = await trio.open_unix_socket(str(stale))
    async with stream:
        assert (await Raw(stream).call(1, "echo", [])).result == {}
    regular = tmp_path / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(InvalidInput):
        await serve_rpc(regular, toy)
    assert regular.read_text() == "keep me"


async def test_notifications_reach_a_subscriber(sock: Path, toy: Toy) -> None:
    def run() -> tuple[Any, list[tuple[str, list[Any]]]]:
        with Connection(sock, timeout=5) as conn:
            result = conn.call("subscribe", {"count": 3})
            received = []
            for note in conn.notifications(timeout=5):
                received.append(note)
                if len(received) == 3:
                    break
            return result, received

    result, received = await in_thread(run)
    assert result == "subscribed"
    assert received == [("event", [{"n": 0}]), ("event", [{"n": 1}]), ("event", [{"n": 2}])]
    with trio.fail_after(DEADLINE):
        await toy.closed.wait()  # on_close ran when the client hung up


@pytest.mark.parametrize("write_bytes", [rpc_server.NOTIFY_WRITE_BYTES, 100])
async def test_queued_notifications_go_out_together(
    sock: Path, toy: Toy, monkeypatch: pytest.MonkeyPatch, write_bytes: int
) -> None:
    # Each write wakes the subscriber; a burst of events (a gossip batch's) is one write, or a
    # few of at most a read's worth, in order.
    monkeypatch.setattr(rpc_server, "NOTIFY_WRITE_BYTES", write_bytes)
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def recorded(self: trio.SocketStream, data: bytes) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recorded)

    def run() -> list[tuple[str, list[Any]]]:
        with Connection(sock, timeout=5) as conn:
            conn.call("subscribe", {"count": 50})
            received = []
            for note in conn.notifications(timeout=5):
                received.append(note)
                if len(received) == 50:
                    return received
            return received

    assert await in_thread(run) == [("event", [{"n": n}]) for n in range(50)]
    bursts = [w for w in writes if b"event" in w]
    one = len(encode(Notification("event", [{"n": 10}])))
    if write_bytes > 50 * one:
        assert len(bursts) == 1
    else:
        assert len(bursts) >= 50 * one // (write_bytes + one)
        assert all(len(w) < write_bytes + one for w in bursts)


async def test_connection_tasks_notify_and_their_bugs_close_only_that_connection(
    sock: Path, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await raw.call(1, "background", [{"count": 2}])).result == "started"
    assert [await raw.receive(), await raw.receive()] == [
        Notification("event", [{"n": 0}]),
        Notification("event", [{"n": 1}]),
    ]
    with caplog.at_level(logging.ERROR, logger="ostrom.node.rpc_server"):
        assert (await raw.call(2, "background_bug", [])).result == "started"
        assert await raw.receive() is None
    assert any("background boom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    other = Raw(await trio.open_unix_socket(str(sock)))
    async with other.stream:
        assert (await other.call(1, "echo", [])).result == {}


async def test_notifications_end_after_a_quiet_timeout(sock: Path) -> None:
    def run() -> list[Any]:
        with Connection(sock, timeout=5) as conn:
            conn.call("echo")
            return list(conn.notifications(timeout=0.05))

    assert await in_thread(run) == []


async def test_a_subscriber_that_stops_reading_is_dropped(raw: Raw) -> None:
    # notify() never blocks, so the handler queues everything before any of it is written.
    count = MAX_QUEUED_NOTIFICATIONS + 50
    await raw.send(encode(Request(1, "subscribe", [{"count": count}])))
    events = 0
    last = None
    while (item := await raw.receive()) is not None:
        if isinstance(item, Notification):
            assert last is None or last.method != EVENTS_LOST_METHOD  # nothing after the notice
            events += item.method == "event"
            last = item
    assert events == MAX_QUEUED_NOTIFICATIONS
    assert last is not None and last.method == EVENTS_LOST_METHOD
    assert "lost" in last.params[0]["message"]


async def test_requests_in_flight_are_bounded(raw: Raw, toy: Toy) -> None:
    total = MAX_IN_FLIGHT + 8
    await raw.send(b"".join(encode(Request(i, "gated", [])) for i in range(total)))
    with trio.fail_after(DEADLINE):
        while toy.running < MAX_IN_FLIGHT:
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert toy.running == MAX_IN_FLIGHT
    toy.gate.set()
    answered = set()
    for _ in range(total):
        response = await raw.receive()
        assert isinstance(response, Response) and response.result == "released"
        answered.add(response.msgid)
    assert answered == set(range(total))
    assert toy.most_running == MAX_IN_FLIGHT


async def test_many_concurrent_clients(sock: Path) -> None:
    def client(n: int) -> list[Any]:
        with Connection(sock, timeout=5) as conn:
            return [conn.call("echo", {"client": n, "call": i}) for i in range(10)]

    results: dict[int, list[Any]] = {}

    async def run(n: int) -> None:
        results[n] = await trio.to_thread.run_sync(client, n)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(run, n)
    assert results == {n: [{"client": n, "call": i} for i in range(10)] for n in range(20)}


async def test_connections_over_the_bound_are_refused(sock: Path) -> None:
    streams = [await trio.open_unix_socket(str(sock)) for _ in range(MAX_CONNECTIONS)]
    try:
        for n, stream in enumerate(streams):
            assert (await Raw(stream).call(n, "echo", [])).result == {}  # all registered
        extra = Raw(await trio.open_unix_socket(str(sock)))
        async with extra.stream:
            refusal = await extra.receive()
            assert isinstance(refusal, Response) and refusal.error is not None
            assert refusal.error.code == Refused.code
            assert await extra.receive() is None
        await streams.pop().aclose()
        with trio.fail_after(DEADLINE):  # the freed slot becomes usable once the server sees EOF
            while True:
                retry = Raw(await trio.open_unix_socket(str(sock)))
                async with retry.stream:
                    await retry.send(encode(Request(1, "echo", [])))
                    answer = await retry.receive()
                    assert isinstance(answer, Response)
                    if answer.error is None:
                        break
                await trio.sleep(0.01)
    finally:
        for stream in streams:
            await stream.aclose()


async def test_cancelling_the_server_closes_everything(tmp_path: Path, toy: Toy) -> None:
    path = tmp_path / "rpc.sock"
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_rpc, path, toy)
            raw = Raw(await trio.open_unix_socket(str(path)))
            async with raw.stream:
                assert (await raw.call(1, "subscribe", [{"count": 0}])).result == "subscribed"
                await raw.send(encode(Request(2, "slow", [{"seconds": 60}])))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
                assert await raw.receive() is None
    assert not path.exists()
    assert toy.closed.is_set()


async def test_client_timeout_leaves_the_connection_usable(sock: Path) -> None:
    def run() -> Any:
        with Connection(sock, timeout=0.1) as conn:
            with pytest.raises(DaemonNotRunning, match="in time"):
                conn.call("slow", {"seconds": 0.3})
            conn._timeout = 5  # the late "done" arrives first and is skipped
            return conn.call("echo", {"after": 1})

    assert await in_thread(run) == {"after": 1}


def test_client_without_a_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match=r"no daemon is running on .*ostrom daemon"):
        Connection(tmp_path / "rpc.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(tmp_path / "dead.sock"))  # a socket file nobody listens on
        with pytest.raises(DaemonNotRunning, match=str(tmp_path)):
            Connection(tmp_path / "dead.sock")


def test_client_imports_neither_trio_nor_libp2p() -> None:
    code = (
        "import sys, ostrom.client; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_protocol_violation_from_the_daemon_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        listener.listen(1)

        def run() -> None:
            with Connection(path, timeout=5) as conn, pytest.raises(RpcProtocolError):
                conn.call("echo")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, run)
            peer, _ = await listener.accept()
            with peer:
                await peer.recv(65536)
                await peer.send(b"\xc1")
