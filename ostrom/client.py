"""Talk to a running daemon over its local RPC socket (what the CLI and scripts use).

This module must import fast, so a command returns in a fraction of a second: it imports only
the standard library, msgpack, `ostrom.errors` and `ostrom.protocol.rpc`, never trio or libp2p.

`Connection` is the low-level, blocking connection: `call(method, params)` sends one request
and waits for its response; notifications that arrive meanwhile are kept for
`notifications()`. The wire format and conventions are described in `ostrom.protocol.rpc`.
A `Connection` is not thread-safe: use one per thread.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, cast

from ostrom.errors import DaemonNotRunning, InvalidInput, PermissionDenied, RpcProtocolError
from ostrom.protocol.rpc import (
    EVENTS_LOST_METHOD,
    MAX_MSGID,
    BadMessage,
    Notification,
    Request,
    Response,
    RpcReader,
    encode,
)

# Bytes asked of the socket per read: what a Unix socket typically delivers at once.
SOCKET_READ_SIZE: Final = 64 * 1024
# Notifications kept while a call waits for its response. The daemon itself queues at most
# 1,000 per connection, so this client keeps the same number before it drops some (and says so).
MAX_PENDING_NOTIFICATIONS: Final = 1000
# How long a call waits for the daemon by default; long enough for any single call on a Pi.
DEFAULT_TIMEOUT: Final = 60.0


def _not_running(socket_path: Path) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"no daemon is running on {socket_path.parent} (start one with `ostrom daemon`)"
    )


class Connection:
    """A blocking MessagePack-RPC connection to the daemon's socket.

    `timeout` bounds each `call`, from sending to the response (None waits forever); a daemon
    that does not answer in time raises `DaemonNotRunning`, and the connection stays usable
    (the late response is skipped). Errors the daemon reports are raised
    as the same `OstromError` class it raised.
    """

    def __init__(self, socket_path: Path, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._path = socket_path
        self._timeout = timeout
        self._reader = RpcReader()
        self._pending: deque[tuple[str, list[Any]]] = deque()
        self._dropped = 0
        self._next_id = 0
        self._eof = False
        # Requests sent and not yet collected, and answers that arrived for them.
        self._outstanding: dict[int, str] = {}
        self._answered: dict[int, Response] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(socket_path))
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
            sock.close()
            raise _not_running(socket_path) from None
        except PermissionError:
            sock.close()
            raise PermissionDenied(
                f"no permission to use {socket_path}; the daemon belongs to another user"
            ) from None
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"cannot connect to {socket_path}: {exc}") from None
        self._sock: socket.socket | None = sock

    # --- calls -------------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call `method` with named `params`; return its result or raise the daemon's error."""
        return self.wait(self.submit(method, params))

    def submit(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Send a request without waiting for its answer; `wait(msgid)` collects it.

        Several submitted requests may be in flight at once (bulk imports keep the daemon
        busy this way); the daemon answers them in any order.
        """
        sock = self._open_socket()
        msgid = self._next_id
        self._next_id = (self._next_id + 1) % (MAX_MSGID + 1)
        payload = encode(Request(msgid, method, [] if params is None else [params]))
        sock.settimeout(self._timeout)
        try:
            sock.sendall(payload)
        except TimeoutError:
            raise DaemonNotRunning(f"the daemon did not take the `{method}` call in time") from None
        except OSError:
            # The daemon hung up (e.g. it refused this connection); what it sent before
            # closing says why, so `wait` reads on until the end of the stream.
            pass
        self._outstanding[msgid] = method
        return msgid

    def wait(
        self,
        msgid: int,
        on_notification: Callable[[str, list[Any]], None] | None = None,
    ) -> Any:
        """The result of the submitted request `msgid`, or the daemon's error for it.

        With `on_notification`, notifications that arrive meanwhile go to it instead of the
        queue `notifications()` reads, and each one restarts the timeout: a long call that
        reports progress (`block.fetch`) is alive for as long as it keeps reporting.
        """
        method = self._outstanding[msgid]
        sock = self._open_socket()
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            while msgid not in self._answered:
                if on_notification is not None and self._pending:
                    while self._pending:
                        on_notification(*self._pending.popleft())
                    if self._timeout is not None:
                        deadline = time.monotonic() + self._timeout
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DaemonNotRunning(f"the daemon did not answer `{method}` in time")
                    sock.settimeout(remaining)
                for response in self._receive(method):
                    if response.msgid is None:
                        # About this connection as a whole (e.g. too many connections).
                        if response.error is not None:
                            raise response.error.to_exception()
                    elif response.msgid in self._outstanding:
                        self._answered[response.msgid] = response
                    # Anything else answers a call that already timed out: skip it.
                if msgid not in self._answered and self._eof:
                    self.close()
                    raise DaemonNotRunning(f"the daemon closed the connection during `{method}`")
        finally:
            if msgid not in self._answered:
                del self._outstanding[msgid]
        del self._outstanding[msgid]
        response = self._answered.pop(msgid)
        if response.error is not None:
            raise response.error.to_exception()
        return response.result

    def _receive(self, method: str) -> list[Response]:
        """Read once from the socket; queue notifications, return responses."""
        sock = self._open_socket()
        try:
            data = sock.recv(SOCKET_READ_SIZE)
        except TimeoutError:
            raise DaemonNotRunning(f"the daemon did not answer `{method}` in time") from None
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return []
        responses: list[Response] = []
        for message in self._reader.feed(data):
            if isinstance(message, Response):
                responses.append(message)
            elif isinstance(message, Notification):
                self._keep(message)
            elif isinstance(message, BadMessage):
                self.close()
                raise message.error
            else:
                self.close()
                raise RpcProtocolError("the daemon sent a request; this client takes none")
        return responses

    def _keep(self, notification: Notification) -> None:
        if len(self._pending) >= MAX_PENDING_NOTIFICATIONS:
            self._dropped += 1
        else:
            self._pending.append((notification.method, notification.params))

    # --- notifications -----------------------------------------------------------------------

    def notifications(self, timeout: float | None = None) -> Iterator[tuple[str, list[Any]]]:
        """Yield `(method, params)` for each notification: those already received, then new ones.

        Ends when the daemon closes the connection, or after `timeout` seconds without a
        notification (None: wait for as long as the connection lasts). When notifications had
        to be dropped here, an `events.lost` notification stands in for them.
        """
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._dropped:
                lost = self._dropped
                self._dropped = 0
                message = f"{lost} notifications were dropped while a call was waiting"
                yield (EVENTS_LOST_METHOD, [{"message": message}])
                continue
            if self._eof or self._sock is None:
                return
            self._sock.settimeout(timeout)
            try:
                responses = self._receive("notifications")
            except DaemonNotRunning:
                return  # no notification within `timeout`
            for response in responses:
                # The daemon only answers requests, except for errors about the connection.
                if response.msgid is None and response.error is not None:
                    raise response.error.to_exception()

    # --- lifetime ----------------------------------------------------------------------------

    def _open_socket(self) -> socket.socket:
        if self._sock is None:
            raise DaemonNotRunning("the connection to the daemon is closed")
        return self._sock

    def close(self) -> None:
        """Close the connection; notifications already received stay readable."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the high-level client ---------------------------------------------------------------------

# Bytes of blocks sent per `block.put` call: several full blocks per round trip, well under
# the RPC message limit.
UPLOAD_BATCH_BYTES: Final = 4 * 1024 * 1024
# A batch of blocks this small is sent without first asking which of them the daemon lacks:
# over the local socket the bytes cost less than the extra round trip through its store.
ASK_FIRST_BYTES: Final = 64 * 1024
# How much of a local file is read at a time while chunking it.
FILE_READ_SIZE: Final = 1024 * 1024
# CIDs asked for per `block.get` / `record.get`; the daemon also caps each answer's bytes.
FETCH_BATCH: Final = 32
# CIDs per `block.missing` or `block.fetch` call: 600 KiB of request, well under the daemon's
# list limit; a 2.5 GiB file's blocks in one call.
CIDS_PER_CALL: Final = 10_000
RECORD_FETCH_BATCH: Final = 512
# Sections sent per `car.import` call: enough to keep the daemon's verification threads
# busy, small enough to stay under the RPC message limit with 1 MiB blocks in between.
IMPORT_BATCH_SECTIONS: Final = 1024
IMPORT_BATCH_BYTES: Final = 8 * 1024 * 1024
# Import batches sent ahead of their answers: two keep the daemon's verification busy
# while the next batch is read; more would only queue in the daemon.
IMPORT_PIPELINE: Final = 2

Progress = Callable[[int, int], None]


class Client:
    """A script's handle on a running daemon; `ostrom` uses exactly this class.

    Every method is one or a few RPC calls; errors arrive as the same `OstromError`
    subclasses the daemon raised (`NotFound`, `InvalidInput`, ...). Projects and records are
    named as on the command line: full CID, unique CID prefix, or (projects) unique name.

        from ostrom.client import Client

        with Client() as node:                      # $OSTROM_HOME or the default data dir
            project = node.create_project("recipes", license="CC-BY-SA-4.0")
            c = node.contribute("recipes", [Path("soup.md")], message="Add soup")
            for entry in node.log("recipes"):
                print(entry["cid"], entry["status"], entry.get("message"))
    """

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, *, timeout: float | None = 60.0
    ) -> None:
        from ostrom.datadir import resolve_data_dir

        self.data_dir = resolve_data_dir(data_dir)
        self._connection = Connection(self.data_dir.socket, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def call(self, method: str, **params: Any) -> Any:
        """Call any RPC method with named parameters (None values are left out)."""
        return self._connection.call(method, {k: v for k, v in params.items() if v is not None})

    def _map(self, method: str, **params: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self.call(method, **params))

    def _list(self, method: str, **params: Any) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.call(method, **params))

    # --- node and projects ---------------------------------------------------------------------

    def id(self) -> dict[str, Any]:
        return self._map("node.id")

    def status(self) -> dict[str, Any]:
        return self._map("node.status")

    def create_project(
        self,
        name: str,
        *,
        license: str,
        description: str = "",
        quorum: int = 1,
        maintainers: Sequence[str] = (),
        mesh: str | None = None,
    ) -> dict[str, Any]:
        """Create a project; with `mesh` (a private mesh this node is in), only that mesh's
        members are ever served it."""
        return self._map(
            "project.create",
            name=name,
            license=license,
            description=description,
            quorum=quorum,
            maintainers=list(maintainers),
            mesh=mesh,
        )

    def projects(self) -> list[dict[str, Any]]:
        return self._list("project.list")

    def project(self, project: str) -> dict[str, Any]:
        return self._map("project.show", project=project)

    def fork(self, project: str, name: str, *, at: Sequence[str] = ()) -> dict[str, Any]:
        return self._map("project.fork", project=project, name=name, at=list(at) or None)

    def peers(self) -> list[dict[str, Any]]:
        """Connected peers, their addresses and the projects they share with this node."""
        return self._list("peers.list")

    def connect(self, addr: str) -> dict[str, Any]:
        """Dial a peer at a multiaddr ending in /p2p/<peer id>."""
        return self._map("peers.connect", addr=addr)

    def follow(self, project: str, *, records_only: bool = False) -> dict[str, Any]:
        """Host `project` (its full CID if this node has never seen it)."""
        return self._map("project.follow", project=project, records_only=records_only)

    def unfollow(self, project: str) -> dict[str, Any]:
        return self._map("project.unfollow", project=project)

    def forks(self, project: str) -> dict[str, Any]:
        return self._map("project.forks", project=project)

    def log(self, project: str, *, limit: int = 1000) -> list[dict[str, Any]]:
        return self._list("project.log", project=project, limit=limit)

    def show(self, record: str) -> dict[str, Any]:
        return self._map("record.show", record=record)

    def tree(self, project: str, *, at: str | None = None) -> dict[str, Any]:
        return self._map("project.tree", project=project, at=at)

    # --- records -------------------------------------------------------------------------------

    def validate(
        self, record: str, verdict: str, *, note: str = "", project: str | None = None
    ) -> dict[str, Any]:
        return self._map(
            "validation.create", target=record, verdict=verdict, note=note, project=project
        )

    def governance(
        self,
        project: str,
        action: str,
        *,
        key: str | None = None,
        quorum: int | None = None,
        note: str = "",
    ) -> dict[str, Any]:
        return self._map(
            "governance.create",
            project=project,
            action=action,
            key=key,
            quorum=quorum,
            note=note,
        )

    # --- limits ------------------------------------------------------------------------------

    def limits(self) -> dict[str, Any]:
        """Each limit the owner set beside what the node uses of it."""
        return self._map("limits.get")

    def set_limits(self, **changes: str | int) -> dict[str, Any]:
        """Change limits until the daemon restarts: `upload_rate`, `download_rate` (bytes/s
        or text like `256KiB/s`), `storage`, `project_storage` (bytes or `8GiB`), and
        `max_peers`; 0 means no limit."""
        return self._map("limits.set", **changes)

    # --- community meshes --------------------------------------------------------------------

    def create_mesh(
        self,
        name: str,
        *,
        private: bool = False,
        description: str = "",
        bootstrap: Sequence[str] | None = None,
        stewards: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Create a mesh with this node as a steward; bootstrap defaults to its addresses."""
        return self._map(
            "mesh.create",
            name=name,
            private=private,
            description=description,
            bootstrap=None if bootstrap is None else list(bootstrap),
            stewards=list(stewards),
        )

    def mesh_invite(self, mesh: str) -> str:
        """The invite string that lets others join `mesh`."""
        return str(self._map("mesh.invite", mesh=mesh)["invite"])

    def join_mesh(self, invite: str) -> dict[str, Any]:
        return self._map("mesh.join", invite=invite)

    def meshes(self) -> list[dict[str, Any]]:
        return self._list("mesh.list")

    def mesh(self, mesh: str) -> dict[str, Any]:
        return self._map("mesh.show", mesh=mesh)

    def mesh_projects(self, mesh: str, *, limit: int | None = None) -> dict[str, Any]:
        """The projects `mesh`'s members host there: `{mesh, name, projects, total}`."""
        return self._map("mesh.projects", mesh=mesh, limit=limit)

    def leave_mesh(self, mesh: str) -> dict[str, Any]:
        return self._map("mesh.leave", mesh=mesh)

    def admit(self, mesh: str, peer: str, *, note: str = "") -> dict[str, Any]:
        return self._map("mesh.admit", mesh=mesh, peer=peer, note=note)

    def revoke(self, mesh: str, peer: str, *, note: str = "") -> dict[str, Any]:
        return self._map("mesh.revoke", mesh=mesh, peer=peer, note=note)

    # --- needs and comments ------------------------------------------------------------------

    def create_need(self, project: str, title: str, *, body: str = "") -> dict[str, Any]:
        return self._map("need.create", project=project, title=title, body=body)

    def needs(self, project: str) -> list[dict[str, Any]]:
        return self._list("need.list", project=project)

    def comment(self, record: str, text: str) -> dict[str, Any]:
        return self._map("comment.create", target=record, text=text)

    # --- files ---------------------------------------------------------------------------------

    def contribute(
        self,
        project: str,
        paths: Sequence[Path],
        *,
        message: str,
        to: str = "",
        deletes: Sequence[str] = (),
        resolves: Sequence[str] = (),
        parents: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload files and directories (only blocks the node lacks, unless they are few and
        small) and sign a contribution. The result's `uploaded_bytes` counts the bytes sent,
        `deduplicated_bytes` those not sent because the node had them.

        Directories contribute their contents (see `ostrom.files.collect`); `to` places
        everything under a directory of the project; `deletes` removes tree paths.
        """
        from ostrom.files import collect
        from ostrom.protocol.paths import join_tree_path

        local = collect(list(paths), to=to) if paths else []
        total = sum(f.size for f in local)
        uploader = _Uploader(self, total, progress)
        changes: list[dict[str, Any]] = []
        for entry in local:
            manifest_cid = uploader.upload_file(entry.fs_path)
            changes.append(
                {
                    "op": "put",
                    "path": entry.tree_path,
                    "file": str(manifest_cid),
                    "size": entry.size,
                    "exec": entry.exec,
                }
            )
        uploader.flush()
        for path in deletes:
            changes.append({"op": "delete", "path": join_tree_path("", path)})
        result = cast(
            dict[str, Any],
            self.call(
                "contribution.create",
                project=project,
                changes=changes,
                message=message,
                resolves=list(resolves) or None,
                parents=list(parents) or None,
            ),
        )
        result["uploaded_bytes"] = uploader.sent_bytes
        result["deduplicated_bytes"] = uploader.skipped_bytes
        return result

    def read_file(self, manifest_cid: str) -> Iterator[bytes]:
        """The bytes of a file by its manifest CID, block by block, each verified."""
        return self._read(self._manifest(manifest_cid))

    def _read(self, manifest: Any) -> Iterator[bytes]:
        from ostrom.protocol.chunking import assemble

        blocks = self._fetch_blocks([ref.cid for ref in manifest.blocks])
        return assemble(manifest, lambda cid: next(blocks)[1])

    def missing_blocks(self, cids: Sequence[str]) -> list[str]:
        """Those of `cids` the daemon does not have."""
        missing: list[str] = []
        for start in range(0, len(cids), CIDS_PER_CALL):
            missing += self.call("block.missing", cids=list(cids[start : start + CIDS_PER_CALL]))
        return missing

    def fetch_blocks(
        self,
        project: str,
        cids: Sequence[str],
        *,
        total_bytes: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Have the daemon fetch those of `cids` it lacks from peers sharing `project`: the
        blocks of a records-only project, fetched on demand. `progress(bytes, total_bytes)`
        follows the transfer. Raises `NotFound` if some could not be fetched (the others
        are kept, so asking again resumes)."""
        done = {"requested": 0, "fetched": 0, "bytes": 0}
        for start in range(0, len(cids), CIDS_PER_CALL):

            def report(method: str, params: list[Any], offset: int = done["bytes"]) -> None:
                if (
                    progress is not None
                    and method == "block.progress"
                    and params
                    and isinstance(params[0], dict)
                ):
                    progress(offset + int(params[0].get("bytes", 0)), total_bytes)

            batch = list(cids[start : start + CIDS_PER_CALL])
            msgid = self._connection.submit("block.fetch", {"project": project, "cids": batch})
            answer = self._connection.wait(msgid, on_notification=report)
            for key in done:
                done[key] += int(answer[key])
        if progress is not None:
            progress(done["bytes"], max(total_bytes, done["bytes"]))
        return done

    def _complete(
        self, project: str, manifest_cids: Sequence[str], progress: Progress | None
    ) -> dict[str, Any]:
        """The manifests of `manifest_cids`, after fetching whatever blocks of them the
        daemon lacks (a records-only project keeps its file blocks on its peers)."""
        from ostrom.crypto.cid import CID
        from ostrom.protocol.changesets import FileManifest

        missing = self.missing_blocks(manifest_cids)
        if missing:
            self.fetch_blocks(project, missing)
        manifests = {
            str(cid): FileManifest.decode(data)
            for cid, data in self._fetch_blocks([CID.parse(text) for text in manifest_cids])
        }
        sizes = {str(ref.cid): ref.size for m in manifests.values() for ref in m.blocks}
        missing = self.missing_blocks(list(sizes))
        if missing:
            total = sum(sizes[text] for text in missing)
            self.fetch_blocks(project, missing, total_bytes=total, progress=progress)
        return manifests

    def checkout(
        self,
        project: str,
        directory: Path,
        *,
        at: str | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
        fetch_progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Write the project's tree (accepted by default, or as of `at`) into `directory`.

        Blocks the daemon lacks (a records-only project) are fetched from its peers first,
        reported to `fetch_progress`. Every block is verified against its CID before it is
        written; nothing is written outside `directory`, even through a symlink planted
        inside it.
        """
        from ostrom.files import CheckoutWriter

        tree = self.tree(project, at=at)
        manifests = self._complete(
            project, sorted({f["file"] for f in tree["files"]}), fetch_progress
        )
        total = sum(f["size"] for f in tree["files"])
        done = 0
        with CheckoutWriter(directory, overwrite=overwrite) as writer:
            for entry in tree["files"]:

                def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
                    nonlocal done
                    for chunk in chunks:
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                        yield chunk

                writer.write(
                    entry["path"],
                    counted(self._read(manifests[entry["file"]])),
                    exec=entry["exec"],
                )
        if progress:
            progress(total, total)
        return {
            "dir": str(directory),
            "files": len(tree["files"]),
            "bytes": total,
            "heads": tree["heads"],
            "conflicts": tree["conflicts"],
        }

    def _manifest(self, manifest_cid: str) -> Any:
        from ostrom.crypto.cid import CID
        from ostrom.protocol.changesets import FileManifest

        cid = CID.parse(manifest_cid)
        [(_, data)] = list(self._fetch_blocks([cid]))
        return FileManifest.decode(data)

    def _fetch_blocks(self, cids: Sequence[Any]) -> Iterator[tuple[Any, bytes]]:
        """Blocks in order, fetched a batch at a time; each checked against its CID."""
        from ostrom.crypto.cid import CID
        from ostrom.errors import BlockMismatch

        position = 0
        while position < len(cids):
            batch = cids[position : position + FETCH_BATCH]
            answer = self.call("block.get", cids=[str(cid) for cid in batch])
            if not answer:
                raise RpcProtocolError("block.get returned no blocks")
            for (text, data), expected in zip(answer, batch, strict=False):
                if CID.parse(text) != expected or not expected.matches(data):
                    raise BlockMismatch(f"block {expected} does not match its CID")
                yield expected, data
            position += len(answer)

    # --- CAR files -----------------------------------------------------------------------------

    def export_car(
        self, project: str, path: Path, *, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Write the project's records and blocks to a CARv1 file (atomically renamed)."""
        from ostrom.crypto.cid import CID
        from ostrom.protocol.car import encode_header, encode_section

        plan = self.call("car.export", project=project)
        records = [CID.parse(text) for text in plan["records"]]
        blocks = [CID.parse(text) for text in plan["blocks"]]
        total = len(records) + len(blocks)
        done = 0
        written = 0
        temp = path.with_name(f".{path.name}.partial")
        with open(temp, "wb") as f:
            written += f.write(encode_header([CID.parse(text) for text in plan["roots"]]))
            position = 0
            while position < len(records):
                batch = records[position : position + RECORD_FETCH_BATCH]
                answer = self.call("record.get", cids=[str(cid) for cid in batch])
                for text, data in answer:
                    cid = CID.parse(text)
                    if not cid.matches(data):
                        raise RpcProtocolError(f"record {cid} does not match its CID")
                    written += f.write(encode_section(cid, data))
                position += len(answer)
                done += len(answer)
                if progress:
                    progress(done, total)
            for cid, data in self._fetch_blocks(blocks):
                written += f.write(encode_section(cid, data))
                done += 1
                if progress and done % 16 == 0:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        if progress:
            progress(total, total)
        return {
            "file": str(path),
            "records": len(records),
            "blocks": len(blocks),
            "bytes": written,
            "roots": plan["roots"],
        }

    def import_car(self, path: Path, *, progress: Progress | None = None) -> dict[str, Any]:
        """Send a CAR file's sections to the daemon, which verifies and stores them.

        Bad records are refused one by one with their reason; the rest are kept.
        """
        from ostrom.protocol.car import CarReader, CarSection

        reader = CarReader()
        total = os.path.getsize(path)
        summary: dict[str, Any] = {
            "stored": 0,
            "known": 0,
            "blocks_stored": 0,
            "blocks_known": 0,
            "refused": [],
            "roots": [],
        }
        batch: list[list[Any]] = []
        batch_bytes = 0
        sent_sections = 0
        in_flight: deque[tuple[int, int]] = deque()  # (msgid, index of its first section)

        def collect_oldest() -> None:
            msgid, first = in_flight.popleft()
            answer = self._connection.wait(msgid)
            summary["stored"] += len(answer["stored"])
            summary["known"] += answer["known"]
            summary["blocks_stored"] += answer["blocks_stored"]
            summary["blocks_known"] += answer["blocks_known"]
            for refusal in answer["refused"]:
                refusal["index"] += first
                summary["refused"].append(refusal)

        def send() -> None:
            # Keep one batch in flight while the next is read and sent, so the daemon
            # verifies one batch while it receives the next.
            nonlocal batch, batch_bytes, sent_sections
            if not batch:
                return
            # The CAR's roots (its header comes first) tie its blocks to their project.
            params = {"sections": batch, "projects": summary["roots"]}
            msgid = self._connection.submit("car.import", params)
            in_flight.append((msgid, sent_sections))
            sent_sections += len(batch)
            batch, batch_bytes = [], 0
            while len(in_flight) > IMPORT_PIPELINE:
                collect_oldest()

        with open(path, "rb") as f:
            done = 0
            while chunk := f.read(FILE_READ_SIZE):
                done += len(chunk)
                for item in reader.feed(chunk):
                    if isinstance(item, CarSection):
                        batch.append([item.cid.raw, item.data])
                        batch_bytes += len(item.data)
                        if len(batch) >= IMPORT_BATCH_SECTIONS or batch_bytes >= IMPORT_BATCH_BYTES:
                            send()
                    else:
                        summary["roots"] = [str(cid) for cid in item.roots]
                if progress:
                    progress(done, total)
            reader.close()
        send()
        while in_flight:
            collect_oldest()
        summary["refused"].sort(key=lambda refusal: refusal["index"])
        return summary

    # --- events --------------------------------------------------------------------------------

    def events(self, types: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """The node's events as they happen (only those of `types`, if given), until the
        daemon stops or the caller breaks off."""
        self.call("events.subscribe", types=None if types is None else list(types))
        for method_name, params in self._connection.notifications():
            if method_name == "event" and params and isinstance(params[0], dict):
                yield params[0]


class _Uploader:
    """Chunks local files and sends only the blocks the daemon does not have yet (all of a
    batch under `ASK_FIRST_BYTES`, without asking)."""

    def __init__(self, client: Client, total: int, progress: Progress | None) -> None:
        self._client = client
        self._total = total
        self._progress = progress
        self._done = 0
        self._pending: list[tuple[Any, bytes]] = []
        self._pending_bytes = 0
        self.sent_bytes = 0
        self.skipped_bytes = 0

    def upload_file(self, path: Path) -> Any:
        from ostrom.protocol.chunking import FileChunker

        chunker = FileChunker()
        with open(path, "rb") as f:
            while data := f.read(FILE_READ_SIZE):
                for block in chunker.feed(data):
                    self._add(block)
                self._done += len(data)
                if self._progress:
                    self._progress(self._done, self._total)
        blocks, _manifest, manifest_bytes, manifest_cid = chunker.finish()
        for block in blocks:
            self._add(block)
        self._add((manifest_cid, manifest_bytes))
        return manifest_cid

    def _add(self, block: tuple[Any, bytes]) -> None:
        self._pending.append(block)
        self._pending_bytes += len(block[1])
        if self._pending_bytes >= UPLOAD_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        unique = {cid: data for cid, data in self._pending}
        if self._pending_bytes < ASK_FIRST_BYTES:
            missing = {str(cid) for cid in unique}
        else:
            missing = set(self._client.call("block.missing", cids=[str(cid) for cid in unique]))
        send = [[str(cid), data] for cid, data in unique.items() if str(cid) in missing]
        for cid, data in unique.items():
            if str(cid) in missing:
                self.sent_bytes += len(data)
            else:
                self.skipped_bytes += len(data)
        if send:
            self._client.call("block.put", blocks=send)
        self._pending, self._pending_bytes = [], 0
