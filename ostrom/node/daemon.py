"""The daemon process: one data directory, one store, one RPC socket, one nursery tree.

`run_daemon` owns everything it starts: the store is closed and the socket removed when it
returns, whether it stopped on SIGINT/SIGTERM or on an error.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from ostrom.crypto.keys import Identity
from ostrom.datadir import DataDir, init_data_dir
from ostrom.errors import DaemonAlreadyRunning
from ostrom.node.config import DaemonConfig
from ostrom.node.methods import dispatch
from ostrom.node.rpc_server import RpcConnection, serve_rpc
from ostrom.node.service import NodeService
from ostrom.node.store import Store
from ostrom.node.verifier import VerifierPool

if TYPE_CHECKING:
    # trio-typing (pulled in by libp2p) ships stubs that shadow trio's own TaskStatus.
    from trio_typing import TaskStatus

log = logging.getLogger("ostrom.daemon")


@contextmanager
def hold_lock(data_dir: DataDir) -> Iterator[None]:
    """Hold the data directory's lock for as long as this daemon runs.

    An advisory `flock` dies with the process, so a daemon killed with SIGKILL never leaves
    a stale lock behind; the PID written into the file is for people reading it.
    """
    fd = os.open(data_dir.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            raise DaemonAlreadyRunning(
                f"a daemon (pid {holder}) is already running on {data_dir.root}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def run_daemon(
    data_dir: DataDir,
    *,
    config: DaemonConfig | None = None,
    task_status: TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node on `data_dir` until cancelled or sent SIGINT / SIGTERM."""
    identity, created = init_data_dir(data_dir)
    if created:
        log.info("created a new identity %s in %s", identity.peer_id, data_dir.key_file)
    with hold_lock(data_dir):
        store = Store.open(data_dir.database)
        try:
            with VerifierPool() as verifier:
                await _serve(
                    identity, store, data_dir, verifier, config or DaemonConfig(), task_status
                )
        finally:
            store.close()
    log.info("ostrom daemon stopped")


async def _serve(
    identity: Identity,
    store: Store,
    data_dir: DataDir,
    verifier: VerifierPool,
    config: DaemonConfig,
    task_status: TaskStatus[NodeService],
) -> None:
    """Serve RPC and the mesh until SIGINT or SIGTERM; every task lives in this one nursery."""
    # The mesh (and with it libp2p) is imported only here: it is the slow import.
    from ostrom.node.mesh import Mesh, MeshConfig
    from ostrom.node.meshsync import MeshReplicator
    from ostrom.node.replication import MeshNetwork, Replicator

    service = NodeService(identity, store, data_dir, verifier=verifier)
    service.set_limits(config.limits)
    await service.meshes.load()
    mesh = Mesh(
        identity.seed,
        MeshConfig(
            listen=config.listen,
            bootstrap=config.bootstrap,
            mdns=config.mdns,
            dht=config.dht,
            max_peers=config.limits.max_peers,
        ),
    )
    replicator = Replicator(service, mesh)
    mesh_replicator = MeshReplicator(service.meshes, mesh, service.bandwidth)

    async def handle(method: str, params: list[Any], conn: RpcConnection) -> Any:
        return await dispatch(service, method, params, conn)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(verifier.serve_reaper)
            await nursery.start(service.serve_syncs)
            await nursery.start(service.serve_checkpoints)
            await nursery.start(mesh.serve)
            await nursery.start(replicator.serve)
            await nursery.start(mesh_replicator.serve)
            service.network = MeshNetwork(mesh, replicator, mesh_replicator)
            log.info("mesh listening on %s", ", ".join(mesh.listen_addrs))
            await nursery.start(serve_rpc, data_dir.socket, handle)
            # Everything loaded so far (libp2p alone is about 1,250 modules) lives as long as
            # the daemon; frozen, the garbage collector stops re-scanning it on every full
            # collection, which otherwise slows work that allocates a lot (imports, syncs).
            gc.freeze()
            log.info("ostrom daemon %s listening on %s", identity.peer_id, data_dir.socket)
            print(
                f"ostrom daemon ready: peer {identity.peer_id}, socket {data_dir.socket}",
                file=sys.stderr,
                flush=True,
            )
            task_status.started(service)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
